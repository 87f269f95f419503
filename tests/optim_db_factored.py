"""Test-database entries of the factored and trust-ratio optimizers:
adafactor, came, maxfactor (factored second moments), lamb, lars (trust ratios).

References: transformers' Adafactor, came-pytorch's CAME, pytorch_optimizer's Lamb and
LARS (where their options cover ours), the MaxFactor seed's code (copied below, the one
aliasing fix marked), and the LAMB/LARS paper equations written as plain loops for the
options the packages lack (bias-corrected LAMB, trust-ratio clamps, no 1-D exclusion).
"""
from __future__ import annotations

import torch

from optim_db import OptimInfo, grid

# ----------------------------------------------------------------------------- wrappers


def _torch_contract(cls: type) -> type:
    """``cls`` with torch.optim's closure contract (closure under enable_grad: transformers'
    Adafactor and came-pytorch call it under no_grad) and a ``maximize`` flag (negated gradients)."""

    class Reference(cls):
        def __init__(self, params, maximize: bool = False, **options):
            self._maximize = maximize
            super().__init__(params, **options)

        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if self._maximize:
                for g in grads:
                    g.neg_()
            super().step()
            if self._maximize:
                for g in grads:
                    g.neg_()
            return loss

    Reference.__name__ = f"{cls.__name__}Reference"
    return Reference


def _drop(options: dict, *keys: str) -> dict:
    return {k: v for k, v in options.items() if k not in keys}


def adafactor_reference(params, options):
    from transformers.optimization import Adafactor
    return _torch_contract(Adafactor)(params, **_drop(options, "foreach"))


def came_reference(params, options):
    from came_pytorch import CAME
    return _torch_contract(CAME)(params, **_drop(options, "foreach"))


# ----------------------------------------------------------------------------- MaxFactor seed


class SeedMaxFactor(torch.optim.Optimizer):
    """The MaxFactor seed's optimizer (../shared/seeds/003), its step copied as written, except:
    FIX marks the one change (the seed's in-place ``rsqrt_`` on ``v`` overwrote the 1-D
    state with the update); the seed's bf16 handling is left out (no bf16 comparison)."""

    def __init__(self, params, lr=0.01, beta2_decay=-0.8, eps=(1e-10, 1e-3), d=1.0,
                 weight_decay=0.01, gamma=0.99, eps_rms=1e-8, maximize=False):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        gamma=gamma, eps_rms=eps_rms, maximize=maximize)
        super().__init__(params=params, defaults=defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params_with_grad, grads, row_vars, col_vars, v, state_steps = [], [], [], [], [], []
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    if p.grad.dim() > 1:
                        row_shape, col_shape = list(p.grad.shape), list(p.grad.shape)
                        row_shape[-1], col_shape[-2] = 1, 1
                        state["row_var"], state["col_var"] = p.grad.new_zeros(row_shape), p.grad.new_zeros(col_shape)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                row_vars.append(state.get("row_var", None))
                col_vars.append(state.get("col_var", None))
                v.append(state["v"])
                state_steps.append(state["step"])
                params_with_grad.append(p)
                grads.append(grad)
            for i, param in enumerate(params_with_grad):
                grad = grads[i]
                if group["maximize"]:
                    grad = -grad
                step_t, row_var, col_var, vi = state_steps[i], row_vars[i], col_vars[i], v[i]
                if eps1 is None:
                    eps1 = torch.finfo(param.dtype).eps
                step_t += 1
                step_float = step_t.item()
                one_minus_beta2_t = step_float ** group["beta2_decay"]
                rho_t = min(group["lr"], 1 / (step_float ** 0.5))
                alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t
                if group["weight_decay"] != 0:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                if grad.dim() > 1:
                    row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1) + 1e-8)
                    row_var.lerp_(row_mean, one_minus_beta2_t)
                    col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2) + 1e-8)
                    col_var.lerp_(col_mean, one_minus_beta2_t)
                    var_estimate = row_var @ col_var
                    max_row_var = row_var.max(dim=-2, keepdim=True)[0]
                    var_estimate.div_(max_row_var.clamp_(min=eps1))
                else:
                    vi.mul_(group["gamma"]).add_(grad ** 2, alpha=1 - group["gamma"])
                    var_estimate = vi.clone()  # FIX: the seed has `= vi`, then rsqrt_() wrote the update into v
                update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
                update = update.div_(torch.norm(update, float("inf")).clamp_(min=eps1))
                denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * group["d"]))
                param.add_(-alpha / denom * update.sign() * update.abs().max(dim=-1, keepdim=True)[0])
        return loss


def maxfactor_reference(params, options):
    return SeedMaxFactor(params, **_drop(options, "foreach"))


# ----------------------------------------------------------------------------- LAMB / LARS papers


