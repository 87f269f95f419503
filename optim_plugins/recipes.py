"""Recipes: one YAML file that describes a whole training job, validated before anything runs.

    optim-plugins run recipes/llm_finetune.yaml                    # the default job
    optim-plugins run recipes/llm_finetune.yaml --dry-run          # the resolved recipe and parameter groups
    optim-plugins run recipes/llm_finetune.yaml --set smoke=true   # a few steps (tests, CI)
    optim-plugins run recipes/llm_finetune.yaml --resume           # continue from the last checkpoint
    optim-plugins compare recipes/llm_finetune.yaml --optimizers adamw,lion,adabelief
    optim-plugins lr-find recipes/llm_finetune.yaml

``llm_finetune``: a small LLaMA-style causal LM built from a ``transformers.LlamaConfig`` (nothing is
downloaded) with a byte-level vocabulary (256 tokens), pretrained briefly on one slice of the Python
standard library's own source files and fine-tuned on another slice, with the Hugging Face Trainer
through :mod:`optim_plugins.integrations.hf` (our optimizer and schedule by name, layer-wise lr decay,
gradient accumulation, clipping, bf16 where the CPU has native bf16, else fp32 with a note), or with
Lightning (``trainer: lightning``), or sharded over processes started by ``torchrun``
(``train.shard_optimizer: true``).

``asr_finetune``: a tiny wav2vec2-CTC model built from a ``transformers.Wav2Vec2Config`` trained on
synthetic spoken digits (:mod:`optim_plugins.asr_data`), reporting CER/WER with jiwer.

Every key is checked by :func:`load_recipe` (unknown keys with close matches, types, ranges, the
optimizer and schedule through :class:`~optim_plugins.OptimizerConfig` /
:class:`~optim_plugins.SchedulerConfig`, the data globs) before the output directory is created.

Output directory::

    recipe.yaml                      the resolved recipe (after --set and smoke)
    <stage>/checkpoint-N/, <stage>/final/     checkpoints and the trained model of each stage
    metrics.csv, metrics.json        per logged step: stage, step, loss, perplexity, lr, grad norm,
                                     eval loss, eval perplexity (ASR: eval CER/WER) (json: also a summary)
    metrics.png                      loss / perplexity (or CER), lr and grad norm per step

A stage whose ``final/`` exists is done; with ``--resume`` an unfinished stage continues from its last
checkpoint (global step, optimizer, schedule and data order as saved).
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


def _common(task: str) -> dict[str, Any]:
    return {
        "task": Key(str, task, "what the recipe trains", choices=tuple(TASK_NAMES)),
        "description": Key(str, "", "free text"),
        "seed": Key(int, 0, "seed of the model init, the data order and the Trainer", minimum=0),
        "smoke": Key(bool, False, "a few steps on a tiny model and little data (tests, CI); wins over the sizes"),
        "output_dir": Key(str, f"runs/{task}", "where checkpoints, metrics and plots go (--output-dir wins)"),
    }


def _train(batch_size: int, eval_steps: int, save_steps: int) -> dict[str, Key]:
    return {
        "batch_size": Key(int, batch_size, "examples per micro-batch", minimum=1),
        "gradient_accumulation_steps": Key(int, 2, "micro-batches per optimizer step", minimum=1),
        "max_grad_norm": Key(float, 1.0, "clip the global gradient norm to this (0 = off)", minimum=0),
        "precision": Key(str, "auto", "auto: bf16 where the CPU/GPU has native bf16, else fp32", choices=("auto", "bf16", "fp32")),
        "logging_steps": Key(int, 5, "optimizer steps between logged metrics", minimum=1),
        "eval_steps": Key(int, eval_steps, "optimizer steps between evaluations", minimum=1),
        "save_steps": Key(int, save_steps, "optimizer steps between checkpoints", minimum=1),
        "save_total_limit": Key(int, 2, "checkpoints kept per stage", minimum=1),
        "progress_bar": Key(bool, True, "the trainer's progress bar"),
        "shard_optimizer": Key(bool, False, "ZeRO-1: shard the optimizer state over the processes torchrun started "
                                            "(optim_plugins.distributed.ShardedOptimizer; HF Trainer only)"),
    }


TASK_NAMES = ("llm_finetune", "asr_finetune")

# Every recipe key, its type, default and range. optimizer/scheduler are checked by their configs.
LLM_SCHEMA: dict[str, Any] = {
    **_common("llm_finetune"),
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
    "train": _train(16, 25, 50),
    "trainer": Key(str, "hf", "hf: the Hugging Face Trainer; lightning: a Lightning Trainer", choices=("hf", "lightning")),
}
SCHEMA = LLM_SCHEMA  # the default task's schema

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


ASR_SCHEMA: dict[str, Any] = {
    **_common("asr_finetune"),
    "model": {
        "hidden_size": Key(int, 64, "Wav2Vec2Config.hidden_size", minimum=8),
        "intermediate_size": Key(int, 128, "Wav2Vec2Config.intermediate_size", minimum=8),
        "num_hidden_layers": Key(int, 2, "Wav2Vec2Config.num_hidden_layers", minimum=1),
        "num_attention_heads": Key(int, 2, "Wav2Vec2Config.num_attention_heads", minimum=1),
        "conv_channels": Key(int, 32, "channels of the 3 feature-encoder convolutions (strides 5, 4, 4: 10 ms frames at 8 kHz)", minimum=4),
    },
    "data": {
        "sample_rate": Key(int, 8000, "Hz of the synthetic audio", minimum=4000, maximum=48000),
        "train_utterances": Key(int, 2000, "synthetic training utterances", minimum=1),
        "eval_utterances": Key(int, 100, "held-out utterances (speakers not seen in training)", minimum=1),
        "train_speakers": Key(int, 100, "synthetic speakers of the training set", minimum=1),
        "eval_speakers": Key(int, 10, "other synthetic speakers, for evaluation", minimum=1),
        "min_words": Key(int, 1, "digit words per utterance, at least", minimum=1),
        "max_words": Key(int, 3, "digit words per utterance, at most", minimum=1, maximum=20),
        "noise": Key(float, 0.05, "background noise level relative to the voice", minimum=0, maximum=2),
    },
    "finetune": {
        "max_steps": Key(int, 600, "optimizer steps", minimum=1),
        "learning_rate": Key(float, None, "peak lr; null = optimizer.lr", minimum=0, optional=True),
    },
    "optimizer": None,
    "scheduler": None,
    "train": _train(16, 100, 100),
}
ASR_OPTIMIZER = {"name": "maxfactor", "lr": 0.05, "weight_decay": 0.01}
ASR_SCHEDULER = {"name": "warmup_cosine", "num_warmup_steps": 0.1, "min_lr_ratio": 0.1}
ASR_SMOKE = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1, "model.conv_channels": 16,
    "data.train_utterances": 64, "data.eval_utterances": 16, "data.max_words": 2, "finetune.max_steps": 6,
    "train.batch_size": 8, "train.gradient_accumulation_steps": 1, "train.logging_steps": 1,
    "train.eval_steps": 3, "train.save_steps": 3, "train.save_total_limit": 3,
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


def _defaults(schema: Mapping[str, Any], task: "Task | None" = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if isinstance(value, Key):
            out[key] = value.default
        elif isinstance(value, Mapping):
            out[key] = _defaults(value)
    if task is not None:
        out["optimizer"] = copy.deepcopy(dict(task.optimizer))
        out["scheduler"] = copy.deepcopy(dict(task.scheduler))
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


def _check_sections(recipe: dict[str, Any], task: "Task") -> None:
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
    if config.lr is None and any(recipe[s]["learning_rate"] is None for s in task.stages):
        raise ValueError("recipe key optimizer.lr: give a learning rate here or in each stage's learning_rate")
    scheduler = dict(recipe["scheduler"])
    if "num_training_steps" in scheduler:
        raise ValueError("recipe key scheduler.num_training_steps: it is each stage's max_steps; set <stage>.max_steps")
    try:
        SchedulerConfig.from_dict(scheduler)
    except ValueError as exc:
        raise ValueError(f"recipe key scheduler: {exc}") from None
    last = task.stages[-1]
    if recipe[last]["max_steps"] < 1:
        raise ValueError(f"recipe key {last}.max_steps: must be >= 1, got {recipe[last]['max_steps']}")
    task.check(recipe)


def _check_llm(recipe: dict[str, Any]) -> None:
    if recipe["train"]["shard_optimizer"] and recipe["trainer"] != "hf":
        raise ValueError(f"recipe key train.shard_optimizer: sharded state runs with trainer: hf here, got trainer: "
                         f"{recipe['trainer']!r}")
    model = recipe["model"]
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ValueError(f"recipe key model.num_attention_heads: must divide model.hidden_size ({model['hidden_size']}), "
                         f"got {model['num_attention_heads']}")
    if model["num_attention_heads"] % model["num_key_value_heads"]:
        raise ValueError(f"recipe key model.num_key_value_heads: must divide model.num_attention_heads "
                         f"({model['num_attention_heads']}), got {model['num_key_value_heads']}")
    if (model["hidden_size"] // model["num_attention_heads"]) % 2:
        raise ValueError("recipe key model.hidden_size: hidden_size / num_attention_heads must be even (rotary embeddings)")
    for stage in ("pretrain", "finetune"):
        if recipe[stage]["max_steps"] == 0:
            continue
        files = sorted(stdlib_dir().glob(recipe[stage]["files"]))
        if not files:
            raise ValueError(f"recipe key {stage}.files: {recipe[stage]['files']!r} matches no file in {stdlib_dir()}")


def task_of(recipe: Mapping[str, Any]) -> "Task":
    return TASKS[recipe["task"]]


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
    try:
        if not isinstance(data, Mapping):
            raise ValueError(f"recipe key <top>: expected a mapping of keys, got {data!r}")
        overrides = apply_sets({}, sets)
        name = overrides.get("task", data.get("task", "llm_finetune"))
        task = TASKS.get(name) if isinstance(name, str) else None
        if task is None:
            raise ValueError(f"recipe key task: must be one of {', '.join(map(repr, TASKS))}, got {name!r}")
        recipe = _defaults(task.schema, task)
        _merge("", task.schema, recipe, data)
        _merge("", task.schema, recipe, overrides, replace=False)
        if recipe["smoke"]:
            explicit = _flat_keys(overrides)
            for key, value in task.smoke.items():
                if key not in explicit:
                    _set_path(recipe, key, value)
        if output_dir is not None:
            recipe["output_dir"] = str(output_dir)
        _check_sections(recipe, task)
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


def _llm_model(recipe: Mapping[str, Any]) -> Any:
    return _tiny_llama(recipe["model"], recipe["data"]["seq_len"], recipe["seed"])


def _llm_load(path: str) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


def _llm_datasets(recipe: Mapping[str, Any], stage: str) -> tuple[Any, Any]:
    return _datasets(recipe[stage], recipe["data"])


def _llm_describe(recipe: Mapping[str, Any], stage: str, train: Any, held: Any) -> str:
    return (f"{len(train)} train / {len(held)} eval sequences of {recipe['data']['seq_len']} bytes "
            f"({recipe[stage]['files']})")


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
        per_device_eval_batch_size=task_of(recipe).eval_batch_size or train["batch_size"], gradient_accumulation_steps=train["gradient_accumulation_steps"],
        max_grad_norm=train["max_grad_norm"], bf16=bf16, optim="op_" + config.name, optim_args=optim_args or None,
        learning_rate=lr, weight_decay=0.0, lr_scheduler_type="op_" + scheduler.name,
        lr_scheduler_kwargs=dict(scheduler.options), warmup_steps=scheduler.num_warmup_steps,
        logging_steps=train["logging_steps"], eval_strategy="steps", eval_steps=train["eval_steps"],
        save_strategy="steps", save_steps=train["save_steps"], save_total_limit=train["save_total_limit"],
        report_to="none", disable_tqdm=not train["progress_bar"], dataloader_num_workers=0, remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(), ddp_timeout=300, use_cpu=not torch.cuda.is_available(),
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


def metrics_rows(history: Sequence[Mapping[str, Any]], stage: str, offset: int,
                 eval_metrics: Sequence[str] = ()) -> list[dict[str, Any]]:
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
        for name in eval_metrics:
            if f"eval_{name}" in entry:
                row[f"eval_{name}"] = float(entry[f"eval_{name}"])
    return [rows[k] for k in sorted(rows)]


COLUMNS = ("stage", "step", "global_step", "loss", "perplexity", "eval_loss", "eval_perplexity", "lr", "grad_norm")


def columns_of(task: "Task") -> tuple[str, ...]:
    return COLUMNS + tuple(f"eval_{name}" for name in task.eval_metrics)


def write_metrics(out: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                  columns: Sequence[str] = COLUMNS) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "rows": list(rows)}, indent=1))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: Path, eval_metrics: Sequence[str] = (),
                 stages: Sequence[str] = STAGES, dpi: int = 100, figsize: tuple[float, float] | None = None) -> Path:
    """Loss and eval loss (perplexity on the right axis), lr and grad norm per global step; with
    ``eval_metrics`` (ASR: cer, wer) a panel of those error rates after the loss."""
    import numpy as np

    plt = _pyplot()
    panels = [("loss", "train loss"), ("eval_loss", "eval loss")], *(
        [[(f"eval_{m}", f"eval {m.upper()}") for m in eval_metrics]] if eval_metrics else []), \
        [("lr", "lr")], [("grad_norm", "grad norm")]
    fig, axes = plt.subplots(len(panels), 1, figsize=figsize or (8, 3 * len(panels)), sharex=True)
    for stage in stages:
        part = [r for r in rows if r["stage"] == stage]
        for ax, keys in zip(axes, panels):
            for key, label in keys:
                points = [(r["global_step"], r[key]) for r in part if key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, markersize=3, label=f"{stage} {label}")
    axes[0].set_ylabel("loss")
    if not eval_metrics:  # perplexity means something for a language model only
        axes[0].set_ylabel("loss (nats/byte)")
        right = axes[0].secondary_yaxis("right", functions=(np.exp, lambda y: np.log(np.maximum(y, 1e-9))))
        right.set_ylabel("perplexity")
    else:
        axes[1].set_ylabel("error rate")
    axes[-2].set_ylabel("learning rate")
    axes[-1].set_ylabel("grad norm (before clipping)")
    axes[-1].set_xlabel("optimizer step" + (" (pretrain, then fine-tune)" if len(stages) > 1 else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _check_extras(task: "Task") -> None:
    try:
        from .integrations import hf

        hf.install()
        import matplotlib  # noqa: F401  (checked now, used at the end)

        for module in task.modules:
            __import__(module)
    except (ImportError, RuntimeError) as exc:
        raise ValueError(f"the {task.name} recipe needs the extras {task.extras} "
                         f"(pip install -e '.[{task.extras}]'): {exc}") from None


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the environment ``torchrun`` sets; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_recipe(source: str | Path | Mapping[str, Any], sets: Sequence[str] = (), output_dir: str | None = None,
               resume: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate, then run a recipe; returns the summary written to ``metrics.json``.

    Under ``torchrun`` every process runs this; rank 0 alone prints, checks the output directory and
    writes the recipe, metrics and plots (the Trainer writes checkpoints, each rank its optimizer shard)."""
    recipe = load_recipe(source, sets, output_dir)
    task = task_of(recipe)
    out = Path(recipe["output_dir"])
    rank, world = process_rank()
    main = rank == 0
    if not main:
        say = lambda text: None  # noqa: E731
    if world > 1 and recipe.get("trainer", "hf") != "hf":
        raise ValueError(f"several processes (WORLD_SIZE={world}) run with trainer: hf only")
    if main and out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"output directory {out} already holds files: pass --resume to continue that run, "
                         "or choose another --output-dir")
    _check_extras(task)
    bf16 = _precision(recipe["train"]["precision"], say)
    for stage in task.stages:  # build every TrainingArguments now: a bad combination fails before any file is written
        _training_args(recipe, stage, out / stage, bf16)
    if recipe.get("trainer") == "lightning":
        try:
            import lightning.pytorch  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"trainer: lightning needs the extra lightning (pip install -e '.[lightning]'): {exc}") from None

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"recipe": recipe["task"], "output_dir": str(out), "precision": "bf16" if bf16 else "fp32",
                               "optimizer": recipe["optimizer"]["name"], "processes": world, "stages": {}}
    model, offset = None, 0
    for stage in task.stages:
        settings = recipe[stage]
        if settings["max_steps"] == 0:
            continue
        if model is None:
            model = task.build_model(recipe)
        result = _run_stage(recipe, task, stage, out / stage, model, bf16, resume, say)
        model = result.pop("model")
        rows += metrics_rows(result.pop("history"), stage, offset, task.eval_metrics)
        offset += settings["max_steps"]
        summary["stages"][stage] = result
        summary["seconds"] = round(time.perf_counter() - start, 1)
        if main:
            write_metrics(out, rows, summary, columns_of(task))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if main:
        plot_metrics(rows, out / "metrics.png", task.eval_metrics, task.stages)
        write_metrics(out, rows, summary, columns_of(task))
    return summary


