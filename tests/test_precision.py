"""The precision seam: Kahan compensation, stochastic rounding and fp32 states for bf16 parameters."""
from __future__ import annotations

import io

import pytest
import torch

import optim_plugins as op
from optim_plugins.optimizers.precision import stochastic_round


def quadratic_run(dtype, steps=300, **options):
    torch.manual_seed(0)
    target = torch.randn(64, 32)
    p = torch.nn.Parameter((target + 4.0).to(dtype))
    opt = op.create_optimizer("sgd", [p], lr=2e-3, **options)
    for _ in range(steps):
        opt.zero_grad()
        ((p.float() - target) ** 2).sum().mul(0.5).backward()
        opt.step()
    return p.detach().float(), opt


def test_kahan_keeps_bf16_learning_where_plain_bf16_stalls():
    exact, _ = quadratic_run(torch.float32)
    plain, _ = quadratic_run(torch.bfloat16, compensation=None)
    kahan, opt = quadratic_run(torch.bfloat16, compensation="kahan")
    plain_error = (plain - exact).abs().mean().item()
    kahan_error = (kahan - exact).abs().mean().item()
    assert kahan_error < 0.2 * plain_error, (kahan_error, plain_error)
    assert next(iter(opt.state.values()))["compensation"].dtype == torch.bfloat16


def test_stochastic_rounding_learns_where_plain_bf16_stalls():
    exact, _ = quadratic_run(torch.float32)
    plain, _ = quadratic_run(torch.bfloat16, compensation=None)
    torch.manual_seed(1)
    rounded, opt = quadratic_run(torch.bfloat16, compensation="stochastic")
    assert (rounded - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()
    assert "compensation" not in next(iter(opt.state.values()))


def test_fp32_states_for_bf16_parameters():
    exact, _ = quadratic_run(torch.float32)
    master, opt = quadratic_run(torch.bfloat16, compensation="kahan", state_dtype="fp32", momentum=0.9)
    state = next(iter(opt.state.values()))
    assert state["momentum_buffer"].dtype == torch.float32
    reference, _ = quadratic_run(torch.float32, momentum=0.9)
    assert (master - reference).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_between_neighbours(dtype):
    x = torch.full((200_000,), 1.0 + 0.3 * torch.finfo(dtype).eps)
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round(x, dtype, generator).float()
    below, above = 1.0, 1.0 + torch.finfo(dtype).eps
    assert set(rounded.unique().tolist()) == {below, above}
    fraction_up = (rounded == above).float().mean().item()
    # Binomial(n, 0.3): standard deviation sqrt(0.3 * 0.7 / n) ~ 0.001; allow 5 sigma.
    assert abs(fraction_up - 0.3) < 0.005
    exact = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(stochastic_round(exact, dtype).float(), exact)


def test_compensation_buffer_survives_a_checkpoint():
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))]

    def steps(opt, params, n):
        for _ in range(n):
            opt.zero_grad()
            (params[0].float() ** 2).sum().backward()
            opt.step()

    straight = make()
    opt = op.create_optimizer("adamw", straight, lr=1e-4)
    steps(opt, straight, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(straight[0].detach().clone())]
    steps(opt, straight, 5)
    buffer.seek(0)
    fresh = op.create_optimizer("adamw", resumed, lr=1e-4)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state[resumed[0]]["compensation"].dtype == torch.bfloat16
    steps(fresh, resumed, 5)
    assert torch.equal(straight[0], resumed[0])


def test_fp32_state_dtype_survives_load_state_dict():
    params = [torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))]
    opt = op.create_optimizer("adam", params, state_dtype="fp32")
    params[0].grad = torch.randn(4, 4).to(torch.bfloat16)
    opt.step()
    twin = op.create_optimizer("adam", [torch.nn.Parameter(params[0].detach().clone())], state_dtype="fp32")
    twin.load_state_dict(opt.state_dict())
    state = next(iter(twin.state.values()))
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def test_bf16_state_dtype_is_adamw_with_moments_rounded_to_bf16():
    """fp32 weights, bf16 moments: AdamW's equations written out, the moments rounded after each write."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(33, 7))
    grads = [torch.randn(33, 7) for _ in range(20)]
    opt = op.create_optimizer("adamw", [p], lr=1e-2, weight_decay=0.1, state_dtype="bf16")
    x, m, v = p.detach().clone(), torch.zeros(33, 7), torch.zeros(33, 7)
    beta1, beta2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-2, 0.1
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        x = x * (1 - lr * wd)
        m = (beta1 * m + (1 - beta1) * g)
        v = (beta2 * v + (1 - beta2) * g * g)
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5) + eps
        x = x - lr / (1 - beta1 ** t) * m / denom
        m, v = m.bfloat16().float(), v.bfloat16().float()
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"].float(), m) and torch.equal(state["exp_avg_sq"].float(), v)
    torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-6)
    assert op.state_bytes(opt) == 33 * 7 * 4 + state["step"].element_size()  # 2 + 2 bytes per parameter


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_bf16_state_dtype_round_trips_a_checkpoint(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    make = lambda ps: op.create_optimizer("adabelief", ps, lr=1e-2, state_dtype="bf16", backend=backend)  # noqa: E731
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = make(twins)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(v.dtype == torch.bfloat16 for s in twin.state.values() for k, v in s.items() if k != "step")
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_bad_state_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="state_dtype.*'int8'"):
        op.create_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], state_dtype="int8")
