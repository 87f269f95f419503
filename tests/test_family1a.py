"""Behaviour of family I, part A beyond the generic suite: the official AdaBelief and Adan
packages (where they deliberately differ), Ranger against pytorch_optimizer, Adan's restart,
Lookahead's slow weights, and SAM/ASAM's two-pass step and closure rules."""
from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import optim_plugins as op
from optim_plugins.optimizers.lookahead import Lookahead
from optim_plugins.optimizers.sam import ASAM


def make_params(seed: int = 0, shapes=((5, 3), (3,), (2, 2, 2))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def objective(params):
    return sum(((p - 0.3) ** 2 * (i + 1)).sum() + torch.sin(3 * p).sum() for i, p in enumerate(params))


def run(optimizer, params, steps: int) -> None:
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = objective(params)
            loss.backward()
            return loss
        optimizer.step(closure)


# ----------------------------------------------------------------------------- adabelief


def official_adabelief(params, ams_bound=False, **options):
    from adabelief_pytorch import AdaBelief

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its change log and settings
        return AdaBelief(params, amsgrad=ams_bound, print_change_log=False, **options)


@pytest.mark.parametrize("options", [
    dict(lr=0.01, rectify=False, weight_decay=0.1, fixed_decay=True, ams_bound=True),
    dict(lr=0.01, rectify=True, weight_decay=0.1, weight_decouple=False, eps=1e-8),
    dict(lr=0.01, rectify=True, degenerated_to_sgd=False),
])
def test_adabelief_matches_the_official_package_where_the_options_agree(options):
    ours, theirs = make_params(), make_params()
    run(op.create_optimizer("adabelief", ours, **options), ours, 100)
    run(official_adabelief(theirs, **options), theirs, 100)
    for a, b in zip(ours, theirs):  # the official EMA is mul_+add_ where ours (and the seed) lerp_: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))


def test_adabelief_rectify_with_ams_bound_uses_the_bound_unlike_the_official_package():
    """The seed bounds the rectified denominator too; adabelief_pytorch uses the unbounded s there."""
    beta1, beta2, lr, eps = 0.5, 0.9, 0.01, 1e-16
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    expected, m, s, s_max = p.detach().clone(), torch.zeros(3), torch.zeros(3), torch.zeros(3)
    opt = op.create_optimizer("adabelief", [p], lr=lr, betas=(beta1, beta2), rectify=True, ams_bound=True)
    official_p = torch.nn.Parameter(p.detach().clone())
    official = official_adabelief([official_p], lr=lr, betas=(beta1, beta2), rectify=True, ams_bound=True)
    rho_inf = 2 / (1 - beta2) - 1
    for t in range(1, 31):
        scale = 10.0 if t <= 10 else 1.0  # large, then small gradients: s falls below its maximum
        g = 2 * expected * scale
        m = beta1 * m + (1 - beta1) * g
        s = beta2 * s + (1 - beta2) * (g - m) ** 2 + eps
        s_max = torch.maximum(s_max, s)
        rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho >= 5:
            r = math.sqrt((1 - beta2**t) * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            expected = expected - lr * r / (1 - beta1**t) * m / (s_max.sqrt() + eps)
        else:
            expected = expected - lr / (1 - beta1**t) * m
        for param, optimizer in ((p, opt), (official_p, official)):
            param.grad = 2 * param.detach() * scale
            optimizer.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(official_p.detach(), expected, rtol=1e-4, atol=1e-5)


def test_adabelief_state_names_and_adanorm_state():
    params = make_params()
    opt = op.create_optimizer("adabelief", params, lr=0.01, ams_bound=True, adanorm=True)
    run(opt, params, 3)
    state = opt.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_var", "max_exp_avg_var", "exp_grad_norm"}
    assert state["exp_grad_norm"].shape == (1,) and state["exp_grad_norm"].item() > 0
    assert opt.capabilities.shardable == "tensors"  # a per-tensor norm: not split by elements
    assert op.get_optimizer_spec("adabelief").capabilities.shardable == "elements"


# ----------------------------------------------------------------------------- adan


def test_adan_equals_adan_pytorch_from_any_state_but_not_at_its_first_step():
    """adan_pytorch spends its first step recording g0 (no update) and then counts the bias
    correction one step late; given the same state, both make the same step (the paper's)."""
    from adan_pytorch import Adan as LucidAdan

    betas, lr, wd = (0.98, 0.92, 0.99), 0.01, 0.05
    ours = make_params()
    opt = op.create_optimizer("adan", ours, lr=lr, betas=betas, weight_decay=wd)
    run(opt, ours, 10)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lucid = LucidAdan(theirs, lr=lr, betas=tuple(1 - b for b in betas), weight_decay=wd)
    for p, q in zip(ours, theirs):
        s = opt.state[p]
        lucid.state[q] = dict(step=10, m=s["exp_avg"].clone(), v=s["exp_avg_diff"].clone(), n=s["exp_avg_sq"].clone(),
                              prev_grad=s["previous_grad"].clone())
    run(opt, ours, 50)
    run(lucid, theirs, 50)
    for a, b in zip(ours, theirs):  # it bias-corrects n inside the sqrt: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    fresh, first = make_params(), make_params()
    run(LucidAdan(fresh, lr=lr, betas=tuple(1 - b for b in betas)), fresh, 1)
    run(op.create_optimizer("adan", first, lr=lr, betas=betas), first, 1)
    assert all(torch.equal(a, b) for a, b in zip(fresh, make_params()))  # no step at all
    assert not any(torch.equal(a, b) for a, b in zip(first, make_params()))


def test_adan_restart_starts_afresh_from_the_parameters_reached():
    restarted = make_params()
    run(op.create_optimizer("adan", restarted, lr=0.01, restart_interval=5, weight_decay=0.02), restarted, 8)
    twice = make_params()
    run(op.create_optimizer("adan", twice, lr=0.01, weight_decay=0.02), twice, 5)
    run(op.create_optimizer("adan", twice, lr=0.01, weight_decay=0.02), twice, 3)
    for a, b in zip(restarted, twice):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- ranger


def test_ranger_matches_pytorch_optimizer_ranger():
    from pytorch_optimizer import Ranger

    ours, theirs = make_params(), make_params()
    run(op.create_optimizer("ranger", ours, lr=0.01, weight_decay=0.1), ours, 100)
    run(Ranger(theirs, lr=0.01, weight_decay=0.1, degenerated_to_sgd=True, foreach=False), theirs, 100)
    for a, b in zip(ours, theirs):  # it computes r_t * sqrt(1 - b2^t) / (1 - b1^t) as one factor: rounding only
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.detach().abs().max()))


