"""The name registry: optimizer and scheduler specs, found through entry points.

Built-ins and third-party plugins take the same path: a distribution declares
``[project.entry-points."optim_plugins.optimizers"] myopt = "pkg.mod:MyOptimizer"``
(or ``optim_plugins.schedulers``). The object an entry point names is a
``torch.optim.Optimizer`` subclass / scheduler callable, or a ready
:class:`OptimizerSpec` / :class:`SchedulerSpec`. Names are looked up
case-insensitively with ``-`` == ``_``.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import re
import types
import typing
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Callable, Literal, Mapping

OPTIMIZER_GROUP = "optim_plugins.optimizers"
SCHEDULER_GROUP = "optim_plugins.schedulers"
DISTRIBUTION = "optim-plugins"


def normalize_name(name: str) -> str:
    """Registry key of ``name``: lower case, ``-`` and spaces become ``_``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"optimizer/scheduler name must be a non-empty string, got {name!r}")
    return re.sub(r"[-\s]+", "_", name.strip().lower())


# ----------------------------------------------------------------------------- options

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One constructor option of an optimizer or scheduler: name, default, type, doc."""

    name: str
    default: Any = inspect.Parameter.empty
    annotation: Any = Any
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def parse(self, value: Any) -> Any:
        """Coerce ``value`` (often a string from a CLI or ``optim_args``) to this option's type.

        Raises ``ValueError`` naming the option and the value when it does not fit.
        """
        try:
            return _coerce(value, self.annotation)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {self.name!r}: cannot use value {value!r} ({exc})") from None


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return _literal(value) if isinstance(value, str) else value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"expected one of {args}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice).lower() == value.strip().lower()):
                return choice
        raise ValueError(f"expected one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _literal(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"expected a {origin.__name__}, got a number")
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(items)}")
            return tuple(_coerce(v, a) for v, a in zip(items, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a bool")
        if isinstance(value, str):
            value = _literal(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a bool")
        if isinstance(value, str):
            value = _literal(value)
        if not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    return value


def _literal(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in _TRUE - {"1"}:
        return True
    if lowered in _FALSE - {"0"}:
        return False
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _arg_docs(doc: str | None) -> dict[str, str]:
    """``{name: text}`` from a Google-style ``Args:`` section."""
    docs: dict[str, str] = {}
    if not doc:
        return docs
    lines = inspect.cleandoc(doc).splitlines()
    in_args, indent, current = False, None, None
    for line in lines:
        if line.strip() in ("Args:", "Arguments:", "Options:"):
            in_args, indent, current = True, None, None
            continue
        if not in_args:
            continue
        if not line.strip():
            current = None
            continue
        this_indent = len(line) - len(line.lstrip())
        if this_indent == 0:
            in_args = False
            continue
        match = re.match(r"\s*(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)", line)
        if match and (indent is None or this_indent == indent):
            indent = this_indent
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] = (docs[current] + " " + line.strip()).strip()
    return docs


def options_of(factory: Callable, skip: int = 1, extra_docs: Mapping[str, str] | None = None) -> dict[str, Option]:
    """The option schema of ``factory`` read from its signature and ``Args:`` docs.

    ``skip`` leading positional parameters (``params`` of an optimizer, ``optimizer``
    of a scheduler) are not options.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations in a third-party plugin: fall back to Any
        hints = {}
    docs = {}
    for klass in reversed(inspect.getmro(factory)) if inspect.isclass(factory) else [factory]:
        docs.update(_arg_docs(klass.__doc__))
    docs.update(extra_docs or {})
    parameters = [p for p in signature.parameters.values() if p.name != "self"]
    options = {}
    for param in parameters[skip:]:
        if param.kind == inspect.Parameter.VAR_KEYWORD:
            # **options of a class built on optimizers.base.Optimizer: the options every optimizer takes
            options.update(getattr(factory, "common_options", {}))
        elif param.kind != inspect.Parameter.VAR_POSITIONAL:
            options[param.name] = Option(param.name, param.default, hints.get(param.name, Any), docs.get(param.name, ""))
    return options


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Capabilities:
    """What the machinery around an optimizer needs to know about it.

    ``shardable``: ``"elements"`` (elementwise math, any split works), ``"tensors"``
    (whole-tensor math: factored, trust-ratio, orthogonalised updates) or ``"no"``.
    ``needs_create_graph``: the closure's backward must keep the graph (Hutchinson
    Hessian estimates: ``loss.backward(create_graph=True)``).
    """

    elementwise: bool = False
    needs_closure: bool = False
    needs_create_graph: bool = False
    needs_model: bool = False
    train_eval: bool = False
    amp_aware: bool = False
    shardable: Literal["elements", "tensors", "no"] = "tensors"


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: Callable[..., Any]
    summary: str = ""
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Option] = field(default_factory=dict)
    capabilities: Capabilities = Capabilities()
    source: str = ""

    @classmethod
    def from_class(cls, name: str, factory: Callable[..., Any], source: str = "") -> OptimizerSpec:
        return cls(**_described(name, factory, source), capabilities=getattr(factory, "capabilities", Capabilities()))

    @property
    def default_weight_decay(self) -> float | None:
        option = self.options.get("weight_decay")
        return None if option is None or option.required else option.default


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    factory: Callable[..., Any]
    summary: str = ""
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Option] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_class(cls, name: str, factory: Callable[..., Any], source: str = "") -> SchedulerSpec:
        return cls(**_described(name, factory, source))


