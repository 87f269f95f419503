"""Backends (compiled, triton wiring, auto), GradScaler's loss scale inside the step, fused_adamw.

Independent references: torch.optim (AdamW fused and single-tensor, SGD), GradScaler's
own unscale-then-step path. Inductor compiles are slow, so the compiled cases are few and
tiny, and share shapes so that each (program, shapes) compiles once per process.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import optim_plugins as op
from optim_plugins.kernels import compiled as compiled_kernels
from optim_plugins.optimizers import base

SHAPES = [(6, 4), (4,)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def set_grads(params, step, inf_at=None, scale=1.0):
    """Gradients of step ``step`` times the loss scale (a power of two: exact)."""
    for j, p in enumerate(params):
        p.grad = torch.sin(p.detach().float() * (step + 1) + j).mul(scale).to(p.dtype)
    if inf_at is not None and step == inf_at:
        params[0].grad[0, 0] = float("inf")


def scaled_run(opt, params, steps=5, inf_at=2):
    """GradScaler.step driving ``opt`` with lr changed every step by a scheduler; returns the scales seen."""
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    scales = []
    for i in range(steps):
        set_grads(params, i, inf_at, scale=float(scaler.scale(torch.ones(()))))
        scaler.step(opt)
        scaler.update()
        schedule.step()
        scales.append(scaler.get_scale())
    return scales


def assert_params_close(ours, theirs, rtol=1e-6, atol=1e-7):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- loss scaling in every backend


@pytest.fixture
def inductor(monkeypatch):
    """The compiled backend on Inductor's code (as for bf16 parameters), not the C++ loop it prefers."""
    monkeypatch.setattr(compiled_kernels, "CPP_LOOPS", False)


@pytest.mark.parametrize("backend", ["reference", "foreach", "compiled", "compiled-inductor"])
def test_grad_scaler_unscales_and_skips_inside_the_step(backend, request):
    """GradScaler + ours == GradScaler + torch.optim.AdamW(fused=True): unscale, inf skip, back-off, lr schedule."""
    if backend == "compiled-inductor":
        request.getfixturevalue("inductor")
        backend = "compiled"
    ours, theirs = make_params(), make_params()
    opt = op.create_optimizer("adamw", ours, lr=0.05, weight_decay=0.1, maximize=True, backend=backend)
    our_scales = scaled_run(opt, ours)
    their_scales = scaled_run(torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1, maximize=True, fused=True), theirs)
    assert our_scales == their_scales and our_scales[2] == our_scales[1] / 2  # the inf step backed the scale off
    assert_params_close(ours, theirs)
    assert all(int(opt.state[p]["step"]) == 4 for p in ours)  # the inf step did not count
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler removed them
    if backend == "compiled":  # a new lr every step (and new step counts): no compile, no recompile
        graphs, compiles = counters["stats"]["unique_graphs"], compiled_kernels.compile_count
        scaled_run(opt, ours, steps=3, inf_at=None)
        assert (counters["stats"]["unique_graphs"], compiled_kernels.compile_count) == (graphs, compiles)


def test_grad_scaler_with_whole_tensor_math_unscales_first():
    """Lamb (trust ratio: not elementwise) under GradScaler.step == Lamb stepped on unscaled grads."""
    ours, theirs = make_params(), make_params()
    opt = op.create_optimizer("lamb", ours, lr=0.05)
    plain = op.create_optimizer("lamb", theirs, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for i in range(3):
        set_grads(ours, i, inf_at=1, scale=float(scaler.scale(torch.ones(()))))
        set_grads(theirs, i)
        scaler.step(opt)
        scaler.update()
        if i != 1:  # GradScaler skipped the inf step; the plain run skips it too
            plain.step()
    assert_params_close(ours, theirs)


# ----------------------------------------------------------------------------- compiled == torch / reference


def test_compiled_sgd_matches_torch_across_its_first_step_branch():
    ours, theirs = make_params(), make_params()
    opt = op.create_optimizer("sgd", ours, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, backend="compiled")
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False)
    for i in range(4):
        for params, o in ((ours, opt), (theirs, ref)):
            set_grads(params, i)
            o.param_groups[0]["lr"] = 0.1 / (i + 1)
            o.step()
    assert_params_close(ours, theirs)


def test_compiled_kahan_bf16_matches_reference_backend():
    """bf16 parameters, Kahan compensation, fp32 states: compiled equals reference to fp32 rounding."""
    results = {}
    for backend in ("reference", "compiled"):
        params = make_params(torch.bfloat16)
        opt = op.create_optimizer("adamw", params, lr=0.05, weight_decay=0.1, maximize=True, compensation="kahan",
                                  state_dtype="fp32", backend=backend)
        scaled_run(opt, params)
        # the value Kahan tracks: the bf16 parameter plus its stored rounding error
        results[backend] = [p.float() + opt.state[p]["compensation"].float() for p in params]
    assert_params_close(results["compiled"], results["reference"], rtol=1e-6, atol=1e-6)


