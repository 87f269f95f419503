"""GaLore: gradient low-rank projection (Zhao et al., 2024, arXiv:2403.03507), on AdamW."""
from __future__ import annotations

from typing import Any, Iterable, Literal

from torch import Tensor

from .lowrank import LowRankAdamW, common_defaults, project_back, svd_projectors


class GaLoreAdamW(LowRankAdamW):
    """GaLore AdamW: Adam moments of 2-D weights kept in a rank-r SVD subspace of the gradient.

    Every ``update_proj_gap`` steps the projector P becomes the top-``rank`` singular vectors of
    the gradient G; AdamW's update runs on the projected gradient R = P^T G (or G P^T), and the
    low-rank step N is projected back: p += scale * P N. Weight decay is AdamW's, on the full p.
    Other tensors (1-D, not targeted) get plain AdamW. Options and defaults are transformers'
    ``optim="galore_adamw"`` (galore-torch's GaLoreAdamW: eps 1e-6, no weight decay).

    Given a model, ``optim_target_modules`` picks the ``nn.Linear`` weights as transformers does
    (list of names / substrings / regexes, a regex string, or ``"all-linear"``); given tensors or
    groups, every 2-D tensor of a group is projected unless the group says ``lowrank=False``.

    Recommended: lr 1e-2 with scale 0.25, rank 128-512, update_proj_gap 200 (the paper's LLaMA
    pre-training); lr like AdamW's with scale 1 for fine-tuning.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay factor (applied to the full weight).
        amsgrad: use the running maximum of the (projected) second moment.
        rank: rank r of the projection (at most min(m, n) of each weight).
        update_proj_gap: steps between two SVD refreshes of the projector.
        scale: factor of the projected-back update (GaLore's alpha).
        proj_type: "std" (project the longer side away), "reverse_std", "left", "right" or "full" (both sides).
        lowrank: project this group's tensors: True (all, each 2-D), False (none), None (every 2-D tensor).
        optim_target_modules: with a model: the modules whose nn.Linear weights are projected (transformers' rule).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std",
        lowrank: bool | None = None,
        optim_target_modules: str | list[str] | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        **common_defaults(rank, update_proj_gap, scale, proj_type, lowrank))
        super().__init__(params, defaults, optim_target_modules, **options)

    def new_projectors(self, g: Tensor, state, group) -> dict[str, Tensor]:
        sides = tuple(side for side in ("left", "right") if f"proj_{side}" in state)
        return svd_projectors(g, group["rank"], sides)

    def projected_update(self, p, g, low, state, group, step) -> None:
        p.add_(project_back(self.low_rank_step(low, state, group, step), state), alpha=group["scale"])


__all__ = ["GaLoreAdamW"]
