"""How much memory an optimizer's state holds: ``op.state_bytes(optimizer)``.

Counts the bytes of every tensor in ``optimizer.state`` (also inside lists, tuples and
dicts there), each storage once: views and tensors shared between parameters are not
counted twice; per parameter, each counts the bytes its tensors span. Parameters and gradients are
not state and are not counted.
"""
from __future__ import annotations

import bisect
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


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to its last (its own bytes where it is contiguous)."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _claim(starts: list[int], ends: list[int], start: int, end: int) -> int:
    """Merge ``[start, end)`` into the sorted disjoint ranges ``starts``/``ends``; the bytes it adds."""
    if end <= start:
        return 0
    lo, hi = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)  # the ranges it overlaps
    added = end - start - sum(min(e, end) - max(s, start) for s, e in zip(starts[lo:hi], ends[lo:hi]))
    if lo < hi:
        start, end = min(start, starts[lo]), max(end, ends[hi - 1])
    starts[lo:hi], ends[lo:hi] = [start], [end]
    return added


def _per_state(states: list[Any]) -> list[int]:
    """Bytes of each state: what its tensors span in their storages, where no earlier tensor spans it
    (views and shared tensors once), and the bytes of a storage no tensor spans with the first state
    that holds it; the counts add up to the bytes of every storage, once."""
    counts = [0] * len(states)
    storages: dict[Any, tuple[int, int, list[int], list[int]]] = {}  # key: first holder, bytes, ranges
    for i, state in enumerate(states):
        for t in state_tensors(state):
            if t.is_meta:
                continue
            storage = t.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            key = (t.device, pointer, nbytes) if pointer else ("tensor", id(t))
            _, _, starts, ends = storages.setdefault(key, (i, nbytes, [], []))
            start = t.storage_offset() * t.element_size()
            counts[i] += _claim(starts, ends, start, min(start + _span(t), nbytes))
    for first, nbytes, starts, ends in storages.values():
        counts[first] += nbytes - sum(e - s for s, e in zip(starts, ends))
    return counts


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer.state``: every tensor's storage, counted once (scalar ``step`` tensors included)."""
    return sum(_per_state(list(optimizer.state.values())))


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes of state per parameter, in the order of ``optimizer.param_groups`` (the
    ``state_dict()`` indices); 0 for a parameter without state. Each parameter counts what its
    state's tensors span (a tensor shared with an earlier parameter's state, or a view of it, is
    counted there; the ``step`` counters the step keeps in one tensor count 4 or 8 bytes each), so
    the list sums to :func:`state_bytes` (plus state of tensors no longer in any group).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = set(map(id, params))
    counts = _per_state([optimizer.state.get(p, {}) for p in params]
                        + [state for p, state in optimizer.state.items() if id(p) not in held])
    return counts[:len(params)]
