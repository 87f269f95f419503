"""Block-wise quantisation of optimizer states: 8-bit (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", 2022, the format of bitsandbytes' 8-bit optimizers) and 4-bit (Li et
al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023, the choices of its code lpmm).

A tensor is cut into blocks of ``BLOCK_SIZE`` consecutive elements (the last block may be
short); each block is divided by its absolute maximum (``absmax``, kept in fp32) and every
scaled value in [-1, 1] is stored as the uint8 index of the nearest entry of a 256-entry
code map. The *dynamic* (tree) map spends its codes on a decimal exponent and a linear
fraction, so small values keep relative precision: ``dynamic_map(signed=True)`` for
signed states (Adam's first moment, Lion's momentum), ``signed=False`` for non-negative
ones (Adam's second moment).

Same map as ``bitsandbytes.functional.create_dynamic_map`` and the block size 256 that
bitsandbytes 0.50 uses for its 8-bit optimizers on CPU; the tests compare both.

4-bit (two codes per byte, the even element in the high nibble as torchao packs them): the
first moment uses the 16-entry dynamic-exponent map (``dynamic_map(True, max_exponent_bits=3,
total_bits=4)``, lpmm's "nonlinear" map) with an absmax per block of 128; the second moment the
linear map without zero (``linear_map()``: 1/16 ... 16/16, lpmm's "power-1") with rank-1
normalisation: element (i, j) is scaled by min(max of row i, max of column j) (and, for n-D
tensors, the minimum over the maxima of every dimension); 1-D tensors fall back to blocks of 128.

Every value becomes the index of the nearest code (ties to the lower code), found exactly and
fast by :func:`_code_index` (tensor code) and :func:`nearest_code_table` (the C++ code; the linear
map's by arithmetic in the rank-1 codec). Functions take tensors only (no optimizer objects). On CPU
the C++ codec of :mod:`optim_plugins.kernels.cpp` does each quantiser and dequantiser in one pass per
block, rank-1 ones of 2-D tensors in two passes and one (the same bytes; this module's tensor code
runs elsewhere, for rank-1 n-D tensors and where it cannot be built), and the compiled backend's
loops code block-wise 8/4-bit states inside the update with the same C++ (``kernels/cpp/codec.h``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cpp as cpp_kernels

BLOCK_SIZE = 256
BLOCK_SIZE_4BIT = 128


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


def linear_map(bits: int = 4, device: torch.device | str | None = None) -> Tensor:
    """The linear unsigned map without zero: ``k / 2**bits`` for k = 1 ... 2**bits (lpmm's "power-1")."""
    code = torch.linspace(0, 1, 2**bits + 1, dtype=torch.float32)[1:]
    return code if device is None else code.to(device)


@functools.lru_cache(maxsize=None)
def _midpoints(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    code = dynamic_map(signed, device)
    return code, (code[1:] + code[:-1]) / 2


# ----------------------------------------------------------------------------- nearest code, exactly


@functools.lru_cache(maxsize=None)
def _search(kind: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(code, midpoints + [inf], table, steps)`` of the map ``kind`` for :func:`_code_index`.

    ``table[h]`` is the number of midpoints below every float32 whose upper 16 bits are ``h``
    (one bf16-wide interval of values); ``steps`` is the most midpoints any such interval holds.
    """
    code = {"dynamic_signed": lambda: dynamic_map(True), "dynamic_unsigned": lambda: dynamic_map(False),
            "dynamic4_signed": lambda: dynamic_map(True, max_exponent_bits=3, total_bits=4),
            "linear4": lambda: linear_map(4)}[kind]()
    midpoints = (code[1:] + code[:-1]) / 2
    high = torch.arange(-(2**15), 2**15, dtype=torch.int32) << 16  # upper 16 bits, lower ones 0 ...
    ends = (high.view(torch.float32), (high | 0xFFFF).view(torch.float32))  # ... and 0xFFFF
    low = torch.where(torch.isnan(ends[1]), ends[0], torch.minimum(*ends))  # -inf: its own bucket start
    top = torch.where(torch.isnan(ends[1]), ends[0], torch.maximum(*ends))
    table = torch.bucketize(low, midpoints).to(torch.int32)  # NaN -> len(midpoints), as bucketize
    steps = int((torch.bucketize(top, midpoints, right=True) - table)[~torch.isnan(low)].max())
    padded = torch.cat([midpoints, midpoints.new_tensor([float("inf")])])
    return code.to(device), padded.to(device), table.to(device), steps


@functools.lru_cache(maxsize=None)
def nearest_code_table(kind: str) -> Tensor | None:
    """The search of :func:`_code_index` without reading a midpoint: per upper 16 bits ``h`` of a
    float32 (65536 int32, CPU), bits 0-7 hold how many midpoints lie below the bucket and bits 8-23
    the order key of the one midpoint inside it (0xFFFF: none). A value's code is then
    ``base + (key(x) > key)``, where ``key`` is a float's lower 16 bits, reversed (0xFFFF - them) for
    negative floats, whose bits grow as they fall; the same index as ``_code_index`` for every float
    (tested on every bucket's edges). None for a map with two midpoints in one bucket (none here).
    The C++ codec (``kernels/cpp/codec.h``) codes with it: one table read per value.
    """
    _, midpoints, table, steps = _search(kind, torch.device("cpu"))
    if steps > 1 or table.max() > 255:
        return None
    high = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    key = torch.full_like(high, 0xFFFF)
    inside = midpoints[:-1].view(torch.int32)  # without the +inf pad
    low = inside & 0xFFFF
    key[((inside >> 16) + 2**15).long()] = torch.where(inside < 0, 0xFFFF - low, low)
    return table | (key << 8)


def _code_index(x: Tensor, kind: str) -> Tensor:
    """Index of the nearest code of map ``kind`` for each value of float32 ``x`` (int32, x's shape).

    Bitwise the same as ``torch.bucketize(x, midpoints)`` (ties go to the lower code, NaN to the
    last), but without a binary search per element: the upper 16 bits of a value look up how
    many midpoints lie below its bf16-wide interval, and ``steps`` (1 for these maps) compares
    with the midpoints inside it. (Negative signalling NaNs 0xFF800001-0xFF80FFFF, which no
    arithmetic produces, would get index 0 instead of the last.)
    """
    _, midpoints, table, steps = _search(kind, x.device)
    x = x.contiguous()
    index = torch.index_select(table, 0, ((x.view(torch.int32) >> 16) + 2**15).view(-1)).view(x.shape)
    for _ in range(steps):
        index += torch.index_select(midpoints, 0, index.view(-1)).view(x.shape) < x
    return index


def map_name(bits: int, signed: bool) -> str:
    """The name of the code map of the block-wise formats (8 bits: dynamic; 4 bits: dynamic-exponent
    signed, linear without zero unsigned), as ``_search`` and the C++ loops (kernels/cpp/loops.py) know it."""
    if bits == 8:
        return "dynamic_signed" if signed else "dynamic_unsigned"
    return "dynamic4_signed" if signed else "linear4"


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
    kind = map_name(8, signed)
    if x.device.type == "cpu" and cpp_kernels.quantize_blockwise_(x, codes, absmax, nearest_code_table(kind),
                                                                  block_size, bits=8, positive_not_zero=not signed):
        return
    blocks = _blocks(x.float(), block_size)
    torch.amax(blocks.abs(), dim=1, out=absmax)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    index = _code_index(scaled, kind).clamp_(max=255)
    if not signed:  # a positive second moment never becomes 0: m / (sqrt(0) + eps) would explode
        index = torch.maximum(index, (scaled > 0).int())
    codes.view(-1).copy_(index.view(-1)[: codes.numel()])


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool, block_size: int = BLOCK_SIZE,
                         out: Tensor | None = None) -> Tensor:
    """The fp32 tensor that ``codes`` and ``absmax`` stand for (written into ``out`` when given)."""
    code = _midpoints(bool(signed), codes.device)[0]
    if codes.device.type == "cpu":
        result = out if out is not None else torch.empty(codes.shape, dtype=torch.float32)
        if cpp_kernels.dequantize_blockwise(codes, absmax, code, result, block_size, bits=8):
            return result
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


# ----------------------------------------------------------------------------- 4-bit


def pack_4bit(index: Tensor) -> Tensor:
    """Two 4-bit codes per byte: element 2k in the high nibble, 2k+1 in the low one (odd length: 0-padded)."""
    flat = index.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` 4-bit codes of ``packed`` (uint8), as int64 indices."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel].long()


def num_bytes_4bit(numel: int) -> int:
    return -(-numel // 2)


def quantize_4bit_blockwise_(x: Tensor, packed: Tensor, absmax: Tensor, signed: bool,
                             block_size: int = BLOCK_SIZE_4BIT) -> None:
    """Store ``x`` into ``packed`` (uint8, ceil(numel/2)) and ``absmax`` (fp32, one per block), in place.

    ``signed=True``: the dynamic-exponent map (first moment); False: the linear map without
    zero (second moment), so a value below 1/32 of its block's absmax becomes 1/16 of it.
    """
    kind = map_name(4, signed)
    if x.device.type == "cpu" and cpp_kernels.quantize_blockwise_(x, packed, absmax, nearest_code_table(kind),
                                                                  block_size, bits=4, positive_not_zero=False):
        return
    blocks = _blocks(x.float(), block_size)
    torch.amax(blocks.abs(), dim=1, out=absmax)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    packed.copy_(pack_4bit(_code_index(scaled, kind).view(-1)[: x.numel()]))


def dequantize_4bit_blockwise(packed: Tensor, absmax: Tensor, shape: torch.Size, signed: bool,
                              block_size: int = BLOCK_SIZE_4BIT) -> Tensor:
    """The fp32 tensor of ``shape`` that ``packed`` and ``absmax`` stand for."""
    code = _search(map_name(4, signed), packed.device)[0]
    numel = torch.Size(shape).numel()
    if packed.device.type == "cpu":
        out = torch.empty(shape, dtype=torch.float32)
        if cpp_kernels.dequantize_blockwise(packed, absmax, code, out, block_size, bits=4):
            return out
    values = _blocks(code[unpack_4bit(packed, numel)], block_size).mul_(absmax.unsqueeze(1))
    return values.view(-1)[:numel].view(shape)


def rank1_maxima(x: Tensor) -> Tensor:
    """The maxima of ``|x|`` over every dimension but one, for each dimension, concatenated
    (length ``sum(x.shape)``): the statistics of rank-1 normalisation."""
    magnitude = x.float().abs()
    dims = range(x.dim())
    return torch.cat([magnitude.amax(dim=[d for d in dims if d != i]) for i in dims])


def rank1_scale(maxima: Tensor, shape: torch.Size) -> Tensor:
    """The rank-1 scale of every element: the minimum of the maxima of its row, column, ..."""
    scale = None
    for i, part in enumerate(maxima.split(list(shape))):
        view = part.view([-1 if d == i else 1 for d in range(len(shape))])
        scale = view if scale is None else torch.minimum(scale, view)
    return scale.expand(shape)


def quantize_4bit_rank1_(x: Tensor, packed: Tensor, maxima: Tensor) -> None:
    """Store non-negative ``x`` (2-D or more) into ``packed`` with the linear map, scaled rank-1;
    ``maxima`` (fp32, ``sum(x.shape)``) receives :func:`rank1_maxima`. In place."""
    if x.dim() == 2 and cpp_kernels.quantize_4bit_rank1_2d_(x, packed, maxima):
        return
    maxima.copy_(rank1_maxima(x))
    scaled = x.float() / rank1_scale(maxima, x.shape).clamp_min(torch.finfo(torch.float32).tiny)
    if x.device.type == "cpu" and cpp_kernels.quantize_blockwise_(scaled, packed, None, nearest_code_table("linear4"),
                                                                  BLOCK_SIZE_4BIT, bits=4, positive_not_zero=False):
        return
    packed.copy_(pack_4bit(_code_index(scaled, "linear4")))


def dequantize_4bit_rank1(packed: Tensor, maxima: Tensor, shape: torch.Size) -> Tensor:
    """The fp32 tensor of ``shape`` that ``packed`` and the rank-1 ``maxima`` stand for."""
    code = _search("linear4", packed.device)[0]
    if len(shape) == 2 and packed.device.type == "cpu":
        values = torch.empty(shape, dtype=torch.float32)
        if cpp_kernels.dequantize_4bit_rank1_2d(packed, maxima, values):
            return values
    if packed.device.type == "cpu":
        values = torch.empty(shape, dtype=torch.float32)
        if cpp_kernels.dequantize_blockwise(packed, None, code, values, BLOCK_SIZE_4BIT, bits=4):
            return values.mul_(rank1_scale(maxima, shape))
    return code[unpack_4bit(packed, torch.Size(shape).numel())].view(shape) * rank1_scale(maxima, shape)