class PaperLamb(torch.optim.Optimizer):
    """LAMB, You et al. 2020, Algorithm 2, per tensor, with our options' variants spelled out
    (bias correction as pytorch_optimizer applies it: lr / (1 - beta1^t))."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, decoupled_weight_decay=True,
                 bias_correction=True, exclude_1d=False, max_weight_norm=10.0, max_trust_ratio=None, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, decoupled=decoupled_weight_decay,
                                      bc=bias_correction, exclude_1d=exclude_1d, phi_max=max_weight_norm,
                                      ratio_max=max_trust_ratio, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps, wd = group["eps"], group["wd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                s = self.state[p]
                if not s:
                    s["t"], s["m"], s["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                s["t"] += 1
                t, lr = s["t"], group["lr"]
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                r = s["m"] / (s["v"].sqrt() + eps)
                if group["bc"]:  # as pytorch_optimizer: the first moment's correction on the step size
                    lr = group["lr"] / (1 - b1**t)
                if group["exclude_1d"] and p.dim() <= 1:
                    p -= lr * r
                    continue
                if group["decoupled"]:
                    p *= 1 - group["lr"] * wd
                else:
                    r = r + wd * p
                phi = p.norm() if group["phi_max"] is None else p.norm().clamp(max=group["phi_max"])
                ratio = phi / (r.norm() + eps) if phi > 0 and r.norm() > 0 else torch.tensor(1.0)
                if group["ratio_max"] is not None:
                    ratio = ratio.clamp(max=group["ratio_max"])
                p -= lr * ratio * r
        return loss


class PaperLars(torch.optim.Optimizer):
    """LARS, You, Gitman & Ginsburg 2017, Algorithm 1, per tensor, with our options' variants."""

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=1e-3, exclude_1d=True, max_trust_ratio=None, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, wd=weight_decay, nesterov=nesterov,
                                      eta=trust_coefficient, exclude_1d=exclude_1d, ratio_max=max_trust_ratio,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, wd = group["momentum"], group["wd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                if group["exclude_1d"] and p.dim() <= 1:
                    d = g
                else:
                    w_norm, g_norm = p.norm(), g.norm()
                    denom = g_norm + wd * w_norm
                    local_lr = group["eta"] * w_norm / denom if w_norm > 0 and denom > 0 else torch.tensor(1.0)
                    if group["ratio_max"] is not None:
                        local_lr = local_lr.clamp(max=group["ratio_max"])
                    d = local_lr * (g + wd * p)
                if mu > 0:
                    s = self.state[p]
                    s["buf"] = mu * s.get("buf", torch.zeros_like(p)) + (1 - group["dampening"]) * d
                    d = d + mu * s["buf"] if group["nesterov"] else s["buf"]
                p -= group["lr"] * d
        return loss


def lamb_reference(params, options):
    """pytorch_optimizer's Lamb where it has our options (all but the ratio clamp), else the paper."""
    options = _drop(options, "foreach")
    if options.get("max_trust_ratio") is not None:
        return PaperLamb(params, **options)
    from pytorch_optimizer import Lamb

    params = list(params)
    wd = options.get("weight_decay", 0.0)
    if options.get("exclude_1d"):  # its adam=True (trust ratio 1), without decay, for the 0/1-dim tensors
        params = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() <= 1], "adam": True, "weight_decay": 0.0}]
    ref = Lamb(params, lr=options.get("lr", 1e-3), betas=options.get("betas", (0.9, 0.999)), eps=options.get("eps", 1e-6),
               weight_decay=wd, weight_decouple=options.get("decoupled_weight_decay", True),
               adam_debias=not options.get("bias_correction", True), maximize=options.get("maximize", False), foreach=False)
    max_weight_norm = options.get("max_weight_norm", 10.0)
    ref.clamp = float("inf") if max_weight_norm is None else max_weight_norm  # its class attribute phi
    return ref


def lars_reference(params, options):
    """pytorch_optimizer's LARS where it has our options (1-D exclusion always on, no ratio clamp), else the paper."""
    options = _drop(options, "foreach")
    if not options.get("exclude_1d", True) or options.get("max_trust_ratio") is not None:
        return PaperLars(params, **options)
    from pytorch_optimizer import LARS

    return LARS(params, foreach=False, **_drop(options, "exclude_1d"))


