"""Test-database entry of Eva (Kronecker-vectorized second order, ICLR 2023).

The generic suite steps plain tensors without a model, so Eva takes its documented
fallback there: SGD with momentum, same numbers as ``torch.optim.SGD``. The preconditioning
of hooked layers is checked against the paper's equations in ``test_eva.py``; the digits
convergence test builds Eva from the model (``create_optimizer("eva", model)``), so its
Linear layers are preconditioned there.
"""
from __future__ import annotations

from optim_db import OptimInfo, grid, sgd_reference

EVA_ONLY = ("damping", "kl_clip", "factor_decay", "fac_update_freq", "kfac_batch_size", "model")


def eva_fallback_reference(params, options):
    """torch.optim.SGD with Eva's SGD options (the other tensors of Eva step like this).

    Eva steps one tensor at a time (whole-layer math), so its twin is torch's single-tensor
    path, whatever ``foreach`` the test asks of torch.
    """
    kept = {k: v for k, v in options.items() if k not in EVA_ONLY}
    return sgd_reference(params, {**kept, "foreach": False})


ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "eva",
        grid(lr=[0.05], momentum=[0.9], weight_decay=[0.0, 0.1])
        + [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
           dict(lr=0.05, momentum=0.0, weight_decay=0.0, damping=1.0, kl_clip=None),
           dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.1, decoupled_weight_decay=True)],
        reference=eva_fallback_reference,
        invalid=[(dict(lr=-0.1), "lr"), (dict(damping=0.0), "damping"), (dict(damping=-0.03), "damping"),
                 (dict(kl_clip=-1e-3), "kl_clip"), (dict(factor_decay=0.0), "factor_decay"),
                 (dict(factor_decay=1.5), "factor_decay"), (dict(fac_update_freq=0), "fac_update_freq"),
                 (dict(kfac_batch_size=0), "kfac_batch_size"), (dict(model="net"), "model"),
                 (dict(momentum=-0.9), "momentum")],
        recommended=dict(lr=0.1, momentum=0.9, weight_decay=5e-4, damping=0.03, kl_clip=0.001),
        supports_complex=False,
    ),
]
