"""Recipes: one YAML file that describes a whole training job, validated before anything runs.

    optim-plugins run recipes/llm_finetune.yaml                    # the default job
    optim-plugins run recipes/llm_finetune.yaml --set smoke=true   # a few steps (tests, CI)
    optim-plugins run recipes/llm_finetune.yaml --resume           # continue from the last checkpoint

``llm_finetune``: a small LLaMA-style causal LM built from a ``transformers.LlamaConfig`` (nothing is
downloaded) with a byte-level vocabulary (256 tokens), pretrained briefly on one slice of the Python
standard library's own source files and fine-tuned on another slice, with the Hugging Face Trainer
through :mod:`optim_plugins.integrations.hf` (our optimizer and schedule by name, layer-wise lr decay,
gradient accumulation, clipping, bf16 where the CPU has native bf16, else fp32 with a note).

Every key is checked by :func:`load_recipe` (unknown keys with close matches, types, ranges, the
optimizer and schedule through :class:`~optim_plugins.OptimizerConfig` /
:class:`~optim_plugins.SchedulerConfig`, the data globs) before the output directory is created.

Output directory::

    recipe.yaml                      the resolved recipe (after --set and smoke)
    pretrain/checkpoint-N/, pretrain/final/     Trainer checkpoints, the pretrained model
    finetune/checkpoint-N/, finetune/final/
    metrics.csv, metrics.json        per logged step: stage, step, loss, perplexity, lr, grad norm,
                                     eval loss, eval perplexity (json: also a summary)
    metrics.png                      loss / perplexity, lr and grad norm per step

A stage whose ``final/`` exists is done; with ``--resume`` an unfinished stage continues from its last
``checkpoint-N`` (global step, optimizer, schedule and data order as saved).
"""
from __future__ import annotations

import copy
import csv
import difflib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
STAGES = ("pretrain", "finetune")
VOCAB_SIZE = 256  # bytes


# ============================================================================ schema


