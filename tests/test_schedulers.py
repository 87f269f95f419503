"""Learning-rate schedules: step-by-step against transformers / torch.optim.lr_scheduler,
state-dict round trips, per-group base lrs, bad arguments, the adaptive schedules and the plot."""
from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch
from torch.optim import lr_scheduler as tls

import optim_plugins as op
from optim_plugins.schedulers.plot import parse_option_pairs, plot_schedule, schedule_values

transformers_optimization = pytest.importorskip("transformers.optimization")
TOL = 1e-9


def make_optimizer(kind: str = "sgd", lrs=(0.1, 0.05), **options) -> torch.optim.Optimizer:
    """Two param groups with different base lrs (as layer-wise decay makes them)."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3, 2))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=options.pop("momentum", 0.9), **options)
    return torch.optim.AdamW(groups, lr=lrs[0], **options)


def make_optimizer_op(name, lrs=(0.1, 0.05), **options):
    """The same groups for this package's optimizer ``name``."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3, 2))], "lr": lr} for lr in lrs]
    return op.create_optimizer(name, groups, lr=lrs[0], **options)


def lrs_of(optimizer):
    return [float(group["lr"]) for group in optimizer.param_groups]


def run(scheduler, optimizer, steps, metric=None):
    """lrs of every group before each of ``steps`` steps, then after the last one."""
    seen = [lrs_of(optimizer)]
    for step in range(steps):
        optimizer.step()
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric(step))
        seen.append(lrs_of(optimizer))
    return seen


def assert_close_runs(ours, reference, tol=TOL):
    assert len(ours) == len(reference)
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert a == pytest.approx(b, abs=tol, rel=0), f"step {step}: {a} != {b}"


# ------------------------------------------------------------------ against transformers

EDGES = [(0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (5, 37)]  # (num_warmup_steps, num_training_steps)
HF_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-3}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 0.01, "num_cycles": 0.75}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 0.02, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"decay_type": "cosine"}),
    ("warmup_stable_decay", {"decay_type": "linear", "warmup_type": "cosine", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"decay_type": "1-sqrt", "warmup_type": "1-sqrt", "min_lr_ratio": 0.05}),
]


def hf_scheduler(name, optimizer, warmup, total, options, last_epoch=-1):
    function = transformers_optimization.TYPE_TO_SCHEDULER_FUNCTION[transformers_optimization.SchedulerType(name)]
    if name == "constant":
        return function(optimizer, last_epoch=last_epoch)
    if name in ("constant_with_warmup", "inverse_sqrt"):
        return function(optimizer, num_warmup_steps=warmup, last_epoch=last_epoch, **options)
    return function(optimizer, num_warmup_steps=warmup, num_training_steps=total, last_epoch=last_epoch, **options)


def create(name, optimizer, total, warmup, **options):
    """``op.create_scheduler``, passing the warmup only to schedules that have one."""
    if "num_warmup_steps" not in op.get_scheduler_spec(name).options:
        warmup = 0
    return op.create_scheduler(name, optimizer, num_training_steps=total, num_warmup_steps=warmup, **options)


def with_decay(name, options, warmup, total):
    if name == "warmup_stable_decay":
        return {**options, "num_decay_steps": (total - warmup + 1) // 2}
    return options


@pytest.mark.parametrize("name, options", HF_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(HF_CASES)])
@pytest.mark.parametrize("warmup, total", EDGES)
def test_matches_transformers(name, options, warmup, total):
    if name == "polynomial" and warmup == total:
        pytest.skip("transformers divides by zero at the last step (tested in test_polynomial_warmup_equals_total)")
    options = with_decay(name, options, warmup, total)
    steps = total + 3  # and a few steps past the end
    ours_opt, ref_opt = make_optimizer(), make_optimizer()
    ours = create(name, ours_opt, total, warmup, **options)
    reference = hf_scheduler(name, ref_opt, warmup, total, options)
    assert isinstance(ours, tls.LRScheduler)
    assert_close_runs(run(ours, ours_opt, steps), run(reference, ref_opt, steps))


