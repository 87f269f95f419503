"""The name registry: entry points, lookup rules, option schemas, describe()."""
from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

import optim_plugins as op
from optim_plugins.registry import OPTIMIZER_GROUP, SCHEDULER_GROUP, Option, normalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_come_through_the_packages_own_entry_points():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, listing in ((OPTIMIZER_GROUP, op.list_optimizers()), (SCHEDULER_GROUP, op.list_schedulers())):
        installed = {ep.name: ep.value for ep in metadata.entry_points(group=group) if ep.dist.name == "optim-plugins"}
        assert installed == declared[group], "installed metadata is stale: run pip install -e ."
        assert set(installed) <= set(listing)
    assert op.get_optimizer_spec("adamw").source.startswith("optim-plugins:")


def test_lookup_is_case_insensitive_and_dash_is_underscore():
    assert op.get_optimizer_spec("AdamW").name == "adamw"
    assert normalize_name("Schedule-Free AdamW") == "schedule_free_adamw"
    assert op.get_optimizer_spec(" RMSProp ").factory is op.optimizers.RMSprop


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="'adamw'"):
        op.get_optimizer_spec("adamww")
    with pytest.raises(ValueError, match="unknown optimizer 'nothing_like_it'"):
        op.create_optimizer("nothing_like_it", [torch.nn.Parameter(torch.zeros(1))])


def test_unknown_option_is_named_with_close_matches():
    with pytest.raises(ValueError, match="no option 'beta'.*'betas'"):
        op.create_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], beta=(0.9, 0.99))


def test_option_schema_has_types_defaults_and_docs_for_every_option():
    for name in op.list_optimizers():
        spec = op.get_optimizer_spec(name)
        assert spec.summary, name
        for option in spec.options.values():
            assert option.doc, f"{name}.{option.name} has no doc line"
            assert not option.required, f"{name}.{option.name} has no default"
    adam = op.get_optimizer_spec("adam").options
    assert adam["betas"].parse("(0.9, 0.95)") == (0.9, 0.95)
    assert adam["amsgrad"].parse("true") is True
    assert adam["lr"].parse("3e-4") == pytest.approx(3e-4)
    assert adam["compensation"].parse("none") is None
    assert adam["backend"].parse("Foreach") == "foreach"
    with pytest.raises(ValueError, match="'betas'.*'oops'"):
        adam["betas"].parse("oops")
    with pytest.raises(ValueError, match="'amsgrad'"):
        adam["amsgrad"].parse("maybe")
    with pytest.raises(ValueError, match="'backend'"):
        adam["backend"].parse("gpu")


def test_option_parse_types():
    assert Option("n", 1, int).parse("4") == 4
    with pytest.raises(ValueError, match="'n'"):
        Option("n", 1, int).parse("4.5")
    assert Option("f", 1.0, float).parse(2) == 2.0
    assert Option("t", None, tuple[float, float]).parse([1, 2]) == (1.0, 2.0)
    with pytest.raises(ValueError, match="'t'"):
        Option("t", None, tuple[float, float]).parse("(1, 2, 3)")


def test_describe_shows_options_and_defaults():
    text = op.describe("adamw")
    assert "weight_decay" in text and "0.01" in text and "betas" in text and "(0.9, 0.999)" in text
    assert "elementwise" in text
    with pytest.raises(ValueError, match="unknown"):
        op.describe("no-such-thing")


def test_create_optimizer_from_a_model_leaves_norms_and_biases_undecayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = op.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert {id(p) for p in by_decay[0.1]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in by_decay[0.0]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    default = op.create_optimizer("adamw", model)  # the optimizer's own default weight decay
    assert {g["weight_decay"] for g in default.param_groups} == {0.01, 0.0}
    assert {g["weight_decay"] for g in op.create_optimizer("adam", model).param_groups} == {0.0}


def test_runtime_registration_and_duplicates():
    class Plain(torch.optim.SGD):
        """A runtime-registered optimizer.

        Args:
            lr: learning rate.
        """

    spec = op.register_optimizer(Plain, name="Plain-SGD")
    try:
        assert "plain_sgd" in op.list_optimizers()
        opt = op.create_optimizer("plain-sgd", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        assert isinstance(opt, Plain)
        with pytest.raises(ValueError, match="already registered"):
            op.register_optimizer(Plain, name="plain_sgd")
    finally:
        from optim_plugins.registry import OPTIMIZERS
        OPTIMIZERS.unregister(spec.name)
    assert "plain_sgd" not in op.list_optimizers()


def test_import_is_light():
    import subprocess
    code = (
        "import sys, optim_plugins as op; op.list_optimizers(); op.list_schedulers();"
        "heavy = [m for m in ('transformers', 'lightning', 'accelerate', 'triton', 'bitsandbytes', 'matplotlib', 'yaml') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
