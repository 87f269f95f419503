"""The recorded update of ``backend="compiled"`` written out as one C++ loop over a whole bucket.

:mod:`optim_plugins.kernels.compiled` records an optimizer's ``update`` as a program of
elementwise operations (its ``_OPS`` table). Where the slots of a bucket are float32 and bfloat16
(computed in float) or all float64, on CPU, this module prints that program as the body of a plain
C++ loop, compiles it with the system compiler (-O3, ATen's vector ISA flags; about 0.5 s, cached
on disk per program) and loads it with ctypes. One call steps every tensor of the bucket inside
one OpenMP region, each thread taking its share of each tensor: no per-tensor call, no Python
between tensors. Measured against Inductor's code for the same programs (kernels/compiled.py):
Inductor's loops ran 10-15% slower than ATen's fused AdamW and each compiled call cost ~65 us of
Dynamo and AOTAutograd host time; these loops run at the fused kernel's speed
(``benchmarks/results.md``).

The operations mean what ``_OPS`` says they mean (same formulas, same operation order, no
contraction into FMAs except ``add``'s ``x + alpha * y``, one FMA as in ATen's vectorized add;
``sqrt`` and ``/`` correctly rounded), NaN as torch treats it
(``clamp_min``, ``clamp_max`` and ``maximum`` propagate it, ``sign(nan) == 0``), bfloat16 values
computed in float and rounded once where stored (as Inductor does); numbers agree with the
reference backend to fp32 rounding (bf16 rounding where states or parameters are bf16). Scalars
are rounded to the work type once per step, as the compiled path does.

Two things besides the update can live in the same pass: a bf16 parameter's Kahan compensation
(read with it, written after it) and 8/4-bit block-wise states (``Coded`` slots: the blocks of a run
of ``RUN`` elements decoded into a stack buffer before the run's update and coded after it by
``codec.h``, the coding quantize.cpp uses, so the bytes are those of the three separate passes).
Rank-1 4-bit states of 2-D tensors too, in a second pass: their scale needs the new row and column
maxima first (see ``_RANK1_BEFORE``).
"""
from __future__ import annotations

import array
import ctypes
import functools
import itertools
import subprocess
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import CAPABILITY_FLAGS, _cached_library, _compiler, unavailable_reason

__all__ = ["loop_for", "covers", "Coded", "LoopStep"]

_HERE = Path(__file__).parent  # codec.h
RUN = 1024  # elements a loop with sums or coded states runs at a time (coded: whole blocks; see _BLOCK_LOOP)
RANK1_BLOCK = 128  # the share granularity of a loop whose only coded states are rank-1 (even: whole bytes)
# per slot dtype: how it is stored, the type the loop computes in, how it is loaded and stored
_C_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "uint16_t"}
_WORK_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "float"}
_LOAD = {torch.float32: "{}", torch.float64: "{}", torch.bfloat16: "bf16_load({})"}
_STORE = {torch.float32: "{}", torch.float64: "{}", torch.bfloat16: "bf16_bits({})"}

# How each operation of compiled._OPS reads in C++ ({0}, {1}, ...: the operands, already names).
_EXPRESSIONS = {
    "add": "std::fma({1}, {2}, {0})",  # as ATen's vectorized add(x, y, alpha): fmadd(y, alpha, x)
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "lerp": "lerp2({0}, {1}, {2})",
    "lerp_low": "{0} + {2} * ({1} - {0})",
    "lerp_high": "{1} - ({1} - {0}) * (T(1) - {2})",
    "addcmul": "{0} + {3} * {1} * {2}",
    "addcdiv": "{0} + {3} * {1} / {2}",
    "sqrt": "std::sqrt({0})",
    "reciprocal": "T(1) / {0}",
    "abs": "std::fabs({0})",
    "neg": "-{0}",
    "sign": "T(({0} > T(0)) - ({0} < T(0)))",
    "clone": "{0}",
    "clamp_min": "clamp_min({0}, {1})",
    "clamp_max": "clamp_max({0}, {1})",
    "maximum": "maximum({0}, {1})",
    "zero": "T(0)",
    "copy": "{1}",
    "to": "{0}",
}

