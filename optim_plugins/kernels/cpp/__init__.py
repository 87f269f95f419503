"""C++ CPU kernels, built on first use: where torch's fused kernels are closed to us or eager code is slow.

* ``step_sums.cpp``: the Adam/AdamW and SGD steps with ``op.telemetry``'s sums in one pass (and,
  for steps that cannot sum themselves, a copy that sums g^2 and p^2 and a pass that sums the change).
  Without it a recording step on torch's fused kernels copies the parameters and takes norms
  afterwards (about 36 extra bytes per parameter, 2-3x the step). Each is ATen's fused update (what
  ``torch._fused_adam(w)_`` / ``torch._fused_sgd_`` run), operation for operation, so a recording
  step gives the same bits as any other (tested), plus four sums per tensor from registers the
  update already holds.
* ``quantize.cpp``: the 8-bit and 4-bit state codecs of :mod:`optim_plugins.kernels.quantize`
  (absmax, nearest code, packing; and back) in one pass per block, the same bytes as its eager code;
  the coding itself is ``codec.h``, which the generated loops below include too.
* :mod:`.loops` (generated, not in this list): the compiled backend's recorded updates printed as
  C++ loops, one small library per program, built with the same compiler and cache directory.

Both are compiled together, once per source, torch version and CPU capability, with the C++
compiler found (``$CXX``, ``c++``, ``g++`` or ``clang++``; about 15 s on 2 cores) into
``$XDG_CACHE_HOME/optim_plugins`` (default ``~/.cache/optim_plugins``) and loaded as torch ops
(``torch.ops.optim_plugins.*``). Where they cannot be built (no compiler, a CPU capability other
than AVX2/AVX512, a build error) the functions here return False and the callers take their
eager code; a failed build warns once.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import operator
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # codec.h: also included by the generated loops
DTYPES = frozenset((torch.float32, torch.float64))
_IS_CPU = operator.attrgetter("is_cpu")
# the flags ATen compiles its kernels for each CPU capability with (the vector code must match theirs)
CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
_warned: list[str] = []  # the build failure already warned about
CACHE_KEEP_DAYS = 30  # a cached library unused this long goes when a new one of its kind is built


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the kernels can be built here, else why not (looked up once per process)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABILITY_FLAGS:
        return f"CPU capability {capability!r} (the kernels are built for AVX2 and AVX512, as ATen's fused ones)"
    if _compiler() is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    return None


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    # -fno-trapping-math lets GCC vectorize float selects and conversions (FP traps are never looked at);
    # -O3 unswitches the step loops on their options (plain SGD with sums: 1.06x -> 1.02x torch's kernel)
    return ["-fPIC", "-std=c++20", "-O3", "-fopenmp", "-fno-trapping-math",
            *CAPABILITY_FLAGS[torch.backends.cpu.get_cpu_capability()],
            *(flag for path in include_paths() for flag in ("-isystem", path))]


def _build(compiler: str, out: Path) -> str | None:
    """Compile the sources side by side (one process each), link them into ``out``; None or the error."""
    from torch.utils.cpp_extension import library_paths

    objects = [out.with_name(f"{source.stem}.o") for source in SOURCES]
    jobs = [(source, subprocess.Popen([compiler, *_flags(), "-c", str(source), "-o", str(obj)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for source, obj in zip(SOURCES, objects)]
    errors = [(source, job.communicate()[1], job.returncode) for source, job in jobs]  # wait for all
    for source, error, code in errors:
        if code != 0:
            return f"{compiler} failed on {source.name} ({code}): {error.strip()[-2000:]}"
    link = subprocess.run([compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(out),
                           *(f"-L{path}" for path in library_paths()), "-lc10", "-ltorch_cpu"],
                          capture_output=True, text=True)
    if link.returncode != 0:
        return f"{compiler} failed linking ({link.returncode}): {link.stderr.strip()[-2000:]}"
    return None


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build (once per sources, torch and flags) and load the library; None, or the reason it failed."""
    compiler = _compiler()
    text = "\0".join([*(source.read_text() for source in (*SOURCES, *HEADERS)), torch.__version__, compiler,
                      *_flags()])
    library = _cached_library("optim_plugins_cpu", text, functools.partial(_build, compiler))
    if isinstance(library, str):
        return library
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:  # a library this torch cannot load
        return f"{type(error).__name__}: {error}"
    return None


