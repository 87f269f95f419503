"""Parameter groups built for the user: where weight decay applies and which lr each tensor gets.

    groups = op.param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.8,
                             overrides=[(r"lm_head", {"lr_scale": 10.0})], optimizer="adamw")
    op.describe_param_groups(groups)
    opt = op.create_optimizer("adamw", groups, lr=1e-3)

Rules, in the order they apply to each trainable tensor:

1. **No decay** on biases, on every weight of a normalization module (found by type:
   LayerNorm, RMSNorm of any model family, BatchNorm, GroupNorm, or any class whose name ends
   in ``Norm``), on 0/1-dim tensors, on names that transformers' Trainer exempts
   (``bias``, ``layernorm``, ``rmsnorm``, ``norm``, ``_norm`` in the name), and optionally on
   embeddings (``decay_embeddings=False``). The result contains transformers'
   ``Trainer.get_decay_parameter_names`` exemptions; it adds the 0/1-dim and norm-by-type ones.
2. **Layer-wise lr decay** (``layer_decay=d``): every tensor gets a depth ``0..N``; its lr is
   ``lr * d ** (N - depth)``. See :func:`layer_depths` for how depths are found.
3. **Overrides**: ``(regex, options)`` pairs, searched in each parameter name, applied in order
   (a later match wins on the same key). ``lr`` sets the lr, ``lr_scale`` multiplies it,
   ``weight_decay`` replaces it, any other key is an optimizer option (checked against the
   optimizer's schema when ``optimizer=`` is given).

Every trainable tensor lands in exactly one group; frozen tensors (``requires_grad=False``)
are left out; a tensor shared by several modules (tied weights) is counted once, under the
first name ``model.named_parameters()`` gives it.
"""
from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import torch
from torch import nn

from .registry import get_optimizer_spec

_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)

# transformers.Trainer.get_decay_parameter_names (5.x) exempts names matching these (lower-cased).
_HF_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]

# Names of the ModuleLists that hold a model's transformer blocks, across model families:
# BERT/ViT ``encoder.layer``, GPT-2/Falcon ``h``, LLaMA/Whisper/wav2vec2 ``layers``, T5 ``block``, timm ``blocks``.
STACK_NAMES = ("layer", "layers", "h", "block", "blocks", "resblocks")

_FIRST_INDEX = re.compile(r"(?:^|\.)(\d+)\.")  # the first numbered component of a name

# Group keys that are not optimizer options.
_GROUP_KEYS = {"lr", "lr_scale", "weight_decay", "name"}


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm of any model family, BatchNorm, GroupNorm, or any class named ``*Norm``."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def is_embedding_module(module: nn.Module) -> bool:
    """``nn.Embedding`` (and subclasses such as scaled word embeddings) or a class named ``*Embedding``."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or type(module).__name__.endswith("Embedding")


def _aliases(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(tensor) -> every (full name, owning module, local name) it is registered under, in order."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            found[id(param)].append((f"{module_name}.{local}" if module_name else local, module, local))
    return found


def no_decay_names(
    model: nn.Module,
    decay_embeddings: bool = True,
    extra: Iterable[str] = (),
) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the tensors that get no weight decay.

    A tied tensor is exempt when any of the modules that hold it says so (a GPT-2 ``lm_head``
    tied to ``wte`` follows ``decay_embeddings``). ``extra`` adds regexes searched in the name.
    """
    patterns = _HF_NO_DECAY_PATTERNS + [re.compile(p) for p in extra]
    aliases = _aliases(model)
    names = set()
    for name, param in model.named_parameters():
        for full, module, local in aliases[id(param)]:
            if (
                param.ndim <= 1
                or local.endswith("bias")
                or is_norm_module(module)
                or (not decay_embeddings and is_embedding_module(module))
                or any(p.search(full.lower()) for p in patterns)
            ):
                names.add(name)
                break
    return names