@pytest.mark.parametrize("name, options", HF_CASES[::2], ids=[f"{n}-{i}" for i, (n, _) in enumerate(HF_CASES[::2])])
def test_last_epoch_resume_matches_transformers(name, options):
    warmup, total, resume_at = 4, 20, 9
    options = with_decay(name, options, warmup, total)
    ours_opt, ref_opt = make_optimizer(), make_optimizer()
    for optimizer in (ours_opt, ref_opt):
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    ours = create(name, ours_opt, total, warmup, last_epoch=resume_at, **options)
    reference = hf_scheduler(name, ref_opt, warmup, total, options, last_epoch=resume_at)
    assert_close_runs(run(ours, ours_opt, 8), run(reference, ref_opt, 8))


def test_polynomial_warmup_equals_total():
    optimizer = make_optimizer()
    scheduler = op.create_scheduler("polynomial", optimizer, num_training_steps=4, num_warmup_steps=4, lr_end=1e-3)
    seen = run(scheduler, optimizer, 5)
    assert [s[0] for s in seen[:4]] == pytest.approx([0.0, 0.025, 0.05, 0.075], abs=TOL)
    assert seen[4] == pytest.approx([1e-3, 1e-3 * 0.5], abs=TOL)  # lr_end, scaled by the group's ratio


@pytest.mark.parametrize("warmup, total", EDGES)
def test_warmup_cosine_is_transformers_cosine(warmup, total):
    for options, hf_name, hf_options in [({}, "cosine", {}), ({"min_lr_ratio": 0.1}, "cosine_with_min_lr", {"min_lr_rate": 0.1}),
                                         ({"min_lr": 0.02, "num_cycles": 1.0}, "cosine_with_min_lr", {"min_lr": 0.02, "num_cycles": 1.0})]:
        ours_opt, ref_opt = make_optimizer(), make_optimizer()
        ours = op.create_scheduler("warmup_cosine", ours_opt, num_training_steps=total, num_warmup_steps=warmup, **options)
        reference = hf_scheduler(hf_name, ref_opt, warmup, total, hf_options)
        assert_close_runs(run(ours, ours_opt, total + 2), run(reference, ref_opt, total + 2))


def test_warmup_cosine_cosine_warmup_formula():
    optimizer = make_optimizer(lrs=(1.0, 0.5))
    scheduler = op.create_scheduler("warmup_cosine", optimizer, num_training_steps=20, num_warmup_steps=8,
                                    warmup_type="cosine", min_lr_ratio=0.2)
    seen = [s[0] for s in run(scheduler, optimizer, 20)]
    for step, lr in enumerate(seen):
        if step < 8:
            expected = 0.5 * (1 - math.cos(math.pi * step / 8))  # cosine warmup from 0, not from the floor
        else:
            expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (step - 8) / 12))
        assert lr == pytest.approx(expected, abs=TOL), step


# ------------------------------------------------------------------ against torch.optim.lr_scheduler

TORCH_CASES = [
    ("step", {"step_size": 7, "gamma": 0.5}, lambda o: tls.StepLR(o, step_size=7, gamma=0.5)),
    ("multistep", {"milestones": [3, 10, 10, 25]}, lambda o: tls.MultiStepLR(o, milestones=[3, 10, 10, 25], gamma=0.1)),
    ("exponential", {"gamma": 0.97}, lambda o: tls.ExponentialLR(o, gamma=0.97)),
    ("sgdr", {"T_0": 10}, lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=10)),
    ("sgdr", {"T_0": 5, "T_mult": 2, "min_lr_ratio": 0.1}, lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.01)),
]


