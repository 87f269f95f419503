"""``backend="compiled"``: an optimizer's own ``update``, compiled for a bucket (CPU).

How it works (no second copy of any algorithm):

1. *Record.* Each step the optimizer's ``update`` (with ``maximize``, the loss-scale
   factor and weight decay before it) runs once on :class:`Recorder` objects instead of
   tensors. A recorder answers the same methods as ``TensorList`` but only writes down
   the tensor operations (``exp_avg.lerp_(g, 0.1)`` -> ``("lerp", ...)``); every Python
   number the update computes on the host (lr, ``1 - beta1``, bias corrections from the
   step count, ...) goes into a list of scalars instead of into the program.
2. *Compile once.* The program (the operations and their order: the structure of the
   update, without its numbers) plus the dtypes is the cache key of the compiled step.
   Where the slots are float32/bfloat16 (or all float64) the program is printed as one C++
   loop over the whole bucket (:mod:`optim_plugins.kernels.cpp.loops`: ~0.5 s to build,
   cached on disk; one call per bucket, each thread a share of every tensor), which runs
   at the speed of torch's fused AdamW kernel and can also sum op.telemetry's numbers in
   the same pass (:func:`run_with_sums`). Other buckets (float16, float64 beside another
   dtype) get a function compiled with ``torch.compile(fullgraph=True, dynamic=True)`` for
   one flattened tensor of any length: Inductor fuses the chain into
   one loop that reads p, g and the states once and writes them once. It is called once
   per tensor of the bucket, so every layer shape reuses the one compile (a per-bucket
   graph of all tensors compiled one kernel per tensor and took minutes for 21 tensors).
3. *Run.* The scalars enter the compiled step as numbers (the loop) or one float tensor
   (Inductor), so a scheduler changing lr every step, the step count and every other
   hyper-parameter never cause a recompile. Branches of an update on host values (SGD's
   first step, RAdam's rectification switch) give another program: compiled once more,
   then cached. On Inductor's path tensors below ``PACK_BELOW`` elements (biases, norms)
   are concatenated per slot and stepped by one call (a call costs ~50-70 us of host time
   whatever its size: Dynamo's guards and AOTAutograd's wrappers).

Why the C++ loop before Inductor (2-core CPU, 22M parameters in 21 tensors, AdamW's
program): Inductor's loop for the same program ran 10-15% slower than torch's fused
AdamW kernel (it compiles with ``-ffp-contract=off`` and reloads each scalar from the
scalar tensor in every iteration) and its seven calls per step cost ~0.5 ms of host time:
1.24-1.33x torch's fused AdamW in all; the loop 0.94-0.95x.

Choices that matter for Inductor's speed (measured on a 2-core CPU, 20M parameters):

* ``cpp.dynamic_threads``: Inductor decides whether a kernel gets an OpenMP ``parallel`` loop
  from the size hint of the *first* call and caches that code on disk for every later size, so
  a program first compiled on a bias ran single-threaded on every weight (1.5x torch's fused
  AdamW; 1.24x with the option, which leaves the thread count to OpenMP at run time).
* Host numbers are folded while recording: ``x / c`` becomes ``x * (1/c)`` (one vector divide
  less per element), and ``lerp`` with a host weight records the one branch of ATen's two-sided
  formula that the weight selects instead of computing both and blending.
* No reductions in Inductor's kernel: its code for a sum fused with the in-place stores
  (op.telemetry's update norms) ran 4-10x slower than the update alone, so on that path
  telemetry stays an eager pass (the C++ loop sums in the step, as the Triton kernels and the
  C++ Adam/SGD kernels behind ``auto`` do).

Why recording and not ``torch.compile`` of ``update`` directly: Dynamo specialises on
Python floats that reach ``beta ** step`` (even with ``specialize_float=False``), which
recompiles at every step; the update's ``value=``/``alpha=`` arguments must be Python
numbers, so passing 0-d tensors would change every optimizer's math.

Limits (the bucket then runs on the ``foreach`` path, same numbers): updates that look at
values (``.item()`` of a bucket, iteration over tensors: per-tensor norms such as AdaNorm),
operations outside the table below, complex tensors in a 0-d state. Kahan compensation of
bf16 parameters is read and written inside the C++ loop (``run(..., compensations=)``);
block-wise 8/4-bit states (``run(..., coded=)``: the codecs' ``loop_form``; fp32 or bf16 parameters)
are decoded and coded inside it too, block by block, so they never exist in fp32 outside the cache (the bytes of
decoding, stepping and coding in turn), and so are rank-1 4-bit second moments of 2-D tensors
(whose scale spans the tensor: the loop finds their new maxima in a first pass); stochastic
rounding, ``state_dtype`` and other codecs (rank-1 states of n-D tensors) stay passes around the compiled
update (correct, but they cost their extra reads and writes). Results equal the
reference backend to fp32 rounding, not bit for bit: torch's eager kernels may contract
``a * b + c`` into one rounding where the loop and Inductor round twice, and host numbers are
folded as said above. States
kept in bf16/fp16 (``state_dtype=None`` on bf16 parameters) are computed in fp32 through
each fused chain and rounded once per store, where eager rounds after every operation:
there the backends agree to bf16 rounding only (``state_dtype="fp32"``: fp32 rounding).
"""
from __future__ import annotations

