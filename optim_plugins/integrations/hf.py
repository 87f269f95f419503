"""Hugging Face ``Trainer`` integration: our optimizer and schedule names in ``TrainingArguments``.

    from optim_plugins.integrations import hf
    hf.install()                                   # once, before TrainingArguments / HfArgumentParser
    args = TrainingArguments("out", optim="adabelief", optim_args="beta2=0.99,rectify=true",
                             lr_scheduler_type="warmup_cosine", lr_scheduler_kwargs={"min_lr_ratio": 0.1})
    trainer = hf.OptimPluginsTrainer(model=model, args=args, train_dataset=data)   # or transformers.Trainer

Names. After :func:`install`, every registered optimizer/schedule name also exists with the prefix
``op_`` (``optim="op_adafactor"``, ``lr_scheduler_type="op_cosine"``) and always means ours; a bare
name transformers does not own works too (``optim="lion"``); a bare name transformers owns
(``adafactor``, ``sgd``, ``adagrad``, ``rmsprop``, ``linear``, ``cosine``, ...) keeps transformers'
meaning unless ``install(override=True)``. ``import optim_plugins.integrations.hf`` with the
environment variable ``OPTIM_PLUGINS_HF_INSTALL=1`` (or ``=override``) installs at import time.

Options. ``optim_args`` reaches us as flat ``key=value`` pairs (``beta1=0.9,beta2=0.95,rectify=true``),
typed by the optimizer's option schema; ``layer_decay=0.8``, ``decay_embeddings=false`` there set the
parameter groups. ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` apply where
the optimizer has ``lr``/``weight_decay``/``betas``/``eps``. Parameter groups come from
:func:`optim_plugins.param_groups` (no decay on norms, biases, 0/1-dim tensors).
``lr_scheduler_kwargs`` are the schedule's options, typed the same way; warmup and the total count
optimizer steps, as the Trainer passes them.

Optimizers that need more than ``step()`` (capability flags ``needs_closure``: SAM/ASAM/SophiaH;
``needs_model``: Sophia's periodic ``update_hessian``; ``train_eval``: schedule-free) need
:class:`OptimPluginsTrainer` (or :class:`OptimPluginsTrainerMixin` on your own Trainer subclass); the
plain ``Trainer`` refuses them with an error that says so.

Private surface. transformers has no plugin registry, so :func:`install` extends three private
places (all touched in the section "private surface" below and checked by :func:`check_surface`):
the enum ``training_args.OptimizerNames`` + the table ``trainer_optimizer._OPTIMIZER_HANDLERS`` read
by ``Trainer.get_optimizer_cls_and_kwargs``, and the enum ``trainer_utils.SchedulerType`` + the table
``optimization.TYPE_TO_SCHEDULER_FUNCTION`` read by ``get_scheduler``; :class:`OptimPluginsTrainerMixin`
also wraps ``Trainer._save_checkpoint`` and, for sharded optimizer state, ``_save_optimizer_and_scheduler`` /
``_load_optimizer_and_scheduler``. Tested with transformers 5.23 and 5.24; another major
version, or a changed surface, raises ``RuntimeError`` naming what changed (nothing falls back
silently). ``OPTIM_PLUGINS_HF_ALLOW_UNTESTED=1`` lets another version through the version check
(the structural checks still run).

transformers is imported only when a function here is called.
"""
from __future__ import annotations

import contextvars
import dataclasses
import enum
import glob
import inspect
import os
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import OptimizerConfig, SchedulerConfig, split_options
from ..param_groups import param_groups
from ..registry import Capabilities, Option, get_optimizer_spec, get_scheduler_spec, list_optimizers, list_schedulers

PREFIX = "op_"
TESTED_TRANSFORMERS = "5.23-5.24 (any 5.x is accepted)"
SUPPORTED_MAJOR = 5
INSTALL_ENV = "OPTIM_PLUGINS_HF_INSTALL"
ALLOW_UNTESTED_ENV = "OPTIM_PLUGINS_HF_ALLOW_UNTESTED"

# optim_args keys that shape the parameter groups rather than being optimizer options.
GROUP_KEYS = {"layer_decay": Option("layer_decay", None, float), "decay_embeddings": Option("decay_embeddings", True, bool)}

__all__ = [
    "OptimPluginsArguments",
    "OptimPluginsTrainer",
    "OptimPluginsTrainerMixin",
    "check_surface",
    "hf_owned_names",
    "install",
    "installed",
    "make_parser",
    "optimizer_config",
    "scheduler_config",
    "uninstall",
]


