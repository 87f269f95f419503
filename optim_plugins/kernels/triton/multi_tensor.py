"""The launch machinery every Triton step kernel shares: tables, buckets, the two kernels.

An algorithm (``adam.py``, ``lion.py``, ...) writes only its elementwise update as a
``@triton.jit`` function ``update(p, g, s0, s1, s2, s3, h0..h9, O0, O1, O2) -> (p, s0..s3)``
on fp32 values (the twin of the optimizer's ``update``) and a :class:`Plan` (which states
fill the slots, the step's hyper-parameters h0..h9, its constexpr options O0..O2). The
two kernels here do everything else once: find the tensor and chunk of this program,
load p (plus the Kahan buffer), g (times the inverse loss scale and the clip factor,
negated for ``maximize``), weight decay, the states (8-bit ones dequantised), call the
update, store the states (8-bit ones requantised) and write p in its precision
(round-to-nearest, Kahan, or stochastic rounding).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quantize import BLOCK_SIZE as QBLOCK
from ..quantize import _midpoints

BLOCK = 2048  # elements per program of the elementwise kernel
QROWS = 4  # 8-bit blocks (of QBLOCK = 256 elements) per program of the 8-bit kernel
NUM_WARPS = 8
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)  # no fp contraction: an fma only where torch's op has one (add, addcmul)
SLOTS = 4  # state slots s0..s3 of an update
SCALARS = 10  # hyper-parameter slots h0..h9 of an update
# Columns of the per-tensor table (int64): numel, then addresses; absent ones are 0.
COL_NUMEL, COL_P, COL_G, COL_COMP, COL_STATE = 0, 1, 2, 3, 4
COL_ABSMAX = COL_STATE + SLOTS  # the absmax of 8-bit slot i is at COL_ABSMAX + i
WIDTH = COL_ABSMAX + SLOTS
WRITE_NEAREST, WRITE_KAHAN, WRITE_STOCHASTIC = 0, 1, 2
WD_NONE, WD_L2, WD_MULTIPLY = 0, 1, 2
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.uint8: tl.uint8}
# The same numbers as constexpr globals: the only globals a @triton.jit function may read.
_WIDTH, _COL_NUMEL, _COL_P, _COL_G, _COL_COMP, _COL_STATE, _COL_ABSMAX = (
    tl.constexpr(v) for v in (WIDTH, COL_NUMEL, COL_P, COL_G, COL_COMP, COL_STATE, COL_ABSMAX))
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # quantize_blockwise_'s clamp of the absmax


@dataclass(frozen=True)
class Plan:
    """One step of one algorithm for one bucket: what the generic kernels need from it."""

    update: Any  # the @triton.jit update function
    slots: tuple[str | None, ...]  # state name in each slot (None: slot unused)
    scalars: tuple[float, ...]  # h0..h9 (Python floats: passed as fp32, never specialised on)
    options: tuple[int, int, int] = (0, 0, 0)  # O0..O2 (constexpr: each combination compiles once)


# ----------------------------------------------------------------------------- math helpers (fp32)


@triton.jit
def div(a, b):
    """IEEE division (``/`` may be approximate on GPUs); as torch's fp32 ``a / b``."""
    return tl.math.div_rn(a, b)


@triton.jit
def sqrt(x):
    """IEEE square root (``tl.sqrt`` may be approximate on GPUs)."""
    return tl.sqrt_rn(x)


@triton.jit
def lerp(start, end, weight):
    """``torch.lerp(start, end, weight)`` for a scalar weight, with ATen's two-sided formula."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(diff, weight, start), tl.fma(diff, weight - 1.0, end))


@triton.jit
def add(a, b, alpha):
    """``a.add(b, alpha=alpha)``: one rounding, as ATen's vectorised CPU kernel (fma)."""
    return tl.fma(b, alpha, a)


@triton.jit
def addcmul(a, b, c, value):
    """``a.addcmul(b, c, value=value)``: ``(value * b) * c + a``, the product and sum in one fma (as ATen on CPU)."""
    return tl.fma(value * b, c, a)