import functools
import itertools
import os
import shutil
import types
import warnings
from numbers import Number
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Unsupported", "Recorder", "unavailable_reason", "run", "run_with_sums", "loops_cover", "compile_count"]


class Unsupported(Exception):
    """The update does something the recorder cannot replay (the caller falls back to foreach)."""


_IN_PLACE = {"add_", "mul_", "div_", "addcmul_", "addcdiv_", "sqrt_", "abs_", "neg_", "sign_",
             "clamp_min_", "clamp_max_", "zero_", "copy_", "lerp_", "lerp_low_", "lerp_high_", "maximum_"}


class Tape:
    """The program being recorded: instructions, the dtype of each slot, the scalars."""

    def __init__(self, dtypes: Sequence[torch.dtype], scalar_dtype: torch.dtype):
        self.code: list[tuple] = []
        self.dtypes = list(dtypes)
        self.scalars: list[float] = []
        self.scalar_dtype = scalar_dtype

    def scalar(self, value: Any) -> tuple[str, int]:
        if isinstance(value, bool) or not isinstance(value, Number):
            raise Unsupported(f"scalar argument {value!r}")
        self.scalars.append(float(value))
        return ("c", len(self.scalars) - 1)

    def operand(self, value: Any) -> tuple[str, int]:
        if isinstance(value, Recorder):
            if value.tape is not self:
                raise Unsupported("recorders of two tapes")
            return ("s", value.slot)
        return self.scalar(value)

    def emit(self, op: str, target: Recorder, *args: Any, dtype: torch.dtype | None = None) -> Recorder:
        operands = tuple(a if isinstance(a, tuple) and a and a[0] == "k" else self.operand(a) for a in args)
        if op in _IN_PLACE:
            self.code.append((op, target.slot, ("s", target.slot), *operands))
            return target
        slot = len(self.dtypes)
        self.dtypes.append(dtype or target.dtype)
        self.code.append((op, slot, ("s", target.slot), *operands))
        return Recorder(self, slot)