# ============================================================================ private surface
# Every touch of transformers' (and Python's enum) private surface is in this section.


@dataclass(frozen=True)
class _Surface:
    version: str
    OptimizerNames: type
    handlers: dict
    SchedulerType: type
    schedule_functions: dict
    Trainer: type
    TrainingArguments: type


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_surface() -> _Surface:
    """Import transformers and check every private name :func:`install` relies on.

    Raises ``RuntimeError`` listing each change (a missing name, a table that is not the one
    the Trainer reads, a major version other than 5 unless ``OPTIM_PLUGINS_HF_ALLOW_UNTESTED=1``).
    """
    try:
        import transformers
        from transformers import optimization, trainer, trainer_optimizer, trainer_utils, training_args
    except ImportError as exc:
        raise RuntimeError(f"optim_plugins.integrations.hf needs transformers 5.x (pip install 'transformers>=5,<6'): {exc}") from exc
    version = getattr(transformers, "__version__", "?")
    problems: list[str] = []
    major = _version_tuple(version)[0] if version != "?" else -1
    if major != SUPPORTED_MAJOR and os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("1", "true", "yes"):
        problems.append(f"transformers {version} is outside the tested range {TESTED_TRANSFORMERS} "
                        f"(set {ALLOW_UNTESTED_ENV}=1 to try it anyway)")

    def enum_class(module: Any, name: str) -> Any:
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and issubclass(cls, str)):
            problems.append(f"{module.__name__}.{name} is no longer a str Enum (got {cls!r})")
            return None
        for attr, kind in (("_member_map_", dict), ("_value2member_map_", dict), ("_member_names_", list)):
            if not isinstance(cls.__dict__.get(attr), kind):
                problems.append(f"{module.__name__}.{name}.{attr} is not a {kind.__name__} (Python's enum internals changed)")
                return None
        return cls

    names = enum_class(training_args, "OptimizerNames")
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        problems.append("transformers.trainer_optimizer._OPTIMIZER_HANDLERS (the optimizer handler table) is gone")
    else:
        getter = getattr(getattr(trainer, "Trainer", None), "get_optimizer_cls_and_kwargs", None)
        if getter is None or getter.__globals__.get("_OPTIMIZER_HANDLERS") is not handlers:
            problems.append("Trainer.get_optimizer_cls_and_kwargs no longer reads trainer_optimizer._OPTIMIZER_HANDLERS")
        if getattr(trainer_optimizer, "OptimizerNames", None) is not names:
            problems.append("trainer_optimizer.OptimizerNames is not training_args.OptimizerNames")
        ctx_fields = {f.name for f in dataclasses.fields(getattr(trainer_optimizer, "OptimizerContext", object))} \
            if dataclasses.is_dataclass(getattr(trainer_optimizer, "OptimizerContext", None)) else set()
        if not {"args", "model"} <= ctx_fields:
            problems.append("trainer_optimizer.OptimizerContext no longer carries args and model")
    sched = enum_class(trainer_utils, "SchedulerType")
    functions = getattr(optimization, "TYPE_TO_SCHEDULER_FUNCTION", None)
    if not isinstance(functions, dict):
        problems.append("transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION (the schedule table) is gone")
    else:
        get_scheduler = getattr(optimization, "get_scheduler", None)
        if get_scheduler is None or get_scheduler.__globals__.get("TYPE_TO_SCHEDULER_FUNCTION") is not functions:
            problems.append("optimization.get_scheduler no longer reads TYPE_TO_SCHEDULER_FUNCTION")
        elif get_scheduler.__globals__.get("SchedulerType") is not sched:
            problems.append("optimization.get_scheduler no longer uses trainer_utils.SchedulerType")
    if getattr(training_args, "SchedulerType", None) is not sched:
        problems.append("training_args.SchedulerType is not trainer_utils.SchedulerType")
    Trainer = getattr(trainer, "Trainer", None)
    for method in ("create_optimizer", "training_step", "_save_checkpoint", "save_model", "get_optimizer_cls_and_kwargs"):
        if not callable(getattr(Trainer, method, None)):
            problems.append(f"Trainer.{method} is gone")
    if problems:
        raise RuntimeError(
            f"optim_plugins.integrations.hf cannot extend transformers {version} (tested on {TESTED_TRANSFORMERS}): "
            + "; ".join(problems)
            + ". Nothing was changed. Until optim_plugins supports this version, pass "
            "Trainer(optimizer_cls_and_kwargs=...) or optimizers=(op.create_optimizer(...), op.create_scheduler(...))."
        )
    return _Surface(version, names, handlers, sched, functions, Trainer, training_args.TrainingArguments)