# ----------------------------------------------------------------------------- lookahead


def test_lookahead_slow_weights_follow_the_paper_and_are_saved():
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = op.create_optimizer("lookahead", params, inner="sgd", lr=0.05, k=3, alpha=0.25)
    fast = make_params()
    run(op.create_optimizer("sgd", fast, lr=0.05), fast, 3)
    run(opt, params, 3)
    for p, s, f in zip(params, start, fast):
        torch.testing.assert_close(p.detach(), s + 0.25 * (f.detach() - s))
        assert torch.equal(opt.state[p]["slow_param"], p.detach())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all("slow_param" in entry for entry in saved["state"].values())


def test_lookahead_passes_inner_options_flat_or_nested_and_wraps_any_optimizer():
    params = make_params()
    flat = Lookahead(params, inner="adamw", betas=(0.8, 0.9), lr=0.01)
    nested = op.create_optimizer("lookahead", params, inner="adamw", inner_options={"betas": (0.8, 0.9)}, lr=0.01)
    assert flat.param_groups[0]["betas"] == nested.param_groups[0]["betas"] == (0.8, 0.9)
    for inner in ("lion", "adabelief", "ranger", "sam"):
        ps = make_params()
        opt = op.create_optimizer("lookahead", ps, inner=inner, lr=1e-3, k=2)
        run(opt, ps, 4)
        assert all(torch.isfinite(p).all() for p in ps)
        assert "slow_param" in opt.state[ps[0]]


