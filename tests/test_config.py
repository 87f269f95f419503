"""OptimizerConfig / SchedulerConfig: sources (dict, YAML, TrainingArguments, Lightning hparams,
optim_args), the YAML round trip, clear errors, and create_optimizer/create_scheduler from configs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins import OptimizerConfig, SchedulerConfig, parse_optim_args

yaml = pytest.importorskip("yaml")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 8))
    model.add_module("layers", nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]))
    model.add_module("norm", nn.LayerNorm(8))
    model.add_module("head", nn.Linear(8, 3))
    return model


FULL = {
    "name": "AdamW",
    "lr": "3e-4",  # YAML 1.1 reads 3e-4 as a string: typed by the schema
    "weight_decay": 0.1,
    "betas": "(0.9, 0.95)",
    "options": {"eps": "1e-6", "amsgrad": "true"},
    "layer_decay": 0.75,
    "no_decay": [r"embed"],
    "overrides": [{"pattern": "head", "lr_scale": 10}, ["norm", {"weight_decay": 0.0}]],
    "max_grad_norm": 1.0,
}


def test_from_dict_types_every_value():
    cfg = OptimizerConfig.from_dict(FULL)
    assert cfg.name == "adamw"
    assert cfg.lr == 3e-4 and cfg.weight_decay == 0.1
    assert cfg.options == {"betas": (0.9, 0.95), "eps": 1e-6, "amsgrad": True}
    assert cfg.overrides == [("head", {"lr_scale": 10.0}), ("norm", {"weight_decay": 0.0})]
    assert cfg.layer_decay == 0.75 and cfg.no_decay == ["embed"] and cfg.max_grad_norm == 1.0


def test_round_trip_dict_yaml_config(tmp_path):
    cfg = OptimizerConfig.from_dict(FULL)
    sched = SchedulerConfig.from_dict({"name": "cosine", "num_training_steps": 100, "warmup_steps": 0.1, "num_cycles": 0.25})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train": {"optimizer": cfg.to_dict(), "lr_scheduler": sched.to_dict()}}))
    assert OptimizerConfig.from_yaml(path, section="train.optimizer") == cfg
    assert SchedulerConfig.from_yaml(path, section="train.lr_scheduler") == sched
    alone = tmp_path / "opt.yaml"
    cfg.to_yaml(alone)
    back = OptimizerConfig.from_yaml(alone)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert OptimizerConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ValueError, match="no section 'train.scheduler' \\(missing key 'scheduler'\\)"):
        SchedulerConfig.from_yaml(path, section="train.scheduler")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "adamm"}, r"OptimizerConfig.name: unknown optimizer 'adamm'; did you mean 'adam'"),
        ({"lr": -1.0}, r"OptimizerConfig.lr: must be >= 0, got -1.0"),
        ({"lr": "fast"}, r"OptimizerConfig.lr: must be a number, got 'fast'"),
        ({"weight_decay": True}, r"OptimizerConfig.weight_decay: must be a number, got True"),
        ({"betass": [0.9, 0.99]}, r"has no field or option 'betass'.*did you mean 'betas'"),
        ({"betas": "(0.9,)"}, r"OptimizerConfig.options.betas: option 'betas': cannot use value '\(0.9,\)'"),
        ({"options": {"amsgrad": "maybe"}}, r"OptimizerConfig.options.amsgrad: .*'maybe'.*true or false"),
        ({"name": "sgd", "beta1": 0.9}, r"has no field or option 'beta1'"),
        ({"layer_decay": 1.5}, r"OptimizerConfig.layer_decay: must be in \(0, 1\], got 1.5"),
        ({"no_decay": ["("]}, r"OptimizerConfig.no_decay: bad regex"),
        ({"overrides": [{"pattern": "head", "momentum": 0.9}]}, r"OptimizerConfig.overrides\[0\] \('head'\): optimizer 'adamw' has no option 'momentum'"),
        ({"overrides": [{"pattern": "head", "lr": "x"}]}, r"OptimizerConfig.overrides\[0\] \('head'\): lr='x' is not a number"),
        ({"max_grad_norm": -1}, r"OptimizerConfig.max_grad_norm: must be >= 0"),
        ({"lr": 1e-3, "options": {"lr": 1e-2}}, r"lr given both as a field and in options"),
    ],
)
def test_bad_optimizer_configs_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig.from_dict(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "cosin"}, r"SchedulerConfig.name: unknown scheduler 'cosin'; did you mean 'cosine'"),
        ({"name": "linear", "num_training_steps": 0}, r"SchedulerConfig.num_training_steps: must be >= 1, got 0"),
        ({"name": "linear", "num_training_steps": 10.5}, r"SchedulerConfig.num_training_steps: must be a whole number"),
        ({"name": "linear", "num_warmup_steps": 2.5}, r"SchedulerConfig.num_warmup_steps: must be a whole number of steps, or a fraction < 1, got 2.5"),
        ({"name": "linear", "num_warmup_steps": -1}, r"SchedulerConfig.num_warmup_steps: must be >= 0"),
        ({"name": "cosine", "num_cycle": 1}, r"has no field or option 'num_cycle'.*did you mean 'num_cycles'"),
        ({"name": "cosine", "options": {"num_cycles": "many"}}, r"SchedulerConfig.options.num_cycles: .*'many'"),
        ({"name": "cosine", "options": {"num_training_steps": 5}}, r"SchedulerConfig.options.num_training_steps: set it as the field"),
        ({"warmup_steps": 1, "num_warmup_steps": 2}, r"not both"),
    ],
)
def test_bad_scheduler_configs_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_dict(data)


def test_fractional_warmup_like_transformers():
    cfg = SchedulerConfig(name="linear", num_training_steps=95, num_warmup_steps=0.1)
    assert cfg.warmup_steps() == 10  # ceil(9.5), as TrainingArguments.get_warmup_steps
    assert cfg.warmup_steps(num_training_steps=20) == 2
    assert SchedulerConfig(name="linear", num_warmup_steps=7).warmup_steps() == 7
    with pytest.raises(ValueError, match=r"SchedulerConfig.num_warmup_steps: the fraction 0.1 needs num_training_steps"):
        SchedulerConfig(name="linear", num_warmup_steps=0.1).warmup_steps()


# ----------------------------------------------------------------------------- optim_args


def test_optim_args_parenthesised_and_flat_forms():
    assert parse_optim_args("betas=(0.9,0.95),eps=1e-8,amsgrad=true", "adamw") == {"betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": True}
    assert parse_optim_args("beta1=0.8, beta2=0.95", "adamw") == {"betas": (0.8, 0.95)}
    assert parse_optim_args("beta2=0.98", "adam") == {"betas": (0.9, 0.98)}  # beta1 keeps the default
    assert parse_optim_args("momentum=0.9,nesterov=True", "sgd") == {"momentum": 0.9, "nesterov": True}
    assert parse_optim_args("", "adamw") == {} and parse_optim_args(None, "adamw") == {}


def test_optim_args_as_transformers_splits_them():
    from transformers.trainer_optimizer import _parse_optim_args  # what the Trainer hands a handler

    split = _parse_optim_args("beta1=0.9,beta2=0.95,decoupled_weight_decay=true,eps=1e-6")
    assert split == {"beta1": "0.9", "beta2": "0.95", "decoupled_weight_decay": "true", "eps": "1e-6"}
    assert parse_optim_args(split, "adam") == {"betas": (0.9, 0.95), "decoupled_weight_decay": True, "eps": 1e-6}


@pytest.mark.parametrize(
    "text, message",
    [
        ("eps=abc", r"optim_args.eps: option 'eps': cannot use value 'abc'"),
        ("rectify=true", r"optim_args has no field or option 'rectify'"),
        ("beta1=0.9", None),
        ("beta3=0.9", r"optim_args.beta3: this optimizer has 2 betas"),
        ("betas=(0.9,0.95", r"optim_args.betas"),
        ("amsgrad", r"optim_args: 'amsgrad' is not key=value"),
    ],
)
def test_optim_args_errors_name_the_option(text, message):
    if message is None:
        assert parse_optim_args(text, "adamw") == {"betas": (0.9, 0.999)}
        return
    with pytest.raises(ValueError, match=message):
        parse_optim_args(text, "adamw")


# ----------------------------------------------------------------------------- transformers TrainingArguments


@pytest.fixture(scope="module")
def TrainingArguments():
    pytest.importorskip("accelerate")  # TrainingArguments refuses to be built without it
    return pytest.importorskip("transformers").TrainingArguments


def test_from_training_args_max_steps(TrainingArguments, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), optim="adamw_torch", learning_rate=3e-4, weight_decay=0.1,
        adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5, optim_args="beta2=0.98,amsgrad=true",
        lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 0.25}, warmup_steps=0.1, max_steps=50,
        report_to="none",
    )
    cfg = OptimizerConfig.from_training_args(args)
    assert cfg == OptimizerConfig(name="adamw", lr=3e-4, weight_decay=0.1, options={"betas": (0.8, 0.98), "eps": 1e-6, "amsgrad": True}, max_grad_norm=0.5)
    sched = SchedulerConfig.from_training_args(args)
    assert sched == SchedulerConfig(name="cosine", num_training_steps=50, num_warmup_steps=0.1, options={"num_cycles": 0.25})
    assert sched.warmup_steps() == args.get_warmup_steps(50) == 5


def test_from_training_args_epochs_and_names(TrainingArguments, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), optim="sgd", learning_rate=0.1, num_train_epochs=3, gradient_accumulation_steps=4,
        warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=0.0, report_to="none",
    )
    cfg = OptimizerConfig.from_training_args(args)
    assert cfg == OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.0)  # sgd has no betas: adam_* do not apply
    assert cfg.max_grad_norm is None
    # 10 batches / 4 accumulation -> 3 optimizer steps per epoch (the Trainer rounds up), x 3 epochs
    sched = SchedulerConfig.from_training_args(args, num_batches_per_epoch=10)
    assert (sched.name, sched.num_training_steps, sched.warmup_steps()) == ("linear", 9, 1)
    assert SchedulerConfig.from_training_args(args).num_training_steps is None  # unknown without the data size
    args.optim = "op_radam"  # the op_ prefix always means ours
    args.lr_scheduler_type = "op_cosine"
    assert OptimizerConfig.from_training_args(args).name == "radam"
    assert SchedulerConfig.from_training_args(args).name == "cosine"
    args.optim = "no_such_optimizer"
    with pytest.raises(ValueError, match="TrainingArguments.optim: unknown optimizer 'no_such_optimizer'"):
        OptimizerConfig.from_training_args(args)
    args.optim, args.optim_args = "adamw_torch", "eps=tiny"
    with pytest.raises(ValueError, match="optim_args.eps"):
        OptimizerConfig.from_training_args(args)


def test_scheduler_from_config_matches_transformers(TrainingArguments, tmp_path):
    from transformers import get_scheduler

    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="linear", warmup_steps=0.2, max_steps=20, report_to="none")
    ours = op.create_scheduler(SchedulerConfig.from_training_args(args), op.create_optimizer("adamw", small_model(), lr=1.0))
    ref_opt = torch.optim.AdamW(small_model().parameters(), lr=1.0)
    ref = get_scheduler("linear", ref_opt, num_warmup_steps=args.get_warmup_steps(20), num_training_steps=20)
    for _ in range(20):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0])
        ours.optimizer.step(), ours.step(), ref_opt.step(), ref.step()


# ----------------------------------------------------------------------------- Lightning hparams


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def test_from_lightning_hparams():
    pl = _lightning()

    class Module(pl.LightningModule):
        def __init__(self, hidden=32, optimizer="adam", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95),
                     scheduler="cosine", warmup_steps=0.1, max_steps=200, dropout=0.1):
            super().__init__()
            self.save_hyperparameters()

    hp = Module().hparams
    cfg = OptimizerConfig.from_hparams(hp)
    assert cfg == OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0, options={"betas": (0.9, 0.95)})
    sched = SchedulerConfig.from_hparams(hp)
    assert sched == SchedulerConfig(name="cosine", num_training_steps=200, num_warmup_steps=0.1)
    assert sched.warmup_steps() == 20

    class Sections(pl.LightningModule):
        def __init__(self, optimizer=None, lr_scheduler=None):
            super().__init__()
            self.save_hyperparameters()

    hp = Sections(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, lr_scheduler={"name": "linear", "num_training_steps": 10}).hparams
    assert OptimizerConfig.from_hparams(hp) == OptimizerConfig(name="sgd", lr=0.1, options={"momentum": 0.9})
    assert SchedulerConfig.from_hparams(hp) == SchedulerConfig(name="linear", num_training_steps=10)
    with pytest.raises(ValueError, match="hparams.optimizer: unknown optimizer 'adamx'"):
        OptimizerConfig.from_hparams({"optimizer": "adamx"})


# ----------------------------------------------------------------------------- create_* from configs


def test_create_optimizer_from_config_builds_groups():
    model = small_model()
    cfg = OptimizerConfig.from_dict({"name": "adamw", "lr": 1.0, "weight_decay": 0.1, "layer_decay": 0.5, "betas": [0.8, 0.9],
                                     "overrides": [{"pattern": "^head", "lr_scale": 2.0, "name": "head_x2"}]})
    opt = op.create_optimizer(cfg, model)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups} == {
        "embeddings/decay": (0.125, 0.1),  # L = 2 numbered layers: 0.5 ** 3
        "layer_0/decay": (0.25, 0.1), "layer_0/no_decay": (0.25, 0.0),
        "layer_1/decay": (0.5, 0.1), "layer_1/no_decay": (0.5, 0.0),
        "head/no_decay": (1.0, 0.0),  # final norm
        "head/decay/head_x2": (2.0, 0.1), "head/no_decay/head_x2": (2.0, 0.0),
    }
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    # a dict works as well, and explicit arguments win over the config
    opt = op.create_optimizer({"name": "adamw", "lr": 0.5}, small_model(), lr=0.25)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert opt.defaults["lr"] == 0.25 and opt.param_groups[0]["weight_decay"] == 0.01  # adamw's own default


def test_create_optimizer_config_layer_decay_uses_default_lr():
    opt = op.create_optimizer(OptimizerConfig(name="adam", layer_decay=0.5), small_model())
    assert max(g["lr"] for g in opt.param_groups) == 1e-3  # adam's default lr is the head's


def test_create_scheduler_from_config():
    opt = op.create_optimizer("sgd", small_model(), lr=1.0)
    sched = op.create_scheduler({"name": "linear", "num_training_steps": 10, "warmup_steps": 0.2}, opt)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step(), sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    sched = op.create_scheduler(SchedulerConfig(name="linear", num_warmup_steps=0.5), opt, num_training_steps=4)
    assert sched.get_last_lr()[0] == 0.0


def test_import_stays_light():
    code = "import sys, optim_plugins; print(sorted(m for m in ('yaml', 'transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