def _cached_library(stem: str, key: str, build: Callable[[Path], str | None]) -> Path | str:
    """``<cache>/<stem>-<hash of key>.so``, built by ``build(path)`` (None or an error message) where
    missing; its path, or why it could not be built. Built in a temporary directory and renamed into
    place, so processes building the same library at once do not see each other's half-written file.
    A library found is touched (its time is that of its last use); building one removes those of the
    same stem unused for ``CACHE_KEEP_DAYS`` (other sources, flags or programs)."""
    library = _cache_dir() / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if library.exists():
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(library)
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            failure = build(built)
            if failure is not None:
                return failure
            os.replace(built, library)
    except OSError as error:  # an unwritable cache
        return f"{type(error).__name__}: {error}"
    _prune(library)
    return library


def _prune(kept: Path) -> None:
    """Remove the libraries beside ``kept`` of its stem not used for ``CACHE_KEEP_DAYS`` days."""
    cutoff = time.time() - CACHE_KEEP_DAYS * 86400
    for path in kept.parent.glob(kept.name.rsplit("-", 1)[0] + "-*.so"):
        with contextlib.suppress(OSError):  # another process removed it, or the cache is read-only
            if path != kept and path.stat().st_mtime < cutoff:
                path.unlink()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optim_plugins"


def ready() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call; warns once if that fails)."""
    if unavailable_reason() is not None:
        return False
    failure = _load()
    if failure is not None and not _warned:
        _warned.append(failure)
        warnings.warn(f"optim_plugins: the C++ CPU kernels could not be built, so the eager code runs instead "
                      f"(op.telemetry copies the parameters on Adam/SGD steps, 8/4-bit states are coded by tensor "
                      f"operations): {failure}", RuntimeWarning, stacklevel=3)
    return failure is None


def adam_step_with_sums(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                        max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
                        weight_decay: float, eps: float, amsgrad: bool, maximize: bool, decoupled: bool,
                        grad_scale: Tensor | None, sums: Tensor) -> bool:
    """``torch._fused_adam(w)_``'s step (``decoupled``: AdamW) that also writes, per parameter, one row
    of ``sums`` (float64, ``[n, 4]``): g^2 (after unscaling), (new p - old p)^2, old p^2 and the new
    ``exp_avg_sq``. False, with nothing changed, where the kernel cannot take these tensors (not
    contiguous CPU float32/float64 tensors, or the kernel is not available here)."""
    if not _takes(params, (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), grad_scale):
        return False
    torch.ops.optim_plugins.adam_step_with_sums(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
                                                beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled,
                                                grad_scale, sums)
    return True


def sgd_step_with_sums(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor],
                       *, weight_decay: float, momentum: float, lr: float, dampening: float, nesterov: bool,
                       maximize: bool, grad_scale: Tensor | None, sums: Tensor) -> bool:
    """``torch._fused_sgd_``'s step (L2 weight decay) that also writes, per parameter, one row of ``sums``:
    g^2 (after unscaling), (new p - old p)^2, old p^2 and 0 (no second moment). A tensor whose ``step``
    is 1 starts its momentum from the gradient (the fused kernel's ``is_first_step``). False, with
    nothing changed, where the kernel cannot take these tensors."""
    if not _takes(params, (grads, momentum_buffers), grad_scale):
        return False
    torch.ops.optim_plugins.sgd_step_with_sums(params, grads, momentum_buffers, steps, weight_decay, momentum, lr,
                                               dampening, nesterov, maximize, grad_scale, sums)
    return True


def copy_with_sums(params: list[Tensor], copies: list[Tensor], grads: list[Tensor]) -> Tensor | None:
    """``copies[i].copy_(params[i])`` and, in the same pass, per tensor (float64 rows) sum g^2 and sum
    p^2: what op.telemetry takes before a step that cannot sum itself. None, with nothing written,
    where the kernel cannot take these tensors."""
    if not (params and _takes(params, (copies, grads), None)):
        return None
    sums = torch.empty(len(params), 2, dtype=torch.float64)
    torch.ops.optim_plugins.copy_with_sums(params, copies, grads, sums)
    return sums


def change_sums(olds: list[Tensor], news: list[Tensor], second_moments: list[Tensor | None]) -> Tensor | None:
    """Per tensor (float64 rows) sum (new - old)^2 and the sum of its second moment (0 where None),
    in one pass: op.telemetry after such a step. None where the kernel cannot take these tensors."""
    moments = [_NONE if v is None else v for v in second_moments]
    if not (news and _takes(news, (olds,), None)
            and all(v is _NONE or (v.dtype == p.dtype and v.is_contiguous() and v.device.type == "cpu")
                    for v, p in zip(moments, news))):
        return None
    sums = torch.empty(len(news), 2, dtype=torch.float64)
    torch.ops.optim_plugins.change_sums(olds, news, moments, sums)
    return sums


def _takes(params: list[Tensor], others: tuple[list[Tensor], ...], grad_scale: Tensor | None) -> bool:
    """Whether the step-with-sums kernels can take these tensors (and are built): contiguous CPU
    float32/float64 parameters; the other tensors are checked like their parameter in C++, before
    any change."""
    if not (all(map(_IS_CPU, params)) and {p.dtype for p in params} <= DTYPES):
        return False
    if not all(map(Tensor.is_contiguous, itertools.chain(params, *others))):  # (map: a recording step asks)
        return False
    if grad_scale is not None and (grad_scale.device.type != "cpu" or grad_scale.dtype != torch.float32):
        return False
    return ready()


def quantize_blockwise_(x: Tensor, codes: Tensor, absmax: Tensor | None, table: Tensor | None,
                        block_size: int, bits: int, positive_not_zero: bool) -> bool:
    """The quantisers of :mod:`optim_plugins.kernels.quantize` on contiguous CPU float32 ``x``: ``codes``
    (uint8; ``bits=4``: two per byte) and, when ``absmax`` is given, one absmax per block (else ``x`` is
    already scaled); ``table`` is the map's ``nearest_code_table``. False, with nothing written, where
    it cannot run (no table, a tensor it does not take, no library)."""
    if table is None or not (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
                             and codes.is_contiguous() and (absmax is None or absmax.is_contiguous())
                             and (bits == 8 or block_size % 2 == 0)) or not ready():
        return False
    torch.ops.optim_plugins.quantize_blockwise(x, codes, absmax if absmax is not None else _NONE, table,
                                               absmax is not None, positive_not_zero, block_size, bits)
    return True


def dequantize_blockwise(codes: Tensor, absmax: Tensor | None, code: Tensor, out: Tensor, block_size: int,
                         bits: int) -> bool:
    """``out = code[codes]`` times the block's ``absmax`` (when given) on contiguous CPU tensors; False
    where it cannot run."""
    if not (codes.device.type == "cpu" and codes.is_contiguous() and out.is_contiguous() and out.dtype == torch.float32
            and code.device.type == "cpu" and (absmax is None or absmax.is_contiguous())
            and (bits == 8 or block_size % 2 == 0)) or not ready():
        return False
    torch.ops.optim_plugins.dequantize_blockwise(codes, absmax if absmax is not None else _NONE, code, out,
                                                 absmax is not None, block_size, bits)
    return True


def quantize_4bit_rank1_2d_(x: Tensor, packed: Tensor, maxima: Tensor) -> bool:
    """:func:`optim_plugins.kernels.quantize.quantize_4bit_rank1_` of a 2-D contiguous CPU float32 ``x``
    in two passes (maxima, then codes: the linear map's nearest code by arithmetic, no table). False,
    with nothing written, where it cannot run."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and packed.is_contiguous() and maxima.is_contiguous()) or not ready():
        return False
    torch.ops.optim_plugins.quantize_4bit_rank1_2d(x, packed, maxima)
    return True


def dequantize_4bit_rank1_2d(packed: Tensor, maxima: Tensor, out: Tensor) -> bool:
    """``out`` (2-D, contiguous CPU float32) = the linear map's value of ``packed`` ((k + 1) / 16, exact)
    times the rank-1 scale of ``maxima``, in one pass; False where it cannot run."""
    if not (packed.device.type == "cpu" and packed.is_contiguous() and maxima.is_contiguous() and out.dim() == 2
            and out.is_contiguous() and out.dtype == torch.float32) or not ready():
        return False
    torch.ops.optim_plugins.dequantize_4bit_rank1_2d(packed, maxima, out)
    return True


_NONE = torch.empty(0)  # the absmax argument where values are not scaled per block
