"""8-bit and 4-bit optimizers: an algorithm's own update with its states kept in 8 or 4 bits.

``Adam8bit`` is ``Adam``'s update (adam.py, unchanged) and ``Lion8bit`` is ``Lion``'s, with
the machinery's :class:`~optim_plugins.optimizers.codecs.Blockwise8bit` state codec
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022; the format of
bitsandbytes). Per step the machinery decodes each 8-bit state into an fp32 temporary,
runs the update, and re-quantises; on the compiled backend (``auto`` on CPU from 2^20
elements) one C++ loop does the three block by block, in the cache (kernels/cpp/loops.py).
Tensors with fewer than ``min_8bit_size`` elements keep fp32 states, as bitsandbytes does. The parameters themselves are the fp32 master weights
(fp32 parameters are updated in place; bf16 ones through the machinery's fp32 working copy
and compensation, which the compiled backend's loop reads and writes itself).

``Adam4bit`` / ``AdamW4bit`` keep Adam's moments in 4 bits as Li et al. propose ("Memory
Efficient Optimizers with 4-bit States", NeurIPS 2023; their code lpmm): the first moment
block-wise (128) with the dynamic-exponent map, the second moment rank-1 normalised with the
linear map without zero (:class:`~optim_plugins.optimizers.codecs.Rank1Linear4bit`).
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterable, Literal, Mapping

import torch

from .adam import Adam
from ..registry import Capabilities
from .base import Optimizer
from .codecs import Blockwise4bit, Blockwise8bit, Rank1Linear4bit, StateCodec
from .common import check_choice, check_range
from .lion import Lion
from .precision import LOW_PRECISION

SIGNED, UNSIGNED = Blockwise8bit(signed=True), Blockwise8bit(signed=False)


class QuantizedStates:
    """Mixin for an :class:`Optimizer` with quantised states: their math is fp32 for bf16/fp16
    parameters whatever ``state_dtype`` says (as bitsandbytes and lpmm)."""

    def state_dtype(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


class Blockwise8bitStates(QuantizedStates):
    """Mixin for an :class:`Optimizer`: keep ``quantized_states`` 8-bit (signed or unsigned map).

    Needs ``min_8bit_size`` among the group options.
    """

    quantized_states: ClassVar[dict[str, StateCodec]] = {}

    def state_codecs(self, p: torch.Tensor, group: Mapping[str, Any]) -> Mapping[str, StateCodec]:
        if p.numel() < group["min_8bit_size"] or p.is_complex():
            return {}
        return self.quantized_states

    def check_min_8bit_size(self, options: Mapping[str, Any]) -> None:
        check_min_size("min_8bit_size", options["min_8bit_size"])


def check_min_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid {name}: {value!r} (expected an integer)")
    check_range(name, value, 0)


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


SECOND_MOMENT_SCALES = ("rank1", "block")


@functools.lru_cache(maxsize=4096)
def adam_4bit_codecs(shape: tuple[int, ...], second_moment_scale: str) -> dict[str, StateCodec]:
    """The codecs of Adam's moments for a tensor of ``shape``: B128/DE first moment, Rank-1/Linear
    second moment (1-D tensors, or ``second_moment_scale="block"``: B128/Linear)."""
    rank1 = second_moment_scale == "rank1" and len(shape) >= 2
    return {"exp_avg": Blockwise4bit(shape, signed=True),
            "exp_avg_sq": Rank1Linear4bit(shape) if rank1 else Blockwise4bit(shape, signed=False)}


class Adam4bit(QuantizedStates, Adam):
    """Adam with 4-bit states (Li et al., "Memory Efficient Optimizers with 4-bit States", 2023):
    ``adam``'s update, both moments stored in 4 bits, two codes per byte.

    exp_avg: blocks of 128 with an fp32 absmax, dynamic-exponent map (signed, 16 codes);
    exp_avg_sq: linear map without zero (1/16 ... 1), rank-1 normalised (element (i, j) scaled by
    min(row max, column max); 1-D tensors in blocks of 128). About 1.04 bytes of state per
    parameter of a 1024 x 1024 weight instead of 8. Nearest-code rounding, as lpmm's default.
    Weight decay is ``adam``'s (L2 unless ``decoupled_weight_decay``); use ``adamw4bit`` for AdamW.

    Args:
        min_4bit_size: tensors with fewer elements keep fp32 states (lpmm: 4097, i.e. > 4096).
        second_moment_scale: "rank1" (the paper's choice) or "block" (blocks of 128, as
            torchao's AdamW4bit and lpmm's 2nd_moment_group_128 configuration).
    """

    # the rank-1 scale of the second moment spans the whole tensor: shard by whole tensors only
    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=True, shardable="tensors")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        min_4bit_size: int = 4096,
        second_moment_scale: Literal["rank1", "block"] = "rank1",
        **options: Any,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                        amsgrad=False, min_4bit_size=min_4bit_size, second_moment_scale=second_moment_scale)
        Optimizer.__init__(self, params, defaults, **options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if options.get("amsgrad"):
            raise ValueError(f"invalid amsgrad: {options['amsgrad']!r} (not supported with 4-bit states)")
        check_min_size("min_4bit_size", options["min_4bit_size"])
        check_choice("second_moment_scale", options["second_moment_scale"], SECOND_MOMENT_SCALES)

    def state_codecs(self, p: torch.Tensor, group: Mapping[str, Any]) -> Mapping[str, StateCodec]:
        if p.numel() < max(group["min_4bit_size"], 1) or p.is_complex():
            return {}
        return adam_4bit_codecs(tuple(p.shape), group["second_moment_scale"])


class AdamW4bit(Adam4bit):
    """AdamW with 4-bit states: ``adamw``'s update (decoupled weight decay) with ``adam4bit``'s
    states; the optimizer of Li et al. (2023) and lpmm's ``AdamW`` (default configuration).

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
        min_4bit_size: int = 4096,
        second_moment_scale: Literal["rank1", "block"] = "rank1",
        **options: Any,
    ):
        if options.get("decoupled_weight_decay", True) is not True:
            raise ValueError("invalid decoupled_weight_decay: AdamW4bit always decouples weight decay (use Adam4bit for L2)")
        options["decoupled_weight_decay"] = True
        super().__init__(params, lr, betas, eps, weight_decay, min_4bit_size=min_4bit_size,
                         second_moment_scale=second_moment_scale, **options)
