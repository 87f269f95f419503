"""Behaviour of the factored (adafactor, came, maxfactor) and trust-ratio (lamb, lars)
optimizers beyond the generic suite, and ``optim_plugins.memory.state_bytes``."""
from __future__ import annotations

import pytest
import torch

import optim_plugins as op
from optim_plugins.memory import state_bytes, state_bytes_per_param


def _params(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _step(opt, params, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        sum(((p.float() - 0.3) ** 2).sum() + torch.sin(3 * p.float()).sum() for p in params).backward()
        opt.step()


# ----------------------------------------------------------------------------- state bytes


def test_state_bytes_of_adamw_is_8_bytes_per_param_plus_step_scalars():
    params = _params((64, 32), (32,))
    opt = op.create_optimizer("adamw", params, lr=1e-3)
    assert state_bytes(opt) == 0
    _step(opt, params)
    n = 64 * 32 + 32
    assert state_bytes(opt) == 8 * n + 4 * 2  # exp_avg + exp_avg_sq in fp32, one 0-d fp32 step each
    assert state_bytes_per_param(opt) == [8 * 64 * 32 + 4, 8 * 32 + 4]


def test_adafactor_state_is_sublinear_on_matrices():
    params = _params((256, 128))
    adafactor = op.create_optimizer("adafactor", params)
    adamw = op.create_optimizer("adamw", _params((256, 128)), lr=1e-3)
    _step(adafactor, params)
    _step(adamw, adamw.param_groups[0]["params"])
    assert state_bytes(adafactor) == 4 * (256 + 128) + 4 + 4  # row + col, step, RMS
    assert state_bytes(adafactor) * 50 < state_bytes(adamw)
    state = adafactor.state[params[0]]
    assert state["exp_avg_sq_row"].shape == (256,) and state["exp_avg_sq_col"].shape == (128,)


@pytest.mark.parametrize("name", ["came", "maxfactor"])
def test_other_factored_optimizers_keep_row_and_column_state(name):
    params = _params((256, 128), (128,))
    opt = op.create_optimizer(name, params)
    _step(opt, params)
    matrix, vector = state_bytes_per_param(opt)
    if name == "maxfactor":  # row + col + step + RMS; 1-D: v + step + RMS
        assert matrix == 4 * (256 + 128) + 8 and vector == 4 * 128 + 8
    else:  # CAME: exp_avg (full) + two factored pairs + step
        assert matrix == 4 * (256 * 128 + 2 * (256 + 128)) + 4


def test_state_bytes_counts_a_shared_storage_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    buffer = torch.zeros(100)
    opt.state[p] = {"a": buffer, "b": buffer[:10], "nested": [buffer.view(10, 10), {"c": torch.zeros(3, dtype=torch.float64)}]}
    assert state_bytes(opt) == 400 + 24
    assert state_bytes_per_param(opt) == [424]


def test_state_bytes_per_param_counts_what_each_state_spans():
    """Views of one tensor (the step counters the step keeps together) count with their own
    parameter; a tensor two states share counts with the first; bytes of a storage no state spans
    go with the first state holding it; the list adds up to state_bytes."""
    ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    opt = torch.optim.SGD(ps, lr=0.1)
    counters, shared, storage = torch.zeros(3), torch.zeros(5), torch.zeros(10)
    opt.state[ps[0]] = {"step": counters[0], "s": shared}
    opt.state[ps[1]] = {"step": counters[1], "v": storage[4:6]}
    opt.state[ps[2]] = {"step": counters[2], "s": shared, "w": storage[5:7]}
    # the second: its step, storage[4:6] and the 7 floats of storage no view spans; the third: its step
    # and the one float of storage[5:7] that storage[4:6] does not span
    assert state_bytes_per_param(opt) == [4 + 20, 4 + 8 + 28, 4 + 4]
    assert state_bytes(opt) == 12 + 20 + 40


# ----------------------------------------------------------------------------- adafactor


def test_adafactor_keeps_fp32_state_for_bf16_params_like_transformers():
    params = _params((8, 4), (4,), dtype=torch.bfloat16)
    opt = op.create_optimizer("adafactor", params, compensation=None)
    _step(opt, params, 2)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    assert all(p.dtype == torch.bfloat16 for p in params)


def test_adafactor_get_lr_is_transformers_relative_step():
    from transformers.optimization import Adafactor as HFAdafactor

    ours, theirs = _params((6, 5)), _params((6, 5))
    opt = op.create_optimizer("adafactor", ours, warmup_init=True)
    ref = HFAdafactor(theirs, warmup_init=True)
    for o, ps in ((opt, ours), (ref, theirs)):
        for _ in range(3):
            o.zero_grad()
            with torch.enable_grad():
                (ps[0] ** 2).sum().backward()
            o.step()
    ours_lr = opt._get_lr(opt.param_groups[0], opt.state[ours[0]])
    theirs_lr = float(HFAdafactor._get_lr(ref.param_groups[0], ref.state[theirs[0]]))
    assert ours_lr == pytest.approx(theirs_lr, rel=1e-6) and ours_lr > 0


# ----------------------------------------------------------------------------- maxfactor


def test_maxfactor_1d_state_stays_the_ema_of_squared_gradients():
    """The seed aliased v with the update (rsqrt_ in place); here v is the EMA of g^2."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = op.create_optimizer("maxfactor", [p], gamma=0.9, weight_decay=0.0)
    grads = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 1.0, -3.0])]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = 0.9 * 0.1 * grads[0] ** 2 + 0.1 * grads[1] ** 2
    torch.testing.assert_close(opt.state[p]["v"], expected)


def test_maxfactor_steps_are_sign_times_row_max_and_bounded():
    p = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
    opt = op.create_optimizer("maxfactor", [p], lr=0.01, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    opt.step()
    delta = p.detach() - before
    # the update is -alpha * sign(g) * (row max of |u|): one magnitude per row, |u| <= 1
    assert torch.equal(torch.sign(delta), -torch.sign(p.grad))
    magnitudes = delta.abs()
    torch.testing.assert_close(magnitudes, magnitudes.max(dim=-1, keepdim=True)[0].expand_as(magnitudes))
    alpha = max(1e-3, before.norm().item() / before.numel() ** 0.5) * 0.01
    assert magnitudes.max() <= alpha * (1 + 1e-4)  # up to the fp32 rounding of p


def test_maxfactor_drives_the_adaptive_schedule():
    params = _params((8, 4), (4,))
    opt = op.create_optimizer("maxfactor", params, lr=0.01)
    sched = op.create_scheduler("adaptive", opt, num_warmup_steps=4)
    lrs = []
    for _ in range(6):
        _step(opt, params)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    state = opt.state[params[0]]
    step = float(state["step"])
    rms = params[0].detach().norm().item() / params[0].numel() ** 0.5  # RMS at the last step, before its update
    assert state["RMS"].item() == pytest.approx(rms, rel=0.05)
    expected = max(1e-3, state["RMS"].item()) * min(1e-5 * step, step**-0.5)  # the seed's _get_lr, warmup over
    assert lrs[-1] == pytest.approx(expected, rel=1e-6)
    assert lrs[0] < lrs[-1] and all(torch.isfinite(p).all() for p in params)


# ----------------------------------------------------------------------------- lamb / lars


def test_lamb_step_norm_is_lr_times_weight_norm():
    """The trust ratio makes ||delta w|| = lr / (1 - beta1^t) * ||w|| for every adapted tensor (eps -> 0, no clamps)."""
    params = _params((16, 8), (2, 3, 4))
    opt = op.create_optimizer("lamb", params, lr=0.01, eps=1e-12, max_weight_norm=None)
    before = [p.detach().clone() for p in params]
    _step(opt, params)
    for p, b in zip(params, before):
        assert (p.detach() - b).norm().item() == pytest.approx(0.01 / (1 - 0.9) * b.norm().item(), rel=1e-5)


def test_lamb_exclude_1d_takes_the_plain_adam_step_without_decay():
    weight, bias = _params((4, 3), (3,))
    opt = op.create_optimizer("lamb", [weight, bias], lr=0.01, exclude_1d=True, weight_decay=0.5, bias_correction=True)
    start = bias.detach().clone()
    bias.grad, weight.grad = torch.tensor([1.0, -2.0, 0.5]), torch.ones(4, 3)
    opt.step()
    # step 1: lr / (1 - b1) * m / (sqrt(v) + eps), m = 0.1 g, v = 0.001 g^2; no decay, no trust ratio
    g = bias.grad
    expected = start - 0.01 / (1 - 0.9) * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    torch.testing.assert_close(bias.detach(), expected, rtol=1e-6, atol=1e-7)


def test_lars_trust_ratio_clamp_and_exclusion():
    weight, bias = _params((4, 3), (3,))
    opt = op.create_optimizer("lars", [weight, bias], lr=1.0, momentum=0.0, trust_coefficient=10.0, max_trust_ratio=0.1)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    weight.grad, bias.grad = torch.full((4, 3), 1e-3), torch.ones(3)
    opt.step()
    torch.testing.assert_close(weight.detach(), w0 - 0.1 * 1e-3)  # ratio 10 ||w|| / ||g|| >> 0.1: clamped to 0.1
    torch.testing.assert_close(bias.detach(), b0 - 1.0)  # 1-D: plain SGD step, ratio 1


@pytest.mark.parametrize("name", ["adafactor", "came", "maxfactor", "lamb", "lars"])
def test_complex_parameters_are_refused_clearly(name):
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = op.create_optimizer(name, [p])
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="complex"):
        opt.step()


def test_lamb_trust_ratio_clamp_matches_the_paper_loop():
    """max_trust_ratio has no pytorch_optimizer twin: compared with the paper's equations
    (optim_db_factored.PaperLamb) over 10 steps (longer runs amplify op-order rounding)."""
    import optim_db  # noqa: F401  (collects optim_db_factored first: importing it alone is circular)
    from optim_db_factored import PaperLamb

    options = dict(lr=1e-2, exclude_1d=True, weight_decay=0.1, max_weight_norm=None, max_trust_ratio=0.5, eps=1e-8)
    ours, theirs = _params((5, 3), (3,), (2, 2, 2)), _params((5, 3), (3,), (2, 2, 2))
    opt, ref = op.create_optimizer("lamb", ours, **options), PaperLamb(theirs, **options)
    for _ in range(10):
        _step(opt, ours)
        _step(ref, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
