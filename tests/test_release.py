"""Gradient release (optim_plugins.release): per-parameter steps inside backward."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.release import ACCUMULATION_SUPPORT, check_max_grad_norm, is_released, overrides_step, release_gradients
from optim_db import OPTIMIZER_DB


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a loaded 2-core machine
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=generator).to(dtype), torch.randn(8, 4, generator=generator).to(dtype)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return ((model(x).float() - y.float()) ** 2).mean()


def train(model, opt, data, scheduler=None, accumulation=1):
    """The ordinary loop a trainer runs; under release its step / zero_grad are no-ops."""
    for i, batch in enumerate(data):
        (loss_of(model, batch) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()


def releasable(name: str) -> bool:
    spec = op.get_optimizer_spec(name)
    cls = spec.factory
    return (isinstance(cls, type) and issubclass(cls, op.optimizers.Optimizer) and not spec.capabilities.needs_closure
            and not overrides_step(cls))


RELEASABLE = [n for n in sorted(OPTIMIZER_DB) if releasable(n)]


def first_options(name):
    return dict(OPTIMIZER_DB[name].option_sets[0])


# ----------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("name", RELEASABLE)
def test_release_gives_the_ordinary_trajectory(name):
    """Every per-parameter optimizer: 6 steps with release == 6 ordinary steps (bitwise, reference backend)."""
    options = dict(first_options(name), backend="reference")
    data = batches(6)
    ordinary, released = make_model(), make_model()
    train(ordinary, op.create_optimizer(name, ordinary, **options), data)
    opt = op.create_optimizer(name, released, **options)
    handle = release_gradients(released, opt)
    train(released, opt, data)
    handle.remove()
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_foreach_backend_agrees_to_rounding(name):
    options = dict(lr=0.01, momentum=0.9) if name == "sgd" else dict(lr=0.01)
    data = batches(5)
    ordinary, released = make_model(), make_model()
    train(ordinary, op.create_optimizer(name, ordinary, backend="foreach", **options), data)
    opt = op.create_optimizer(name, released, backend="foreach", **options)
    with release_gradients(released, opt):
        train(released, opt, data)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,options", [(torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
                                         (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True))])
def test_torch_optimizers_are_stepped_per_parameter_with_their_own_state(cls, options):
    data = batches(5)
    ordinary, released = make_model(), make_model()
    train(ordinary, cls(ordinary.parameters(), foreach=False, **options), data)
    opt = cls(released.parameters(), foreach=False, **options)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    with release_gradients(released, opt):
        train(released, opt, data)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)
    assert len(opt.state) == len(list(released.parameters()))  # the optimizer's own state, state_dict works
    assert calls == []  # a per-parameter step is not an optimizer step for the step hooks


def test_unsplittable_optimizers_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="LBFGS"):
        release_gradients(model, torch.optim.LBFGS(model.parameters()))
    for name in ("sam", "schedulefree_adamw", "lookahead", "prodigy"):
        if name in op.list_optimizers():
            try:
                opt = op.create_optimizer(name, model)
            except (TypeError, ValueError):
                continue
            if not releasable(name):
                with pytest.raises(ValueError, match="gradient release cannot drive"):
                    release_gradients(model, opt)


# ----------------------------------------------------------------------------- memory


def test_peak_gradient_memory_drops_to_about_one_tensor():
    def peak(release: bool) -> tuple[int, int]:
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
        params = list(model.parameters())
        seen = [0]

        def count(_):  # registered first, so it runs before release's hook frees the gradient
            seen[0] = max(seen[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))
        for p in params:
            p.register_post_accumulate_grad_hook(count)
        opt = op.create_optimizer("adamw", model, lr=1e-3)
        handle = release_gradients(model, opt) if release else None
        for batch in range(2):
            model(torch.randn(4, 64)).pow(2).mean().backward()
            seen[0] = max(seen[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))
            opt.step()
            opt.zero_grad()
        if handle:
            handle.remove()
        return seen[0], sum(p.numel() * p.element_size() for p in params)

    ordinary, total = peak(False)
    released, _ = peak(True)
    largest = 64 * 64 * 4
    assert ordinary == total  # 133,120 B: every gradient alive after backward
    assert released <= largest + 64 * 4  # one weight (and at most one bias) at a time: 16,640 B
    assert released * 8 <= ordinary


# ----------------------------------------------------------------------------- schedules, clipping, state


def test_scheduler_drives_lr_read_at_each_hooked_step():
    data = batches(6)
    ordinary, released = make_model(), make_model()
    o1 = op.create_optimizer("adamw", ordinary, lr=0.02, backend="reference")
    train(ordinary, o1, data, op.create_scheduler("linear", o1, num_training_steps=6, num_warmup_steps=2))
    o2 = op.create_optimizer("adamw", released, lr=0.02, backend="reference")
    with release_gradients(released, o2):
        scheduler = op.create_scheduler("linear", o2, num_training_steps=6, num_warmup_steps=2)
        with _no_order_warning():
            train(released, o2, data, scheduler)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 0.0


class _no_order_warning:
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [r for r in self.records if "lr_scheduler.step()" in str(r.message)]


def test_lr_zero_freezes_parameters():
    model = make_model()
    opt = op.create_optimizer("sgd", model, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    with release_gradients(model, opt):
        train(model, opt, batches(3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clip_value_clamps_each_gradient_first():
    data = batches(4)
    ordinary, released = make_model(), make_model()
    o1 = op.create_optimizer("sgd", ordinary, lr=0.1, backend="reference")
    for batch in data:
        loss_of(ordinary, batch).backward()
        torch.nn.utils.clip_grad_value_(ordinary.parameters(), 0.01)
        o1.step()
        o1.zero_grad()
    o2 = op.create_optimizer("sgd", released, lr=0.1, backend="reference")
    with release_gradients(released, o2, clip_value=0.01):
        train(released, o2, data)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)


def test_global_norm_clipping_is_refused_with_how_to_turn_it_off():
    model = make_model()
    handle = release_gradients(model, op.create_optimizer("adamw", model))
    with pytest.raises(RuntimeError, match="max_grad_norm=0"):
        handle.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0.*max_grad_norm=0"):
        check_max_grad_norm(1.0)
    check_max_grad_norm(None)
    check_max_grad_norm(0.0)
    handle.remove()


def test_state_dict_round_trip_under_release():
    data = batches(8)
    straight = make_model()
    opt = op.create_optimizer("adamw", straight, lr=0.01, backend="reference")
    handle = release_gradients(straight, opt)
    train(straight, opt, data[:4])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = copy.deepcopy(straight)
    train(straight, opt, data[4:])
    handle.remove()

    buffer.seek(0)
    fresh = op.create_optimizer("adamw", resumed, lr=0.01, backend="reference")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with release_gradients(resumed, fresh):
        train(resumed, fresh, data[4:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_remove_restores_step_and_zero_grad():
    model = make_model()
    opt = op.create_optimizer("sgd", model, lr=0.1)
    handle = release_gradients(model, opt)
    assert is_released(opt) and "step" in opt.__dict__
    with pytest.raises(RuntimeError, match="already released"):
        release_gradients(model, opt)
    loss = opt.step(lambda: loss_of(model, batches(1)[0]).backward() or torch.tensor(1.0))  # a closure still runs
    assert loss.item() == 1.0 and all(p.grad is None for p in model.parameters())
    handle.remove()
    handle.remove()
    assert not is_released(opt) and "step" not in opt.__dict__ and "zero_grad" not in opt.__dict__
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())  # hooks are gone: gradients stay
    opt.step()
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_foreign_parameters_are_refused():
    model, other = make_model(), make_model(1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        release_gradients(model, op.create_optimizer("adamw", other))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_policy_per_parameter(policy):
    model = make_model()
    opt = op.create_optimizer("adamw", model, nonfinite=policy)
    last = list(model.parameters())[-1]
    last.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = last.detach().clone()
    with release_gradients(model, opt) as handle:
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="non-finite"):
                loss_of(model, batches(1)[0]).backward()
        else:
            loss_of(model, batches(1)[0]).backward()
            assert handle.skipped == 1
    assert torch.equal(before, last.detach())


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("options", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
                                     dict(momentum=0.5, weight_decay=0.05, decoupled_weight_decay=True, maximize=True)])
def test_sgd_momentum_accumulates_into_its_buffer(options):
    data = batches(12)
    ordinary, released = make_model(), make_model()
    o1 = op.create_optimizer("sgd", ordinary, lr=0.05, backend="reference", **options)
    train(ordinary, o1, data, accumulation=3)
    o2 = op.create_optimizer("sgd", released, lr=0.05, backend="reference", **options)
    with release_gradients(released, o2, accumulation_steps=3):
        train(released, o2, data, accumulation=3)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the sum is formed in another order
    assert all(float(o2.state[p]["step"]) == 4 for p in released.parameters())


def test_accumulation_is_refused_where_the_state_cannot_hold_the_sum():
    model = make_model()
    assert set(ACCUMULATION_SUPPORT) == {"sgd"}
    with pytest.raises(ValueError, match="quadratic"):
        release_gradients(model, op.create_optimizer("adamw", model), accumulation_steps=2)
    with pytest.raises(ValueError, match="momentum > 0"):
        release_gradients(model, op.create_optimizer("sgd", model, lr=0.1), accumulation_steps=2)
    with pytest.raises(ValueError, match="nesterov"):
        release_gradients(model, op.create_optimizer("sgd", model, lr=0.1, momentum=0.9, nesterov=True), accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        release_gradients(model, op.create_optimizer("sgd", model), accumulation_steps=0)


# ----------------------------------------------------------------------------- low-rank


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw"])
def test_low_rank_optimizers_under_release(name):
    data = batches(6)
    options = dict(lr=0.01, rank=4, update_proj_gap=3, backend="reference")
    ordinary, released = make_model(), make_model()
    train(ordinary, op.create_optimizer(name, ordinary, **options), data)
    opt = op.create_optimizer(name, released, **options)
    with release_gradients(released, opt):
        train(released, opt, data)
    for a, b in zip(ordinary.parameters(), released.parameters()):
        assert torch.equal(a, b)