def _add_member(enum_cls: type, name: str, value: str) -> Any:
    """Add ``name = value`` to a str Enum as the class statement would (aenum's ``extend_enum``)."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Unpickling in a process that has not called install() yet installs first (see _restore).
    member.__reduce_ex__ = types.MethodType(_reduce_member, member)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(name, member)
    else:
        setattr(enum_cls, name, member)  # before _member_map_: EnumType refuses to reassign members
        enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    if enum_cls(value) is not member or enum_cls[name] is not member or member not in list(enum_cls):
        raise RuntimeError(f"optim_plugins.integrations.hf: adding {name}={value!r} to {enum_cls.__name__} did not work "
                           "(Python's enum internals changed)")
    return member


def _remove_member(enum_cls: type, name: str) -> None:
    member = enum_cls._member_map_.pop(name, None)
    if member is None:
        return
    enum_cls._member_names_.remove(name)
    enum_cls._value2member_map_.pop(member._value_, None)
    if name in enum_cls.__dict__:
        type.__delattr__(enum_cls, name)


def _reduce_member(member: Any, protocol: int) -> tuple:
    return _restore, (member.__objclass__.__module__, member.__objclass__.__qualname__, member._value_)


def _restore(module: str, qualname: str, value: str) -> Any:
    """Unpickle one of our enum members: install() first where this process has not yet."""
    import importlib

    enum_cls = getattr(importlib.import_module(module), qualname)
    if value not in enum_cls._value2member_map_:
        install()
    return enum_cls(value)


# ============================================================================ names

@dataclass
class _State:
    override: bool = False
    optim_members: dict[str, str] = field(default_factory=dict)   # value -> member name we added
    sched_members: dict[str, str] = field(default_factory=dict)
    replaced_handlers: dict[Any, Any] = field(default_factory=dict)   # HF member -> HF's handler
    replaced_functions: dict[Any, Any] = field(default_factory=dict)


_STATE: _State | None = None


def _member_name(enum_cls: type, value: str) -> str:
    name = value.upper()
    while name in enum_cls._member_map_ or name in enum_cls.__dict__:
        name = "OPTIM_PLUGINS_" + name
    return name


def _names_with_aliases(specs: list[Any]) -> list[str]:
    return [n for spec in specs for n in (spec.name, *spec.aliases)]


def hf_owned_names() -> tuple[set[str], set[str]]:
    """(optimizer names, schedule names) transformers itself defines (what install() added left out)."""
    surface = check_surface()
    state = _STATE or _State()
    optim = {m.value for m in surface.OptimizerNames} - set(state.optim_members)
    sched = {m.value for m in surface.SchedulerType} - set(state.sched_members)
    return optim, sched


def install(override: bool = False) -> None:
    """Make every registered optimizer/schedule name usable in ``TrainingArguments`` and ``HfArgumentParser``.

    Idempotent; call it again after registering more names at run time. Must run before an
    ``HfArgumentParser`` is created (it reads the choices then) — :func:`make_parser` does both.
    ``override=True``: a bare name transformers owns (``adafactor``, ``sgd``, ``cosine``...) means ours
    too; ``install(override=False)`` afterwards gives those names back to transformers.
    Raises ``RuntimeError`` (changing nothing) when transformers' private surface is not the tested one.
    """
    global _STATE
    surface = check_surface()
    if _STATE is not None and _STATE.override != bool(override):
        uninstall()
    state = _STATE or _State(override=bool(override))
    hf_optim = {m.value for m in surface.OptimizerNames} - set(state.optim_members)
    hf_sched = {m.value for m in surface.SchedulerType} - set(state.sched_members)

    optim_names = _names_with_aliases([get_optimizer_spec(n) for n in list_optimizers()])
    sched_names = _names_with_aliases([get_scheduler_spec(n) for n in list_schedulers()])
    # names unregistered since the last install(): take them out again
    for enum_cls, table, added, wanted in (
        (surface.OptimizerNames, surface.handlers, state.optim_members, {v for n in optim_names for v in (PREFIX + n, n)}),
        (surface.SchedulerType, surface.schedule_functions, state.sched_members, {v for n in sched_names for v in (PREFIX + n, n)}),
    ):
        for value in [v for v in added if v not in wanted]:
            table.pop(enum_cls._member_map_.get(added[value]), None)
            _remove_member(enum_cls, added.pop(value))
    for name in optim_names:
        for value in (PREFIX + name, name):
            if value in hf_optim:
                if override and value == name:
                    member = surface.OptimizerNames(value)
                    if surface.handlers.get(member) is not _optimizer_handler:
                        state.replaced_handlers.setdefault(member, surface.handlers.get(member))
                        surface.handlers[member] = _optimizer_handler
                continue
            if value not in state.optim_members:
                member = _add_member(surface.OptimizerNames, _member_name(surface.OptimizerNames, value), value)
                state.optim_members[value] = member._name_
                surface.handlers[member] = _optimizer_handler
    for name in sched_names:
        for value in (PREFIX + name, name):
            if value in hf_sched:
                if override and value == name:
                    member = surface.SchedulerType(value)
                    if not getattr(surface.schedule_functions.get(member), "_optim_plugins", False):
                        state.replaced_functions.setdefault(member, surface.schedule_functions.get(member))
                        surface.schedule_functions[member] = _schedule_function(value)
                continue
            if value not in state.sched_members:
                member = _add_member(surface.SchedulerType, _member_name(surface.SchedulerType, value), value)
                state.sched_members[value] = member._name_
                surface.schedule_functions[member] = _schedule_function(value)
    _STATE = state


def uninstall() -> None:
    """Undo :func:`install`: transformers' enums and tables as they were (mainly for tests)."""
    global _STATE
    if _STATE is None:
        return
    surface = check_surface()
    for member, handler in _STATE.replaced_handlers.items():
        surface.handlers[member] = handler
    for member, function in _STATE.replaced_functions.items():
        surface.schedule_functions[member] = function
    for enum_cls, table, added in ((surface.OptimizerNames, surface.handlers, _STATE.optim_members),
                                   (surface.SchedulerType, surface.schedule_functions, _STATE.sched_members)):
        for value, name in added.items():
            member = enum_cls._member_map_.get(name)
            if member is not None:
                table.pop(member, None)
            _remove_member(enum_cls, name)
    _STATE = None