class Recorder:
    """Stands for one tensor slot of every tensor of a bucket while ``update`` is recorded."""

    __slots__ = ("tape", "slot")

    def __init__(self, tape: Tape, slot: int):
        self.tape, self.slot = tape, slot

    @property
    def dtype(self) -> torch.dtype:
        return self.tape.dtypes[self.slot]

    def _e(self, op: str, *args: Any, dtype: torch.dtype | None = None) -> Recorder:
        return self.tape.emit(op, self, *args, dtype=dtype)

    def __len__(self):
        raise Unsupported("len() of a bucket (per-tensor logic)")

    def __iter__(self):
        raise Unsupported("iteration over a bucket (per-tensor logic)")

    def __bool__(self):
        raise Unsupported("truth value of a bucket")

    def item(self):
        raise Unsupported("item() of a bucket")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.maximum and isinstance(args[0], Recorder):
            out = kwargs.get("out")
            if out is args[0]:
                return args[0]._e("maximum_", args[1])
            if out is None:
                return args[0]._e("maximum", args[1])
        raise Unsupported(f"torch function {getattr(func, '__name__', func)}")

    # -- in place
    def add_(self, other, alpha=1):
        if isinstance(other, Recorder):
            return self._e("add_", other, alpha)
        return self._e("add_", _scaled(other, alpha), 1)

    def sub_(self, other, alpha=1):
        return self.add_(other, alpha=-alpha)

    def mul_(self, other):
        return self._e("mul_", other)

    def div_(self, other):
        return self._e(*_division("div_", other))

    def lerp_(self, end, weight):
        return self._e(_lerp_op("lerp_", weight), end, weight)

    def addcmul_(self, t1, t2, value=1):
        return self._e("addcmul_", t1, t2, value)

    def addcdiv_(self, t1, t2, value=1):
        return self._e("addcdiv_", t1, t2, value)

    def sqrt_(self):
        return self._e("sqrt_")

    def abs_(self):
        return self._e("abs_")

    def neg_(self):
        return self._e("neg_")

    def sign_(self):
        return self._e("sign_")

    def clamp_min_(self, value):
        return self._e("clamp_min_", value)

    def clamp_max_(self, value):
        return self._e("clamp_max_", value)

    def zero_(self):
        return self._e("zero_")

    def copy_(self, other):
        return self._e("copy_", other)

    # -- out of place
    def add(self, other, alpha=1):
        if isinstance(other, Recorder):
            return self._e("add", other, alpha)
        return self._e("add", _scaled(other, alpha), 1)

    def sub(self, other, alpha=1):
        return self.add(other, alpha=-alpha)

    def mul(self, other):
        return self._e("mul", other)

    def div(self, other):
        return self._e(*_division("div", other))

    def lerp(self, end, weight):
        return self._e(_lerp_op("lerp", weight), end, weight)

    def addcmul(self, t1, t2, value=1):
        return self._e("addcmul", t1, t2, value)

    def addcdiv(self, t1, t2, value=1):
        return self._e("addcdiv", t1, t2, value)

    def sqrt(self):
        return self._e("sqrt")

    def reciprocal(self):
        return self._e("reciprocal")

    def abs(self):
        return self._e("abs")

    def neg(self):
        return self._e("neg")

    def sign(self):
        return self._e("sign")

    def clone(self):
        return self._e("clone")

    def clamp_min(self, value):
        return self._e("clamp_min", value)

    def clamp_max(self, value):
        return self._e("clamp_max", value)

    def to(self, dtype):
        if not isinstance(dtype, torch.dtype):
            raise Unsupported(f"to({dtype!r})")
        return self._e("to", ("k", dtype), dtype=dtype)

    def float(self):
        return self.to(torch.float32)

    __add__ = add
    __sub__ = sub
    __mul__ = mul
    __truediv__ = div
    __neg__ = neg

    def __radd__(self, other):
        return self.add(other)

    def __rmul__(self, other):
        return self.mul(other)

    def __rsub__(self, other):
        return self.neg().add_(other)

    def __rtruediv__(self, other):
        return self.reciprocal().mul_(other)


def _division(op: str, divisor: Any) -> tuple[str, Any]:
    """Division by a host number as multiplication by its reciprocal (one vector divide less per element)."""
    if isinstance(divisor, Number) and not isinstance(divisor, bool) and divisor != 0:
        return op.replace("div", "mul"), 1.0 / divisor
    return op, divisor


def _lerp_op(op: str, weight: Any) -> str:
    """ATen's lerp picks one of two formulas by |weight| < 0.5; for a host weight pick it while recording."""
    if isinstance(weight, Number) and not isinstance(weight, bool):
        return op.replace("lerp", "lerp_low" if abs(weight) < 0.5 else "lerp_high")
    return op


def _scaled(other: Any, alpha: Any) -> Any:
    if isinstance(other, Number) and isinstance(alpha, Number):
        return other * alpha
    raise Unsupported("add of a non-number scalar")


# ----------------------------------------------------------------------------- replay (traced by Dynamo)


def _lerp(start: Tensor, end: Tensor, w: Tensor) -> Tensor:
    """ATen's two-sided lerp formula (as ``torch.lerp`` with a scalar weight)."""
    diff = end - start
    return torch.where(w.abs() < 0.5, start + w * diff, end - diff * (1 - w))


