"""Parameter groups built for the user: no weight decay on biases, norms and 0/1-dim tensors."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm of any model family, BatchNorm, GroupNorm, or any class named ``*Norm``."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith("Norm") or name.endswith("LayerNorm")


def no_decay_names(model: nn.Module, decay_embeddings: bool = True) -> set[str]:
    """Names of the parameters that get no weight decay: biases, norm weights, 0/1-dim tensors."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                param.ndim <= 1
                or param_name.endswith("bias")
                or is_norm_module(module)
                or (not decay_embeddings and isinstance(module, nn.Embedding))
            ):
                names.add(full)
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    lr: float | None = None,
    decay_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """Torch-ready groups ``decay`` and ``no_decay``; frozen parameters are left out, tied ones counted once."""
    skip = no_decay_names(model, decay_embeddings)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() already yields a tied tensor once
        if not param.requires_grad:
            continue
        if name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    for group_name, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if params:
            group = {"name": group_name, "params": params, "weight_decay": wd}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups
