"""Test-database entries of family II part A: Sophia, Prodigy, schedule-free, ADOPT, AdEMAMix, FAM.

References are the published packages (sophia-opt, prodigyopt, schedulefree,
pytorch-optimizer) with their option names mapped here, and for FAM the MaxFactor seed's
``frequency_adaptive_momentum`` copied below. Sophia-H needs ``create_graph=True``
backward passes, which the generic suite's closures do not make: its checks are in
``test_family2a.py``.
"""
from __future__ import annotations

import math

import torch

from optim_db import OptimInfo, grid


class Maximizing:
    """A reference without ``maximize``: step on the negated gradient (what maximize means)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # zero_grad, add_param_group, param_groups, state ...
        return getattr(self.inner, name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.neg_()
        self.inner.step()
        return loss


def _maximizing(make):
    def factory(params, options):
        options = dict(options)
        maximize = options.pop("maximize", False)
        optimizer = make(params, options)
        return Maximizing(optimizer) if maximize else optimizer
    return factory


# ----------------------------------------------------------------------------- Sophia-G


def sophiag_reference(params, options):
    from sophia_opt import SophiaG

    options = {k: v for k, v in options.items() if k not in ("foreach", "hessian_interval")}
    bs = options.pop("bs", 5120)
    assert options.pop("eps", 1e-15) == 1e-15, "sophia-opt's eps is fixed at 1e-15"

    class Reference(SophiaG):
        def step(self, closure=None):  # sophia-opt takes bs per step
            return super().step(closure, bs=bs)

    return Reference(params, **options)


# ----------------------------------------------------------------------------- Prodigy


@_maximizing
def prodigy_reference(params, options):
    from prodigyopt import Prodigy

    options.pop("foreach", None)
    return Prodigy(params, **options)


# ----------------------------------------------------------------------------- schedule-free


def _schedulefree(cls_name):
    @_maximizing
    def make(params, options):
        import schedulefree

        optimizer = getattr(schedulefree, cls_name)(params, **dict({"foreach": False}, **options))
        optimizer.train()  # ours starts in train mode (x = y = z at the start)
        return optimizer
    return make


# ----------------------------------------------------------------------------- ADOPT, AdEMAMix


def adopt_reference(params, options):
    from pytorch_optimizer import ADOPT

    options = dict(options)
    exponent = options.pop("clip_exponent", 0.25)
    options["weight_decouple"] = options.pop("decoupled_weight_decay", False)
    options.setdefault("foreach", False)
    clip = None if exponent is None else (lambda step: math.pow(step, exponent))
    return ADOPT(params, clip_lambda=clip, **options)


def ademamix_reference(params, options):
    from pytorch_optimizer import AdEMAMix

    options = dict(options)
    t_alpha, t_beta3 = options.pop("t_alpha", None), options.pop("t_beta3", None)
    assert t_alpha == t_beta3, "pytorch_optimizer's AdEMAMix has one warmup length for alpha and beta3"
    options.setdefault("foreach", False)
    options.setdefault("weight_decay", 1e-2)  # ours (bitsandbytes', transformers') default; theirs is 0
    return AdEMAMix(params, weight_decouple=True, t_alpha_beta3=t_alpha, **options)


# ----------------------------------------------------------------------------- FAM: the seed's code


def frequency_adaptive_momentum(grad, state, alpha=0.9, beta=0.999):
    """The MaxFactor seed's function (seeds/003), copied; one fix marked FIX."""
    if "freq_history" not in state:
        state["freq_history"] = {}
        state["step_freq"] = 0
    state["step_freq"] += 1
    if grad.dim() > 1 and min(grad.shape) > 4:
        with torch.no_grad():
            if grad.numel() > 10000:
                row_indices = torch.randperm(grad.size(0))[:min(grad.size(0), 100)]
                col_indices = torch.randperm(grad.size(1))[:min(grad.size(1), 100)]
                grad_sample = grad[row_indices][:, col_indices].flatten()
            else:
                grad_sample = grad.flatten()
            freq_repr = torch.fft.rfft(grad_sample.float())
            freq_power = torch.abs(freq_repr)
            if freq_power.sum() > 0:
                freq_power = freq_power / freq_power.sum()
            n_bands = 10
            band_size = freq_power.shape[0] // n_bands
            band_powers = [freq_power[i * band_size:(i + 1) * band_size].sum().item() for i in range(n_bands)]
            for i, power in enumerate(band_powers):
                if f"band_{i}" not in state["freq_history"]:
                    state["freq_history"][f"band_{i}"] = power
                else:
                    state["freq_history"][f"band_{i}"] = beta * state["freq_history"][f"band_{i}"] + (1 - beta) * power
            dampening_factors = []
            for i in range(n_bands):
                base_dampening = i / n_bands
                recent_activity = state["freq_history"][f"band_{i}"]
                adaptive_dampening = base_dampening * (1 - recent_activity * 5)
                dampening_factors.append(max(0, min(0.9, adaptive_dampening)))
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            momentum_buffer = state["momentum_buffer"].flatten()
            freq_momentum = torch.fft.rfft(momentum_buffer[:grad_sample.shape[0]].float())
            for i in range(n_bands):
                start_idx = i * band_size
                end_idx = (i + 1) * band_size
                dampening = dampening_factors[i]
                momentum_factor = alpha * (1 - dampening)
                grad_factor = 1.0 + dampening
                if start_idx < freq_momentum.shape[0]:
                    actual_end = min(end_idx, freq_momentum.shape[0])
                    freq_momentum[start_idx:actual_end] = (
                        momentum_factor * freq_momentum[start_idx:actual_end] + grad_factor * freq_repr[start_idx:actual_end]
                    )
            new_grad_sample = torch.fft.irfft(freq_momentum, n=grad_sample.shape[0])  # noqa: F841 (unused in the seed)
            state["momentum_buffer"] = alpha * state["momentum_buffer"] + (1 - alpha) * grad
            blend_factor = min(0.8, state["step_freq"] / 1000)  # noqa: F841 (unused in the seed)
            scaling_mask = torch.ones_like(grad)
            if state["step_freq"] > 100:
                row_var = grad.var(dim=1, keepdim=True)
                col_var = grad.var(dim=0, keepdim=True)
                row_var = row_var / (row_var.mean() + 1e-8)
                col_var = col_var / (col_var.mean() + 1e-8)
                scaling_mask = 1.0 + 0.5 * (
                    # FIX: the seed has `@ torch.sigmoid(...).T`, an (n,1) @ (m,1) product that fails
                    # for every matrix with m > 1; the (n,1) @ (1,m) outer product is what fits grad.
                    torch.sigmoid(3 * (row_var - 1.5)) @ torch.sigmoid(3 * (col_var - 1.5))
                )
            grad = grad * scaling_mask
            return grad
    else:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        state["momentum_buffer"] = alpha * state["momentum_buffer"] + (1 - alpha) * grad
        return state["momentum_buffer"]