_OPS: dict[str, Callable[..., Tensor]] = {
    "add": lambda x, y, a: x + y * a,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y,
    "lerp": _lerp,
    "lerp_low": lambda start, end, w: start + w * (end - start),
    "lerp_high": lambda start, end, w: end - (end - start) * (1 - w),
    "addcmul": lambda x, a, b, v: x + v * a * b,
    "addcdiv": lambda x, a, b, v: x + v * a / b,
    "sqrt": torch.sqrt,
    "reciprocal": torch.reciprocal,
    "abs": torch.abs,
    "neg": torch.neg,
    "sign": torch.sign,
    "clone": lambda x: x,
    "clamp_min": lambda x, v: torch.clamp_min(x, v.to(x.dtype)),
    "clamp_max": lambda x, v: torch.clamp_max(x, v.to(x.dtype)),
    "maximum": torch.maximum,
    "zero": torch.zeros_like,
    "copy": lambda x, y: y.to(x.dtype),
    "to": lambda x, dtype: x.to(dtype),
}


def _replay(tensors: list[Tensor], scalars: Tensor) -> None:
    """Run PROGRAM (a global of each compiled copy) on one tensor's slots; write the mutated ones once."""
    values = list(tensors)
    for op, dst, *args in PROGRAM:  # noqa: F821 - set per compiled copy
        resolved = [values[i] if kind == "s" else scalars[i] if kind == "c" else i for kind, i in args]
        result = _OPS[op.rstrip("_")](*resolved)
        if dst < len(values):
            values[dst] = result.to(values[dst].dtype) if op.endswith("_") else result
        else:
            values.append(result)
    for slot in MUTATED:  # noqa: F821
        tensors[slot].copy_(values[slot])


# Tensors below this many elements are stepped together in one call (see _run_packed).
PACK_BELOW = 2**16
_CACHE: dict[tuple, Callable[..., None]] = {}
compile_count = 0  # compiled functions and loops created in this process (tests read it)
# Step float32/bfloat16/float64 buckets with a C++ loop printed from the program (kernels/cpp/loops.py) rather
# than with Inductor's code: one call per bucket, no Dynamo guards per tensor (~65 us each).
CPP_LOOPS = True
_LOOPS: dict[tuple, Callable[..., None] | None] = {}
_LOOP_FAILURES: list[str] = []


def _compiled(program: tuple, mutated: tuple, dtypes: tuple, scalar_dtype: torch.dtype) -> Callable[..., None]:
    """The compiled replay of ``program`` for 1-D tensors of any length (dynamic size: one compile)."""
    global compile_count
    key = (program, mutated, dtypes, scalar_dtype)
    fn = _CACHE.get(key)
    if fn is None:
        # A fresh code object and globals per program: Dynamo's cache (and its recompile
        # limit) is per code object, so programs never evict each other.
        code = _replay.__code__.replace(co_name=f"_optimizer_step_{len(_CACHE)}")
        scope = {**_replay.__globals__, "PROGRAM": program, "MUTATED": mutated}
        fn = torch.compile(types.FunctionType(code, scope, code.co_name), fullgraph=True, dynamic=True,
                           options=_inductor_options())
        _CACHE[key] = fn
        compile_count += 1
    return fn


def _loop(program: tuple, mutated: tuple, dtypes: tuple, n_scalars: int, kahan: bool = False,
          coded: tuple = ()) -> Any:
    """The program as one C++ loop over the bucket (a ``loops.LoopStep``, kernels/cpp/loops.py) where
    ``CPP_LOOPS`` is on and it can express the program; else None (Inductor's path). A failed build
    warns once. ``coded``: ``loops.Coded`` slots (8/4-bit states, coded inside the loop)."""
    global compile_count
    if not CPP_LOOPS:
        return None
    key = (program, mutated, dtypes, n_scalars, kahan, coded)
    if key not in _LOOPS:
        from .cpp import loops

        built = loops.loop_for(program, mutated, dtypes, n_scalars, kahan, coded)
        if isinstance(built, str):
            if not _LOOP_FAILURES:
                warnings.warn(f"optim_plugins: the compiled backend's C++ loop could not be built, so Inductor "
                              f"compiles the step instead: {built}", RuntimeWarning, stacklevel=4)
            _LOOP_FAILURES.append(built)
            built = None
        _LOOPS[key] = built
        compile_count += built is not None
    return _LOOPS[key]


