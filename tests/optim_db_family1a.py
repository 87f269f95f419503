"""Test-database entries of family I, part A: adabelief, lion, adan, signsgd, ranger,
lookahead, sam, asam.

References: ``pytorch_optimizer`` (AdaBelief as in the seed, Adan as the authors' code,
SignSGD, SAM), ``lion_pytorch`` (Lion), and, where an optimizer is a composition, the
composition written plainly around ``torch.optim`` (Ranger = GC + torch's RAdam +
Lookahead; Lookahead = torch's inner optimizer + the paper's slow-weight sync). The
official ``adabelief_pytorch`` and ``adan_pytorch`` are compared in test_family1a.py,
where their deliberate differences are shown against the equations.

Option names that differ from a reference's are mapped here: AdaBelief ``r`` ->
``adanorm_r``; Adan ``no_prox`` -> ``weight_decouple``; SignSGD
``decoupled_weight_decay`` -> ``weight_decouple``; SAM ``eps`` -> ``perturb_eps``, and the
wrappers' ``inner`` names -> torch.optim classes.
"""
from __future__ import annotations

import torch

from optim_db import OptimInfo, grid

ADAM_LIKE_INVALID = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), "betas[0]"),
    (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(weight_decay=-0.1), "weight_decay"),
]
TORCH_INNER = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _params_of(groups) -> list[torch.Tensor]:
    return [p for group in groups for p in group["params"]]


class _Negated:
    """``maximize`` for references without it (or with a bug in it): minimise -f instead,
    i.e. negate every gradient right after the closure computed it."""

    def __init__(self, inner):
        self.inner = inner
        self.param_groups = inner.param_groups

    def zero_grad(self):
        self.inner.zero_grad()

    def add_param_group(self, group):
        self.inner.add_param_group(group)

    def step(self, closure):
        def negated():
            with torch.enable_grad():
                loss = closure()
            for p in _params_of(self.inner.param_groups):
                if p.grad is not None:
                    p.grad.neg_()
            return loss
        return self.inner.step(negated)


def _maybe_negated(make, options):
    maximize = options.pop("maximize", False)
    return _Negated(make(options)) if maximize else make(options)


# ----------------------------------------------------------------------------- adabelief


def adabelief_reference(params, options):
    from pytorch_optimizer import AdaBelief

    options = dict(options)
    if "r" in options:
        options["adanorm_r"] = options.pop("r")
    options.setdefault("foreach", False)
    return AdaBelief(params, **options)


# ----------------------------------------------------------------------------- lion


def lion_reference(params, options):
    """lion_pytorch; for complex parameters pytorch_optimizer's Lion, because lion_pytorch
    takes ``sgn`` (z / |z|) of a complex number where ours (like torch.optim, which treats a
    complex tensor as pairs of reals) takes the sign of the real and imaginary parts."""
    import lion_pytorch
    import pytorch_optimizer

    params = list(params)
    options = {k: v for k, v in options.items() if k != "foreach"}
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    if any(t.is_complex() for t in tensors):
        return pytorch_optimizer.Lion(params, foreach=False, **options)
    return _maybe_negated(lambda o: lion_pytorch.Lion(params, **o), options)


# ----------------------------------------------------------------------------- adan


class _Restarting:
    """The paper's restart, written around a reference: every ``interval`` steps its state and
    step count are dropped, so the next step starts afresh from the parameters reached."""

    def __init__(self, inner, interval: int):
        self.inner, self.interval, self.steps = inner, interval, 0
        self.param_groups = inner.param_groups

    def zero_grad(self):
        self.inner.zero_grad()

    def add_param_group(self, group):
        self.inner.add_param_group(group)

    def step(self, closure):
        if self.steps and self.steps % self.interval == 0:
            self.inner.state.clear()
            for group in self.inner.param_groups:
                group["step"] = 0
        self.steps += 1
        return self.inner.step(closure)


def adan_reference(params, options):
    """pytorch_optimizer's Adan (the authors' algorithm); its ``maximize`` negates the gradient
    after recording the first one as the previous gradient, so maximize is done by negation."""
    from pytorch_optimizer import Adan

    options = {k: v for k, v in options.items() if k != "foreach"}
    options["weight_decouple"] = options.pop("no_prox", False)
    interval = options.pop("restart_interval", None)

    def make(o):
        adan = Adan(params, foreach=False, **o)
        return _Restarting(adan, interval) if interval else adan
    return _maybe_negated(make, options)


# ----------------------------------------------------------------------------- signsgd


class SignumEquations:
    """Bernstein et al. 2018 as a plain loop over the real view of each tensor:
    m = b m + (1 - b) g (m = g when b = 0), p -= lr sign(m) (for complex parameters, where
    pytorch_optimizer takes sgn(z) = z / |z| and ours the signs of both parts, as torch.optim
    treats a complex tensor as pairs of reals)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, decoupled_weight_decay=True, maximize=False):
        self.params, self.lr, self.beta = list(params), lr, momentum
        self.wd, self.decoupled, self.maximize = weight_decay, decoupled_weight_decay, maximize
        self.momentum = [torch.zeros_like(torch.view_as_real(p)) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        for p, m in zip(self.params, self.momentum):
            w, g = torch.view_as_real(p), torch.view_as_real(p.grad)
            g = -g if self.maximize else g
            if self.decoupled:
                w.mul_(1 - self.lr * self.wd)
            else:
                g = g + self.wd * w
            m.mul_(self.beta).add_((1 - self.beta) * g) if self.beta else m.copy_(g)
            w.sub_(self.lr * torch.sign(m))
        return loss


def signsgd_reference(params, options):
    from pytorch_optimizer import SignSGD

    params, options = list(params), dict(options)
    if any(p.is_complex() for p in params):
        return SignumEquations(params, **{k: v for k, v in options.items() if k != "foreach"})
    options["weight_decouple"] = options.pop("decoupled_weight_decay", True)
    options.setdefault("foreach", False)
    return SignSGD(params, **options)


# ----------------------------------------------------------------------------- ranger


class RangerReference:
    """Ranger from its parts: GC of each gradient, torch's RAdam (decoupled decay), and
    Lookahead every k steps (slow += alpha (fast - slow); fast = slow)."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.0, alpha=0.5, k=6,
                 use_gc=True, gc_conv_only=False, maximize=False, foreach=False):
        self.radam = torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       decoupled_weight_decay=True, maximize=maximize, foreach=foreach)
        self.param_groups = self.radam.param_groups
        self.alpha, self.k, self.use_gc, self.min_dim = alpha, k, use_gc, 3 if gc_conv_only else 1
        self.slow: dict = {}
        self.steps: dict = {}

    def zero_grad(self):
        self.radam.zero_grad()

    def add_param_group(self, group):
        self.radam.add_param_group(group)

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        stepped = [p for p in _params_of(self.param_groups) if p.grad is not None]
        for p in stepped:
            self.slow.setdefault(p, p.detach().clone())
            if self.use_gc and p.grad.dim() > self.min_dim:
                p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.dim())), keepdim=True))
        self.radam.step()
        for p in stepped:
            self.steps[p] = self.steps.get(p, 0) + 1
            if self.steps[p] % self.k == 0:
                self.slow[p].lerp_(p, self.alpha)
                p.copy_(self.slow[p])
        return loss


def ranger_reference(params, options):
    return RangerReference(params, **options)


# ----------------------------------------------------------------------------- lookahead


