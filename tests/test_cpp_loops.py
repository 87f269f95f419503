"""The compiled backend's C++ loops (optim_plugins/kernels/cpp/loops.py): a recorded update printed as
one loop over a bucket.

Independent references: torch's own operations (each operation of the recorded programs' table is
compared with torch's eager result on NaN, inf, signed zeros and ordinary values), and the reference
backend (every elementwise optimizer, in tests/test_optimizers.py::test_backends_agree). Each
program builds in about half a second, cached on disk afterwards.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import optim_plugins as op
from optim_plugins.kernels import compiled
from optim_plugins.kernels.cpp import loops

pytestmark = pytest.mark.skipif(compiled.unavailable_reason() is not None or loops.unavailable_reason() is not None,
                                reason="no C++ compiler or an unsupported CPU capability here")

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -2.5, 0.25, 0.5, 0.75, 3.0]


def operands(dtype, n=37, seed=0):
    """Three operand tensors whose first rows pair every special value with every other."""
    special = torch.tensor(SPECIAL, dtype=dtype)
    a = special.repeat_interleave(len(SPECIAL))
    b = special.repeat(len(SPECIAL))
    g = torch.Generator().manual_seed(seed)
    rest = [torch.randn(n, generator=g, dtype=dtype) for _ in range(3)]
    return [torch.cat([a, rest[0]]), torch.cat([b, rest[1]]), torch.cat([b.flip(0), rest[2]])]


# every operation of compiled._OPS, written the way torch computes it (the reference)
TORCH = {
    "add": lambda x, y, z, c: x + y * c[0],
    "mul": lambda x, y, z, c: x * y,
    "div": lambda x, y, z, c: x / y,
    "lerp": lambda x, y, z, c: torch.lerp(x, y, z),
    "lerp_low": lambda x, y, z, c: torch.lerp(x, y, c[0]),  # ATen's branch for |w| < 0.5
    "lerp_high": lambda x, y, z, c: torch.lerp(x, y, c[1]),  # and for |w| >= 0.5
    "addcmul": lambda x, y, z, c: torch.addcmul(x, y, z, value=c[0]),
    "addcdiv": lambda x, y, z, c: torch.addcdiv(x, y, z, value=c[0]),
    "sqrt": lambda x, y, z, c: torch.sqrt(x),
    "reciprocal": lambda x, y, z, c: torch.reciprocal(x),
    "abs": lambda x, y, z, c: torch.abs(x),
    "neg": lambda x, y, z, c: torch.neg(x),
    "sign": lambda x, y, z, c: torch.sign(x),
    "clone": lambda x, y, z, c: x.clone(),
    "clamp_min": lambda x, y, z, c: torch.clamp_min(x, c[0]),
    "clamp_max": lambda x, y, z, c: torch.clamp_max(x, c[0]),
    "maximum": lambda x, y, z, c: torch.maximum(x, y),
    "zero": lambda x, y, z, c: torch.zeros_like(x),
    "copy": lambda x, y, z, c: y.clone(),
}
ARGS = {  # the operands each operation takes in a program: slots ("s", i) and scalars ("c", i)
    "add": [("s", 1), ("c", 0)], "mul": [("s", 1)], "div": [("s", 1)], "lerp": [("s", 1), ("s", 2)],
    "lerp_low": [("s", 1), ("c", 0)], "lerp_high": [("s", 1), ("c", 1)], "addcmul": [("s", 1), ("s", 2), ("c", 0)],
    "addcdiv": [("s", 1), ("s", 2), ("c", 0)], "clamp_min": [("c", 0)], "clamp_max": [("c", 0)],
    "maximum": [("s", 1)], "copy": [("s", 1)],
}
SCALARS = [0.3, 0.7]


def assert_same_values(ours, theirs):
    """Equal to the dtype's rounding (torch's kernels may contract a * b + c into one FMA where the loop
    rounds twice; the operands here are O(1)); NaN, inf and zeros where torch gives them."""
    eps = torch.finfo(ours.dtype).eps
    torch.testing.assert_close(ours, theirs, rtol=2 * eps, atol=eps, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(TORCH))
def test_each_operation_equals_torch_on_special_values(name, dtype):
    x, y, z = operands(dtype)
    program = ((f"{name}_", 0, ("s", 0), *ARGS.get(name, [])),)
    step = loops.loop_for(program, (0,), (dtype,) * 3, len(SCALARS))
    expected = TORCH[name](x, y, z, [torch.tensor(s, dtype=dtype).item() for s in SCALARS])
    ours = x.clone()
    step([[ours, y, z]], SCALARS)
    assert_same_values(ours, expected)
    _, y_before, z_before = operands(dtype)  # the slots the program only reads are not written
    torch.testing.assert_close(y, y_before, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z, z_before, rtol=0, atol=0, equal_nan=True)


def test_a_chain_keeps_the_order_of_operations_and_writes_only_the_mutated_slots():
    """m <- lerp(m, g, 0.1); v <- v * 0.999 + 0.001 * g * g (out of place, then copied); p <- p - m / (sqrt(v) + eps):
    Adam without bias correction, written with torch operations in the same order."""
    program = (
        ("lerp_low_", 2, ("s", 2), ("s", 1), ("c", 0)),
        ("mul", 4, ("s", 3), ("c", 1)),
        ("addcmul_", 4, ("s", 4), ("s", 1), ("s", 1), ("c", 2)),
        ("copy_", 3, ("s", 3), ("s", 4)),
        ("sqrt", 5, ("s", 3)),
        ("add_", 5, ("s", 5), ("c", 3), ("c", 4)),
        ("addcdiv_", 0, ("s", 0), ("s", 2), ("s", 5), ("c", 5)),
    )
    scalars = [0.1, 0.999, 0.001, 1e-8, 1.0, -0.01]
    g = torch.Generator().manual_seed(1)
    p, grad, m = (torch.randn(1000, generator=g) for _ in range(3))
    v = torch.rand(1000, generator=g)
    expected_m = m.lerp(grad, 0.1)
    expected_v = torch.addcmul(v * 0.999, grad, grad, value=0.001)
    expected_p = torch.addcdiv(p, expected_m, expected_v.sqrt() + 1e-8, value=-0.01)
    grad_before = grad.clone()
    loops.loop_for(program, (0, 2, 3), (torch.float32,) * 4, len(scalars))([[p, grad, m, v]], scalars)
    assert torch.equal(grad, grad_before)
    for ours, theirs in ((m, expected_m), (v, expected_v), (p, expected_p)):
        assert_same_values(ours, theirs)


def test_a_bucket_of_any_sizes_is_stepped_whole_by_any_number_of_threads():
    """Sizes from 0 to over the per-thread minimum share in one call, on 1, 2 and 3 threads: the same
    bits whatever the split, each tensor torch's result to rounding."""
    program = (("addcmul_", 0, ("s", 0), ("s", 1), ("s", 1), ("c", 0)),)
    step = loops.loop_for(program, (0,), (torch.float64,) * 2, 1)
    g = torch.Generator().manual_seed(2)
    sizes = [0, 1, 7, 4095, 4097, 20_011, 3]
    original = [[torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)] for n in sizes]
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            bucket = [[t.clone() for t in ts] for ts in original]
            step(bucket, [-0.5])
            results.append([p for p, _ in bucket])
    finally:
        torch.set_num_threads(previous)
    for ours in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ours, results[0]))
    for ours, (p, grad) in zip(results[0], original):
        assert_same_values(ours, torch.addcmul(p, grad, grad, value=-0.5))


