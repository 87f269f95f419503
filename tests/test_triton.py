"""The Triton step kernels against the reference backend (cases in tests/triton_cases.py).

``TRITON_INTERPRET`` is read when triton is imported, so the cases run in a subprocess
with ``TRITON_INTERPRET=1`` (Triton's interpreter on CPU tensors); the rest of the suite
never imports triton in interpreted mode. When a CUDA GPU is present the same cases also
run natively, and the GPU's name is printed with the result.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases.py")
COMPILE_CHECK = Path(__file__).with_name("triton_compile_check.py")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_cases(env_update: dict[str, str], script: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_update}
    command = [sys.executable, str(script)] if script else [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(CASES)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=CASES.parent.parent)


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@needs_triton
def test_kernels_interpreted_on_cpu():
    result = run_cases({"TRITON_INTERPRET": "1", "OPTIM_PLUGINS_TRITON_DEVICE": "cpu"})
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in summary and "failed" not in summary, summary


@needs_triton
@pytest.mark.skipif(not _ptxas(), reason="this triton install has no ptxas (triton/backends/nvidia/bin)")
def test_kernels_compile_for_gpu():
    """Triton's real compiler (no GPU needed) accepts every kernel variant: the interpreter alone would not tell."""
    result = run_cases({"TRITON_INTERPRET": "0"}, script=COMPILE_CHECK)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "variants compiled for sm_90" in result.stdout


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the native run needs one")
def test_kernels_native_on_gpu():
    result = run_cases({"TRITON_INTERPRET": "0", "OPTIM_PLUGINS_TRITON_DEVICE": "cuda"})
    print(f"native Triton kernel cases on {torch.cuda.get_device_name()}: {result.stdout.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