@pytest.mark.parametrize("name, options, reference", TORCH_CASES, ids=[c[0] + str(i) for i, c in enumerate(TORCH_CASES)])
def test_matches_torch(name, options, reference):
    lrs = (0.1, 0.1) if name == "sgdr" and "min_lr_ratio" in options else (0.1, 0.05)  # eta_min is absolute in torch
    ours_opt, ref_opt = make_optimizer(lrs=lrs), make_optimizer(lrs=lrs)
    ours = op.create_scheduler(name, ours_opt, **options)
    assert_close_runs(run(ours, ours_opt, 60), run(reference(ref_opt), ref_opt, 60))


def test_step_closed_form_epoch_argument():
    optimizer = make_optimizer()
    scheduler = op.create_scheduler("step", optimizer, step_size=3, gamma=0.5)
    with pytest.warns(UserWarning):
        scheduler.step(7)
    assert lrs_of(optimizer) == pytest.approx([0.1 * 0.25, 0.05 * 0.25], abs=TOL)


def test_sgdr_warmup_and_peak_decay_formula():
    optimizer = make_optimizer(lrs=(1.0, 0.5))
    scheduler = op.create_scheduler("sgdr", optimizer, T_0=6, T_mult=2, num_warmup_steps=2, peak_decay=0.5, min_lr_ratio=0.1)
    seen = [s[0] for s in run(scheduler, optimizer, 6 + 12 + 3)]
    starts, lengths = [0, 6, 18], [6, 12, 24]
    for step, lr in enumerate(seen):
        cycle = max(i for i, s in enumerate(starts) if s <= step)
        t, length, peak = step - starts[cycle], lengths[cycle], 0.5**cycle
        if t < 2:
            expected = 0.1 + (peak - 0.1) * t / 2
        else:
            expected = 0.1 + (peak - 0.1) * 0.5 * (1 + math.cos(math.pi * (t - 2) / (length - 2)))
        assert lr == pytest.approx(expected, abs=TOL), step


ONECYCLE_CASES = [
    {},
    {"anneal_strategy": "linear"},
    {"three_phase": True, "pct_start": 0.25},
    {"max_lr": 0.3, "div_factor": 10.0, "final_div_factor": 100.0, "base_momentum": 0.8, "max_momentum": 0.9},
]


def _train(optimizer, scheduler, steps, momentum_key):
    """lr, momentum (or beta1) per step and the parameters after ``steps`` real steps."""
    torch.manual_seed(1)
    targets = torch.randn(3, 2)
    seen = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["betas"][0] if momentum_key == "betas" else group["momentum"]))
        optimizer.zero_grad()
        loss = sum(((p - targets) ** 2).sum() for g in optimizer.param_groups for p in g["params"])
        loss.backward()
        optimizer.step()
        scheduler.step()
    return seen, [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("options", ONECYCLE_CASES)
@pytest.mark.parametrize("ours_kind, torch_kind, key", [("adamw", "adamw", "betas"), ("sgd", "sgd", "momentum")])
def test_onecycle_matches_torch_and_cycles_momentum(options, ours_kind, torch_kind, key):
    total = 40
    ours_opt = make_optimizer_op("adamw") if ours_kind == "adamw" else make_optimizer_op("sgd", momentum=0.9)
    ref_opt = make_optimizer("adamw") if torch_kind == "adamw" else make_optimizer("sgd", momentum=0.9)
    ours = op.create_scheduler("onecycle", ours_opt, num_training_steps=total, **options)
    max_lr = options.get("max_lr", [0.1, 0.05])
    torch_options = {k: v for k, v in options.items() if k != "max_lr"}
    reference = tls.OneCycleLR(ref_opt, max_lr=max_lr, total_steps=total, **torch_options)
    ours_seen, ours_params = _train(ours_opt, ours, total, key)
    ref_seen, ref_params = _train(ref_opt, reference, total, key)
    assert_close_runs(ours_seen, ref_seen)
    assert len({round(m, 12) for _, m in ours_seen}) > 5  # momentum really cycles
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode, gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.98)])
def test_cyclic_matches_torch(mode, gamma):
    ours_opt, ref_opt = make_optimizer_op("adamw"), make_optimizer("adamw")
    ours = op.create_scheduler("cyclic", ours_opt, num_training_steps=24, mode=mode, gamma=gamma)
    reference = tls.CyclicLR(ref_opt, base_lr=[0.01, 0.005], max_lr=[0.1, 0.05], step_size_up=12, mode=mode, gamma=gamma)
    ours_seen, _ = _train(ours_opt, ours, 60, "betas")
    ref_seen, _ = _train(ref_opt, reference, 60, "betas")
    assert_close_runs(ours_seen, ref_seen)


