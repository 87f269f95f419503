"""lr_find: the lr range test on a least-squares problem whose divergence lr is known."""
from __future__ import annotations

import pytest
import torch

from optim_plugins.lr_finder import lr_find


def problem(seed=0, n=64, d=5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, 1, generator=generator)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # plain gradient descent on mean((x w - y)^2) diverges above 2 / lambda_max(2 x^T x / n)
    hessian = 2 * x.T @ x / n
    divergence_lr = 2 / torch.linalg.eigvalsh(hessian).max().item()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]
    return model, batches, divergence_lr, (x, y)


def test_range_test_finds_an_lr_below_divergence_and_restores_everything():
    model, batches, divergence_lr, _ = problem()
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.123, momentum=0.0)
    before = model.weight.detach().clone()
    rng = torch.get_rng_state()
    result = lr_find(model, torch.nn.functional.mse_loss, batches, optimizer, start_lr=1e-4, end_lr=10.0, num_steps=60)

    expected_lrs = [1e-4 * (10.0 / 1e-4) ** (k / 59) for k in range(len(result.lrs))]
    assert result.lrs == pytest.approx(expected_lrs, rel=1e-12)
    assert result.diverged and len(result.lrs) < 60
    assert result.lrs[-1] > divergence_lr / 2  # it ran into the unstable region before stopping
    assert 1e-4 < result.suggested_lr < divergence_lr
    assert result.suggested_lr <= result.min_loss_lr
    assert len(result.losses) == len(result.smoothed_losses) == len(result.lrs)
    assert torch.equal(model.weight, before)
    assert optimizer.param_groups[0]["lr"] == 0.123
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_optimizer_state_is_restored_and_training_continues_identically():
    model, batches, _, (x, y) = problem(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    twin = problem(seed=1)[0]
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)

    def train_step(m, o):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        train_step(model, optimizer)
        train_step(twin, twin_optimizer)
    lr_find(model, torch.nn.functional.mse_loss, batches, optimizer, num_steps=20)
    for _ in range(3):
        train_step(model, optimizer)
        train_step(twin, twin_optimizer)
    assert torch.equal(model.weight, twin.weight)  # momentum buffers were restored too


def test_optimizer_by_name_and_model_batch_loss():
    model, batches, divergence_lr, _ = problem(seed=2)
    before = model.weight.detach().clone()
    calls = []

    def loss_fn(m, batch):  # a batch that is not (inputs, targets): loss_fn(model, batch)
        calls.append(1)
        return torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])

    data = [{"x": x, "y": y} for x, y in batches]
    result = lr_find(model, loss_fn, data, "sgd", start_lr=1e-3, end_lr=1e-1, num_steps=10, mode="linear")
    assert result.lrs == pytest.approx([1e-3 + (1e-1 - 1e-3) * k / 9 for k in range(10)])
    assert len(calls) == 10 and not result.diverged  # data is cycled past its 2 batches
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_lr=0.0), "start_lr"),
    (dict(start_lr=1.0, end_lr=0.1), "end_lr=0.1"),
    (dict(num_steps=1), "num_steps.*1"),
    (dict(mode="cos"), "mode='cos'"),
    (dict(beta=1.0), "beta.*1.0"),
    (dict(diverge_threshold=1.0), "diverge_threshold.*1.0"),
])
def test_bad_arguments(kwargs, message):
    model, batches, _, _ = problem()
    with pytest.raises(ValueError, match=message):
        lr_find(model, torch.nn.functional.mse_loss, batches, "sgd", **kwargs)


def test_empty_data_raises_and_restores():
    model, _, _, _ = problem()
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="no batch"):
        lr_find(model, torch.nn.functional.mse_loss, [], "sgd")
    assert torch.equal(model.weight, before)