def test_lookahead_without_gradient_keeps_no_state_and_lambdalr_drives_the_inner_lr():
    params = make_params()
    opt = op.create_optimizer("lookahead", params, lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(2):
        opt.zero_grad()
        objective(params[:2]).backward()
        opt.step()
        schedule.step()
    assert len(opt.state[params[2]]) == 0
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)


# ----------------------------------------------------------------------------- sam / asam


def quadratic_closure(opt, params, calls=None):
    def closure():
        if calls is not None:
            calls.append([p.detach().clone() for p in params])
        opt.zero_grad()
        loss = sum(0.5 * (p**2).sum() for p in params)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_steps_with_the_gradient_at_the_perturbed_point(name):
    """f = |p|^2 / 2, so g = p: SAM e = rho p / |p|; ASAM e = rho p^3 / |p^2|; p -= lr g(p + e)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    w, lr, rho = p.detach().clone(), 0.1, 0.3
    opt = op.create_optimizer(name, [p], lr=lr, rho=rho)
    calls: list = []
    loss = opt.step(quadratic_closure(opt, [p], calls))
    e = rho * w / w.norm() if name == "sam" else rho * w**3 / (w**2).norm()
    assert loss.item() == pytest.approx(0.5 * float((w**2).sum()))  # the loss at p
    assert len(calls) == 2 and torch.allclose(calls[1][0], w + e)
    torch.testing.assert_close(p.detach(), w - lr * (w + e))


def test_sam_needs_a_closure_only_when_there_are_gradients():
    params = make_params()
    opt = op.create_optimizer("sam", params, lr=0.1)
    assert opt.step() is None  # nothing to do
    objective(params).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, make_params()))


def test_sam_with_closure_skips_none_gradients_and_zero_gradients_keep_params():
    params = make_params()
    opt = op.create_optimizer("sam", params, lr=0.1, inner_options={"momentum": 0.9})

    def closure():
        opt.zero_grad()
        loss = objective([params[0], params[2]])
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    assert torch.equal(params[1].detach(), make_params()[1]) and len(opt.state[params[1]]) == 0
    still = make_params()
    zero = op.create_optimizer("asam", still, lr=0.1)

    def zero_closure():
        zero.zero_grad()
        loss = sum((p * 0).sum() for p in still)
        loss.backward()
        return loss
    for _ in range(3):
        zero.step(zero_closure)
    assert all(torch.equal(a, b) for a, b in zip(still, make_params()))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_sam_nonfinite_policies_apply_before_perturbing(policy):
    params = make_params()
    opt = op.create_optimizer("sam", params, lr=0.1, nonfinite=policy)
    calls: list = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = objective(params)
        loss.backward()
        params[2].grad.view(-1)[3] = float("nan")
        return loss
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.skipped_steps == 1
    assert len(calls) == 1  # no second evaluation
    assert all(torch.equal(a, b) for a, b in zip(params, make_params()))


def test_asam_is_always_adaptive():
    with pytest.raises(ValueError, match="adaptive"):
        ASAM(make_params(), adaptive=False)
    with pytest.raises(ValueError, match="adaptive"):
        op.create_optimizer("asam", make_params(), adaptive=False)


# ----------------------------------------------------------------------------- sign steps and NaN


@pytest.mark.parametrize("name", ["lion", "signsgd"])
def test_sign_steps_keep_a_nan_gradient_in_the_momentum_unless_skipped(name):
    """torch.sign(nan) == 0: the NaN does not reach the parameter (as in the references) but
    freezes that coordinate through its momentum; nonfinite="skip" keeps the momentum clean."""
    for policy in ("propagate", "skip"):
        params = make_params()
        opt = op.create_optimizer(name, params, lr=0.01, nonfinite=policy)
        run(opt, params, 2)
        opt.zero_grad()
        objective(params).backward()
        params[0].grad[0, 0] = float("nan")
        opt.step()
        buffer = opt.state[params[0]]["exp_avg" if name == "lion" else "momentum_buffer"]
        assert torch.isfinite(params[0]).all()
        assert bool(torch.isnan(buffer[0, 0])) == (policy == "propagate")
        frozen = params[0][0, 0].item()
        run(opt, params, 3)
        assert (params[0][0, 0].item() == frozen) == (policy == "propagate")