def test_programs_it_cannot_express_go_to_inductor():
    """float16 slots, float64 slots beside float32 ones, and conversions between them are left to Inductor."""
    program = (("mul_", 0, ("s", 0), ("c", 0)),)
    assert loops.loop_for(program, (0,), (torch.float16, torch.float32), 1) is None
    assert loops.loop_for(program, (0,), (torch.float64, torch.float32), 1) is None
    conversion = (("to", 2, ("s", 1), ("k", torch.float32)), ("add_", 0, ("s", 0), ("s", 2), ("c", 0)))
    assert loops.loop_for(conversion, (0,), (torch.float64,) * 2, 1) is None
    assert loops.loop_for(conversion, (0,), (torch.float32,) * 2, 1) is not None  # to() its own dtype: nothing
    assert loops.loop_for(conversion, (0,), (torch.bfloat16,) * 2, 1) is not None  # bf16 -> float32: a read


@pytest.mark.parametrize("name", ["add", "mul", "div", "lerp", "addcmul", "addcdiv", "sqrt", "maximum", "copy"])
def test_bfloat16_slots_round_as_torch_does(name):
    """In-place operations on bfloat16 tensors: torch computes in float and rounds to bfloat16 once
    (to nearest even): the same bits here, NaN and inf included; and a float32 operand promotes."""
    x, y, z = (t.bfloat16() for t in operands(torch.float32))
    scalars = [torch.tensor(s, dtype=torch.bfloat16).item() for s in SCALARS]  # exact in both
    program = ((f"{name}_", 0, ("s", 0), *ARGS.get(name, [])),)
    step = loops.loop_for(program, (0,), (torch.bfloat16,) * 3, len(scalars))
    ours = x.clone()
    step([[ours, y, z]], scalars)
    # add: ATen's vectorized bf16 add is fmadd(y, alpha, x) in float, rounded once to bf16 (its scalar tail,
    # at the end of each thread's range, rounds the product to bf16 first); the exact x + alpha * y of these
    # bf16 numbers, rounded to float (= the FMA) and then to bf16, is that vector path's result
    in_place = {"add": lambda: (x.double() + y.double() * scalars[0]).float().bfloat16(),
                "addcmul": lambda: x.clone().addcmul_(y, z, value=scalars[0]),
                "addcdiv": lambda: x.clone().addcdiv_(y, z, value=scalars[0])}
    expected = in_place[name]() if name in in_place else TORCH[name](x, y, z, scalars)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


