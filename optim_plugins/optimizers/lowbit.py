"""8-bit optimizers: an algorithm's own update with its states kept 8-bit block-wise.

``Adam8bit`` is ``Adam``'s update (adam.py, unchanged) and ``Lion8bit`` is ``Lion``'s, with
the machinery's :class:`~optim_plugins.optimizers.codecs.Blockwise8bit` state codec
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022; the format of
bitsandbytes). Per step the machinery decodes each 8-bit state into an fp32 temporary,
runs the update, and re-quantises. Tensors with fewer than ``min_8bit_size`` elements keep
fp32 states, as bitsandbytes does. The parameters themselves are the fp32 master weights
(fp32 parameters are updated in place; bf16 ones through the machinery's fp32 working copy
and compensation).
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch

from .adam import Adam
from .base import Optimizer
from .codecs import Blockwise8bit, StateCodec
from .common import check_range
from .lion import Lion
from .precision import LOW_PRECISION

SIGNED, UNSIGNED = Blockwise8bit(signed=True), Blockwise8bit(signed=False)


class Blockwise8bitStates:
    """Mixin for an :class:`Optimizer`: keep ``quantized_states`` 8-bit (signed or unsigned map).

    Needs ``min_8bit_size`` among the group options. The state math is fp32 for bf16/fp16
    parameters whatever ``state_dtype`` says (as bitsandbytes).
    """

    quantized_states: ClassVar[dict[str, StateCodec]] = {}

    def state_codecs(self, p: torch.Tensor, group: Mapping[str, Any]) -> Mapping[str, StateCodec]:
        if p.numel() < group["min_8bit_size"] or p.is_complex():
            return {}
        return self.quantized_states

    def state_dtype(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def check_min_8bit_size(self, options: Mapping[str, Any]) -> None:
        value = options["min_8bit_size"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"invalid min_8bit_size: {value!r} (expected an integer)")
        check_range("min_8bit_size", value, 0)


class Adam8bit(Blockwise8bitStates, Adam):
    """Adam with 8-bit block-wise states: ``adam``'s update, both moments stored in 8 bits.

    exp_avg: signed dynamic map, exp_avg_sq: unsigned dynamic map, an fp32 absmax per block
    of 256 elements: about 2.03 bytes of state per parameter instead of 8. Weight decay is
    ``adam``'s (L2 unless ``decoupled_weight_decay``); use ``adamw8bit`` for AdamW. Same update
    as ``bitsandbytes.optim.Adam8bit`` on CPU, with round-to-nearest quantisation.

    Args:
        min_8bit_size: tensors with fewer elements keep fp32 states (bitsandbytes' default 4096).
    """

    quantized_states = {"exp_avg": SIGNED, "exp_avg_sq": UNSIGNED}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        min_8bit_size: int = 4096,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, amsgrad=False, min_8bit_size=min_8bit_size)
        Optimizer.__init__(self, params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if options.get("amsgrad"):
            raise ValueError(f"invalid amsgrad: {options['amsgrad']!r} (not supported with 8-bit states)")
        self.check_min_8bit_size(options)


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit block-wise states: ``adamw``'s update (decoupled weight decay) with
    ``adam8bit``'s states; same update as ``bitsandbytes.optim.AdamW8bit`` on CPU.

    Args:
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        **options: Any,
    ):
        if options.get("decoupled_weight_decay", True) is not True:
            raise ValueError("invalid decoupled_weight_decay: AdamW8bit always decouples weight decay (use Adam8bit for L2)")
        options["decoupled_weight_decay"] = True
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size, **options)


class Lion8bit(Blockwise8bitStates, Lion):
    """Lion with an 8-bit momentum: ``lion``'s update, its state kept 8-bit block-wise.

    ``exp_avg`` uses the signed dynamic map: about 1.02 bytes of state per parameter instead of 4. Same update
    as ``bitsandbytes.optim.Lion8bit`` on CPU, with round-to-nearest quantisation.

    Args:
        min_8bit_size: tensors with fewer elements keep fp32 states (bitsandbytes' default 4096).
    """

    quantized_states = {"exp_avg": SIGNED}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        Optimizer.__init__(self, params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        self.check_min_8bit_size(options)
