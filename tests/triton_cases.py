"""The Triton kernels against the reference backend (run by tests/test_triton.py in a subprocess).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (CI) or natively on a CUDA GPU
(``OPTIM_PLUGINS_TRITON_DEVICE=cuda``). The reference is the same optimizer with
``backend="reference"`` (itself tested against torch.optim, pytorch_optimizer, lion_pytorch
and bitsandbytes in the optimizer suite), stepped on copies of the same parameters, states
and gradients.

Tolerances. fp32: every element within 1e-6 relative to the magnitudes of the step,
``|kernel - ref| <= 1e-6 * (|ref| + |before| + |ref - before|)`` (torch's CPU ``sqrt`` is not
correctly rounded, the kernel's is, so bit equality is not the claim; the |before| term
covers cancellation, e.g. a momentum buffer of 10 turning to -0.7 in one step).
bf16: the kernel computes in fp32 and rounds once, the reference rounds after every op,
and the kernel's update uses the fp32 states before they are rounded for storage (as torch's
fused Adam does), where the reference's uses the rounded ones. So bf16 states agree within 2
bf16 ulps (2**-7 relative) of the step's magnitudes; the Kahan value p + compensation within
2**-6 of the tensor's largest change in the step (plus 2**-14 of the value: the bf16 buffer
keeps ~16 bits); a bare bf16 p (compensation=None) within the same plus two bf16 ulps (2**-6
of the value): its rounding may go the other way when the two updates differ in the last bit.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import optim_plugins as op
from optim_plugins.kernels import triton as tk

DEVICE = torch.device(os.environ.get("OPTIM_PLUGINS_TRITON_DEVICE", "cpu"))
_reason = tk.unavailable_reason(DEVICE)
if _reason is not None:
    pytest.skip(f"Triton kernels cannot run here: {_reason}", allow_module_level=True)

from optim_plugins.kernels.triton import multi_tensor  # noqa: E402  (imports triton: after the check)

ODD_SHAPES = [(1,), (1023,), (1025,)]
FULL_CHUNK = (2049,)  # one full chunk (the unmasked, vectorised path) and a masked one


# ----------------------------------------------------------------------------- helpers


def kernel_step(opt, **scaling) -> None:
    """What ``step_group`` does for backend="triton": states initialised, step counted, then the kernel."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        states = [opt._state_of(p, group) for p in params]
        for state in states:
            state["step"] += 1
        tk.step(opt, group, params, [p.grad for p in params], states, **scaling)


def twins(name, shapes, dtype=torch.float32, warm=0, **options):
    """Two optimizers on equal parameters: the reference and a copy for the kernel."""
    torch.manual_seed(0)
    ref_params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    ref = op.create_optimizer(name, ref_params, backend="reference", **options)
    for _ in range(warm):  # reach a later step (e.g. rectify's adaptive branch) on the reference alone
        set_grads(ref_params)
        ref.step()
    ker_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ker = op.create_optimizer(name, ker_params, backend="reference", **options)
    ker.load_state_dict(copy.deepcopy(ref.state_dict()))
    return ref, ker


def set_grads(*param_lists, scale: float = 1.0) -> None:
    grads = [torch.randn(p.shape, device=DEVICE).to(p.dtype) * scale for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def launches() -> int:
    return sum(multi_tensor.LAUNCHES.values())


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def snapshot(opt):
    return {i: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
            for i, p in enumerate(params_of(opt))}


def assert_close(kernel, ref, before, what, rtol=1e-6):
    kernel, ref, before = (torch.view_as_real(t) if t.is_complex() else t for t in (kernel, ref, before))
    kernel, ref, before = kernel.double(), ref.double(), before.double()
    bound = rtol * (ref.abs() + before.abs() + (ref - before).abs())
    bad = (kernel - ref).abs() > bound
    bad |= kernel.isnan() != ref.isnan()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, e.g. kernel "
                           f"{kernel[bad][:3].tolist()} reference {ref[bad][:3].tolist()}")