def test_a_bfloat16_chain_is_computed_in_float_and_rounded_where_stored():
    """m (bf16) <- lerp(m, g, 0.1); p (bf16) += -0.01 * m / sqrt(v): every intermediate in float (the new m
    too, before its store) and one rounding per store, as Inductor computes it; one bf16 unit at most
    from eager bf16 arithmetic, which rounds after every operation."""
    program = (
        ("lerp_low_", 2, ("s", 2), ("s", 1), ("c", 0)),
        ("to", 4, ("s", 2), ("k", torch.float32)),
        ("sqrt", 5, ("s", 3)),
        ("div", 6, ("s", 4), ("s", 5)),
        ("add_", 0, ("s", 0), ("s", 6), ("c", 1)),
    )
    g = torch.Generator().manual_seed(4)
    p, grad, m = (torch.randn(2000, generator=g).bfloat16() for _ in range(3))
    v = torch.rand(2000, generator=g).bfloat16() + 0.5
    m_float = m.float() + 0.1 * (grad.float() - m.float())  # lerp_low in float, not rounded
    step = (m_float / v.float().sqrt()).double()
    in_float = (p.double() + step * -0.01).float()  # add: one FMA in float
    eager_m, eager_p = m.lerp(grad, 0.1), p.clone().add_(m.lerp(grad, 0.1).float() / v.sqrt(), alpha=-0.01)
    loops.loop_for(program, (0, 2), (torch.bfloat16,) * 4, 2)([[p, grad, m, v]], [0.1, -0.01])
    assert torch.equal(m, m_float.bfloat16()) and torch.equal(p, in_float.bfloat16())
    for ours, eager in ((m, eager_m), (p, eager_p)):
        torch.testing.assert_close(ours.float(), eager.float(), rtol=2.0**-7, atol=2.0**-8)  # O(1) values


@pytest.mark.parametrize("compensation", [None, "kahan"])
@pytest.mark.parametrize("name", ["adamw", "lion", "adabelief"])
def test_bfloat16_parameters_step_on_the_loop_as_on_the_reference_backend(name, compensation, monkeypatch):
    """bf16 parameters with bf16 states (compensation=None: every slot bf16; Kahan: a float32 working
    copy beside bf16 gradients and states) run on the C++ loop, not Inductor, and agree with the
    reference backend's eager bf16 operations to a bf16 unit after 5 steps."""
    monkeypatch.setattr(compiled, "_compiled", lambda *a: pytest.fail("Inductor was asked to compile"))
    results = {}
    for backend in ("reference", "compiled"):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in (300, 7)]
        opt = op.create_optimizer(name, params, lr=0.01, backend=backend, compensation=compensation)
        for i in range(5):
            for j, p in enumerate(params):
                p.grad = torch.sin(p.detach().float() * (i + 1) + j).bfloat16()
            opt.step()
        results[backend] = [p.detach().float() + opt.state[p].get("compensation", torch.zeros(())).float()
                            for p in params]
    # Lion steps by lr * sign(c): where c is within a bf16 unit of 0 the backends may take opposite signs
    # (ATen's scalar tails round bf16 intermediates where its vector body and the loop do not)
    allowed = 0.01 if name == "lion" and compensation is None else 0.0
    for ours, reference in zip(results["compiled"], results["reference"]):
        differ = ~torch.isclose(ours, reference, rtol=2.0**-7, atol=2.0**-7)
        assert differ.float().mean() <= allowed, (int(differ.sum()), ours[differ], reference[differ])


