"""FusedAdamW: AdamW whose whole step is one fused kernel launch per (device, dtype) bucket."""
from __future__ import annotations

from typing import ClassVar

from .adam import AdamW


class FusedAdamW(AdamW):
    """AdamW (same options and numbers as ``adamw``) that also takes GradScaler's scale into the step.

    Like ``adamw`` with ``backend="auto"``, it steps with torch's own fused AdamW kernel on
    CPU (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs: same numbers bit
    for bit) and with the Triton kernel of ``kernels/triton`` on CUDA (torch's fused CUDA
    kernel where Triton is missing). What it adds is torch's ``fused=True`` contract with
    ``torch.amp.GradScaler``: the scaler hands it the loss scale and the overflow flag, and the
    kernel unscales and skips inside the step (no separate unscale pass). Trainers refuse
    gradient clipping for such optimizers (Lightning does), so plain ``adamw`` keeps it off.
    Buckets the fused kernels do not cover (Kahan or stochastic compensation of bf16/fp16
    parameters, ``state_dtype`` other than the parameter's, complex parameters) and explicit
    backends step as ``adamw`` does.

    Args:
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay factor.
        amsgrad: use the running maximum of the second moment (AMSGrad).
    """

    _step_supports_amp_scaling: ClassVar[bool] = True  # as torch's fused=True: unscale and skip in the step