def compare(ker, ref, p_before, s_before, label, rtol=1e-6, bf16=False):
    for i, (pk, pr) in enumerate(zip(params_of(ker), params_of(ref))):
        sk, sr = ker.state[pk], ref.state[pr]
        assert float(sk["step"]) == float(sr["step"])
        if bf16:
            value_k = pk.float() + sk["compensation"].float() if "compensation" in sk else pk.float()
            value_r = pr.float() + sr["compensation"].float() if "compensation" in sr else pr.float()
            change = (value_r - p_before[i].float()).abs()
            err = (value_k - value_r).abs()
            # p + compensation carries ~16 significant bits; a bare bf16 p may round the other way (1 ulp)
            ulps = 2**-14 if "compensation" in sr else 2**-6
            assert (err <= 2**-6 * change.max() + ulps * value_r.abs() + 1e-30).all(), (
                f"{label}: parameter {i}: max error {err.max().item():.3g}, change {change.max().item():.3g}")
        else:
            assert_close(pk.detach(), pr.detach(), p_before[i], f"{label}: parameter {i}", rtol)
        for key, value in sr.items():
            if key in ("step", "compensation") or not torch.is_tensor(value) or value.dim() == 0:
                continue
            if value.dtype == torch.uint8:  # 8-bit codes: the same codes (exact dequantise/requantise)
                mismatch = (sk[key].int() - value.int()).abs()
                assert mismatch.max() <= 1 and (mismatch > 0).float().mean() <= 1e-3, f"{label}: {key} of {i}"
                continue
            before = s_before[i].get(key, torch.zeros_like(value))  # states start at zero
            assert_close(sk[key], value, before, f"{label}: state {key} of parameter {i}",
                         2**-7 if value.dtype == torch.bfloat16 else rtol)


def run_steps(ref, ker, steps, bf16=False, lrs=None, **scaling):
    lrs = lrs or [None] * steps
    for k, lr in zip(range(steps), lrs):
        if lr is not None:  # a schedule changing lr between steps
            for opt in (ref, ker):
                for group in opt.param_groups:
                    group["lr"] = lr
        set_grads(params_of(ref), params_of(ker))
        p_before, s_before = [p.detach().clone() for p in params_of(ref)], snapshot(ref)
        ref.step()
        kernel_step(ker, **scaling)
        compare(ker, ref, p_before, s_before, f"step {k + 1}", bf16=bf16)
        sync(ker, ref)  # each step is checked from equal inputs (no carried-over rounding differences)


def sync(ker, ref) -> None:
    for pk, pr in zip(params_of(ker), params_of(ref)):
        pk.data.copy_(pr.data)
        for key, value in ref.state[pr].items():
            if torch.is_tensor(value):
                ker.state[pk][key].copy_(value)


# ----------------------------------------------------------------------------- every kernel, fp32

CONFIGS = [
    ("adamw", dict(weight_decay=0.1), 0),
    ("adamw", dict(state_dtype="bf16"), 0),  # fp32 parameters, bf16 states (math in fp32 in both)
    ("adam", dict(amsgrad=True, weight_decay=0.1, maximize=True), 0),
    ("lion", dict(weight_decay=0.1), 0),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01), 0),
    ("sgd", dict(momentum=0.9, dampening=0.1, decoupled_weight_decay=True, weight_decay=0.01), 0),
    ("sgd", dict(), 0),
    ("rmsprop", dict(momentum=0.9, centered=True, weight_decay=0.01), 0),
    ("rmsprop", dict(), 0),
    ("adan", dict(weight_decay=0.02), 0),
    ("adan", dict(weight_decay=0.02, no_prox=True, restart_interval=2), 1),  # steps 2, 3: a restart at 3
    ("adabelief", dict(weight_decay=0.01, rectify=True, ams_bound=True), 7),  # rectified adaptive branch
    ("adabelief", dict(weight_decay=0.01, rectify=True), 0),  # below the threshold: SGD steps
    ("adabelief", dict(weight_decay=0.01, weight_decouple=False, rectify=True, degenerated_to_sgd=False), 0),
    ("adabelief", dict(weight_decay=0.01, fixed_decay=True, adam_debias=True), 0),
    ("adamw8bit", dict(min_8bit_size=1024), 0),  # (1,), (1023,): fp32 states; (1025,), (2049,): 8-bit
    ("lion8bit", dict(min_8bit_size=1024, weight_decay=0.1), 0),
]


@pytest.mark.parametrize("name,options,warm", CONFIGS, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o, _ in CONFIGS])
def test_matches_reference(name, options, warm):
    shapes = ODD_SHAPES + [FULL_CHUNK] if name in ("adamw", "adamw8bit", "lion") else ODD_SHAPES
    ref, ker = twins(name, shapes, warm=warm, **options)
    assert tk.supports(ker, ker.param_groups[0])
    lr = ref.param_groups[0]["lr"]
    run_steps(ref, ker, 2, lrs=[lr, lr * 0.3])


