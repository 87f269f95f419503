"""Compile (without running) the Triton step kernels for an sm_90 GPU, on any machine.

The interpreter runs kernels as Python and so misses what only the real compiler rejects
(non-constexpr globals, type mismatches between branches, unsupported casts). Triton's
wheel ships ptxas, so lowering to PTX and a cubin needs no GPU. Run by tests/test_triton.py
in a subprocess without TRITON_INTERPRET; prints one line per variant and exits 1 on a failure.
It also reports whether the full-chunk path got 128-bit (v4) global loads.
"""
from __future__ import annotations

import re
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from optim_plugins.kernels.triton import adabelief, adam, adan, lion, rmsprop, sgd
from optim_plugins.kernels.triton import multi_tensor as mt

FLOATS = {"wd", *(f"h{i}" for i in range(mt.SCALARS))}
POINTERS = {"grad_scale": "*fp32", "clip_coef": "*fp32", "found_inf": "*fp32", "seed_ptr": "*i64", "stats": "*fp32",
            "code_signed": "*fp32", "mid_signed": "*fp32", "code_unsigned": "*fp32", "mid_unsigned": "*fp32"}
BASE = dict(O0=0, O1=0, O2=0, P_DTYPE=tl.float32, G_DTYPE=tl.float32, S_DTYPE=tl.float32, STATES=3, COMP=False,
            WRITE=0, WD_MODE=2, MAXIMIZE=False, HAS_SCALE=True, HAS_CLIP=True, HAS_FOUND_INF=True,
            STATS=False, V_SLOT=-1)
ELEMENTWISE = dict(BASE, ALIGNED=True, BLOCK=mt.BLOCK)
BF16 = dict(P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, S_DTYPE=tl.bfloat16)
VARIANTS = [  # every algorithm's update at its richest options, both precisions, both kernels
    ("adam amsgrad fp32", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=adam.update, STATES=7, O0=1)),
    ("adamw bf16 kahan", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=adam.update, COMP=True, WRITE=1, **BF16)),
    ("adamw bf16 stochastic", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=adam.update, WRITE=2, **BF16)),
    ("adamw telemetry sums", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=adam.update, STATS=True, V_SLOT=1)),
    ("lion", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=lion.update, STATES=1)),
    ("sgd nesterov", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=sgd.update, STATES=1, O0=1, O1=1)),
    ("rmsprop centered momentum", mt.elementwise_kernel,
     dict(ELEMENTWISE, UPDATE=rmsprop.update, STATES=7, O0=1, O1=1)),
    ("adan prox", mt.elementwise_kernel, dict(ELEMENTWISE, UPDATE=adan.update, STATES=15, O1=1, WD_MODE=0)),
    ("adabelief ams_bound l2", mt.elementwise_kernel,
     dict(ELEMENTWISE, UPDATE=adabelief.update, STATES=7, O0=1, WD_MODE=1)),
    ("adamw8bit", mt.blockwise8bit_kernel,
     dict(BASE, UPDATE=adam.update, CODED=3, SIGNED=1, QROWS=mt.QROWS, QBLOCK=mt.QBLOCK)),
    ("adamw8bit telemetry sums", mt.blockwise8bit_kernel,
     dict(BASE, UPDATE=adam.update, CODED=1, SIGNED=1, QROWS=mt.QROWS, QBLOCK=mt.QBLOCK, STATS=True, V_SLOT=1)),
    ("lion8bit bf16 kahan", mt.blockwise8bit_kernel, dict(BASE, UPDATE=lion.update, STATES=1, CODED=1, SIGNED=1,
                                                          QROWS=mt.QROWS, QBLOCK=mt.QBLOCK, COMP=True, WRITE=1,
                                                          P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16)),
]


def compile_variant(kernel, constexprs: dict, num_warps: int):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else "fp32" if n in FLOATS else POINTERS.get(n, "*i64")
                 for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if signature[n].startswith("*")}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    options = {"num_warps": num_warps, **mt.LAUNCH_OPTIONS}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main() -> int:
    failures = 0
    for name, kernel, constexprs in VARIANTS:
        start = time.time()
        try:
            compiled = compile_variant(kernel, constexprs, mt.NUM_WARPS if kernel is mt.elementwise_kernel else 4)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAILED {name}: {type(exc).__name__}: {exc}")
            continue
        ptx = compiled.asm["ptx"]
        v4 = len(re.findall(r"ld\.global[.\w:]*\.v4", ptx))
        print(f"ok {name}: {time.time() - start:.1f} s, {v4} v4 loads, cubin {len(compiled.asm['cubin'])} B")
    print(f"triton {triton.__version__}: {len(VARIANTS) - failures} of {len(VARIANTS)} variants compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