def test_plateau_without_warmup_is_reduce_lr_on_plateau():
    metric = lambda step: [1.0, 0.9, 0.9, 0.91, 0.95, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9, 0.9, 0.7][step % 13]  # noqa: E731
    options = dict(factor=0.5, patience=2, cooldown=1, min_lr=0.004, threshold=0.01, threshold_mode="abs")
    ours_opt, ref_opt = make_optimizer(), make_optimizer()
    ours = op.create_scheduler("reduce_lr_on_plateau", ours_opt, **options)
    reference = tls.ReduceLROnPlateau(ref_opt, **options)
    assert isinstance(ours, tls.ReduceLROnPlateau) and type(ours).__name__ == "Plateau"
    assert_close_runs(run(ours, ours_opt, 40, metric), run(reference, ref_opt, 40, metric))


def test_plateau_warmup_follows_optimizer_steps():
    optimizer = make_optimizer(lrs=(1.0, 0.5))
    scheduler = op.create_scheduler("plateau", optimizer, num_warmup_steps=4, patience=0, factor=0.5)
    seen = [lrs_of(optimizer)[0]]
    for step in range(4):  # as the HF Trainer: optimizer steps, no scheduler.step() between evaluations
        optimizer.step()
        seen.append(lrs_of(optimizer)[0])
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    scheduler.step()  # no metric: nothing happens
    scheduler.step(1.0)  # first metric after warmup: the baseline
    scheduler.step(2.0)  # worse, patience 0: halve
    assert lrs_of(optimizer) == pytest.approx([0.5, 0.25])


def test_plateau_ignores_metrics_during_warmup():
    optimizer = make_optimizer(lrs=(1.0, 0.5))
    scheduler = op.create_scheduler("plateau", optimizer, num_warmup_steps=2, patience=0)
    for bad in (1.0, 5.0, 9.0):
        scheduler.step(bad)
    optimizer.step()
    assert lrs_of(optimizer) == pytest.approx([0.5, 0.25])


# ------------------------------------------------------------------ every registered schedule

TOTAL, WARMUP = 30, 4
GENERIC_OPTIONS = {
    "adaptive": {"initial_lr": 0.0},
    "constant": {},
    "constant_with_warmup": {},
    "cosine": {},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_with_restarts": {"num_cycles": 2},
    "cyclic": {"mode": "triangular2"},
    "exponential": {"gamma": 0.9},
    "inverse_sqrt": {},
    "linear": {},
    "loss_trend": {"patience": 2, "beta": 0.5},
    "multistep": {"milestones": [5, 12]},
    "onecycle": {},
    "plateau": {"patience": 1, "factor": 0.5},
    "polynomial": {"power": 2.0, "lr_end": 1e-4},
    "sgdr": {"T_0": 7, "T_mult": 2},
    "step": {"step_size": 6},
    "warmup_cosine": {"min_lr_ratio": 0.1, "warmup_type": "cosine"},
    "warmup_stable_decay": {"num_decay_steps": 10},
}


