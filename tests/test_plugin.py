"""A third-party distribution registers an optimizer through the entry-point group."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_plugin_distribution_registers_through_entry_points(tmp_path):
    source = tmp_path / "src"
    (source / "op_test_plugin").mkdir(parents=True)
    (source / "op_test_plugin" / "__init__.py").write_text(textwrap.dedent('''
        import torch

        class SignSGD(torch.optim.Optimizer):
            """Sign SGD from a plugin.

            Args:
                lr: learning rate.
            """

            def __init__(self, params, lr: float = 0.01):
                if lr < 0:
                    raise ValueError(f"invalid lr: {lr}")
                super().__init__(params, dict(lr=lr))

            @torch.no_grad()
            def step(self, closure=None):
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.add_(p.grad.sign(), alpha=-group["lr"])
    '''))
    (source / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "op-test-plugin"
        version = "0.0.1"

        [project.entry-points."optim_plugins.optimizers"]
        plugin-sign-sgd = "op_test_plugin:SignSGD"
        adamw = "op_test_plugin:SignSGD"
    '''))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    check = textwrap.dedent('''
        import sys, warnings, torch
        sys.path.insert(0, sys.argv[1])
        import optim_plugins as op
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = op.list_optimizers()
        assert "plugin_sign_sgd" in names, names
        # a plugin cannot replace a built-in name: it is skipped with a warning
        assert any("adamw" in str(w.message) and "already registered" in str(w.message) for w in caught), caught
        assert op.get_optimizer_spec("adamw").factory is op.optimizers.AdamW
        spec = op.get_optimizer_spec("Plugin-Sign-SGD")
        assert spec.source.startswith("op-test-plugin:"), spec.source
        assert spec.options["lr"].doc == "learning rate."
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = op.create_optimizer("plugin_sign_sgd", [p], lr=0.5)
        p.grad = torch.tensor([3.0, -0.1])
        opt.step()
        assert p.tolist() == [0.5, -1.5], p.tolist()
        print("ok")
    ''')
    result = subprocess.run([sys.executable, "-c", check, str(target)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
