"""Typed optimizer and schedule configs, built from a dict, YAML, TrainingArguments or Lightning hparams.

    cfg = op.OptimizerConfig.from_yaml("recipe.yaml", section="optimizer")
    opt = op.create_optimizer(cfg, model)
    sched = op.create_scheduler(op.SchedulerConfig.from_training_args(args), opt)

Both configs validate when they are made: an unknown name, field or option, or a value of the
wrong type, raises ``ValueError`` naming the field (``OptimizerConfig.lr``, ``options.betas``)
and the value. Option values are typed with the registry's option schema, so strings from YAML,
a command line or ``optim_args`` become the floats, tuples and bools the optimizer takes.
PyYAML is imported only by the YAML methods, transformers never (arguments are read by name).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .param_groups import _check_overrides
from .registry import Option, get_optimizer_spec, get_scheduler_spec

# TrainingArguments.optim values that mean an optimizer registered here under another name.
HF_OPTIM_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw"}


def _err(owner: str, name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{owner}.{name}: {why}, got {value!r}")


def _number(owner: str, name: str, value: Any, minimum: float = 0.0, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _err(owner, name, value, "must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _err(owner, name, value, "must be a number")
    if value < minimum:
        raise _err(owner, name, value, f"must be >= {minimum:g}")
    return float(value)


def _unknown(owner: str, key: str, value: Any, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"{owner} has no field or option {key!r} (value {value!r}){hint}; it takes: {', '.join(known)}")


def split_options(text: str) -> dict[str, str]:
    """``"betas=(0.9,0.95),eps=1e-8"`` -> ``{"betas": "(0.9,0.95)", "eps": "1e-8"}`` (commas inside brackets kept)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    result = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optim_args: {item.strip()!r} is not key=value (in {text!r})")
        result[key.strip()] = value.strip()
    return result