def _described(name: str, factory: Callable[..., Any], source: str) -> dict[str, Any]:
    """The spec fields read off a class or factory: summary, aliases and option schema."""
    doc = inspect.getdoc(factory) or ""
    return dict(
        name=normalize_name(name),
        factory=factory,
        summary=doc.splitlines()[0] if doc else "",
        aliases=tuple(normalize_name(a) for a in getattr(factory, "aliases", ())),
        options=options_of(factory),
        source=source,
    )


class _Registry:
    """Specs of one kind, loaded from one entry-point group on first use."""

    def __init__(self, kind: str, group: str, spec_type: type):
        self.kind, self.group, self.spec_type = kind, group, spec_type
        self._specs: dict[str, Any] | None = None
        self._aliases: dict[str, str] = {}

    def _load(self) -> dict[str, Any]:
        if self._specs is not None:
            return self._specs
        self._specs, self._aliases = {}, {}
        entry_points = list(metadata.entry_points(group=self.group))
        own = [ep for ep in entry_points if ep.dist is not None and ep.dist.name == DISTRIBUTION]
        if not own:
            self._specs = None
            raise RuntimeError(
                f"no built-in {self.kind}s found in the entry-point group {self.group!r}: "
                "optim_plugins must be installed (pip install -e .) so that its entry points exist"
            )
        # Built-ins first: a plugin cannot silently replace a built-in name.
        for ep in own + [ep for ep in entry_points if ep not in own]:
            is_builtin = ep in own
            source = f"{ep.dist.name if ep.dist else '?'}:{ep.value}"
            try:
                spec = self._spec_from(ep.name, ep.load(), source)
            except Exception as exc:
                if is_builtin:
                    raise
                warnings.warn(f"optim_plugins: skipping {self.kind} plugin {ep.name!r} ({source}): {exc}", RuntimeWarning)
                continue
            try:
                self._add(spec)
            except ValueError as exc:
                if is_builtin:
                    raise
                warnings.warn(f"optim_plugins: skipping {self.kind} plugin {ep.name!r}: {exc}", RuntimeWarning)
        return self._specs

    def _spec_from(self, name: str, obj: Any, source: str) -> Any:
        if isinstance(obj, self.spec_type):
            return replace(obj, source=obj.source or source)
        if callable(obj):
            return self.spec_type.from_class(name, obj, source)
        raise TypeError(f"entry point {name!r} names {obj!r}, not a {self.spec_type.__name__} or a callable")

    def _add(self, spec: Any) -> None:
        specs = self._specs
        for key in (spec.name, *spec.aliases):
            if key in specs or key in self._aliases:
                raise ValueError(f"{self.kind} name {key!r} is already registered")
        specs[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.name

    def register(self, spec: Any) -> Any:
        self._load()
        self._add(spec)
        return spec

    def unregister(self, name: str) -> None:
        spec = self.get(name)
        del self._specs[spec.name]
        for alias in spec.aliases:
            self._aliases.pop(alias, None)

    def names(self) -> list[str]:
        return sorted(self._load())

    def get(self, name: str) -> Any:
        specs = self._load()
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        if key in specs:
            return specs[key]
        close = difflib.get_close_matches(key, list(specs) + list(self._aliases), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}{hint} (optim_plugins.list_{self.kind}s() lists all)")


OPTIMIZERS = _Registry("optimizer", OPTIMIZER_GROUP, OptimizerSpec)
SCHEDULERS = _Registry("scheduler", SCHEDULER_GROUP, SchedulerSpec)


def list_optimizers() -> list[str]:
    """Sorted registry names of every optimizer (built-in and plugins)."""
    return OPTIMIZERS.names()


def list_schedulers() -> list[str]:
    """Sorted registry names of every learning-rate schedule."""
    return SCHEDULERS.names()


def get_optimizer_spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get(name)


def get_scheduler_spec(name: str) -> SchedulerSpec:
    return SCHEDULERS.get(name)


def register_optimizer(factory: Callable[..., Any] | OptimizerSpec, name: str | None = None) -> OptimizerSpec:
    """Register an optimizer class (or spec) at run time, as an entry point would."""
    spec = factory if isinstance(factory, OptimizerSpec) else OptimizerSpec.from_class(name or factory.__name__, factory, "runtime")
    return OPTIMIZERS.register(spec)


def register_scheduler(factory: Callable[..., Any] | SchedulerSpec, name: str | None = None) -> SchedulerSpec:
    """Register a schedule class or factory (or spec) at run time."""
    spec = factory if isinstance(factory, SchedulerSpec) else SchedulerSpec.from_class(name or factory.__name__, factory, "runtime")
    return SCHEDULERS.register(spec)


def check_options(spec: OptimizerSpec | SchedulerSpec, options: Mapping[str, Any], kind: str) -> None:
    """Raise ``ValueError`` naming every option ``spec`` does not take, with close matches."""
    for key in options:
        if key not in spec.options:
            close = difflib.get_close_matches(key, list(spec.options), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"{kind} {spec.name!r} has no option {key!r} (value {options[key]!r}){hint}; "
                f"its options are: {', '.join(spec.options)}"
            )


def describe(name: str) -> str:
    """A readable table of an optimizer's (or, failing that, a scheduler's) options and defaults."""
    try:
        spec: Any = get_optimizer_spec(name)
        kind = "optimizer"
    except ValueError as not_an_optimizer:
        try:
            spec = get_scheduler_spec(name)
            kind = "scheduler"
        except ValueError as not_a_scheduler:
            raise ValueError(f"{not_an_optimizer}; {not_a_scheduler}") from None
    lines = [f"{spec.name} ({kind}): {spec.summary}", f"  class: {spec.factory.__module__}.{spec.factory.__qualname__}"]
    if spec.aliases:
        lines.append(f"  aliases: {', '.join(spec.aliases)}")
    caps = getattr(spec, "capabilities", None)
    if caps is not None:
        flags = [f.name for f in caps.__dataclass_fields__.values() if getattr(caps, f.name) is True]
        lines.append(f"  capabilities: {', '.join(flags) or '-'}; shardable by {caps.shardable}")
    lines.append("  options:")
    width = max((len(o) for o in spec.options), default=0)
    for option in spec.options.values():
        default = "(required)" if option.required else repr(option.default)
        lines.append(f"    {option.name:<{width}}  = {default:<12}  {option.doc}")
    return "\n".join(lines)
