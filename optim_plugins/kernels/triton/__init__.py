"""Triton multi-tensor step kernels: the GPU twin of each elementwise optimizer's ``update``.

Entry points (what ``Optimizer.step_group`` calls for ``backend="triton"``):

* ``unavailable_reason(device=None)``: None when the kernels can run, else why not;
* ``supports(optimizer, group)``: a kernel exists for this optimizer class, these options
  and every parameter of the group;
* ``step(optimizer, group, params, grads, states, *, grad_scale=None, found_inf=None,
  clip_coef=None)``: the whole update of ``params`` in place, one launch per bucket.

Covered: Adam, AdamW (incl. AMSGrad), Adam8bit, AdamW8bit, Lion, Lion8bit, AdaBelief
(L2 / decoupled / fixed decay, rectify with degenerated_to_sgd and n_sma_threshold,
ams_bound, adam_debias), SGD (momentum, dampening, Nesterov, decoupled decay), Adan
(proximal or no_prox decay, restart_interval), RMSprop (centered, momentum).

Design
------
*Multi-tensor by pointer tables.* Each launch covers one bucket (same device, dtypes, step
count, precision and state coding) of any number of tensors of any sizes. The host writes
an int64 table, one row per tensor (numel, then the addresses of p, g, the Kahan buffer and
each state, plus the absmax of 8-bit states), and a block table (tensor row, first
element) with one entry per program; a program casts the addresses to typed pointers
(``tl.pointer_type``) and updates BLOCK = 2048 elements (the 8-bit kernel: four 256-element
quantisation blocks). Why this and not the alternatives: a flat buffer would need the
parameters to be views of one allocation (it changes the user's model and the state
dicts); chunked launches with tensors as kernel arguments compile one variant per chunk
size and still launch len/N times. The tables depend only on addresses and sizes, so they
are cached (keyed by them): in steady training no table is rebuilt or copied to the device.
Full chunks take an unmasked path with alignment hints (vectorised loads, when every
address of the bucket is 16-byte aligned); the last chunk of each tensor is masked.

*Math written once per algorithm.* ``adam.py``, ``lion.py``, ... each hold a ``@triton.jit``
``update`` on fp32 values, written op for op after the optimizer's ``update`` (same
order, ATen's lerp formula, fma where ATen's CPU kernels use one, IEEE ``div_rn`` /
``sqrt_rn``), and a ``plan`` that computes the step's hyper-parameters on the host in
double precision, as the optimizer does (bias corrections, rectification). The two
kernels in ``multi_tensor.py`` do the rest once for all: grad * inverse loss scale * clip
factor, ``maximize``, weight decay in the optimizer's mode (l2 / decoupled / fixed), the
Kahan working copy, dequantise / requantise 8-bit states (bitsandbytes' dynamic block-wise
format of kernels/quantize.py, bit for bit), and the parameter write: round to nearest,
Kahan (``state["compensation"]`` keeps the rounding error) or stochastic rounding to bf16.

*No recompilation, no host sync.* lr, betas, eps and the bias corrections are fp32 kernel
arguments (Triton never specialises on floats); only option switches (amsgrad, nesterov,
the first step of SGD/Adan, the rectify branch, dtypes) are constexpr, each compiled once.
``found_inf`` is read inside the kernel (when nonzero every program returns before loading
anything), as are the inverse scale and the clip factor. The step count is a CPU tensor
read on the host (the bias corrections need it in double precision), which is no GPU sync;
a new table is copied from pinned memory without waiting; stochastic rounding draws its
Philox seed on the device from torch's generator (``torch.manual_seed`` reproduces it).

*Precision.* Math is fp32 whatever the storage (bf16/fp16 p, g and states are widened when
loaded); a state is rounded (to nearest even) only when stored, as torch's fused Adam does.
``enable_fp_fusion=False``: no fma the optimizer's torch ops do not have. For fp32 the
results equal the reference backend to about an ulp (tests: 1e-6 relative); for bf16 to
bf16 rounding (see tests/triton_cases.py for the stated tolerances).

Bytes moved per parameter per step (read + write; fp32 unless said)
-------------------------------------------------------------------
=======================================  ========  ================================================
kernel                                   B/param   what
=======================================  ========  ================================================
Adam/AdamW                               28        p 4+4, g 4, exp_avg 4+4, exp_avg_sq 4+4
Adam/AdamW, amsgrad                      36        + max_exp_avg_sq 4+4
AdaBelief (ams_bound: 36)                28        as Adam
Lion                                     20        p 4+4, g 4, exp_avg 4+4
SGD momentum (no momentum: 12)           20        p 4+4, g 4, buffer 4+4
RMSprop (centered or momentum +8 each)   20        p, g, square_avg
Adan                                     44        p 4+4, g 4, three moments 8 each, previous grad 4+4
Adam8bit/AdamW8bit                       ~16.1     p 4+4, g 4, two 1-byte codes 1+1 each, absmax 8/256 each
Lion8bit                                 ~14.0     p 4+4, g 4, codes 1+1, absmax 8/256
bf16 p/g, bf16 states, Kahan (AdamW)     18        p 2+2, comp 2+2, g 2, two states 2+2 each
bf16 p/g, fp32 states (state_dtype=fp32) 22 (+4)   p 2+2, g 2, states 8+8 (+ comp 2+2 with Kahan)
fp32 p/g, bf16 states (state_dtype=bf16) 20        p 4+4, g 4, two states 2+2 each
=======================================  ========  ================================================

Not covered (``supports`` says False, or ``step`` raises with the reason)
-------------------------------------------------------------------------
AdaBelief's ``adanorm`` (a per-tensor norm: not one elementwise pass); other optimizers;
options a kernel does not know (a new option added to a covered class turns its kernel
off until the kernel learns it); fp64 parameters (hyper-parameters travel as fp32);
stochastic rounding of fp16 parameters (bf16 only); parameters that are not dense in
memory (a strided view) or whose states are laid out differently from them (a gradient
laid out differently is copied first: one extra pass); 8-bit states of a non-contiguous
parameter; state codecs other than 8-bit block-wise (256). bf16/fp16 states and
parameters are computed in fp32 and rounded once per step, where the reference backend
rounds after each tensor op: the results agree to bf16 rounding, not bit for bit (the
tests state the tolerance). The first call of a variant compiles it (seconds); the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs the same kernels slowly, for tests.
The 8-bit kernel uses masked scalar loads and a binary search in the code map (8 gathers
per quantised value): it is correct, not yet tuned for bandwidth. No GPU was available
while this was written: the kernels were run under the interpreter and compiled (not run)
for sm_90 by Triton 3.9 (tests/triton_compile_check.py: full chunks get 128-bit loads);
BLOCK and num_warps are untuned and no bandwidth has been measured. The host side costs
some microseconds of Python per tensor per step (state lookups, the bucket key): with
thousands of tiny tensors that, not the kernel, bounds the step.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

# The class that defines ``update`` -> (kernel module, the options its kernel implements).
# Subclasses that inherit ``update`` (AdamW, Adam8bit, AdamW8bit, Lion8bit) use the same kernel.
ALGORITHMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "optim_plugins.optimizers.adam.Adam": (
        "adam", ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "min_8bit_size")),
    "optim_plugins.optimizers.lion.Lion": ("lion", ("lr", "betas", "weight_decay", "min_8bit_size")),
    "optim_plugins.optimizers.adabelief.AdaBelief": (
        "adabelief", ("lr", "betas", "weight_decay", "weight_decouple", "fixed_decay", "rectify", "n_sma_threshold",
                      "degenerated_to_sgd", "ams_bound", "r", "adanorm", "adam_debias", "eps")),
    "optim_plugins.optimizers.sgd.SGD": (
        "sgd", ("lr", "momentum", "dampening", "weight_decay", "nesterov", "decoupled_weight_decay")),
    "optim_plugins.optimizers.adan.Adan": (
        "adan", ("lr", "betas", "eps", "weight_decay", "no_prox", "restart_interval")),
    "optim_plugins.optimizers.rmsprop.RMSprop": (
        "rmsprop", ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")),
}
UNSUPPORTED = {"adabelief": ("adanorm",)}  # options whose True value has no kernel (adanorm: a per-tensor norm)
# The step machinery's own options (optimizers/base.py); any other option must be known to the kernel.
COMMON_OPTIONS = ("maximize", "backend", "foreach", "nonfinite", "compensation", "state_dtype", "differentiable",
                  "capturable", "fused")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)

__all__ = ["unavailable_reason", "supports", "step"]


def _interpreting() -> bool:
    loaded = sys.modules.get(f"{__name__}.multi_tensor")
    if loaded is not None:  # the mode the kernels were built in
        return loaded.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the Triton kernels can run (on ``device`` if given), else a sentence saying why."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; it ships with PyTorch's CUDA wheels on Linux)"
    device = torch.device(device) if device is not None else None
    if _interpreting():
        if device is not None and device.type != "cpu":
            return f"with TRITON_INTERPRET=1 the Triton kernels run on CPU tensors only, not on {device}"
        return None
    if not torch.cuda.is_available():
        return ("Triton kernels need a CUDA GPU and torch.cuda.is_available() is False (set TRITON_INTERPRET=1 "
                "before triton is imported to run them on CPU tensors in Triton's interpreter, slowly)")
    if device is not None and device.type != "cuda":
        return f"Triton kernels run on CUDA tensors, not on {device} (set TRITON_INTERPRET=1 for CPU tensors)"
    return None


def _algorithm_of(optimizer: Any) -> tuple[str, tuple[str, ...]] | None:
    for cls in type(optimizer).__mro__:
        if "update" in vars(cls):
            return ALGORITHMS.get(f"{cls.__module__}.{cls.__qualname__}")
    return None


def supports(optimizer: Any, group: Mapping[str, Any]) -> bool:
    """True when a kernel covers this optimizer's class, ``group``'s options and its parameters.

    Does not import triton, nor say whether the kernels can run here (``unavailable_reason``).
    """
    algorithm = _algorithm_of(optimizer)
    if algorithm is None or not getattr(getattr(optimizer, "capabilities", None), "elementwise", False):
        return False
    name, options = algorithm
    if any(key not in {*COMMON_OPTIONS, *options} for key in optimizer.defaults):
        return False
    if any(group.get(option) for option in UNSUPPORTED.get(name, ())):
        return False
    if any(group.get(flag) for flag in ("differentiable", "capturable", "fused")):
        return False
    for p in group["params"]:
        if p.dtype not in PARAM_DTYPES or p.is_sparse:
            return False
        if p.dtype == torch.float16 and group.get("compensation") == "stochastic":
            return False
        for codec in optimizer.state_codecs(p, group).values():
            if type(codec).__name__ != "Blockwise8bit" or getattr(codec, "block_size", None) != 256:
                return False
    return True


def step(optimizer: Any, group: dict[str, Any], params: Sequence[Tensor], grads: Sequence[Tensor],
         states: Sequence[dict[str, Any]], *, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
         clip_coef: Tensor | None = None, stats: Tensor | None = None,
         second_moment: Callable[[Tensor, dict], str | None] | None = None) -> None:
    """Update ``params`` of ``group`` in place: one kernel launch per (device, dtype, step, precision) bucket.

    ``states`` are the parameters' initialised state dicts whose ``step`` was already
    incremented. ``grad_scale`` (GradScaler's inverse scale), ``clip_coef`` (a factor for the
    gradient) and ``found_inf`` (nonzero: change nothing) are 0-d or 1-element tensors read
    inside the kernel. Raises before changing anything when a parameter cannot be handled.
    ``stats``: a zeroed fp32 ``(len(params), 4)`` tensor on the parameters' device; the kernels add
    op.telemetry's sums into it in the same pass (g^2, update^2, old p^2, and the sum of the state
    ``second_moment(p, state)`` names).
    """
    if not params:
        return
    algorithm = _algorithm_of(optimizer)
    if algorithm is None:
        raise TypeError(f"triton backend: no kernel for {type(optimizer).__name__}")
    for device in {p.device for p in params}:
        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"triton backend: {reason}")
    from . import multi_tensor

    kernel = importlib.import_module(f"{__name__}.{algorithm[0]}")
    multi_tensor.run(kernel, optimizer, group, params, grads, states, grad_scale, found_inf, clip_coef,
                     stats, second_moment)
