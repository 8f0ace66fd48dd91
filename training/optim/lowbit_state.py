"""Blockwise 8-bit / 4-bit storage for Adam's two moments.

Why: fp32 m and v cost 8 bytes per parameter. Storing each moment as one byte (or one nibble) per value
plus one fp32 scale per block brings that to ~2.03 (8-bit, block 256) or ~1.06 (4-bit, block 128) bytes
per parameter, in the spirit of 8-bit blockwise Adam (Dettmers et al.) and 4-bit states (Li et al., 2023).

The two moments need different maps:
- m is signed and spans orders of magnitude, so it is companded: the code stores
  sign(x) * sqrt(|x| / absmax) on a uniform signed grid. Small values keep more relative precision
  than with a linear map.
- v is non-negative and only ever used as sqrt(v) in the denominator, so sqrt(v) is stored on a
  *zero-free* linear grid (levels (c+1)/2^bits * max). A small non-zero v can never be rounded to 0,
  which would blow up m / (sqrt(v) + eps): it is rounded up instead, which only shrinks that update.

All functions are pure tensor code (no host sync) and work on any device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
DEFAULT_BLOCK = {8: 256, 4: 128}


@dataclass(frozen=True)
class StateLayout:
    """How one moment of one tensor is stored: bit width, block size and the tensor's element count."""

    bits: int
    block: int
    numel: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"state_bits must be one of {SUPPORTED_BITS} for quantized states, got {self.bits}")
        if self.block <= 0 or self.block % 2:
            raise ValueError(f"block_size must be a positive even number, got {self.block}")

    @property
    def n_blocks(self) -> int:
        return max(1, -(-self.numel // self.block))

    @property
    def padded(self) -> int:
        return self.n_blocks * self.block

    @property
    def code_bytes(self) -> int:
        return self.padded * self.bits // 8


def _blocks(x: torch.Tensor, layout: StateLayout) -> torch.Tensor:
    """Flatten to fp32 and pad with zeros to whole blocks: (n_blocks, block)."""
    flat = x.reshape(-1).float()
    pad = layout.padded - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(layout.n_blocks, layout.block)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2^bits) to bytes: identity at 8 bits, two nibbles per byte at 4 bits."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes
    return codes[0::2] | (codes[1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)


def encode_signed(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Companded absmax codes of fp32 (n_blocks, block) values: (packed uint8 codes, fp32 absmax per block)."""
    levels = 2 ** (bits - 1) - 1
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    unit = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(torch.copysign(unit.abs().sqrt(), unit) * levels)
    return _pack(q + (levels + 1), bits), absmax.reshape(-1)


def decode_signed(packed: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of encode_signed: fp32 (n_blocks, block)."""
    levels = 2 ** (bits - 1) - 1
    unit = (_unpack(packed, bits).float().view(-1, block) - (levels + 1)) / levels
    return unit.abs() * unit * scale.view(-1, 1)


def encode_nonneg_sqrt(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt of non-negative fp32 (n_blocks, block) values on a zero-free grid: (packed codes, max sqrt per block)."""
    root = blocks.clamp_min(0).sqrt()
    top = root.amax(dim=1, keepdim=True)
    n = 2 ** bits
    codes = torch.round(root / top.clamp_min(torch.finfo(torch.float32).tiny) * n) - 1
    return _pack(codes.clamp(0, n - 1), bits), top.reshape(-1)


def decode_nonneg_sqrt(packed: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of encode_nonneg_sqrt: fp32 (n_blocks, block), never 0 in a block whose max is not 0."""
    n = 2 ** bits
    root = (_unpack(packed, bits).float().view(-1, block) + 1) / n * scale.view(-1, 1)
    return root.square()


def quantize_signed(x: torch.Tensor, layout: StateLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One signed tensor (m) to (packed uint8 codes, fp32 scale per block)."""
    return encode_signed(_blocks(x, layout), layout.bits)


def dequantize_signed(packed: torch.Tensor, scale: torch.Tensor, layout: StateLayout,
                      shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    values = decode_signed(packed, scale, layout.bits, layout.block)
    return values.reshape(-1)[: layout.numel].view(shape).to(dtype)


def quantize_nonneg_sqrt(v: torch.Tensor, layout: StateLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One non-negative tensor (v) to (packed uint8 codes, fp32 max of sqrt(v) per block)."""
    return encode_nonneg_sqrt(_blocks(v, layout), layout.bits)


def dequantize_nonneg_sqrt(packed: torch.Tensor, scale: torch.Tensor, layout: StateLayout,
                           shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    values = decode_nonneg_sqrt(packed, scale, layout.bits, layout.block)
    return values.reshape(-1)[: layout.numel].view(shape).to(dtype)


@functools.lru_cache(maxsize=64)
def _tail_mask(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding only ever sits in a tensor's last block: (index of each tensor's last block in the bucket's
    concatenated blocks, True on that block's real elements). A few KB, not a byte per parameter."""
    # Built on the device with scalar fills only: a host-to-device copy would sync inside a CUDA step.
    last = torch.empty(len(numels), dtype=torch.long, device=device)
    positions = torch.arange(block, device=device)
    valid, offset = [], 0
    for i, n in enumerate(numels):
        n_blocks = max(1, -(-n // block))
        offset += n_blocks
        last[i] = offset - 1
        valid.append(positions < n - (n_blocks - 1) * block)
    return last, torch.stack(valid)


class BucketMoments:
    """A bucket's m and v decoded into two flat fp buffers at once, with per-tensor views for the foreach math.

    Why: coding tensor by tensor costs ~20 tiny ops per tensor; one concatenated buffer per bucket makes it
    ~20 ops per step in all, whatever the tensor count. Each tensor's region is padded to whole blocks, so
    the codes and scales split back per tensor exactly.
    """

    def __init__(self, params: list[torch.Tensor], layouts: list[StateLayout], m_codes: list[torch.Tensor],
                 m_scales: list[torch.Tensor], v_codes: list[torch.Tensor], v_scales: list[torch.Tensor]) -> None:
        self.layouts = layouts
        self.bits, self.block = layouts[0].bits, layouts[0].block
        dtype = params[0].dtype
        self.m_flat = decode_signed(torch.cat(m_codes), torch.cat(m_scales), self.bits, self.block).to(dtype)
        self.v_flat = decode_nonneg_sqrt(torch.cat(v_codes), torch.cat(v_scales), self.bits, self.block).to(dtype)
        sizes = [layout.padded for layout in layouts]
        self.m = [c[: p.numel()].view(p.shape) for c, p in zip(self.m_flat.view(-1).split(sizes), params)]
        self.v = [c[: p.numel()].view(p.shape) for c, p in zip(self.v_flat.view(-1).split(sizes), params)]
        self.tail = _tail_mask(tuple(layout.numel for layout in layouts), self.block, params[0].device)

    def encode(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per-tensor (m codes, m scales, v codes, v scales) of the current buffers; padding coded as 0."""
        last, valid = self.tail
        m, v = self.m_flat.float(), self.v_flat.float()  # .float() copies only for bf16 moments
        v[last] = v[last] * valid  # the zero-free grid decodes padding to top/2^bits: code it as 0 again
        code_sizes = [layout.code_bytes for layout in self.layouts]
        block_counts = [layout.n_blocks for layout in self.layouts]
        m_codes, m_scales = encode_signed(m, self.bits)
        v_codes, v_scales = encode_nonneg_sqrt(v, self.bits)
        return (list(m_codes.split(code_sizes)), list(m_scales.split(block_counts)),
                list(v_codes.split(code_sizes)), list(v_scales.split(block_counts)))


def state_bytes(states: dict) -> int:
    """Bytes held by all tensors in an optimizer's `state` mapping (moments, codes, scales, statistics)."""
    total = 0
    for entry in states.values():
        for value in entry.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
