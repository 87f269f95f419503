"""The C++ CPU kernels (optim_plugins/kernels/cpp): the Adam/AdamW and SGD steps with op.telemetry's
sums, and the 8/4-bit state codecs.

Independent references: torch's own fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_`` /
``torch._fused_sgd_``, what ``fused=True`` runs), which the step kernels must equal bit for bit,
float64 sums written out here, and this package's eager quantisers (themselves tested against
bitsandbytes and the papers' quantisers in tests/test_lowbit.py), whose bytes the codecs must give.
The first test builds the library (about 20 s on 2 cores, cached afterwards).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.kernels import cpp as cpp_kernels
from optim_plugins.kernels import quantize

pytestmark = pytest.mark.skipif(cpp_kernels.unavailable_reason() is not None,
                                reason=f"C++ kernel not buildable here: {cpp_kernels.unavailable_reason()}")

# sizes around the vector width (8 floats, 4 doubles on AVX2; 16/8 on AVX512) and the tail code
SIZES = [1, 7, 8, 17, 1023, 1025, 100_003]


def tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=g, dtype=dtype) for n in SIZES]
    grads = [torch.randn(n, generator=g, dtype=dtype) * 3.7 for n in SIZES]
    m = [torch.randn(n, generator=g, dtype=dtype) * 0.1 for n in SIZES]
    v = [torch.rand(n, generator=g, dtype=dtype) * 0.1 for n in SIZES]
    vmax = [x * 1.1 for x in v]
    steps = [torch.tensor(float(1 + i % 3)) for i in range(len(SIZES))]  # per-tensor step counts differ
    return p, grads, m, v, vmax, steps


def clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("amsgrad,maximize,beta1,weight_decay,scale", [
    (False, False, 0.9, 0.1, None),
    (True, False, 0.9, 0.1, None),
    (False, True, 0.3, 0.0, None),  # 1 - beta1 >= 0.5: the other branch of ATen's lerp
    (True, False, 0.9, 0.01, 3.7),  # GradScaler's scale, not a power of two: divided and written back
])
def test_kernel_equals_torch_fused_adam_bitwise_and_sums_the_step(dtype, decoupled, amsgrad, maximize, beta1,
                                                                 weight_decay, scale):
    p, g, m, v, vmax, steps = tensors(dtype)
    options = dict(amsgrad=amsgrad, lr=1e-3, beta1=beta1, beta2=0.999, weight_decay=weight_decay, eps=1e-8,
                   maximize=maximize)
    grad_scale = None if scale is None else torch.tensor(scale)
    ref = clone([p, g, m, v, vmax])
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(*ref[:4], ref[4] if amsgrad else [], [s.clone() for s in steps], **options, grad_scale=grad_scale,
          found_inf=None)
    ours = clone([p, g, m, v, vmax])
    sums = torch.zeros(len(SIZES), 4, dtype=torch.float64)
    assert cpp_kernels.adam_step_with_sums(*ours[:4], ours[4] if amsgrad else [], steps, **options,
                                           decoupled=decoupled, grad_scale=grad_scale, sums=sums)
    for name, expected, got in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ref, ours):
        for n, e, o in zip(SIZES, expected, got):
            assert torch.equal(e, o), f"{name} of size {n} differs from torch's fused kernel"
    unscaled = [x.double() for x in ref[1]]  # the gradient the step used: torch's kernel wrote it back unscaled
    written = torch.tensor([[float((x ** 2).sum()), float(((new.double() - old.double()) ** 2).sum()),
                             float((old.double() ** 2).sum()), float(sq.double().sum())]
                            for x, new, old, sq in zip(unscaled, ours[0], p, ours[3])], dtype=torch.float64)
    torch.testing.assert_close(sums, written, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay,momentum,dampening,nesterov,maximize,first,scale", [
    (0.0, 0.0, 0.0, False, False, False, None),  # plain SGD
    (0.1, 0.9, 0.0, False, False, True, None),  # first step: the momentum starts from the gradient
    (0.1, 0.9, 0.2, False, True, False, None),
    (0.1, 0.9, 0.0, True, False, False, 3.7),  # Nesterov, GradScaler's scale (divided and written back)
])
def test_sgd_kernel_equals_torch_fused_sgd_bitwise_and_sums_the_step(dtype, weight_decay, momentum, dampening,
                                                                     nesterov, maximize, first, scale):
    p, g, m, _, _, _ = tensors(dtype)
    options = dict(weight_decay=weight_decay, momentum=momentum, lr=0.01, dampening=dampening, nesterov=nesterov,
                   maximize=maximize)
    grad_scale = None if scale is None else torch.tensor(scale)
    ref = clone([p, g, m])
    torch._fused_sgd_(*ref[:2], ref[2] if momentum else [], **options, is_first_step=first, grad_scale=grad_scale,
                      found_inf=None)
    ours = clone([p, g, m])
    sums = torch.zeros(len(SIZES), 4, dtype=torch.float64)
    steps = [torch.tensor(1.0 if first else 4.0) for _ in SIZES]
    assert cpp_kernels.sgd_step_with_sums(*ours[:2], ours[2] if momentum else [], steps, **options,
                                          grad_scale=grad_scale, sums=sums)
    for name, expected, got in zip(("param", "grad", "momentum_buffer"), ref, ours):
        for n, e, o in zip(SIZES, expected, got):
            assert torch.equal(e, o), f"{name} of size {n} differs from torch's fused kernel"
    written = torch.tensor([[float((x.double() ** 2).sum()), float(((new.double() - old.double()) ** 2).sum()),
                             float((old.double() ** 2).sum()), 0.0] for x, new, old in zip(ref[1], ours[0], p)],
                           dtype=torch.float64)
    torch.testing.assert_close(sums, written, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_a_bad_tensor_raises_before_any_tensor_is_stepped():
    p, g, m, v, _, steps = tensors(torch.float32)
    m[3] = m[3].double()  # the fourth tensor's state has the wrong dtype
    before = clone([p, m, v])
    with pytest.raises(RuntimeError, match="tensor 3 is not a contiguous CPU tensor of its parameter's dtype"):
        cpp_kernels.adam_step_with_sums(p, g, m, v, [], steps, amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999,
                                        weight_decay=0.0, eps=1e-8, maximize=False, decoupled=True,
                                        grad_scale=None, sums=torch.zeros(len(p), 4, dtype=torch.float64))
    for expected, got in zip(before, [p, m, v]):
        assert all(torch.equal(e, o) for e, o in zip(expected, got))


def test_tensors_it_cannot_take_are_refused_without_a_change():
    p, g, m, v, _, steps = tensors(torch.float32)
    strided = [torch.randn(8, 4)[:, ::2]]  # not contiguous
    args = dict(amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
                decoupled=True, grad_scale=None, sums=torch.zeros(1, 4, dtype=torch.float64))
    for params in (strided, [p[0].bfloat16()]):
        copy = [t.clone() for t in params]
        like = [torch.zeros_like(t) for t in params]
        assert not cpp_kernels.adam_step_with_sums(params, like, like, like, [], steps[:1], **args)
        assert all(torch.equal(a, b) for a, b in zip(copy, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copy_and_change_sums_around_a_step(dtype):
    """The copy path's two passes: an exact copy with sum g^2 and sum p^2, then sum (new - old)^2 and
    sum v (0 where a tensor has none), against float64 sums written out here."""
    p, g, _, v, _, _ = tensors(dtype)
    copies = [torch.full_like(t, float("nan")) for t in p]
    before = cpp_kernels.copy_with_sums(p, copies, g)
    assert all(torch.equal(c, t) for c, t in zip(copies, p))
    new = [t - 0.01 * x for t, x in zip(p, g)]
    moments = [None if i % 2 else x for i, x in enumerate(v)]
    after = cpp_kernels.change_sums(copies, new, moments)
    tol = dict(rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    written = [[float((x.double() ** 2).sum()), float((t.double() ** 2).sum())] for x, t in zip(g, p)]
    torch.testing.assert_close(before, torch.tensor(written, dtype=torch.float64), **tol)
    written = [[float(((n - o).double() ** 2).sum()), 0.0 if m is None else float(m.double().sum())]
               for n, o, m in zip(new, p, moments)]
    torch.testing.assert_close(after, torch.tensor(written, dtype=torch.float64), **tol)


def test_copy_and_change_sums_refuse_what_they_cannot_take():
    """Tensors outside the kernels (bf16, not contiguous, a second moment of another dtype) come back
    as None with nothing written; a size mismatch the Python check cannot see raises before a copy."""
    p, g, _, v, _, _ = tensors(torch.float32)
    strided = torch.randn(8, 4)[:, ::2]
    copy = torch.zeros(8, 2)
    assert cpp_kernels.copy_with_sums([strided], [copy], [torch.ones(8, 2)]) is None and not copy.any()
    assert cpp_kernels.copy_with_sums([p[0].bfloat16()], [p[0].bfloat16()], [g[0].bfloat16()]) is None
    assert cpp_kernels.change_sums(p, p, [x.double() for x in v]) is None
    copies = [torch.zeros_like(t) for t in p]
    with pytest.raises(RuntimeError, match="tensor 2 is not a contiguous CPU tensor of its parameter's dtype and size"):
        cpp_kernels.copy_with_sums(p, copies, g[:2] + [g[3]] + g[3:])
    assert not any(c.any() for c in copies)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 3))


def train(name, record, steps=4, **options):
    net = model()
    optimizer = op.create_optimizer(name, net, lr=1e-2, weight_decay=0.1, **options)
    recorder = op.telemetry(optimizer, by="param", model=net) if record else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 16, generator=g), torch.randint(0, 3, (24,), generator=g)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net, optimizer, recorder


@pytest.mark.parametrize("name,options", [("adamw", {}), ("adam", {}), ("adamw", {"amsgrad": True}),
                                          ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_recording_steps_give_the_bits_of_unrecorded_ones(name, options, monkeypatch):
    calls = []
    kernel_name = "sgd_step_with_sums" if name == "sgd" else "adam_step_with_sums"
    kernel = getattr(cpp_kernels, kernel_name)
    monkeypatch.setattr(cpp_kernels, kernel_name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    plain, optimizer, _ = train(name, False, **options)
    assert optimizer.describe_backend(optimizer.param_groups[0]) == "torch fused kernel" and not calls
    recorded, _, recorder = train(name, True, **options)
    assert len(calls) == 4 * len(optimizer.param_groups)  # every recording step, every group: the kernel
    assert recorder._copies == {}  # no parameter copy was taken
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)
    assert len(recorder.history) == 4 and all(u["update_norm"] > 0 for u in recorder.history[-1]["units"].values())


def test_a_failed_build_warns_once_and_records_the_eager_way(monkeypatch):
    monkeypatch.setattr(cpp_kernels, "_load", lambda: "c++ failed (1): no such header")
    monkeypatch.setattr(cpp_kernels, "_warned", [])
    plain, _, _ = train("adamw", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded, _, recorder = train("adamw", True)
    messages = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    assert len(messages) == 1 and "no such header" in messages[0]
    assert recorder._copies  # the eager recorder copied the parameters
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 8-bit codec


def codec_inputs():
    """Random blocks of every scale, a partial last block, and the values that decide codes: the
    midpoints themselves in blocks whose absmax is 1 (ties go to the lower code), zeros of both signs,
    subnormals, inf and NaN."""
    g = torch.Generator().manual_seed(3)
    pieces = [torch.randn(99_840, generator=g) * torch.logspace(-30, 5, 99_840).roll(7)]  # 390 blocks of 256
    for signed in (True, False):
        code = quantize.dynamic_map(signed)
        ties = (code[1:] + code[:-1]) / 2
        pieces += [torch.cat([torch.ones(1), ties, -ties if signed else ties.flip(0)])[:256]]
    for code in (quantize.dynamic_map(True, max_exponent_bits=3, total_bits=4), quantize.linear_map(4)):
        ties = (code[1:] + code[:-1]) / 2  # the 4-bit maps' midpoints, in blocks of 128 whose absmax is 1
        pieces += [torch.cat([torch.ones(1), ties, ties, -ties, torch.zeros(128 - 1 - 3 * len(ties))])]
    pieces += [torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.0, -3.0] * 37),
               torch.tensor([1.0, float("inf"), 2.0] * 86), torch.tensor([1.0, float("nan"), -2.0] * 86)]
    return torch.cat(pieces)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("size", [1, 255, 256, 257, None])
def test_8bit_codec_gives_the_bytes_of_the_eager_code(signed, size, monkeypatch):
    x = codec_inputs()[:size].clone()
    if not signed:
        x = x.abs()
    native = quantize.quantize_blockwise(x, signed)
    back = quantize.dequantize_blockwise(*native, signed)
    monkeypatch.setattr(cpp_kernels, "ready", lambda: False)  # the eager tensor code, as on a machine without a compiler
    eager = quantize.quantize_blockwise(x, signed)
    assert torch.equal(native[0], eager[0])
    torch.testing.assert_close(native[1], eager[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(back, quantize.dequantize_blockwise(*eager, signed), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("size", [1, 127, 128, 129, None])
def test_4bit_block_codec_gives_the_bytes_of_the_eager_code(signed, size, monkeypatch):
    x = codec_inputs()[:size].clone()
    if not signed:
        x = x.abs()
    packed = torch.empty(quantize.num_bytes_4bit(x.numel()), dtype=torch.uint8)
    absmax = torch.empty(quantize.num_blocks(x.numel(), quantize.BLOCK_SIZE_4BIT))
    quantize.quantize_4bit_blockwise_(x, packed, absmax, signed)
    back = quantize.dequantize_4bit_blockwise(packed, absmax, x.shape, signed)
    monkeypatch.setattr(cpp_kernels, "ready", lambda: False)
    eager_packed, eager_absmax = torch.empty_like(packed), torch.empty_like(absmax)
    quantize.quantize_4bit_blockwise_(x, eager_packed, eager_absmax, signed)
    assert torch.equal(packed, eager_packed)
    torch.testing.assert_close(absmax, eager_absmax, rtol=0, atol=0, equal_nan=True)
    eager_back = quantize.dequantize_4bit_blockwise(eager_packed, eager_absmax, x.shape, signed)
    torch.testing.assert_close(back, eager_back, rtol=0, atol=0, equal_nan=True)


# odd element counts (the last byte's low nibble is 0, pairs that span two rows), one row, one column,
# rows and columns of zeros, an inf and a NaN (their row and column code NaN); (700, 301): the 2-D
# codec's maxima in two parts of rows (from 65536 elements a part, one per thread), the NaN in the second
@pytest.mark.parametrize("shape,nan", [((64, 33), False), ((301, 257), True), ((1, 5), False), ((7, 1), True),
                                       ((5, 7, 9), False), ((700, 301), True)])
def test_4bit_rank1_codec_gives_the_bytes_of_the_eager_code(shape, nan, monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(shape, generator=g) ** 4
    x.view(-1)[:3] = torch.tensor([0.0, 1e-45, float("inf")])[: x.numel()]
    if x.dim() == 2 and min(shape) > 2:
        x[2], x[:, 1] = 0.0, 0.0
    if nan:
        x.view(-1)[-1] = float("nan")
    packed = torch.empty(quantize.num_bytes_4bit(x.numel()), dtype=torch.uint8)
    maxima = torch.empty(sum(shape))
    quantize.quantize_4bit_rank1_(x, packed, maxima)
    back = quantize.dequantize_4bit_rank1(packed, maxima, x.shape)
    monkeypatch.setattr(cpp_kernels, "ready", lambda: False)
    eager_packed, eager_maxima = torch.empty_like(packed), torch.empty_like(maxima)
    quantize.quantize_4bit_rank1_(x, eager_packed, eager_maxima)
    assert torch.equal(packed, eager_packed)
    torch.testing.assert_close(maxima, eager_maxima, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(back, quantize.dequantize_4bit_rank1(eager_packed, eager_maxima, x.shape),
                               rtol=0, atol=0, equal_nan=True)


def test_4bit_rank1_codes_by_arithmetic_are_the_nearest_linear_codes():
    """The 2-D rank-1 codec finds the nearest code of the linear map (k / 16) by arithmetic, not by table:
    with every row and column holding a 1.0 the scale is 1 everywhere, so each value's code must be
    torch.bucketize's on the map's midpoints (ties to the lower code): every midpoint and the floats
    either side of it, 0 and -0, subnormal and tiny values, negatives, inf, and a million uniform ones."""
    code = quantize.linear_map(4)
    midpoints = (code[1:] + code[:-1]) / 2
    up, down = torch.full_like(midpoints, 2.0), torch.zeros_like(midpoints)
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-38, 1e-7, 1.0, 0.9999999, -0.25, -1e-30, float("inf"),
                            float("-inf")])
    values = torch.cat([midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down), code, special,
                        torch.rand(1_000_000, generator=torch.Generator().manual_seed(0))])
    cols = 1001
    x = torch.ones(len(values) // (cols - 1) + 2, cols)
    inner = x[1:, 1:].reshape(-1)  # a copy: row 0 and column 0 stay 1.0
    inner[: len(values)] = values
    x[1:, 1:] = inner.view(x.shape[0] - 1, cols - 1)
    packed = torch.empty(quantize.num_bytes_4bit(x.numel()), dtype=torch.uint8)
    maxima = torch.empty(sum(x.shape))
    assert cpp_kernels.quantize_4bit_rank1_2d_(x, packed, maxima)
    assert torch.equal(maxima, quantize.rank1_maxima(x))
    codes = quantize.unpack_4bit(packed, x.numel()).view(x.shape)
    # +-inf: its row and column maxima are inf, so it is divided by inf (NaN: the last code)
    expected = torch.bucketize(x, midpoints).where(torch.isfinite(x), torch.tensor(15))
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("name,options", [("adamw8bit", {"min_8bit_size": 1}), ("adamw4bit", {"min_4bit_size": 1})])
def test_low_bit_optimizers_step_the_same_with_and_without_the_codec(name, options, monkeypatch):
    plain, native_optimizer, _ = train(name, False, steps=3, **options)  # every state coded
    monkeypatch.setattr(cpp_kernels, "ready", lambda: False)
    eager, eager_optimizer, _ = train(name, False, steps=3, **options)
    for a, b in zip(plain.parameters(), eager.parameters()):
        assert torch.equal(a, b)
        native, eager_state = native_optimizer.state[a], eager_optimizer.state[b]
        assert native["exp_avg"].dtype == torch.uint8
        assert all(torch.equal(native[k], eager_state[k]) for k in native)


def test_a_compiler_error_comes_back_as_the_reason(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpp_kernels, "SOURCES", [broken])
    failure = cpp_kernels._build(cpp_kernels._compiler(), tmp_path / "lib.so")
    assert failure is not None and "failed on broken.cpp" in failure and "error" in failure
    assert not (tmp_path / "lib.so").exists()


def test_cached_libraries_unused_for_a_month_go_when_one_is_built(tmp_path, monkeypatch):
    """Building a library removes those of its stem last used (built or loaded) over CACHE_KEEP_DAYS ago;
    loading one marks it used; other stems and recent libraries stay."""
    import os
    import time

    monkeypatch.setattr(cpp_kernels, "_cache_dir", lambda: tmp_path)
    (tmp_path / "loops").mkdir()
    month = (cpp_kernels.CACHE_KEEP_DAYS + 1) * 86400
    files = {name: tmp_path / "loops" / f"{name}.so" for name in ("step-old", "step-recent", "other-old")}
    for name, path in files.items():
        path.write_text("")
        age = 86400 if name == "step-recent" else month
        os.utime(path, (time.time() - age, time.time() - age))

    def build(path):
        path.write_text("built")
        return None

    old_in_use = cpp_kernels._cached_library("loops/step", "in use", build)  # built now, then made old
    os.utime(old_in_use, (time.time() - month, time.time() - month))
    assert cpp_kernels._cached_library("loops/step", "in use", build) == old_in_use  # loaded: used now
    new = cpp_kernels._cached_library("loops/step", "new", build)
    assert new.read_text() == "built" and old_in_use.exists()
    assert not files["step-old"].exists() and files["step-recent"].exists() and files["other-old"].exists()


def test_an_unwritable_cache_comes_back_as_the_reason(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setattr(cpp_kernels, "_cache_dir", lambda: blocked / "optim_plugins")
    failure = cpp_kernels._load.__wrapped__()  # the uncached function: a fresh attempt
    assert failure is not None and "Error" in failure
