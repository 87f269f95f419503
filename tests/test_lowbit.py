"""The low-bit family: the block-wise 8-bit quantiser and state codec, adam8bit / adamw8bit /
lion8bit against bitsandbytes' 8-bit optimizers on CPU, the 4-bit quantiser and adam4bit /
adamw4bit against the paper's quantiser written out (optim_db_lowbit) and torchao's AdamW4bit,
and Muon against its reference."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optim_plugins as op
import optim_db  # noqa: F401  (imported first: it collects optim_db_lowbit's entries)
from optim_db_lowbit import LINEAR_MAP, FourBitReference, block_quantized, de_map, rank1_quantized
from optim_plugins.kernels import quantize as Q
from optim_plugins.kernels.quantize import BLOCK_SIZE, dequantize_blockwise, dynamic_map, quantize_blockwise
from optim_plugins.optimizers.lowbit import Adam8bit, AdamW4bit, Lion8bit
from optim_plugins.optimizers.muon import Muon, muon_param_groups, newton_schulz

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

BNB = {"adam8bit": bnb.optim.Adam8bit, "adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit}


def heavy_tailed(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Values like optimizer states: many tiny, a few large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    return x if signed else x.abs()


# ----------------------------------------------------------------------------- the quantiser


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(signed):
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, F.create_dynamic_map(signed=signed))
    assert ours.min() >= -1.0 and ours.max() == 1.0 and (ours == 0).sum() == 1 and (ours.diff() > 0).all()


def test_block_size_is_bitsandbytes_cpu_block_size():
    """bitsandbytes 0.50 quantises 8-bit optimizer states in blocks of 256 on CPU."""
    p = torch.nn.Parameter(torch.randn(BLOCK_SIZE * 20 + 5))
    opt = bnb.optim.Adam8bit([p], min_8bit_size=1)
    p.grad = torch.randn_like(p)
    opt.step()
    assert BLOCK_SIZE == 256 and opt.state[p]["absmax1"].shape == (21,)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_round_to_nearest_like_bitsandbytes_exact_path(signed):
    """Codes equal bitsandbytes' argmin (nearest-code) quantiser (except that an unsigned
    positive value never rounds to 0); dequantisation equals bitsandbytes' own; round-trip
    error is never above that of bitsandbytes' fast CPU quantiser (which is not always
    nearest: it floors small magnitudes, so about 11% of these values get a farther code)."""
    x = heavy_tailed(BLOCK_SIZE * 40 + 17, signed)  # a short last block too
    code = F.create_dynamic_map(signed=signed)
    codes, absmax = quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (41,)
    exact_codes, exact_absmax = torch.ops.bitsandbytes.quantize_blockwise(x.double(), code, BLOCK_SIZE)
    if not signed:
        assert ((exact_codes == 0) & (x > 0)).any()  # the case the floor is for occurs here
        exact_codes = torch.maximum(exact_codes, (x > 0).to(torch.uint8))
    assert torch.equal(codes, exact_codes) and torch.equal(absmax, exact_absmax)

    ours = dequantize_blockwise(codes, absmax, signed)
    state = F.QuantState(absmax=absmax, code=code, blocksize=BLOCK_SIZE, dtype=torch.float32)
    assert torch.equal(ours, F.dequantize_blockwise(codes, state))

    fast_codes, fast_state = F.quantize_blockwise(x, code=code, blocksize=BLOCK_SIZE)
    fast_error = (F.dequantize_blockwise(fast_codes, fast_state) - x).abs()
    error = (ours - x).abs()
    assert (error <= fast_error + 4e-7 * absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()]).all()
    assert error.mean() <= fast_error.mean()
    assert (error <= absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()] * 0.05).all()  # within the map's coarsest gap


def test_quantize_zero_and_nonfinite_blocks():
    x = torch.zeros(300)
    codes, absmax = quantize_blockwise(x)
    assert torch.equal(dequantize_blockwise(codes, absmax, True), x)
    x[3] = float("nan")
    codes, absmax = quantize_blockwise(x)
    back = dequantize_blockwise(codes, absmax, True)
    assert torch.isnan(back[:256]).all() and torch.equal(back[256:], x[256:])  # NaN stays in its block


# ----------------------------------------------------------------------------- the state codec


def big_params(seed=0, shapes=((96, 64), (4095,), (64,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def quadratic(params):
    return sum(((p - 0.5 * (i + 1)) ** 2 * (1 + torch.arange(p.numel()).view(p.shape) % 7)).sum()
               for i, p in enumerate(params))


def run(opt, params, steps, objective=quadratic):
    for _ in range(steps):
        opt.zero_grad()
        objective(params).backward()
        opt.step()


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k != "step")


@pytest.mark.parametrize("name,limit", [("adam8bit", 2.1), ("adamw8bit", 2.1), ("lion8bit", 1.1)])
def test_state_bytes_per_parameter(name, limit, record_property):
    model = torch.nn.Linear(1024, 1024, bias=False)
    opt = op.create_optimizer(name, model.parameters())
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    per_param = state_bytes(opt) / model.weight.numel()
    record_property("state_bytes_per_param", per_param)
    print(f"{name}: {per_param:.4f} state bytes per parameter")
    assert per_param <= limit
    assert {k: v.dtype for k, v in opt.state[model.weight].items() if k.startswith("exp_avg") and "absmax" not in k} \
        == dict.fromkeys(opt.quantized_states, torch.uint8)


def test_min_8bit_size_keeps_small_tensors_fp32():
    small, large = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = Adam8bit([small, large], lr=1e-3)
    run(opt, [small, large], 1, lambda ps: sum((p**2).sum() for p in ps))
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    assert opt.state[large]["exp_avg"].dtype == torch.uint8 and opt.state[large]["exp_avg_absmax"].shape == (16,)
    assert opt.state[large]["exp_avg_sq"].dtype == torch.uint8 and opt.state[large]["exp_avg_sq_absmax"].shape == (16,)


@pytest.mark.parametrize("name", ["adam8bit", "lion8bit"])
def test_state_dict_saves_and_reloads_8bit_tensors_exactly(name):
    params = big_params()
    opt = op.create_optimizer(name, params, lr=1e-2)
    run(opt, params, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][0]["exp_avg"].dtype == torch.uint8
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = op.create_optimizer(name, twin_params, lr=1e-2)
    twin.load_state_dict(saved)
    for i, p in enumerate(twin_params):
        for key, value in saved["state"][i].items():
            assert twin.state[p][key].dtype == value.dtype and torch.equal(twin.state[p][key], value)
    run(opt, params, 5)
    run(twin, twin_params, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))

    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        twin.load_state_dict(bad)
    del bad["state"][0]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        twin.load_state_dict(bad)


def test_bf16_parameters_with_8bit_states():
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in big_params()]
    opt = op.create_optimizer("adamw8bit", params, lr=1e-2)
    start = quadratic(params).item()
    run(opt, params, 20)
    assert all(p.dtype == torch.bfloat16 for p in params) and quadratic(params).item() < 0.9 * start
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["compensation"].dtype == torch.bfloat16
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32  # small tensor: fp32 state math


# ----------------------------------------------------------------------------- against bitsandbytes

# Trajectory tolerance: relative L2 difference ||ours - bnb|| / ||bnb|| of the 8-bit tensor after
# 100 steps on a convex quadratic: <= 1e-2 (measured 3.5e-3 adam8bit, 4.1e-3 adamw8bit, 1.2e-3
# lion8bit), and at most 0.2x the distance of bitsandbytes' 8-bit trajectory to the fp32 one
# (measured 0.10-0.12): the two 8-bit optimizers differ by much less than 8 bits cost.
TRAJECTORY_STEPS = 100
TRAJECTORY_RTOL = 1e-2
FP32 = {"adam8bit": "adam", "adamw8bit": "adamw", "lion8bit": "lion"}
TRAJECTORY_OPTIONS = {"adam8bit": dict(lr=1e-2), "adamw8bit": dict(lr=1e-2, weight_decay=0.1),
                      "lion8bit": dict(lr=1e-3, weight_decay=0.1)}


@pytest.mark.parametrize("name", sorted(BNB))
def test_trajectory_close_to_bitsandbytes(name):
    ours, theirs, full = big_params(), big_params(), big_params()
    options = TRAJECTORY_OPTIONS[name]
    run(op.create_optimizer(name, ours, **options), ours, TRAJECTORY_STEPS)
    run(BNB[name](theirs, **options), theirs, TRAJECTORY_STEPS)
    run(op.create_optimizer(FP32[name], full, **options), full, TRAJECTORY_STEPS)
    error = ((ours[0] - theirs[0]).norm() / theirs[0].norm()).item()
    cost_of_8_bits = ((full[0] - theirs[0]).norm() / theirs[0].norm()).item()
    print(f"{name}: relative L2 difference to bitsandbytes {error:.2e} (bitsandbytes to fp32: {cost_of_8_bits:.2e})")
    assert error <= TRAJECTORY_RTOL and error <= 0.2 * cost_of_8_bits
    for a, b in zip(ours[1:], theirs[1:]):  # tensors below min_8bit_size: fp32 states on both sides
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


DIGITS_OPTIONS = {"adamw8bit": dict(lr=1e-3), "adam8bit": dict(lr=1e-3), "lion8bit": dict(lr=1e-3, weight_decay=0.1)}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train_digits(make, digits, epochs=8):
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 10))  # 8192 and 16384 weights: 8-bit states
    opt = make(list(model.parameters()))
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), 128):
            batch = order[start:start + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    assert opt.state[model[0].weight]["exp_avg" if not isinstance(opt, bnb.optim.optimizer.Optimizer8bit) else "state1"].dtype == torch.uint8
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_final_loss_on_digits_within_1_percent_of_bitsandbytes(name, digits):
    options = DIGITS_OPTIONS[name]
    ours = train_digits(lambda ps: op.create_optimizer(name, ps, **options), digits)
    theirs = train_digits(lambda ps: BNB[name](ps, **options), digits)
    print(f"{name}: final digits loss {ours:.4f}, bitsandbytes {theirs:.4f} ({abs(ours - theirs) / theirs:.2%})")
    assert ours < 0.5 and abs(ours - theirs) <= 0.01 * theirs


# ----------------------------------------------------------------------------- fast exact code search

SPECIAL = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                        1e-45, -1e-45, 1e-38, -3e38, 3e38])


@pytest.mark.parametrize("kind", ["dynamic_signed", "dynamic_unsigned", "dynamic4_signed", "linear4"])
def test_code_index_is_bucketize_bitwise(kind):
    """The table lookup on the fp32 bit pattern gives torch.bucketize's index for every value tried:
    each midpoint, its float neighbours, the codes, special values and a million heavy-tailed ones."""
    code = {"dynamic_signed": dynamic_map(True), "dynamic_unsigned": dynamic_map(False),
            "dynamic4_signed": de_map(), "linear4": LINEAR_MAP}[kind]
    midpoints = (code[1:] + code[:-1]) / 2
    up, down = torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))
    x = torch.cat([SPECIAL, midpoints, up, down, code, heavy_tailed(1_000_000, True, seed=3), torch.rand(10_000) * 2 - 1])
    assert torch.equal(Q._code_index(x, kind).long(), torch.bucketize(x, midpoints))


@pytest.mark.parametrize("kind", ["dynamic_signed", "dynamic_unsigned", "dynamic4_signed", "linear4"])
def test_nearest_code_table_is_bucketize_on_every_bucket(kind):
    """The C++ codec's search (one table read per value: a base and the midpoint's order key per upper 16
    bits), written out in torch: torch.bucketize's index for both ends of every one of the 65536 bf16-wide
    buckets, each midpoint's key and its neighbours in every bucket (so every step of the function), the
    special values and a million heavy-tailed ones."""
    code = {"dynamic_signed": dynamic_map(True), "dynamic_unsigned": dynamic_map(False),
            "dynamic4_signed": de_map(), "linear4": LINEAR_MAP}[kind]
    midpoints = (code[1:] + code[:-1]) / 2
    table = Q.nearest_code_table(kind)
    high = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    key = (table >> 8) & 0xFFFF
    keys = torch.stack([torch.zeros_like(key), torch.full_like(key, 0xFFFF), key, (key - 1).clamp(0, 0xFFFF),
                        (key + 1).clamp(0, 0xFFFF)])
    low = torch.where(high < 0, 0xFFFF - keys, keys)  # a key back to a float's lower 16 bits
    x = torch.cat([((high << 16) | low).view(torch.float32).reshape(-1), SPECIAL, midpoints,
                   heavy_tailed(1_000_000, True, seed=4)])
    x = x[~(x.isnan() & (x.view(torch.int32) >> 16 == -128))]  # negative signalling NaNs, as in _code_index
    bits = x.view(torch.int32)
    entry = table[((bits >> 16) + 2**15).long()]
    ours = (entry & 0xFF) + (((bits & 0xFFFF) ^ ((bits >> 31) & 0xFFFF)) > ((entry >> 8) & 0xFFFF)).int()
    assert torch.equal(ours.long(), torch.bucketize(x, midpoints))


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codes_are_unchanged_by_the_fast_search(signed):
    """quantize_blockwise_ stores the codes of the former bucketize formula, written out here."""
    x = torch.cat([heavy_tailed(BLOCK_SIZE * 300 + 7, signed, seed=5), SPECIAL.abs() if not signed else SPECIAL])
    codes, absmax = quantize_blockwise(x, signed)
    code = dynamic_map(signed)
    flat = torch.nn.functional.pad(x, (0, (-x.numel()) % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    expected_absmax = flat.abs().amax(1)
    scaled = flat / expected_absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    index = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).clamp(max=255)
    if not signed:
        index = torch.maximum(index, (scaled > 0).long())
    assert torch.equal(codes, index.view(-1)[: x.numel()].to(torch.uint8))
    assert torch.equal(absmax, expected_absmax) or torch.equal(absmax.isnan(), expected_absmax.isnan())


# ----------------------------------------------------------------------------- 4-bit


def test_4bit_maps_are_the_papers():
    assert torch.equal(Q.dynamic_map(True, max_exponent_bits=3, total_bits=4), de_map())
    assert de_map().tolist()[:3] == pytest.approx([-0.8875, -0.6625, -0.4375]) and de_map()[7] == 0  # signed DE, with 0
    assert torch.equal(Q.linear_map(), LINEAR_MAP) and LINEAR_MAP.min() == 1 / 16  # linear, zero excluded


@pytest.mark.parametrize("signed", [True, False])
def test_4bit_blockwise_is_the_papers_quantiser(signed):
    x = heavy_tailed(128 * 30 + 5, signed, seed=1).view(-1)  # a short last block too
    packed = torch.empty(Q.num_bytes_4bit(x.numel()), dtype=torch.uint8)
    absmax = torch.empty(Q.num_blocks(x.numel(), 128))
    Q.quantize_4bit_blockwise_(x, packed, absmax, signed)
    assert packed.numel() == (x.numel() + 1) // 2  # two codes per byte
    back = Q.dequantize_4bit_blockwise(packed, absmax, x.shape, signed)
    assert torch.equal(back, block_quantized(x, de_map() if signed else LINEAR_MAP))


@pytest.mark.parametrize("shape", [(48, 80), (6, 10, 12)])
def test_4bit_rank1_is_the_papers_quantiser(shape):
    v = heavy_tailed(torch.Size(shape).numel(), signed=False, seed=2).view(shape)
    v[0] = 0.0  # an all-zero row: scale 0, value 0
    packed = torch.empty(Q.num_bytes_4bit(v.numel()), dtype=torch.uint8)
    maxima = torch.empty(sum(shape))
    Q.quantize_4bit_rank1_(v, packed, maxima)
    expected = rank1_quantized(v, LINEAR_MAP)
    torch.testing.assert_close(Q.dequantize_4bit_rank1(packed, maxima, v.shape), expected, rtol=1e-6, atol=0)
    assert (expected[0] == 0).all() and maxima[0] == 0


def test_4bit_packing_is_torchaos():
    """Same bytes as torchao's 4-bit optimizer state for the same block scaling (high nibble first)."""
    torchao = pytest.importorskip("torchao.optim.quant_utils", reason="torchao (a test dependency) is not installed")
    x = heavy_tailed(128 * 64, signed=True, seed=4)
    scaled, scale = torchao.scale_tensor(x, 128)
    theirs = torchao.quantize_4bit_with_qmap(scaled, torch.tensor(torchao.create_dynamic_map(True, 3, 4)))
    packed = torch.empty(x.numel() // 2, dtype=torch.uint8)
    absmax = torch.empty(64)
    Q.quantize_4bit_blockwise_(x, packed, absmax, True)
    assert torch.equal(absmax, scale) and torch.equal(packed, (theirs[::2] << 4) | theirs[1::2])


def test_adamw4bit_state_bytes_per_parameter():
    """1024 x 1024 weight: 0.5 B (codes) + 4/128 B (absmax) first moment, 0.5 B + 4 x 2048 / 1024^2 B
    (row and column maxima) second moment: 1.0390625 bytes per parameter, against 8 for fp32 AdamW."""
    model = torch.nn.Linear(1024, 1024, bias=False)
    opt = op.create_optimizer("adamw4bit", model.parameters())
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    per_param = state_bytes(opt) / model.weight.numel()
    print(f"adamw4bit: {per_param:.4f} state bytes per parameter")
    assert per_param == 0.5 + 4 / 128 + 0.5 + 4 * 2048 / 1024**2
    state = opt.state[model.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg"].shape == (1024 * 1024 // 2,) and state["exp_avg_sq_rank1"].shape == (2048,)


def test_min_4bit_size_keeps_small_tensors_fp32():
    small, large = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = AdamW4bit([small, large], lr=1e-3)
    run(opt, [small, large], 1, lambda ps: sum((p**2).sum() for p in ps))
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[large]["exp_avg"].shape == (2048,) and opt.state[large]["exp_avg_sq_absmax"].shape == (32,)


def test_adamw4bit_trajectory_matches_the_paper_reference_on_large_tensors():
    ours, theirs = big_params(), big_params()
    run(op.create_optimizer("adamw4bit", ours, lr=1e-2, weight_decay=0.1), ours, 10)
    run(FourBitReference(theirs, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), theirs, 10)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adamw4bit_block_scale_tracks_torchao(monkeypatch):
    """second_moment_scale="block" is torchao's AdamW4bit format: same trajectory within quantisation noise.
    torchao's step is run eagerly (its torch.compile would take minutes on this CPU)."""
    torchao_optim = pytest.importorskip("torchao.optim", reason="torchao (a test dependency) is not installed")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    shapes = ((96, 64), (64,))
    ours, theirs, full = big_params(shapes=shapes), big_params(shapes=shapes), big_params(shapes=shapes)
    options = dict(lr=1e-2, weight_decay=0.1)
    run(op.create_optimizer("adamw4bit", ours, second_moment_scale="block", **options), ours, 20)
    reference = torchao_optim.AdamW4bit(theirs, **options)
    run(reference, theirs, 20)
    assert type(reference.state[theirs[0]]["exp_avg_sq"]).__name__ == "OptimState4bit"
    run(op.create_optimizer("adamw", full, **options), full, 20)
    error = ((ours[0] - theirs[0]).norm() / theirs[0].norm()).item()
    cost_of_4_bits = ((full[0] - theirs[0]).norm() / theirs[0].norm()).item()
    print(f"adamw4bit (block): relative L2 difference to torchao {error:.2e} (torchao to fp32: {cost_of_4_bits:.2e})")
    assert error <= 1e-3 and error <= 0.1 * cost_of_4_bits
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)  # below 4096 elements: fp32 on both sides


def test_bf16_parameters_with_4bit_states():
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in big_params()]
    opt = op.create_optimizer("adamw4bit", params, lr=1e-2)
    start = quadratic(params).item()
    run(opt, params, 20)
    assert all(p.dtype == torch.bfloat16 for p in params) and quadratic(params).item() < 0.9 * start
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["compensation"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- Muon


def keller_newton_schulz(g, steps=5, eps=1e-7):
    """Newton-Schulz as Keller Jordan's muon.py writes it (separate products, X / (|X| + eps))."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.mT
    x = x / (x.norm() + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.mT if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 48)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g).float()
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.5 and singular.max() < 1.25  # ~U V^T: S' in about [0.5, 1.5] (reference's remark)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cosine > 0.97
    torch.testing.assert_close(o, keller_newton_schulz(g).float(), rtol=0.05, atol=0.03)  # bf16 rounding


def muon_equations(W, grads, lr, mu, wd, nesterov, scale):
    """The public reference's update written plainly, in fp32 matrices except NS (bf16 as the reference)."""
    B = torch.zeros_like(W)
    for g in grads:
        B = mu * B + (1 - mu) * g
        U = (1 - mu) * g + mu * B if nesterov else B
        O = keller_newton_schulz(U.reshape(W.shape[0], -1)).float().reshape(W.shape)
        W = W * (1 - lr * wd) - lr * scale * O
    return W


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_muon_matches_torch_and_the_equations(shape, nesterov, adjust_lr_fn):
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(10)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt, ref = Muon([ours], **options), torch.optim.Muon([theirs], **options)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, theirs)
    rows, cols = shape
    scale = max(1, rows / cols) ** 0.5 if adjust_lr_fn == "original" else 0.2 * max(rows, cols) ** 0.5
    expected = muon_equations(start, grads, 0.02, 0.95, 0.1, nesterov, scale)
    torch.testing.assert_close(ours.detach(), expected, rtol=0, atol=0.02 * 0.02 * scale * 10)  # bf16 NS, 10 steps


