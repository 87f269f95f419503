"""Precision of the parameter write: plain, Kahan-compensated or stochastically rounded.

An update is computed on a float32 working copy of a low-precision parameter and
written back here, so that no algorithm has to know about bf16:

* ``"kahan"``: the rounding error of each write is kept in a buffer of the
  parameter's dtype (``state["compensation"]``) and added back before the next
  update, so updates smaller than bf16's spacing still accumulate.
* ``"stochastic"``: the float32 result is rounded up or down at random with
  probabilities that make the rounding unbiased.

``state_dtype="bf16"`` stores the states of fp32 parameters in bfloat16 (:class:`StoredAs`):
the step decodes them to the parameter's dtype, runs the same update and rounds them back.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .codecs import StateCodec

Compensation = Literal["auto", "kahan", "stochastic"]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_compensation(option: str | None, dtype: torch.dtype) -> str | None:
    """The compensation actually used for parameters of ``dtype`` (none for fp32/fp64)."""
    if option is None or dtype not in LOW_PRECISION:
        return None
    return "kahan" if option == "auto" else option


def working_copy(p: Tensor, compensation: Tensor | None) -> Tensor:
    """Float32 copy of ``p`` with the stored rounding error added back."""
    work = p.float()
    if compensation is not None:
        work.add_(compensation)
    return work


def write_back(p: Tensor, work: Tensor, mode: str | None, compensation: Tensor | None) -> None:
    """Round the float32 result ``work`` into ``p`` (``work`` is consumed)."""
    if mode == "stochastic":
        p.copy_(stochastic_round(work, p.dtype))
        return
    p.copy_(work)
    if compensation is not None:
        compensation.copy_(work.sub_(p))


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 ``x`` to ``dtype``, up or down with probability proportional to proximity.

    Unbiased: ``E[stochastic_round(x)] == x`` for every x between representable neighbours.
    """
    nearest = x.to(dtype)
    below = nearest.float()
    residual = x - below
    toward = torch.where(residual > 0, float("inf"), float("-inf")).to(dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - below
    probability = torch.where(gap != 0, residual / gap, torch.zeros_like(residual))
    draw = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.where(draw < probability, neighbour, nearest)


class StoredAs(StateCodec):
    """A state kept in a narrower float dtype (``state_dtype="bf16"``), rounded to nearest on write."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"StoredAs({self.dtype})"

    def init(self, name: str, value: Tensor) -> dict[str, Tensor]:
        return {name: value.to(self.dtype)}

    def decode(self, name: str, state: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return state[name].to(dtype, copy=True)

    def encode(self, name: str, value: Tensor, state: dict[str, Tensor]) -> None:
        state[name].copy_(value)
