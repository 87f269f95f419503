"""One rank of a distributed test (tests/test_distributed.py starts it once per rank).

    python tests/dist_worker.py SCENARIO[,SCENARIO...] OUT_DIR   (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

Each scenario checks with ``assert`` (a failing check exits non-zero with the traceback) and
writes what it measured to OUT_DIR/result.{SCENARIO}.rank{R}.json.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback

STARTED = time.perf_counter()

import torch
import torch.distributed as dist
from torch import nn

import optim_plugins as op
from optim_plugins.distributed import (
    ShardedOptimizer,
    consolidate_shards,
    found_inf,
    load_shards,
    optimizer_state_bytes,
    save_sharded,
    shard_file_name,
    sync_grad_scaler,
)

TIMEOUT = datetime.timedelta(seconds=30)
CANDIDATES = ["adamw", "adabelief", "lion", "adafactor", "lamb", "muon", "adam8bit"]
# Sharding by whole tensors keeps every tensor's math (and 8-bit quantisation blocks, which never
# span tensors) identical to one process, so 8-bit states meet the same 1e-6 (measured: 0.0).
TOLERANCE = {"adam8bit": 1e-6}
STEPS = 50


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 96), nn.GELU(),
                         nn.Linear(96, 32), nn.Linear(32, 4))  # 64x96: above 8-bit optimizers' min size


def batch(step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    return x[rows], y[rows]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    opt.zero_grad()
    x, y = batch(step)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def per_param_state_bytes(opt: torch.optim.Optimizer) -> list[int]:
    return [sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
            for s in opt.state.values()]


# ----------------------------------------------------------------------------- scenarios


def scenario_core(out: str, rank: int, world: int) -> dict:
    result: dict = {"optimizers": {}}
    names = [n for n in CANDIDATES if n in op.list_optimizers()]
    for name in names:
        model, ref = make_model(), make_model()
        opt = ShardedOptimizer(model, name)
        ref_opt = op.create_optimizer(name, ref)
        for step in range(STEPS):
            train_step(model, opt, step)
            train_step(ref, ref_opt, step)
        diff = max_diff(model, ref)
        tol = TOLERANCE.get(name, 1e-6)
        assert diff <= tol, f"{name}: sharded run differs from the single-process run by {diff} > {tol}"
        mine, total = optimizer_state_bytes(opt), optimizer_state_bytes(ref_opt)
        largest = max(per_param_state_bytes(ref_opt))
        all_mine = gather(mine)
        assert sum(all_mine) == total, f"{name}: shards hold {all_mine} bytes, unsharded {total}"
        assert abs(mine - total / world) <= largest, f"{name}: rank {rank} holds {mine} of {total} bytes"
        result["optimizers"][name] = {"max_diff": diff, "state_bytes": mine, "total_state_bytes": total,
                                      "largest_param_state_bytes": largest}
    result["names"] = names

    # ---- checkpoints: shards, consolidation, resharding 2 -> 1 -> 2
    model = make_model()
    opt = ShardedOptimizer(model, "adamw", lr=1e-2)
    sched = op.create_scheduler("cosine", opt, num_training_steps=20, num_warmup_steps=3)
    for step in range(10):
        train_step(model, opt, step)
        sched.step()
    shard_dir = os.path.join(out, "shards")
    save_sharded(opt, shard_dir)
    if rank == 0:  # state_dict() on one rank alone: it must not communicate (else this hangs)
        extra = opt.state_dict()
        assert extra["sharding"]["rank"] == 0 and extra["sharding"]["world_size"] == world
        torch.save({"model": model.state_dict(), "sched": sched.state_dict()}, os.path.join(out, "model10.pt"))
    full = opt.consolidate_state_dict(to_rank=0)
    assert (full is not None) == (rank == 0)
    again = opt.state_dict()  # Lightning: consolidate_state_dict() then state_dict() on rank 0
    assert ("sharding" not in again) == (rank == 0) and opt.state_dict()["sharding"]["rank"] == rank
    if rank == 0:
        torch.save(full, os.path.join(out, "consolidated.pt"))
    dist.barrier()
    shards = load_shards(shard_dir)  # weights_only=True
    assert len(shards) == world
    merged = consolidate_shards(shards)
    if rank == 0:
        assert sorted(merged["state"]) == sorted(full["state"]) == list(range(len(list(model.parameters()))))
        for i, s in full["state"].items():
            for k, v in s.items():
                assert torch.equal(v, merged["state"][i][k]), (i, k)
    try:  # another rank's shard is refused
        opt.load_state_dict(shards[1 - rank])
        raise AssertionError("loading another rank's shard did not raise")
    except ValueError as exc:
        assert "loaded on rank" in str(exc), exc
    opt.load_state_dict(shards[rank])  # its own shard: a no-op round trip
    snapshots = {}
    for step in range(10, 20):
        train_step(model, opt, step)
        sched.step()
        if step + 1 in (15, 20):
            snapshots[step + 1] = copy.deepcopy(model)

    solo = dist.new_group([0])
    if rank == 0:  # world size 1 from the 2 shards
        m1 = make_model()
        saved = torch.load(os.path.join(out, "model10.pt"), weights_only=True)
        m1.load_state_dict(saved["model"])
        o1 = ShardedOptimizer(m1, "adamw", lr=1e-2, process_group=solo)
        assert o1.world_size == 1
        s1 = op.create_scheduler("cosine", o1, num_training_steps=20, num_warmup_steps=3)
        s1.load_state_dict(saved["sched"])
        try:
            o1.load_state_dict(shards[0])
            raise AssertionError("a partial shard loaded into another world size did not raise")
        except ValueError as exc:
            assert "complete set of shards" in str(exc), exc
        try:
            o1.load_state_dict(shards[:1])
            raise AssertionError("an incomplete list of shards did not raise")
        except ValueError as exc:
            assert "missing [1]" in str(exc), exc
        o1.load_state_dict(shard_dir)
        for step in range(10, 15):
            train_step(m1, o1, step)
            s1.step()
        result["diff_w1_step15"] = max_diff(m1, snapshots[15])
        assert result["diff_w1_step15"] <= 1e-6, result
        save_sharded(o1, os.path.join(out, "w1"))
        torch.save({"model": m1.state_dict(), "sched": s1.state_dict()}, os.path.join(out, "model15.pt"))
    dist.barrier()
    m2 = make_model()
    saved = torch.load(os.path.join(out, "model15.pt"), weights_only=True)
    m2.load_state_dict(saved["model"])
    o2 = ShardedOptimizer(m2, "adamw", lr=1e-2)
    s2 = op.create_scheduler("cosine", o2, num_training_steps=20, num_warmup_steps=3)
    s2.load_state_dict(saved["sched"])
    o2.load_state_dict(torch.load(os.path.join(out, "w1", shard_file_name(0, 1)), weights_only=True))
    for step in range(15, 20):
        train_step(m2, o2, step)
        s2.step()
    result["diff_w1_to_w2_step20"] = max_diff(m2, snapshots[20])
    assert result["diff_w1_to_w2_step20"] <= 1e-6, result
    # a consolidated dict loads into world size 2 as well
    m3 = make_model()
    m3.load_state_dict(torch.load(os.path.join(out, "model10.pt"), weights_only=True)["model"])
    o3 = ShardedOptimizer(m3, "adamw", lr=1e-2)
    s3 = op.create_scheduler("cosine", o3, num_training_steps=20, num_warmup_steps=3)
    s3.load_state_dict(torch.load(os.path.join(out, "model10.pt"), weights_only=True)["sched"])
    o3.load_state_dict(torch.load(os.path.join(out, "consolidated.pt"), weights_only=True))
    for step in range(10, 20):
        train_step(m3, o3, step)
        s3.step()
    result["diff_consolidated_step20"] = max_diff(m3, snapshots[20])
    assert result["diff_consolidated_step20"] <= 1e-6, result

    # ---- clipping by the global norm, agreed found-inf, nonfinite="skip" agreed, GradScaler
    model, ref = make_model(), make_model()
    opt = ShardedOptimizer(model, "adamw")
    for m in (model, ref):
        x, y = batch(0)
        nn.functional.mse_loss(m(x), y).backward()
    norm = opt.clip_grad_norm_(0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert abs(norm.item() - ref_norm.item()) <= 1e-6 * ref_norm.item(), (norm, ref_norm)
    assert max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())) <= 1e-7
    local = [p.grad.clone() for p in model.parameters()]
    if rank == 1:
        local[0][0, 0] = float("inf")
    assert found_inf(local) is True
    assert found_inf([p.grad for p in model.parameters()]) is False

    model = make_model()
    opt = ShardedOptimizer(model, "adamw", nonfinite="skip")
    before = copy.deepcopy(model)
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    owned_by_1 = opt.partitions[1][0]
    list(model.parameters())[owned_by_1].grad[..., 0] = float("nan")  # as DDP would: on every rank
    opt.step()
    assert opt.skipped_steps == 1 and max_diff(model, before) == 0.0

    model = make_model()
    opt = ShardedOptimizer(model, "adamw")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batch(0)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if rank == 1:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    assert sync_grad_scaler(scaler, opt) is True
    before = copy.deepcopy(model)
    scaler.step(opt)
    scaler.update()
    assert max_diff(model, before) == 0.0 and scaler.get_scale() == 2.0**7, scaler.get_scale()
    return result


def scenario_accelerate(out: str, rank: int, world: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.process_index == rank
    model, ref = make_model(), make_model()
    opt = ShardedOptimizer(model, "adamw", lr=1e-2)
    ref_opt = op.create_optimizer("adamw", ref, lr=1e-2)
    model, opt = accelerator.prepare(model, opt)  # AcceleratedOptimizer: state_dict() + load_state_dict()
    assert isinstance(opt.optimizer, ShardedOptimizer)
    half = 32 // world
    for step in range(10):
        opt.zero_grad()
        x, y = batch(step, slice(rank * half, (rank + 1) * half))
        accelerator.backward(nn.functional.mse_loss(model(x), y))  # DDP averages the halves
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ref_opt.zero_grad()  # one process, the same average: the mean of the halves' losses
        sum(nn.functional.mse_loss(ref(x), y) for x, y in (batch(step, slice(r * half, (r + 1) * half))
                                                          for r in range(world))).div(world).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
    inner = accelerator.unwrap_model(model)
    diff = max_diff(inner, ref)
    assert diff <= 1e-6, diff
    flat = torch.cat([p.detach().reshape(-1) for p in inner.parameters()])
    assert all(torch.equal(flat, other) for other in gather(flat)), "parameters differ across ranks"
    mine = optimizer_state_bytes(opt.optimizer)
    total = optimizer_state_bytes(ref_opt)
    assert sum(gather(mine)) == total
    # accelerate's save path calls state_dict() on every rank: no communication, so no hang
    sd = opt.state_dict()
    assert sd["sharding"]["rank"] == rank
    return {"max_diff": diff, "state_bytes": mine, "total_state_bytes": total}


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def scenario_zero2(out: str, rank: int, world: int) -> dict:
    """ZeRO-2 (no DDP, gradients reduce-scattered to their owners) == ZeRO-1 under DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    half = 32 // world
    rows = slice(rank * half, (rank + 1) * half)
    result: dict = {}
    for name in ("adamw", "lamb"):
        z1_model, z2_model = make_model(), make_model()
        ddp = DDP(z1_model)
        z1 = ShardedOptimizer(z1_model, name, lr=1e-2)
        z2 = ShardedOptimizer(z2_model, name, lr=1e-2, stage=2, bucket_mb=0.01)  # several buckets per step
        total_grad = sum(p.numel() * p.element_size() for p in z2_model.parameters())
        for step in range(20):
            x, y = batch(step, rows)
            z1.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            n1 = z1.clip_grad_norm_(0.5)
            z1.step()
            z2.zero_grad()
            nn.functional.mse_loss(z2_model(x), y).backward()
            n2 = z2.clip_grad_norm_(0.5)  # reduces first: the global norm of the averaged gradients
            assert abs(n1.item() - n2.item()) <= 1e-6 * n1.item(), (step, n1, n2)
            mine = grad_bytes(z2_model)
            owned = sum(p.numel() * p.element_size() for p in z2.owned_params())
            assert mine == owned, (mine, owned)  # only the partition's gradients are kept
            z2.step()
        diff = max_diff(z1_model, z2_model)
        assert diff <= 1e-6, f"{name}: ZeRO-2 differs from ZeRO-1 by {diff}"
        result[name] = {"max_diff": diff, "grad_bytes": mine, "total_grad_bytes": total_grad}
        assert sum(gather(mine)) == total_grad
    # fp16 loss scaling under ZeRO-2: an overflow on one rank's local gradients skips the step everywhere
    model = make_model()
    opt = ShardedOptimizer(model, "adamw", stage=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = copy.deepcopy(model)
    x, y = batch(0, rows)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if rank == 1:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    assert sync_grad_scaler(scaler, opt) is True
    scaler.step(opt)
    scaler.update()
    assert max_diff(model, before) == 0.0 and scaler.get_scale() == 2.0**7, scaler.get_scale()
    try:
        ShardedOptimizer(make_model(), "adamw", stage=3)
        raise AssertionError("stage=3 did not raise")
    except ValueError as exc:
        assert "invalid stage: 3" in str(exc), exc
    return result


def scenario_fsdp2(out: str, rank: int, world: int) -> dict:
    """FSDP2 (fully_shard, DTensor parameters) with our elementwise optimizers == one process."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    half = 32 // world
    result: dict = {}
    for name in ("adamw", "lion"):
        model, ref = make_model(), make_model()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        assert op.get_optimizer_spec(name).capabilities.shardable == "elements"
        opt = op.create_optimizer(name, model, lr=1e-2)
        ref_opt = op.create_optimizer(name, ref, lr=1e-2)
        for step in range(10):
            opt.zero_grad()
            x, y = batch(step, slice(rank * half, (rank + 1) * half))
            nn.functional.mse_loss(model(x), y).backward()  # FSDP2 averages the gradients
            opt.step()
            ref_opt.zero_grad()  # the same average in one process: the mean of the halves' losses
            sum(nn.functional.mse_loss(ref(x), y) for x, y in (batch(step, slice(r * half, (r + 1) * half))
                                                              for r in range(world))).div(world).backward()
            ref_opt.step()
        full = [p.full_tensor() for p in model.parameters()]
        diff = max((a - b).abs().max().item() for a, b in zip(full, ref.parameters()))
        assert diff <= 1e-6, f"{name} under FSDP2 differs from one process by {diff}"
        local = sum(t.to_local().numel() * t.to_local().element_size() for s in opt.state.values()
                    for t in s.values() if isinstance(t, DTensor))
        result[name] = {"max_diff": diff, "local_state_bytes": local}
    return result


def scenario_hf(out: str, rank: int, world: int) -> dict:
    """HF Trainer, 2 processes: ZeRO-1 == plain DDP; save at step 4, resume == uninterrupted."""
    from transformers import TrainingArguments

    from optim_plugins.integrations import hf

    hf.install()

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x, labels=None):
            y = self.net(x)
            return {"loss": nn.functional.mse_loss(y, labels), "logits": y}

    g = torch.Generator().manual_seed(7)
    data = [{"x": torch.randn(16, generator=g), "labels": torch.randn(4, generator=g)} for _ in range(64)]

    def run(name: str, shard: bool, resume: str | None = None):
        args = TrainingArguments(
            os.path.join(out, "hf", name), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
            optim="op_adamw", lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps", save_steps=4,
            logging_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False, seed=0,
            disable_tqdm=True, max_grad_norm=1.0)
        trainer = hf.OptimPluginsTrainer(model=Regressor(), args=args, train_dataset=data,
                                         optim_plugins_args=hf.OptimPluginsArguments(shard_optimizer_state=shard))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    plain = run("plain", False)
    sharded = run("sharded", True)
    opt = hf._sharded(sharded.optimizer)
    assert opt is not None and opt.world_size == world
    ckpt = os.path.join(out, "hf", "sharded", "checkpoint-4")
    files = sorted(os.listdir(ckpt))
    for r in range(world):
        assert shard_file_name(r, world) in files, files
    resumed = run("resumed", True, resume=ckpt)
    diff_plain = max_diff(plain.model, sharded.model)
    diff_resume = max_diff(sharded.model, resumed.model)
    assert diff_plain <= 1e-6, f"sharded Trainer run differs from plain DDP by {diff_plain}"
    assert diff_resume == 0.0, f"resumed run differs from the uninterrupted one by {diff_resume}"
    assert resumed.state.global_step == 8
    return {"diff_plain": diff_plain, "diff_resume": diff_resume, "files": files,
            "state_bytes": optimizer_state_bytes(opt)}


def scenario_lightning(out: str, rank: int, world: int) -> dict:
    """Lightning strategy="ddp": ZeRO-1 == plain DDP; checkpoint after epoch 1, resume == uninterrupted."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import optim_plugins.integrations.lightning as opl

    class Module(pl.LightningModule):
        def __init__(self, shard: bool):
            super().__init__()
            self.net = make_model()
            self.shard = shard

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return opl.configure_optimizers(self, "adamw", lr=1e-2, shard_optimizer_state=self.shard)

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g))

    def fit(shard: bool, epochs: int, ckpt: str | None = None):
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=os.path.join(out, "pl"))
        module = Module(shard)
        trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt)
        return trainer, module

    _, plain = fit(False, 2)
    _, sharded = fit(True, 2)
    trainer, half = fit(True, 1)
    opt = trainer.optimizers[0]
    assert isinstance(opt, ShardedOptimizer) and opt.world_size == world
    path = os.path.join(out, "pl", "epoch1.ckpt")
    trainer.save_checkpoint(path)  # consolidate_state_dict() on every rank, rank 0 writes the full state
    dist.barrier()
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]
    assert "sharding" not in saved and len(saved["state"]) == len(list(half.parameters())), "not consolidated"
    _, resumed = fit(True, 2, ckpt=path)
    diff_plain = max_diff(plain, sharded)
    diff_resume = max_diff(sharded, resumed)
    assert diff_plain <= 1e-6, f"sharded Lightning run differs from plain DDP by {diff_plain}"
    assert diff_resume == 0.0, f"resumed run differs from the uninterrupted one by {diff_resume}"
    return {"diff_plain": diff_plain, "diff_resume": diff_resume}