def _run_stage(recipe: Mapping[str, Any], task: "Task", stage: str, stage_dir: Path, model: Any, bf16: bool,
               resume: bool, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers import TrainerState

    from .integrations import hf

    final = stage_dir / "final"
    if (final / "stage.json").is_file():
        say(f"[{stage}] done earlier: loading {final}")
        done = json.loads((final / "stage.json").read_text())
        if (final / "history.json").is_file():
            history = json.loads((final / "history.json").read_text())
        else:
            history = TrainerState.load_from_json(str(final / "trainer_state.json")).log_history
        return {**done, "model": task.load_model(str(final)), "history": history, "resumed": "done"}
    if recipe.get("trainer") == "lightning":
        return _run_stage_lightning(recipe, task, stage, stage_dir, model, bf16, resume, say)
    args, groups = _training_args(recipe, stage, stage_dir, bf16)
    train_data, eval_data = task.datasets(recipe, stage)
    checkpoint = _last_checkpoint(stage_dir) if resume else None
    torch.manual_seed(recipe["seed"])
    extra = hf.OptimPluginsArguments(**groups, shard_optimizer_state=recipe["train"]["shard_optimizer"])
    trainer = hf.OptimPluginsTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                     optim_plugins_args=extra, **task.trainer_kwargs(recipe))
    say(f"[{stage}] {task.describe(recipe, stage, train_data, eval_data)}, {args.max_steps} optimizer steps, "
        f"optimizer {getattr(args.optim, 'value', args.optim)}, "
        f"schedule {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
        + (f", resuming from {checkpoint}" if checkpoint else ""))
    first = trainer.evaluate() if checkpoint is None else None  # step 0: where the stage starts
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    history = trainer.state.log_history
    last = next((e for e in history if "eval_loss" in e and e.get("step") == trainer.state.global_step), None)
    last = last or trainer.evaluate()
    if first is None:  # resumed: the first evaluation is in the checkpoint's history
        first = next((e for e in history if "eval_loss" in e), {})
    result = {
        "global_step": trainer.state.global_step,
        "eval_loss_start": first.get("eval_loss"),
        "eval_loss_end": last["eval_loss"],
        "eval_perplexity_end": math.exp(last["eval_loss"]),
        **{f"eval_{m}_{when}": entry.get(f"eval_{m}") for m in task.eval_metrics
           for when, entry in (("start", first), ("end", last))},
        "last_lr": trainer.lr_scheduler.get_last_lr()[0],
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    trainer.save_model(str(final))  # on the main process only
    # train() starts a new log history: the evaluation before it (step 0) goes in front
    history = list(trainer.state.log_history)
    if checkpoint is None:
        history.insert(0, {"step": 0, **{k: v for k, v in first.items() if k.startswith("eval_")}})
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(final / "trainer_state.json"))
        (final / "history.json").write_text(json.dumps(history, indent=1))
        (final / "stage.json").write_text(json.dumps(result, indent=1))
    say(f"[{stage}] " + stage_line(result, task))
    return {**result, "model": trainer.model, "history": history}


