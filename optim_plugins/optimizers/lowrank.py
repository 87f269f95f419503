"""Low-rank projected optimizer states, shared by GaLore (``galore.py``) and APOLLO (``apollo.py``).

A 2-D weight ``W`` (m x n) keeps its Adam moments in a rank-``r`` space: the gradient ``G``
is projected by a matrix ``P`` that is refreshed every ``update_proj_gap`` steps,

* ``"right"``: ``P`` is r x n, the low-rank gradient ``G @ P.T`` is m x r;
* ``"left"``:  ``P`` is m x r, the low-rank gradient ``P.T @ G`` is r x n;
* ``"full"``:  both, ``P_l.T @ G @ P_r.T`` is r x r,

and ``proj_type`` chooses the side as transformers / galore-torch do: ``"std"`` projects
the longer side away (right when m >= n), ``"reverse_std"`` the other, ``"left"``,
``"right"`` and ``"full"`` as named.

Nothing of Adam is written here. The algorithms compose: AdamW's own ``update`` (adam.py)
runs on the low-rank gradient and a zero proxy parameter, which then holds the low-rank
step; GaLore projects it back, APOLLO turns it into a scaling of the full gradient. The
step machinery around ``update`` stays as for any optimizer: decoupled weight decay on the
full ``p``, maximize, the non-finite policy, Kahan / stochastic rounding of the write.

Which tensors are projected is a group option, ``lowrank``: ``True`` (every tensor of the
group, each must be 2-D), ``False`` (plain AdamW) or ``None`` (every 2-D tensor of the
group). Given a model, the optimizer builds the groups with :func:`lowrank_param_groups`:
transformers' ``optim_target_modules`` rule picks the ``nn.Linear`` weights, our
parameter-group rule (:func:`optim_plugins.param_groups`) decides weight decay.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..registry import Capabilities
from .adam import AdamW
from .base import Optimizer
from .common import check_choice

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


# ----------------------------------------------------------------------------- which tensors


def target_module_matches(optim_target_modules: str | Sequence[str], module_name: str) -> tuple[bool, bool]:
    """transformers' ``check_target_module_exists``: (matches, matched by a regex).

    A string is a regex that must match the whole module name; a list matches a module named
    exactly, containing one of its strings, or fully matching one of them as a regex.
    """
    if isinstance(optim_target_modules, str):
        return bool(re.fullmatch(optim_target_modules, module_name)), optim_target_modules != module_name
    if module_name in optim_target_modules:
        return True, False
    if any(key in module_name for key in optim_target_modules):
        return True, False
    if any(re.fullmatch(key, module_name) for key in optim_target_modules):
        return True, True
    return False, False


def target_weight_names(model: nn.Module, optim_target_modules: str | Sequence[str] | None, owner: str = "GaLore/APOLLO") -> list[str]:
    """Names of the ``nn.Linear`` weights that ``optim_target_modules`` selects (transformers' rule).

    ``"all-linear"`` (or ``"all_linear"``) takes every ``nn.Linear``. Modules that match but are not
    ``nn.Linear`` are skipped, as in transformers. No match at all is an error there and here.
    """
    if optim_target_modules is None:
        raise ValueError(
            f"invalid optim_target_modules: None ({owner} needs optim_target_modules to pick the 2-D weights it projects, "
            "e.g. ['attn', 'mlp'], a regex, or 'all-linear'; as in transformers)"
        )
    if not isinstance(optim_target_modules, (str, list, tuple)):
        raise ValueError(
            f"invalid optim_target_modules: {optim_target_modules!r} (expected a list of strings, a regex string or 'all-linear')"
        )
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if all_linear or target_module_matches(optim_target_modules, module_name)[0]:
            names.append(f"{module_name}.weight" if module_name else "weight")
    if not names:
        raise ValueError(f"invalid optim_target_modules: {optim_target_modules!r} matches no nn.Linear module of the model")
    return names


def lowrank_param_groups(
    model: nn.Module,
    optim_target_modules: str | Sequence[str] | None,
    weight_decay: float | None = None,
    lr: float | None = None,
    **param_group_options: Any,
) -> list[dict[str, Any]]:
    """:func:`optim_plugins.param_groups` split by target: ``lowrank=True`` groups hold the selected weights.

    Every group of the no-decay / layer-decay rules is split into its target weights
    (``lowrank: True``, name suffixed ``/lowrank``) and the rest (``lowrank: False``).
    """
    from ..param_groups import param_groups  # the layer above; imported late to keep imports acyclic

    targets = set(target_weight_names(model, optim_target_modules))
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in param_groups(model, weight_decay=weight_decay, lr=lr, **param_group_options):
        chosen = [p for p in group["params"] if name_of[id(p)] in targets]
        rest = [p for p in group["params"] if name_of[id(p)] not in targets]
        if rest:
            groups.append({**group, "params": rest, "lowrank": False})
        if chosen:
            groups.append({**group, "params": chosen, "lowrank": True, "name": f"{group.get('name', 'params')}/lowrank"})
    return groups


# ----------------------------------------------------------------------------- projections


def projection_sides(shape: Sequence[int], proj_type: str) -> tuple[str, ...]:
    """Which projector(s) a weight of ``shape`` gets: ``("right",)``, ``("left",)`` or both."""
    m, n = shape
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "full":
        return ("left", "right")
    return (proj_type,)


def project(g: Tensor, state: Mapping[str, Tensor]) -> Tensor:
    """The low-rank gradient: ``P_l.T @ g`` and / or ``g @ P_r.T``."""
    if "proj_left" in state:
        g = state["proj_left"].t() @ g
    if "proj_right" in state:
        g = g @ state["proj_right"].t()
    return g


def project_back(low: Tensor, state: Mapping[str, Tensor]) -> Tensor:
    """The full-size tensor of a low-rank one: ``P_l @ low`` and / or ``low @ P_r``."""
    if "proj_left" in state:
        low = state["proj_left"] @ low
    if "proj_right" in state:
        low = low @ state["proj_right"]
    return low


def svd_projectors(g: Tensor, rank: int, sides: tuple[str, ...]) -> dict[str, Tensor]:
    """GaLore's projectors: the top-``rank`` singular vectors of ``g`` (computed in float32).

    A non-finite gradient gives NaN projectors, so that NaN propagates as torch's optimizers
    do (``nonfinite="propagate"``) instead of failing inside the SVD.
    """
    matrix = g.float() if g.dtype != torch.float64 else g
    if not bool(torch.isfinite(matrix).all()):  # one host sync per projector refresh (rare)
        matrix = torch.full_like(matrix, float("nan"))
        u = torch.full((matrix.shape[0], min(matrix.shape)), float("nan"), dtype=matrix.dtype, device=matrix.device)
        vh = torch.full((min(matrix.shape), matrix.shape[1]), float("nan"), dtype=matrix.dtype, device=matrix.device)
    else:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    found = {"left": u[:, :rank], "right": vh[:rank, :]}
    return {f"proj_{side}": found[side] for side in sides}


class LowRankAdamW(AdamW):
    """AdamW whose moments of 2-D weights live in a projected low-rank space (base of GaLore / APOLLO).

    Subclasses write ``projected_update``; the projector bookkeeping, state shapes and group
    selection are here.
    """

    # Whole-tensor math (SVD, matmuls): stepped one tensor at a time, shardable by whole tensors.
    # needs_model: built from the model, the projected weights come from optim_target_modules.
    capabilities = Capabilities(elementwise=False, needs_model=True, shardable="tensors")
    random_projection = False  # rank may exceed the matrix dimensions only for random projectors

    def __init__(self, params: Any, defaults: dict[str, Any], optim_target_modules: Any = None, **options: Any):
        if options.pop("decoupled_weight_decay", True) is not True:
            raise ValueError("invalid decoupled_weight_decay: AdamW always decouples weight decay (use Adam for L2)")
        if isinstance(params, nn.Module):
            params = lowrank_param_groups(params, optim_target_modules, weight_decay=defaults["weight_decay"])
        elif optim_target_modules is not None:
            raise ValueError(
                f"invalid optim_target_modules: {optim_target_modules!r} needs the model, not a list of tensors or groups: "
                f"pass the model ({type(self).__name__}(model, ...)), or mark groups with lowrank=True / False "
                "(optim_plugins.optimizers.lowrank.lowrank_param_groups does that from a model)"
            )
        Optimizer.__init__(self, params, {**defaults, "decoupled_weight_decay": True}, **options)

    @classmethod
    def model_param_groups(cls, model: nn.Module, options: Mapping[str, Any], **settings: Any) -> tuple[list, dict]:
        """``create_optimizer``'s groups for ``model``: :func:`lowrank_param_groups` by ``optim_target_modules``;
        without it, :func:`optim_plugins.param_groups` and every 2-D tensor is projected."""
        from ..param_groups import param_groups

        options = dict(options)
        targets = options.pop("optim_target_modules", None)
        decay, lr = options.get("weight_decay"), options.get("lr")
        if targets is None:
            return param_groups(model, weight_decay=decay, lr=lr, **settings), options
        return lowrank_param_groups(model, targets, weight_decay=decay, lr=lr, **settings), options

    # ------------------------------------------------------------------ options

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        rank, gap, scale = options["rank"], options["update_proj_gap"], options["scale"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"invalid rank: {rank!r} (expected an integer >= 1)")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"invalid update_proj_gap: {gap!r} (expected an integer >= 1)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"invalid scale: {scale!r} (expected a number >= 0)")
        check_choice("proj_type", options["proj_type"], PROJ_TYPES)
        check_choice("lowrank", options["lowrank"], (None, True, False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("lowrank", self.defaults.get("lowrank")) is True:
            params = [param_group["params"]] if torch.is_tensor(param_group["params"]) else list(param_group["params"])
            bad = [tuple(p.shape) for p in params if p.dim() != 2]
            if bad:
                raise ValueError(f"invalid lowrank: True for a tensor of shape {bad[0]} (only 2-D weights are projected)")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state

    def projected(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        flag = group["lowrank"]
        return p.dim() == 2 if flag is None else bool(flag)

    def effective_rank(self, shape: Sequence[int], group: Mapping[str, Any]) -> int:
        return group["rank"] if self.random_projection else min(group["rank"], *shape)

    def projector_shapes(self, shape: Sequence[int], group: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        (m, n), r = shape, self.effective_rank(shape, group)
        sides = projection_sides(shape, group["proj_type"])
        return {f"proj_{side}": (m, r) if side == "left" else (r, n) for side in sides}

    def low_rank_shape(self, shape: Sequence[int], group: Mapping[str, Any]) -> tuple[int, int]:
        (m, n), r = shape, self.effective_rank(shape, group)
        sides = projection_sides(shape, group["proj_type"])
        return (r if "left" in sides else m, r if "right" in sides else n)

    def init_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        if not self.projected(p, group):
            return super().init_state(p, group)
        dtype = self.state_dtype(p, group)
        low = self.low_rank_shape(p.shape, group)
        state = {name: torch.zeros(low, dtype=dtype, device=p.device) for name in self.state_names(group)}
        for name, shape in self.projector_shapes(p.shape, group).items():
            state[name] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state

    def moments(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {name: state[name] for name in self.state_names(group)}

    # ------------------------------------------------------------------ the step

    def update(self, p, g, state, group, step):
        if "proj_left" not in state and "proj_right" not in state:
            return super().update(p, g, state, group, step)  # plain AdamW for the other tensors
        if (step - 1) % group["update_proj_gap"] == 0:
            for name, value in self.new_projectors(g, state, group).items():
                state[name].copy_(value)
        self.projected_update(p, g, project(g.to(state["exp_avg"].dtype), state), state, group, step)

    def low_rank_step(self, low: Tensor, state: Mapping[str, Any], group: Mapping[str, Any], step: float,
                      lr: float | None = None) -> Tensor:
        """AdamW's own update run on the low-rank gradient: the step it would add to a zero parameter."""
        proxy = torch.zeros_like(low)
        AdamW.update(self, proxy, low, self.moments(state, group), group if lr is None else {**group, "lr": lr}, step)
        return proxy

    def new_projectors(self, g: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def projected_update(self, p: Tensor, g: Tensor, low: Tensor, state: dict[str, Any], group: Mapping[str, Any],
                         step: float) -> None:
        raise NotImplementedError


def common_defaults(rank: int, update_proj_gap: int, scale: float, proj_type: str, lowrank: bool | None) -> dict[str, Any]:
    return dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, lowrank=lowrank)


__all__ = [
    "LowRankAdamW",
    "lowrank_param_groups",
    "project",
    "project_back",
    "projection_sides",
    "svd_projectors",
    "target_weight_names",
]