def test_muon_match_rms_adamw_gives_adamw_like_update_rms():
    p = torch.nn.Parameter(torch.zeros(256, 128))
    opt = Muon([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn(256, 128)
    opt.step()
    assert 0.15 < p.detach().pow(2).mean().sqrt().item() < 0.25  # AdamW's typical update RMS 0.2-ish


def test_muon_routes_tensors_by_module():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.Conv1d(16, 16, 3), torch.nn.Linear(16, 4))
    groups = muon_param_groups(model, lr=1e-3, adamw_lr=3e-4)
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert muon == {id(model[1].weight), id(model[3].weight)}  # hidden Linear and conv filters
    assert all(g["lr"] == (1e-3 if g["use_muon"] else 3e-4) for g in groups)
    opt = Muon.from_model(model)
    x = torch.randint(0, 10, (2, 5))
    h = model[2](model[1](model[0](x)))
    loss = model[4](model[3](h.transpose(1, 2)).mean(-1)).sum()
    loss.backward()
    opt.step()
    assert set(opt.state[model[3].weight]) == {"step", "momentum_buffer"}
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model[4].weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_muon_use_muon_flag_overrides_shape():
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [w], "use_muon": False}, {"params": [b]}])
    (w.sum() + b.sum()).backward()
    opt.step()
    assert "exp_avg" in opt.state[w] and "exp_avg" in opt.state[b]
    bad = Muon([{"params": [b], "use_muon": True}])
    with pytest.raises(ValueError, match="matrix"):
        bad.step()


@pytest.mark.parametrize("name", ["adamw8bit", "adam4bit"])
@pytest.mark.parametrize("backend", ["foreach", "compiled"])
def test_coded_buckets_step_a_few_tensors_at_a_time_without_changing_a_bit(name, backend, monkeypatch):
    """A bucket's coded states are decoded DECODED_CHUNK elements at a time (bounded temporaries):
    the same numbers as decoding the whole bucket at once."""
    from optim_plugins.optimizers import base

    def run():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5000, 300, 7000, 4096, 12000)]
        optimizer = op.create_optimizer(name, params, lr=1e-2, backend=backend, min_8bit_size=1) \
            if "8bit" in name else op.create_optimizer(name, params, lr=1e-2, backend=backend, min_4bit_size=1)
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 2))
            optimizer.step()
        return params, optimizer

    whole, whole_opt = run()
    monkeypatch.setattr(base, "DECODED_CHUNK", 6000)  # five tensors -> four chunks
    assert base._chunks([5000, 300, 7000, 4096, 12000], 6000) == [[0, 1], [2], [3], [4]]
    chunked, chunked_opt = run()
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(whole_opt.state[a].values(), chunked_opt.state[b].values()))
