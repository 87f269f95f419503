"""How much memory an optimizer's state holds: ``op.state_bytes(optimizer)``.

Counts the bytes of every tensor in ``optimizer.state`` (also inside lists, tuples and
dicts there), each storage once: views and tensors shared between parameters are not
counted twice. Parameters and gradients are not state and are not counted.
"""
from __future__ import annotations

from typing import Any

import torch


def state_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a state value (also inside dicts, lists and tuples); a record may count them
    every step, so plain loops rather than nested generators."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    found = []
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (dict, list, tuple)):
            found.extend(state_tensors(item))
    return found


def _count(state: Any, seen: set) -> int:
    total = 0
    for t in state_tensors(state):
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        key = (t.device, pointer, nbytes) if pointer else ("tensor", id(t))
        if key not in seen:
            seen.add(key)
            total += nbytes
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