def parse_options(
    options: Mapping[str, Any], schema: Mapping[str, Option], owner: str = "options", base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Type ``options`` with ``schema``: strings become numbers, tuples, bools; flat ``beta1``/``beta2``/``beta3``
    become ``betas`` (the betas not given come from ``base``, else the default). An option the schema
    lacks, or a value that does not fit, raises ``ValueError`` naming it."""
    options = dict(options)
    flat = {k: options.pop(k) for k in [k for k in options if re.fullmatch(r"beta[1-3]", k)]}
    typed: dict[str, Any] = {}
    for key, value in options.items():
        if key not in schema:
            raise _unknown(owner, key, value, list(schema))
        try:
            typed[key] = schema[key].parse(value)
        except ValueError as exc:
            raise ValueError(f"{owner}.{key}: {exc}") from None
    if flat:
        if "betas" not in schema:
            key = next(iter(flat))
            raise _unknown(owner, key, flat[key], list(schema))
        betas = list(typed.get("betas", (base or {}).get("betas", schema["betas"].default)))
        for key, value in flat.items():
            index = int(key[-1]) - 1
            if index >= len(betas):
                raise ValueError(f"{owner}.{key}: this optimizer has {len(betas)} betas, got {key}={value!r}")
            betas[index] = value
        try:
            typed["betas"] = schema["betas"].parse(betas)
        except ValueError as exc:
            raise ValueError(f"{owner}.betas (from {', '.join(flat)}): {exc}") from None
    return typed


def parse_optim_args(
    text: str | Mapping[str, Any] | None, optimizer: str, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Typed options from an HF-style ``optim_args``: ``"betas=(0.9,0.95),eps=1e-8,amsgrad=true"``.

    Takes the parenthesised form and the flat one transformers hands its handlers
    (``beta1=0.9,beta2=0.95``), or the dict transformers already split. A lone ``beta2`` keeps
    ``base["betas"][0]`` (else the default). A bad option or value raises ``ValueError`` naming it.
    """
    if not text:
        return {}
    items = split_options(text) if isinstance(text, str) else dict(text)
    return parse_options(items, get_optimizer_spec(optimizer).options, owner="optim_args", base=base)


def _read_yaml(path: str | Path, section: str | None) -> Any:
    import yaml  # PyYAML: only needed here

    with open(path) as f:
        data = yaml.safe_load(f)
    for key in section.split(".") if section else ():
        if not isinstance(data, Mapping) or key not in data:
            raise ValueError(f"{path}: no section {section!r} (missing key {key!r})")
        data = data[key]
    return data


def _dump_yaml(data: dict[str, Any], path: str | Path | None) -> str:
    import yaml

    text = yaml.safe_dump(data, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so that YAML/JSON write them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


@dataclass
class OptimizerConfig:
    """Which optimizer, its options, and how parameter groups are built.

    Args:
        name: registry name (``op.list_optimizers()``), stored normalized (``"AdamW"`` -> ``"adamw"``).
        lr: learning rate; ``None`` = the optimizer's default.
        weight_decay: decay of the decayed groups; ``None`` = the optimizer's default.
        options: other optimizer options, typed by its schema (``betas``, ``eps``, ``momentum``...).
        layer_decay: layer-wise lr decay factor for :func:`optim_plugins.param_groups`.
        decay_embeddings: ``False`` exempts embeddings from weight decay.
        no_decay: extra regexes of parameter names without weight decay.
        overrides: ``[(regex, {option: value})]`` for :func:`optim_plugins.param_groups`.
        max_grad_norm: gradient clipping the trainer applies (not the optimizer); ``None`` = none.
    """

    name: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layer_decay: float | None = None
    decay_embeddings: bool = True
    no_decay: list[str] = field(default_factory=list)
    overrides: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        owner = "OptimizerConfig"
        if not isinstance(self.name, str):
            raise _err(owner, "name", self.name, "must be a registry name (str)")
        try:
            spec = get_optimizer_spec(self.name)
        except ValueError as exc:
            raise ValueError(f"{owner}.name: {exc}") from None
        self.name = spec.name
        if not isinstance(self.options, Mapping):
            raise _err(owner, "options", self.options, "must be a dict of optimizer options")
        options = dict(self.options)
        for key in ("lr", "weight_decay"):  # accepted inside options too, but only once
            if key in options:
                if getattr(self, key) is not None:
                    raise ValueError(f"{owner}: {key} given both as a field and in options")
                setattr(self, key, options.pop(key))
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if value is not None and key not in spec.options:
                raise _err(owner, key, value, f"optimizer {spec.name!r} has no option {key!r}")
            setattr(self, key, _number(owner, key, value))
        self.options = parse_options(options, spec.options, owner=f"{owner}.options")
        if self.layer_decay is not None:
            self.layer_decay = _number(owner, "layer_decay", self.layer_decay)
            if not 0 < self.layer_decay <= 1:
                raise _err(owner, "layer_decay", self.layer_decay, "must be in (0, 1]")
        if not isinstance(self.decay_embeddings, bool):
            raise _err(owner, "decay_embeddings", self.decay_embeddings, "must be true or false")
        if isinstance(self.no_decay, str):
            self.no_decay = [self.no_decay]
        for pattern in self.no_decay:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise _err(owner, "no_decay", pattern, f"bad regex ({exc})") from None
        self.no_decay = list(self.no_decay)
        self.overrides = self._typed_overrides(spec)
        self.max_grad_norm = _number(owner, "max_grad_norm", self.max_grad_norm)

    def _typed_overrides(self, spec: Any) -> list[tuple[str, dict[str, Any]]]:
        items = []
        for item in self.overrides or ():
            if isinstance(item, Mapping):  # YAML-friendly form: {pattern: ..., lr_scale: ...}
                item = dict(item)
                item = (item.pop("pattern", None), item)
            items.append(tuple(item) if isinstance(item, (list, tuple)) else item)
        try:
            rules = _check_overrides(items, spec)
        except ValueError as exc:
            raise ValueError(f"OptimizerConfig.{exc}") from None
        return [(pattern.pattern, options) for pattern, options in rules]

    # --------------------------------------------------------------------- sources

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | OptimizerConfig | str) -> OptimizerConfig:
        """From ``{"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], ...}``: keys that are not
        fields are the optimizer's options (or put them under ``options:``)."""
        if isinstance(data, OptimizerConfig):
            return data
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise ValueError(f"OptimizerConfig: expected a dict or a name, got {data!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        extra = {k: v for k, v in data.items() if k not in fields}
        if extra:
            kwargs["options"] = {**extra, **dict(kwargs.get("options") or {})}
            try:
                schema = get_optimizer_spec(kwargs.get("name", cls.name)).options
            except ValueError as exc:
                raise ValueError(f"OptimizerConfig.name: {exc}") from None
            for key, value in extra.items():
                if key not in schema and not re.fullmatch(r"beta[1-3]", key):
                    raise _unknown("OptimizerConfig", key, value, sorted(fields) + list(schema))
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> OptimizerConfig:
        """From a YAML file, or one section of it (``section="optimizer"``, dotted for nested)."""
        return cls.from_dict(_read_yaml(path, section))

    @classmethod
    def from_training_args(cls, args: Any) -> OptimizerConfig:
        """From a transformers ``TrainingArguments``: ``optim`` (``op_`` prefix, ``adamw_torch``...),
        ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` (where the
        optimizer has betas, as the Trainer does), ``optim_args`` (wins over those) and ``max_grad_norm``."""
        optim = str(_enum_value(args.optim))
        name = optim[3:] if optim.startswith("op_") else HF_OPTIM_NAMES.get(optim, optim)
        try:
            spec = get_optimizer_spec(name)
        except ValueError as exc:
            raise ValueError(f"TrainingArguments.optim: {exc}") from None
        options: dict[str, Any] = {}
        if "betas" in spec.options:
            options["betas"] = (args.adam_beta1, args.adam_beta2)
            if "eps" in spec.options:
                options["eps"] = args.adam_epsilon
        options.update(parse_optim_args(args.optim_args, spec.name, base=options))
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        return cls(name=spec.name, lr=args.learning_rate, weight_decay=args.weight_decay, options=options, max_grad_norm=max_norm)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> OptimizerConfig:
        """From Lightning ``self.hparams``: an ``optimizer`` section (dict or name), or flat keys
        ``optimizer``/``optim``, ``lr``/``learning_rate``, ``weight_decay``, ``layer_decay``,
        ``max_grad_norm``/``gradient_clip_val``, ``optim_args`` and any option of that optimizer.
        Other hparams (the model's own) are ignored."""
        section = hparams.get("optimizer")
        if isinstance(section, Mapping) or isinstance(section, OptimizerConfig):
            return cls.from_dict(section)
        name = section or hparams.get("optim") or hparams.get("optimizer_name") or cls.name
        try:
            spec = get_optimizer_spec(name)
        except ValueError as exc:
            raise ValueError(f"hparams.optimizer: {exc}") from None
        lr = hparams.get("lr", hparams.get("learning_rate"))
        options = {k: v for k, v in hparams.items() if k in spec.options and k not in ("lr", "weight_decay")}
        options.update({k: v for k, v in hparams.items() if re.fullmatch(r"beta[1-3]", k)})
        options = parse_options(options, spec.options, owner="hparams")
        options.update(parse_optim_args(hparams.get("optim_args"), spec.name, base=options))
        return cls(
            name=spec.name,
            lr=lr,
            weight_decay=hparams.get("weight_decay"),
            options=options,
            layer_decay=hparams.get("layer_decay"),
            max_grad_norm=hparams.get("max_grad_norm", hparams.get("gradient_clip_val")),
        )

    # --------------------------------------------------------------------- out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) that :meth:`from_dict` turns back into an equal config."""
        data = dataclasses.asdict(self)
        data["overrides"] = [{"pattern": p, **o} for p, o in self.overrides]
        return _plain(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text (written to ``path`` when given)."""
        return _dump_yaml(self.to_dict(), path)

    def group_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`optim_plugins.param_groups` this config sets (non-defaults only)."""
        options = {
            "layer_decay": self.layer_decay,
            "decay_embeddings": self.decay_embeddings,
            "no_decay": self.no_decay,
            "overrides": self.overrides,
        }
        defaults = {"layer_decay": None, "decay_embeddings": True, "no_decay": [], "overrides": []}
        return {k: v for k, v in options.items() if v != defaults[k]}


@dataclass
class SchedulerConfig:
    """Which learning-rate schedule and its options; steps count optimizer steps.

    Args:
        name: registry name (``op.list_schedulers()``), stored normalized.
        num_training_steps: total optimizer steps; ``None`` until known (the trainer may fill it).
        num_warmup_steps: an int, or a float in ``[0, 1)`` = that fraction of
            ``num_training_steps`` rounded up (transformers' ``warmup_steps`` rule).
        options: the schedule's other options, typed by its schema.
    """

    name: str = "constant"
    num_training_steps: int | None = None
    num_warmup_steps: int | float = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "SchedulerConfig"
        if not isinstance(self.name, str):
            raise _err(owner, "name", self.name, "must be a registry name (str)")
        try:
            spec = get_scheduler_spec(self.name)
        except ValueError as exc:
            raise ValueError(f"{owner}.name: {exc}") from None
        self.name = spec.name
        if self.num_training_steps is not None:
            steps = _number(owner, "num_training_steps", self.num_training_steps, minimum=1)
            if not steps.is_integer():
                raise _err(owner, "num_training_steps", self.num_training_steps, "must be a whole number")
            self.num_training_steps = int(steps)
        warmup = _number(owner, "num_warmup_steps", self.num_warmup_steps, allow_none=False)
        if warmup >= 1 and not warmup.is_integer():
            raise _err(owner, "num_warmup_steps", self.num_warmup_steps, "must be a whole number of steps, or a fraction < 1")
        self.num_warmup_steps = int(warmup) if warmup >= 1 or warmup == 0 else warmup
        if not isinstance(self.options, Mapping):
            raise _err(owner, "options", self.options, "must be a dict of schedule options")
        for key in ("num_training_steps", "num_warmup_steps"):
            if key in self.options:
                raise ValueError(f"{owner}.options.{key}: set it as the field {key}, not as an option")
        self.options = parse_options(self.options, spec.options, owner=f"{owner}.options")

    def warmup_steps(self, num_training_steps: int | None = None) -> int:
        """Warmup in optimizer steps; a fractional ``num_warmup_steps`` needs the total."""
        if isinstance(self.num_warmup_steps, int):
            return self.num_warmup_steps
        total = num_training_steps if num_training_steps is not None else self.num_training_steps
        if total is None:
            raise ValueError(
                f"SchedulerConfig.num_warmup_steps: the fraction {self.num_warmup_steps!r} needs num_training_steps"
            )
        return math.ceil(total * self.num_warmup_steps)

    # --------------------------------------------------------------------- sources

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | SchedulerConfig | str) -> SchedulerConfig:
        """From ``{"name": "cosine", "num_training_steps": 1000, "num_warmup_steps": 0.1, ...}``:
        keys that are not fields are the schedule's options; ``warmup_steps`` is accepted for ``num_warmup_steps``."""
        if isinstance(data, SchedulerConfig):
            return data
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise ValueError(f"SchedulerConfig: expected a dict or a name, got {data!r}")
        data = dict(data)
        if "warmup_steps" in data:
            if "num_warmup_steps" in data:
                raise ValueError("SchedulerConfig: give num_warmup_steps or warmup_steps, not both")
            data["num_warmup_steps"] = data.pop("warmup_steps")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        extra = {k: v for k, v in data.items() if k not in fields}
        if extra:
            try:
                schema = get_scheduler_spec(kwargs.get("name", cls.name)).options
            except ValueError as exc:
                raise ValueError(f"SchedulerConfig.name: {exc}") from None
            for key, value in extra.items():
                if key not in schema:
                    raise _unknown("SchedulerConfig", key, value, sorted(fields) + list(schema))
            kwargs["options"] = {**extra, **dict(kwargs.get("options") or {})}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> SchedulerConfig:
        """From a YAML file, or one section of it (``section="lr_scheduler"``, dotted for nested)."""
        return cls.from_dict(_read_yaml(path, section))

    @classmethod
    def from_training_args(cls, args: Any, num_batches_per_epoch: int | None = None) -> SchedulerConfig:
        """From a transformers ``TrainingArguments``: ``lr_scheduler_type`` (``op_`` prefix taken off),
        ``lr_scheduler_kwargs``, ``warmup_steps`` (int or fraction), and the total steps: ``max_steps``
        when > 0, else ``num_train_epochs`` x optimizer steps per epoch, computed from
        ``num_batches_per_epoch`` (``len(train_dataloader)``) and ``gradient_accumulation_steps``
        as the Trainer does; ``None`` when neither is known."""
        kind = str(_enum_value(args.lr_scheduler_type))
        name = kind[3:] if kind.startswith("op_") else kind
        total = None
        if args.max_steps and args.max_steps > 0:
            total = args.max_steps
        elif num_batches_per_epoch is not None:
            accumulation = args.gradient_accumulation_steps
            per_epoch = max(math.ceil(num_batches_per_epoch / accumulation), 1)
            total = math.ceil(args.num_train_epochs * per_epoch)
        options = args.lr_scheduler_kwargs or {}
        if isinstance(options, str):
            import json

            options = json.loads(options) if options.strip() else {}
        try:
            get_scheduler_spec(name)
        except ValueError as exc:
            raise ValueError(f"TrainingArguments.lr_scheduler_type: {exc}") from None
        return cls(name=name, num_training_steps=total, num_warmup_steps=args.warmup_steps, options=dict(options))

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> SchedulerConfig:
        """From Lightning ``self.hparams``: an ``lr_scheduler``/``scheduler`` section (dict or name),
        with flat ``num_training_steps``/``max_steps``, ``num_warmup_steps``/``warmup_steps`` and
        ``lr_scheduler_kwargs`` filling what the section leaves out."""
        section = hparams.get("lr_scheduler", hparams.get("scheduler"))
        if isinstance(section, Mapping):
            data = dict(section)
        else:
            data = {"name": section or hparams.get("lr_scheduler_type") or cls.name}
            data.update(dict(hparams.get("lr_scheduler_kwargs") or {}))
        total = hparams.get("num_training_steps", hparams.get("max_steps"))
        if total is not None and total > 0:
            data.setdefault("num_training_steps", total)
        warmup = hparams.get("num_warmup_steps", hparams.get("warmup_steps"))
        if warmup is not None and "warmup_steps" not in data:
            data.setdefault("num_warmup_steps", warmup)
        return cls.from_dict(data)

    # --------------------------------------------------------------------- out

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal config."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text (written to ``path`` when given)."""
        return _dump_yaml(self.to_dict(), path)