class LookaheadReference:
    """Zhang et al. 2019, Algorithm 1 around a torch.optim optimizer: phi_0 = theta_0; after
    every k inner steps phi += alpha (theta - phi) and theta = phi."""

    def __init__(self, params, inner="adamw", inner_options=None, k=5, alpha=0.5, lr=None, weight_decay=None,
                 foreach=False, **options):
        given = {key: v for key, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
        self.inner = TORCH_INNER[inner](params, foreach=foreach, **(inner_options or {}), **given, **options)
        self.param_groups = self.inner.param_groups
        self.k, self.alpha = k, alpha
        self.slow = {p: p.detach().clone() for p in _params_of(self.param_groups)}
        self.steps: dict = {}

    def zero_grad(self):
        self.inner.zero_grad()

    def add_param_group(self, group):
        self.inner.add_param_group(group)
        self.slow.update({p: p.detach().clone() for p in self.param_groups[-1]["params"]})

    @torch.no_grad()
    def step(self, closure):
        loss = self.inner.step(closure)
        for p in _params_of(self.param_groups):
            if p.grad is None:
                continue
            self.steps[p] = self.steps.get(p, 0) + 1
            if self.steps[p] % self.k == 0:
                self.slow[p].lerp_(p, self.alpha)
                p.copy_(self.slow[p])
        return loss


# ----------------------------------------------------------------------------- sam


class SAMReference:
    """pytorch_optimizer's SAM around a torch.optim optimizer. It expects the gradients at p
    before ``step(closure)``, so the closure is evaluated once first (as its docs show)."""

    def __init__(self, params, inner="sgd", inner_options=None, rho=0.05, adaptive=False, eps=1e-12, lr=None,
                 weight_decay=None, maximize=False, foreach=False):
        from pytorch_optimizer import SAM

        given = {key: v for key, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
        self.sam = SAM(params, TORCH_INNER[inner], rho=rho, adaptive=adaptive, perturb_eps=eps, foreach=foreach,
                       **(inner_options or {}), **given)
        self.param_groups = self.sam.param_groups
        self.rho, self.adaptive = rho, adaptive
        self.maximize = maximize  # minimise -f: gradients negated after each evaluation

    def zero_grad(self):
        self.sam.zero_grad()

    def add_param_group(self, group):  # its groups carry rho and adaptive
        self.sam.base_optimizer.add_param_group({"rho": self.rho, "adaptive": self.adaptive, **group})

    def step(self, closure):
        def evaluate():
            with torch.enable_grad():
                loss = closure()
            if self.maximize:
                for p in _params_of(self.param_groups):
                    if p.grad is not None:
                        p.grad.neg_()
            return loss
        loss = evaluate()
        self.sam.step(evaluate)
        return loss


def sam_reference(params, options):
    return SAMReference(params, **options)


def asam_reference(params, options):
    return SAMReference(params, **{"rho": 0.5, **options, "adaptive": True})


SAM_NOT_APPLICABLE = {
    "test_zero_gradients": "steps without a closure, and SAM needs one (zero gradients: test_family1a.py)",
    "test_none_gradients_are_skipped": "steps without a closure, and SAM needs one (None grads: test_family1a.py)",
    "test_nonfinite_gradients_propagate_by_default_like_torch":
        "steps without a closure; and SAM's perturbation uses the global gradient norm, so one NaN reaches "
        "every tensor (non-finite policies with a closure: test_family1a.py)",
    "test_nonfinite_gradients_skip_or_raise": "steps without a closure, and SAM needs one (with a closure: test_family1a.py)",
}
SIGN_SWALLOWS_NAN = (
    "torch.sign(nan) is 0, so a NaN gradient never reaches the parameter of a sign step: it stays in the "
    "momentum (as in lion_pytorch / pytorch_optimizer); test_family1a.py shows this and that nonfinite='skip' prevents it"
)
WRAPPER_INVALID = [
    (dict(inner="nosuch_optimizer"), "nosuch_optimizer"),
    (dict(inner_options=[1, 2]), "inner_options"),
    (dict(inner="adamw", lr=1e-3, inner_options={"lr": 1e-2}), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(inner="adamw", inner_options={"betas": (1.5, 0.9)}), "betas[0]"),
]

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "adabelief",
        [dict(lr=0.01),
         dict(lr=0.01, weight_decay=0.1),
         dict(lr=0.01, weight_decay=0.1, weight_decouple=False, rectify=True),
         dict(lr=0.01, weight_decay=0.1, fixed_decay=True, rectify=True, degenerated_to_sgd=False),
         dict(lr=0.01, rectify=True, n_sma_threshold=8),
         dict(lr=0.01, ams_bound=True),
         dict(lr=0.01, ams_bound=True, rectify=True, adanorm=True, r=0.9),
         dict(lr=0.01, adam_debias=True, adanorm=True),
         dict(lr=0.01, adam_debias=True, rectify=True, weight_decay=0.1, weight_decouple=False),
         dict(lr=0.01, eps=1e-8, weight_decay=0.1, maximize=True)],
        reference=adabelief_reference,
        invalid=ADAM_LIKE_INVALID + [(dict(eps=-1.0), "eps"), (dict(r=1.0), "r"),
                                     (dict(n_sma_threshold=4), "n_sma_threshold")],
        recommended=dict(lr=3e-3, eps=1e-8, weight_decay=0.01, rectify=True),
    ),
    OptimInfo(
        "lion",
        grid(lr=[0.01], betas=[(0.9, 0.99), (0.95, 0.98)], weight_decay=[0.0, 0.1])
        + [dict(lr=0.01, weight_decay=0.1, maximize=True)],
        reference=lion_reference,
        invalid=ADAM_LIKE_INVALID,
        recommended=dict(lr=1e-3, weight_decay=0.1),
        not_applicable={"test_nonfinite_gradients_propagate_by_default_like_torch": SIGN_SWALLOWS_NAN},
    ),
    OptimInfo(
        "adan",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], no_prox=[False, True])
        + [dict(lr=0.01, betas=(0.9, 0.9, 0.999), restart_interval=7, weight_decay=0.05),
           dict(lr=0.01, eps=1e-6, maximize=True, weight_decay=0.05)],
        reference=adan_reference,
        invalid=[(dict(lr=-1e-3), "lr"), (dict(betas=(0.98, 0.92)), "betas"), (dict(betas=(0.98, 0.92, 1.0)), "betas[2]"),
                 (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
                 (dict(restart_interval=0), "restart_interval")],
        recommended=dict(lr=3e-3, weight_decay=0.02),
    ),
    OptimInfo(
        "signsgd",
        grid(lr=[0.01], momentum=[0.0, 0.9], weight_decay=[0.0, 0.1], decoupled_weight_decay=[True, False])
        + [dict(lr=0.01, momentum=0.5, maximize=True)],
        reference=signsgd_reference,
        invalid=[(dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1.0), "weight_decay")],
        recommended=dict(lr=1e-3, momentum=0.9),
        not_applicable={"test_nonfinite_gradients_propagate_by_default_like_torch": SIGN_SWALLOWS_NAN},
    ),
    OptimInfo(
        "ranger",
        grid(lr=[0.01], weight_decay=[0.0, 0.1], use_gc=[True, False])
        + [dict(lr=0.01, k=3, alpha=0.8, gc_conv_only=True), dict(lr=0.01, eps=1e-8, maximize=True)],
        reference=ranger_reference,
        invalid=ADAM_LIKE_INVALID + [(dict(k=0), "k"), (dict(alpha=1.5), "alpha"), (dict(eps=-1.0), "eps")],
        recommended=dict(lr=3e-3),
        supports_complex=False,  # whole-tensor (GC) optimizers refuse complex parameters
    ),
    OptimInfo(
        "lookahead",
        [dict(inner="adamw", lr=0.01, k=5, alpha=0.5),
         dict(inner="sgd", lr=0.05, inner_options={"momentum": 0.9}, k=3, alpha=0.8, weight_decay=0.1),
         dict(inner="adam", lr=0.01, inner_options={"amsgrad": True, "betas": (0.8, 0.99)}, maximize=True)],
        reference=lambda params, options: LookaheadReference(params, **options),
        invalid=WRAPPER_INVALID + [(dict(k=0), "k"), (dict(alpha=-0.5), "alpha")],
        recommended=dict(inner="adamw", lr=3e-3, weight_decay=0.01),
    ),
    OptimInfo(
        "sam",
        [dict(inner="sgd", lr=0.05, inner_options={"momentum": 0.9}, rho=0.05),
         dict(inner="adamw", lr=0.01, rho=0.1, adaptive=True, weight_decay=0.1),
         dict(inner="sgd", lr=0.05, rho=0.2, eps=1e-6, maximize=True)],
        reference=sam_reference,
        invalid=WRAPPER_INVALID + [(dict(rho=-0.1), "rho"), (dict(eps=-1.0), "eps")],
        recommended=dict(inner="sgd", lr=0.1, inner_options={"momentum": 0.9}, rho=0.05),
        not_applicable=SAM_NOT_APPLICABLE,
    ),
    OptimInfo(
        "asam",
        [dict(inner="sgd", lr=0.05, inner_options={"momentum": 0.9}),
         dict(inner="adamw", lr=0.01, rho=1.0, weight_decay=0.1, maximize=True)],
        reference=asam_reference,
        invalid=WRAPPER_INVALID + [(dict(rho=-0.1), "rho")],
        recommended=dict(inner="sgd", lr=0.1, inner_options={"momentum": 0.9}, rho=0.5),
        not_applicable=SAM_NOT_APPLICABLE,
    ),
]