def _lightning_pieces() -> tuple[Any, Any]:
    """The LightningModule and the metrics callback of the ``trainer: lightning`` runs (Lightning imported here)."""
    import lightning.pytorch as pl
    import torch

    import optim_plugins.integrations.lightning as opl

    class CausalLM(pl.LightningModule):
        """A transformers model trained by Lightning; the optimizer and schedule come from optim_plugins."""

        def __init__(self, model: Any, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]):
            super().__init__()
            self.model, self.optimizer_section, self.scheduler_section = model, dict(optimizer), dict(scheduler)

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(**batch).loss, batch_size=len(batch["labels"]))

        def configure_optimizers(self):
            # layer decay and no-decay groups over the wrapped model's parameters; steps = trainer.max_steps
            return opl.configure_optimizers(self, self.optimizer_section, scheduler=self.scheduler_section)

    class History(pl.Callback):
        """The Trainer's log history in the HF Trainer's form (loss, learning_rate, grad_norm, eval_loss per step),
        kept in the checkpoints so that a resumed run reports its whole history."""

        def __init__(self, logging_steps: int):
            self.logging_steps, self.entries, self._norm = logging_steps, [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self._norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None  # before clipping

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step and step % self.logging_steps == 0 and not any(e.get("step") == step and "loss" in e for e in self.entries):
                lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] if trainer.lr_scheduler_configs else \
                    trainer.optimizers[0].param_groups[0]["lr"]
                loss = float(outputs["loss"]) * trainer.accumulate_grad_batches  # Lightning divides it; the last micro-batch's
                self.entries.append({"step": step, "loss": loss, "learning_rate": lr,
                                     "grad_norm": self._norm})

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
                self.entries.append({"step": trainer.global_step, "eval_loss": float(trainer.callback_metrics["val_loss"])})

        def state_dict(self):
            return {"entries": self.entries}

        def load_state_dict(self, state):
            self.entries = list(state["entries"])

    return CausalLM, History


