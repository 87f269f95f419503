"""Plain-loop step mechanics (optim_plugins.training.StepRunner) against written-out formulas."""
import math

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.training import StepRunner, adaptive_clip_grad_


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_fp16_overflow_skips_optimizer_and_schedule():
    model = _model()
    opt = op.create_optimizer("adamw", model, lr=0.1)
    sched = op.create_scheduler("linear", opt, num_training_steps=10, num_warmup_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    runner = StepRunner(opt, sched, precision="fp16", scaler=scaler)
    x, y = _data()
    lrs = []
    for i in range(4):
        with runner.autocast():
            loss = nn.functional.mse_loss(model(x).float(), y)
        if i == 1:
            loss = loss * float("inf")  # forced overflow
        before = [p.detach().clone() for p in model.parameters()]
        result = runner.step() if runner.backward(loss) is None else None
        lrs.append(opt.param_groups[0]["lr"])
        if i == 1:
            assert not result and result.skipped == "overflow"
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            assert sched.last_epoch == 1  # not advanced
            assert scaler.get_scale() == 2.0 ** 9
        else:
            assert result and math.isfinite(result.grad_norm)
    assert runner.optimizer_steps == 3 and runner.skipped_steps == 1
    assert sched.last_epoch == 3
    assert lrs == pytest.approx([sched.lr_at(s)[0] for s in (1, 1, 2, 3)])
    assert opt.state[next(model.parameters())]["step"].item() == 3


def test_fp16_precision_makes_a_cpu_scaler_and_bf16_none():
    model = _model()
    assert isinstance(StepRunner(op.create_optimizer("sgd", model, lr=0.1), precision="fp16").scaler,
                      torch.amp.GradScaler)
    assert StepRunner(op.create_optimizer("sgd", model, lr=0.1), precision="bf16-mixed").scaler is None
    with pytest.raises(ValueError, match="precision"):
        StepRunner(op.create_optimizer("sgd", model, lr=0.1), precision="fp8")


def test_accumulation_equals_big_batch_gradient():
    x, y = _data(16)
    big = _model()
    nn.functional.mse_loss(big(x), y).backward()
    expected = _grads(big)

    model = _model()
    opt = op.create_optimizer("sgd", model, lr=0.0)
    runner = StepRunner(opt, accumulation_steps=4)
    seen = []
    opt.step = lambda *a, **k: seen.append(_grads(model))  # look at the gradients the step gets
    for i in range(4):
        runner.backward(nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]))
        result = runner.step()
        assert bool(result) == (i == 3) and result.accumulating == (i < 3)
    assert len(seen) == 1
    for g, e in zip(seen[0], expected):
        torch.testing.assert_close(g, e)
    assert all(p.grad is None for p in model.parameters())


def test_token_normalisation_with_uneven_micro_batches():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3)
    head = nn.Linear(3, 10)
    model = nn.Sequential(emb, head)
    tokens = [torch.randint(0, 10, (n,)) for n in (3, 9, 5)]
    targets = [torch.randint(0, 10, (n,)) for n in (3, 9, 5)]
    nn.functional.cross_entropy(model(torch.cat(tokens)), torch.cat(targets)).backward()
    expected = _grads(model)
    model.zero_grad()
    opt = op.create_optimizer("sgd", model, lr=0.0)
    seen = []
    opt.step = lambda *a, **k: seen.append(_grads(model))
    runner = StepRunner(opt, accumulation_steps=3, normalize="tokens")
    for t, y in zip(tokens, targets):
        runner.backward(nn.functional.cross_entropy(model(t), y), num_tokens=len(t))
        runner.step()
    for g, e in zip(seen[0], expected):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="num_tokens"):
        runner.backward(nn.functional.cross_entropy(model(tokens[0]), targets[0]))


def _with_grads(seed=3):
    model = _model()
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 5
    return model


def _step_grads(model, **kwargs):
    opt = op.create_optimizer("sgd", model, lr=0.0)
    seen = []
    opt.step = lambda *a, **k: seen.append(_grads(model))
    runner = StepRunner(opt, model=model, **kwargs)
    runner.micro_step = 1  # gradients were set by hand
    result = runner.step()
    return seen[0], result