def layer_depths(names: Sequence[str], embedding_names: Iterable[str] = ()) -> tuple[dict[str, int], int]:
    """Depth of every name for layer-wise lr decay, and the largest depth ``N`` (= full lr).

    ``names`` are parameter names in registration order (``model.named_parameters()``), which in
    the model families this was written against (BERT/RoBERTa, GPT-2, LLaMA/Qwen, T5, Whisper,
    wav2vec2) is the forward order. Depths:

    - the blocks of the layer stacks: ModuleLists named one of :data:`STACK_NAMES`, the outermost
      numbered one in a name (T5's ``block.0.layer.1`` is block 0). Stacks are numbered one after
      the other, so a decoder's blocks come after its encoder's: block ``i`` of ``L`` in all gets
      depth ``i + 1``;
    - embeddings, depth 0: everything before the first block (token/position embeddings, the
      conv feature extractor of wav2vec2/Whisper), and anything in ``embedding_names``
      (a decoder's ``embed_tokens`` that comes after the encoder);
    - between two stacks (an encoder's final norm): the depth of the last block before it;
    - after the last stack (final norm, pooler, lm_head, classifier): ``N = L + 1``, the full lr.

    So block ``i`` gets ``lr * d ** (L - i)`` and embeddings ``lr * d ** (L + 1)``, the BEiT /
    ELECTRA convention. When no name has a known stack, the fallback takes the numbered prefix
    holding the most tensors (``0.weight``, ``trunk.3.weight``) as the one stack, its numbered
    children ranked in order (an ``nn.Sequential``'s activations leave gaps in the numbers).
    A tied head (GPT-2 ``lm_head`` = ``wte``) is the embedding tensor and gets depth 0.
    """
    embedding_names = set(embedding_names)
    located: dict[str, tuple[str, int]] = {}
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        match = _FIRST_INDEX.search(name)
        if match:
            prefix = name[: match.start()]
            located[name] = (prefix, int(match.group(1)))
            counts[prefix] += 1
    stacks = [p for p in counts if p.rsplit(".", 1)[-1] in STACK_NAMES]
    if not stacks and counts:
        stacks = [max(counts, key=counts.get)]
    # block -> global depth: stacks one after the other, indices ranked (a Sequential skips activations)
    rank: dict[tuple[str, int], int] = {}
    total = 0
    for prefix in stacks:  # in order of first appearance
        for index in sorted({i for q, i in located.values() if q == prefix}):
            total += 1
            rank[(prefix, index)] = total

    depths: dict[str, int] = {}
    current = 0  # depth of the last block seen: what comes between stacks gets it
    seen_blocks = 0
    for name in names:
        block = located.get(name)
        if block in rank:
            depths[name] = current = rank[block]
            seen_blocks = max(seen_blocks, current)
        elif name in embedding_names or seen_blocks == 0:
            depths[name] = 0
        else:
            depths[name] = total + 1 if seen_blocks == total else current
    return depths, total + 1


