"""C++ CPU kernels, built on first use: the Adam/AdamW step with ``op.telemetry``'s sums in one pass.

torch's fused CPU kernels are closed to us: without this, a recording step on them copies the
parameters and takes norms afterwards (about 36 extra bytes per parameter, 2-3x the step).
``adam_sums.cpp`` is ATen's fused Adam update (what ``torch._fused_adam(w)_`` runs), operation
for operation, so a recording step gives the same bits as any other (tested), plus four sums per
tensor taken from registers the update already holds.

It is compiled once per source, torch version and CPU capability with the C++ compiler found
(``$CXX``, ``c++``, ``g++`` or ``clang++``; about 10 s on 2 cores) into
``$XDG_CACHE_HOME/optim_plugins`` (default ``~/.cache/optim_plugins``) and loaded as the torch op
``torch.ops.optim_plugins.adam_step_with_sums``. Where it cannot be built (no compiler, a CPU
capability other than AVX2/AVX512, a build error) :func:`adam_step_with_sums` returns False and the
caller records the eager way; a failed build warns once.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("adam_sums.cpp")
DTYPES = (torch.float32, torch.float64)
# the flags ATen compiles its kernels for each CPU capability with (the vector code must match theirs)
CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
_warned: list[str] = []  # the build failure already warned about


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the kernel can be built here, else why not (looked up once per process)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABILITY_FLAGS:
        return f"CPU capability {capability!r} (the kernel is built for AVX2 and AVX512, as ATen's fused Adam)"
    if _compiler() is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    return None


def _command(compiler: str, source: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    libraries = [f"-L{path}" for path in library_paths()]
    return [compiler, "-shared", "-fPIC", "-std=c++20", "-O2", "-fopenmp",
            *CAPABILITY_FLAGS[torch.backends.cpu.get_cpu_capability()], *includes, str(source),
            "-o", str(out), *libraries, "-lc10", "-ltorch_cpu"]


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build (once per source, torch and flags) and load the library; None, or the reason it failed."""
    compiler = _compiler()
    command = _command(compiler, SOURCE, Path("OUT"))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *command]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optim_plugins"
    library = cache / f"adam_sums-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: safe across processes
            built = Path(tmp) / library.name
            result = subprocess.run(_command(compiler, SOURCE, built), capture_output=True, text=True)
            if result.returncode != 0:
                return f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
            os.replace(built, library)
    torch.ops.load_library(str(library))
    return None


def ready() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call; warns once if that fails)."""
    if unavailable_reason() is not None:
        return False
    failure = _load()
    if failure is not None and not _warned:
        _warned.append(failure)
        warnings.warn(f"optim_plugins: the C++ Adam kernel with telemetry sums could not be built, so "
                      f"op.telemetry records those steps the eager way: {failure}", RuntimeWarning, stacklevel=3)
    return failure is None


def adam_step_with_sums(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                        max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float, beta1: float, beta2: float,
                        weight_decay: float, eps: float, amsgrad: bool, maximize: bool, decoupled: bool,
                        grad_scale: Tensor | None, sums: Tensor) -> bool:
    """``torch._fused_adam(w)_``'s step (``decoupled``: AdamW) that also writes, per parameter, one row
    of ``sums`` (float64, ``[n, 4]``): g^2 (after unscaling), (new p - old p)^2, old p^2 and the new
    ``exp_avg_sq``. False, with nothing changed, where the kernel cannot take these tensors (not
    contiguous CPU float32/float64 tensors, or the kernel is not available here)."""
    if not all(p.device.type == "cpu" and p.dtype in DTYPES for p in params):
        return False  # the states and gradients: checked like their parameter in C++, before any change
    if not all(t.is_contiguous() for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs) for t in ts):
        return False
    if grad_scale is not None and (grad_scale.device.type != "cpu" or grad_scale.dtype != torch.float32):
        return False
    if not ready():
        return False
    torch.ops.optim_plugins.adam_step_with_sums(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
                                                beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled,
                                                grad_scale, sums)
    return True