_PRELUDE = """\
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

typedef {ctype} T;
// bfloat16 as torch (c10::BFloat16) reads it and rounds to it: to nearest even, NaN to 0x7FC0
static inline float bf16_load(uint16_t x) {{ uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }}
static inline uint16_t bf16_bits(float f) {{
  uint32_t u; std::memcpy(&u, &f, 4);
  return f != f ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}}
static inline float bf16_round(float f) {{ return bf16_load(bf16_bits(f)); }}
static inline T lerp2(T a, T b, T w) {{ return std::fabs(w) < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w); }}
// one select each (GCC vectorizes it); a NaN operand gives NaN, as in torch
static inline T clamp_min(T x, T m) {{ return (x < m || m != m) ? m : x; }}
static inline T clamp_max(T x, T m) {{ return (x > m || m != m) ? m : x; }}
static inline T maximum(T a, T b) {{ return (a < b || b != b) ? b : a; }}

constexpr int64_t SLOTS = {slots}, SUMS = {sums}, LINE = {line}, MIN_SHARE = 4096;  // elements
constexpr int64_t BLOCK = {block}, GROUP = {group};  // elements
{codec}
extern "C" void step(int64_t n, void* const* ptrs, const int64_t* sizes, const double* scalars, int threads,
                     const void* const* maps, float* scratch) {{
{constants}
{parallel}{before}{tensors}{pointers}
{step_loop}
  }}{after} }}
}}

// The same step, also writing each thread's sums over its share of tensor t to
// partial[(thread * n + t) * SUMS + k]: g^2 (the gradient slot as stored), (new p - old p)^2, old p^2,
// and the new value of each state slot. Summed in T over runs of GROUP elements, in double across them.
extern "C" void step_sums(int64_t n, void* const* ptrs, const int64_t* sizes, const double* scalars, int threads,
                          const void* const* maps, float* scratch, double* partial) {{
{constants}
{parallel}{before}{tensors}{pointers}
    double total[SUMS] = {{}};
{sums_loop}
    for (int64_t k = 0; k < SUMS; ++k) partial[(me * n + t) * SUMS + k] = total[k];
  }}{after} }}
}}
"""

# The loop over a thread's share without coded states: one vectorized pass.
_STEP_LOOP = """\
    #pragma omp simd
    for (int64_t d = begin; d < end; ++d) {{
{body}
    }}"""

# With sums, or with coded states: GROUP elements at a time (a run of float sums; coded: whole blocks of
# BLOCK elements, decoded before the run and coded after it). Each run's sums end in a horizontal add
# per sum: runs of 1024 elements, not one 256-element 8-bit block, took adam8bit's recording steps
# from +3.2% to +2.0% of an unrecorded one.
_BLOCK_LOOP = """\
    for (int64_t group = begin; group < end; group += GROUP) {{
      const int64_t stop = group + GROUP < end ? group + GROUP : end;
{decode}{accumulators}
      #pragma omp simd{reduction}
      for (int64_t d = group; d < stop; ++d) {{
{body}{summed}
      }}
{totals}{encode}
    }}"""

# Block-wise 8/4-bit states (kernels/quantize.py's formats): decoded into a stack buffer before a block's
# update, coded from another after it, by codec.h (quantize.cpp's coding: the same bytes).
_CODEC = """\
#include "codec.h"
namespace codec = optim_plugins_codec;
"""

# Opens the parallel region, then the loop over tensors; each thread steps one contiguous share of
# every tensor (at least MIN_SHARE elements, in whole cache lines), the shares of small tensors
# rotated over the threads. Closed by "} }" in the functions above.
_PARALLEL = """\
  #pragma omp parallel num_threads(threads)
  { const int64_t workers = omp_get_num_threads(), me = omp_get_thread_num();
"""
_SHARES = """\
  for (int64_t t = 0; t < n; ++t) {
    const int64_t size = sizes[t];
    int64_t share = (size + workers - 1) / workers;
    share = share < MIN_SHARE ? MIN_SHARE : (share + LINE - 1) / LINE * LINE;  // coded: LINE = a block
    const int64_t begin = ((me + t) % workers) * share;
    const int64_t end = begin + share < size ? begin + share : size;
"""