def test_lr_change_does_not_recompile():
    ref, ker = twins("adamw", [(300,)])
    seen = multi_tensor.LAUNCHES.copy()
    before = multi_tensor.compiled_variants()
    run_steps(ref, ker, 3, lrs=[1e-3, 5e-4, 2e-4])
    new = multi_tensor.LAUNCHES - seen  # launches per (kernel, constexpr arguments) during the three steps
    assert list(new.values()) == [3]  # one launch per step, all three with the same specialisation
    after = multi_tensor.compiled_variants()  # the JIT's own cache (None under the interpreter)
    if after is not None:
        assert after - before <= 1


# ----------------------------------------------------------------------------- buckets, scaling, skipping


def test_one_launch_per_bucket_and_mixed_dtypes():
    torch.manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    sizes = [7, 65, 1025, 40, 33]
    ref_params = [torch.randn(n, device=DEVICE).to(dt).requires_grad_() for n, dt in zip(sizes, dtypes)]
    ker_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = op.create_optimizer("adamw", ref_params, backend="reference", weight_decay=0.1)
    ker = op.create_optimizer("adamw", ker_params, backend="reference", weight_decay=0.1)
    set_grads(ref_params, ker_params)
    p_before = [p.detach().clone() for p in ref_params]
    seen = launches()
    ref.step()
    kernel_step(ker)
    assert launches() - seen == 3  # fp32 (3 tensors), bf16 and fp16 buckets: not 5 launches
    for i, dtype in enumerate(dtypes):
        pk, pr = ker_params[i], ref_params[i]
        if dtype == torch.float32:
            assert_close(pk.detach(), pr.detach(), p_before[i], f"fp32 parameter {i}")
            for key in ("exp_avg", "exp_avg_sq"):
                value = ref.state[pr][key]
                assert_close(ker.state[pk][key], value, torch.zeros_like(value), key)
        else:  # Kahan-compensated low-precision parameters (see the module docstring)
            value_k, value_r = (p.float() + opt.state[p]["compensation"].float() for opt, p in ((ker, pk), (ref, pr)))
            change = (value_r - p_before[i].float()).abs()
            assert ((value_k - value_r).abs() <= 2**-6 * change.max() + 2**-14 * value_r.abs()).all(), dtype


def test_found_inf_leaves_everything_unchanged():
    ref, ker = twins("adamw", ODD_SHAPES)
    run_steps(ref, ker, 1)
    set_grads(params_of(ker))
    params = [p.detach().clone() for p in params_of(ker)]
    states = snapshot(ker)
    kernel_step(ker, found_inf=torch.ones((), device=DEVICE))
    for i, p in enumerate(params_of(ker)):
        assert torch.equal(p.detach(), params[i])
        for key, value in states[i].items():
            assert torch.equal(ker.state[p][key], value)
        ker.state[p]["step"] -= 1  # the step machinery's business: a skipped step is not counted
    # found_inf == 0: an ordinary step
    run_steps(ref, ker, 1, found_inf=torch.zeros((), device=DEVICE))


def test_grad_scale_and_clip_coef_applied_inside():
    scale, clip = 2.0**12, 0.25
    ref, ker = twins("adamw", ODD_SHAPES)
    set_grads(params_of(ref))
    for pr, pk in zip(params_of(ref), params_of(ker)):
        pk.grad = pr.grad * scale  # what the kernel sees: scaled gradients
        pr.grad = pr.grad * scale * (1 / scale) * clip  # what the reference sees: unscaled and clipped
    p_before, s_before = [p.detach().clone() for p in params_of(ref)], snapshot(ref)
    ref.step()
    kernel_step(ker, grad_scale=torch.tensor(1 / scale, device=DEVICE), clip_coef=torch.tensor(clip, device=DEVICE))
    compare(ker, ref, p_before, s_before, "grad_scale + clip_coef")


def test_empty_inputs():
    ref, ker = twins("adamw", [(0,), (5,)])
    group = ker.param_groups[0]
    seen = launches()
    tk.step(ker, group, [], [], [])  # an empty bucket: nothing to do
    assert launches() == seen
    run_steps(ref, ker, 1)  # a zero-size tensor next to a real one


