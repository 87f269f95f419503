"""Test-database entries of the low-bit family (issue 7 family II part B): 8-bit optimizers and Muon;
4-bit Adam/AdamW (issue 13) against the paper's quantiser written out here (``FourBitReference``).

8-bit optimizers are compared with bitsandbytes' own 8-bit optimizers on CPU. The generic
tests use tensors of 3 to 15 elements, so the option sets lower ``min_8bit_size`` to 1:
every state there is 8-bit. Tolerance against bitsandbytes (``RTOL_8BIT``): both keep the
same update and the same 8-bit format, but bitsandbytes' CPU quantiser does not always
pick the nearest code (about 11% of codes differ by one step; ours is round-to-nearest,
equal to bitsandbytes' exact ``argmin`` path, see tests/test_lowbit.py), so the two
trajectories differ by quantisation noise. Measured on the generic objective: at most
1.1e-2 of the parameter scale around step 50 and 1e-3 at step 200; 200 steps (the
default) are kept and the tolerance is 3%.
"""
from __future__ import annotations

import torch

from optim_db import ADAM_INVALID, OptimInfo, grid

RTOL_8BIT = 3e-2
RTOL_4BIT = 1e-5  # same quantiser and update as FourBitReference; fp32 rounding of the update may differ


def bnb_reference(name: str):
    """bitsandbytes' optimizer for ``name``, fed the gradient ours uses (negated for maximize, + wd p for L2).

    bitsandbytes' 8-bit Adam always decouples weight decay; ``adam8bit``'s default L2 is
    applied here to the gradient before its step, as our machinery does.
    """

    def make(params, options):
        import bitsandbytes as bnb

        cls = {"adam8bit": bnb.optim.Adam8bit, "adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit}[name]
        options = {k: v for k, v in options.items() if k not in ("foreach", "backend")}
        maximize = options.pop("maximize", False)
        l2 = 0.0
        if name == "adam8bit" and not options.pop("decoupled_weight_decay", False):
            l2 = options.pop("weight_decay", 0.0)
        opt = cls(params, **options)
        inner_step = opt.step

        def step(closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad():
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            if maximize:
                                p.grad.neg_()
                            if l2:
                                p.grad.add_(p, alpha=l2)
            inner_step()
            return loss

        opt.step = step
        return opt

    return make


# ----------------------------------------------------------------------------- 4-bit, written from the paper


def de_map() -> torch.Tensor:
    """Li et al. (2023) / lpmm's signed dynamic-exponent 4-bit map (create_dynamic_map(True, 3, 4)):
    0, 1, and +-10^(i-2) times the midpoints of linspace(0.1, 1, 2^i + 1) for i = 0, 1, 2."""
    values = [0.0, 1.0]
    for i in range(3):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2 * 10 ** (i - 2)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values))


LINEAR_MAP = torch.arange(1, 17, dtype=torch.float32) / 16  # lpmm's "power-1": linear, zero excluded