# Rank-1 4-bit states (codec.h decode_rank1, code_rank1): an element's scale is the minimum of its row's
# and its column's maximum of the new values, known only once every new value is: a first pass computes
# them (the program up to those values, nothing stored; each thread into its own row of `scratch`,
# merged into the first after), then the step decodes with the old maxima and codes with the new ones,
# which replace the old at the end. A tensor's maxima are rows + cols floats, the rows of `scratch`
# that many apart; sizes[n + t] is tensor t's number of columns.
_RANK1_BEFORE = """\
  {{ int64_t at = 0;  // pass 1: each thread's maxima of the new values of its share, in its row
{tensors}
    const int64_t cols = sizes[n + t], rows = cols ? size / cols : 0;
{pointers}
{parts}
    for (int64_t group = begin; group < end; group += GROUP) {{
      const int64_t stop = group + GROUP < end ? group + GROUP : end;
{decode}
      #pragma omp simd
      for (int64_t d = group; d < stop; ++d) {{
{body}
      }}
{maxima}
    }}
  }} }}
  #pragma omp barrier
  {{ int64_t at = 0;  // the threads' rows merged into the first, each thread a range of the maxima
  for (int64_t t = 0; t < n; ++t) {{
    const int64_t cols = sizes[n + t], m = (cols ? sizes[t] / cols : 0) + cols;
{merge}
  }} }}
  #pragma omp barrier
  int64_t at = 0;  // the step: decoded with the old maxima, coded with the new ones
"""
_RANK1_AFTER = """
  #pragma omp barrier
  {{ int64_t at = 0;  // the new maxima replace the old
  for (int64_t t = 0; t < n; ++t) {{
    const int64_t cols = sizes[n + t], m = (cols ? sizes[t] / cols : 0) + cols;
{replace}
  }} }}"""
_MERGE = """\
    {{ float* __restrict__ all = scratch + at; at += threads * m;
      for (int64_t i = me * m / workers; i < (me + 1) * m / workers; ++i)
        for (int64_t w = 1; w < workers; ++w) all[i] = codec::nan_maximum(all[i], all[w * m + i]); }}"""
_REPLACE = """\
    {{ float* __restrict__ maxima = static_cast<float*>(ptrs[t * SLOTS + {index}]);
      const float* __restrict__ fresh = scratch + at; at += threads * m;
      for (int64_t i = me * m / workers; i < (me + 1) * m / workers; ++i) maxima[i] = fresh[i]; }}"""


class Coded(NamedTuple):
    """A state slot kept block-wise in 8 or 4 bits (the formats of kernels/quantize.py): its input is
    the uint8 codes, and the slot's absmax (fp32, one per block; rank-1: the maxima of its rows, then of
    its columns) follows the slots in each tensor's inputs."""

    slot: int
    kind: str  # the code map: a name kernels.quantize._search knows
    block_size: int
    bits: int  # 8: one code per byte; 4: two per byte, the even element in the high nibble
    positive_not_zero: bool = False  # a positive value never codes to 0 (8-bit second moments)
    rank1: bool = False  # rank-1 4-bit of a 2-D tensor (kind "linear4", block_size 0): its side tensor is the maxima