def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    lr: float | None = None,
    *,
    no_decay: Iterable[str] | Callable[[str, torch.Tensor], bool] | None = None,
    decay_embeddings: bool = True,
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    overrides: Sequence[tuple[str, Mapping[str, Any]]] = (),
    optimizer: str | None = None,
) -> list[dict[str, Any]]:
    """Torch-ready parameter groups for ``model``, each with a readable ``name``.

    Args:
        weight_decay: decay of the decayed groups. ``None``: the optimizer's own default when
            ``optimizer`` is given, else the key is left out (the optimizer's default applies).
        lr: base learning rate. Needed with ``layer_decay`` or an ``lr_scale`` override: the
            groups then carry an absolute ``lr`` (and ``lr_scale`` for reading), because
            torch.optim ignores unknown group keys.
        no_decay: extra regexes (searched in the name) of tensors without decay, added to the
            built-in rule; or a function ``(name, tensor) -> bool`` that replaces the rule.
        decay_embeddings: ``False`` exempts embedding weights from decay.
        layer_decay: ``d`` in ``lr * d ** (N - depth)``; see :func:`layer_depths`.
        layer_id: ``name -> depth`` replacing the built-in depths; the largest depth any
            tensor gets is ``N`` and has the full lr.
        overrides: ``[(regex, {"lr" | "lr_scale" | "weight_decay" | option: value})]``, applied
            in order; a regex that matches no trainable tensor is reported with a warning.
        optimizer: registry name; override keys are then checked and typed against its options
            (unknown option -> ``ValueError``). Without it only lr, lr_scale and weight_decay
            can be overridden.
    """
    spec = get_optimizer_spec(optimizer) if optimizer is not None else None
    has_decay = spec is None or "weight_decay" in spec.options
    if weight_decay is None and spec is not None:
        weight_decay = spec.default_weight_decay
    if weight_decay is not None and not has_decay and weight_decay != 0:
        raise ValueError(f"weight_decay={weight_decay!r}: optimizer {spec.name!r} has no weight_decay option")
    if layer_decay is not None and not (0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    if lr is not None and lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    rules = _check_overrides(overrides, spec)
    if lr is None and (layer_decay is not None or any("lr_scale" in opts for _, opts in rules)):
        what = "layer_decay" if layer_decay is not None else "an lr_scale override"
        raise ValueError(f"{what} needs lr= (groups carry an absolute lr; torch.optim ignores lr_scale)")

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    names = [n for n, _ in named]

    if callable(no_decay):
        exempt = {n for n, p in named if no_decay(n, p)}
    else:
        exempt = no_decay_names(model, decay_embeddings, no_decay or ())

    depths: dict[str, int] = {}
    top = 0
    if layer_decay is not None:
        if layer_id is not None:
            depths = {n: int(layer_id(n)) for n in names}
            top = max(depths.values())
        else:  # embeddings after the first block (a decoder's embed_tokens): by module type or name
            modules = dict(model.named_modules())
            owner = {n: n.rpartition(".")[0] for n in names}
            embeddings = {n for n in names if is_embedding_module(modules[owner[n]]) or re.search(r"(?:^|[._])embed", owner[n])}
            depths, top = layer_depths(names, embeddings)

    used = [False] * len(rules)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        decays = has_decay and name not in exempt
        options: dict[str, Any] = {}
        if has_decay:
            if decays and weight_decay is not None:
                options["weight_decay"] = weight_decay
            elif not decays:
                options["weight_decay"] = 0.0
        label = ["decay" if decays else "no_decay"] if has_decay else ["params"]
        if layer_decay is not None:
            depth = depths[name]
            label.insert(0, _depth_label(depth, top, layer_id is None))
            options["lr"] = lr * layer_decay ** (top - depth)
        elif lr is not None:
            options["lr"] = lr
        for i, (pattern, override) in enumerate(rules):
            if not pattern.search(name):
                continue
            used[i] = True
            label.append(override.get("name", pattern.pattern))
            for key, value in override.items():
                if key == "lr_scale":
                    options["lr"] = options["lr"] * value
                elif key != "name":
                    options[key] = value
        if lr is not None and "lr" in options and lr > 0:
            options["lr_scale"] = options["lr"] / lr
        key = tuple(label) + tuple(sorted((k, repr(v)) for k, v in options.items()))
        group = groups.setdefault(key, {"name": "/".join(label), "params": [], **options})
        group["params"].append(param)

    for (pattern, _), hit in zip(rules, used):
        if not hit:
            warnings.warn(f"param_groups: override {pattern.pattern!r} matches no trainable parameter", UserWarning, stacklevel=2)
    return _unique_names(list(groups.values()))


def _depth_label(depth: int, top: int, builtin: bool) -> str:
    if not builtin:
        return f"depth_{depth}"
    return "embeddings" if depth == 0 else "head" if depth == top else f"layer_{depth - 1}"


def _check_overrides(overrides: Sequence[tuple[str, Mapping[str, Any]]], spec: Any) -> list[tuple[re.Pattern, dict[str, Any]]]:
    rules = []
    for i, item in enumerate(overrides or ()):
        try:
            pattern, options = item
        except (TypeError, ValueError):
            raise ValueError(f"overrides[{i}] must be (regex, {{option: value}}), got {item!r}") from None
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"overrides[{i}]: bad regex {pattern!r} ({exc})") from None
        if not isinstance(options, Mapping):
            raise ValueError(f"overrides[{i}] ({pattern!r}): options must be a dict, got {options!r}")
        typed: dict[str, Any] = {}
        for key, value in options.items():
            if key == "name":
                typed[key] = str(value)
            elif key in ("lr", "lr_scale", "weight_decay"):
                if isinstance(value, str):
                    try:
                        value = float(value)
                    except ValueError:
                        raise ValueError(f"overrides[{i}] ({pattern!r}): {key}={value!r} is not a number") from None
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"overrides[{i}] ({pattern!r}): {key} must be a number >= 0, got {value!r}")
                if key == "weight_decay" and spec is not None and "weight_decay" not in spec.options and value:
                    raise ValueError(f"overrides[{i}] ({pattern!r}): optimizer {spec.name!r} has no option 'weight_decay'")
                typed[key] = float(value)
            elif spec is None:
                raise ValueError(
                    f"overrides[{i}] ({pattern!r}): option {key!r} can only be checked against an optimizer: "
                    "pass optimizer='name' to param_groups"
                )
            elif key not in spec.options:
                raise ValueError(
                    f"overrides[{i}] ({pattern!r}): optimizer {spec.name!r} has no option {key!r} (value {value!r}); "
                    f"its options are: {', '.join(spec.options)}"
                )
            else:
                typed[key] = spec.options[key].parse(value)
        rules.append((compiled, typed))
    return rules


def _unique_names(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = defaultdict(int)
    for group in groups:
        seen[group["name"]] += 1
        if seen[group["name"]] > 1:
            group["name"] = f"{group['name']}#{seen[group['name']]}"
    return groups


def format_param_groups(groups: Iterable[Mapping[str, Any]] | torch.optim.Optimizer) -> str:
    """The table :func:`describe_param_groups` prints: group, #tensors, #params, lr, weight decay.

    Takes the output of :func:`param_groups` or an optimizer (its groups then carry the
    optimizer's defaults); a key a group lacks shows as ``default``.
    """
    if isinstance(groups, torch.optim.Optimizer):
        groups = groups.param_groups
    rows = [("group", "#tensors", "#params", "lr", "weight decay")]
    tensors = numel = 0
    for i, group in enumerate(groups):
        params = list(group["params"])
        count = sum(p.numel() for p in params)
        tensors, numel = tensors + len(params), numel + count
        rows.append((
            str(group.get("name", f"group {i}")),
            str(len(params)),
            f"{count:,}",
            _fmt(group.get("lr")),
            _fmt(group.get("weight_decay")),
        ))
    rows.append(("total", str(tensors), f"{numel:,}", "", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = []
    for r, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if r == 0 or r == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, torch.Tensor):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_param_groups(groups: Iterable[Mapping[str, Any]] | torch.optim.Optimizer, file: TextIO | None = None) -> None:
    """Print a table of the groups: name, #tensors, #params, lr and weight decay (see :func:`format_param_groups`)."""
    print(format_param_groups(groups), file=file or sys.stdout)
