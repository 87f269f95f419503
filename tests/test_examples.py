"""Every example in ``examples/`` runs as shipped (its docstring's command) in a subprocess, and learns.

Each run is checked on what it prints: the loss fell, the steps happened, the files were written.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytest.importorskip("accelerate")

# the command each example's docstring shows first (paths relative to the repository root)
HF_ARGS = ["--optim", "adabelief", "--optim_args", "beta2=0.99,rectify=true", "--lr_scheduler_type", "warmup_cosine",
           "--warmup_steps", "2", "--learning_rate", "3e-3", "--max_steps", "20", "--layer_decay", "0.8"]


def run(args: list[str], cwd: Path) -> str:
    # one intra-op thread: the models are tiny, and on a shared, busy CPU idle-spinning threads cost minutes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def floats(pattern: str, text: str) -> tuple[float, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text[-2000:]}"
    return tuple(float(g) for g in match.groups())


def test_every_example_is_covered_here():
    shipped = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".yaml")}
    assert shipped == {"plain_loop.py", "hf_trainer.py", "lightning_module.py", "lightning_cli.py", "lightning_cli.yaml",
                       "accelerate_loop.py"}


def test_plain_loop_as_shipped(tmp_path):
    out = run([str(EXAMPLES / "plain_loop.py"), "--out", str(tmp_path / "run")], tmp_path)
    first, last = floats(r"loss fell from ([\d.]+) to ([\d.]+)", out)
    assert last < 0.7 * first
    assert "step  300" in out and (tmp_path / "run" / "checkpoint.pt").is_file()


def test_plain_loop_resume_continues_exactly(tmp_path):
    import plain_loop

    whole = plain_loop.main(["--steps", "40", "--save-every", "100", "--out", str(tmp_path / "a")])
    plain_loop.main(["--steps", "40", "--stop-after", "17", "--out", str(tmp_path / "b")])
    resumed = plain_loop.main(["--steps", "40", "--resume", "--out", str(tmp_path / "b")])
    assert len(resumed["losses"]) == 40
    assert resumed["losses"] == whole["losses"]  # the same 40 losses, bit for bit, as the uninterrupted run
    assert resumed["lrs"] == whole["lrs"]


def test_hf_trainer_as_shipped(tmp_path):
    out = run([str(EXAMPLES / "hf_trainer.py"), "--output_dir", str(tmp_path / "out"), *HF_ARGS,
               "--logging_steps", "5", "--disable_tqdm", "true", "--report_to", "none"], tmp_path)
    summary = ast.literal_eval(out.split("optim_plugins summary:")[1].strip().splitlines()[0])
    assert summary["optimizer"] == "optim_plugins.optimizers.adabelief.AdaBelief"
    assert summary["steps"] == 20 and summary["last_lr"] == pytest.approx(0.0, abs=1e-4)
    # 20 steps, RAdam-style rectification (no adaptive step for the first ~5): a small but clear fall
    assert summary["last_logged_loss"] < 0.98 * summary["first_logged_loss"]
    assert (tmp_path / "out" / "checkpoint-20" / "optimizer.pt").is_file()


def test_lightning_module_as_shipped(tmp_path):
    out = run([str(EXAMPLES / "lightning_module.py")], tmp_path)
    first, last = floats(r"train loss ([\d.]+) -> ([\d.]+)", out)
    assert last < 0.7 * first
    steps, lr = floats(r"optimizer steps: (\d+) final lr: ([\d.e-]+)", out)
    assert steps == 8 and lr == pytest.approx(0.0, abs=1e-6)  # 2 epochs x 8 batches / accumulation 2; cosine to 0


def test_lightning_cli_as_shipped(tmp_path):
    out = run([str(EXAMPLES / "lightning_cli.py"), "fit", "--config", str(EXAMPLES / "lightning_cli.yaml"),
               "--trainer.default_root_dir", str(tmp_path / "root")], tmp_path)
    first, last = floats(r"train loss ([\d.]+) -> ([\d.]+)", out)
    assert last < 0.7 * first
    assert (tmp_path / "root" / "config.yaml").is_file()  # LightningCLI saved the resolved config


def test_accelerate_loop_as_shipped(tmp_path):
    out = run([str(EXAMPLES / "accelerate_loop.py")], tmp_path)
    steps, total, first, last = floats(r"(\d+) optimizer steps of (\d+), loss ([\d.]+) -> ([\d.]+)", out)
    assert steps == total == 32 and last < 0.5 * first