def nearest(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The map value nearest to each element of x (argmin of the distance; ties to the lower)."""
    return qmap[(x.unsqueeze(-1) - qmap).abs().argmin(-1)]


def block_quantized(x: torch.Tensor, qmap: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x after 4-bit block-wise quantisation: absmax per block of 128 consecutive elements."""
    flat = torch.nn.functional.pad(x.reshape(-1), (0, (-x.numel()) % block)).view(-1, block)
    absmax = flat.abs().amax(1, keepdim=True)
    scaled = flat / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (nearest(scaled, qmap) * absmax).view(-1)[: x.numel()].view(x.shape)


def rank1_quantized(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """x after rank-1 normalised 4-bit quantisation: element scale = min over dims of the max of its slice."""
    scale = None
    for d in range(x.dim()):
        others = [k for k in range(x.dim()) if k != d]
        maximum = x.abs().amax(dim=others, keepdim=True)
        scale = maximum if scale is None else torch.minimum(scale, maximum)
    scale = scale.expand(x.shape)
    scaled = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    return nearest(scaled, qmap) * scale


class FourBitReference(torch.optim.Optimizer):
    """Adam/AdamW with 4-bit states as Li et al. (2023) write it (lpmm's single-tensor AdamW): per step,
    the stored moments are the quantised ones, the update uses the fp32 moments of this step:
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr/bc1 * m / (sqrt(v / bc2) + eps);
    then m <- Q_B128/DE(m), v <- Q_Rank1/Linear(v) (1-D: Q_B128/Linear). Tensors below
    ``min_4bit_size`` keep fp32 moments."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 min_4bit_size=4096, second_moment_scale="rank1", maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      decoupled=decoupled_weight_decay, min_size=min_4bit_size, scale=second_moment_scale))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t = state["t"]
                if group["decoupled"]:
                    p.mul_(1 - lr * group["weight_decay"])
                else:
                    g = g + group["weight_decay"] * p
                m = b1 * state["m"] + (1 - b1) * g
                v = b2 * state["v"] + (1 - b2) * g * g
                p.sub_(lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + group["eps"]))
                if p.numel() >= max(group["min_size"], 1):
                    m = block_quantized(m, de_map())
                    v = rank1_quantized(v, LINEAR_MAP) if group["scale"] == "rank1" and p.dim() >= 2 \
                        else block_quantized(v, LINEAR_MAP)
                state["m"], state["v"] = m, v
        return loss


# Two option sets each (every option is exercised once; 200 steps of 4-bit are ~2.5x AdamW's
# cost on CPU): the test-time budget of the 4-bit work is 45 s.
FOUR_BIT_NOT_APPLICABLE = {
    "test_mixed_dtypes_in_one_group_match_reference":
        "4-bit state math is fp32 (as lpmm and torchao): a float64 parameter is not stepped in float64 math",
    "test_low_precision_without_compensation_matches_torch":
        "the reference is the paper's 4-bit quantiser, not torch; 4-bit states always use fp32 math (bf16 is covered "
        "by test_low_precision_default_keeps_dtype_and_learns and tests/test_lowbit.py)",
}

FOUR_BIT_INVALID = [(dict(min_4bit_size=-1), "min_4bit_size"), (dict(min_4bit_size=2.5), "min_4bit_size"),
                    (dict(second_moment_scale="rank2"), "second_moment_scale"), (dict(amsgrad=True), "amsgrad")]

EIGHT_BIT_NOT_APPLICABLE = {
    "test_mixed_dtypes_in_one_group_match_reference":
        "bitsandbytes' 8-bit optimizers take no float64 parameters (8-bit state math is fp32)",
    "test_low_precision_without_compensation_matches_torch":
        "the reference is bitsandbytes, not torch; 8-bit states always use fp32 math (bf16 is covered by "
        "test_low_precision_default_keeps_dtype_and_learns and tests/test_lowbit.py)",
    "test_add_param_group_mid_training_matches_reference":
        "holds our 8-bit trajectory to bitsandbytes' at 1e-6, below the quantisation noise between the two "
        "quantisers; add_param_group is covered by the contract test and tests/test_lowbit.py",
}

EIGHT_BIT_INVALID = [(dict(min_8bit_size=-1), "min_8bit_size"), (dict(min_8bit_size=1.5), "min_8bit_size")]

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "adam8bit",
        grid(lr=[0.01], min_8bit_size=[1], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True])
        + [dict(lr=0.01, min_8bit_size=1, maximize=True, weight_decay=0.1)],
        reference=bnb_reference("adam8bit"),
        rtol=RTOL_8BIT,
        invalid=ADAM_INVALID + EIGHT_BIT_INVALID + [(dict(amsgrad=True), "amsgrad")],
        recommended=dict(lr=3e-3, min_8bit_size=1024),
        supports_complex=False,
        not_applicable=EIGHT_BIT_NOT_APPLICABLE,
    ),
    OptimInfo(
        "adamw8bit",
        grid(lr=[0.01], min_8bit_size=[1], weight_decay=[0.0, 0.1], maximize=[False, True]),
        reference=bnb_reference("adamw8bit"),
        rtol=RTOL_8BIT,
        invalid=ADAM_INVALID + EIGHT_BIT_INVALID,
        recommended=dict(lr=3e-3, weight_decay=0.01, min_8bit_size=1024),
        supports_complex=False,
        not_applicable=EIGHT_BIT_NOT_APPLICABLE,
    ),
    OptimInfo(
        "lion8bit",
        grid(lr=[0.01], min_8bit_size=[1], weight_decay=[0.0, 0.1], maximize=[False, True]),
        reference=bnb_reference("lion8bit"),
        rtol=RTOL_8BIT,
        invalid=[(dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.99)), "betas[0]"), (dict(weight_decay=-0.1), "weight_decay")]
        + EIGHT_BIT_INVALID,
        recommended=dict(lr=1e-3, weight_decay=0.1, min_8bit_size=1024),
        supports_complex=False,
        not_applicable={
            **EIGHT_BIT_NOT_APPLICABLE,
            "test_nonfinite_gradients_propagate_by_default_like_torch":
                "Lion's step is sign(...), and torch.sign(nan) == 0: a NaN gradient reaches the momentum "
                "(its whole 8-bit block turns NaN) but not the parameter in that step (as lion)",
        },
    ),
]


ENTRIES += [
    OptimInfo(
        "adam4bit",
        [dict(lr=0.01, min_4bit_size=1, weight_decay=0.1),
         dict(lr=0.01, min_4bit_size=1, maximize=True, weight_decay=0.1, decoupled_weight_decay=True,
              second_moment_scale="block")],
        reference=lambda params, options: FourBitReference(params, **{k: v for k, v in options.items() if k != "foreach"}),
        rtol=RTOL_4BIT,
        invalid=ADAM_INVALID + FOUR_BIT_INVALID,
        recommended=dict(lr=3e-3, min_4bit_size=1024),
        supports_complex=False,
        not_applicable=FOUR_BIT_NOT_APPLICABLE,
    ),
    OptimInfo(
        "adamw4bit",
        [dict(lr=0.01, min_4bit_size=1, weight_decay=0.1),
         dict(lr=0.01, min_4bit_size=1, maximize=True, weight_decay=0.0, second_moment_scale="block")],
        reference=lambda params, options: FourBitReference(
            params, decoupled_weight_decay=True, **{k: v for k, v in options.items() if k != "foreach"}),
        rtol=RTOL_4BIT,
        invalid=ADAM_INVALID + FOUR_BIT_INVALID + [(dict(decoupled_weight_decay=False), "decoupled_weight_decay")],
        recommended=dict(lr=3e-3, weight_decay=0.01, min_4bit_size=1024),
        supports_complex=False,
        not_applicable=FOUR_BIT_NOT_APPLICABLE,
    ),
]


class MuonReference(torch.optim.Optimizer):
    """Muon written from torch.optim.Muon's step (and Keller Jordan's reference): EMA momentum,
    Nesterov, torch's own Newton-Schulz on the matrix ``(shape[0], -1)`` and its lr adjustment;
    torch's functional AdamW (``torch.optim.adam.adam``, decoupled) for 0/1-dim tensors."""

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, adjust_lr_fn="match_rms_adamw",
                 adamw_betas=(0.9, 0.95), adamw_eps=1e-8, maximize=False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps,
                                      adjust_lr_fn=adjust_lr_fn, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
        from torch.optim.adam import adam

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if p.dim() >= 2:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(g, 1 - mu)
                    u = g.lerp(buf, mu) if group["nesterov"] else buf
                    matrix = u.reshape(p.shape[0], -1)
                    o = _zeropower_via_newtonschulz(matrix, group["ns_coefficients"], group["ns_steps"], group["eps"])
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.reshape(p.shape), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], matrix.shape))
                else:
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    beta1, beta2 = group["adamw_betas"]
                    adam([p], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]], foreach=False,
                         decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                         weight_decay=group["weight_decay"], eps=group["adamw_eps"], maximize=False)
        return loss


ENTRIES.append(
    OptimInfo(
        "muon",
        grid(lr=[0.02], adjust_lr_fn=["match_rms_adamw", "original"], nesterov=[True, False], weight_decay=[0.0, 0.1])
        + [dict(lr=0.02, maximize=True, weight_decay=0.1, adamw_betas=(0.8, 0.9), momentum=0.9)],
        reference=lambda params, options: MuonReference(params, **options),
        invalid=[(dict(lr=-1e-3), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-0.1), "weight_decay"),
                 (dict(adamw_betas=(0.9, 1.0)), "adamw_betas[1]"), (dict(ns_steps=0), "ns_steps"),
                 (dict(adjust_lr_fn="nope"), "adjust_lr_fn"), (dict(use_muon="yes"), "use_muon")],
        recommended=dict(lr=2e-3, weight_decay=0.01),
        supports_complex=False,
        not_applicable={
            "test_low_precision_without_compensation_matches_torch":
                "the reference is not torch.optim code for 0/1/3-dim tensors (torch.optim.Muon takes 2-D only); "
                "bf16 is covered by test_low_precision_default_keeps_dtype_and_learns",
        },
    )
)