def scenario_fail(out: str, rank: int, world: int) -> dict:
    """A rank failing inside the step: every rank raises at once (the process group stays usable;
    the parameters are out of step, which the error says)."""
    model = make_model()
    opt = ShardedOptimizer(model, "adamw")
    messages = []
    for step in range(5):
        if step == 3 and rank == 1:
            def broken(*args, **kwargs):
                raise RuntimeError("injected failure inside the optimizer step on rank 1")
            opt.optimizer.step = broken
        try:
            train_step(model, opt, step)
        except RuntimeError as exc:
            messages.append(str(exc))
            break
    assert step == 3 and len(messages) == 1, (step, messages)
    return {"message": messages[0]}  # the process group still works: the next scenario runs


def scenario_die(out: str, rank: int, world: int) -> dict:
    """Shards saved after step 3, then rank 1 dies inside step 5: rank 0 gets a clear error at once."""
    model = make_model()
    opt = ShardedOptimizer(model, "adamw", lr=1e-2)
    for step in range(5):
        if step == 3:
            save_sharded(opt, os.path.join(out, "before_death"))
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(out, "before_death", "model.pt"))
            dist.barrier()
        if step == 4 and rank == 1:
            def die(*args, **kwargs):
                sys.stdout.flush()
                os._exit(17)
            opt.optimizer.step = die
        train_step(model, opt, step)
    raise AssertionError("rank 0 did not notice that rank 1 died")


SCENARIOS = {"core": scenario_core, "accelerate": scenario_accelerate, "zero2": scenario_zero2,
             "fsdp2": scenario_fsdp2, "hf": scenario_hf, "lightning": scenario_lightning,
             "fail": scenario_fail, "die": scenario_die}


def main() -> None:
    scenarios, out = sys.argv[1].split(","), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}: process group up after {time.perf_counter() - STARTED:.1f}s", flush=True)
    code = 0
    try:
        for scenario in scenarios:
            start = time.perf_counter()
            result = SCENARIOS[scenario](out, rank, world)
            result["seconds"] = time.perf_counter() - start
            with open(os.path.join(out, f"result.{scenario}.rank{rank}.json"), "w") as f:
                json.dump(result, f, indent=1)
            dist.barrier()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:  # leave at once: an interpreter teardown with a live process group can take seconds
        dist.destroy_process_group()
        print(f"rank {rank}: exit {code} after {time.perf_counter() - STARTED:.1f}s", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
