"""Recipes (optim_plugins.recipes) and ``optim-plugins run``: validation before any file is written,
the default LLM recipe end to end in smoke size through the CLI, and --resume from a checkpoint.

The model is built from a LlamaConfig and the corpus is the standard library's own source: nothing is downloaded.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("yaml")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from optim_plugins import cli, recipes  # noqa: E402
from optim_plugins.integrations import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llm_finetune.yaml"
# a smoke run: tiny model, 2 pretrain + 4 fine-tune steps, a checkpoint every 2 steps, no progress bar
SMOKE = ["smoke=true", "train.progress_bar=false"]


@pytest.fixture(scope="module", autouse=True)
def leave_hf_as_found():
    before = hf.installed()
    yield
    if before is None and hf.installed() is not None:
        hf.uninstall()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "llm"
    code = cli.main(["run", str(RECIPE), "--output-dir", str(out), *[a for s in SMOKE for a in ("--set", s)]])
    assert code == 0
    return out


def read_rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rows"]


def test_every_shipped_recipe_validates():
    paths = sorted((ROOT / "recipes").glob("*.yaml"))
    assert RECIPE in paths
    assert {p.stem for p in paths} >= {"llm_finetune", "asr_finetune", "llm_finetune_lightning"}
    for path in paths:
        full = recipes.load_recipe(path)
        assert set(full) == set(recipes.TASKS[full["task"]].schema)
        smoke = recipes.load_recipe(path, ["smoke=true"])
        assert smoke["finetune"]["max_steps"] <= 6
    assert recipes.load_recipe("llm_finetune") == recipes.load_recipe(RECIPE)  # by name too


def test_set_overrides_win_over_smoke_and_keep_the_rest_of_a_section():
    recipe = recipes.load_recipe(RECIPE, ["smoke=true", "finetune.max_steps=3", "optimizer.name=adabelief",
                                          "optimizer.rectify=true", "scheduler.min_lr_ratio=0.2"])
    assert recipe["finetune"]["max_steps"] == 3 and recipe["pretrain"]["max_steps"] == 2
    assert recipe["optimizer"]["name"] == "adabelief" and recipe["optimizer"]["layer_decay"] == 0.85
    assert recipe["optimizer"]["rectify"] is True
    assert recipe["scheduler"] == {"name": "warmup_cosine", "num_warmup_steps": 0.1, "min_lr_ratio": 0.2}


@pytest.mark.parametrize("setting, named", [
    ("finetune.max_stepz=3", "finetune.max_stepz"),
    ("modle.hidden_size=8", "modle"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=many", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("data.eval_fraction=0.9", "data.eval_fraction"),
    ("smoke=maybe", "smoke"),
    ("optimizer.name=adamz", "optimizer"),
    ("optimizer.betaz=0.9", "betaz"),
    ("optimizer.lr=-1", "lr"),
    ("optimizer.max_grad_norm=1", "optimizer.max_grad_norm"),
    ("scheduler.min_lr_ratio=abc", "min_lr_ratio"),
    ("scheduler.num_training_steps=10", "scheduler.num_training_steps"),
    ("pretrain.files=no_such_file_*.zzz", "pretrain.files"),
    ("model.num_attention_heads=3", "model.num_attention_heads"),
    ("trainer=deepspeed", "trainer"),
    ("train.shard_optimizer=maybe", "train.shard_optimizer"),
    ("task=speech", "task"),
])
def test_bad_key_or_value_is_refused_before_any_output(tmp_path, capsys, setting, named):
    out = tmp_path / "never"
    code = cli.main(["run", str(RECIPE), "--output-dir", str(out), "--set", "smoke=true", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and "error" in err
    assert not out.exists()


@pytest.mark.parametrize("setting, named", [
    ("data.min_words=5", "data.min_words"),
    ("data.sample_rate=100", "data.sample_rate"),
    ("model.num_attention_heads=3", "model.num_attention_heads"),
    ("pretrain.max_steps=3", "pretrain"),  # an LLM key in the ASR recipe
    ("optimizer.betas=[0.9,0.99]", "betas"),  # MaxFactor has no betas
])
def test_asr_recipe_bad_key_or_value_is_refused_before_any_output(tmp_path, capsys, setting, named):
    out = tmp_path / "never"
    assert cli.main(["run", "asr_finetune", "--output-dir", str(out), "--set", "smoke=true", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err
    assert not out.exists()


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"finetune\.max_stepz: unknown key; did you mean 'max_steps'"):
        recipes.load_recipe(RECIPE, ["finetune.max_stepz=3"])


def test_missing_recipe_lists_the_shipped_ones(capsys):
    assert cli.main(["run", "no_such_recipe"]) == 2
    assert "llm_finetune" in capsys.readouterr().err


def test_precision_auto_falls_back_to_fp32_with_a_note(monkeypatch):
    notes = []
    monkeypatch.setattr(recipes, "bf16_supported", lambda: False)
    assert recipes._precision("auto", notes.append) is False and "fp32" in notes[0]
    assert recipes._precision("fp32", notes.append) is False
    monkeypatch.setattr(recipes, "bf16_supported", lambda: True)
    assert recipes._precision("auto", notes.append) is True


def test_smoke_run_writes_metrics_plot_and_checkpoints(smoke_run):
    out = smoke_run
    rows = read_rows(out)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert [r["global_step"] for r in rows if r["stage"] == "finetune" and "loss" in r] == [3, 4, 5, 6]
    for row in rows:
        if "loss" in row:
            assert row["lr"] >= 0 and row["grad_norm"] > 0 and row["perplexity"] > 1
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(recipes.COLUMNS) == set(table[0])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage, steps in (("pretrain", 2), ("finetune", 4)):
        assert summary["stages"][stage]["global_step"] == steps
        assert (out / stage / "final" / "model.safetensors").is_file()
        assert (out / stage / f"checkpoint-{steps}" / "optimizer.pt").is_file()
    fine = summary["stages"]["finetune"]
    assert fine["eval_loss_end"] < fine["eval_loss_start"]
    assert recipes.load_recipe(out / "recipe.yaml")["finetune"]["max_steps"] == 4  # resolved recipe written


def test_existing_output_without_resume_is_refused(smoke_run, capsys):
    before = sorted(p.name for p in smoke_run.rglob("*"))
    assert cli.main(["run", str(RECIPE), "--output-dir", str(smoke_run), "--set", "smoke=true"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in smoke_run.rglob("*")) == before


def test_resume_continues_step_and_schedule_from_the_checkpoint(smoke_run, tmp_path, capsys):
    out = tmp_path / "interrupted"
    shutil.copytree(smoke_run, out)
    # as if the run had stopped after the fine-tune checkpoint at step 2
    shutil.rmtree(out / "finetune" / "final")
    shutil.rmtree(out / "finetune" / "checkpoint-4")
    (out / "metrics.json").unlink()
    assert cli.main(["run", str(RECIPE), "--output-dir", str(out), "--resume", *[a for s in SMOKE for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "checkpoint-2" in printed
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["stages"]["pretrain"]["resumed"] == "done"  # the finished stage is not trained again
    assert summary["stages"]["finetune"]["resumed_from"].endswith("checkpoint-2")
    assert summary["stages"]["finetune"]["global_step"] == 4
    full = {(r["stage"], r["step"]): r for r in read_rows(smoke_run)}
    resumed = {(r["stage"], r["step"]): r for r in read_rows(out)}
    for step in (1, 2, 3, 4):  # steps 1-2 from the checkpoint's history, 3-4 trained after resuming
        a, b = full[("finetune", step)], resumed[("finetune", step)]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12, abs=1e-15)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert resumed[("finetune", 4)]["lr"] < resumed[("finetune", 3)]["lr"]  # on the cosine decay
    assert (out / "finetune" / "checkpoint-4").is_dir() and (out / "metrics.png").is_file()


# ----------------------------------------------------------------------------- ASR recipe


def levenshtein(a, b) -> int:
    """Edit distance, written out (the reference for jiwer's CER/WER)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_asr_error_rates_are_edit_distances_over_reference_length():
    from types import SimpleNamespace

    from optim_plugins import asr_data

    refs = ["one two", "nine", "three five"]
    # CTC frames: repeats merge, blanks (0) and padding (-100) drop; "ee" needs a blank between the two e's
    frames = [[0, *asr_data.encode("onn"), 0, *asr_data.encode(" "), *asr_data.encode("tw"), -100],
              [*asr_data.encode("nie"), 0, -100, -100, -100, -100, -100],
              [*asr_data.encode("thre"), 0, *asr_data.encode("e fiv"), *asr_data.encode("e")]]
    hyps = [asr_data.ctc_decode(f) for f in frames]
    assert hyps == ["on tw", "nie", "three five"]
    labels = [asr_data.encode(r) + [-100] * (10 - len(r)) for r in refs]
    got = recipes.speech_error_rates(SimpleNamespace(predictions=frames, label_ids=labels))
    cer = sum(levenshtein(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs)
    wer = sum(levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    assert got["cer"] == pytest.approx(cer) and got["wer"] == pytest.approx(wer)


def test_synthetic_speech_is_deterministic_and_speaker_dependent():
    from optim_plugins import asr_data

    a = asr_data.utterances(3, seed=5, speakers=range(4))
    b = asr_data.utterances(3, seed=5, speakers=range(4))
    assert [t for _, t in a] == [t for _, t in b] and all(torch_equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert all(set(t.split()) <= set(asr_data.DIGITS) for _, t in a)
    one, two = (asr_data.render("seven", asr_data.speaker(i, noise=0.0)) for i in (0, 1))
    assert not (len(one) == len(two) and torch_equal(one, two))  # speakers differ in rate, pitch, formants


def torch_equal(x, y) -> bool:
    import torch

    return x.shape == y.shape and bool(torch.equal(x, y))


def test_asr_recipe_smoke_run_reports_cer_and_wer(tmp_path):
    pytest.importorskip("jiwer")
    out = tmp_path / "asr"
    summary = recipes.run_recipe("asr_finetune", ["smoke=true", "train.progress_bar=false"], str(out), say=lambda s: None)
    stage = summary["stages"]["finetune"]
    assert summary["optimizer"] == "maxfactor" and stage["global_step"] == 6
    for key in ("eval_cer_start", "eval_cer_end", "eval_wer_start", "eval_wer_end"):
        assert stage[key] >= 0
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert {"eval_cer", "eval_wer"} <= set(table[0])
    assert [r["step"] for r in table if r["eval_cer"]] == ["0", "3", "6"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "finetune" / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- Lightning recipe


def test_lightning_recipe_smoke_run_trains_both_stages_and_checkpoints(tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "lightning"
    recipe = ROOT / "recipes" / "llm_finetune_lightning.yaml"
    summary = recipes.run_recipe(recipe, SMOKE, str(out), say=lambda s: None)
    rows = read_rows(out)
    for stage, steps in (("pretrain", 2), ("finetune", 4)):
        result = summary["stages"][stage]
        assert result["global_step"] == steps and result["eval_loss_end"] < result["eval_loss_start"]
        assert (out / stage / "last.ckpt").is_file() and (out / stage / "final" / "model.safetensors").is_file()
        logged = [r for r in rows if r["stage"] == stage and "loss" in r]
        assert [r["step"] for r in logged] == list(range(1, steps + 1))
        assert all(r["grad_norm"] > 0 and r["lr"] >= 0 for r in logged)
    # the schedule counts optimizer steps (accumulation 2): cosine decay to min_lr_ratio * lr at the last step
    finetune = [r for r in rows if r["stage"] == "finetune" and "lr" in r]
    assert finetune[-1]["lr"] < finetune[0]["lr"]


# ----------------------------------------------------------------------------- sharded recipe (2 processes)


def test_sharded_recipe_under_torchrun_saves_one_optimizer_shard_per_process(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    out = tmp_path / "sharded"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "optim_plugins.cli", "run",
               str(ROOT / "recipes" / "llm_finetune_sharded.yaml"), "--output-dir", str(out),
               "--set", "smoke=true", "--set", "pretrain.max_steps=0", "--set", "train.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("finetune: eval loss") == 1  # rank 0 reports
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["stages"]["finetune"]["global_step"] == 4
    shards = [torch.load(out / "finetune" / "checkpoint-4" / f"optimizer.rank{r:05d}-of-00002.pt", weights_only=True)
              for r in (0, 1)]
    owned = [set(s["state"]) for s in shards]
    recipe = recipes.load_recipe(out / "recipe.yaml")
    n_params = sum(1 for _ in recipes.task_of(recipe).build_model(recipe).parameters())
    # ZeRO-1: the two processes hold disjoint parts of the state that together cover every parameter
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert len(owned[0] | owned[1]) == n_params