def _run_stage_lightning(recipe: Mapping[str, Any], task: "Task", stage: str, stage_dir: Path, model: Any, bf16: bool,
                         resume: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One stage with a Lightning Trainer: the same data, optimizer (by name, layer decay), schedule,
    accumulation, clipping and precision as the HF path; checkpoints ``checkpoint-N.ckpt`` and ``last.ckpt``."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    CausalLM, History = _lightning_pieces()
    train, settings = recipe["train"], recipe[stage]
    optimizer = dict(recipe["optimizer"])
    if stage_lr(recipe, stage) is not None:
        optimizer["lr"] = stage_lr(recipe, stage)
    train_data, eval_data = task.datasets(recipe, stage)
    collate = task.trainer_kwargs(recipe).get("data_collator")
    generator = torch.Generator().manual_seed(recipe["seed"])
    train_loader = torch.utils.data.DataLoader(train_data, batch_size=train["batch_size"], shuffle=True,
                                               collate_fn=collate, generator=generator)
    eval_loader = torch.utils.data.DataLoader(eval_data, batch_size=train["batch_size"], collate_fn=collate)
    checkpoint = stage_dir / "last.ckpt" if resume and (stage_dir / "last.ckpt").is_file() else None
    history = History(train["logging_steps"])
    saver = ModelCheckpoint(dirpath=str(stage_dir), filename="checkpoint-{step}", every_n_train_steps=train["save_steps"],
                            save_top_k=train["save_total_limit"], monitor="step", mode="max", save_last=True)
    pl.seed_everything(recipe["seed"], verbose=False)
    trainer = pl.Trainer(
        max_steps=settings["max_steps"], accumulate_grad_batches=train["gradient_accumulation_steps"],
        gradient_clip_val=train["max_grad_norm"] or None, precision="bf16-mixed" if bf16 else "32-true",
        val_check_interval=train["eval_steps"] * train["gradient_accumulation_steps"], check_val_every_n_epoch=None,
        callbacks=[history, saver], logger=False, enable_progress_bar=train["progress_bar"], enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(stage_dir), accelerator="auto", devices=1)
    module = CausalLM(model, optimizer, recipe["scheduler"])
    say(f"[{stage}] {task.describe(recipe, stage, train_data, eval_data)}, {settings['max_steps']} optimizer steps, "
        f"optimizer {optimizer['name']}, schedule {recipe['scheduler']['name']}, Lightning"
        + (f", resuming from {checkpoint}" if checkpoint else ""))
    if checkpoint is None:
        start = trainer.validate(module, eval_loader, verbose=False)[0]["val_loss"]
        history.entries = [{"step": 0, "eval_loss": float(start)}]
    trainer.fit(module, train_loader, eval_loader, ckpt_path=str(checkpoint) if checkpoint else None)
    entries = history.entries
    if not any("eval_loss" in e and e["step"] == trainer.global_step for e in entries):
        trainer.validate(module, eval_loader, verbose=False)
        entries.append({"step": trainer.global_step, "eval_loss": float(trainer.callback_metrics["val_loss"])})
    evals = [e["eval_loss"] for e in entries if "eval_loss" in e]
    scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
    result = {
        "global_step": trainer.global_step,
        "eval_loss_start": evals[0],
        "eval_loss_end": evals[-1],
        "eval_perplexity_end": math.exp(evals[-1]),
        "last_lr": scheduler.get_last_lr()[0] if scheduler else trainer.optimizers[0].param_groups[0]["lr"],
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    final = stage_dir / "final"
    module.model.save_pretrained(str(final))
    (final / "history.json").write_text(json.dumps(entries, indent=1))
    (final / "stage.json").write_text(json.dumps(result, indent=1))
    say(f"[{stage}] " + stage_line(result, task))
    return {**result, "model": module.model, "history": entries}


def stage_line(result: Mapping[str, Any], task: "Task") -> str:
    """``eval loss 5.5 -> 2.1 (perplexity 8.2), CER 0.9 -> 0.1 after 150 steps``."""
    start = result.get("eval_loss_start")
    text = (f"eval loss {start:.3f} -> " if start is not None else "eval loss ") + f"{result['eval_loss_end']:.3f}"
    if not task.eval_metrics:
        text += f" (perplexity {result['eval_perplexity_end']:.2f})"
    for m in task.eval_metrics:
        a, b = result.get(f"eval_{m}_start"), result.get(f"eval_{m}_end")
        text += f", {m.upper()} " + (f"{a:.3f} -> " if a is not None else "") + (f"{b:.3f}" if b is not None else "?")
    return text + f" after {result['global_step']} steps"


# ============================================================================ ASR task


def _check_asr(recipe: dict[str, Any]) -> None:
    model, data = recipe["model"], recipe["data"]
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ValueError(f"recipe key model.num_attention_heads: must divide model.hidden_size ({model['hidden_size']}), "
                         f"got {model['num_attention_heads']}")
    if data["min_words"] > data["max_words"]:
        raise ValueError(f"recipe key data.min_words: must be <= data.max_words ({data['max_words']}), got {data['min_words']}")


def _asr_model(recipe: Mapping[str, Any]) -> Any:
    """A tiny wav2vec2 with a CTC head over characters, from a config (no pretrained weights)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from .asr_data import VOCAB

    m = recipe["model"]
    torch.manual_seed(recipe["seed"])
    config = Wav2Vec2Config(
        vocab_size=len(VOCAB), hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        conv_dim=(m["conv_channels"],) * 3, conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8), conv_bias=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
        apply_spec_augment=False, mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, pad_token_id=0,
        ctc_loss_reduction="mean", ctc_zero_infinity=True)
    return Wav2Vec2ForCTC(config)


def _asr_load(path: str) -> Any:
    from transformers import Wav2Vec2ForCTC

    return Wav2Vec2ForCTC.from_pretrained(path)


class _Utterances:
    def __init__(self, items: list[tuple[Any, str]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        wave, text = self.items[i]
        return {"input_values": wave, "text": text}


def _asr_datasets(recipe: Mapping[str, Any], stage: str) -> tuple[Any, Any]:
    from .asr_data import utterances

    d, seed = recipe["data"], recipe["seed"]
    common = dict(min_words=d["min_words"], max_words=d["max_words"], sample_rate=d["sample_rate"], noise=d["noise"])
    train = utterances(d["train_utterances"], seed, range(d["train_speakers"]), **common)
    held = utterances(d["eval_utterances"], seed + 1,
                      range(d["train_speakers"], d["train_speakers"] + d["eval_speakers"]), **common)
    return _Utterances(train), _Utterances(held)


def _asr_describe(recipe: Mapping[str, Any], stage: str, train: Any, held: Any) -> str:
    d = recipe["data"]
    return (f"{len(train)} train / {len(held)} eval synthetic utterances of {d['min_words']}-{d['max_words']} digits "
            f"({d['train_speakers']} / {d['eval_speakers']} speakers, {d['sample_rate']} Hz)")


def collate_speech(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Normalise each waveform (zero mean, unit variance), pad to the longest, labels padded with -100."""
    import torch

    from .asr_data import encode

    length = max(len(item["input_values"]) for item in items)
    width = max(len(item["text"]) for item in items)
    values = torch.zeros(len(items), length)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    for i, item in enumerate(items):
        wave = item["input_values"]
        values[i, : len(wave)] = (wave - wave.mean()) / (wave.std() + 1e-7)
        mask[i, : len(wave)] = 1
        labels[i, : len(item["text"])] = torch.tensor(encode(item["text"]))
    return {"input_values": values, "attention_mask": mask, "labels": labels}


def _greedy_ids(logits: Any, labels: Any) -> Any:
    """Most likely id per frame (the evaluation batches hold one utterance: no padded frames)."""
    return logits.argmax(dim=-1)


def speech_error_rates(eval_pred: Any) -> dict[str, float]:
    """CER and WER (jiwer) of greedy CTC decoding against the reference texts."""
    import jiwer

    from .asr_data import VOCAB, ctc_decode

    ids, labels = eval_pred.predictions, eval_pred.label_ids
    hyps = [ctc_decode([int(i) for i in row]) for row in ids]
    refs = ["".join(VOCAB[int(i)] for i in row if i >= 0) for row in labels]
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


def _asr_trainer_kwargs(recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {"data_collator": collate_speech, "compute_metrics": speech_error_rates,
            "preprocess_logits_for_metrics": _greedy_ids}


# ============================================================================ dry run, lr finder, compare


def stage_lr(recipe: Mapping[str, Any], stage: str) -> float | None:
    lr = recipe[stage]["learning_rate"]
    return lr if lr is not None else recipe["optimizer"].get("lr")


def build_optimizer(recipe: Mapping[str, Any], stage: str, model: Any) -> Any:
    """The recipe's optimizer for ``stage`` over ``model`` (its parameter groups, the stage's lr),
    built as the trainers build it."""
    from . import create_optimizer

    section = dict(recipe["optimizer"])
    lr = stage_lr(recipe, stage)
    if lr is not None:
        section["lr"] = lr
    return create_optimizer(section, model)


def parameter_group_table(recipe: Mapping[str, Any], model: Any = None) -> str:
    """A text table per stage: group, #params, lr, weight_decay, lr_scale of each parameter group."""
    task = task_of(recipe)
    model = model if model is not None else task.build_model(recipe)
    blocks = []
    for stage in task.stages:
        if recipe[stage]["max_steps"] == 0:
            continue
        optimizer = build_optimizer(recipe, stage, model)
        rows = [(str(g.get("name", f"group {i}")), f"{sum(p.numel() for p in g['params']):,}", f"{g['lr']:.3g}",
                 f"{g.get('weight_decay', 0.0):g}", f"{g.get('lr_scale', 1.0):.3g}")
                for i, g in enumerate(optimizer.param_groups)]
        total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        head = ("group", "#params", "lr", "weight_decay", "lr_scale")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        blocks.append(f"[{stage}] {type(optimizer).__name__}, {len(rows)} parameter groups, {total:,} parameters\n"
                      + "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)]))
    return "\n\n".join(blocks)


def dry_run(source: str | Path | Mapping[str, Any], sets: Sequence[str] = (), output_dir: str | None = None) -> str:
    """The resolved recipe (YAML) and its parameter-group table; trains nothing and writes no file."""
    import yaml

    recipe = load_recipe(source, sets, output_dir)
    task = task_of(recipe)
    _check_extras(task)
    text = "# resolved recipe\n" + yaml.safe_dump(recipe, sort_keys=False)
    return text + "\n# parameter groups\n" + parameter_group_table(recipe) + "\n"


def _loader(recipe: Mapping[str, Any], data: Any, shuffle: bool) -> Any:
    import torch

    task = task_of(recipe)
    collate = task.trainer_kwargs(recipe).get("data_collator")
    generator = torch.Generator().manual_seed(recipe["seed"])
    return torch.utils.data.DataLoader(data, batch_size=recipe["train"]["batch_size"], shuffle=shuffle,
                                       collate_fn=collate, generator=generator)


def lr_find_recipe(source: str | Path | Mapping[str, Any], sets: Sequence[str] = (), stage: str | None = None,
                   num_steps: int = 100, start_lr: float = 1e-6, end_lr: float = 1.0, output: str | Path | None = "lr_find.png",
                   say: Callable[[str], None] = print) -> Any:
    """:func:`optim_plugins.lr_find` on the recipe's freshly built model, the training data of ``stage``
    (default: its first stage that trains) and its optimizer with its parameter groups (layer decay keeps
    its ratios); writes a plot of loss against lr to ``output`` (``None``: no plot)."""
    from .lr_finder import lr_find

    recipe = load_recipe(source, sets)
    task = task_of(recipe)
    _check_extras(task)
    stage = stage or next(s for s in task.stages if recipe[s]["max_steps"] > 0)
    if stage not in task.stages:
        raise ValueError(f"--stage {stage!r}: the {task.name} recipe has the stages {', '.join(task.stages)}")
    model = task.build_model(recipe)
    train, _ = task.datasets(recipe, stage)
    optimizer = build_optimizer(recipe, stage, model)
    say(f"lr-find: {num_steps} steps of {recipe['optimizer']['name']} on the {stage} data, lr {start_lr:g} -> {end_lr:g}")
    result = lr_find(model, lambda m, batch: m(**batch).loss, _loader(recipe, train, shuffle=True), optimizer,
                     start_lr=start_lr, end_lr=end_lr, num_steps=num_steps)
    if output is not None:
        plot_lr_find(result, Path(output), title=f"{task.name} {stage}: {recipe['optimizer']['name']}")
    return result


def plot_lr_find(result: Any, path: Path, title: str = "") -> Path:
    """Loss and smoothed loss against lr (log scale), the suggested lr marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed_losses, label="smoothed loss")
    if result.suggested_lr is not None:
        ax.axvline(result.suggested_lr, color="C3", ls="--", label=f"suggested lr {result.suggested_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (largest group)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def with_optimizer(recipe: Mapping[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """The recipe with its optimizer replaced by ``name`` (``"lion"``, or with options
    ``"lion:lr=3e-4:weight_decay=0.1"``): the recipe's options ``name`` takes are kept, the others
    are dropped (returned, to be reported); the options given after ``:`` win."""
    from .registry import get_optimizer_spec

    name, *items = name.split(":")
    given = apply_sets({}, items)
    spec = get_optimizer_spec(name)
    section = {"name": spec.name}
    dropped = []
    for key, value in recipe["optimizer"].items():
        if key == "name":
            continue
        if key in spec.options or key in GROUP_KEYS or (key.startswith("beta") and "betas" in spec.options):
            section[key] = value
        else:
            dropped.append(key)
    if "lr" in given:  # an lr given here is the lr of every stage
        for stage in task_of(recipe).stages:
            recipe = {**recipe, stage: {**recipe[stage], "learning_rate": None}}
    return {**copy.deepcopy(dict(recipe)), "optimizer": {**section, **given}}, dropped


def compare_recipe(source: str | Path | Mapping[str, Any], optimizers: Sequence[str], sets: Sequence[str] = (),
                   output_dir: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe once per optimizer (``<output_dir>/<name>/``), then write ``compare.md`` (final eval
    loss, perplexity or CER/WER, seconds) and ``compare.png`` (eval loss per step) in ``output_dir``
    (default: the recipe's ``output_dir`` + ``_compare``). Every variant is validated before any runs."""
    recipe = load_recipe(source, sets)
    task = task_of(recipe)
    names = [n.strip() for n in optimizers if n.strip()]
    if not names:
        raise ValueError("--optimizers: give at least one registered optimizer name (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"--optimizers: a name is repeated in {','.join(names)}")
    base = Path(output_dir if output_dir is not None else recipe["output_dir"] + "_compare")
    if base.exists() and any(base.iterdir()):
        raise ValueError(f"output directory {base} already holds files: choose another --output-dir")
    variants = {}
    for name in names:
        variant, dropped = with_optimizer(recipe, name)
        label = name.replace(":", "_").replace("=", "")
        variant["output_dir"] = str(base / label)
        variants[label] = (load_recipe(variant), dropped)  # validated before anything runs
    _check_extras(task)
    results = {}
    for name, (variant, dropped) in variants.items():
        say(f"=== {name}" + (f" (options it does not take, dropped: {', '.join(dropped)})" if dropped else ""))
        summary = run_recipe(variant, say=say)
        rows = json.loads((Path(variant["output_dir"]) / "metrics.json").read_text())["rows"]
        results[name] = {"summary": summary, "rows": rows}
    last = task.stages[-1]
    table = compare_markdown(results, task, last)
    (base / "compare.md").write_text(table)
    plot_compare(results, base / "compare.png", task)
    say(table)
    say(f"compare: table {base / 'compare.md'}, plot {base / 'compare.png'}")
    return {"output_dir": str(base), "results": {k: v["summary"] for k, v in results.items()}, "table": table}


def compare_markdown(results: Mapping[str, Mapping[str, Any]], task: "Task", stage: str) -> str:
    extra = [m.upper() for m in task.eval_metrics] or ["eval perplexity"]
    lines = [f"Final evaluation of the {stage} stage ({task.name}), same recipe, one run per optimizer.", "",
             "| optimizer | eval loss | " + " | ".join(extra) + " | seconds |",
             "|---|---:|" + "---:|" * len(extra) + "---:|"]
    for name, result in results.items():
        stage_result = result["summary"]["stages"][stage]
        values = ([stage_result.get(f"eval_{m}_end") for m in task.eval_metrics] if task.eval_metrics
                  else [stage_result["eval_perplexity_end"]])
        cells = " | ".join("n/a" if v is None else f"{v:.4g}" for v in values)
        lines.append(f"| {name} | {stage_result['eval_loss_end']:.4f} | {cells} | {result['summary']['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_compare(results: Mapping[str, Mapping[str, Any]], path: Path, task: "Task") -> Path:
    """Eval loss (and CER for ASR) per global step, one line per optimizer; train loss faint."""
    plt = _pyplot()
    keys = ["eval_loss", *(f"eval_{m}" for m in task.eval_metrics[:1])]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.5 * len(keys)), sharex=True, squeeze=False)
    for i, (name, result) in enumerate(results.items()):
        rows = result["rows"]
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["global_step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{i}", label=f"{name} {key.replace('_', ' ')}")
            if key == "eval_loss":
                train = [(r["global_step"], r["loss"]) for r in rows if "loss" in r]
                if train:
                    ax.plot(*zip(*train), color=f"C{i}", alpha=0.25, lw=1)
            ax.set_ylabel(key.replace("_", " ") + (" (faint: train loss)" if key == "eval_loss" else ""))
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ============================================================================ tasks


@dataclass(frozen=True)
class Task:
    """What a recipe ``task:`` trains: its schema, stages, defaults and the pieces the runner calls."""

    name: str
    schema: Mapping[str, Any]
    stages: tuple[str, ...]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    smoke: Mapping[str, Any]
    check: Callable[[dict[str, Any]], None]
    build_model: Callable[[Mapping[str, Any]], Any]
    load_model: Callable[[str], Any]
    datasets: Callable[[Mapping[str, Any], str], tuple[Any, Any]]
    describe: Callable[..., str]
    trainer_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda recipe: {}
    eval_metrics: tuple[str, ...] = ()  # eval_<name> metrics besides eval_loss (ASR: cer, wer)
    extras: str = "hf,plot"
    eval_batch_size: int | None = None  # None: train.batch_size (ASR: 1, so that no padded frame is decoded)
    modules: tuple[str, ...] = ()  # imported before training to check the extras


TASKS: dict[str, Task] = {
    "llm_finetune": Task("llm_finetune", LLM_SCHEMA, STAGES, DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER, SMOKE, _check_llm,
                         _llm_model, _llm_load, _llm_datasets, _llm_describe),
    "asr_finetune": Task("asr_finetune", ASR_SCHEMA, ("finetune",), ASR_OPTIMIZER, ASR_SCHEDULER, ASR_SMOKE, _check_asr,
                         _asr_model, _asr_load, _asr_datasets, _asr_describe, _asr_trainer_kwargs,
                         eval_metrics=("cer", "wer"), extras="hf,plot,asr", modules=("jiwer",), eval_batch_size=1),
}