def test_compiled_falls_back_where_it_cannot_record():
    """AdaBelief's AdaNorm takes per-tensor norms: that bucket runs on foreach, same numbers."""
    results = []
    for backend in ("foreach", "compiled"):
        params = make_params()
        opt = op.create_optimizer("adabelief", params, lr=0.05, adanorm=True, backend=backend)
        for i in range(2):
            set_grads(params, i)
            opt.step()
        results.append(params)
    assert_params_close(*results, rtol=0, atol=0)


def test_compiled_packs_small_tensors_without_changing_a_bit(monkeypatch, inductor):
    """Inductor's path: tensors below PACK_BELOW elements are stepped in one compiled call on
    concatenated copies: the same bits as one call per tensor (the update is elementwise)."""
    results = []
    for pack_below in (compiled_kernels.PACK_BELOW, 0):
        monkeypatch.setattr(compiled_kernels, "PACK_BELOW", pack_below)
        g = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1, 7, 300, 9, 70_000)]
        opt = op.create_optimizer("adamw", params, lr=0.05, weight_decay=0.1, backend="compiled")
        for i in range(2):
            set_grads(params, i)
            opt.step()
        results.append((params, [opt.state[p]["exp_avg_sq"] for p in params]))
    (packed, packed_v), (single, single_v) = results
    for a, b, va, vb in zip(packed, single, packed_v, single_v):
        assert torch.equal(a, b) and torch.equal(va, vb)


# ----------------------------------------------------------------------------- auto and explicit backends


def test_auto_picks_foreach_for_small_models_and_compiled_from_the_threshold(monkeypatch):
    params = make_params()
    for p in params:
        p.grad = torch.zeros_like(p)
    adamw = op.create_optimizer("adamw", params)
    assert adamw.backend_for(adamw.param_groups[0], params) == "foreach"
    assert op.create_optimizer("adamw", params, foreach=False)._backend(adamw.param_groups[0] | {"foreach": False}) == "reference"
    lamb = op.create_optimizer("lamb", params)
    assert lamb.backend_for(lamb.param_groups[0], params) == "reference"
    total = sum(p.numel() for p in params)
    monkeypatch.setattr(base, "LOOP_THRESHOLD", total)  # fp32: the C++ loop's threshold
    expected = "compiled" if compiled_kernels.unavailable_reason() is None else "foreach"
    assert adamw.backend_for(adamw.param_groups[0], params) == expected
    assert lamb.backend_for(lamb.param_groups[0], params) == "reference"  # whole-tensor math stays per tensor
    half = [torch.nn.Parameter(p.detach().half()) for p in params]  # float16: Inductor's code, its own threshold
    lion = op.create_optimizer("lion", half)
    assert lion.backend_for(lion.param_groups[0], half) == "foreach"
    monkeypatch.setattr(base, "COMPILE_THRESHOLD", total)
    assert lion.backend_for(lion.param_groups[0], half) == expected


def test_unavailable_backend_asked_for_explicitly_is_a_clear_error(monkeypatch):
    from optim_plugins.kernels import triton as triton_kernels

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the triton backend is available here")
    monkeypatch.setattr(triton_kernels, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"backend.*'triton'.*triton: .*CUDA"):
        op.create_optimizer("adamw", make_params(), backend="triton")
    monkeypatch.setattr(compiled_kernels.shutil, "which", lambda name: None)
    compiled_kernels.unavailable_reason.cache_clear()  # looked up once per process
    monkeypatch.setattr(compiled_kernels, "unavailable_reason", compiled_kernels.unavailable_reason.__wrapped__)
    with pytest.raises(ValueError, match=r"backend.*'compiled'.*compiled: no C\+\+ compiler"):
        op.create_optimizer("adamw", make_params(), backend="compiled")


# ----------------------------------------------------------------------------- fused_adamw


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_is_torch_fused_adamw_bit_for_bit(options, dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = op.create_optimizer("fused_adamw", ours, lr=0.05, compensation=None, **options)
    ref = torch.optim.AdamW(theirs, lr=0.05, fused=True, **options)
    assert scaled_run(opt, ours) == scaled_run(ref, theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][name], ref.state[b][name])