@dataclass(frozen=True)
class Key:
    kind: type | tuple[type, ...]
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False  # None allowed

    def check(self, path: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, str) and (int in kinds or float in kinds):
            try:
                value = int(value) if int in kinds and value.strip().lstrip("-").isdigit() else float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds) + (" or null" if self.optional else "")
            raise ValueError(f"recipe key {path}: expected {names}, got {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"recipe key {path}: expected a number, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"recipe key {path}: must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"recipe key {path}: must be <= {self.maximum:g}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"recipe key {path}: must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        return value


def _stage(files: str, steps: int, lr: float | None) -> dict[str, Key]:
    return {
        "files": Key(str, files, "glob of standard-library source files (in the directory of os.py) to train on"),
        "max_bytes": Key(int, 1_000_000, "read at most this many bytes of those files", minimum=1024),
        "max_steps": Key(int, steps, "optimizer steps of this stage (0 skips pretraining)", minimum=0),
        "learning_rate": Key(float, lr, "peak lr of this stage; null = optimizer.lr", minimum=0, optional=True),
    }


# Every recipe key, its type, default and range. optimizer/scheduler are checked by their configs.
SCHEMA: dict[str, Any] = {
    "task": Key(str, "llm_finetune", "what the recipe trains", choices=("llm_finetune",)),
    "description": Key(str, "", "free text"),
    "seed": Key(int, 0, "seed of the model init, the data order and the Trainer", minimum=0),
    "smoke": Key(bool, False, "a few steps on a tiny model and little data (tests, CI); wins over the sizes"),
    "output_dir": Key(str, "runs/llm_finetune", "where checkpoints, metrics and plots go (--output-dir wins)"),
    "model": {
        "hidden_size": Key(int, 64, "LlamaConfig.hidden_size", minimum=8),
        "intermediate_size": Key(int, 192, "LlamaConfig.intermediate_size", minimum=8),
        "num_hidden_layers": Key(int, 3, "LlamaConfig.num_hidden_layers", minimum=1),
        "num_attention_heads": Key(int, 4, "LlamaConfig.num_attention_heads", minimum=1),
        "num_key_value_heads": Key(int, 2, "LlamaConfig.num_key_value_heads (grouped-query attention)", minimum=1),
    },
    "data": {
        "seq_len": Key(int, 64, "bytes per training sequence", minimum=4),
        "eval_fraction": Key(float, 0.05, "share of each stage's bytes held out for evaluation", minimum=0.001, maximum=0.5),
        "eval_sequences": Key(int, 64, "held-out sequences evaluated", minimum=1),
    },
    "pretrain": _stage("[a-m]*.py", 150, 3e-3),
    "finetune": _stage("[n-z]*.py", 60, 1e-3),
    "optimizer": None,  # OptimizerConfig.from_dict (plus layer_decay, decay_embeddings, no_decay)
    "scheduler": None,  # SchedulerConfig.from_dict (num_training_steps comes from the stage)
    "train": {
        "batch_size": Key(int, 16, "sequences per micro-batch", minimum=1),
        "gradient_accumulation_steps": Key(int, 2, "micro-batches per optimizer step", minimum=1),
        "max_grad_norm": Key(float, 1.0, "clip the global gradient norm to this (0 = off)", minimum=0),
        "precision": Key(str, "auto", "auto: bf16 where the CPU/GPU has native bf16, else fp32", choices=("auto", "bf16", "fp32")),
        "logging_steps": Key(int, 5, "optimizer steps between logged metrics", minimum=1),
        "eval_steps": Key(int, 25, "optimizer steps between evaluations", minimum=1),
        "save_steps": Key(int, 50, "optimizer steps between checkpoints", minimum=1),
        "save_total_limit": Key(int, 2, "checkpoints kept per stage", minimum=1),
        "progress_bar": Key(bool, True, "the Trainer's tqdm progress bar"),
    },
}

DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "layer_decay": 0.85}
DEFAULT_SCHEDULER = {"name": "warmup_cosine", "num_warmup_steps": 0.1, "min_lr_ratio": 0.1}

# What smoke: true sets (wins over the recipe's values, not over explicit --set of the same key).
SMOKE = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
    "data.seq_len": 32, "data.eval_sequences": 8,
    "pretrain.max_steps": 2, "pretrain.max_bytes": 20_000, "finetune.max_steps": 4, "finetune.max_bytes": 20_000,
    "train.batch_size": 4, "train.gradient_accumulation_steps": 2, "train.logging_steps": 1,
    "train.eval_steps": 2, "train.save_steps": 2, "train.save_total_limit": 3,
}

# optimizer-section keys that shape parameter groups (hf.OptimPluginsArguments), not optimizer options
GROUP_KEYS = ("layer_decay", "decay_embeddings", "no_decay")
REFUSED_OPTIMIZER_KEYS = {
    "max_grad_norm": "set train.max_grad_norm instead",
    "overrides": "per-pattern overrides are not available through the HF Trainer's optimizer names",
}