@triton.jit
def addcdiv(a, b, c, value):
    """``a.addcdiv(b, c, value=value)``: ``a + value * b / c``."""
    return a + div(value * b, c)


@triton.jit
def maximum(a, b):
    """``torch.maximum``: NaN in either argument gives NaN."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def sign(x):
    """``torch.sign`` (0 for NaN, as torch on CPU)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


# ----------------------------------------------------------------------------- loads and stores


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest (even) in ``DTYPE``, as torch's ``.to(dtype)``.

    bf16 by integer ops (c10's round_to_nearest_even): Triton's interpreter truncates
    fp32 -> bf16, and this is exact on every backend.
    """
    if x.dtype == DTYPE:
        return x
    elif DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, bits | 0x00400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _pointer(tensors, row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(tensors + row * _WIDTH + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of the bucket is 16-byte aligned (checked on the host)
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(tensors, row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, offs, mask,
          MASKED: tl.constexpr):
    """Column ``col`` of the tensor in ``row`` at ``offs``, as fp32."""
    ptr = tl.load(tensors + row * _WIDTH + col).to(tl.pointer_type(DTYPE))  # _pointer, inlined
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _store(tensors, row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, offs, value, mask,
           MASKED: tl.constexpr):
    ptr = tl.load(tensors + row * _WIDTH + col).to(tl.pointer_type(DTYPE))  # _pointer, inlined
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    value = _round(value, DTYPE)
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _param_and_grad(tensors, row, offs, mask, grad_scale, clip_coef, wd,
                    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, COMP: tl.constexpr, WD_MODE: tl.constexpr,
                    MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The fp32 working parameter (plus its Kahan buffer) and the gradient the update sees,
    then the parameter and gradient before weight decay and ``maximize`` (for the telemetry sums)."""
    p_old = _load(tensors, row, _COL_P, P_DTYPE, ALIGNED, offs, mask, MASKED)
    if COMP:
        p_old = p_old + _load(tensors, row, _COL_COMP, P_DTYPE, ALIGNED, offs, mask, MASKED)
    g_raw = _load(tensors, row, _COL_G, G_DTYPE, ALIGNED, offs, mask, MASKED)
    if HAS_SCALE:  # GradScaler's inverse scale
        g_raw = g_raw * tl.load(grad_scale).to(tl.float32)
    if HAS_CLIP:  # a gradient-norm clip factor computed beforehand
        g_raw = g_raw * tl.load(clip_coef).to(tl.float32)
    p = p_old
    g = g_raw
    if MAXIMIZE:
        g = -g
    if WD_MODE == 1:  # "l2": g + wd * p
        g = add(g, p, wd)
    elif WD_MODE == 2:  # "decoupled" / "fixed": wd holds 1 - lr * wd or 1 - wd
        p = p * wd
    return p, g, p_old, g_raw


@triton.jit
def _write_param(tensors, row, offs, mask, x, seed, rand_offs,
                 P_DTYPE: tl.constexpr, WRITE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Write the fp32 result ``x`` into p: nearest, Kahan (keep the rounding error) or stochastic.

    Returns the new value p now carries in fp32 (with Kahan: p plus its compensation, i.e. ``x``)."""
    if WRITE == 2:  # stochastic rounding to bf16: add 16 random low bits, truncate
        bits = x.to(tl.uint32, bitcast=True) + (tl.randint(seed, rand_offs) & 0xFFFF)
        out = (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(P_DTYPE)
    else:
        out = _round(x, P_DTYPE)
    _store(tensors, row, _COL_P, P_DTYPE, ALIGNED, offs, out, mask, MASKED)
    if WRITE == 1:
        _store(tensors, row, _COL_COMP, P_DTYPE, ALIGNED, offs, x - out.to(tl.float32), mask, MASKED)
        return x
    else:
        return out.to(tl.float32)


@triton.jit
def _select(s0, s1, s2, s3, SLOT: tl.constexpr):
    if SLOT == 0:
        return s0
    elif SLOT == 1:
        return s1
    elif SLOT == 2:
        return s2
    else:
        return s3


@triton.jit
def _accumulate_stats(stats, row, mask, g, p_old, p_new, s0, s1, s2, s3, V_SLOT: tl.constexpr):
    """op.telemetry's sums for this chunk, added into ``stats[row]``: sum g^2, sum (new p - old p)^2,
    sum old p^2 and (``V_SLOT`` >= 0) sum of the second moment: one extra reduction, no extra pass."""
    zero = tl.zeros_like(g)
    g = tl.where(mask, g, zero)
    delta = tl.where(mask, p_new - p_old, zero)
    p_old = tl.where(mask, p_old, zero)
    tl.atomic_add(stats + row * 4 + 0, tl.sum(g * g))
    tl.atomic_add(stats + row * 4 + 1, tl.sum(delta * delta))
    tl.atomic_add(stats + row * 4 + 2, tl.sum(p_old * p_old))
    if V_SLOT >= 0:
        tl.atomic_add(stats + row * 4 + 3, tl.sum(tl.where(mask, _select(s0, s1, s2, s3, V_SLOT), zero)))


# ----------------------------------------------------------------------------- the elementwise kernel


@triton.jit
def _elementwise_chunk(tensors, row, start, numel, grad_scale, clip_coef, seed, wd, stats,
                       h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
                       UPDATE: tl.constexpr, O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STATES: tl.constexpr,
                       COMP: tl.constexpr, WRITE: tl.constexpr, WD_MODE: tl.constexpr, MAXIMIZE: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, ALIGNED: tl.constexpr,
                       STATS: tl.constexpr, V_SLOT: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p, g, p_old, g_raw = _param_and_grad(tensors, row, offs, mask, grad_scale, clip_coef, wd, P_DTYPE, G_DTYPE, COMP, WD_MODE,
                           MAXIMIZE, HAS_SCALE, HAS_CLIP, ALIGNED, MASKED)
    s0 = p
    s1 = p
    s2 = p
    s3 = p
    if STATES & 1:
        s0 = _load(tensors, row, _COL_STATE + 0, S_DTYPE, ALIGNED, offs, mask, MASKED)
    if STATES & 2:
        s1 = _load(tensors, row, _COL_STATE + 1, S_DTYPE, ALIGNED, offs, mask, MASKED)
    if STATES & 4:
        s2 = _load(tensors, row, _COL_STATE + 2, S_DTYPE, ALIGNED, offs, mask, MASKED)
    if STATES & 8:
        s3 = _load(tensors, row, _COL_STATE + 3, S_DTYPE, ALIGNED, offs, mask, MASKED)
    p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, O0, O1, O2)
    if STATES & 1:
        _store(tensors, row, _COL_STATE + 0, S_DTYPE, ALIGNED, offs, s0, mask, MASKED)
    if STATES & 2:
        _store(tensors, row, _COL_STATE + 1, S_DTYPE, ALIGNED, offs, s1, mask, MASKED)
    if STATES & 4:
        _store(tensors, row, _COL_STATE + 2, S_DTYPE, ALIGNED, offs, s2, mask, MASKED)
    if STATES & 8:
        _store(tensors, row, _COL_STATE + 3, S_DTYPE, ALIGNED, offs, s3, mask, MASKED)
    rand_offs = (offs + row * 0x9E3779B1).to(tl.uint32)  # distinct per element and tensor (mod 2^32)
    p_new = _write_param(tensors, row, offs, mask, p, seed, rand_offs, P_DTYPE, WRITE, ALIGNED, MASKED)
    if STATS:
        _accumulate_stats(stats, row, mask, g_raw, p_old, p_new, s0, s1, s2, s3, V_SLOT)


@triton.jit
def elementwise_kernel(tensors, blocks, grad_scale, clip_coef, found_inf, seed_ptr, stats, wd,
                       h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
                       UPDATE: tl.constexpr, O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STATES: tl.constexpr,
                       COMP: tl.constexpr, WRITE: tl.constexpr, WD_MODE: tl.constexpr, MAXIMIZE: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                       STATS: tl.constexpr, V_SLOT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One program: BLOCK elements of one tensor of the bucket (``blocks`` row: tensor, start)."""
    pid = tl.program_id(0)
    row = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), BLOCK)
    numel = tl.load(tensors + row * _WIDTH + _COL_NUMEL)
    skip = 0.0
    if HAS_FOUND_INF:  # GradScaler found inf/NaN: leave p and the states as they are (no host sync)
        skip = tl.load(found_inf).to(tl.float32)
    seed = 0
    if WRITE == 2:
        seed = tl.load(seed_ptr)
    if skip == 0:
        if start + BLOCK <= numel:  # a full chunk: unmasked (vectorised) loads and stores
            _elementwise_chunk(tensors, row, start, numel, grad_scale, clip_coef, seed, wd, stats,
                               h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, UPDATE, O0, O1, O2,
                               P_DTYPE, G_DTYPE, S_DTYPE, STATES, COMP, WRITE, WD_MODE, MAXIMIZE,
                               HAS_SCALE, HAS_CLIP, ALIGNED, STATS, V_SLOT, BLOCK, False)
        else:
            _elementwise_chunk(tensors, row, start, numel, grad_scale, clip_coef, seed, wd, stats,
                               h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, UPDATE, O0, O1, O2,
                               P_DTYPE, G_DTYPE, S_DTYPE, STATES, COMP, WRITE, WD_MODE, MAXIMIZE,
                               HAS_SCALE, HAS_CLIP, ALIGNED, STATS, V_SLOT, BLOCK, True)