@pytest.mark.parametrize("name,torch_cls,options", [
    ("adamw", torch.optim.AdamW, dict(weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),  # L2 decay through torch._fused_adam_
    ("sgd", torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),  # the first step copies g
    ("sgd", torch.optim.SGD, dict(momentum=0.9, dampening=0.1, maximize=True)),
    ("sgd", torch.optim.SGD, dict()),  # no momentum buffer
    ("adagrad", torch.optim.Adagrad, dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
])
def test_auto_runs_torch_fused_kernel_bit_for_bit(name, torch_cls, options):
    """``backend="auto"`` on CPU: adam/adamw, sgd and adagrad step with torch's fused kernel (the same
    bits as ``fused=True``)."""
    ours, theirs, explicit = make_params(), make_params(), make_params()
    step_together(3, (op.create_optimizer(name, ours, lr=0.05, **options), ours),
                  (torch_cls(theirs, lr=0.05, fused=True, **options), theirs),
                  (op.create_optimizer(name, explicit, lr=0.05, backend="foreach", **options), explicit))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert_params_close(explicit, ours)  # the optimizer's own update (foreach) agrees to fp32 rounding


def step_together(steps: int, *runs: tuple) -> None:
    """``steps`` steps of each ``(optimizer, params)`` on the same gradients."""
    for i in range(steps):
        for opt, params in runs:
            set_grads(params, i)
            opt.step()


def test_torch_fused_path_buckets_mixed_dtypes():
    """fp32 and fp64 tensors in one group under backend="auto": one torch fused call per dtype, the same
    bits as torch.optim.SGD(fused=True) (which groups by dtype too)."""
    def params():
        mixed = [torch.nn.Parameter(p.detach().double()) if i == 1 else p for i, p in enumerate(make_params())]
        return mixed + make_params(seed=1)

    ours, theirs = params(), params()
    step_together(3, (op.create_optimizer("sgd", ours, lr=0.05, momentum=0.9), ours),
                  (torch.optim.SGD(theirs, lr=0.05, momentum=0.9, fused=True), theirs))
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_torch_fused_path_is_decided_per_parameter():
    """adamw8bit: its 8-bit tensor takes the 8-bit path, its small fp32 one torch's fused kernel, exactly as
    when that tensor is stepped alone (a sharded rank holding only small tensors gets the same bits)."""
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(5))
    alone = torch.nn.Parameter(small.detach().clone())
    mixed = op.create_optimizer("adamw8bit", [big, small], lr=0.05, min_8bit_size=4096)
    single = op.create_optimizer("adamw8bit", [alone], lr=0.05, min_8bit_size=4096)
    ref = torch.nn.Parameter(small.detach().clone())
    fused = torch.optim.AdamW([ref], lr=0.05, fused=True)
    for i in range(3):
        set_grads([big, small], i)
        alone.grad = small.grad.clone()
        ref.grad = small.grad.clone()
        for o in (mixed, single, fused):
            o.step()
    assert mixed.state[big]["exp_avg"].dtype == torch.uint8
    assert torch.equal(small, alone) and torch.equal(small, ref)


def test_step_counts_live_in_one_tensor_and_stay_per_parameter(tmp_path):
    """A step's 0-d step counters are views into one tensor (one add_ counts the step), each parameter
    keeping its own count: a parameter without a gradient is not counted (bias correction as torch's
    AdamW, which counts per parameter), a checkpoint resumes through torch.load(weights_only=True), and
    state_bytes_per_param gives every parameter its own 4 bytes of step."""
    def params():
        return make_params() + make_params(seed=1)

    ours, theirs = params(), params()
    opt = op.create_optimizer("adamw", ours, lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1, foreach=False)

    def run(steps, first, skip=None):
        for i in range(first, first + steps):
            for ps, o in ((ours, opt), (theirs, ref)):
                set_grads(ps, i)
                if skip is not None and i == skip:
                    ps[1].grad = None
                o.step()

    run(3, 0, skip=1)
    steps = [opt.state[p]["step"] for p in ours]
    assert [s.dim() for s in steps] == [0] * 4 and [float(s) for s in steps] == [3.0, 2.0, 3.0, 3.0]
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1  # the last step packed all four
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    n = [p.numel() for p in ours]
    assert op.state_bytes_per_param(opt) == [8 * k + 4 for k in n] and op.state_bytes(opt) == sum(8 * k + 4 for k in n)

    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    resumed = op.create_optimizer("adamw", resumed_params, lr=0.05, weight_decay=0.1)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for i in (3, 4):
        for ps, o in ((ours, opt), (resumed_params, resumed), (theirs, ref)):
            set_grads(ps, i)
            o.step()
    assert [float(resumed.state[p]["step"]) for p in resumed_params] == [5.0, 4.0, 5.0, 5.0]
    for a, b, c in zip(ours, resumed_params, theirs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)


TRITON_SCRIPT = '''
import torch, optim_plugins as op
def make():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 4), (4,)]]
ours, theirs = make(), make()
opt = op.create_optimizer("adamw", ours, lr=0.05, weight_decay=0.1, backend="triton")
assert opt.backend_for(opt.param_groups[0], ours) == "triton"
scales = []
for o, params in ((opt, ours), (torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.1, fused=True), theirs)):
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    for i in range(3):
        scale = float(scaler.scale(torch.ones(())))
        for j, p in enumerate(params):
            p.grad = torch.sin(p.detach() * (i + 1) + j) * scale
        if i == 1:
            params[0].grad[0, 0] = float("inf")
        scaler.step(o)
        scaler.update()
    scales.append(scaler.get_scale())
assert scales[0] == scales[1] == 128.0, scales
for a, b in zip(ours, theirs):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
assert [int(opt.state[p]["step"]) for p in ours] == [2, 2]
print("ok")
'''


def test_triton_backend_takes_the_loss_scale_under_the_interpreter():
    """backend="triton" (TRITON_INTERPRET=1, CPU tensors) under GradScaler == torch fused AdamW under GradScaler."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