def loops_cover(dtypes: set[torch.dtype]) -> bool:
    """Whether buckets of these parameter dtypes step through the C++ loop (where it can be built here)."""
    from .cpp import loops

    return CPP_LOOPS and not _LOOP_FAILURES and loops.covers(dtypes) and loops.unavailable_reason() is None


def _inductor_options() -> dict[str, Any]:
    """``cpp.dynamic_threads`` (see the module docstring) where this torch's Inductor has it."""
    from torch._inductor import config

    return {"cpp.dynamic_threads": True} if hasattr(config.cpp, "dynamic_threads") else {}


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when Inductor can compile for CPU tensors here, else why not (looked up once per process:
    ``backend="auto"`` asks at every step)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return f"no C++ compiler found ({compiler!r}, c++, clang++) for Inductor's CPU code generation"
    return None


# {array name: (loops.Coded's fields after the slot, the absmax tensor of each tensor)}: see run()
Coding = dict[str, tuple[tuple, list[Tensor]]]


class _Recorded(NamedTuple):
    program: tuple
    mutated: tuple
    inputs: list[Sequence[Tensor]]  # per tensor: p, g, the arrays' tensors in order, then coded slots' side tensors
    dtypes: tuple  # of the slots (a coded slot: float32, the value it stands for)
    coded: tuple  # loops.Coded of each coded slot
    scalars: list[float]
    scalar_dtype: torch.dtype
    commit: Callable[[], None]  # writes the recorded 0-d states back (once the step runs)


def _record(update: Callable[..., None], p: list[Tensor], g: list[Tensor], arrays: dict[str, list[Tensor]],
            others: dict[str, Any], prologue: Callable[[Any, Any], Any], coded: Coding | None = None
            ) -> _Recorded | None:
    """The bucket's update as a program; None, with nothing changed, where the compiled path cannot
    run it (an operation the recorder does not know, a write into the gradient, a strided tensor)."""
    if any(t.device.type != "cpu" for t in p):
        return None
    names = list(arrays)
    coded = coded or {}
    scalar_dtype = torch.float64 if p[0].dtype == torch.float64 else torch.float32
    tape = Tape([p[0].dtype, g[0].dtype, *(torch.float32 if n in coded else arrays[n][0].dtype for n in names)],
                scalar_dtype)
    rec_p, rec_g = Recorder(tape, 0), Recorder(tape, 1)
    state: dict[str, Any] = {n: Recorder(tape, 2 + i) for i, n in enumerate(names)}
    saved = {}
    for name, value in others.items():
        if hasattr(value, "tensors"):  # a TensorList of 0-d states
            saved[name] = value
            value = type(value)(t.clone() for t in value)
        state[name] = value
    try:
        rec_g = prologue(rec_p, rec_g)
        update(rec_p, rec_g, state)
    except (Unsupported, AttributeError, TypeError):  # an operation the recorder does not know
        return None
    program = tuple(tape.code)
    sides = [n for n in names if n in coded]
    # per tensor its slots (zip and map: ~1 us a tensor less than nested generators at 1000 tensors)
    inputs = list(zip(p, g, *(arrays[n] for n in names), *(coded[n][1] for n in sides)))
    mutated = tuple(sorted({dst for _, dst, *_ in program if dst < 2 + len(names)}))
    if 1 in mutated or not all(map(Tensor.is_contiguous, itertools.chain.from_iterable(inputs))):
        return None  # the update writes into the gradient, or a tensor is strided (foreach handles both)

    def commit() -> None:
        for name, original in saved.items():
            original.copy_(state[name])

    codings: tuple = ()
    if sides:
        from .cpp.loops import Coded

        codings = tuple(Coded(2 + names.index(n), *coded[n][0]) for n in sides)
    return _Recorded(program, mutated, inputs, tuple(tape.dtypes[:2 + len(names)]), codings, tape.scalars,
                     scalar_dtype, commit)


