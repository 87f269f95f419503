"""Lightning: configure_optimizers, checks, callbacks, LightningCLI, resume (real Trainer.fit on CPU)."""
import os
import sys
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import optim_plugins as op  # noqa: E402
import optim_plugins.integrations.lightning as opl  # noqa: E402
from optim_plugins.registry import OPTIMIZERS, Capabilities  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from lightning_module import TinyData, TinyRegressor  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _trainer(**kwargs):
    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.mark.parametrize("optimizer,scheduler,accumulate,clip,precision", [
    ("adamw", "warmup_cosine", 2, 0.5, "bf16-mixed"),
    ("sgd", "linear", 1, None, "32-true"),
    ("radam", "constant_with_warmup", 4, 1.0, "32-true"),
])
def test_fit_steps_schedule_per_optimizer_step(optimizer, scheduler, accumulate, clip, precision):
    model = TinyRegressor(optimizer=optimizer, lr=0.05, scheduler=scheduler, num_warmup_steps=2)
    trainer = _trainer(max_epochs=2, accumulate_grad_batches=accumulate, gradient_clip_val=clip, precision=precision)
    trainer.fit(model, TinyData(n=64, batch_size=8))  # 8 batches per epoch
    steps = 2 * 8 // accumulate
    assert trainer.global_step == steps
    opt = trainer.optimizers[0]
    assert isinstance(opt, type(op.create_optimizer(optimizer, nn.Linear(1, 1))))
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    sched = config.scheduler
    assert sched.last_epoch == steps
    if hasattr(sched, "num_training_steps"):
        assert sched.num_training_steps == steps  # from trainer.estimated_stepping_batches
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(steps)[0])
    assert opt.state[next(model.net[0].parameters())]["step"].item() == steps


def test_configure_from_names_and_hparams():
    model = TinyRegressor(optimizer={"name": "sgd", "momentum": 0.9}, lr=0.1, scheduler="warmup_cosine",
                          num_warmup_steps=0.25)
    out = opl.configure_optimizers(model, num_training_steps=40)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt).__name__ == "SGD" and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.1
    assert (sched.num_training_steps, sched.num_warmup_steps) == (40, 10)
    # explicit names; options routed to the optimizer or the schedule by their names
    out = opl.configure_optimizers(model, "adamw", lr=1e-3, betas=(0.9, 0.95), scheduler="warmup_cosine",
                                   num_training_steps=10, num_warmup_steps=2, min_lr_ratio=0.1)
    assert out["optimizer"].defaults["betas"] == (0.9, 0.95)
    assert out["lr_scheduler"]["scheduler"].min_lr_ratio == 0.1
    with pytest.raises(ValueError, match="no option 'betaz'"):
        opl.configure_optimizers(model, "adamw", betaz=1)
    assert "lr_scheduler" not in opl.configure_optimizers(TinyRegressor(scheduler=None))


def test_callable_wiring():
    from functools import partial

    model = TinyRegressor(scheduler=None)
    out = opl.configure_optimizers(model, partial(op.optimizers.AdamW, lr=0.01),
                                   scheduler=partial(op.schedulers.WarmupCosine, num_warmup_steps=3,
                                                     num_training_steps=None),
                                   num_training_steps=12)
    assert out["lr_scheduler"]["scheduler"].num_training_steps == 12
    assert out["lr_scheduler"]["interval"] == "step"


class _TwoPass(torch.optim.SGD):
    """An SGD that needs its closure and counts the passes (a stand-in for SAM)."""

    capabilities = Capabilities(needs_closure=True)
    passes = 0

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("no closure")
        with torch.enable_grad():
            closure()
            type(self).passes += 1
            loss = closure()
            type(self).passes += 1
        super().step()
        return loss


@pytest.fixture
def two_pass():
    name = "two_pass_test"
    if "two_pass_test" not in op.list_optimizers():
        op.register_optimizer(_TwoPass, name=name)
    _TwoPass.passes = 0
    yield name
    OPTIMIZERS.unregister(name)


def test_needs_closure_under_16_mixed_with_scaler_raises(two_pass):
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = TinyRegressor(optimizer=two_pass, lr=0.1, scheduler=None)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="_TwoPass needs a closure.*16-mixed.*silently do one pass"):
        _trainer(plugins=[plugin], max_steps=2).fit(model, TinyData())
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _trainer(accumulate_grad_batches=2, max_steps=2).fit(model, TinyData())


def test_needs_closure_under_bf16_gets_its_closure(two_pass):
    model = TinyRegressor(optimizer=two_pass, lr=0.1, scheduler=None)
    _trainer(precision="bf16-mixed", max_steps=3).fit(model, TinyData())
    assert _TwoPass.passes == 6


def test_checks_callback_for_handwritten_configure(two_pass):
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Handwritten(TinyRegressor):
        def configure_optimizers(self):
            return _TwoPass(self.parameters(), lr=0.1)

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="needs a closure"):
        _trainer(plugins=[plugin], max_steps=2, callbacks=[opl.OptimizerChecks()]).fit(Handwritten(), TinyData())


def test_fp16_scaler_overflow_does_not_advance_the_schedule():
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Overflowing(TinyRegressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss

    model = Overflowing(optimizer="adamw", lr=0.05, scheduler="linear", num_warmup_steps=2)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    trainer = _trainer(plugins=[plugin], max_steps=6)
    trainer.fit(model, TinyData())
    sched = trainer.lr_scheduler_configs[0].scheduler
    checks = next(cb for cb in trainer.callbacks if isinstance(cb, opl.OptimizerChecks))
    assert checks.skipped_steps == 1
    assert sched.last_epoch == 5  # 6 optimizer calls, one skipped by the scaler
    opt = trainer.optimizers[0]
    assert opt.state[next(model.net[0].parameters())]["step"].item() == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(5)[0])