class LoopStep:
    """A compiled loop: ``step(inputs, scalars)`` runs the program on every tensor of ``inputs``
    (a list, per tensor, of its slots' contiguous CPU tensors, in the dtypes it was built for; with
    coded slots, then each coded slot's absmax; with Kahan, then the compensation)."""

    def __init__(self, library: ctypes.CDLL, slots: int, sums: int, maps: Sequence[Tensor] = (),
                 maxima: Sequence[int] = ()):
        """``maxima``: the input index of each rank-1 slot's maxima (its side tensor)."""
        self._step, self._step_sums = library.step, library.step_sums
        arguments = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_void_p]
        for function, extra in ((self._step, []), (self._step_sums, [ctypes.c_void_p])):
            function.restype, function.argtypes = None, arguments + extra
        self.slots, self.sums, self._maxima = slots, sums, tuple(maxima)
        self._maps = list(maps)  # kept alive: the loop reads them through the pointers below
        self._map_pointers = (ctypes.c_void_p * max(len(maps), 1))(*(t.data_ptr() for t in maps))

    def __call__(self, inputs: Sequence[Sequence[Tensor]], scalars: Sequence[float]) -> None:
        arguments = self._arguments(inputs, scalars)  # (the last: the scratch, held here through the call)
        self._step(*arguments[:-1])

    def with_sums(self, inputs: Sequence[Sequence[Tensor]], scalars: Sequence[float]) -> Tensor:
        """The step, and per tensor (rows, float64): sum g^2 of the gradient slot as stored, sum of
        (new p - old p)^2, sum old p^2, and the sum of each state slot's new value (slot 2, 3, ...;
        of a coded slot: the value before it is coded)."""
        arguments = self._arguments(inputs, scalars)  # (the last: the scratch, held here through the call)
        threads = arguments[4]
        partial = torch.zeros(threads, len(inputs), self.sums, dtype=torch.float64)  # one row block per thread
        self._step_sums(*arguments[:-1], partial.data_ptr())
        return partial.sum(0)

    def _arguments(self, inputs: Sequence[Sequence[Tensor]], scalars: Sequence[float]) -> tuple:
        # filled by array.array (C loops; a ctypes array takes its values one Python call each), then
        # seen as ctypes arrays over the same memory, which keep it alive through the call
        addresses = array.array("q", map(Tensor.data_ptr, itertools.chain.from_iterable(inputs)))
        numels = array.array("q", map(Tensor.numel, next(zip(*inputs), ())))
        threads, scratch = torch.get_num_threads(), None
        if self._maxima:  # each tensor's columns after the sizes; a zeroed row of maxima per thread and slot
            numels.extend([self._columns(tensors) for tensors in inputs])
            scratch = torch.zeros(threads * sum(t[k].numel() for t in inputs for k in self._maxima))
        pointers = (ctypes.c_void_p * len(addresses)).from_buffer(addresses)
        sizes = (ctypes.c_int64 * len(numels)).from_buffer(numels)
        values = (ctypes.c_double * max(len(scalars), 1))(*scalars)
        return (len(inputs), pointers, sizes, values, threads, self._map_pointers,
                None if scratch is None else scratch.data_ptr(), scratch)

    def _columns(self, tensors: Sequence[Tensor]) -> int:
        """The columns of a tensor with rank-1 slots: its parameter's last size, checked against the maxima."""
        p = tensors[0]
        if p.dim() != 2 or any(tensors[k].numel() != sum(p.shape) for k in self._maxima):
            raise ValueError(f"rank-1 states need a 2-D parameter and maxima of rows + cols floats, got a "
                             f"parameter of shape {tuple(p.shape)} and maxima of "
                             f"{[tensors[k].numel() for k in self._maxima]}")
        return p.shape[1]