def _unknown_key(path: str, key: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = f"{path}.{key}" if path else key
    return ValueError(f"recipe key {where}: unknown key{hint} (known here: {', '.join(known)})")


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if isinstance(value, Key):
            out[key] = value.default
        elif isinstance(value, Mapping):
            out[key] = _defaults(value)
    if schema is SCHEMA:
        out["optimizer"] = copy.deepcopy(DEFAULT_OPTIMIZER)
        out["scheduler"] = copy.deepcopy(DEFAULT_SCHEDULER)
    return out


def _merge(path: str, schema: Mapping[str, Any], base: dict[str, Any], data: Any, replace: bool = True) -> None:
    """Check ``data`` against ``schema`` and write it into ``base``. The optimizer/scheduler sections of a
    recipe file replace the defaults whole (``replace``); ``--set optimizer.x=...`` changes one key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"recipe key {path or '<top>'}: expected a mapping of keys, got {data!r}")
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise _unknown_key(path, str(key), list(schema))
        sub = schema[key]
        if sub is None:  # optimizer / scheduler: replaced whole, checked by their configs
            if not isinstance(value, (Mapping, str)):
                raise ValueError(f"recipe key {where}: expected a mapping (name: ..., options) or a name, got {value!r}")
            value = {"name": value} if isinstance(value, str) else dict(value)
            base[key] = value if replace else {**base[key], **value}
        elif isinstance(sub, Mapping):
            _merge(where, sub, base[key], value, replace)
        else:
            base[key] = sub.check(where, value)


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_sets(recipe: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``["train.max_steps=4", "optimizer.name=lion"]`` into a nested dict of overrides (values read as YAML)."""
    overrides: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (a dotted key such as finetune.max_steps=4)")
        parts = key.strip().split(".")
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is set to a value and a section at once")
        node[parts[-1]] = _parse_value(value)
    return overrides


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        where = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in ("optimizer", "scheduler"):
            keys |= _flat_keys(value, where + ".")
        keys.add(where)
    return keys


def stdlib_dir() -> Path:
    return Path(os.__file__).resolve().parent


def _check_sections(recipe: dict[str, Any]) -> None:
    from .config import OptimizerConfig, SchedulerConfig

    optimizer = dict(recipe["optimizer"])
    for key, why in REFUSED_OPTIMIZER_KEYS.items():
        if key in optimizer:
            raise ValueError(f"recipe key optimizer.{key}: {why}")
    try:
        config = OptimizerConfig.from_dict(optimizer)
    except ValueError as exc:
        raise ValueError(f"recipe key optimizer: {exc}") from None
    _optim_args(config.options)
    if config.lr is None and any(recipe[s]["learning_rate"] is None for s in STAGES):
        raise ValueError("recipe key optimizer.lr: give a learning rate here or in pretrain/finetune.learning_rate")
    scheduler = dict(recipe["scheduler"])
    if "num_training_steps" in scheduler:
        raise ValueError("recipe key scheduler.num_training_steps: it is each stage's max_steps; set pretrain/finetune.max_steps")
    try:
        SchedulerConfig.from_dict(scheduler)
    except ValueError as exc:
        raise ValueError(f"recipe key scheduler: {exc}") from None
    model = recipe["model"]
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ValueError(f"recipe key model.num_attention_heads: must divide model.hidden_size ({model['hidden_size']}), "
                         f"got {model['num_attention_heads']}")
    if model["num_attention_heads"] % model["num_key_value_heads"]:
        raise ValueError(f"recipe key model.num_key_value_heads: must divide model.num_attention_heads "
                         f"({model['num_attention_heads']}), got {model['num_key_value_heads']}")
    if (model["hidden_size"] // model["num_attention_heads"]) % 2:
        raise ValueError("recipe key model.hidden_size: hidden_size / num_attention_heads must be even (rotary embeddings)")
    if recipe["finetune"]["max_steps"] < 1:
        raise ValueError(f"recipe key finetune.max_steps: must be >= 1, got {recipe['finetune']['max_steps']}")
    for stage in STAGES:
        if recipe[stage]["max_steps"] == 0:
            continue
        files = sorted(stdlib_dir().glob(recipe[stage]["files"]))
        if not files:
            raise ValueError(f"recipe key {stage}.files: {recipe[stage]['files']!r} matches no file in {stdlib_dir()}")


def load_recipe(source: str | Path | Mapping[str, Any], sets: Sequence[str] = (), output_dir: str | None = None) -> dict[str, Any]:
    """The validated, complete recipe (every key present) from a YAML path, a recipe name under
    ``recipes/`` or a dict, with ``--set`` overrides and ``smoke`` applied. Raises ``ValueError``
    naming the key; touches no file."""
    import yaml

    if isinstance(source, Mapping):
        data, where = dict(source), "<dict>"
    else:
        path = Path(source)
        if not path.is_file() and (RECIPES_DIR / f"{source}.yaml").is_file():
            path = RECIPES_DIR / f"{source}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
            raise ValueError(f"recipe {str(source)!r}: no such file (recipes shipped: {', '.join(known) or 'none'})")
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"recipe {where}: not valid YAML ({exc})") from None
    recipe = _defaults(SCHEMA)
    try:
        _merge("", SCHEMA, recipe, data)
        overrides = apply_sets(recipe, sets)
        _merge("", SCHEMA, recipe, overrides, replace=False)
        if recipe["smoke"]:
            explicit = _flat_keys(overrides)
            for key, value in SMOKE.items():
                if key not in explicit:
                    _set_path(recipe, key, value)
        if output_dir is not None:
            recipe["output_dir"] = str(output_dir)
        _check_sections(recipe)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return recipe


# ============================================================================ data


def byte_corpus(pattern: str, max_bytes: int) -> bytes:
    """The standard library's source files matching ``pattern`` (sorted by name), concatenated, at most ``max_bytes``."""
    chunks, total = [], 0
    for path in sorted(stdlib_dir().glob(pattern)):
        data = path.read_bytes() + b"\n\n"
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)


