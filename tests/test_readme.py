"""The README's commands are the ones CI and users run."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv")]


def test_ci_runs_exactly_the_readme_test_command():
    setup_and_demo, setup_and_test = readme_commands()[:2]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [setup_and_test]
    assert setup_and_test.endswith("-m pytest") and "constraints-cpu.txt" in setup_and_test
    assert setup_and_demo.endswith("optim-plugins run recipes/llm_finetune.yaml")
    assert (ROOT / "recipes" / "llm_finetune.yaml").exists()


def test_cli_list_prints_the_registry():
    import optim_plugins as op

    out = subprocess.run([sys.executable, "-m", "optim_plugins.cli", "list"], capture_output=True, text=True, check=True).stdout
    for name in op.list_optimizers() + op.list_schedulers():
        assert re.search(rf"^\s*{re.escape(name)}\s", out, re.MULTILINE), name


def test_cli_demo_loss_falls():
    from optim_plugins.cli import main

    assert main(["demo", "--steps", "60"]) == 0


def test_cli_reports_bad_names_without_a_traceback(capsys):
    from optim_plugins.cli import main

    assert main(["describe", "adamww"]) == 2
    assert "did you mean 'adamw'" in capsys.readouterr().err


def test_cli_plot_schedule_writes_a_png(tmp_path):
    from optim_plugins.cli import main

    out = tmp_path / "lr.png"
    assert main(["plot-schedule", "warmup_cosine", "--steps", "50", "--option", "num_warmup_steps=5", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert main(["plot-schedule", "warmup_cosine", "--steps", "50", "--option", "bogus=1", "-o", str(out)]) == 2