def run(update: Callable[..., None], p: list[Tensor], g: list[Tensor], arrays: dict[str, list[Tensor]],
        others: dict[str, Any], prologue: Callable[[Any, Any], Any], compensations: list[Tensor] | None = None,
        coded: Coding | None = None) -> bool:
    """Run ``update(p, g, state)`` on a bucket through a compiled replay; False if it cannot be recorded.

    ``arrays``: the parameter-shaped states (lists of tensors); ``others``: what the state holds
    besides them (0-d tensors as ``TensorList``s, Python values), passed through unrecorded
    (0-d tensors are cloned for the recording and copied back only when the step runs).
    ``prologue(p, g) -> g``: maximize, loss-scale and weight decay, recorded before ``update``.
    ``compensations``: the Kahan compensations of bfloat16 parameters ``p``, for the C++ loop to
    step ``p + compensation`` and write both back (False, nothing changed, where it cannot).
    ``coded``: the arrays kept block-wise in 8/4 bits, ``{name: (form, absmax tensors)}`` (``arrays[name]``
    holds their codes; ``form``: ``loops.Coded``'s fields after the slot), for the C++ loop to decode,
    step and code them in one pass (False, nothing changed, where it cannot).
    Returns True when the step was done.
    """
    recorded = _record(update, p, g, arrays, others, prologue, coded)
    if recorded is None:
        return False
    program, mutated, inputs, dtypes, codings, scalar_values, scalar_dtype, commit = recorded
    loop = _loop(program, mutated, dtypes, len(scalar_values), compensations is not None, codings)
    if codings and loop is None:
        return False
    if compensations is not None:
        if loop is None or not all(c.is_contiguous() for c in compensations):
            return False
        inputs = [[*tensors, c] for tensors, c in zip(inputs, compensations)]
    commit()
    if loop is not None:
        loop(inputs, scalar_values)
        return True
    fn = _compiled(program, mutated, dtypes, scalar_dtype)
    scalars = torch.tensor(scalar_values or [0.0], dtype=scalar_dtype)
    small = [tensors for tensors in inputs if tensors[0].numel() < PACK_BELOW]
    alone = inputs if len(small) < 2 else [tensors for tensors in inputs if tensors[0].numel() >= PACK_BELOW]
    for tensors in alone:
        fn([t.view(-1) for t in tensors], scalars)
    if len(small) >= 2:
        _run_packed(fn, small, mutated, scalars)
    return True


def run_with_sums(update: Callable[..., None], p: list[Tensor], g: list[Tensor], arrays: dict[str, list[Tensor]],
                  others: dict[str, Any], prologue: Callable[[Any, Any], Any], coded: Coding | None = None,
                  compensations: list[Tensor] | None = None) -> Tensor | None:
    """``run`` through the C++ loop that also sums, in the same pass (op.telemetry): per tensor a float64
    row of sum g^2 (the gradient as stored), sum (new p - old p)^2, sum old p^2 (p: the parameter plus
    its Kahan compensation where ``compensations`` are given) and the sum of each array's new value (in
    ``arrays`` order; a coded array's before it is coded). None, with nothing changed, where that loop
    cannot step the bucket (the caller then measures around a step of its own)."""
    recorded = _record(update, p, g, arrays, others, prologue, coded)
    if recorded is None:
        return None
    loop = _loop(recorded.program, recorded.mutated, recorded.dtypes, len(recorded.scalars),
                 compensations is not None, recorded.coded)
    if loop is None or not all(c.is_contiguous() for c in compensations or ()):
        return None
    inputs = recorded.inputs
    if compensations is not None:
        inputs = [[*tensors, c] for tensors, c in zip(inputs, compensations)]
    recorded.commit()
    return loop.with_sums(inputs, recorded.scalars)


def _run_packed(fn: Callable[..., None], inputs: list[list[Tensor]], mutated: tuple, scalars: Tensor) -> None:
    """One compiled call for many small tensors: each slot concatenated, the mutated slots copied back.

    A compiled call costs ~50 us on the host whatever its size; below ``PACK_BELOW`` elements
    the two extra copies cost less than that. The update is elementwise, so packing does not
    change a single result bit.
    """
    slots = [[tensors[slot] for tensors in inputs] for slot in range(len(inputs[0]))]
    flat = [torch._C._nn.flatten_dense_tensors(ts) for ts in slots]
    fn(flat, scalars)
    for slot in mutated:
        torch._foreach_copy_(slots[slot], torch._C._nn.unflatten_dense_tensors(flat[slot], slots[slot]))