def test_kahan_compensation_is_read_and_written_in_the_loop_as_precision_does():
    """kahan=True: p + compensation is what the update sees, and p / compensation are written as
    precision.write_back writes them (round to nearest, then the lost part rounded into the compensation)."""
    from optim_plugins.optimizers.precision import working_copy, write_back

    g = torch.Generator().manual_seed(5)
    p, grad = (torch.randn(3000, generator=g).bfloat16() for _ in range(2))
    compensation = (torch.randn(3000, generator=g) * 1e-3).bfloat16()
    expected_p, expected_c = p.clone(), compensation.clone()
    work = working_copy(expected_p, expected_c)
    work.add_(grad.float(), alpha=-1e-3)
    write_back(expected_p, work, "kahan", expected_c)
    program = (("add_", 0, ("s", 0), ("s", 1), ("c", 0)),)
    step = loops.loop_for(program, (0,), (torch.bfloat16,) * 2, 1, kahan=True)
    step([[p, grad, compensation]], [-1e-3])
    assert torch.equal(p, expected_p) and torch.equal(compensation, expected_c)


# ----------------------------------------------------------------------------- 8/4-bit states inside the loop


def _codec(bits, signed, block_size):
    """quantize.py's public coder and decoder of one format (tested against bitsandbytes and lpmm's maps)."""
    from optim_plugins.kernels import quantize

    if bits == 8:
        return (lambda x, codes, absmax: quantize.quantize_blockwise_(x, codes, absmax, signed, block_size),
                lambda codes, absmax, n: quantize.dequantize_blockwise(codes, absmax, signed, block_size),
                lambda n: torch.empty(n, dtype=torch.uint8))
    return (lambda x, codes, absmax: quantize.quantize_4bit_blockwise_(x, codes, absmax, signed, block_size),
            lambda codes, absmax, n: quantize.dequantize_4bit_blockwise(codes, absmax, (n,), signed, block_size),
            lambda n: torch.empty(quantize.num_bytes_4bit(n), dtype=torch.uint8))


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_coded_states_are_decoded_stepped_and_coded_in_the_loop_as_in_three_passes(bits, signed):
    """A state slot kept in 8/4 bits (loops.Coded): the loop's codes, absmax and parameter are, bit for bit,
    those of decoding with kernels/quantize.py, stepping the decoded value with the plain loop of the same
    program and coding the result with kernels/quantize.py. Sizes around a block and a share, blocks that
    hold NaN, inf and only zeros, on 1, 2 and 3 threads."""
    from optim_plugins.kernels import quantize

    block_size = 256 if bits == 8 else 128
    encode, decode, empty_codes = _codec(bits, signed, block_size)
    # m <- m * c0 + c1 * g (g >= 0 for an unsigned state); p <- p + c2 * m
    program = (("mul_", 2, ("s", 2), ("c", 0)), ("add_", 2, ("s", 2), ("s", 1), ("c", 1)),
               ("add_", 0, ("s", 0), ("s", 2), ("c", 2)))
    scalars = [0.9, 0.1, -0.01]
    form = loops.Coded(2, quantize.map_name(bits, signed), block_size, bits, positive_not_zero=bits == 8 and not signed)
    coded = loops.loop_for(program, (0, 2), (torch.float32,) * 3, 3, coded=[form])
    plain = loops.loop_for(program, (0, 2), (torch.float32,) * 3, 3)
    g = torch.Generator().manual_seed(bits + signed)
    sizes = [1, block_size - 1, block_size, block_size + 1, 4095, 4097, 20_011]
    bucket = []
    for n in sizes:
        p, grad, m = (torch.randn(n, generator=g) for _ in range(3))
        if not signed:
            grad, m = grad.abs(), m.abs()
        if n == 20_011:  # a block with a NaN, one with an inf, one of zeros (gradient and state)
            grad[5], grad[block_size + 3] = float("nan"), float("inf")
            grad[2 * block_size:3 * block_size] = 0.0
            m[2 * block_size:3 * block_size] = 0.0
        codes, absmax = empty_codes(n), torch.empty(quantize.num_blocks(n, block_size))
        encode(m, codes, absmax)
        bucket.append([p, grad, codes, absmax])
    expected = []
    for p, grad, codes, absmax in bucket:
        p, codes, absmax = p.clone(), codes.clone(), absmax.clone()
        m = decode(codes, absmax, p.numel())
        plain([[p, grad, m]], scalars)
        encode(m, codes, absmax)
        expected.append((p, codes, absmax))
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ours = [[t.clone() for t in ts] for ts in bucket]
            coded(ours, scalars)
            for (p, _, codes, absmax), (want_p, want_codes, want_absmax) in zip(ours, expected):
                assert torch.equal(codes, want_codes)
                torch.testing.assert_close(absmax, want_absmax, rtol=0, atol=0, equal_nan=True)
                torch.testing.assert_close(p, want_p, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(previous)
    assert any(torch.isnan(absmax).any() for _, _, absmax in expected)  # the NaN block was there


def test_coded_sums_are_those_of_the_step_before_coding():
    """step_sums with a coded slot: g^2, (new p - old p)^2, old p^2 and the state's new value before it is coded."""
    from optim_plugins.kernels import quantize

    encode, decode, empty_codes = _codec(8, True, 256)
    program = (("mul_", 2, ("s", 2), ("c", 0)), ("add_", 2, ("s", 2), ("s", 1), ("c", 1)),
               ("add_", 0, ("s", 0), ("s", 2), ("c", 2)))
    scalars = [0.9, 0.1, -0.01]
    step = loops.loop_for(program, (0, 2), (torch.float32,) * 3, 3, coded=[loops.Coded(2, "dynamic_signed", 256, 8)])
    g = torch.Generator().manual_seed(3)
    p, grad, m = (torch.randn(9000, generator=g) for _ in range(3))
    codes, absmax = empty_codes(9000), torch.empty(quantize.num_blocks(9000))
    encode(m, codes, absmax)
    old, decoded = p.double(), decode(codes, absmax, 9000).double()
    new_m = decoded * 0.9 + 0.1 * grad.double()
    rows = step.with_sums([[p, grad, codes, absmax]], scalars)
    want = [grad.double().square().sum(), (p.double() - old).square().sum(), old.square().sum(), new_m.sum()]
    torch.testing.assert_close(rows[0], torch.stack(want), rtol=1e-5, atol=1e-6)


def _stepped(name, options, fused, monkeypatch, steps=4, sizes=((300, 70), (5000,), (64,), (129, 33), (4096,)),
             dtype=torch.float32):
    """``steps`` compiled steps of ``name``; ``fused=False``: the coded states decoded before the loop and coded
    after it (the path every other backend takes), with the loop that codes inside it made unavailable."""
    from optim_plugins.optimizers.base import Optimizer

    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(Optimizer, "_coded_loop_step", lambda *args: False)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in sizes]
        optimizer = op.create_optimizer(name, params, lr=1e-2, backend="compiled", **options)
        for i in range(steps):
            for j, p in enumerate(params):
                p.grad = torch.sin(p.detach().float() * (i + 2) + j).to(dtype)
            optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name,options,dtype", [
    ("adamw8bit", {}, torch.float32), ("adam8bit", {"min_8bit_size": 0, "maximize": True}, torch.float32),
    ("lion8bit", {"weight_decay": 0.1}, torch.float32), ("adamw4bit", {"second_moment_scale": "block"}, torch.float32),
    ("adamw4bit", {}, torch.float32),
    # bf16 parameters: read as float beside the fp32 math of the coded states, with their Kahan compensation
    ("adamw8bit", {}, torch.bfloat16), ("lion8bit", {"compensation": None}, torch.bfloat16),
    ("adamw4bit", {"second_moment_scale": "block"}, torch.bfloat16), ("adamw4bit", {}, torch.bfloat16)])