class SeedFAM(torch.optim.Optimizer):
    """p *= 1 - lr * wd (MaxFactor's decay), then p -= lr * frequency_adaptive_momentum(g)."""

    def __init__(self, params, lr=0.05, alpha=0.9, beta=0.999, weight_decay=0.0, maximize=False, foreach=None):
        super().__init__(params, dict(lr=lr, alpha=alpha, beta=beta, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                update = frequency_adaptive_momentum(grad, self.state[p], group["alpha"], group["beta"])
                p.add_(update, alpha=-group["lr"])
        return loss


def fam_reference(params, options):
    return SeedFAM(params, **options)


# ----------------------------------------------------------------------------- entries

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "sophiag",
        # h = 0 until update_hessian() is called, which the generic loop does not: these runs check
        # the clipped momentum step and the decay; test_family2a.py checks the Hessian path.
        grid(lr=[0.01], weight_decay=[0.0, 0.1], maximize=[False, True], rho=[0.04], bs=[5120])
        + [dict(lr=0.01, betas=(0.9, 0.95), rho=0.1, bs=10, hessian_interval=3)],
        reference=sophiag_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.99)), "betas[0]"), (dict(rho=-0.1), "rho"),
                 (dict(weight_decay=-1.0), "weight_decay"), (dict(bs=0), "bs"), (dict(eps=-1.0), "eps"),
                 (dict(hessian_interval=0), "hessian_interval")],
        recommended=dict(lr=2e-3, weight_decay=0.0),
    ),
    OptimInfo(
        "sophiah",
        [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, rho=0.05, update_period=3, distribution="rademacher")],
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.5)), "betas[1]"), (dict(rho=0.0), "rho"),
                 (dict(eps=-1.0), "eps"), (dict(update_period=0), "update_period"),
                 (dict(distribution="uniform"), "distribution")],
        recommended=dict(lr=0.005),  # used by test_family2a.py's create_graph convergence check
        supports_complex=False,
        not_applicable={"test_zero_gradients": "gradients set by hand carry no graph for the Hessian-vector product"},
    ),
    OptimInfo(
        "prodigy",
        grid(weight_decay=[0.0, 0.1], decouple=[True, False])
        + [dict(use_bias_correction=True, safeguard_warmup=True, d_coef=0.5, growth_rate=1.02, weight_decay=0.1),
           dict(beta3=0.99, maximize=True, use_bias_correction=True)]
        + [dict(lr=0.5, betas=(0.0, 0.99), d0=1e-5, eps=1e-6, slice_p=2, weight_decay=0.01)],
        reference=prodigy_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas[1]"), (dict(beta3=1.5), "beta3"),
                 (dict(d0=0.0), "d0"), (dict(d_coef=-1.0), "d_coef"), (dict(growth_rate=0.5), "growth_rate"),
                 (dict(slice_p=0), "slice_p"), (dict(weight_decay=-0.1), "weight_decay"), (dict(eps=-1.0), "eps")],
        recommended=dict(lr=1.0, weight_decay=0.0),
        supports_complex=False,
        not_applicable={"test_low_precision_without_compensation_matches_torch":
                        "in fp16 states d0^2 (1 - b2) g^2 underflows and d eps = 1e-14 rounds to 0, so prodigyopt and "
                        "ours both turn every parameter into NaN (NaN != NaN); test_family2a.py checks bf16 bitwise",
                        "test_add_param_group_mid_training_matches_reference":
                        "Prodigy's step size d is one estimate shared by all groups: prodigyopt and ours refuse a group "
                        "whose lr differs from the others (unless 0), and the test adds one at half the lr "
                        "(test_family2a.py adds a group at the same lr against prodigyopt)"},
    ),
    OptimInfo(
        "schedulefree_adamw",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], warmup_steps=[0, 20], maximize=[False, True])
        + [dict(lr=0.01, betas=(0.95, 0.99), eps=1e-6, r=1.0, weight_lr_power=1.0, warmup_steps=5)],
        reference=_schedulefree("AdamWScheduleFree"),
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(0.0, 0.999)), "betas[0]"), (dict(betas=(0.9, 1.0)), "betas[1]"),
                 (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
                 (dict(warmup_steps=-1), "warmup_steps"), (dict(r=-1.0), "r"),
                 (dict(weight_lr_power=-1.0), "weight_lr_power")],
        recommended=dict(lr=3e-3, warmup_steps=30),
        supports_complex=False,  # schedulefree squares complex gradients without conj (g*g, not |g|^2)
    ),
    OptimInfo(
        "schedulefree_sgd",
        grid(lr=[0.05], weight_decay=[0.0, 0.1], warmup_steps=[0, 20], maximize=[False, True])
        + [dict(lr=0.05, momentum=0.5, r=1.0, weight_lr_power=1.0, warmup_steps=5)],
        reference=_schedulefree("SGDScheduleFree"),
        invalid=[(dict(lr=-1.0), "lr"), (dict(momentum=0.0), "momentum"), (dict(momentum=1.0), "momentum"),
                 (dict(weight_decay=-0.1), "weight_decay"), (dict(warmup_steps=1.5), "warmup_steps"),
                 (dict(r=-1.0), "r"), (dict(weight_lr_power=-1.0), "weight_lr_power")],
        recommended=dict(lr=0.5, warmup_steps=30),
    ),
    OptimInfo(
        "adopt",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True])
        + [dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4, clip_exponent=None),
           dict(lr=0.01, clip_exponent=0.1, weight_decay=0.1)],
        reference=adopt_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9999)), "betas[0]"), (dict(eps=-1.0), "eps"),
                 (dict(weight_decay=-0.1), "weight_decay"), (dict(clip_exponent=-0.25), "clip_exponent")],
        recommended=dict(lr=3e-3),
    ),
    OptimInfo(
        "ademamix",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], maximize=[False, True])
        + grid(lr=[0.01], alpha=[2.0], betas=[(0.9, 0.99, 0.999)], t_alpha=[50], t_beta3=[50], eps=[1e-6]),
        reference=ademamix_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 0.999)), "betas"), (dict(betas=(0.9, 0.999, 1.0)), "betas[2]"),
                 (dict(alpha=-1.0), "alpha"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
                 (dict(t_alpha=-5), "t_alpha"), (dict(t_beta3=-5), "t_beta3")],
        recommended=dict(lr=2e-3, t_alpha=300, t_beta3=300),
        supports_complex=False,  # pytorch_optimizer's AdEMAMix refuses complex parameters
    ),
    OptimInfo(
        "fam",
        grid(lr=[0.05], weight_decay=[0.0, 0.1], maximize=[False, True])
        + [dict(lr=0.05, alpha=0.5, beta=0.9)],
        reference=fam_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(alpha=1.0), "alpha"), (dict(beta=-0.1), "beta"),
                 (dict(weight_decay=-0.1), "weight_decay")],
        recommended=dict(lr=0.1),
        supports_complex=False,
    ),
]
