"""Dynamic block-wise 8-bit quantisation (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", 2022), the format of bitsandbytes' 8-bit optimizers.

A tensor is cut into blocks of ``BLOCK_SIZE`` consecutive elements (the last block may be
short); each block is divided by its absolute maximum (``absmax``, kept in fp32) and every
scaled value in [-1, 1] is stored as the uint8 index of the nearest entry of a 256-entry
code map. The *dynamic* (tree) map spends its codes on a decimal exponent and a linear
fraction, so small values keep relative precision: ``dynamic_map(signed=True)`` for
signed states (Adam's first moment, Lion's momentum), ``signed=False`` for non-negative
ones (Adam's second moment).

Same map as ``bitsandbytes.functional.create_dynamic_map`` and the block size 256 that
bitsandbytes 0.50 uses for its 8-bit optimizers on CPU; the tests compare both.
Functions take tensors only (no optimizer objects).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK_SIZE = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool, max_exponent_bits: int, total_bits: int) -> Tensor:
    non_sign_bits = total_bits - 1
    values: list[float] = []

    def add(scale: float, count: int) -> None:
        boundaries = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):  # exponent 10^-(max_exponent_bits-1) ... 10^0
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        add(10.0 ** (-(max_exponent_bits - 1) + i), 2**fraction_bits)
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # all-zero exponent, no indicator bit
    if extra > 0:
        add(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), extra)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str | None = None, *,
                max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The dynamic quantisation map: 2**total_bits sorted fp32 values in [-1, 1] ([0, 1] unsigned)."""
    code = _dynamic_map_cpu(bool(signed), max_exponent_bits, total_bits)
    return code if device is None else code.to(device)


@functools.lru_cache(maxsize=None)
def _midpoints(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    code = dynamic_map(signed, device)
    return code, (code[1:] + code[:-1]) / 2


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-numel // block_size)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` flattened and zero-padded into a (blocks, block_size) view."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise_(x: Tensor, codes: Tensor, absmax: Tensor, signed: bool,
                        block_size: int = BLOCK_SIZE) -> None:
    """Store fp32 ``x`` into ``codes`` (uint8, x's shape) and ``absmax`` (fp32, one per block), in place.

    Each value becomes the index of the nearest code of the map, except that with the
    unsigned map a positive value never becomes 0 (it takes the smallest positive code,
    3.25e-7 of the block's absmax): an Adam second moment rounded to 0 under a nonzero first
    moment would turn ``m / (sqrt(v) + eps)`` into ``m / eps``. (bitsandbytes' CPU quantiser
    floors small magnitudes too, coarser: at 1.6e-5 of absmax unsigned, 2.1e-5 signed.)
    Non-finite values make their block non-finite, as a NaN state propagates in fp32.
    """
    code, midpoints = _midpoints(bool(signed), x.device)
    blocks = _blocks(x.float(), block_size)
    torch.amax(blocks.abs(), dim=1, out=absmax)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    index = torch.bucketize(scaled, midpoints).clamp_(max=code.numel() - 1)
    if not signed:  # a positive second moment never becomes 0: m / (sqrt(0) + eps) would explode
        index = torch.maximum(index, (scaled > 0).long())
    codes.view(-1).copy_(index.view(-1)[: codes.numel()])


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool, block_size: int = BLOCK_SIZE,
                         out: Tensor | None = None) -> Tensor:
    """The fp32 tensor that ``codes`` and ``absmax`` stand for (written into ``out`` when given)."""
    code = _midpoints(bool(signed), codes.device)[0]
    values = _blocks(code[codes.long()], block_size).mul_(absmax.unsqueeze(1))
    values = values.view(-1)[: codes.numel()].view(codes.shape)
    if out is None:
        return values
    return out.copy_(values)


def quantize_blockwise(x: Tensor, signed: bool = True, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)`` of ``x``: the out-of-place form of :func:`quantize_blockwise_`."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(x.numel(), block_size), dtype=torch.float32, device=x.device)
    quantize_blockwise_(x, codes, absmax, signed, block_size)
    return codes, absmax