def test_lowbit_optimizers_code_their_states_inside_the_loop_bit_for_bit(name, options, dtype, monkeypatch):
    """8-bit and 4-bit states on the compiled backend are decoded, stepped and coded by one loop
    call per bucket: parameters and every state tensor (a bf16 parameter's compensation too) equal the
    decode / step / code path bit for bit (tensors below min_8bit_size, with fp32 states, go to a loop of
    their own; the rank-1 4-bit second moment of a 2-D tensor is coded inside too, that of a 3-D one is
    decoded before the loop and coded after it)."""
    from optim_plugins.optimizers import codecs

    decoded = []
    for cls in (codecs.Blockwise8bit, codecs.Blockwise4bit, codecs.Rank1Linear4bit):
        monkeypatch.setattr(cls, "decode",
                            lambda self, *a, original=cls.decode: decoded.append(self) or original(self, *a))
    sizes = ((300, 70), (5000,), (64,), (129, 33), (4096,), (8, 16, 40))
    ours, fused = _stepped(name, options, True, monkeypatch, dtype=dtype, sizes=sizes)
    rank1 = name == "adamw4bit" and "second_moment_scale" not in options
    # no state was decoded outside the loop but the rank-1 second moment of the 3-D tensor, each step (those
    # of the 2-D tensors are coded in the loop, their maxima found in its first pass)
    assert all(isinstance(codec, codecs.Rank1Linear4bit) and len(codec.shape) == 3 for codec in decoded)
    assert len(decoded) == (4 if rank1 else 0)
    theirs, reference = _stepped(name, options, False, monkeypatch, dtype=dtype, sizes=sizes)
    assert decoded
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for p, q in zip(ours, theirs):
        mine, other = fused.state[p], reference.state[q]
        assert mine.keys() == other.keys() and ("compensation" in mine) == (dtype == torch.bfloat16
                                                                            and "compensation" not in options)
        for key in mine:
            assert torch.equal(mine[key], other[key]), key


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_telemetry_on_coded_buckets_is_summed_in_the_loop_without_changing_the_step(name, monkeypatch):
    """op.telemetry on adamw8bit and adamw4bit (compiled; 4-bit: rank-1 second moments of the 2-D tensors):
    the recording step gives the bits of an unrecorded one, and no parameter copy is taken (coded and
    fp32-state buckets are both summed inside their loops)."""
    plain, _ = _stepped(name, {}, True, monkeypatch, steps=1)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((300, 70), (5000,), (64,), (129, 33), (4096,))]
    optimizer = op.create_optimizer(name, params, lr=1e-2, backend="compiled")
    recorder = op.telemetry(optimizer, by="param")
    for j, p in enumerate(params):
        p.grad = torch.sin(p.detach() * 2 + j)
    old = [p.detach().double().clone() for p in params]
    optimizer.step()
    assert recorder._copies == {}
    assert all(torch.equal(a, b) for a, b in zip(params, plain))
    units = recorder.history[-1]["units"]
    for i, p in enumerate(params):
        assert units[f"param{i}"]["update_norm"] == pytest.approx(float((p.detach().double() - old[i]).norm()), rel=1e-4)
    recorder.remove()


