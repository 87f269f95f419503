"""State codecs: how the step machinery stores a state tensor compactly.

An optimizer names, per parameter, which of its states a codec keeps
(``Optimizer.state_codecs``). The machinery encodes the state ``init_state`` returns,
decodes each coded state into a temporary of the working dtype before ``update`` and
encodes it back after, so an algorithm's ``update`` is the same code with or without a
codec (``adam8bit`` is ``adam``'s update with :class:`Blockwise8bit` states).

A codec stores state ``name`` under ``keys(name)`` (``name`` itself first, then its side
tensors): plain tensors, so ``state_dict`` saves them as they are and
``load_state_dict`` checks their shapes against the encoded ``init_state``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.quantize import (
    BLOCK_SIZE,
    BLOCK_SIZE_4BIT,
    dequantize_4bit_blockwise,
    dequantize_4bit_rank1,
    dequantize_blockwise,
    map_name,
    num_blocks,
    num_bytes_4bit,
    quantize_4bit_blockwise_,
    quantize_4bit_rank1_,
    quantize_blockwise_,
)


class StateCodec:
    """Stores one state tensor in another form; subclasses write the four methods below."""

    def keys(self, name: str) -> tuple[str, ...]:
        """The state keys this codec stores ``name`` under (``name`` first)."""
        return (name,)

    def init(self, name: str, value: Tensor) -> dict[str, Tensor]:
        """Encoded storage for the fresh state ``value`` (on the meta device: shapes only)."""
        raise NotImplementedError

    def decode(self, name: str, state: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """A new tensor of ``dtype`` holding the value of state ``name``."""
        raise NotImplementedError

    def encode(self, name: str, value: Tensor, state: dict[str, Tensor]) -> None:
        """Store ``value`` into the storage of state ``name``, in place."""
        raise NotImplementedError

    def loop_form(self) -> tuple | None:
        """How the compiled backend's C++ loop decodes and codes this format inside the step
        (``kernels.cpp.loops.Coded``'s fields after the slot; storage ``keys(name)``: codes, absmax),
        or None where it cannot (the machinery then decodes before the update and codes after)."""
        return None


class Blockwise8bit(StateCodec):
    """Dynamic block-wise 8-bit state (bitsandbytes' format): uint8 codes of the parameter's
    shape plus an fp32 absmax per block of 256 elements, stored as ``name`` and ``name_absmax``.

    About 1.016 bytes per element; the fixed code map (``kernels.quantize.dynamic_map``) is
    not stored. ``signed=False`` for non-negative states (second moments).
    """

    def __init__(self, signed: bool, block_size: int = BLOCK_SIZE):
        self.signed, self.block_size = signed, block_size

    def __repr__(self) -> str:
        return f"Blockwise8bit(signed={self.signed}, block_size={self.block_size})"

    def keys(self, name: str) -> tuple[str, ...]:
        return (name, f"{name}_absmax")

    def init(self, name: str, value: Tensor) -> dict[str, Tensor]:
        codes = torch.empty(value.shape, dtype=torch.uint8, device=value.device)
        absmax = torch.empty(num_blocks(value.numel(), self.block_size), dtype=torch.float32, device=value.device)
        if value.device.type != "meta":
            quantize_blockwise_(value, codes, absmax, self.signed, self.block_size)
        return {name: codes, f"{name}_absmax": absmax}

    def decode(self, name: str, state: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        value = dequantize_blockwise(state[name], state[f"{name}_absmax"], self.signed, self.block_size)
        return value.to(dtype)

    def encode(self, name: str, value: Tensor, state: dict[str, Tensor]) -> None:
        quantize_blockwise_(value, state[name], state[f"{name}_absmax"], self.signed, self.block_size)

    def loop_form(self) -> tuple:
        return (map_name(8, self.signed), self.block_size, 8, not self.signed)


class Blockwise4bit(StateCodec):
    """Block-wise 4-bit state of a tensor of ``shape`` (Li et al., 2023): two codes per byte
    (uint8, ``ceil(numel / 2)``) plus an fp32 absmax per block of 128 elements, stored as
    ``name`` and ``name_absmax``; about 0.53 bytes per element.

    ``signed=True``: the dynamic-exponent map (the first moment, lpmm's B128/DE); ``signed=False``:
    the linear map without zero (second moments of 1-D tensors; all of them in torchao's format).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], signed: bool, block_size: int = BLOCK_SIZE_4BIT):
        self.shape, self.signed, self.block_size = torch.Size(shape), signed, block_size

    def __repr__(self) -> str:
        return f"Blockwise4bit(shape={tuple(self.shape)}, signed={self.signed}, block_size={self.block_size})"

    def keys(self, name: str) -> tuple[str, ...]:
        return (name, f"{name}_absmax")

    def init(self, name: str, value: Tensor) -> dict[str, Tensor]:
        packed = torch.empty(num_bytes_4bit(value.numel()), dtype=torch.uint8, device=value.device)
        absmax = torch.empty(num_blocks(value.numel(), self.block_size), dtype=torch.float32, device=value.device)
        state = {name: packed, f"{name}_absmax": absmax}
        if value.device.type != "meta":
            self.encode(name, value, state)
        return state

    def decode(self, name: str, state: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        value = dequantize_4bit_blockwise(state[name], state[f"{name}_absmax"], self.shape, self.signed, self.block_size)
        return value.to(dtype)

    def encode(self, name: str, value: Tensor, state: dict[str, Tensor]) -> None:
        quantize_4bit_blockwise_(value, state[name], state[f"{name}_absmax"], self.signed, self.block_size)

    def loop_form(self) -> tuple:
        return (map_name(4, self.signed), self.block_size, 4, False)


class Rank1Linear4bit(StateCodec):
    """Rank-1 normalised 4-bit state of a non-negative tensor of ``shape`` (2-D or more; Li et
    al., 2023, the second moment's Rank-1/Linear): the linear map without zero, element (i, j)
    scaled by min(max of row i, max of column j). Stored as ``name`` (two codes per byte) and
    ``name_rank1`` (fp32 maxima of every dimension, ``sum(shape)``): about 0.5 bytes per element.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...]):
        if len(shape) < 2:
            raise ValueError(f"Rank1Linear4bit needs a tensor of 2 or more dimensions, got shape {tuple(shape)}")
        self.shape = torch.Size(shape)

    def __repr__(self) -> str:
        return f"Rank1Linear4bit(shape={tuple(self.shape)})"

    def keys(self, name: str) -> tuple[str, ...]:
        return (name, f"{name}_rank1")

    def init(self, name: str, value: Tensor) -> dict[str, Tensor]:
        packed = torch.empty(num_bytes_4bit(value.numel()), dtype=torch.uint8, device=value.device)
        maxima = torch.empty(sum(value.shape), dtype=torch.float32, device=value.device)
        state = {name: packed, f"{name}_rank1": maxima}
        if value.device.type != "meta":
            self.encode(name, value, state)
        return state

    def decode(self, name: str, state: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize_4bit_rank1(state[name], state[f"{name}_rank1"], self.shape).to(dtype)

    def encode(self, name: str, value: Tensor, state: dict[str, Tensor]) -> None:
        quantize_4bit_rank1_(value, state[name], state[f"{name}_rank1"])

    def loop_form(self) -> tuple | None:
        """2-D: coded inside the C++ loop, which finds the new maxima in a first pass (loops.Coded rank1)."""
        return ("linear4", 0, 4, False, True) if len(self.shape) == 2 else None