def test_clip_by_norm_formula():
    model = _with_grads()
    raw = _grads(model)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in raw))
    clipped, result = _step_grads(model, max_grad_norm=1.0)
    assert result.grad_norm == pytest.approx(total, rel=1e-6)  # reported before clipping
    coef = min(1.0, 1.0 / (total + 1e-6))
    for c, g in zip(clipped, raw):
        torch.testing.assert_close(c, g * coef)


def test_clip_by_value_formula():
    model = _with_grads()
    raw = _grads(model)
    clipped, _ = _step_grads(model, clip_value=0.5)
    for c, g in zip(clipped, raw):
        torch.testing.assert_close(c, torch.minimum(torch.maximum(g, torch.tensor(-0.5)), torch.tensor(0.5)))


def test_adaptive_clipping_formula_unitwise():
    model = _with_grads()
    raw = _grads(model)
    lam, eps = 0.01, 1e-3
    clipped, _ = _step_grads(model, agc_clip_factor=lam, agc_eps=eps)
    for p, c, g in zip(model.parameters(), clipped, raw):
        w = p.detach()
        rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        rows_g = g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1)
        expected = []
        for wi, gi in zip(rows_w, rows_g):
            wn = max(float(wi.norm()), eps)
            gn = float(gi.norm())
            expected.append(gi * (lam * wn / gn) if gn / wn > lam else gi)
        torch.testing.assert_close(c, torch.stack(expected).reshape(g.shape))
    # a unit under the threshold is unchanged
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.full((2, 2), 1e-4)
    adaptive_clip_grad_([p], 0.01)
    assert torch.equal(p.grad, torch.full((2, 2), 1e-4))


def test_agc_exclude_leaves_the_head_alone():
    model = _with_grads()
    raw = _grads(model)
    clipped, _ = _step_grads(model, agc_clip_factor=0.01, agc_exclude=[r"^2\."])
    torch.testing.assert_close(clipped[2], raw[2])
    torch.testing.assert_close(clipped[3], raw[3])
    assert not torch.equal(clipped[0], raw[0])


def test_nan_guard_reports_parameter_and_step():
    model = _model()
    opt = op.create_optimizer("adamw", model, lr=0.1)
    sched = op.create_scheduler("constant", opt)
    runner = StepRunner(opt, sched, model=model)
    x, y = _data()
    runner.backward(nn.functional.mse_loss(model(x), y))
    assert runner.step()
    runner.backward(nn.functional.mse_loss(model(x), y))
    model[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"optimizer step 2.*2\.weight \(shape \(2, 8\): 1 NaN, 0 Inf\)"):
        runner.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert sched.last_epoch == 1

    skipping = StepRunner(opt, sched, model=model, nan_guard="skip")
    skipping.backward(nn.functional.mse_loss(model(x), y))
    model[0].bias.grad[1] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"0\.bias"):
        result = skipping.step()
    assert not result and result.skipped == "nonfinite" and "0.bias" in result.report
    assert sched.last_epoch == 1 and skipping.skipped_steps == 1


def test_needs_closure_optimizer_is_refused():
    from optim_plugins.registry import Capabilities

    class TwoPass(torch.optim.SGD):
        capabilities = Capabilities(needs_closure=True)

    with pytest.raises(ValueError, match="needs a closure"):
        StepRunner(TwoPass(_model().parameters(), lr=0.1))


def test_state_dict_round_trip():
    model = _model()
    runner = StepRunner(op.create_optimizer("sgd", model, lr=0.1), precision="fp16")
    x, y = _data()
    runner.backward(nn.functional.mse_loss(model(x), y))
    runner.step()
    other = StepRunner(op.create_optimizer("sgd", model, lr=0.1), precision="fp16")
    other.load_state_dict(runner.state_dict())
    assert other.optimizer_steps == 1 and other.scaler.get_scale() == runner.scaler.get_scale()