def test_layouts():
    # a dense but transposed parameter with a contiguous gradient: handled (the gradient is relaid out)
    torch.manual_seed(2)
    base = torch.randn(30, 40, device=DEVICE).t()  # shape (40, 30), strides (1, 40)
    ref_p, ker_p = base.clone().requires_grad_(), base.clone().requires_grad_()
    assert not ref_p.is_contiguous() and ref_p.stride() == (1, 40)
    ref = op.create_optimizer("lion", [ref_p], backend="reference")
    ker = op.create_optimizer("lion", [ker_p], backend="reference")
    run_steps(ref, ker, 2)
    assert ker.state[ker_p]["exp_avg"].stride() == ker_p.stride()
    # a strided view (not dense): rejected with a clear error, nothing changed
    p = torch.randn(10, 20, device=DEVICE)[:, ::2].requires_grad_()
    p.grad = torch.randn_like(p)
    opt = op.create_optimizer("adamw", [p], backend="reference")
    before = p.detach().clone()
    with pytest.raises(ValueError, match="not dense"):
        kernel_step(opt)
    assert torch.equal(p.detach(), before)


# ----------------------------------------------------------------------------- bf16 precision


def test_bf16_kahan_and_fp32_states():
    for options in (dict(), dict(state_dtype="fp32"), dict(compensation=None)):
        ref, ker = twins("adamw", [(1,), (1025,)], dtype=torch.bfloat16, weight_decay=0.1, **options)
        lr = ref.param_groups[0]["lr"]
        run_steps(ref, ker, 3, bf16=True, lrs=[lr, lr, lr / 4])
        assert ("compensation" in ker.state[params_of(ker)[0]]) == ("compensation" not in options)
    # 8-bit states of bf16 parameters: fp32 math, Kahan-compensated parameter write
    ref, ker = twins("adamw8bit", [(1025,)], dtype=torch.bfloat16, min_8bit_size=1024)
    run_steps(ref, ker, 2, bf16=True)


def test_stochastic_rounding_is_unbiased():
    """SGD from 1.0 by lr * g = 2**-10 in bf16, whose spacing just below 1 is 2**-8: the exact
    result 1 - 2**-10 lies 3/4 of the way from 1 - 2**-8 to 1, so each element must round up
    with probability 3/4 and the mean of the rounded elements must be the exact value."""
    n = 8192
    p = torch.ones(n, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    p.grad = torch.ones(n, device=DEVICE, dtype=torch.bfloat16)
    opt = op.create_optimizer("sgd", [p], backend="reference", lr=2.0**-10, compensation="stochastic")
    torch.manual_seed(3)
    kernel_step(opt)
    values = p.detach().float()
    exact = 1 - 2.0**-10
    low, high = 1 - 2.0**-8, 1.0  # bf16 neighbours of the exact value (spacing 2**-8 just below 1)
    assert set(values.unique().tolist()) <= {low, high}
    q = (exact - low) / (high - low)  # probability of rounding up: 3/4
    frac = (values == high).double().mean().item()
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(frac - q) < 5 * sigma, (frac, q)
    assert abs(values.double().mean().item() - exact) < 5 * sigma * (high - low)
    # a second draw differs element by element (fresh random bits per step)
    first = values.clone()
    p.data.fill_(1.0)
    kernel_step(opt)
    assert not torch.equal(first, p.detach().float())


# ----------------------------------------------------------------------------- what is (not) covered


def test_supports_and_errors():
    def make(name, **options):
        return op.create_optimizer(name, [torch.randn(3, device=DEVICE, requires_grad=True)], **options)

    for name in ("adamw", "adam", "lion", "sgd", "adan", "rmsprop", "adabelief", "adam8bit", "adamw8bit", "lion8bit"):
        opt = make(name)
        assert tk.supports(opt, opt.param_groups[0]), name
    opt = make("adabelief", adanorm=True)
    assert not tk.supports(opt, opt.param_groups[0])  # a per-tensor norm: no elementwise kernel
    opt = make("lamb")
    assert not tk.supports(opt, opt.param_groups[0])
    opt = op.create_optimizer("adamw", [torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)])
    assert not tk.supports(opt, opt.param_groups[0])
    if DEVICE.type == "cpu":  # the interpreter takes CPU tensors only
        assert "CPU tensors only" in tk.unavailable_reason("cuda")
    opt = make("adamw")
    opt.param_groups[0]["params"][0].grad = torch.ones(3, device=DEVICE)
    with pytest.raises(TypeError, match="no kernel"):
        tk.step(make("lamb"), make("lamb").param_groups[0], [torch.ones(1)], [torch.ones(1)], [{}])