class _ModeSGD(torch.optim.SGD):
    """SGD with schedule-free's train()/eval() interface, recording the calls."""

    capabilities = Capabilities(train_eval=True)

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self.calls = []

    def train(self):
        self.calls.append("train")

    def eval(self):
        self.calls.append("eval")


def test_train_eval_callback_added_and_called(tmp_path):
    name = "mode_sgd_test"
    op.register_optimizer(_ModeSGD, name=name)
    try:
        model = TinyRegressor(optimizer=name, lr=0.1, scheduler=None)
        trainer = _trainer(max_epochs=1, limit_val_batches=2, num_sanity_val_steps=1, limit_train_batches=4,
                           val_check_interval=2, enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(model, TinyData())
    finally:
        OPTIMIZERS.unregister(name)
    calls = trainer.optimizers[0].calls
    assert any(isinstance(cb, opl.TrainEvalCallback) for cb in trainer.callbacks)
    assert calls[0] == "eval" and calls[1] == "train"  # sanity check, then training
    assert calls[-1] == "eval"                         # weights left in eval mode at the end
    assert calls.count("eval") >= 3                    # each validation and each checkpoint


def test_resume_from_checkpoint_identical_lr_and_state(tmp_path):
    data = TinyData(n=40, batch_size=8)  # 5 batches per epoch: the interruption is at an epoch's end

    def make():
        torch.manual_seed(0)
        return TinyRegressor(optimizer="adamw", lr=0.05, scheduler="warmup_cosine", num_warmup_steps=3)

    full = _trainer(max_steps=10, max_epochs=-1)
    full_model = make()
    full.fit(full_model, data)

    ckpt = tmp_path / "half.ckpt"

    class Interrupt(pl.Callback):  # the same 10-step run, checkpointed and stopped after epoch 1 (5 steps)
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.save_checkpoint(ckpt)
            trainer.should_stop = True

    first = _trainer(max_steps=10, max_epochs=-1, callbacks=[Interrupt()])
    first.fit(make(), data)
    assert first.global_step == 5
    saved_opt = {k: [t.clone() for t in v] for k, v in _opt_state(first).items()}
    saved_lr = first.optimizers[0].param_groups[0]["lr"]

    class AtRestore(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: [t.clone() for t in v] for k, v in _opt_state(trainer).items()}
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.last_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    restore = AtRestore()
    resumed = _trainer(max_steps=10, max_epochs=-1, callbacks=[restore])
    resumed.fit(make(), data, ckpt_path=str(ckpt))
    assert restore.lr == saved_lr and restore.last_epoch == 5
    for key, tensors in saved_opt.items():
        for a, b in zip(restore.state[key], tensors):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the schedule continues as in the uninterrupted run (Lightning's data position on resume is its own affair)
    assert resumed.global_step == full.global_step == 10
    sa, sb = resumed.lr_scheduler_configs[0].scheduler, full.lr_scheduler_configs[0].scheduler
    assert (sa.last_epoch, sa.num_training_steps, sa.num_warmup_steps) == (sb.last_epoch, sb.num_training_steps, sb.num_warmup_steps)
    assert resumed.optimizers[0].param_groups[0]["lr"] == full.optimizers[0].param_groups[0]["lr"]
    assert _opt_state(resumed)["step"] == _opt_state(full)["step"]


def _opt_state(trainer):
    opt = trainer.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    return {key: [opt.state[p][key] for p in params] for key in ("exp_avg", "exp_avg_sq", "step")}


def test_lightning_cli_yaml_steps_per_optimizer_step(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning_cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n  max_epochs: 2\n  accumulate_grad_batches: 2\n  gradient_clip_val: 1.0\n"
        "  precision: bf16-mixed\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n  limit_val_batches: 0\n"
        f"  default_root_dir: {tmp_path / 'out'}\n"
        "model:\n  scheduler: null\n"
        "data:\n  batch_size: 8\n"
        "optimizer:\n  class_path: optim_plugins.optimizers.AdamW\n  init_args:\n    lr: 0.03\n"
        "lr_scheduler:\n  class_path: optim_plugins.schedulers.WarmupCosine\n"
        "  init_args:\n    num_warmup_steps: 2\n    min_lr_ratio: 0.1\n"
    )
    cli = main(args=["fit", "--config", str(config)])
    trainer = cli.trainer
    assert trainer.global_step == 8
    sched_config = trainer.lr_scheduler_configs[0]
    assert sched_config.interval == "step"
    sched = sched_config.scheduler
    assert isinstance(sched, op.schedulers.WarmupCosine) and sched.num_training_steps == 8
    assert sched.last_epoch == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.03 * 0.1)
    assert cli.config["fit"]["lr_scheduler"]["class_path"].endswith("WarmupCosine")  # saved config complete

    # run=False: the CLI builds everything without fitting; names through the model's hparams
    config.write_text("model:\n  optimizer: radam\n  lr: 0.02\n  scheduler: warmup_cosine\n  num_warmup_steps: 1\n"
                      "trainer:\n  max_steps: 4\n  accelerator: cpu\n  logger: false\n"
                      f"  default_root_dir: {tmp_path / 'out2'}\n")
    cli = main(args=["--config", str(config), "--trainer.enable_progress_bar=false",
                     "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0"], run=False)
    assert cli.model.hparams.optimizer == "radam"
    cli.trainer.fit(cli.model, cli.datamodule)
    assert type(cli.trainer.optimizers[0]).__name__ == "RAdam"
    sched_config = cli.trainer.lr_scheduler_configs[0]
    assert sched_config.interval == "step" and sched_config.scheduler.num_training_steps == 4
    assert sched_config.scheduler.last_epoch == 4
