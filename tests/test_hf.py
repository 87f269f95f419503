"""The Hugging Face Trainer integration (optim_plugins.integrations.hf) with real Trainer runs.

Tiny LLaMA / Whisper models built from configs, data made here: nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optim_plugins as op
from optim_plugins.registry import OPTIMIZERS, Capabilities

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from optim_plugins.integrations import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100


@pytest.fixture(scope="module", autouse=True)
def installed():
    hf.install()
    yield
    hf.uninstall()


# ----------------------------------------------------------------------------- models and data


def tiny_llama(seed: int = 0, attention: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attention  # "eager" where double backward is needed (SDPA on CPU has none)
    return LlamaForCausalLM(config)


def tiny_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(config)


class Counting(torch.utils.data.Dataset):
    """Token sequences counting up from a random start: a pattern a tiny LM learns in a few steps."""

    def __init__(self, n: int = 32, seq_len: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(seq_len)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Speech(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, 8, 32, generator=g)
        self.labels = torch.randint(3, VOCAB, (n, 6), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_features": self.features[i], "labels": self.labels[i]}


def make_args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                    dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def inner(trainer):
    return hf._unwrap(trainer.optimizer)


def expected_lrs(optim: str, sched: str, lr: float, steps: int, warmup: int, **kwargs) -> list[float]:
    """lr before each step from our schedule on a one-parameter copy of the optimizer."""
    opt = op.create_optimizer(optim, [torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = op.create_scheduler(sched, opt, num_training_steps=steps, num_warmup_steps=warmup, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    return lrs


def registered(*names):
    return [n for n in names if n in op.list_optimizers()]


# ----------------------------------------------------------------------------- training runs

CASES = [
    ("adamw", "adamw", "warmup_cosine", "weight_decay=0.01", {"min_lr_ratio": 0.1}, 2),
    ("op_sgd", "sgd", "onecycle", "momentum=0.9,nesterov=true", {"pct_start": 0.5}, 0),
    ("radam", "radam", "op_polynomial", "beta1=0.8,beta2=0.99", {"power": 2.0}, 1),
] + [(name, name, "op_warmup_stable_decay", "", {"num_decay_steps": 2}, 1) for name in registered("adabelief", "lion")]


@pytest.mark.parametrize("optim,ours,sched,optim_args,sched_kwargs,warmup", CASES, ids=[c[0] + "-" + c[2] for c in CASES])
def test_llama_trains_with_our_optimizer_and_schedule(tmp_path, optim, ours, sched, optim_args, sched_kwargs, warmup):
    lr = 5e-3 if ours in ("lion",) else 1e-2
    args = make_args(tmp_path, optim=optim, optim_args=optim_args, lr_scheduler_type=sched,
                     lr_scheduler_kwargs=sched_kwargs, warmup_steps=warmup, learning_rate=lr, max_steps=6)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
    trainer.train()
    spec = op.get_optimizer_spec(ours)
    assert type(inner(trainer)) is spec.factory
    scheduler_spec = op.get_scheduler_spec(sched.removeprefix("op_"))
    assert type(trainer.lr_scheduler) is scheduler_spec.factory
    assert type(trainer.lr_scheduler).__module__.startswith("optim_plugins.schedulers")
    assert logged(trainer, "learning_rate") == pytest.approx(
        expected_lrs(ours, sched.removeprefix("op_"), lr, 6, warmup, **sched_kwargs), rel=1e-6, abs=1e-12)
    losses = logged(trainer, "loss")
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]
    # the Trainer's no-decay rule comes from our param_groups: norms and biases without decay
    groups = inner(trainer).param_groups
    assert any(g.get("weight_decay", 0) == 0 for g in groups) and len(groups) >= 2


def test_optim_args_and_trainer_betas_reach_the_optimizer(tmp_path):
    args = make_args(tmp_path, optim="radam", adam_beta1=0.85, adam_beta2=0.97, adam_epsilon=1e-7,
                     optim_args="beta2=0.95,decoupled_weight_decay=true", weight_decay=0.1, max_steps=1)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
    trainer.create_optimizer()
    group = inner(trainer).param_groups[0]
    assert group["betas"] == (0.85, 0.95) and group["eps"] == 1e-7 and group["decoupled_weight_decay"] is True
    decays = {g["weight_decay"] for g in inner(trainer).param_groups}
    assert decays == {0.0, 0.1}
    expected = op.param_groups(tiny_llama(), weight_decay=0.1, lr=1e-2, optimizer="radam")
    assert [len(g["params"]) for g in inner(trainer).param_groups] == [len(g["params"]) for g in expected]


def test_layer_decay_from_optim_args_and_from_extra_arguments(tmp_path):
    args = make_args(tmp_path, optim="adamw", optim_args="layer_decay=0.5", max_steps=1, learning_rate=1e-2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
    trainer.create_optimizer()
    lrs = sorted({round(g["lr"], 10) for g in inner(trainer).param_groups})
    assert lrs[-1] == pytest.approx(1e-2) and lrs[0] == pytest.approx(1e-2 * 0.5 ** 3)  # embeddings, 2 blocks, head

    args = make_args(tmp_path, optim="adamw", max_steps=1, learning_rate=1e-2)
    trainer = hf.OptimPluginsTrainer(model=tiny_llama(), args=args, train_dataset=Counting(),
                                     optim_plugins_args=hf.OptimPluginsArguments(layer_decay=0.5))
    trainer.create_optimizer()
    assert sorted({round(g["lr"], 10) for g in inner(trainer).param_groups}) == lrs


def test_whisper_trains(tmp_path):
    name = (registered("adabelief", "adafactor") or ["nadam"])[0]
    args = make_args(tmp_path, optim="op_" + name, lr_scheduler_type="op_cosine", warmup_steps=1, max_steps=5,
                     learning_rate=3e-3 if name != "adafactor" else 1e-2)
    model = tiny_whisper()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=Speech())
    trainer.train()
    assert type(inner(trainer)) is op.get_optimizer_spec(name).factory
    assert type(trainer.lr_scheduler) is op.schedulers.CosineSchedule
    assert logged(trainer, "learning_rate") == pytest.approx(expected_lrs("sgd", "cosine", args.learning_rate, 5, 1))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > len(before) // 2
    losses = logged(trainer, "loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- names


def test_hf_owned_bare_names_keep_their_meaning_unless_override(tmp_path):
    def build(optim, sched):
        args = make_args(tmp_path, optim=optim, lr_scheduler_type=sched, max_steps=4)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
        trainer.create_optimizer_and_scheduler(num_training_steps=4)
        return inner(trainer), trainer.lr_scheduler

    owned_optim, owned_sched = hf.hf_owned_names()
    assert {"adafactor", "sgd", "adagrad", "rmsprop", "adamw_torch"} <= owned_optim
    assert {"linear", "cosine", "polynomial", "constant", "warmup_stable_decay"} <= owned_sched
    opt, sched = build("sgd", "cosine")
    assert type(opt) is torch.optim.SGD and type(sched) is torch.optim.lr_scheduler.LambdaLR
    opt, sched = build("op_sgd", "op_cosine")
    assert type(opt) is op.optimizers.SGD and type(sched) is op.schedulers.CosineSchedule
    try:
        hf.install(override=True)
        assert hf.installed()["override"] is True
        opt, sched = build("sgd", "cosine")
        assert type(opt) is op.optimizers.SGD and type(sched) is op.schedulers.CosineSchedule
        opt, _ = build("adamw_torch", "linear")  # a name we do not have stays transformers'
        assert type(opt) is torch.optim.AdamW
    finally:
        hf.install(override=False)
    opt, sched = build("sgd", "cosine")
    assert type(opt) is torch.optim.SGD and type(sched) is torch.optim.lr_scheduler.LambdaLR
    with pytest.raises(ValueError, match="belongs to transformers"):
        hf.optimizer_config(make_args(tmp_path, optim="sgd"))


def test_every_registered_name_is_installed():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    owned_optim, owned_sched = hf.hf_owned_names()
    values = {m.value for m in OptimizerNames}
    for name in op.list_optimizers():
        assert "op_" + name in values
        assert name in values  # ours, or transformers' own bare name
        assert (name in owned_optim) != (name in hf.installed()["optimizers"])
    for name in op.list_schedulers():
        assert "op_" + name in {m.value for m in SchedulerType}
    hf.install()  # idempotent
    assert {m.value for m in OptimizerNames} == values


def test_hf_argument_parser_from_cli_strings(tmp_path):
    optim = (registered("lion") or ["radam"])[0]
    parser = hf.make_parser()
    args, extra = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--optim", optim, "--optim_args", "beta1=0.9,beta2=0.95",
        "--lr_scheduler_type", "op_warmup_cosine", "--lr_scheduler_kwargs", '{"min_lr_ratio": 0.1}',
        "--warmup_steps", "2", "--layer_decay", "0.8", "--report_to", "none"])
    assert args.optim.value == optim and args.lr_scheduler_type.value == "op_warmup_cosine"
    assert args.lr_scheduler_kwargs == {"min_lr_ratio": 0.1} and extra.layer_decay == 0.8
    config = hf.optimizer_config(args, extra)
    assert config.name == optim and config.options["betas"] == (0.9, 0.95) and config.layer_decay == 0.8
    assert hf.scheduler_config(args.lr_scheduler_type, 2, 10, **args.lr_scheduler_kwargs).options == {"min_lr_ratio": 0.1}
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--optim", "no_such_optimizer"])


def test_training_arguments_pickle_dict_json_round_trip(tmp_path):
    args = make_args(tmp_path, optim="op_radam", optim_args="beta2=0.99", lr_scheduler_type="warmup_cosine",
                     lr_scheduler_kwargs={"min_lr_ratio": 0.1})
    again = pickle.loads(pickle.dumps(args))
    assert again.optim is args.optim and again.lr_scheduler_type is args.lr_scheduler_type
    data = args.to_dict()
    assert data["optim"] == "op_radam" and data["lr_scheduler_type"] == "warmup_cosine"
    assert json.loads(args.to_json_string())["optim"] == "op_radam"
    rebuilt = TrainingArguments(**{k: v for k, v in data.items() if k in {"output_dir", "optim", "optim_args",
                                                                         "lr_scheduler_type", "lr_scheduler_kwargs"}})
    assert rebuilt.optim is args.optim and rebuilt.lr_scheduler_type is args.lr_scheduler_type
    # a fresh process that never called install() unpickles it (the members install on load)
    blob = tmp_path / "args.pkl"
    blob.write_bytes(pickle.dumps(args))
    code = ("import pickle,sys; a = pickle.load(open(sys.argv[1], 'rb')); "
            "print(a.optim.value, a.lr_scheduler_type.value)")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, hf.INSTALL_ENV: "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["op_radam", "warmup_cosine"]


# ----------------------------------------------------------------------------- resume


def test_resume_from_checkpoint_continues_identically(tmp_path):
    common = dict(optim="adamw", optim_args="beta2=0.95", lr_scheduler_type="warmup_cosine", warmup_steps=2,
                  max_steps=6, learning_rate=1e-2, save_strategy="steps", save_steps=3)
    full = Trainer(model=tiny_llama(), args=make_args(tmp_path / "a", **common), train_dataset=Counting())
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer itself does
    resumed = Trainer(model=tiny_llama(seed=1), args=make_args(tmp_path / "b", **common), train_dataset=Counting())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # the log of steps 1-3 comes back from the checkpoint; steps 4-6 are computed again
    assert len(logged(resumed, "learning_rate")) == 6
    assert logged(resumed, "learning_rate") == logged(full, "learning_rate")
    assert logged(resumed, "loss") == pytest.approx(logged(full, "loss"), rel=1e-5)
    a, b = inner(full).state_dict(), inner(resumed).state_dict()
    assert type(inner(resumed)) is op.optimizers.AdamW
    assert a["param_groups"] == b["param_groups"]
    for key in a["state"]:
        for name, value in a["state"][key].items():
            torch.testing.assert_close(b["state"][key][name], value, rtol=1e-5, atol=1e-7)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- errors and guard


@pytest.mark.parametrize("optim_args,match", [
    ("betaz=0.9", "betaz"),
    ("amsgrad=maybe", "amsgrad"),
    ("layer_decay=big", "layer_decay"),
])
def test_bad_optim_args_raise_naming_the_option(tmp_path, optim_args, match):
    args = make_args(tmp_path, optim="adam", optim_args=optim_args)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
    with pytest.raises(ValueError, match=match):
        trainer.create_optimizer()


def test_bad_scheduler_kwargs_raise(tmp_path):
    args = make_args(tmp_path, optim="adam", lr_scheduler_type="warmup_cosine", lr_scheduler_kwargs={"min_lr_ration": 0.1})
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Counting())
    with pytest.raises(ValueError, match="min_lr_ration"):
        trainer.create_optimizer_and_scheduler(num_training_steps=4)


def test_surface_guard_fails_loudly(monkeypatch):
    from transformers import optimization, trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(RuntimeError, match="_OPTIMIZER_HANDLERS"):
        hf.check_surface()
    monkeypatch.undo()
    monkeypatch.delattr(optimization, "TYPE_TO_SCHEDULER_FUNCTION")
    with pytest.raises(RuntimeError, match="TYPE_TO_SCHEDULER_FUNCTION"):
        hf.install()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda args, model=None: None))
    with pytest.raises(RuntimeError, match="no longer reads"):
        hf.install()
    monkeypatch.undo()
    # (``from transformers import X`` replaces sys.modules["transformers"]: patch the live one)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "6.0.0")
    monkeypatch.delenv(hf.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match="outside the tested range"):
        hf.install()
    monkeypatch.setenv(hf.ALLOW_UNTESTED_ENV, "1")
    hf.check_surface()
    monkeypatch.undo()
    hf.install()


def test_enum_member_surgery_is_reversible():
    from transformers.training_args import OptimizerNames

    before = list(OptimizerNames)
    member = hf._add_member(OptimizerNames, "OP_TEST_ONLY", "op_test_only")
    assert OptimizerNames("op_test_only") is member and OptimizerNames.OP_TEST_ONLY is member
    assert pickle.loads(pickle.dumps(member)) is member
    hf._remove_member(OptimizerNames, "OP_TEST_ONLY")
    assert list(OptimizerNames) == before
    with pytest.raises(ValueError):
        OptimizerNames("op_test_only")


# ----------------------------------------------------------------------------- capability flags


class ClosureSGD(torch.optim.Optimizer):
    """SAM-like SGD: perturb, re-evaluate through the closure, step from the perturbed gradient."""

    capabilities = Capabilities(needs_closure=True)

    def __init__(self, params, lr: float = 0.01, rho: float = 0.05):
        super().__init__(params, dict(lr=lr, rho=rho))
        self.closure_calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("ClosureSGD needs a closure")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm() for g in grads])) + 1e-12
        shifts = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    e = p.grad * (group["rho"] / norm)
                    p.add_(e)
                    shifts.append((p, e))
        with torch.enable_grad():
            loss = closure()
        self.closure_calls += 1
        for p, e in shifts:
            p.sub_(e)
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        return loss


class HessianSGD(torch.optim.Optimizer):
    capabilities = Capabilities(needs_model=True)

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, dict(lr=lr))
        self.hessian_calls = []

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])

    def update_hessian(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.hessian_calls.append(len(grads))


class ModeSGD(torch.optim.Optimizer):
    capabilities = Capabilities(train_eval=True)

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, dict(lr=lr))
        self.mode, self.saved_in = "train", []

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"

    @torch.no_grad()
    def step(self, closure=None):
        assert self.mode == "train", "stepped in eval mode"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])

    def state_dict(self):
        self.saved_in.append(self.mode)
        return super().state_dict()


@pytest.fixture
def runtime_optimizers():
    names = {"test_closure_sgd": ClosureSGD, "test_hessian_sgd": HessianSGD, "test_mode_sgd": ModeSGD}
    for name, cls in names.items():
        op.register_optimizer(cls, name=name)
    hf.install()
    yield names
    for name in names:
        OPTIMIZERS.unregister(name)
    hf.install()  # takes the names out again


@pytest.mark.parametrize("name", ["test_closure_sgd", "test_hessian_sgd", "test_mode_sgd"])
def test_plain_trainer_refuses_optimizers_that_need_the_mixin(tmp_path, runtime_optimizers, name):
    trainer = Trainer(model=tiny_llama(), args=make_args(tmp_path, optim=name), train_dataset=Counting())
    with pytest.raises(RuntimeError, match="OptimPluginsTrainer"):
        trainer.create_optimizer()


def test_mixin_runs_closure_optimizers(tmp_path, runtime_optimizers):
    args = make_args(tmp_path, optim="test_closure_sgd", optim_args="rho=0.01", lr_scheduler_type="op_linear",
                     max_steps=4, gradient_accumulation_steps=2, learning_rate=0.05)
    model = tiny_llama()
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    trainer = hf.OptimPluginsTrainer(model=model, args=args, train_dataset=Counting())
    trainer.train()
    assert type(inner(trainer)) is ClosureSGD and inner(trainer).closure_calls == 4
    assert len(forwards) == 4 * 2 * 2  # every micro-batch twice: the step and the closure
    assert logged(trainer, "learning_rate") == pytest.approx(expected_lrs("sgd", "linear", 0.05, 4, 0))
    assert logged(trainer, "loss")[-1] < logged(trainer, "loss")[0]


def test_mixin_updates_the_hessian_every_k_steps(tmp_path, runtime_optimizers):
    args = make_args(tmp_path, optim="test_hessian_sgd", max_steps=6, learning_rate=0.05)
    trainer = hf.OptimPluginsTrainer(model=tiny_llama(), args=args, train_dataset=Counting(),
                                     optim_plugins_args=hf.OptimPluginsArguments(hessian_interval=2))
    trainer.train()
    calls = inner(trainer).hessian_calls
    assert len(calls) == 3 and all(n > 0 for n in calls)  # after steps 2, 4, 6, with gradients present


def test_mixin_switches_train_eval_modes(tmp_path, runtime_optimizers):
    args = make_args(tmp_path, optim="test_mode_sgd", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = hf.OptimPluginsTrainer(model=tiny_llama(), args=args, train_dataset=Counting())
    trainer.train()
    saved = inner(trainer).saved_in  # (accelerate reads the state once when it wraps the optimizer)
    assert saved.count("eval") == 2 and saved[-2:] == ["eval", "eval"]  # checkpoints hold the eval-mode weights
    assert inner(trainer).mode == "eval"  # the final model is the eval one


@pytest.mark.parametrize("name", registered("sam", "asam", "sophiag", "sophiah", "schedulefree_adamw"))
def test_registered_capability_optimizers_train_with_the_mixin(tmp_path, name):
    flagged = hf._needs_create_graph(op.get_optimizer_spec(name).factory)
    assert flagged == (name == "sophiah")
    args = make_args(tmp_path, optim="op_" + name, max_steps=4, learning_rate=1e-3,
                     save_strategy="steps", save_steps=2, max_grad_norm=0.0 if flagged else 1.0)
    model = tiny_llama(attention="eager" if flagged else "sdpa")  # SDPA on CPU has no double backward
    trainer = hf.OptimPluginsTrainer(model=model, args=args, train_dataset=Counting(),
                                     optim_plugins_args=hf.OptimPluginsArguments(hessian_interval=2))
    trainer.train()
    assert type(inner(trainer)) is op.get_optimizer_spec(name).factory
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


# ----------------------------------------------------------------------------- the example script


def test_example_script_runs(tmp_path):
    optim = (registered("adabelief", "lion") or ["nadam"])[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--output_dir", str(tmp_path), "--optim", optim,
         "--optim_args", "beta2=0.99", "--lr_scheduler_type", "warmup_cosine", "--warmup_steps", "1",
         "--max_steps", "3", "--num_samples", "16", "--report_to", "none", "--save_strategy", "no",
         "--use_cpu", "--disable_tqdm", "true", "--layer_decay", "0.8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("optim_plugins summary:"))
    assert f"optim_plugins.optimizers" in line and "WarmupCosine" in line and "'steps': 3" in line


def test_mixin_backward_with_create_graph(tmp_path):
    if "sophiah" not in op.list_optimizers():
        pytest.skip("sophiah not registered")
    base = op.get_optimizer_spec("sophiah").factory
    flagged = type("FlaggedSophiaH", (base,), {"needs_create_graph": True})
    op.register_optimizer(flagged, name="test_sophiah_graph")
    hf.install()
    try:
        args = make_args(tmp_path, optim="test_sophiah_graph", optim_args="update_period=2", max_steps=4,
                         learning_rate=1e-3, max_grad_norm=0.0)
        with pytest.raises(RuntimeError, match="OptimPluginsTrainer"):
            Trainer(model=tiny_llama(), args=args, train_dataset=Counting()).create_optimizer()
        trainer = hf.OptimPluginsTrainer(model=tiny_llama(attention="eager"), args=args, train_dataset=Counting())
        trainer.train()
        hessians = [s["hessian"] for s in inner(trainer).state.values()]
        assert any(h.abs().sum() > 0 for h in hessians)
        assert all(math.isfinite(x) for x in logged(trainer, "loss"))
    finally:
        OPTIMIZERS.unregister("test_sophiah_graph")
        hf.install()


@pytest.mark.parametrize("name", ["eva", "muon"])
def test_optimizers_built_from_the_model_train_under_the_plain_trainer(tmp_path, name):
    """Eva hooks the model's Linear layers and Muon splits matrices from the rest: both need
    ``model_param_groups``, which the Trainer's handler must call as create_optimizer does."""
    args = make_args(tmp_path, optim="op_" + name, max_steps=4, learning_rate=1e-2)
    model = tiny_llama()
    trainer = Trainer(model=model, args=args, train_dataset=Counting())
    trainer.train()
    built = inner(trainer)
    assert type(built) is op.get_optimizer_spec(name).factory
    reference = op.create_optimizer(name, tiny_llama(), lr=1e-2, weight_decay=args.weight_decay)
    assert [len(g["params"]) for g in built.param_groups] == [len(g["params"]) for g in reference.param_groups]
    if name == "eva":  # the Linear layers were preconditioned: their running statistics exist
        linear = model.model.layers[0].mlp.up_proj.weight
        assert "eva_a" in built.state[linear] and "eva_g" in built.state[linear]
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