# ----------------------------------------------------------------------------- entries

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "adafactor",
        [dict(lr=1e-2, relative_step=False, scale_parameter=False)]
        + grid(warmup_init=[False, True], scale_parameter=[True], beta1=[None, 0.9])[::3]  # (off, None), (on, 0.9)
        + [dict(scale_parameter=False),
           dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5, decay_rate=-0.5,
                eps=(1e-30, 1e-2)),
           dict(weight_decay=0.1, maximize=True)],
        reference=adafactor_reference,
        invalid=[(dict(lr=1e-3), "lr"), (dict(lr=-1.0, relative_step=False), "lr"),
                 (dict(relative_step=False), "lr"), (dict(lr=1e-3, relative_step=False, warmup_init=True), "warmup_init"),
                 (dict(eps=(1e-30,)), "eps"), (dict(eps=(-1.0, 1e-3)), "eps[0]"), (dict(clip_threshold=0.0), "clip_threshold"),
                 (dict(decay_rate=0.5), "decay_rate"), (dict(beta1=1.0), "beta1"), (dict(weight_decay=-0.1), "weight_decay")],
        recommended=dict(lr=1e-2, relative_step=False, scale_parameter=False),
        supports_complex=False,
    ),
    OptimInfo(
        "came",
        [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1),
         dict(lr=1e-2, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-10), clip_threshold=0.5, maximize=True)],
        reference=came_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 0.999)), "betas"), (dict(betas=(0.9, 0.999, 1.0)), "betas[2]"),
                 (dict(eps=(1e-30, -1.0)), "eps[1]"), (dict(clip_threshold=-1.0), "clip_threshold"),
                 (dict(weight_decay=-0.1), "weight_decay")],
        recommended=dict(lr=2e-3, weight_decay=0.01),
        supports_complex=False,
    ),
    OptimInfo(
        "maxfactor",
        [dict(lr=0.01)]
        + [dict(lr=0.05, weight_decay=0.0), dict(lr=0.05, weight_decay=0.1, d=0.5)]
        + [dict(lr=0.01, beta2_decay=-0.5, eps=(None, 1e-2), gamma=0.9, eps_rms=1e-6, maximize=True)],
        reference=maxfactor_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(beta2_decay=0.5), "beta2_decay"), (dict(eps=(1e-10, -1.0)), "eps[1]"),
                 (dict(eps=1e-3), "eps"), (dict(d=0.0), "d"), (dict(gamma=1.0), "gamma"),
                 (dict(weight_decay=-0.1), "weight_decay"), (dict(eps_rms=-1.0), "eps_rms")],
        recommended=dict(lr=0.01),
        supports_complex=False,
        not_applicable={
            "test_low_precision_without_compensation_matches_torch":
                "the seed keeps row/col states in fp32, v in the parameter's dtype and writes a bf16 parameter "
                "twice per step; no state_dtype/compensation setting is that mix (bf16 learning is still tested)",
        },
    ),
    OptimInfo(
        "lamb",
        [dict(lr=1e-2)]
        + grid(lr=[1e-2], bias_correction=[True, False], weight_decay=[0.1], decoupled_weight_decay=[True, False])
        + [dict(lr=1e-2, bias_correction=False, exclude_1d=True, weight_decay=0.1, max_weight_norm=1.0, maximize=True),
           # max_trust_ratio: against PaperLamb in test_factored.py (10 steps): LAMB's fixed-norm step turns
           # a last-bit difference of another op order into a visible one over 200 steps near the optimum
           dict(lr=1e-2, exclude_1d=True, weight_decay=0.1, max_weight_norm=None, eps=1e-8, betas=(0.8, 0.99))],
        reference=lamb_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "betas[0]"), (dict(eps=-1.0), "eps"),
                 (dict(weight_decay=-0.1), "weight_decay"), (dict(max_weight_norm=0.0), "max_weight_norm"),
                 (dict(max_trust_ratio=-1.0), "max_trust_ratio")],
        recommended=dict(lr=1e-2, weight_decay=0.01),
        supports_complex=False,
    ),
    OptimInfo(
        "lars",
        # lr 0.1: 0/1-dim tensors take plain SGD steps, which diverge on the suite's objective at lr 1
        [dict(lr=0.1)]
        + [dict(lr=0.1, momentum=0.0, weight_decay=0.1)]
        + [dict(lr=0.1, nesterov=True, weight_decay=0.1, maximize=True),
           dict(lr=0.1, dampening=0.5, exclude_1d=False, weight_decay=0.1, trust_coefficient=0.01),
           dict(lr=0.1, trust_coefficient=0.1, max_trust_ratio=0.002, weight_decay=0.1)],
        reference=lars_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(dampening=-0.1), "dampening"),
                 (dict(weight_decay=-0.1), "weight_decay"), (dict(trust_coefficient=0.0), "trust_coefficient"),
                 (dict(max_trust_ratio=0.0), "max_trust_ratio"), (dict(momentum=0.0, nesterov=True), "nesterov")],
        recommended=dict(lr=0.1, momentum=0.9, trust_coefficient=0.1, weight_decay=1e-4),
        supports_complex=False,
    ),
]