def installed() -> dict[str, Any] | None:
    """``None`` before :func:`install`; else ``{"override": bool, "optimizers": [...], "schedulers": [...]}``
    (the names added to transformers' enums)."""
    if _STATE is None:
        return None
    return {"override": _STATE.override, "optimizers": sorted(_STATE.optim_members), "schedulers": sorted(_STATE.sched_members)}


def _ours(value: Any, kind: str) -> str:
    """Our registry name for a TrainingArguments value: ``op_x`` -> ``x``; a bare name is ours only when
    install() added it, or with override=True."""
    value = str(getattr(value, "value", value))
    if value.startswith(PREFIX):
        return value[len(PREFIX):]
    state = _STATE
    added = {} if state is None else state.optim_members if kind == "optimizer" else state.sched_members
    if state is None or not (value in added or state.override):
        raise ValueError(f"{kind} name {value!r} belongs to transformers; use {PREFIX + value!r} for optim_plugins' one")
    return value


# ============================================================================ optimizers

_ACTIVE_TRAINER: contextvars.ContextVar[Any] = contextvars.ContextVar("optim_plugins_hf_trainer", default=None)


@dataclass
class OptimPluginsArguments:
    """Extra command-line arguments for ``HfArgumentParser((TrainingArguments, OptimPluginsArguments))``;
    pass the parsed object as ``OptimPluginsTrainer(..., optim_plugins_args=...)``."""

    layer_decay: float | None = field(default=None, metadata={"help": "layer-wise lr decay: lr * d ** (N - depth)"})
    decay_embeddings: bool = field(default=True, metadata={"help": "apply weight decay to embeddings"})
    no_decay: list[str] = field(default_factory=list, metadata={"help": "extra regexes of parameter names without weight decay"})
    hessian_interval: int | None = field(
        default=None, metadata={"help": "optimizer steps between Hessian updates (needs_model optimizers such as Sophia); default 10"})
    shard_optimizer_state: bool = field(
        default=False, metadata={"help": "ZeRO-1: shard the optimizer state across the data-parallel processes "
                                         "(optim_plugins.distributed.ShardedOptimizer; checkpoints hold one shard file per rank)"})

    def group_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.layer_decay is not None:
            options["layer_decay"] = self.layer_decay
        if not self.decay_embeddings:
            options["decay_embeddings"] = False
        if self.no_decay:
            options["no_decay"] = list(self.no_decay)
        return options


