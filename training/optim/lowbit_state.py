"""Blockwise 8-bit / 4-bit storage for Adam's two moments.

Why: fp32 m and v cost 8 bytes per parameter. Storing each moment as one byte (or one nibble) per value
plus one fp32 scale per block brings that to ~2.03 (8-bit, block 256) or ~1.06 (4-bit, block 128) bytes
per parameter, in the spirit of 8-bit blockwise Adam (Dettmers et al.) and 4-bit states (Li et al., 2023).

The two moments need different maps:
- m is signed and spans orders of magnitude, so it is companded: level c of L = 2^(bits-1) - 1 stands
  for sign * (c / L)^2 * absmax. Small values keep more relative precision than with a linear map.
- v is non-negative and only ever used as sqrt(v), so sqrt(v) is stored on a *logarithmic* grid below
  the block's largest sqrt(v): level c of N = 2^bits stands for top * 2^(-(N-1-c) R/(N-1)), R octaves
  (`log_octaves`: 12 at 8 bits, 3.3% per level). Why logarithmic: every magnitude gets the same relative
  precision, so a quiet element beside loud ones in its block is stored as precisely as the loudest (a
  linear grid leaves it one or two levels). The grid is zero-free: values below its floor are rounded up
  to it, which shrinks their update, and m / (sqrt(v) + eps) can never blow up on a v rounded to 0. At 4
  bits the floor is within reach: an element 100x quieter than its block's loudest settles at ~2x its
  fp32 v (updates ~1.4x smaller) for as long as the block keeps a loud element.
- Rounding: re-encoding after a step rounds *stochastically* (up with the probability that makes the
  stored value unbiased), with a generator the optimizer seeds from the step. Why: with beta2 = 0.999 an
  EMA changes v by 0.1% per step, under half a level of any 8-bit grid, so round-to-nearest hands back
  the old code and v of an element whose gradient went quiet never decays (its updates stay ~10x too
  small). Without a generator (initial states, direct calls) values round to the nearest level. A tensor
  whose step was skipped keeps its stored codes: re-encoding its decoded moments could still move them.

All functions are pure tensor code (no host sync) and work on any device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from training.optim.devices import to_device

SUPPORTED_BITS = (4, 8)
# Version of the quantized state format, recorded in every optimizer state dict: codes only mean something
# under the maps that wrote them. 1 was a linear v grid; 2 the log grid; 3 also records each parameter's
# shape. A quantized state dict that records no format is refused: the versions before formats were
# recorded wrote the linear grid's codes or the log grid's under the same keys and shapes.
CODE_FORMAT = 3
DEFAULT_BLOCK = {8: 256, 4: 128}
KINDS = ("signed", "nonneg")  # m, v
_TINY = torch.finfo(torch.float32).tiny


def log_octaves(bits: int) -> int:
    """Dynamic range of the v grid, in octaves of sqrt(v) below the block's top: 12 at 8 bits (a 4096x
    range at 3.3% per level), 6 at 4 bits (64x at 32%). Why not wider: each rounding step moves a
    decaying v by one level, so the spread of v around its fp32 value grows with the level size. Measured
    at 4 bits on elements going 100x quiet (beta2 0.99): 8 octaves lift the floor's steady-state bias
    (median v 0.91x fp32's against 1.94x) but widen the spread while v decays (90% of elements within
    7.4x of fp32's v against 2.3x, median 0.36x against 0.68x)."""
    return 12 if bits == 8 else 6


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


def _take_upper(position: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """1 where a value at `position` (0: the lower level, 1: the upper) takes the upper level, else 0.

    Stochastic with a generator: with probability `position`, so the stored value is unbiased when the
    position is measured in the value's own domain. Without one: to the nearer level.
    """
    if generator is None:
        return position >= 0.5
    return torch.rand(position.shape, generator=generator, device=position.device) < position


def encode_signed(blocks: torch.Tensor, bits: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Companded absmax codes of fp32 (n_blocks, block) values: (packed uint8 codes, fp32 absmax per block)."""
    levels = 2 ** (bits - 1) - 1
    magnitude = blocks.abs()
    absmax = magnitude.amax(dim=1, keepdim=True)
    magnitude.div_(absmax.clamp_min(_TINY)).mul_(levels * levels)  # level c sits at c^2 in these units
    low = magnitude.sqrt().floor_().clamp_(max=levels - 1)
    position = torch.addcmul(magnitude, low, low, value=-1.0).div_(low * 2 + 1)  # between low^2 and (low+1)^2
    code = low.add_(_take_upper(position, generator)).copysign_(blocks)
    return _pack(code.add_(levels + 1), bits), absmax.reshape(-1)


def decode_signed(packed: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of encode_signed: fp32 (n_blocks, block)."""
    levels = 2 ** (bits - 1) - 1
    signed = _unpack(packed, bits).float().view(-1, block).sub_(levels + 1)
    return signed.abs().mul_(signed).mul_(scale.view(-1, 1) / (levels * levels))


def encode_nonneg(blocks: torch.Tensor, bits: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt of non-negative fp32 (n_blocks, block) values on the zero-free logarithmic grid:
    (packed codes, max sqrt per block). Rounding is decided on v itself, the quantity Adam averages."""
    top_code = 2 ** bits - 1
    per_octave = top_code / log_octaves(bits)  # codes per octave of sqrt(v)
    root = blocks.clamp_min(0).sqrt_()
    top = root.amax(dim=1, keepdim=True)
    continuous = root.div_(top.clamp_min(_TINY)).clamp_min_(2.0 ** -log_octaves(bits)).log2_()
    continuous.mul_(per_octave).add_(top_code)
    low = continuous.floor().clamp_(max=top_code - 1)
    # In v, level low + 1 is 2^(2 / per_octave) times level low; the position between them, measured on v:
    position = continuous.sub_(low).mul_(2 / per_octave).exp2_().sub_(1).div_(2.0 ** (2 / per_octave) - 1)
    return _pack(low.add_(_take_upper(position, generator)), bits), top.reshape(-1)


def decode_nonneg(packed: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Inverse of encode_nonneg: fp32 (n_blocks, block), never 0 in a block whose max is not 0."""
    top_code = 2 ** bits - 1
    codes = _unpack(packed, bits).float().view(-1, block)
    return codes.sub_(top_code).mul_(2 * log_octaves(bits) / top_code).exp2_().mul_(scale.view(-1, 1).square())


_CODECS = {"signed": (encode_signed, decode_signed), "nonneg": (encode_nonneg, decode_nonneg)}


def quantize(x: torch.Tensor, layout: StateLayout, kind: str,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor to (packed uint8 codes, fp32 scale per block); `kind` is "signed" (m) or "nonneg" (v)."""
    return _CODECS[kind][0](_blocks(x, layout), layout.bits, generator)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, layout: StateLayout, kind: str,
               shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`, as a tensor of `shape` and `dtype`."""
    values = _CODECS[kind][1](packed, scale, layout.bits, layout.block)
    return values.reshape(-1)[: layout.numel].view(shape).to(dtype)


@functools.lru_cache(maxsize=256)
def _bucket_blocks(numels: tuple[int, ...], block: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each tensor sits in the bucket's concatenated blocks: (index of each tensor's last block, True
    on that block's real elements, the tensor each block belongs to). Padding only ever sits in a tensor's
    last block. A few KB, not a byte per parameter."""
    positions = torch.arange(block, device=device)
    lasts, valid, offset = [], [], 0
    for n in numels:
        n_blocks = max(1, -(-n // block))
        offset += n_blocks
        lasts.append(offset - 1)
        valid.append(positions < n - (n_blocks - 1) * block)
    last = to_device(torch.tensor(lasts, dtype=torch.long), device)  # pinned: no sync inside a CUDA step
    owner = torch.searchsorted(last, torch.arange(offset, device=device))  # the first tensor ending at or after it
    return last, torch.stack(valid), owner


class BucketMoments:
    """A bucket's m and v decoded into two flat buffers at once, with per-tensor views for the foreach math.

    Why: coding tensor by tensor costs ~20 tiny ops per tensor; one concatenated buffer per bucket makes it
    ~20 ops per step in all, whatever the tensor count. Each tensor's region is padded to whole blocks, so
    the codes and scales split back per tensor exactly. The buffers are `dtype` (fp32, or fp64 for fp64
    parameters), never the parameters' bf16.
    """

    def __init__(self, params: list[torch.Tensor], layouts: list[StateLayout], m_codes: list[torch.Tensor],
                 m_scales: list[torch.Tensor], v_codes: list[torch.Tensor], v_scales: list[torch.Tensor],
                 dtype: torch.dtype) -> None:
        self.layouts = layouts
        self.bits, self.block = layouts[0].bits, layouts[0].block
        # The stored codes and scales, concatenated once: decoded here, and given back to skipped tensors in encode.
        self.stored = tuple(torch.cat(part) for part in (m_codes, m_scales, v_codes, v_scales))
        self.m_flat = decode_signed(self.stored[0], self.stored[1], self.bits, self.block).to(dtype)
        self.v_flat = decode_nonneg(self.stored[2], self.stored[3], self.bits, self.block).to(dtype)
        sizes = [layout.padded for layout in layouts]
        self.m = [c[: p.numel()].view(p.shape) for c, p in zip(self.m_flat.view(-1).split(sizes), params)]
        self.v = [c[: p.numel()].view(p.shape) for c, p in zip(self.v_flat.view(-1).split(sizes), params)]
        self.index = _bucket_blocks(tuple(layout.numel for layout in layouts), self.block, params[0].device)

    def encode(self, generator: torch.Generator | None,
               updated: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                             list[torch.Tensor], list[torch.Tensor]]:
        """Per-tensor (m codes, m scales, v codes, v scales) of the current buffers; padding coded as 0.

        `generator` drives the stochastic rounding (see the module docstring); None rounds to nearest.
        `updated` (bool, one per tensor, on the device) marks the tensors whose moments changed: the others
        get their stored codes and scales back bit for bit, since re-encoding even an unchanged decoded
        value may round it to a neighbouring level. None: every tensor changed.
        """
        last, valid, owner = self.index
        m, v = self.m_flat.float(), self.v_flat.float()  # .float() copies only for fp64 moments
        # Padding is coded as 0: the zero-free grid decodes v's to its floor, and m's must not keep any
        # value a loaded state left there (it would set its block's absmax for good).
        m[last] = m[last] * valid
        v[last] = v[last] * valid
        code_sizes = [layout.code_bytes for layout in self.layouts]
        block_counts = [layout.n_blocks for layout in self.layouts]
        parts = (*encode_signed(m, self.bits, generator), *encode_nonneg(v, self.bits, generator))
        if updated is not None:  # selected per block on the device: `updated` is never read on the host
            fresh = updated[owner].view(-1, 1)
            rows = fresh.shape[0]
            parts = tuple(torch.where(fresh, new.view(rows, -1), old.view(rows, -1)).view(-1)
                          for new, old in zip(parts, self.stored))
        sizes = (code_sizes, block_counts, code_sizes, block_counts)
        return tuple(list(part.split(size)) for part, size in zip(parts, sizes))


def state_bytes(states: dict) -> int:
    """Bytes held by all tensors in an optimizer's `state` mapping (moments, codes, scales, statistics)."""
    total = 0
    for entry in states.values():
        for value in entry.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
