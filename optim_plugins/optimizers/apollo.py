"""APOLLO: SGD-like memory, AdamW-level performance (Zhu et al., 2024, arXiv:2412.05270)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import Tensor

from .common import bias_correction, check_choice
from .lowrank import LowRankAdamW, common_defaults, svd_projectors

NORM_GROWTH = 1.01  # APOLLO's norm-growth limiter (from Fira): the scaled gradient's norm grows at most 1 % a step


def stable_randn(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """apollo-torch's ``stable_randn``: N(0, 1) in float32 from a generator seeded with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def next_seed(seed: int, advance: int = 0xF) -> int:
    """apollo-torch's ``next_seed``: the seed of the next projector refresh."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=generator).tolist()[-1]


class ApolloAdamW(LowRankAdamW):
    """APOLLO AdamW: full-gradient steps scaled channel-wise by a low-rank AdamW's step sizes.

    The gradient G of a 2-D weight is projected to rank r by a random (or SVD) projector that is
    redrawn every ``update_proj_gap`` steps; AdamW's update runs there, and the ratio of the
    low-rank Adam step to the low-rank gradient, per channel (``scale_type="channel"``) or for
    the whole tensor (``"tensor"``), scales G itself: p -= lr * sqrt(scale) * G * ratio, after the
    norm-growth limiter (the scaled gradient's norm grows at most 1.01x a step). Options and
    defaults are transformers' ``optim="apollo_adamw"``; APOLLO-Mini is rank=1,
    scale_type="tensor", scale=128. Random projectors are drawn from a seed kept in the state
    (apollo-torch's: the parameter's position, 1-based, advanced at each refresh).

    Given a model, ``optim_target_modules`` picks the ``nn.Linear`` weights as transformers does;
    given tensors or groups, every 2-D tensor of a group is projected unless ``lowrank=False``.

    Recommended: lr 1e-2 with rank 256 / scale 1 (APOLLO) or rank 1 / scale 128 (APOLLO-Mini) for
    LLaMA pre-training; update_proj_gap 200.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay factor (applied to the full weight).
        amsgrad: use the running maximum of the (projected) second moment.
        rank: rank r of the projection.
        update_proj_gap: steps between two refreshes of the projector.
        scale: the update is multiplied by sqrt(scale) (APOLLO's alpha).
        proj_type: "std" (project the longer side away), "reverse_std", "left" or "right".
        proj: "random" (Gaussian projector, APOLLO) or "svd" (GaLore's projector).
        scale_type: "channel" (one factor per row or column) or "tensor" (one factor).
        disable_nl: turn the norm-growth limiter off.
        lowrank: project this group's tensors: True (all, each 2-D), False (none), None (every 2-D tensor).
        optim_target_modules: with a model: the modules whose nn.Linear weights are projected (transformers' rule).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: Literal["std", "reverse_std", "right", "left"] = "std",
        proj: Literal["random", "svd"] = "random",
        scale_type: Literal["channel", "tensor"] = "channel",
        disable_nl: bool = False,
        lowrank: bool | None = None,
        optim_target_modules: str | list[str] | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        proj=proj, scale_type=scale_type, disable_nl=disable_nl,
                        **common_defaults(rank, update_proj_gap, scale, proj_type, lowrank))
        super().__init__(params, defaults, optim_target_modules, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if options["proj_type"] == "full":
            raise ValueError("invalid proj_type: 'full' (APOLLO scales rows or columns: use 'std', 'reverse_std', 'left' or 'right')")
        check_choice("proj", options["proj"], ("random", "svd"))
        check_choice("scale_type", options["scale_type"], ("channel", "tensor"))
        if not isinstance(options["disable_nl"], bool):
            raise ValueError(f"invalid disable_nl: {options['disable_nl']!r} (expected True or False)")

    def effective_rank(self, shape, group) -> int:
        return group["rank"] if group["proj"] == "random" else min(group["rank"], *shape)

    def init_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        state = super().init_state(p, group)
        if self.projected(p, group):
            state["seed"] = torch.tensor(self._position(p), dtype=torch.int64, device=p.device)
            state["scaled_grad"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    def _position(self, p: Tensor) -> int:
        """1-based position of ``p`` among all parameters (apollo-torch's seed); 0 for a stand-in."""
        position = 0
        for group in self.param_groups:
            for q in group["params"]:
                position += 1
                if q is p:
                    return position
        return 0

    def new_projectors(self, g: Tensor, state, group) -> dict[str, Tensor]:
        sides = tuple(side for side in ("left", "right") if f"proj_{side}" in state)
        if group["proj"] == "svd":
            return svd_projectors(g, group["rank"], sides)
        seed = int(state["seed"])
        state["seed"].fill_(next_seed(seed))
        return {f"proj_{side}": stable_randn(tuple(state[f"proj_{side}"].shape), seed, g.device) / math.sqrt(group["rank"])
                for side in sides}

    def projected_update(self, p, g, low, state, group, step) -> None:
        direction = self.low_rank_step(low, state, group, step, lr=1.0)  # -(bias-corrected Adam step), low rank
        if group["scale_type"] == "channel":
            dim = 1 if "proj_right" in state else 0  # the projected-away dimension: one factor per kept channel
            factor = direction.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            factor = direction.norm() / (low.norm() + 1e-8)
        scaled = g * factor
        if not group["disable_nl"]:
            beta1, beta2 = group["betas"]
            # the limiter compares norms without Adam's bias correction, as apollo-torch does
            unbiased = bias_correction(beta2, step) ** 0.5 / bias_correction(beta1, step)
            norm = scaled.norm().float() / unbiased
            if step == 1:
                state["scaled_grad"].copy_(norm)
            else:
                limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=NORM_GROWTH) / NORM_GROWTH
                scaled = scaled / limiter.to(scaled.dtype)
                state["scaled_grad"].copy_(norm / limiter)
        p.add_(scaled, alpha=-group["lr"] * math.sqrt(group["scale"]))


__all__ = ["ApolloAdamW"]