def optimizer_config(args: Any, extra: OptimPluginsArguments | None = None) -> OptimizerConfig:
    """The :class:`~optim_plugins.OptimizerConfig` a ``TrainingArguments`` asks for (``optim`` must be
    one of ours: ``op_...``, or a bare name installed as ours)."""
    name = _ours(args.optim, "optimizer")
    try:
        spec = get_optimizer_spec(name)
    except ValueError as exc:
        raise ValueError(f"TrainingArguments.optim: {exc}") from None
    raw = args.optim_args
    items = split_options(raw) if isinstance(raw, str) else dict(raw or {})
    group = {key: items.pop(key) for key in list(items) if key in GROUP_KEYS}
    for key in list(group):
        try:
            group[key] = GROUP_KEYS[key].parse(group[key])
        except ValueError as exc:
            raise ValueError(f"optim_args.{key}: {exc}") from None
    extra_group = extra.group_options() if extra is not None else {}
    both = set(group) & set(extra_group)
    if both:
        raise ValueError(f"{', '.join(sorted(both))} given both in optim_args and in OptimPluginsArguments")
    weight_decay, lr = args.weight_decay, args.learning_rate
    if "weight_decay" not in spec.options and not weight_decay:
        weight_decay = None  # the Trainer's default 0.0 for an optimizer without weight decay
    # lr / weight_decay inside optim_args win over learning_rate / weight_decay, as betas do
    if "weight_decay" in items:
        weight_decay = items.pop("weight_decay")
    if "lr" in items:
        lr = items.pop("lr")
    view = types.SimpleNamespace(
        optim=PREFIX + spec.name, learning_rate=lr, weight_decay=weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
        optim_args=items, max_grad_norm=args.max_grad_norm,
    )
    if "lr" not in spec.options:
        view.learning_rate = None
    config = OptimizerConfig.from_training_args(view)
    group_options = {**extra_group, **group}
    return dataclasses.replace(config, **group_options) if group_options else config


def _capabilities(optimizer: Any) -> Capabilities:
    caps = getattr(type(optimizer), "capabilities", None)
    if isinstance(caps, Capabilities):
        return caps
    for name in list_optimizers():
        spec = get_optimizer_spec(name)
        if spec.factory is type(optimizer):
            return spec.capabilities
    return Capabilities()


def _needs_create_graph(optimizer_or_class: Any) -> bool:
    """Whether the optimizer differentiates through the gradients (SophiaH's Hutchinson estimate):
    a ``needs_create_graph`` capability field or class attribute."""
    cls = optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)
    caps = getattr(cls, "capabilities", None)
    return bool(getattr(caps, "needs_create_graph", False) or getattr(cls, "needs_create_graph", False))


def _needs_hessian_pass(caps: Capabilities, optimizer_or_factory: Any) -> bool:
    """needs_model optimizers with a periodic ``update_hessian`` (Sophia); Eva/GaLore only need the model at build time."""
    return caps.needs_model and callable(getattr(optimizer_or_factory, "update_hessian", None))


def _needs_mixin(caps: Capabilities, factory: Any = None) -> list[str]:
    flags = [flag for flag in ("needs_closure", "train_eval") if getattr(caps, flag)]
    flags += ["needs_model"] if _needs_hessian_pass(caps, factory) else []
    return flags + (["needs_create_graph"] if factory is not None and _needs_create_graph(factory) else [])