@pytest.mark.parametrize("with_sums", [False, True])
def test_rank1_states_are_stepped_in_the_loop_as_in_three_passes(with_sums):
    """A rank-1 4-bit state (loops.Coded rank1: the second moment of adamw4bit, scaled by the minimum of its
    row's and its column's maximum): the loop's codes, maxima and parameter are, bit for bit, those of
    decoding with kernels/quantize.py, stepping with the plain loop and coding the result with
    kernels/quantize.py (whose maxima need every new value first: the loop's first pass). Beside a
    block-wise 4-bit state; shapes of one row, one column, rows that straddle the threads' shares, a row
    with a NaN, one with an inf, one of zeros; 1, 2 and 3 threads; with and without the telemetry sums."""
    from optim_plugins.kernels import quantize

    # m <- m * c0 + c1 * g; v <- v * c2 + c3 * g * g; p <- p + c4 * m / (sqrt(v) + c5)
    program = (("mul_", 2, ("s", 2), ("c", 0)), ("add_", 2, ("s", 2), ("s", 1), ("c", 1)),
               ("mul_", 3, ("s", 3), ("c", 2)), ("addcmul_", 3, ("s", 3), ("s", 1), ("s", 1), ("c", 3)),
               ("sqrt", 4, ("s", 3)), ("add", 5, ("s", 4), ("c", 5), ("c", 6)),
               ("addcdiv_", 0, ("s", 0), ("s", 2), ("s", 5), ("c", 4)))
    scalars = [0.9, 0.1, 0.99, 0.01, -0.01, 1e-8, 1.0]
    forms = [loops.Coded(2, quantize.map_name(4, True), 128, 4), loops.Coded(3, "linear4", 0, 4, rank1=True)]
    coded = loops.loop_for(program, (0, 2, 3), (torch.float32,) * 4, 7, coded=forms)
    plain = loops.loop_for(program, (0, 2, 3), (torch.float32,) * 4, 7)
    assert coded is not None and plain is not None
    g = torch.Generator().manual_seed(11)
    shapes = [(1, 1), (1, 300), (300, 1), (37, 129), (64, 128), (257, 63), (45, 1000)]
    bucket = []
    for shape in shapes:
        n = shape[0] * shape[1]
        p, grad, m = (torch.randn(shape, generator=g) for _ in range(3))
        v = torch.rand(shape, generator=g) * torch.rand(shape[1], generator=g)  # columns of other sizes
        if shape == (45, 1000):
            grad[3, 7], grad[10, 999], grad[20] = float("nan"), float("inf"), 0.0
            v[20] = 0.0
        m_codes, m_absmax = torch.empty(quantize.num_bytes_4bit(n), dtype=torch.uint8), torch.empty(
            quantize.num_blocks(n, 128))
        quantize.quantize_4bit_blockwise_(m, m_codes, m_absmax, True, 128)
        v_codes, maxima = torch.empty(quantize.num_bytes_4bit(n), dtype=torch.uint8), torch.empty(sum(shape))
        quantize.quantize_4bit_rank1_(v, v_codes, maxima)
        bucket.append([p, grad, m_codes, v_codes, m_absmax, maxima])
    expected, sums = [], []
    for p, grad, m_codes, v_codes, m_absmax, maxima in bucket:
        p, m_codes, v_codes, m_absmax, maxima = (t.clone() for t in (p, m_codes, v_codes, m_absmax, maxima))
        m = quantize.dequantize_4bit_blockwise(m_codes, m_absmax, p.shape, True, 128).view(p.shape)
        v = quantize.dequantize_4bit_rank1(v_codes, maxima, p.shape)
        old = p.double()
        plain([[p, grad, m, v]], scalars)
        sums.append([grad.double().square().sum(), (p.double() - old).square().sum(), old.square().sum(),
                     m.double().sum(), v.double().sum()])
        quantize.quantize_4bit_blockwise_(m, m_codes, m_absmax, True, 128)
        quantize.quantize_4bit_rank1_(v, v_codes, maxima)
        expected.append((p, m_codes, v_codes, m_absmax, maxima))
    assert any(torch.isnan(e[4]).any() for e in expected)  # the NaN's row and column
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ours = [[t.clone() for t in ts] for ts in bucket]
            rows = coded.with_sums(ours, scalars) if with_sums else coded(ours, scalars)
            for (p, _, *states), (want_p, *want_states) in zip(ours, expected):
                torch.testing.assert_close(p, want_p, rtol=0, atol=0, equal_nan=True)
                for state, want in zip(states, want_states):
                    torch.testing.assert_close(state, want, rtol=0, atol=0, equal_nan=True)
            if with_sums:
                finite = [k for k, s in enumerate(sums) if all(map(torch.isfinite, s))]
                torch.testing.assert_close(rows[finite], torch.tensor([sums[k] for k in finite], dtype=torch.float64),
                                           rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(previous)


def test_rank1_states_need_a_2d_parameter_and_its_maxima():
    """A rank-1 slot's maxima must be rows + cols floats of a 2-D parameter: a clear error, nothing written."""
    from optim_plugins.kernels import quantize

    program = (("mul_", 2, ("s", 2), ("c", 0)), ("addcmul_", 2, ("s", 2), ("s", 1), ("s", 1), ("c", 1)),
               ("add_", 0, ("s", 0), ("s", 2), ("c", 2)))
    step = loops.loop_for(program, (0, 2), (torch.float32,) * 3, 3, coded=[loops.Coded(2, "linear4", 0, 4, rank1=True)])
    p, grad = torch.randn(6, 10), torch.randn(6, 10)
    codes, maxima = torch.zeros(30, dtype=torch.uint8), torch.ones(15)
    before = [t.clone() for t in (p, codes, maxima)]
    with pytest.raises(ValueError, match=r"shape \(6, 10\) and maxima of \[15\]"):
        step([[p, grad, codes, maxima]], [0.9, 0.1, -0.01])
    with pytest.raises(ValueError, match=r"shape \(60,\)"):
        step([[p.view(-1), grad.view(-1), codes, torch.ones(16)]], [0.9, 0.1, -0.01])
    assert all(torch.equal(a, b) for a, b in zip(before, (p, codes, maxima)))
    assert quantize.num_bytes_4bit(60) == 30
