"""ZeRO-1/2 sharded optimizer state, FSDP2, HF Trainer and Lightning DDP: real processes (gloo,
2 ranks, short timeouts).

Each launch starts two processes of tests/dist_worker.py (with the env vars torchrun and
accelerate read) running several scenarios in one process group (process start and imports are
the cost); a rank that hangs is killed at the deadline and the test fails.
"""
from __future__ import annotations

import json
import os
import shutil
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
sys.path.insert(0, os.path.dirname(__file__))
import dist_worker  # noqa: E402  (its model, batches and tolerances; no process group here)

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
    """One pair of processes runs the torch-only and the accelerate scenarios."""
    out = tmp_path_factory.mktemp("dist")
    return run_ranks("core,accelerate,zero2,fsdp2", out)


@pytest.fixture(scope="module")
def trainer_ranks(tmp_path_factory):
    """One pair of processes runs the HF Trainer and the Lightning scenarios."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("dist_trainers")
    return run_ranks("hf,lightning", out, timeout=240.0)


def _check_ok(run, scenario):
    codes, texts, results, seconds = run
    if None in results[scenario]:
        pytest.fail(f"scenario {scenario!r} did not finish:\n" + "\n".join(
            f"--- rank {r} (exit {c})\n{t[-4000:]}" for r, (c, t) in enumerate(zip(codes, texts))))
    return results[scenario]


def test_sharded_matches_single_process_and_checkpoints_reshard(two_ranks):
    r0, r1 = _check_ok(two_ranks, "core")
    assert "adamw" in r0["names"]
    assert set(r0["names"]) == {"adamw", "adabelief", "lion", "adafactor", "lamb", "muon", "adam8bit"}
    for name in r0["names"]:
        a, b = r0["optimizers"][name], r1["optimizers"][name]
        tol = dist_worker.TOLERANCE.get(name, 1e-6)  # 50 steps, against create_optimizer in one process
        assert a["max_diff"] <= tol and b["max_diff"] <= tol, (name, a["max_diff"], b["max_diff"])
        assert a["state_bytes"] + b["state_bytes"] == a["total_state_bytes"]
        assert abs(a["state_bytes"] - b["state_bytes"]) <= a["largest_param_state_bytes"]
    assert r0["diff_w1_step15"] <= 1e-6 and r0["diff_w1_to_w2_step20"] <= 1e-6
    assert r0["diff_consolidated_step20"] <= 1e-6


def test_accelerate_prepare_two_processes(two_ranks):
    pytest.importorskip("accelerate")
    r0, r1 = _check_ok(two_ranks, "accelerate")
    assert r0["max_diff"] <= 1e-6  # prepare() + DDP + accelerator.clip_grad_norm_ vs one process
    assert r0["state_bytes"] + r1["state_bytes"] == r0["total_state_bytes"]
    assert two_ranks[0] == [0] * WORLD, two_ranks[1]


def test_zero2_equals_zero1_and_keeps_only_owned_gradients(two_ranks):
    r0, r1 = _check_ok(two_ranks, "zero2")
    for name in ("adamw", "lamb"):
        a, b = r0[name], r1[name]
        assert a["max_diff"] <= 1e-6 and b["max_diff"] <= 1e-6  # vs ZeRO-1 under DDP, 20 steps, clipped
        assert a["grad_bytes"] + b["grad_bytes"] == a["total_grad_bytes"]
        assert max(a["grad_bytes"], b["grad_bytes"]) < a["total_grad_bytes"]


def test_fsdp2_elementwise_optimizers_on_dtensor_parameters(two_ranks):
    r0, r1 = _check_ok(two_ranks, "fsdp2")
    for name in ("adamw", "lion"):
        assert r0[name]["max_diff"] <= 1e-6 and r1[name]["max_diff"] <= 1e-6  # vs one process, same average


def test_hf_trainer_sharded_checkpoint_resumes_exactly(trainer_ranks):
    r0, r1 = _check_ok(trainer_ranks, "hf")
    assert r0["diff_plain"] <= 1e-6  # ZeRO-1 Trainer run vs the plain DDP Trainer run
    assert r0["diff_resume"] == 0.0 and r1["diff_resume"] == 0.0  # resumed at step 4 vs uninterrupted
    assert {"optimizer.rank00000-of-00002.pt", "optimizer.rank00001-of-00002.pt", "scheduler.pt"} <= set(r0["files"])


def test_lightning_ddp_sharded_checkpoint_resumes_exactly(trainer_ranks):
    r0, r1 = _check_ok(trainer_ranks, "lightning")
    assert r0["diff_plain"] <= 1e-6 and r1["diff_plain"] <= 1e-6
    assert r0["diff_resume"] == 0.0 and r1["diff_resume"] == 0.0
    assert trainer_ranks[0] == [0] * WORLD


def test_a_failing_or_dying_rank_gives_a_clear_error_and_the_last_checkpoint_loads(tmp_path):
    codes, texts, results, seconds = run_ranks("fail,die", tmp_path)
    # an exception inside one rank's step: every rank raises at once, the process group survives
    fail = results["fail"]
    assert fail[1]["message"] == "injected failure inside the optimizer step on rank 1"
    assert "the optimizer step failed on rank 1" in fail[0]["message"]
    assert "restart every rank from the last checkpoint" in fail[0]["message"]
    # rank 1 dies (os._exit) inside a step: rank 0 raises at once, naming the cause, not after a timeout
    assert codes == [1, 17], texts
    assert "another rank probably died or timed out" in texts[0], texts[0][-3000:]
    # the shards saved before the death load (here: a world of one) and continue like one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same summation order in the matmuls
    try:
        _continue_from_checkpoint(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _continue_from_checkpoint(tmp_path):
    saved = tmp_path / "before_death"
    model = dist_worker.make_model()
    model.load_state_dict(torch.load(saved / "model.pt", weights_only=True))
    opt = ShardedOptimizer(model, "adamw", lr=1e-2)
    opt.load_state_dict(str(saved))
    ref = dist_worker.make_model()
    ref_opt = op.create_optimizer("adamw", ref, lr=1e-2)
    for step in range(3):
        dist_worker.train_step(ref, ref_opt, step)
    assert dist_worker.max_diff(model, ref) == 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
    dist_worker.train_step(model, opt, 3)
    dist_worker.train_step(ref, ref_opt, 3)
    assert dist_worker.max_diff(model, ref) <= 1e-6
    # a set that lost a rank's file (a rank died while saving) is refused with the reason
    partial = tmp_path / "partial"
    shutil.copytree(saved, partial)
    (partial / "optimizer.rank00001-of-00002.pt").unlink()
    with pytest.raises(ValueError, match=r"incomplete set of optimizer shards of a 2-process run: missing ranks \[1\]"):
        opt.load_state_dict(str(partial))


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
    with pytest.raises(ValueError, match="invalid stage: 3"):
        ShardedOptimizer(model, "adamw", stage=3)
    two = ShardedOptimizer(model, "adamw", stage=2)  # a world of one: nothing to reduce
    model(x).square().sum().backward()
    two.step()
    assert all(p.grad is not None for p in model.parameters())