def source(program: tuple, mutated: tuple, dtypes: Sequence[torch.dtype], n_scalars: int,
           kahan: bool = False, coded: Sequence[Coded] = ()) -> str | None:
    """The C++ source of ``program`` for input slots of ``dtypes``; None where an operation, an operand
    or a dtype is outside what the loop can express (the caller then takes Inductor's path).

    float64 slots compute in double; float32 and bfloat16 slots in float, as Inductor computes them:
    a bfloat16 value is rounded (to nearest even, as torch) where it is stored and where the program
    converts to bfloat16 explicitly, not after every operation as eager bfloat16 arithmetic does
    (rounding each intermediate doubled the step time of a bf16 AdamW), so this agrees with the
    reference backend to bfloat16 rounding.

    ``kahan``: slot 0 is a bfloat16 parameter whose Kahan compensation (bfloat16, the last pointer of
    a tensor) is added to it when read and holds what rounding the new value into it lost when
    written: precision.working_copy and write_back, in the same pass.

    ``coded``: float32 state slots kept block-wise in 8/4 bits: the loop runs ``RUN`` elements (whole
    blocks) at a time, decoding their codes into a stack buffer, computing the program on it and coding
    the new values back block by block (each block's absmax first), so the states never exist in fp32
    outside the cache. The bytes
    are those of decoding, stepping and coding in three passes (codec.h, which quantize.cpp uses too).
    ``Coded.rank1`` slots (rank-1 4-bit, linear map, of 2-D tensors, mutated by the program): a first pass
    finds their new row and column maxima, then the step codes them with those (``_RANK1_BEFORE``).
    """
    work = {_WORK_TYPES.get(dtype) for dtype in dtypes}
    if len(work) != 1 or None in work or (kahan and dtypes[0] != torch.bfloat16):
        return None
    ctype = work.pop()
    block = RUN  # the run of float sums in step_sums; with coded slots, their block
    rank1 = [c for c in coded if c.rank1]
    if coded:
        blocks = {c.block_size for c in coded if not c.rank1} or {RANK1_BLOCK}
        if (len(blocks) != 1 or any(c.slot < 2 or dtypes[c.slot] != torch.float32 or c.bits not in (4, 8)
                                    for c in coded)
                or any(c.bits != 4 or c.kind != "linear4" or c.slot not in mutated for c in rank1)):
            return None
        block = blocks.pop()
        if block <= 0 or block % 2 or 4096 % block:  # whole blocks per share (MIN_SHARE 4096), whole byte pairs
            return None
    by_slot = {c.slot: c for c in coded}
    names = [f"s{slot}" for slot in range(len(dtypes))]  # the current value of each slot, by name
    body = [f"        const T s{slot} = " + (f"decoded{slot}[d - group];" if slot in by_slot else
                                              f"{_LOAD[dtype].format(f'p{slot}[d]')};")
            for slot, dtype in enumerate(dtypes)]
    needs = {f"s{slot}": {f"s{slot}"} for slot in range(len(dtypes))}  # each value and those it is computed from
    compensation = len(dtypes) + len(coded)  # its pointer's index (kahan): after the coded slots' absmax
    if kahan:
        body[0] = f"        const T s0 = bf16_load(p0[d]) + bf16_load(p{compensation}[d]);"
    for index, (op, dst, *args) in enumerate(program):
        name = op.rstrip("_")
        operands, target = [], None
        for kind, value in args:
            if kind == "s":
                operands.append(names[value])
            elif kind == "c":
                operands.append(f"c{value}")
            elif kind == "k" and name == "to" and _WORK_TYPES.get(value) == ctype:
                target = value
            else:
                return None
        expression = _EXPRESSIONS.get(name)
        if expression is None:
            return None
        text = expression.format(*operands)
        needs[f"v{index}"] = {f"v{index}"}.union(*(needs.get(o, ()) for o in operands))
        body.append(f"        const T v{index} = {'bf16_round(' + text + ')' if target == torch.bfloat16 else text};")
        if dst < len(names):
            names[dst] = f"v{index}"
        else:
            names.append(f"v{index}")
    stored = [slot for slot in mutated if not (kahan and slot == 0)]
    body += [f"        new{slot}[d - group] = {names[slot]};" if slot in by_slot else
             f"        p{slot}[d] = {_STORE[dtypes[slot]].format(names[slot])};" for slot in stored]
    if kahan:  # p <- round(new); compensation <- round(new - p)
        body += [f"        const uint16_t rounded = bf16_bits({names[0]});", "        p0[d] = rounded;",
                 f"        p{compensation}[d] = bf16_bits({names[0]} - bf16_load(rounded));"]
    slots = len(dtypes)
    sums = range(3 + slots - 2)  # g^2, change^2, p^2, each state slot's new value
    # squares accumulated by FMAs: the sums cost ~2% of the loop's time instead of ~5% (Lion, 22M)
    summed = ["        a0 = std::fma(s1, s1, a0);", f"        const T change = {names[0]} - s0;",
              "        a1 = std::fma(change, change, a1);", "        a2 = std::fma(s0, s0, a2);",
              *(f"        a{3 + i} += {names[2 + i]};" for i in range(slots - 2))]
    c_types = [*("uint8_t" if slot in by_slot else _C_TYPES[dtype] for slot, dtype in enumerate(dtypes)),
               *["float"] * len(coded), *["uint16_t"] * kahan]
    absmax = {c.slot: slots + j for j, c in enumerate(coded)}  # the pointer index of each coded slot's absmax
    pointers = [f"    {c_type}* __restrict__ p{k} = static_cast<{c_type}*>(ptrs[t * SLOTS + {k}]);"
                for k, c_type in enumerate(c_types)]
    tables = [f"  const float* const values{c.slot} = static_cast<const float*>(maps[{2 * j}]);\n"
              f"  const int32_t* const table{c.slot} = static_cast<const int32_t*>(maps[{2 * j + 1}]);"
              for j, c in enumerate(coded)]
    each_block = ("      for (int64_t block = group; block < stop; block += BLOCK) {{\n"
                  "        const int64_t count = block + BLOCK < stop ? BLOCK : stop - block;\n{}      }}\n")
    decode = "".join(f"      alignas(64) float decoded{c.slot}[GROUP], new{c.slot}[GROUP];\n" for c in coded)
    decode += _decodes(coded, absmax, each_block)
    encode = "".join(f"        codec::code_block<{c.bits}, {str(c.positive_not_zero).lower()}>("
                     f"new{c.slot} + (block - group), block, count, table{c.slot}, p{c.slot}, "
                     f"p{absmax[c.slot]} + block / BLOCK);\n"
                     for c in coded if c.slot in stored and not c.rank1)
    encode = "\n" + each_block.format(encode).rstrip("\n") if encode else ""
    before = after = ""
    if rank1:
        encode += "".join(f"\n      codec::code_rank1(new{c.slot}, group, stop - group, cols, fresh{c.slot}, "
                          f"fresh{c.slot} + rows, p{c.slot});" for c in rank1)
        before = _rank1_pass(body, [names[c.slot] for c in rank1], needs, rank1, coded, absmax, pointers, each_block)
        after = _RANK1_AFTER.format(replace="\n".join(_REPLACE.format(index=absmax[c.slot]) for c in rank1))
        pointers = [*pointers, "    const int64_t cols = sizes[n + t], rows = cols ? size / cols : 0;",
                    *(f"    const float* __restrict__ fresh{c.slot} = scratch + at; at += threads * (rows + cols);"
                      for c in rank1)]
    blocks = dict(decode=decode, encode=encode, body="\n".join(body))
    no_sums = dict(accumulators="", reduction="", summed="", totals="")
    with_sums = dict(accumulators="      " + " ".join(f"T a{k} = 0;" for k in sums),
                     reduction=" reduction(+: " + ", ".join(f"a{k}" for k in sums) + ")",
                     summed="\n" + "\n".join(summed), totals="\n".join(f"      total[{k}] += a{k};" for k in sums))
    return _PRELUDE.format(
        ctype=ctype, slots=len(c_types), sums=3 + slots - 2, line=block if coded else 64, block=block,
        group=max(block, RUN),
        codec=_CODEC if coded else "", parallel=_PARALLEL, before=before, tensors=_SHARES, after=after,
        constants="\n".join([*(f"  const T c{i} = T(scalars[{i}]);" for i in range(n_scalars)), *tables]),
        pointers="\n".join(pointers),
        step_loop=_BLOCK_LOOP.format(**blocks, **no_sums) if coded else _STEP_LOOP.format(body=blocks["body"]),
        sums_loop=_BLOCK_LOOP.format(**blocks, **with_sums))