def generic_loss(step):
    return [1.0, 0.8, 0.7, 0.7, 0.71, 0.72, 0.6, 0.65, 0.66, 0.67][step % 10] + 0.01 * (step // 10)


def build(name, optimizer):
    return create(name, optimizer, TOTAL, WARMUP, **GENERIC_OPTIONS[name])


def drive(name, optimizer, scheduler, steps, start=0):
    """Real optimizer steps (with gradients) and scheduler steps; (lr, momentum) of both groups per step."""
    seen = []
    for step in range(start, start + steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.full_like(p, 0.1 * (step % 3 - 1))
        seen.append([(float(g["lr"]), g.get("momentum")) for g in optimizer.param_groups])
        optimizer.step()
        if name in ("plateau", "loss_trend"):
            scheduler.step(generic_loss(step))
        else:
            scheduler.step()
    return seen


def test_generic_table_covers_every_registered_schedule():
    assert sorted(GENERIC_OPTIONS) == sorted(op.list_schedulers())


@pytest.mark.parametrize("name", sorted(GENERIC_OPTIONS))
def test_state_dict_round_trip_gives_identical_continuation(name):
    optimizer = make_optimizer()
    scheduler = build(name, optimizer)
    assert isinstance(scheduler, tls.LRScheduler)
    first = drive(name, optimizer, scheduler, 13)
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict(),
                "params": [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    rest = drive(name, optimizer, scheduler, TOTAL - 13, start=13)

    fresh = make_optimizer()
    with torch.no_grad():
        for p, value in zip([p for g in fresh.param_groups for p in g["params"]], saved["params"]):
            p.copy_(value)
    fresh_scheduler = build(name, fresh)  # as trainers resume: build, then load optimizer and scheduler state
    fresh.load_state_dict(saved["optimizer"])
    fresh_scheduler.load_state_dict(saved["scheduler"])
    resumed = drive(name, fresh, fresh_scheduler, TOTAL - 13, start=13)
    assert resumed == rest
    assert len(first) == 13


@pytest.mark.parametrize("name", sorted(GENERIC_OPTIONS))
def test_per_group_base_lrs_keep_their_ratio(name):
    optimizer = make_optimizer(lrs=(0.1, 0.025))
    scheduler = build(name, optimizer)
    for step, ((lr0, _), (lr1, _)) in enumerate(drive(name, optimizer, scheduler, TOTAL)):
        assert lr1 == pytest.approx(lr0 / 4, abs=1e-12), f"step {step}"


# ------------------------------------------------------------------ bad arguments

BAD = [
    ("linear", dict(num_training_steps=-5), "num_training_steps.*-5"),
    ("linear", dict(num_training_steps=10, num_warmup_steps=-1), "num_warmup_steps.*-1"),
    ("cosine", dict(num_training_steps=10, num_warmup_steps=11), "num_warmup_steps=11.*num_training_steps=10"),
    ("cosine", dict(num_training_steps=None), "num_training_steps is required"),
    ("warmup_cosine", dict(num_training_steps=10, min_lr=0.5), r"min_lr=0.5.*lr=0.1"),
    ("warmup_cosine", dict(num_training_steps=10, min_lr_ratio=1.5), "min_lr_ratio.*1.5"),
    ("warmup_cosine", dict(num_training_steps=10, min_lr=0.01, min_lr_ratio=0.1), "not both"),
    ("warmup_cosine", dict(num_training_steps=10, warmup_type="sqrt"), "warmup_type='sqrt'"),
    ("polynomial", dict(num_training_steps=10, lr_end=0.2), "lr_end=0.2"),
    ("cosine_with_min_lr", dict(num_training_steps=10), "min_lr or min_lr_rate"),
    ("warmup_stable_decay", dict(num_training_steps=10), "num_decay_steps is required"),
    ("warmup_stable_decay", dict(num_training_steps=10, num_warmup_steps=6, num_decay_steps=6), "larger than num_training_steps=10"),
    ("warmup_stable_decay", dict(num_training_steps=10, num_decay_steps=2, decay_type="exp"), "decay_type='exp'"),
    ("sgdr", dict(T_0=5, num_warmup_steps=5), "num_warmup_steps=5.*T_0=5"),
    ("sgdr", dict(T_0=5, peak_decay=0.0), "peak_decay.*0.0"),
    ("step", dict(step_size=0), "step_size.*0"),
    ("multistep", dict(milestones=[]), "milestones"),
    ("exponential", dict(gamma=1.5), "gamma.*1.5"),
    ("onecycle", dict(num_training_steps=0), "num_training_steps.*0"),
    ("onecycle", dict(num_training_steps=10, pct_start=1.2), "pct_start.*1.2"),
    ("cyclic", dict(base_lr=0.5), r"base_lr=0.5.*max_lr=0.1"),
    ("plateau", dict(factor=1.0), "factor.*1.0"),
    ("plateau", dict(mode="up"), "mode='up'"),
    ("loss_trend", dict(beta=1.0), "beta.*1.0"),
    ("step", dict(num_warmup_steps=3), "no warmup"),
    ("cosine", dict(num_training_steps=10, warmup_steps=3), "no option 'warmup_steps'.*num_warmup_steps"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_clear_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        op.create_scheduler(name, make_optimizer(), **kwargs)


def test_onecycle_stepped_past_the_end_raises_like_torch():
    optimizer = make_optimizer()
    scheduler = op.create_scheduler("onecycle", optimizer, num_training_steps=3)
    run(scheduler, optimizer, 3)
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        scheduler.step()


# ------------------------------------------------------------------ adaptive schedules


class RelativeStepSGD(torch.optim.SGD):
    """SGD that counts steps and reports an internal lr like MaxFactor's ``_get_lr``."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
        return super().step(closure)

    def _get_lr(self, group, state):
        return torch.tensor(min(0.02, 1.0 / state["step"] ** 0.5)) * group["scale"]


def test_adaptive_follows_the_optimizer_reported_lr():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    optimizer = RelativeStepSGD([{"params": [params[0]], "scale": 1.0}, {"params": [params[1]], "scale": 0.5}], lr=0.1)
    scheduler = op.create_scheduler("adaptive", optimizer, num_warmup_steps=4, initial_lr=0.05)
    seen = [lrs_of(optimizer)]
    for step in range(1, 10):
        for p in params:
            p.grad = torch.ones(2)
        optimizer.step()
        optimizer.zero_grad()  # gradients gone at scheduler.step(): the seed would fall back to base lrs here
        scheduler.step()
        seen.append(lrs_of(optimizer))
    assert seen[0] == pytest.approx([0.05 * 0.001, 0.05 * 0.001])  # no optimizer state yet: initial_lr, warmup floor
    for step in range(1, 10):
        warm = step / 4 if step < 4 else 1.0
        internal = min(0.02, 1.0 / step**0.5)
        assert seen[step] == pytest.approx([internal * warm, internal * 0.5 * warm], abs=TOL), step


def test_adaptive_accepts_the_seed_signature_and_falls_back_to_base_lrs():
    optimizer = make_optimizer(lrs=(0.2, 0.1))
    scheduler = op.schedulers.AdaptiveSchedule(optimizer=optimizer, initial_lr=0.0, warmup_steps=5, decay_factor=0.1)
    seen = [s[0] for s in run(scheduler, optimizer, 7)]
    assert seen == pytest.approx([0.2 * max(0.001, s / 5) if s < 5 else 0.2 for s in range(8)], abs=TOL)


def loss_trend_reference(losses, base_lr, warmup, beta, patience, factor, threshold, cooldown, min_ratio):
    """The documented loss_trend rule, written out independently."""
    lrs, scale, ema, n, best, bad, cool = [], 1.0, 0.0, 0, None, 0, 0
    for step, loss in enumerate(losses):
        lrs.append(base_lr * (step / warmup if step < warmup else 1.0) * scale)
        n += 1
        ema = beta * ema + (1 - beta) * loss
        current = ema / (1 - beta**n)
        if step + 1 < warmup:
            continue
        if best is None or current < best * (1 - threshold):
            best, bad = current, 0
        else:
            bad += 1
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > patience:
            scale, cool, bad = max(scale * factor, min_ratio), cooldown, 0
    return lrs


def test_loss_trend_reduces_when_the_ema_stops_falling():
    losses = [2.0 * 0.97**s for s in range(60)] + [0.35 + 0.02 * ((s * 7) % 5) for s in range(140)]
    options = dict(beta=0.9, patience=15, factor=0.5, threshold=1e-3, cooldown=5, min_lr_ratio=0.1)
    optimizer = make_optimizer(lrs=(1.0, 0.5))
    scheduler = op.create_scheduler("loss_trend", optimizer, num_warmup_steps=10, **options)
    seen = []
    for loss in losses:
        seen.append(lrs_of(optimizer)[0])
        optimizer.step()
        scheduler.observe(torch.tensor(loss))  # a trainer's plain step() after observe() works too
        scheduler.step()
    expected = loss_trend_reference(losses, 1.0, 10, **{k: v for k, v in options.items() if k != "min_lr_ratio"},
                                    min_ratio=0.1)
    assert seen == pytest.approx(expected, abs=TOL)
    assert max(seen[:60]) == 1.0 and seen[-1] < 0.5  # no reduction while falling, reductions on the plateau
    assert min(seen[10:]) >= 0.1 - TOL


# ------------------------------------------------------------------ plot and options


def test_plot_schedule_writes_a_png(tmp_path):
    import matplotlib.image

    out = plot_schedule("warmup_cosine", 50, {"num_warmup_steps": 5}, str(tmp_path / "lr.png"))
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (400, 800)
    out = plot_schedule("onecycle", 50, {}, str(tmp_path / "onecycle.png"))
    assert matplotlib.image.imread(out).shape[:2] == (700, 800)  # a second panel: the momentum


def test_schedule_values_match_the_schedule():
    lrs, momentums = schedule_values("linear", 10, {"num_warmup_steps": 2}, lr=2.0)
    assert lrs == pytest.approx([0.0, 1.0, 2.0] + [2.0 * (10 - s) / 8 for s in range(3, 10)])
    assert momentums is None
    lrs, momentums = schedule_values("onecycle", 20, {})
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    reference = tls.OneCycleLR(reference_opt, max_lr=1.0, total_steps=20)
    expected = []
    for _ in range(20):
        expected.append((reference_opt.param_groups[0]["lr"], reference_opt.param_groups[0]["momentum"]))
        reference_opt.step()
        reference.step()
    assert lrs == pytest.approx([lr for lr, _ in expected], abs=TOL)
    assert momentums == pytest.approx([m for _, m in expected], abs=TOL)


def test_parse_option_pairs_types_values_and_names_bad_ones():
    spec = op.get_scheduler_spec("warmup_cosine")
    assert parse_option_pairs(["num_warmup_steps=10", "warmup_type=cosine", "min_lr=1e-5"], spec) == {
        "num_warmup_steps": 10, "warmup_type": "cosine", "min_lr": 1e-5}
    assert parse_option_pairs(["milestones=[10, 20]"], "multistep") == {"milestones": [10, 20]}
    with pytest.raises(ValueError, match="did you mean 'num_cycles'"):
        parse_option_pairs(["num_cycle=2"], spec)
    with pytest.raises(ValueError, match="key=value"):
        parse_option_pairs(["num_cycles"], spec)
    with pytest.raises(ValueError, match="num_warmup_steps.*ten"):
        parse_option_pairs(["num_warmup_steps=ten"], spec)


def test_schedulers_package_imports_torch_only():
    code = ("import sys, optim_plugins.schedulers, optim_plugins.schedulers.plot; "
            "print(sorted(m for m in ('matplotlib', 'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
