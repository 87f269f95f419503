"""``optim-plugins`` commands around recipes: list, run --dry-run, lr-find, compare.

Real runs in smoke size (tiny LLaMA from a config, the standard library's source as data): nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import optim_plugins as op  # noqa: E402
from optim_plugins import cli, recipes  # noqa: E402
from optim_plugins.integrations import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "llm_finetune.yaml")
PNG = b"\x89PNG\r\n\x1a\n"
# fine-tune only, 4 steps of the tiny model
QUICK = ["--set", "smoke=true", "--set", "pretrain.max_steps=0", "--set", "train.progress_bar=false"]


@pytest.fixture(scope="module", autouse=True)
def leave_hf_as_found():
    before = hf.installed()
    yield
    if before is None and hf.installed() is not None:
        hf.uninstall()


def test_list_is_a_table_of_every_optimizer_with_backends_and_flags(capsys):
    assert cli.main(["list", "--no-memory"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["optimizer", "family", "state", "B/param", "backends", "sharding", "flags"]
    rows = {line.split()[0]: line.split() for line in lines[2:2 + len(op.list_optimizers())]}
    assert sorted(rows) == op.list_optimizers()
    assert rows["adamw"][1] == "adam" and "foreach" in rows["adamw"][3] and rows["adamw"][4] == "shard:elements"
    assert "needs_closure" in rows["sam"] and "train_eval" in rows["schedulefree_adamw"]
    assert "schedulers:" in lines and any(line.split()[:1] == ["warmup_cosine"] for line in lines)


@pytest.mark.parametrize("name, reference", [
    ("adamw", lambda ps: torch.optim.AdamW(ps)),   # two fp32 moments: 8 bytes per parameter
    ("lion", None),                                # one moment (Chen et al. 2023, Alg. 1): 4 bytes
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1)),  # no momentum: no moment state
])
def test_list_state_bytes_per_param_match_the_algorithm(name, reference):
    measured = cli._probe_state_bytes(name)
    if reference is None:
        assert measured == pytest.approx(4.0, abs=0.01)  # + the 4-byte step counters over 4160 parameters
        return
    params = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.zeros(64))]
    torch_opt = reference(params)
    sum((p ** 2).sum() for p in params).backward()
    torch_opt.step()
    numel = sum(p.numel() for p in params)
    torch_bytes = sum(t.untyped_storage().nbytes() for s in torch_opt.state.values() for t in s.values()
                      if torch.is_tensor(t))
    # ours keeps a 0-d fp32 step counter per tensor even without other state: 8 bytes over 4160 parameters
    assert measured == pytest.approx(torch_bytes / numel, abs=0.002)


def test_dry_run_prints_recipe_and_layer_decayed_groups_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["run", RECIPE, "--dry-run", "--output-dir", str(out), "--set", "finetune.learning_rate=0.002"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    resolved = text.split("# parameter groups")[0]
    import yaml

    recipe = yaml.safe_load(resolved.replace("# resolved recipe", ""))
    assert recipe["finetune"]["learning_rate"] == 0.002 and recipe["output_dir"] == str(out)
    finetune = text.split("[finetune]")[1]
    rows = {m[0]: m[1:] for m in re.findall(r"^(\S+/\S+)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+)$", finetune, re.M)}
    # layer-wise lr decay (Clark et al. 2020): block i of L gets lr * d ** (L - i); embeddings depth 0, head L + 1
    d, L = 0.85, recipe["model"]["num_hidden_layers"]
    for i in range(L):
        assert float(rows[f"layer_{i}/decay"][1]) == pytest.approx(0.002 * d ** (L - i), rel=1e-2)
        assert float(rows[f"layer_{i}/no_decay"][2]) == 0 and float(rows[f"layer_{i}/decay"][2]) == 0.1
    assert float(rows["embeddings/decay"][1]) == pytest.approx(0.002 * d ** (L + 1), rel=1e-2)
    model = recipes.task_of(recipe).build_model(recipe)
    assert sum(int(r[0].replace(",", "")) for r in rows.values()) == sum(p.numel() for p in model.parameters())


def test_dry_run_refuses_a_bad_key_before_anything(tmp_path, capsys):
    assert cli.main(["run", RECIPE, "--dry-run", "--set", "optimizer.nme=lion"]) == 2
    assert "optimizer" in capsys.readouterr().err


def test_lr_find_on_a_recipe_suggests_an_lr_and_plots(tmp_path, capsys):
    plot = tmp_path / "lr.png"
    assert cli.main(["lr-find", RECIPE, *QUICK, "--steps", "12", "--start-lr", "1e-5", "--end-lr", "1", "-o", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "on the finetune data" in printed  # pretrain.max_steps=0: the first stage that trains
    assert re.search(r"suggested lr [\d.e-]+|no suggestion", printed)
    assert plot.read_bytes()[:8] == PNG


def test_compare_runs_each_optimizer_and_tabulates_their_final_eval(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", RECIPE, "--optimizers", "adamw,maxfactor:lr=0.02", *QUICK, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped: betas" in printed  # MaxFactor has no betas: the recipe's are not passed to it
    table = (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == PNG
    for name, label in (("adamw", "adamw"), ("maxfactor", "maxfactor_lr0.02")):
        summary = json.loads((out / label / "metrics.json").read_text())["summary"]
        assert summary["optimizer"] == name
        end = summary["stages"]["finetune"]["eval_loss_end"]
        assert re.search(rf"^\| {label} \| {end:.4f} \|", table, re.M)
    used = recipes.load_recipe(out / "maxfactor_lr0.02" / "recipe.yaml")
    assert used["optimizer"]["lr"] == 0.02 and used["finetune"]["learning_rate"] is None  # the given lr wins
    assert recipes.load_recipe(out / "adamw" / "recipe.yaml")["finetune"]["learning_rate"] == 0.001


def test_compare_refuses_a_bad_optimizer_before_running_any(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", RECIPE, "--optimizers", "adamw,adamz", *QUICK, "--output-dir", str(out)]) == 2
    assert "adamz" in capsys.readouterr().err
    assert not out.exists()