def _decodes(coded: Sequence[Coded], absmax: dict[int, int], each_block: str) -> str:
    """The statements that decode the run's values of ``coded`` slots into their ``decoded`` buffers:
    block-wise ones block by block, rank-1 ones the run at once (the maxima being those before the step)."""
    blockwise = "".join(f"        codec::decode<{c.bits}>(p{c.slot}, block, count, p{absmax[c.slot]}[block / BLOCK], "
                        f"values{c.slot}, decoded{c.slot} + (block - group));\n" for c in coded if not c.rank1)
    return (each_block.format(blockwise) if blockwise else "") + "".join(
        f"      codec::decode_rank1(p{c.slot}, group, stop - group, cols, p{absmax[c.slot]}, "
        f"p{absmax[c.slot]} + rows, decoded{c.slot});\n" for c in coded if c.rank1)


def _rank1_pass(body: list[str], values: list[str], needs: dict[str, set[str]], rank1: list[Coded],
                coded: Sequence[Coded], absmax: dict[int, int], pointers: list[str], each_block: str) -> str:
    """The first pass of a program with rank-1 slots (``_RANK1_BEFORE``): the program's lines that their
    new ``values`` are computed from, the coded slots those read decoded, each thread's maxima raised."""
    wanted = set().union(*(needs[v] for v in values))
    read = [c for c in coded if f"s{c.slot}" in wanted]
    decode = "".join(f"      alignas(64) float decoded{c.slot}[GROUP];\n" for c in read)
    decode += "".join(f"      alignas(64) float new{c.slot}[GROUP];\n" for c in rank1)
    decode += _decodes(read, absmax, each_block)
    lines = [line for line in body if line.split()[:2] == ["const", "T"] and line.split()[2] in wanted]
    lines += [f"        new{c.slot}[d - group] = {value};" for c, value in zip(rank1, values)]
    return _RANK1_BEFORE.format(
        tensors=_SHARES.rstrip("\n"), pointers="\n".join(pointers), decode=decode.rstrip("\n"), body="\n".join(lines),
        parts="\n".join(f"    float* __restrict__ part{c.slot} = scratch + at + me * (rows + cols); "
                        f"at += threads * (rows + cols);" for c in rank1),
        maxima="\n".join(f"      codec::add_rank1_maxima(new{c.slot}, group, stop - group, cols, part{c.slot}, "
                         f"part{c.slot} + rows);" for c in rank1),
        merge="\n".join(_MERGE.format() for _ in rank1))