def _optimizer_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """transformers optimizer handler for every name install() gives us."""
    trainer = _ACTIVE_TRAINER.get()
    config = optimizer_config(ctx.args, getattr(trainer, "optim_plugins_args", None))
    spec = get_optimizer_spec(config.name)
    flags = _needs_mixin(spec.capabilities, spec.factory)
    if flags and trainer is None:
        raise RuntimeError(
            f"optimizer {spec.name!r} ({', '.join(flags)}) needs more than optimizer.step() from the Trainer: "
            "use optim_plugins.integrations.hf.OptimPluginsTrainer (or add OptimPluginsTrainerMixin "
            "in front of your Trainer subclass) instead of transformers.Trainer"
        )
    kwargs = dict(config.options)
    if config.lr is not None:
        kwargs["lr"] = config.lr
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    model = ctx.model
    is_class = isinstance(spec.factory, type) and issubclass(spec.factory, torch.optim.Optimizer)
    if model is None:
        if config.group_options():
            raise ValueError(f"{', '.join(config.group_options())} need the model")
        return spec.factory, kwargs
    if not is_class:  # a plugin's factory function: transformers calls factory()(model, **kwargs)
        from .. import create_optimizer

        return (lambda: (lambda model, **kw: create_optimizer(config, model, **kw))), {}
    model_groups = getattr(spec.factory, "model_param_groups", None)
    if model_groups is not None:  # the optimizer chooses its tensors from the model (Muon, GaLore, APOLLO, Eva)
        groups, kwargs = model_groups(model, kwargs, **config.group_options())
        # a factory, not (class, kwargs): the Trainer would take a "model" kwarg as the params (its LOMO rule)
        return (lambda: (lambda _model, **_: spec.factory(groups, **kwargs))), {}
    groups = param_groups(model, weight_decay=config.weight_decay, lr=config.lr, optimizer=spec.name, **config.group_options())
    return spec.factory, {"params": groups, **kwargs}


# ============================================================================ schedules


def scheduler_config(name: str, num_warmup_steps: int | None = None, num_training_steps: int | None = None,
                     **options: Any) -> SchedulerConfig:
    """The :class:`~optim_plugins.SchedulerConfig` for ``lr_scheduler_type=name`` (``op_`` prefix allowed)."""
    try:
        return SchedulerConfig(name=_ours(name, "scheduler"), num_training_steps=num_training_steps,
                               num_warmup_steps=num_warmup_steps or 0, options=options)
    except ValueError as exc:
        raise ValueError(f"lr_scheduler_type={name!r} / lr_scheduler_kwargs: {exc}") from None


def _schedule_function(value: str) -> Callable[..., Any]:
    def schedule(optimizer, num_warmup_steps=None, num_training_steps=None, **options):
        from .. import create_scheduler

        return create_scheduler(scheduler_config(value, num_warmup_steps, num_training_steps, **options), optimizer)

    schedule._optim_plugins = True
    schedule.__name__ = f"optim_plugins_{value}"
    return schedule


# ============================================================================ parser


def make_parser(*dataclass_types: Any, override: bool = False, **kwargs: Any) -> Any:
    """``install(override)`` then ``HfArgumentParser(dataclass_types)``; default types
    ``(TrainingArguments, OptimPluginsArguments)``. Use it in scripts instead of creating the parser
    yourself, so that ``--optim`` / ``--lr_scheduler_type`` list our names."""
    install(override=override)
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser(dataclass_types or (TrainingArguments, OptimPluginsArguments), **kwargs)


# ============================================================================ Trainer mixin


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's / our wrappers."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _sharded(optimizer: Any) -> Any:
    """The ShardedOptimizer under accelerate's wrapper, or None."""
    from ..distributed import ShardedOptimizer

    inner = _unwrap(optimizer)
    return inner if isinstance(inner, ShardedOptimizer) else None


