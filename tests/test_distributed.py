"""ZeRO-1 sharded optimizer state: real processes (gloo, 2 ranks, short timeouts).

Each scenario starts two processes of tests/dist_worker.py (with the env vars torchrun and
accelerate read); a rank that hangs is killed at the deadline and the test fails.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import optim_plugins as op
from optim_plugins.distributed import ShardedOptimizer, consolidate_shards, partition
from optim_plugins.registry import Capabilities

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenarios: str, out, timeout: float = 120.0):
    """Start WORLD ranks running ``scenarios`` (comma-separated, in one process group);
    return (exit codes, logs, {scenario: [result per rank]}, seconds)."""
    port = _free_port()
    procs, logs = [], []
    start = time.perf_counter()
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, WORKER, scenarios, str(out)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            hung = True
    for p in procs:  # only the processes started here
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    texts = [(out / f"rank{r}.log").read_text() for r in range(WORLD)]
    if hung:
        pytest.fail(f"a rank of {scenarios!r} hung past {timeout}s:\n" + "\n".join(t[-3000:] for t in texts))
    results = {}
    for scenario in scenarios.split(","):
        paths = [out / f"result.{scenario}.rank{r}.json" for r in range(WORLD)]
        results[scenario] = [json.loads(p.read_text()) if p.exists() else None for p in paths]
    return [p.returncode for p in procs], texts, results, time.perf_counter() - start


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One pair of processes runs the core and the accelerate scenarios (imports are the cost)."""
    out = tmp_path_factory.mktemp("dist")
    return run_ranks("core,accelerate", out)


def _check_ok(run, scenario):
    codes, texts, results, seconds = run
    if None in results[scenario]:
        pytest.fail(f"scenario {scenario!r} did not finish:\n" + "\n".join(
            f"--- rank {r} (exit {c})\n{t[-4000:]}" for r, (c, t) in enumerate(zip(codes, texts))))
    return results[scenario]


def test_sharded_matches_single_process_and_checkpoints_reshard(two_ranks):
    r0, r1 = _check_ok(two_ranks, "core")
    assert "adamw" in r0["names"]
    for name in r0["names"]:
        a, b = r0["optimizers"][name], r1["optimizers"][name]
        assert a["max_diff"] <= 1e-5 and b["max_diff"] <= 1e-5
        assert a["state_bytes"] + b["state_bytes"] == a["total_state_bytes"]
        assert abs(a["state_bytes"] - b["state_bytes"]) <= a["largest_param_state_bytes"]
    assert r0["diff_w1_step15"] <= 1e-6 and r0["diff_w1_to_w2_step20"] <= 1e-6
    assert r0["diff_consolidated_step20"] <= 1e-6


def test_accelerate_prepare_two_processes(two_ranks):
    pytest.importorskip("accelerate")
    r0, r1 = _check_ok(two_ranks, "accelerate")
    assert r0["state_bytes"] + r1["state_bytes"] == r0["total_state_bytes"]
    assert two_ranks[0] == [0] * WORLD, two_ranks[1]


def test_a_failing_rank_ends_every_rank_with_a_clear_error(tmp_path):
    codes, texts, results, seconds = run_ranks("fail", tmp_path)
    assert codes[0] != 0 and codes[1] != 0, texts
    assert "injected failure inside the optimizer step on rank 1" in texts[1]
    # rank 0 learns of it at once (not through the collective timeout)
    assert "the optimizer step failed on rank 1" in texts[0], texts[0][-3000:]


# ----------------------------------------------------------------------------- in-process (world of one)


def test_partition_balances_within_one_tensor():
    costs = [[100, 7, 50, 50, 3], [40, 40]]
    owners = partition(costs, 2)
    flat = [c for g in costs for c in g]
    loads = [sum(c for c, o in zip(flat, owners) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(flat)
    assert partition(costs[:1], 2) == owners[:5]  # adding a group later keeps the owners


def test_unshardable_optimizer_is_refused():
    class Global(op.optimizers.SGD):
        """SGD with a (pretend) global step size."""
        capabilities = Capabilities(shardable="no")

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedOptimizer.wrap(Global(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="LBFGS cannot be sharded"):
        ShardedOptimizer.wrap(torch.optim.LBFGS(model.parameters()))
    for name in op.list_optimizers():
        if op.get_optimizer_spec(name).capabilities.shardable == "no":
            with pytest.raises(ValueError, match="cannot be sharded"):
                ShardedOptimizer(model, name)


def test_world_of_one_and_wrap_torch_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ref.load_state_dict(model.state_dict())
    opt = ShardedOptimizer.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    sd = opt.state_dict()
    assert sd["sharding"]["world_size"] == 1 and sd["sharding"]["partition"] == [0, 1, 2, 3]
    full = consolidate_shards([sd])
    ref_opt.load_state_dict(full)  # a world-of-one shard is a torch-style state dict too
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
