"""Test-database entries of the low-rank projected optimizers: galore_adamw, apollo_adamw.

References are the authors' packages, galore-torch (``GaLoreAdamW``) and apollo-torch
(``APOLLOAdamW``), driven as transformers drives them: 2-D tensors in a group with the
projection options, the others in a plain group. Two documented differences are bridged
in the reference wrapper, so that the comparison checks the projection math:

* weight decay: galore-torch / apollo-torch decay after the update, torch's AdamW (and our
  machinery, for every optimizer) before it; the wrapper decays before, in torch's order;
* ``maximize``: the packages have none; the wrapper negates the gradient.

What remains is where eps sits (theirs: ``m * sqrt(bc2) / bc1 / (sqrt(v) + eps)``, ours
and torch's: ``m / bc1 / (sqrt(v) / sqrt(bc2) + eps)``) and the rounding of the order of
operations: 200 steps with projector refreshes agree to ``rtol=2e-5`` (measured max
relative error 7.6e-6).
"""
from __future__ import annotations

import warnings

import torch

from optim_db import ADAM_INVALID, OptimInfo, grid

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
APOLLO_KEYS = GALORE_KEYS + ("proj", "scale_type")


def _reference(cls_path: str, name: str, keys: tuple[str, ...]):
    def make(params, options):
        import optim_plugins as op

        ours = op.get_optimizer_spec(name).options
        module, cls_name = cls_path.rsplit(".", 1)
        base = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        options = dict(options)
        low = {k: options.pop(k, ours[k].default) for k in keys}  # all keys, as transformers passes them
        disable_nl = options.pop("disable_nl", None)
        maximize = options.pop("maximize", False)
        decay = options.pop("weight_decay", 0.0)
        options.pop("foreach", None)
        options.setdefault("eps", 1e-6 if "galore" in module else 1e-8)
        params = list(params)

        class Reference(base):
            def step(self, closure=None):
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                if maximize:
                                    p.grad.neg_()
                                p.mul_(1 - group["lr"] * decay)
                return super().step()

        groups = [{"params": [p for p in params if p.dim() != 2]}, {"params": [p for p in params if p.dim() == 2], **low}]
        extra = {} if disable_nl is None else {"disable_nl": disable_nl}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = Reference(groups, weight_decay=0.0, **options, **extra)
        for position, p in enumerate(params, 1):  # apollo-torch seeds by position: keep ours (groups reorder them)
            if "seed" in reference.state[p]:
                reference.state[p]["seed"] = position
        return reference
    return make


LOWRANK_INVALID = ADAM_INVALID + [
    (dict(rank=0), "rank"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(scale=-1.0), "scale"),
    (dict(proj_type="diagonal"), "proj_type"),
]

NOT_BITWISE = (
    "galore-torch / apollo-torch place eps differently and round in another order, so "
    "agreement is to rtol 2e-5 (test_matches_reference_for_200_steps), not bitwise"
)

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "galore_adamw",
        grid(lr=[0.01], eps=[1e-8], rank=[2], update_proj_gap=[50], scale=[0.5], proj_type=["std"], weight_decay=[0.0, 0.1])
        + grid(lr=[0.003], rank=[1], update_proj_gap=[7], scale=[1.0], proj_type=["reverse_std", "left", "right", "full"])
        + [dict(lr=0.01, rank=2, update_proj_gap=50, scale=0.25, maximize=True, weight_decay=0.1)],
        reference=_reference("galore_torch.GaLoreAdamW", "galore_adamw", GALORE_KEYS),
        rtol=2e-5,
        invalid=LOWRANK_INVALID,
        recommended=dict(lr=3e-3, rank=16, update_proj_gap=50, scale=1.0),
        supports_complex=False,
        not_applicable={"test_low_precision_without_compensation_matches_torch": NOT_BITWISE},
    ),
    OptimInfo(
        "apollo_adamw",
        grid(lr=[0.002], eps=[1e-8], rank=[2], update_proj_gap=[50], scale=[4.0], proj=["random"], scale_type=["channel", "tensor"],
             weight_decay=[0.0, 0.1])
        + grid(lr=[0.002], rank=[1], update_proj_gap=[7], scale=[1.0], proj=["svd", "random"], proj_type=["std"])
        + [dict(lr=0.01, rank=1, scale=128.0, scale_type="tensor", update_proj_gap=20, maximize=True, disable_nl=True)],
        reference=_reference("apollo_torch.APOLLOAdamW", "apollo_adamw", APOLLO_KEYS),
        rtol=2e-5,
        invalid=LOWRANK_INVALID + [(dict(proj="qr"), "proj"), (dict(scale_type="row"), "scale_type"),
                                   (dict(proj_type="full"), "proj_type")],
        recommended=dict(lr=3e-3, rank=16, update_proj_gap=50, scale=1.0),
        supports_complex=False,
        not_applicable={"test_low_precision_without_compensation_matches_torch": NOT_BITWISE},
    ),
]