class OptimPluginsTrainerMixin:
    """Put in front of ``transformers.Trainer`` (or a subclass) to run every optimizer here:

    - ``needs_closure`` (SAM, ASAM, SophiaH): ``optimizer.step()`` gets a closure that zeroes the
      gradients and re-runs forward/backward over the micro-batches of the current accumulation
      window (through ``training_step``, so loss scaling is the Trainer's), then clips them like
      the Trainer does (``max_grad_norm``);
    - ``needs_model`` (SophiaG): when due (``optimizer.hessian_due()``, or every ``hessian_interval``
      steps from ``OptimPluginsArguments`` / the optimizer's ``hessian_interval``/``update_period``,
      default 10), after the step: ``optimizer.update_hessian(logits_fn=...)`` with the logits of
      the window's micro-batches (:meth:`hessian_logits`); an ``update_hessian()`` without
      arguments gets ``.grad`` from a backward of the sampled-label cross-entropy instead;
    - ``needs_create_graph`` (a ``Capabilities`` field or class attribute; SophiaH's Hutchinson
      estimate): the Trainer's backward runs with ``create_graph=True`` (no gradient clipping then);
    - ``train_eval`` (schedule-free): the Trainer already calls ``optimizer.train()`` before each
      training step and ``optimizer.eval()`` before evaluation; this adds ``eval()`` around every
      checkpoint (model and optimizer saved in eval mode, ``train()`` again afterwards), before
      ``save_model`` and at the end of ``train()``. ``train()``/``eval()`` must be idempotent.
    - sharded optimizer state (``OptimPluginsArguments(shard_optimizer_state=True)``, or a
      :class:`~optim_plugins.distributed.ShardedOptimizer` passed in ``optimizers=``): the Trainer
      saves ``optimizer.state_dict()`` on the main process alone, which for a sharded optimizer is
      rank 0's shard. Here every rank writes its own shard file
      (``optimizer.rankRRRRR-of-WWWWW.pt``, no communication, so no rank can wait on another) next to
      ``optimizer.pt`` (rank 0's shard, for tools that look for it), and ``resume_from_checkpoint``
      loads the complete set of shards on every rank, resharding when the number of processes changed.

    Takes ``optim_plugins_args=OptimPluginsArguments(...)`` (layer decay, no-decay rules, Hessian interval).
    """

    def __init__(self, *args: Any, optim_plugins_args: OptimPluginsArguments | None = None, **kwargs: Any):
        self.optim_plugins_args = optim_plugins_args or OptimPluginsArguments()
        self._op_window: list[tuple[Any, dict, Any]] = []
        self._op_caps = Capabilities()
        self._op_in_pass = False
        self._op_create_graph = False
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ creation
    def create_optimizer(self, model: Any = None) -> Any:
        token = _ACTIVE_TRAINER.set(self)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            _ACTIVE_TRAINER.reset(token)
        if self.optim_plugins_args.shard_optimizer_state and _sharded(optimizer) is None:
            from ..distributed import ShardedOptimizer

            optimizer = self.optimizer = ShardedOptimizer.wrap(_unwrap(optimizer))
        self._op_prepare(_unwrap(optimizer))
        return optimizer

    def _op_prepare(self, optimizer: Any) -> None:
        caps = _capabilities(optimizer)
        if caps.needs_model and not _needs_hessian_pass(caps, optimizer):
            caps = dataclasses.replace(caps, needs_model=False)  # nothing to do per step (Eva, GaLore)
        self._op_caps = caps
        self._op_create_graph = _needs_create_graph(optimizer)
        if self._op_create_graph and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise ValueError(f"{type(optimizer).__name__} differentiates through the gradients "
                             "(backward with create_graph=True), which gradient clipping would change in place: "
                             "set max_grad_norm=0")
        if not (caps.needs_closure or caps.needs_model) or getattr(optimizer, "_optim_plugins_hf_step", False):
            return
        trainer_ref = weakref.ref(self)
        original = optimizer.step  # bound; class-level hooks (profiler, step hooks) still run

        def step(opt: Any, closure: Callable | None = None, **kwargs: Any) -> Any:
            trainer = trainer_ref()
            if trainer is None:
                return original(closure, **kwargs)
            try:
                if closure is None and caps.needs_closure:
                    closure = trainer._op_closure()
                loss = original(closure, **kwargs) if closure is not None else original(**kwargs)
                if caps.needs_model:
                    trainer._op_maybe_update_hessian(opt)
                return loss
            finally:
                trainer._op_window.clear()

        # a bound method, so that torch's LRScheduler can wrap it (it reads step.__func__)
        optimizer.step = types.MethodType(step, optimizer)
        optimizer._optim_plugins_hf_step = True

    # ------------------------------------------------------------------ steps
    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        if (self._op_caps.needs_closure or self._op_caps.needs_model) and not self._op_in_pass:
            self._op_window.append((model, dict(inputs), num_items_in_batch))
        if not self._op_create_graph:
            return super().training_step(model, inputs, num_items_in_batch)
        backward = self.accelerator.backward
        self.accelerator.backward = lambda loss, **kwargs: backward(loss, create_graph=True, **kwargs)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del self.accelerator.backward

    def _op_check_scaler(self, what: str) -> None:
        if getattr(getattr(self, "accelerator", None), "scaler", None) is not None:
            raise RuntimeError(f"{what} re-runs backward inside optimizer.step(), which fp16 loss scaling "
                               "(GradScaler) does not support: use bf16=True or fp32")

    def _op_closure(self) -> Callable[[], torch.Tensor]:
        window = list(self._op_window)
        if not window:
            raise RuntimeError("optimizer.step() needs a closure but no training_step ran in this accumulation window")
        self._op_check_scaler("a closure-based optimizer (needs_closure)")
        base = super(OptimPluginsTrainerMixin, self)

        def closure() -> torch.Tensor:
            model = window[0][0]
            model.zero_grad(set_to_none=True)
            total = None
            self._op_in_pass = True
            try:
                for model, inputs, num_items in window:
                    loss = base.training_step(model, inputs, num_items)
                    total = loss if total is None else total + loss
            finally:
                self._op_in_pass = False
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.args.max_grad_norm)
            return total

        return closure

    def hessian_logits(self, model: Any, inputs: dict) -> torch.Tensor:
        """Logits ``(positions, classes)`` whose sampled-label cross-entropy feeds ``update_hessian``
        (Sophia's Gauss-Newton-Bartlett estimate); positions whose label is -100 are left out.
        Override for models without ``logits``."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        labels = inputs.get("labels")
        if labels is not None and labels.shape == logits.shape[:-1]:
            return logits[labels != -100]
        return logits.reshape(-1, logits.shape[-1])

    def _op_hessian_due(self, optimizer: Any) -> bool:
        interval = self.optim_plugins_args.hessian_interval
        if not interval:
            due = getattr(optimizer, "hessian_due", None)
            if callable(due):
                return bool(due())
            interval = next((v for k in ("hessian_interval", "update_period") if isinstance(v := optimizer.defaults.get(k), int)
                             and not isinstance(v, bool) and v > 0), 10)
        return self.state.global_step % interval == interval - 1

    def _op_maybe_update_hessian(self, optimizer: Any) -> None:
        update = getattr(optimizer, "update_hessian", None)
        if not callable(update):
            raise RuntimeError(f"{type(optimizer).__name__} is flagged needs_model but has no update_hessian()")
        window = list(self._op_window)
        if not window or not self._op_hessian_due(optimizer):
            return
        self._op_check_scaler("update_hessian")

        def logits_fn() -> torch.Tensor:
            for model, _, _ in window:
                model.train()
            return torch.cat([self.hessian_logits(model, inputs).float() for model, inputs, _ in window])

        parameters = inspect.signature(update).parameters
        if "logits_fn" in parameters:  # optim_plugins' SophiaG: samples labels and differentiates itself
            update(logits_fn=logits_fn)
            return
        model = window[0][0]
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = logits_fn()
            sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
            self.accelerator.backward(torch.nn.functional.cross_entropy(logits, sampled))
        update()  # sophia-opt style: the estimate is read from .grad
        model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ train/eval modes
    def _op_mode(self, mode: str) -> None:
        if self._op_caps.train_eval and self.optimizer is not None:
            getattr(_unwrap(self.optimizer), mode)()

    # ------------------------------------------------------------------ sharded optimizer state
    def _op_sharded(self) -> Any:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        return _sharded(self.optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # main process: optimizer.pt (rank 0's shard), scheduler
        sharded = self._op_sharded()
        if sharded is None:
            return
        from transformers.trainer import OPTIMIZER_NAME

        from ..distributed import save_sharded, shard_file_name

        saved = os.path.join(output_dir, OPTIMIZER_NAME)
        if self.args.should_save and sharded.rank == 0 and os.path.isfile(saved):
            try:  # rank 0's shard is what optimizer.pt holds: link it rather than write it twice
                os.link(saved, os.path.join(output_dir, shard_file_name(0, sharded.world_size)))
                return
            except OSError:
                pass
        save_sharded(sharded, output_dir)  # every rank, no communication

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        sharded = self._op_sharded()
        if checkpoint is None or sharded is None or not glob.glob(os.path.join(checkpoint, "optimizer.rank*-of-*.pt")):
            # no shard files (a checkpoint of an unsharded run): its optimizer.pt loads and reshards
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        sharded.load_state_dict(checkpoint)  # the directory: a complete set of shards, or ValueError
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._op_mode("eval")
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._op_mode("train")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:
            self._op_mode("eval")
        return super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self._op_mode("eval")


def __getattr__(name: str) -> Any:
    if name == "OptimPluginsTrainer":
        from transformers import Trainer

        cls = type("OptimPluginsTrainer", (OptimPluginsTrainerMixin, Trainer), {
            "__module__": __name__,
            "__doc__": "``transformers.Trainer`` with :class:`OptimPluginsTrainerMixin`: runs every optim_plugins optimizer.",
        })
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_env = os.environ.get(INSTALL_ENV, "").strip().lower()
if _env in ("1", "true", "yes", "on", "override"):
    install(override=_env == "override")
