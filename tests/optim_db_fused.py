"""Test-database entry of fused_adamw (AdamW stepped by torch's fused CPU kernel or Triton).

The generic suite runs the reference and foreach backends (AdamW's math) against
torch.optim.AdamW; the fused launch itself (``backend="auto"``) is held to bitwise
equality with ``torch.optim.AdamW(fused=True)`` in ``test_backends.py``.
"""
from __future__ import annotations

import torch
from optim_db import ADAM_INVALID, OptimInfo, grid, torch_reference

ENTRIES: list[OptimInfo] = [
    OptimInfo(
        "fused_adamw",
        grid(lr=[0.01], amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]),
        reference=torch_reference(torch.optim.AdamW),
        invalid=ADAM_INVALID,
        recommended=dict(lr=3e-3, weight_decay=0.01),
    ),
]