def test_complex_parameters():
    torch.manual_seed(4)
    ref_p = torch.randn(5, dtype=torch.complex64, device=DEVICE).requires_grad_()
    ker_p = ref_p.detach().clone().requires_grad_()
    ref = op.create_optimizer("adamw", [ref_p], backend="reference")
    ker = op.create_optimizer("adamw", [ker_p], backend="reference")
    run_steps(ref, ker, 2)


def test_through_create_optimizer():
    from optim_plugins.optimizers import base

    if "triton" not in base.AVAILABLE_BACKENDS:
        pytest.skip("backend='triton' is not wired into optimizers/base.py in this checkout")
    torch.manual_seed(5)
    ref_params = [torch.randn(s, device=DEVICE).requires_grad_() for s in [(3,), (1025,)]]
    ker_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = op.create_optimizer("adamw", ref_params, backend="reference", weight_decay=0.1)
    ker = op.create_optimizer("adamw", ker_params, backend="triton", weight_decay=0.1)
    seen = launches()
    for _ in range(2):
        set_grads(ref_params, ker_params)
        p_before, s_before = [p.detach().clone() for p in ref_params], snapshot(ref)
        ref.step()
        ker.step()
        compare(ker, ref, p_before, s_before, "backend='triton'")
    assert launches() - seen == 2  # the kernels did the steps: one launch each


@pytest.mark.parametrize("name,dtype,options", [
    ("adamw", torch.float32, {"weight_decay": 0.1}),
    ("adam8bit", torch.float32, {"min_8bit_size": 1024}),  # the big tensor 8-bit (no second moment), the small fp32
    ("lion", torch.float32, {}),
    ("adamw", torch.bfloat16, {}),  # Kahan: the update of the fp32 value p + compensation
])
def test_telemetry_sums_come_from_the_kernel(name, dtype, options):
    """op.telemetry on backend="triton": grad, update and weight norms and the second moment are
    summed inside the kernel (one launch per bucket, no parameter copy), equal to the eager
    recorder on the reference backend."""
    from optim_plugins.telemetry import telemetry

    torch.manual_seed(6)
    shapes = [(3,), (2049,), (40, 30)]
    ref_params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    ker_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = op.create_optimizer(name, ref_params, backend="reference", lr=1e-2, **options)
    ker = op.create_optimizer(name, ker_params, backend="triton", lr=1e-2, **options)
    records = [telemetry(ref, by="param"), telemetry(ker, by="param")]
    for _ in range(3):
        set_grads(ref_params, ker_params)
        seen = launches()
        ref.step()
        ker.step()
        assert launches() - seen == (2 if name == "adam8bit" else 1)  # one per bucket (8-bit, fp32): no extra pass
        expected, got = (r.history[-1]["units"] for r in records)
        assert set(expected) == set(got)
        for unit, values in expected.items():
            assert set(got[unit]) == set(values), unit
            for metric, value in values.items():
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the two updates differ in rounding
                assert got[unit][metric] == pytest.approx(value, rel=tolerance, abs=1e-9), (unit, metric)
    assert ("second_moment" in got["param2"]) == (name == "adamw")  # 8-bit and Lion: no float second moment


def test_kernel_error_leaves_the_step_count():
    """A parameter the kernels cannot take raises before any launch: nothing changes, ``step`` is not counted."""
    dense = torch.randn(4, device=DEVICE, requires_grad=True)
    strided = torch.randn(4, 8, device=DEVICE)[:, ::2].requires_grad_()  # not dense in memory
    opt = op.create_optimizer("adamw", [dense, strided], backend="triton")
    dense.grad, strided.grad = torch.ones_like(dense), torch.ones_like(strided)
    before = [dense.detach().clone(), strided.detach().clone()]
    seen = launches()
    with pytest.raises(ValueError, match="not dense"):
        opt.step()
    assert launches() == seen
    assert torch.equal(dense, before[0]) and torch.equal(strided, before[1])
    assert [float(opt.state[p]["step"]) for p in (dense, strided)] == [0.0, 0.0]
