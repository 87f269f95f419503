"""accelerate: a single-process loop, a real 2-process gloo run (lr per optimizer step), DeepSpeed offload warning."""
import json
import os
import socket
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")

import optim_plugins as op  # noqa: E402
import optim_plugins.integrations.accelerate as opa  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_single_process_loop_lr_per_optimizer_step():
    from accelerate_loop import main

    _reset_accelerate()
    out = main(steps_per_epoch_batches=16, accumulation=2)
    _reset_accelerate()
    assert out["steps"] == out["num_training_steps"] == 8
    sched = out["schedule"]
    assert sched.last_epoch == 8
    assert out["lrs"] == pytest.approx([sched.lr_at(k)[0] for k in range(1, 9)])


def _rank(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    from accelerate_loop import main

    out = main(steps_per_epoch_batches=32, accumulation=2)
    # accelerate's own wiring, for comparison: num_processes schedule steps per optimizer step
    from accelerate import Accelerator

    accelerator = Accelerator()
    opt = op.create_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt = accelerator.prepare_optimizer(opt)
    plain = accelerator.prepare_scheduler(op.create_scheduler("linear", opt, num_training_steps=100))
    opt.step()
    plain.step()
    result = {"steps": out["steps"], "total": out["num_training_steps"], "lrs": out["lrs"],
              "expected": [out["schedule"].lr_at(k)[0] for k in range(1, out["steps"] + 1)],
              "last_epoch": out["schedule"].last_epoch, "num_processes": out["num_processes"],
              "plain_last_epoch": plain.scheduler.last_epoch}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_schedule_counts_optimizer_steps(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse the imported modules (seconds, not tens of seconds); gloo timeout 20 s
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["num_processes"] == 2
        # 32 batches per epoch split over 2 processes = 16 per process, / 2 accumulation = 8 optimizer steps
        assert result["steps"] == result["total"] == 8
        assert result["last_epoch"] == 8
        assert result["lrs"] == pytest.approx(result["expected"])
        assert result["plain_last_epoch"] == 2  # what accelerator.prepare(scheduler) alone does


def test_deepspeed_offload_warning():
    opt = op.create_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))])
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=offload)))
    with pytest.warns(UserWarning, match="replace AdamW by DeepSpeedCPUAdam.*zero_force_ds_cpu_optimizer"):
        assert opa.check_deepspeed(accelerator, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not opa.check_deepspeed({**offload, "zero_force_ds_cpu_optimizer": False}, opt)
        assert not opa.check_deepspeed({"zero_optimization": {"stage": 2}}, opt)
        assert not opa.check_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), opt)