# ----------------------------------------------------------------------------- the 8-bit kernel


@triton.jit
def _dequantize(tensors, row, slot: tl.constexpr, offs, mask, qrow, qmask, code):
    codes = tl.load(_pointer(tensors, row, _COL_STATE + slot, tl.uint8, False) + offs, mask=mask, other=0)
    absmax = tl.load(_pointer(tensors, row, _COL_ABSMAX + slot, tl.float32, False) + qrow, mask=qmask, other=0.0)
    return tl.load(code + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def _quantize(tensors, row, slot: tl.constexpr, offs, mask, qrow, qmask, x, midpoints, SIGNED: tl.constexpr):
    """kernels/quantize.quantize_blockwise_ for QROWS blocks: absmax, then the nearest code."""
    x = tl.where(mask, x, 0.0)  # the short last block is padded with zeros, as there
    absmax = tl.max(tl.abs(x), axis=1)
    nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
    absmax = tl.where(nan, float("nan"), absmax)  # a non-finite block stays non-finite
    scaled = div(x, tl.maximum(absmax, _TINY)[:, None])
    index = tl.zeros(x.shape, dtype=tl.int32)  # bucketize: the number of midpoints below ``scaled``
    for level in tl.static_range(8):
        probe = index + (128 >> level)
        index = tl.where(tl.load(midpoints + probe - 1) < scaled, probe, index)
    if not SIGNED:  # a positive second moment never becomes code 0
        index = tl.maximum(index, (scaled > 0).to(tl.int32))
    tl.store(_pointer(tensors, row, _COL_STATE + slot, tl.uint8, False) + offs, index.to(tl.uint8), mask=mask)
    tl.store(_pointer(tensors, row, _COL_ABSMAX + slot, tl.float32, False) + qrow, absmax, mask=qmask)


@triton.jit
def _load_slot(tensors, row, slot: tl.constexpr, offs, mask, qrow, qmask, code_signed, code_unsigned, default,
               S_DTYPE: tl.constexpr, STATES: tl.constexpr, CODED: tl.constexpr, SIGNED: tl.constexpr):
    value = default
    if (STATES >> slot) & 1:
        if (CODED >> slot) & 1:
            if (SIGNED >> slot) & 1:
                value = _dequantize(tensors, row, slot, offs, mask, qrow, qmask, code_signed)
            else:
                value = _dequantize(tensors, row, slot, offs, mask, qrow, qmask, code_unsigned)
        else:
            value = _load(tensors, row, _COL_STATE + slot, S_DTYPE, False, offs, mask, True)
    return value


@triton.jit
def _store_slot(tensors, row, slot: tl.constexpr, offs, mask, qrow, qmask, x, mid_signed, mid_unsigned,
                S_DTYPE: tl.constexpr, STATES: tl.constexpr, CODED: tl.constexpr, SIGNED: tl.constexpr):
    if (STATES >> slot) & 1:
        if (CODED >> slot) & 1:
            if (SIGNED >> slot) & 1:
                _quantize(tensors, row, slot, offs, mask, qrow, qmask, x, mid_signed, True)
            else:
                _quantize(tensors, row, slot, offs, mask, qrow, qmask, x, mid_unsigned, False)
        else:
            _store(tensors, row, _COL_STATE + slot, S_DTYPE, False, offs, x, mask, True)


@triton.jit
def blockwise8bit_kernel(tensors, blocks, grad_scale, clip_coef, found_inf, seed_ptr, stats, wd,
                         code_signed, mid_signed, code_unsigned, mid_unsigned,
                         h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
                         UPDATE: tl.constexpr, O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
                         P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, STATES: tl.constexpr,
                         CODED: tl.constexpr, SIGNED: tl.constexpr,
                         COMP: tl.constexpr, WRITE: tl.constexpr, WD_MODE: tl.constexpr, MAXIMIZE: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                         STATS: tl.constexpr, V_SLOT: tl.constexpr, QROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """One program: QROWS quantisation blocks of one tensor; dequantise, update, requantise."""
    pid = tl.program_id(0)
    row = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    numel = tl.load(tensors + row * _WIDTH + _COL_NUMEL)
    skip = 0.0
    if HAS_FOUND_INF:
        skip = tl.load(found_inf).to(tl.float32)
    seed = 0
    if WRITE == 2:
        seed = tl.load(seed_ptr)
    if skip == 0:
        qrow = start // QBLOCK + tl.arange(0, QROWS)
        qmask = qrow * QBLOCK < numel
        offs = qrow[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        mask = offs < numel
        p, g, p_old, g_raw = _param_and_grad(tensors, row, offs, mask, grad_scale, clip_coef, wd, P_DTYPE, G_DTYPE,
                                             COMP, WD_MODE, MAXIMIZE, HAS_SCALE, HAS_CLIP, False, True)
        s0 = _load_slot(tensors, row, 0, offs, mask, qrow, qmask, code_signed, code_unsigned, p,
                        S_DTYPE, STATES, CODED, SIGNED)
        s1 = _load_slot(tensors, row, 1, offs, mask, qrow, qmask, code_signed, code_unsigned, p,
                        S_DTYPE, STATES, CODED, SIGNED)
        s2 = _load_slot(tensors, row, 2, offs, mask, qrow, qmask, code_signed, code_unsigned, p,
                        S_DTYPE, STATES, CODED, SIGNED)
        s3 = _load_slot(tensors, row, 3, offs, mask, qrow, qmask, code_signed, code_unsigned, p,
                        S_DTYPE, STATES, CODED, SIGNED)
        p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, O0, O1, O2)
        _store_slot(tensors, row, 0, offs, mask, qrow, qmask, s0, mid_signed, mid_unsigned,
                    S_DTYPE, STATES, CODED, SIGNED)
        _store_slot(tensors, row, 1, offs, mask, qrow, qmask, s1, mid_signed, mid_unsigned,
                    S_DTYPE, STATES, CODED, SIGNED)
        _store_slot(tensors, row, 2, offs, mask, qrow, qmask, s2, mid_signed, mid_unsigned,
                    S_DTYPE, STATES, CODED, SIGNED)
        _store_slot(tensors, row, 3, offs, mask, qrow, qmask, s3, mid_signed, mid_unsigned,
                    S_DTYPE, STATES, CODED, SIGNED)
        rand_offs = (offs + row * 0x9E3779B1).to(tl.uint32)
        p_new = _write_param(tensors, row, offs, mask, p, seed, rand_offs, P_DTYPE, WRITE, False, True)
        if STATS:
            _accumulate_stats(stats, row, mask, g_raw, p_old, p_new, s0, s1, s2, s3, V_SLOT)


# ----------------------------------------------------------------------------- host side

INTERPRETED = not isinstance(elementwise_kernel, triton.runtime.jit.JITFunction)  # TRITON_INTERPRET=1 at import
LAUNCHES: Counter = Counter()  # launches per (kernel, constexpr arguments): one entry per specialisation
_TABLES: dict[tuple, Tensor] = {}
_MAX_TABLES = 64


def _cached(key: tuple, build: Callable[[], Tensor]) -> Tensor:
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = build()
    return table


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    """An asynchronous copy (from pinned memory) on CUDA: building a table never waits for the GPU."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _block_table(numels: Sequence[int], unit: int, device: torch.device) -> Tensor:
    """``(tensor row, first element)`` of every program: ceil(numel / unit) programs per tensor."""
    def build() -> Tensor:
        counts = torch.tensor([-(-n // unit) for n in numels], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(rows.numel()) - first[rows]) * unit
        return _to_device(torch.stack([rows, starts], dim=1).contiguous(), device)
    return _cached(("blocks", tuple(numels), unit, device), build)


def _tensor_table(rows: list[list[int]], device: torch.device) -> Tensor:
    flat = tuple(v for r in rows for v in r)
    return _cached(("tensors", flat, device),
                   lambda: _to_device(torch.tensor(flat, dtype=torch.int64).view(-1, WIDTH), device))


@dataclass
class Bucket:
    """Tensors of one launch: same device, dtypes, step, precision and state coding."""

    device: torch.device
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    s_dtype: torch.dtype
    comp: bool  # a Kahan buffer is added to p when loaded
    write: int  # WRITE_NEAREST / WRITE_KAHAN / WRITE_STOCHASTIC
    coded: int  # bitmask of 8-bit slots
    signed: int  # bitmask of signed 8-bit slots
    v_slot: int = -1  # the slot whose sum op.telemetry reads as the second moment (-1: none)
    rows: list[list[int]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # the position of each row's parameter in ``params``
    aligned: bool = True  # every address 16-byte aligned: vector loads in full chunks


def launch(plan: Plan, bucket: Bucket, *, wd_mode: int, wd: float, maximize: bool,
           grad_scale: Tensor | None, clip_coef: Tensor | None, found_inf: Tensor | None,
           stats: Tensor | None = None) -> None:
    """One kernel launch for every tensor of ``bucket``.

    ``stats``: a zeroed fp32 ``(len(bucket.rows), 4)`` tensor that receives, per tensor, the sums
    of g^2, (new p - old p)^2, old p^2 and of the second moment (slot ``bucket.v_slot``).
    """
    numels = [row[COL_NUMEL] for row in bucket.rows]
    if sum(numels) == 0:
        return
    device = bucket.device
    tensors = _tensor_table(bucket.rows, device)
    unused = tensors  # any pointer: never read
    seed = torch.randint(0, 2**31 - 1, (1,), device=device) if bucket.write == WRITE_STOCHASTIC else unused
    pointers = [unused if t is None else t.to(device) for t in (grad_scale, clip_coef, found_inf)] + [seed]
    pointers.append(unused if stats is None else stats)
    scalars = [float(h) for h in plan.scalars] + [0.0] * (SCALARS - len(plan.scalars))
    constexprs = dict(
        UPDATE=plan.update, O0=int(plan.options[0]), O1=int(plan.options[1]), O2=int(plan.options[2]),
        P_DTYPE=TL_DTYPES[bucket.p_dtype], G_DTYPE=TL_DTYPES[bucket.g_dtype], S_DTYPE=TL_DTYPES[bucket.s_dtype],
        STATES=sum(1 << i for i, name in enumerate(plan.slots) if name is not None), COMP=bucket.comp,
        WRITE=bucket.write, WD_MODE=wd_mode, MAXIMIZE=bool(maximize),
        HAS_SCALE=grad_scale is not None, HAS_CLIP=clip_coef is not None, HAS_FOUND_INF=found_inf is not None,
        STATS=stats is not None, V_SLOT=bucket.v_slot if stats is not None else -1,
    )
    if bucket.coded:
        blocks = _block_table(numels, QROWS * QBLOCK, device)
        maps = [*_midpoints(True, device), *_midpoints(False, device)]  # code and midpoints, signed and unsigned
        constexprs.update(CODED=bucket.coded, SIGNED=bucket.signed, QROWS=QROWS, QBLOCK=QBLOCK)
        LAUNCHES[("blockwise8bit_kernel", _key(constexprs))] += 1
        blockwise8bit_kernel[(blocks.shape[0],)](tensors, blocks, *pointers, float(wd), *maps, *scalars, **constexprs,
                                                 num_warps=4, **LAUNCH_OPTIONS)
    else:
        blocks = _block_table(numels, BLOCK, device)
        constexprs.update(ALIGNED=bucket.aligned, BLOCK=BLOCK)
        LAUNCHES[("elementwise_kernel", _key(constexprs))] += 1
        elementwise_kernel[(blocks.shape[0],)](tensors, blocks, *pointers, float(wd), *scalars, **constexprs,
                                               num_warps=NUM_WARPS, **LAUNCH_OPTIONS)


def _key(constexprs: dict) -> tuple:
    return tuple((k, getattr(v, "__name__", str(v))) for k, v in sorted(constexprs.items()))


def compiled_variants() -> int | None:
    """How many binaries the two kernels have compiled so far (None under the interpreter)."""
    total = 0
    for kernel in (elementwise_kernel, blockwise8bit_kernel):
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        total += sum(len(entry[0]) for entry in caches.values())
    return total


# ----------------------------------------------------------------------------- the host step driver


def bias_correction(beta: float, step: float) -> float:
    """``1 - beta ** step``, as optimizers/common.py (kernels may not import optimizers/)."""
    return 1 - beta**step


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots from ``data_ptr``."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _weight_decay(mode: str | None, weight_decay: float, lr: float) -> tuple[int, float]:
    """``(WD_MODE, value)`` as optimizers/common.apply_weight_decay applies it."""
    if not weight_decay or mode is None:
        return WD_NONE, 1.0
    if mode == "l2":
        return WD_L2, float(weight_decay)
    if mode == "decoupled":
        return WD_MULTIPLY, 1 - lr * weight_decay
    if mode == "fixed":
        return WD_MULTIPLY, 1 - weight_decay
    raise ValueError(f"invalid weight decay mode: {mode!r}")


def _compensation(option: str | None, dtype: torch.dtype) -> str | None:
    """optimizers/precision.resolve_compensation: the compensation used for parameters of ``dtype``."""
    if option is None or dtype not in (torch.bfloat16, torch.float16):
        return None
    return "kahan" if option == "auto" else option


def _slots(plan: Plan, p: Tensor, state: dict, codecs: dict, where: str) -> tuple[list[int], list[int], int, int, set]:
    """Addresses of the states in the plan's slots (and of 8-bit absmaxes), the 8-bit masks, float dtypes."""
    addresses, absmaxes, coded, signed, dtypes = [0] * SLOTS, [0] * SLOTS, 0, 0, set()
    for slot, name in enumerate(plan.slots):
        if name is None:
            continue
        value = state[name]
        if name in codecs:
            codec, absmax = codecs[name], state.get(f"{name}_absmax")
            if type(codec).__name__ != "Blockwise8bit" or getattr(codec, "block_size", None) != QBLOCK:
                raise TypeError(f"triton backend: state {name!r} of {where} uses {codec!r}, which has no kernel")
            if not (p.is_contiguous() and value.is_contiguous() and absmax.is_contiguous()):
                raise ValueError(f"triton backend: 8-bit states need a contiguous parameter ({where}, "
                                 f"strides {p.stride()})")
            coded |= 1 << slot
            signed |= int(bool(codec.signed)) << slot
            addresses[slot], absmaxes[slot] = value.data_ptr(), absmax.data_ptr()
            continue
        value = _real(value)
        if not _same_layout(value, _real(p)):
            raise ValueError(f"triton backend: state {name!r} of {where} has shape {tuple(value.shape)} and strides "
                             f"{value.stride()}, unlike the parameter's {p.stride()}")
        dtypes.add(value.dtype)
        addresses[slot] = value.data_ptr()
    return addresses, absmaxes, coded, signed, dtypes


def run(algorithm, optimizer, group: dict, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict],
        grad_scale: Tensor | None, found_inf: Tensor | None, clip_coef: Tensor | None,
        stats: Tensor | None = None, second_moment: Callable[[Tensor, dict], str | None] | None = None) -> None:
    """Bucket ``params`` by (device, dtypes, step, precision, 8-bit states) and launch once per bucket.

    Every parameter is checked before the first launch, so an error leaves everything unchanged.
    ``stats`` (fp32, ``(len(params), 4)``, zeroed) receives op.telemetry's per-parameter sums
    (see ``launch``); ``second_moment(p, state)`` names the state summed in the fourth column.
    """
    plans: dict[float, Plan] = {}
    buckets: dict[tuple, tuple[Plan, Bucket]] = {}
    for index, (p, g, state) in enumerate(zip(params, grads, states)):
        where = f"parameter {index} (shape {tuple(p.shape)}, dtype {p.dtype})"
        step = float(state["step"])
        plan = plans.get(step) or plans.setdefault(step, algorithm.plan(group, step))
        mode = _compensation(group.get("compensation"), p.dtype)
        upcast = mode is not None or optimizer.state_dtype(p, group) != p.dtype  # as the step machinery's _apply
        comp = state.get("compensation") if upcast else None
        if mode == "stochastic" and p.dtype != torch.bfloat16:
            raise TypeError(f"triton backend: stochastic rounding is implemented for bf16 parameters only ({where})")
        write = (WRITE_STOCHASTIC if mode == "stochastic" else
                 WRITE_KAHAN if mode == "kahan" and comp is not None else WRITE_NEAREST)
        if g.device != p.device or g.shape != p.shape:
            raise ValueError(f"triton backend: the gradient of {where} has shape {tuple(g.shape)} on {g.device}")
        if not _dense(p):
            raise ValueError(f"triton backend: {where} is not dense in memory (strides {p.stride()}); "
                             "use a contiguous parameter or backend='foreach'")
        if not _same_layout(g, p):  # e.g. a contiguous gradient of a channels_last parameter: one extra copy
            g = torch.empty_like(p, dtype=g.dtype).copy_(g)
        addresses, absmaxes, coded, signed, dtypes = _slots(plan, p, state, optimizer.state_codecs(p, group), where)
        if len(dtypes) > 1:
            raise TypeError(f"triton backend: the states of {where} have mixed dtypes {sorted(map(str, dtypes))}")
        s_dtype = dtypes.pop() if dtypes else torch.float32
        rp, rg = _real(p), _real(g)
        for what, dtype in (("parameter", rp.dtype), ("gradient", rg.dtype), ("states", s_dtype)):
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"triton backend: the {what} of {where} have dtype {dtype}; kernels take fp32, "
                                "bf16 and fp16 (use backend='foreach')")
        row = [rp.numel(), rp.data_ptr(), rg.data_ptr(), _real(comp).data_ptr() if comp is not None else 0,
               *addresses, *absmaxes]
        v_name = second_moment(p, state) if stats is not None and second_moment is not None else None
        v_slot = plan.slots.index(v_name) if v_name is not None and v_name in plan.slots else -1
        if v_slot >= 0 and (coded >> v_slot) & 1:  # an 8-bit second moment: left out, as op.telemetry does
            v_slot = -1
        key = (p.device, rp.dtype, rg.dtype, s_dtype, comp is not None, write, coded, signed, v_slot, step)
        if key not in buckets:
            buckets[key] = (plan, Bucket(*key[:-1]))
        bucket = buckets[key][1]
        bucket.rows.append(row)
        bucket.indices.append(index)
        bucket.aligned &= all(address % 16 == 0 for address in row[COL_P:])
    lr, weight_decay = group.get("lr", 0.0), group.get("weight_decay", 0.0)
    wd_mode, wd = _weight_decay(optimizer.weight_decay_mode(group), weight_decay, lr)
    for plan, bucket in buckets.values():
        sums = None if stats is None else torch.zeros(len(bucket.rows), 4, dtype=torch.float32, device=bucket.device)
        launch(plan, bucket, wd_mode=wd_mode, wd=wd, maximize=bool(group.get("maximize")),
               grad_scale=grad_scale, clip_coef=clip_coef, found_inf=found_inf, stats=sums)
        if sums is not None:
            stats[bucket.indices] = sums.to(stats.device)
