"""How much memory an optimizer's state holds: ``op.state_bytes(optimizer)``.

Counts the bytes of every tensor in ``optimizer.state`` (also inside lists, tuples and
dicts there), each storage once: views and tensors shared between parameters are not
counted twice. Parameters and gradients are not state and are not counted.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr(), storage.nbytes()) if storage.data_ptr() else ("tensor", id(t))


def _count(state: Any, seen: set) -> int:
    total = 0
    for t in _tensors(state):
        if t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer.state``: every tensor's storage, counted once (scalar ``step`` tensors included)."""
    seen: set = set()
    return sum(_count(state, seen) for state in optimizer.state.values())


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes of state per parameter, in the order of ``optimizer.param_groups`` (the
    ``state_dict()`` indices); 0 for a parameter without state. A storage shared by several
    parameters is counted for the first of them, so the list sums to :func:`state_bytes`
    (plus state of tensors no longer in any group).
    """
    seen: set = set()
    return [_count(optimizer.state.get(p, {}), seen) for group in optimizer.param_groups for p in group["params"]]