def _datasets(stage: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[Any, Any]:
    import torch

    corpus = byte_corpus(stage["files"], stage["max_bytes"])
    seq = data["seq_len"]
    cut = int(len(corpus) * (1 - data["eval_fraction"]))
    train = torch.frombuffer(bytearray(corpus[:cut]), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(corpus[cut:]), dtype=torch.uint8).long()
    train = train[: len(train) // seq * seq].view(-1, seq)
    held = held[: len(held) // seq * seq].view(-1, seq)[: data["eval_sequences"]]
    if len(train) == 0 or len(held) == 0:
        raise ValueError(f"{stage['files']}: {len(corpus)} bytes are too few for sequences of {seq} (raise max_bytes)")
    return _Sequences(train), _Sequences(held)


class _Sequences:
    def __init__(self, ids: Any):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# ============================================================================ run


def bf16_supported() -> bool:
    """Native bf16 matmuls: a CUDA device with bf16, or a CPU with AVX512-BF16/AMX (oneDNN says)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _precision(choice: str, say: Callable[[str], None]) -> bool:
    if choice == "fp32":
        return False
    if bf16_supported():
        return True
    if choice == "bf16":
        say("note: this machine has no native bf16 (no AVX512-BF16/AMX); bf16 runs emulated and slowly, as asked")
        return True
    say("note: no native bf16 on this machine (no AVX512-BF16/AMX or CUDA bf16): training in fp32")
    return False


def _tiny_llama(model: Mapping[str, Any], seq_len: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True, **model)
    return LlamaForCausalLM(config)


def _training_args(recipe: Mapping[str, Any], stage: str, out: Path, bf16: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    from .config import OptimizerConfig, SchedulerConfig

    optimizer = dict(recipe["optimizer"])
    groups = {k: optimizer.pop(k) for k in GROUP_KEYS if k in optimizer}
    config = OptimizerConfig.from_dict(optimizer)
    scheduler = SchedulerConfig.from_dict(recipe["scheduler"])
    train, settings = recipe["train"], recipe[stage]
    options = dict(config.options)
    if config.weight_decay is not None:
        options["weight_decay"] = config.weight_decay
    optim_args = _optim_args(options)
    lr = settings["learning_rate"] if settings["learning_rate"] is not None else config.lr
    args = TrainingArguments(
        output_dir=str(out), seed=recipe["seed"], data_seed=recipe["seed"],
        max_steps=settings["max_steps"], per_device_train_batch_size=train["batch_size"],
        per_device_eval_batch_size=train["batch_size"], gradient_accumulation_steps=train["gradient_accumulation_steps"],
        max_grad_norm=train["max_grad_norm"], bf16=bf16, optim="op_" + config.name, optim_args=optim_args or None,
        learning_rate=lr, weight_decay=0.0, lr_scheduler_type="op_" + scheduler.name,
        lr_scheduler_kwargs=dict(scheduler.options), warmup_steps=scheduler.num_warmup_steps,
        logging_steps=train["logging_steps"], eval_strategy="steps", eval_steps=train["eval_steps"],
        save_strategy="steps", save_steps=train["save_steps"], save_total_limit=train["save_total_limit"],
        report_to="none", disable_tqdm=not train["progress_bar"], dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return args, groups


def _optim_args(options: Mapping[str, Any]) -> str:
    """``optim_args`` text for the Trainer, which splits on every comma: betas go as ``beta1=..,beta2=..``."""
    items = []
    for key, value in options.items():
        if key == "betas" and isinstance(value, (list, tuple)):
            items += [f"beta{i}={v}" for i, v in enumerate(value, 1)]
        elif isinstance(value, (list, tuple, dict)):
            raise ValueError(f"recipe key optimizer.{key}: a list value cannot pass through the HF Trainer's optim_args, "
                             f"got {value!r}")
        else:
            items.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return ",".join(items)


def _last_checkpoint(stage_dir: Path) -> Path | None:
    points = [p for p in stage_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(points, key=lambda p: int(p.name.split("-")[-1])) if points else None


def metrics_rows(history: Sequence[Mapping[str, Any]], stage: str, offset: int) -> list[dict[str, Any]]:
    """One row per logged step of the Trainer's ``log_history`` (train and eval entries merged)."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in history:
        step = int(entry.get("step", 0))
        row = rows.setdefault(step, {"stage": stage, "step": step, "global_step": offset + step})
        if "loss" in entry:
            row["loss"] = float(entry["loss"])
            row["perplexity"] = math.exp(min(row["loss"], 50.0))
        if "learning_rate" in entry:
            row["lr"] = float(entry["learning_rate"])
        if entry.get("grad_norm") is not None:
            row["grad_norm"] = float(entry["grad_norm"])
        if "eval_loss" in entry:
            row["eval_loss"] = float(entry["eval_loss"])
            row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
    return [rows[k] for k in sorted(rows)]


COLUMNS = ("stage", "step", "global_step", "loss", "perplexity", "eval_loss", "eval_perplexity", "lr", "grad_norm")


def write_metrics(out: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "rows": list(rows)}, indent=1))


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss and eval loss (perplexity on the right axis), lr and grad norm per global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for stage, style in zip(STAGES, ("-", "-")):
        part = [r for r in rows if r["stage"] == stage]
        for key, ax, label in (("loss", axes[0], "train loss"), ("eval_loss", axes[0], "eval loss"),
                               ("lr", axes[1], "lr"), ("grad_norm", axes[2], "grad norm")):
            points = [(r["global_step"], r[key]) for r in part if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o" if key == "eval_loss" else None, markersize=3, label=f"{stage} {label}")
    axes[0].set_ylabel("loss (nats/byte)")
    right = axes[0].secondary_yaxis("right", functions=(lambda x: __import__("numpy").exp(x),
                                                         lambda y: __import__("numpy").log(__import__("numpy").maximum(y, 1e-9))))
    right.set_ylabel("perplexity")
    axes[1].set_ylabel("learning rate")
    axes[2].set_ylabel("grad norm (before clipping)")
    axes[2].set_xlabel("optimizer step (pretrain, then fine-tune)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_recipe(source: str | Path | Mapping[str, Any], sets: Sequence[str] = (), output_dir: str | None = None,
               resume: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate, then run a recipe; returns the summary written to ``metrics.json``."""
    recipe = load_recipe(source, sets, output_dir)
    out = Path(recipe["output_dir"])
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"output directory {out} already holds files: pass --resume to continue that run, "
                         "or choose another --output-dir")
    try:
        from .integrations import hf

        hf.install()
        import matplotlib  # noqa: F401  (checked now, used at the end)
    except (ImportError, RuntimeError) as exc:
        raise ValueError(f"the llm_finetune recipe needs the extras hf and plot (pip install -e '.[hf,plot]'): {exc}") from None
    bf16 = _precision(recipe["train"]["precision"], say)
    for stage in STAGES:  # build every TrainingArguments now: a bad combination fails before any file is written
        _training_args(recipe, stage, out / stage, bf16)

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"recipe": recipe["task"], "output_dir": str(out), "precision": "bf16" if bf16 else "fp32",
                               "stages": {}}
    model, offset = None, 0
    for stage in STAGES:
        settings = recipe[stage]
        stage_dir = out / stage
        if settings["max_steps"] == 0:
            continue
        if model is None:
            model = _tiny_llama(recipe["model"], recipe["data"]["seq_len"], recipe["seed"])
        result = _run_stage(recipe, stage, stage_dir, model, bf16, resume, say)
        model = result.pop("model")
        stage_rows = metrics_rows(result.pop("history"), stage, offset)
        rows += stage_rows
        offset += settings["max_steps"]
        summary["stages"][stage] = result
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_metrics(out, rows, summary)
    plot_metrics(rows, out / "metrics.png")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_metrics(out, rows, summary)
    return summary


def _run_stage(recipe: Mapping[str, Any], stage: str, stage_dir: Path, model: Any, bf16: bool, resume: bool,
               say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM, TrainerState

    from .integrations import hf

    final = stage_dir / "final"
    if (final / "trainer_state.json").is_file():
        say(f"[{stage}] done earlier: loading {final}")
        state = TrainerState.load_from_json(str(final / "trainer_state.json"))
        done = json.loads((final / "stage.json").read_text())
        return {**done, "model": LlamaForCausalLM.from_pretrained(str(final)), "history": state.log_history, "resumed": "done"}
    args, groups = _training_args(recipe, stage, stage_dir, bf16)
    train_data, eval_data = _datasets(recipe[stage], recipe["data"])
    checkpoint = _last_checkpoint(stage_dir) if resume else None
    torch.manual_seed(recipe["seed"])
    trainer = hf.OptimPluginsTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                     optim_plugins_args=hf.OptimPluginsArguments(**groups))
    say(f"[{stage}] {len(train_data)} train / {len(eval_data)} eval sequences of {recipe['data']['seq_len']} bytes "
        f"({recipe[stage]['files']}), {args.max_steps} optimizer steps, optimizer {args.optim.value if hasattr(args.optim, 'value') else args.optim}, "
        f"schedule {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
        + (f", resuming from {checkpoint}" if checkpoint else ""))
    if checkpoint is None:
        first = trainer.evaluate()  # step 0: where the stage starts
        start_eval = first["eval_loss"]
    else:
        start_eval = None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    last = next((e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step), None)
    last = last or trainer.evaluate()
    if start_eval is None:
        start_eval = next((e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), None)
    result = {
        "global_step": trainer.state.global_step,
        "eval_loss_start": start_eval,
        "eval_loss_end": last["eval_loss"],
        "eval_perplexity_end": math.exp(last["eval_loss"]),
        "last_lr": trainer.lr_scheduler.get_last_lr()[0],
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    trainer.save_model(str(final))
    trainer.state.save_to_json(str(final / "trainer_state.json"))
    (final / "stage.json").write_text(json.dumps(result, indent=1))
    say(f"[{stage}] eval loss {result['eval_loss_start']:.3f} -> {result['eval_loss_end']:.3f} "
        f"(perplexity {result['eval_perplexity_end']:.2f}) after {result['global_step']} steps")
    return {**result, "model": trainer.model, "history": list(trainer.state.log_history)}