def _flags() -> list[str]:
    capability = [flag for flag in CAPABILITY_FLAGS[torch.backends.cpu.get_cpu_capability()] if not flag.startswith("-D")]
    # -fno-math-errno and -fno-trapping-math let GCC vectorize sqrt and the selects of maximum/clamp
    # (no result changes: errno and FP traps are never looked at); no contraction into FMAs
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
            "-ffp-contract=off", *capability]


def _build(text: str, out: Path) -> str | None:
    cpp = out.with_suffix(".cpp")
    cpp.write_text(text)
    job = subprocess.run([_compiler(), *_flags(), f"-I{_HERE}", str(cpp), "-o", str(out)], capture_output=True,
                         text=True)
    if job.returncode != 0:
        return f"{_compiler()} failed ({job.returncode}): {job.stderr.strip()[-2000:]}"
    return None


@functools.lru_cache(maxsize=None)
def _loop(text: str, slots: int, sums: int, coded: tuple[Coded, ...], maxima: tuple[int, ...]) -> LoopStep | str:
    header = (_HERE / "codec.h").read_text() if coded else ""  # what the source includes is part of the key
    built = _cached_library("loops/step", "\0".join([text, header, _compiler() or "", *_flags()]),
                            functools.partial(_build, text))
    if isinstance(built, str):
        return built
    return LoopStep(ctypes.CDLL(str(built)), slots, sums, [t for c in coded for t in _map(c.kind)], maxima)


def _map(kind: str) -> tuple[Tensor, Tensor | None]:
    """The code values of a map and its ``nearest_code_table`` (kernels/quantize.py; None: none can be made)."""
    from .. import quantize

    return quantize._search(kind, torch.device("cpu"))[0], quantize.nearest_code_table(kind)


def covers(dtypes: set[torch.dtype]) -> bool:
    """Whether slots of these dtypes can share a loop (one work type: float or double)."""
    return len({_WORK_TYPES.get(dtype) for dtype in dtypes}) == 1 and dtypes <= set(_WORK_TYPES)


def loop_for(program: tuple, mutated: tuple, dtypes: Sequence[torch.dtype], n_scalars: int, kahan: bool = False,
             coded: Sequence[Coded] = ()) -> LoopStep | str | None:
    """The compiled loop of ``program`` (built on first use), None where the program is outside what
    the loop expresses or no compiler is found here, or the build failure's message. ``kahan``: each
    tensor's inputs end with its parameter's Kahan compensation; ``coded``: slots kept in 8/4 bits,
    each tensor's inputs then end with their absmax tensors (see :func:`source`)."""
    if unavailable_reason() is not None or any(_map(c.kind)[1] is None for c in coded):
        return None
    coded = tuple(sorted(coded))
    text = source(program, mutated, dtypes, n_scalars, kahan, coded)
    maxima = tuple(len(dtypes) + j for j, c in enumerate(coded) if c.rank1)  # each rank-1 slot's side tensor
    return None if text is None else _loop(text, len(dtypes) + len(coded) + kahan, 3 + len(dtypes) - 2, coded, maxima)
