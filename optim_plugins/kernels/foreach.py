"""``TensorList``: a list of tensors that answers the Tensor methods an update uses.

An optimizer states its update once, as tensor code (``exp_avg.lerp_(g, 1 - beta1)``).
Run on single tensors that is the reference backend; run on ``TensorList``s the same
code becomes a multi-tensor step, each method one ``torch._foreach_*`` call over the
whole bucket. Scalar arguments are Python numbers (one value for every tensor in the
bucket: the step machinery buckets tensors so that their step counts agree).
"""
from __future__ import annotations

from numbers import Number
from typing import Iterable, Union

import torch
from torch import Tensor

Operand = Union["TensorList", Number]


class TensorList:
    """Tensors of one (device, dtype) bucket, updated together."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]):
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __repr__(self) -> str:
        return f"TensorList({len(self.tensors)} tensors)"

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def item(self) -> float:
        """The value of 0-d tensors that agree across the bucket (e.g. a per-tensor product of betas)."""
        return self.tensors[0].item()

    # -- in place ---------------------------------------------------------------
    def add_(self, other: Operand, alpha: Number = 1) -> TensorList:
        if isinstance(other, TensorList):
            torch._foreach_add_(self.tensors, other.tensors, alpha=alpha)
        else:
            torch._foreach_add_(self.tensors, other * alpha)
        return self

    def sub_(self, other: Operand, alpha: Number = 1) -> TensorList:
        return self.add_(other, alpha=-alpha)

    def mul_(self, other: Operand) -> TensorList:
        torch._foreach_mul_(self.tensors, _raw(other))
        return self

    def div_(self, other: Operand) -> TensorList:
        torch._foreach_div_(self.tensors, _raw(other))
        return self

    def lerp_(self, end: TensorList, weight: Number) -> TensorList:
        torch._foreach_lerp_(self.tensors, end.tensors, weight)
        return self

    def addcmul_(self, t1: TensorList, t2: TensorList, value: Number = 1) -> TensorList:
        torch._foreach_addcmul_(self.tensors, t1.tensors, t2.tensors, value)
        return self

    def addcdiv_(self, t1: TensorList, t2: TensorList, value: Number = 1) -> TensorList:
        torch._foreach_addcdiv_(self.tensors, t1.tensors, t2.tensors, value)
        return self

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self.tensors)
        return self

    def abs_(self) -> TensorList:
        torch._foreach_abs_(self.tensors)
        return self

    def neg_(self) -> TensorList:
        torch._foreach_neg_(self.tensors)
        return self

    def sign_(self) -> TensorList:
        torch._foreach_sign_(self.tensors)
        return self

    def clamp_min_(self, value: Number) -> TensorList:
        torch._foreach_clamp_min_(self.tensors, value)
        return self

    def zero_(self) -> TensorList:
        torch._foreach_zero_(self.tensors)
        return self

    def copy_(self, other: TensorList) -> TensorList:
        torch._foreach_copy_(self.tensors, other.tensors)
        return self

    # -- out of place ------------------------------------------------------------
    def add(self, other: Operand, alpha: Number = 1) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.tensors, other.tensors, alpha=alpha))
        return TensorList(torch._foreach_add(self.tensors, other * alpha))

    def sub(self, other: Operand, alpha: Number = 1) -> TensorList:
        return self.add(other, alpha=-alpha)

    def mul(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _raw(other)))

    def div(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_div(self.tensors, _raw(other)))

    def lerp(self, end: TensorList, weight: Number) -> TensorList:
        return TensorList(torch._foreach_lerp(self.tensors, end.tensors, weight))

    def addcmul(self, t1: TensorList, t2: TensorList, value: Number = 1) -> TensorList:
        return TensorList(torch._foreach_addcmul(self.tensors, t1.tensors, t2.tensors, value))

    def addcdiv(self, t1: TensorList, t2: TensorList, value: Number = 1) -> TensorList:
        return TensorList(torch._foreach_addcdiv(self.tensors, t1.tensors, t2.tensors, value))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def reciprocal(self) -> TensorList:
        return TensorList(torch._foreach_reciprocal(self.tensors))

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def neg(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def sign(self) -> TensorList:
        return TensorList(torch._foreach_sign(self.tensors))

    def clone(self) -> TensorList:
        return TensorList(t.clone() for t in self.tensors)

    def to(self, dtype: torch.dtype) -> TensorList:
        return TensorList(t.to(dtype) for t in self.tensors)

    def float(self) -> TensorList:
        return self.to(torch.float32)

    __add__ = add
    __sub__ = sub
    __mul__ = mul
    __truediv__ = div
    __neg__ = neg

    def __radd__(self, other: Number) -> TensorList:
        return self.add(other)

    def __rmul__(self, other: Number) -> TensorList:
        return self.mul(other)

    def __rtruediv__(self, other: Number) -> TensorList:
        return self.reciprocal().mul_(other)


def _raw(other: Operand):
    return other.tensors if isinstance(other, TensorList) else other


# Functions for the few operations that are not Tensor methods. Each takes either
# single tensors or TensorLists, so an update written with them runs on both.


def maximum_(target, other):
    """``target = max(target, other)`` elementwise, in place."""
    if isinstance(target, TensorList):
        torch._foreach_maximum_(target.tensors, other.tensors)
    else:
        torch.maximum(target, other, out=target)
    return target


def maximum(a, b):
    if isinstance(a, TensorList):
        return TensorList(torch._foreach_maximum(a.tensors, b.tensors))
    return torch.maximum(a, b)


def _clamp_max_(self: TensorList, value: Number) -> TensorList:
    torch._foreach_clamp_max_(self.tensors, value)
    return self


def _clamp_max(self: TensorList, value: Number) -> TensorList:
    return TensorList(torch._foreach_clamp_max(self.tensors, value))


def _clamp_min(self: TensorList, value: Number) -> TensorList:
    return TensorList(torch._foreach_clamp_min(self.tensors, value))


TensorList.clamp_max_ = _clamp_max_  # appended (family II): upper clips (Sophia, ADOPT)
TensorList.clamp_max = _clamp_max
TensorList.clamp_min = _clamp_min
