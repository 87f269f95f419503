"""The recorded update of ``backend="compiled"`` written out as one C++ loop over a whole bucket.

:mod:`optim_plugins.kernels.compiled` records an optimizer's ``update`` as a program of
elementwise operations (its ``_OPS`` table). Where every slot of a bucket is float32 (or every
slot float64) on CPU, this module prints that program as the body of a plain C++ loop, compiles
it with the system compiler (-O3, ATen's vector ISA flags; about 0.5 s, cached on disk per
program) and loads it with ctypes. One call steps every tensor of the bucket inside one OpenMP
region, each thread taking its share of each tensor: no per-tensor call, no Python between
tensors. Measured against Inductor's code for the same program (kernels/compiled.py): Inductor's
loop ran ~10% slower than ATen's fused AdamW and each compiled call cost ~65 us of Dynamo and
AOTAutograd host time; this loop runs at the fused kernel's speed (``benchmarks/results.md``).

The operations mean what ``_OPS`` says they mean (same formulas, same operation order, no
contraction into FMAs, ``sqrt`` and ``/`` correctly rounded), NaN as torch treats it
(``clamp_min``, ``clamp_max`` and ``maximum`` propagate it, ``sign(nan) == 0``); numbers agree
with the reference backend to fp32 rounding, as Inductor's do. Scalars are rounded to the
slots' dtype once per step, as the compiled path does.
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import CAPABILITY_FLAGS, _cached_library, _compiler, unavailable_reason

__all__ = ["loop_for", "LoopStep"]

_C_TYPES = {torch.float32: "float", torch.float64: "double"}

# How each operation of compiled._OPS reads in C++ ({0}, {1}, ...: the operands, already names).
_EXPRESSIONS = {
    "add": "{0} + {1} * {2}",
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
#include <omp.h>

typedef {ctype} T;
static inline T lerp2(T a, T b, T w) {{ return std::fabs(w) < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w); }}
static inline T clamp_min(T x, T m) {{ return x != x ? x : (x < m ? m : x); }}
static inline T clamp_max(T x, T m) {{ return x != x ? x : (x > m ? m : x); }}
static inline T maximum(T a, T b) {{ return a != a ? a : (b != b ? b : (a < b ? b : a)); }}

// ptrs[tensor * SLOTS + slot]; each thread steps one contiguous share of every tensor (at least
// MIN_SHARE elements, in whole cache lines), the shares of small tensors rotated over the threads.
extern "C" void step(int64_t n, void* const* ptrs, const int64_t* sizes, const double* scalars, int threads) {{
  constexpr int64_t SLOTS = {slots}, LINE = 64 / sizeof(T), MIN_SHARE = 4096;
{constants}
  #pragma omp parallel num_threads(threads)
  {{
    const int64_t workers = omp_get_num_threads(), me = omp_get_thread_num();
    for (int64_t t = 0; t < n; ++t) {{
      const int64_t size = sizes[t];
      int64_t share = (size + workers - 1) / workers;
      share = share < MIN_SHARE ? MIN_SHARE : (share + LINE - 1) / LINE * LINE;
      const int64_t begin = ((me + t) % workers) * share;
      const int64_t end = begin + share < size ? begin + share : size;
{pointers}
      #pragma omp simd
      for (int64_t d = begin; d < end; ++d) {{
{body}
      }}
    }}
  }}
}}
"""


class LoopStep:
    """A compiled loop: ``step(inputs, scalars)`` runs the program on every tensor of ``inputs``
    (a list, per tensor, of its slots' contiguous CPU tensors, all of one dtype)."""

    def __init__(self, library: ctypes.CDLL, slots: int):
        self._step = library.step
        self._step.restype = None
        self._step.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.slots = slots

    def __call__(self, inputs: Sequence[Sequence[Tensor]], scalars: Sequence[float]) -> None:
        pointers = (ctypes.c_void_p * (len(inputs) * self.slots))(*(t.data_ptr() for ts in inputs for t in ts))
        sizes = (ctypes.c_int64 * len(inputs))(*(ts[0].numel() for ts in inputs))
        values = (ctypes.c_double * max(len(scalars), 1))(*scalars)
        self._step(len(inputs), pointers, sizes, values, torch.get_num_threads())


def source(program: tuple, mutated: tuple, slots: int, dtype: torch.dtype, n_scalars: int) -> str | None:
    """The C++ source of ``program`` for ``slots`` input slots of ``dtype``; None where an operation
    or an operand is outside what the loop can express (the caller then takes Inductor's path)."""
    ctype = _C_TYPES.get(dtype)
    if ctype is None:
        return None
    names = [f"s{slot}" for slot in range(slots)]  # the current value of each slot, by name
    body = [f"        const T s{slot} = p{slot}[d];" for slot in range(slots)]
    for index, (op, dst, *args) in enumerate(program):
        name = op.rstrip("_")
        operands = []
        for kind, value in args:
            if kind == "s":
                operands.append(names[value])
            elif kind == "c":
                operands.append(f"c{value}")
            elif kind == "k" and name == "to" and value == dtype:
                continue  # a conversion to the dtype every slot has already
            else:
                return None
        expression = _EXPRESSIONS.get(name)
        if expression is None:
            return None
        body.append(f"        const T v{index} = {expression.format(*operands)};")
        if dst < len(names):
            names[dst] = f"v{index}"
        else:
            names.append(f"v{index}")
    body += [f"        p{slot}[d] = {names[slot]};" for slot in mutated]
    constants = "\n".join(f"  const T c{i} = T(scalars[{i}]);" for i in range(n_scalars))
    pointers = "\n".join(f"      T* __restrict__ p{slot} = static_cast<T*>(ptrs[t * SLOTS + {slot}]);"
                         for slot in range(slots))
    return _PRELUDE.format(ctype=ctype, slots=slots, constants=constants, pointers=pointers, body="\n".join(body))


def _flags() -> list[str]:
    capability = [flag for flag in CAPABILITY_FLAGS[torch.backends.cpu.get_cpu_capability()] if not flag.startswith("-D")]
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *capability]


def _build(text: str, out: Path) -> str | None:
    cpp = out.with_suffix(".cpp")
    cpp.write_text(text)
    job = subprocess.run([_compiler(), *_flags(), str(cpp), "-o", str(out)], capture_output=True, text=True)
    if job.returncode != 0:
        return f"{_compiler()} failed ({job.returncode}): {job.stderr.strip()[-2000:]}"
    return None


@functools.lru_cache(maxsize=None)
def _loop(text: str, slots: int) -> LoopStep | str:
    built = _cached_library("loops/step", "\0".join([text, _compiler() or "", *_flags()]),
                            functools.partial(_build, text))
    if isinstance(built, str):
        return built
    return LoopStep(ctypes.CDLL(str(built)), slots)


def loop_for(program: tuple, mutated: tuple, dtypes: Sequence[torch.dtype], n_scalars: int
             ) -> Callable[[Sequence[Sequence[Tensor]], Sequence[float]], None] | str | None:
    """The compiled loop of ``program`` (built on first use), None where the program is outside what
    the loop expresses or no compiler is found here, or the build failure's message."""
    if len(set(dtypes)) != 1 or unavailable_reason() is not None:
        return None
    text = source(program, mutated, len(dtypes), dtypes[0], n_scalars)
    return None if text is None else _loop(text, len(dtypes))
