"""Simulated ("fake") 4-bit training as the Stable-SPAM paper ran it: quantize in the forward pass, STE back.

- INT4 weights: flattened into groups (default 256), asymmetric min-max over levels 0..15,
  scale = (max - min)/15 clamped at 1e-5, a rounded zero point, round to nearest. Two corners differ
  from the reference code, which clamps max - min at 1e-5 before dividing by 15 and clamps the zero
  point to 0..15: a group of range between 1e-5 and 1.5e-4 gets the coarser scale 1e-5 here (range/15
  there: 7e-5 errs by up to 5e-6 here, 2.4e-6 there), and an all-positive group keeps its values (the
  reference clips them into 0..15 x scale: errors up to the group's minimum, 1.0 against 0.033 measured).
- INT4 activations: the input of each quantized linear, in groups along the feature dimension
  (default 256: what the reference code actually ran, not the 64 its scripts ask for); the top-k (2)
  absolute values per group stay in full precision; the rest symmetric absmax signed 4-bit
  (x * 7 / absmax). `act_rounding="nearest"` (the default) rounds to nearest, and floor(x + U)
  (unbiased) when stochastic; "floor" is what the reference code ran, to compare with it: it truncates,
  floor(x), and with stochastic rounding floor(x + U - 0.5), so codes are biased half a step down
  (measured on N(0, 1) activations, groups of 256: mean error -0.18 against +0.001), which shifts every
  quantized layer's output, and stochastic rounding does not remove it.
- FP4: per-group absmax scale onto an FP4 grid with the top-k outliers kept, for weights and
  activations alike. "fp4_e1m2" is the grid the reference code's E1M2 fake-quantizer (1 exponent bit,
  2 mantissa bits, bias 1) actually produces: its exponent always lands on the lowest binade, so every
  value is rounded with one step of absmax/4, i.e. {0, 1/4, 1/2, 3/4, 1} x absmax (5 magnitudes, 9
  levels), not the 8 magnitudes (0..1.75) of an E1M2 format. "fp4_e2m1" is the OCP MX hardware format,
  {0, 0.5, 1, 1.5, 2, 3, 4, 6} x absmax/6. Values round to the nearest level.
- Straight-through estimator: forward with the quantized tensor, gradient as if unquantized; the
  backward of the linear therefore sees the quantized activation (grad_W = g^T x_q) and weight
  (grad_x = g W_q). Gradients themselves are not quantized.
Master weights stay in the model's own dtype (fp32 or bf16); quantization math runs in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("int4", "fp4_e1m2", "fp4_e2m1")
ACT_ROUNDING = ("floor", "nearest")
# Non-negative magnitudes of each FP4 grid, largest = the group's absmax. E1M2 as the reference code ran
# it (see the module docstring); E2M1: the OCP MX FP4 values.
FP4_GRIDS = {
    "fp4_e1m2": (0.0, 0.25, 0.5, 0.75, 1.0),
    "fp4_e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}
# The reference code's floor on a group's absmax (activations and FP4).
MIN_ABSMAX = 1e-6
MASTER_DTYPES = (torch.float32, torch.bfloat16)
# The output head's name in models that do not say which layer it is (no get_output_embeddings).
HEAD_NAMES = ("lm_head",)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. `None` as a format leaves that side in full precision.

    `outliers` is the top-k kept per group for activations (both formats) and for FP4 weights;
    INT4 weights are plain asymmetric min-max, as in the paper. `act_rounding` applies to INT4
    activations ("nearest"; "floor": as the reference code ran, biased). The model's output head
    (`get_output_embeddings()`, or a layer named in HEAD_NAMES for models without that method) is
    skipped unless `quantize_head` is set. `exclude` names (full or last component) are never swapped;
    `include`, when given, restricts swapping to those names.
    """

    weight_format: str | None = "int4"
    act_format: str | None = "int4"
    weight_group: int = 256
    act_group: int = 256
    outliers: int = 2
    stochastic_round: bool = False
    act_rounding: str = "nearest"
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None
    quantize_head: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_format", "act_format"):
            value = getattr(self, name)
            if value is not None and value not in FORMATS:
                raise ValueError(f"invalid {name}={value!r}: must be one of {FORMATS} or None")
        if self.act_rounding not in ACT_ROUNDING:
            raise ValueError(f"invalid act_rounding={self.act_rounding!r}: must be one of {ACT_ROUNDING}")
        for name, least in (("weight_group", 1), ("act_group", 1), ("outliers", 0)):
            value = getattr(self, name)  # an int: 256.0 failed in torch at the first forward
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"invalid {name}={value!r}: must be an int >= {least}")
        if self.outliers >= min(self.weight_group, self.act_group):
            raise ValueError(f"invalid outliers={self.outliers!r}: must be >= 0 and smaller than the group sizes")


def _flat_groups(x: torch.Tensor, group: int, repeat_last: bool) -> torch.Tensor:
    """Row-major flatten into rows of `group` (fp32), the tail padded so the padding moves no scale: by
    repeating the last value for min-max (a zero would widen an all-positive range), by zeros for absmax
    with outliers (copies of a large last value would take the outlier slots of the real ones)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad) if repeat_last else flat.new_zeros(pad)])
    return flat.view(-1, group)


def _last_dim_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Groups of `group` consecutive features along the last dim (fp32), zero-padded: (rows, group)."""
    x = x.float()
    pad = (-x.shape[-1]) % group
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(-1, group)


def _ungroup_last_dim(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    features = like.shape[-1]
    return groups.reshape(*like.shape[:-1], -1)[..., :features].to(like.dtype)


def _ungroup_flat(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


def _outlier_mask(groups: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k largest |values| of each row."""
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if k:
        mask.scatter_(1, groups.abs().topk(k, dim=1).indices, True)
    return mask


def int_asym_groups(groups: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Asymmetric min-max quantize-dequantize of each row; error <= scale/2 per element."""
    top = 2 ** bits - 1
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scale = ((high - low) / top).clamp_min(1e-5)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, top)
    return (q - zero) * scale


def int_sym_groups(groups: torch.Tensor, bits: int = 4, outliers: int = 2, stochastic: bool = False,
                   rounding: str = "nearest") -> torch.Tensor:
    """Symmetric absmax signed quantize-dequantize of each row, its top-`outliers` |values| kept exact.

    rounding "nearest": round(x), or floor(x + U) when stochastic; "floor" (the reference code): floor(x),
    or floor(x + U - 0.5) when stochastic.
    """
    mask = _outlier_mask(groups, outliers)
    rest = groups.masked_fill(mask, 0.0)
    levels = 2 ** (bits - 1) - 1
    absmax = rest.abs().amax(dim=1, keepdim=True).clamp_min(MIN_ABSMAX)
    scaled = rest * (levels / absmax)  # the reference's order of operations: floor() is sensitive to it
    if stochastic:
        rounded = torch.floor(scaled + torch.rand_like(scaled) - (0.5 if rounding == "floor" else 0.0))
    else:
        rounded = torch.floor(scaled) if rounding == "floor" else torch.round(scaled)
    q = torch.clamp(rounded, -levels - 1, levels) * absmax / levels
    return torch.where(mask, groups, q)


@functools.lru_cache(maxsize=None)
def _grid(fmt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The FP4 grid as a device tensor, made once per device (no host-to-device copy per forward)."""
    return torch.tensor(FP4_GRIDS[fmt], dtype=dtype, device=device)


def fp4_groups(groups: torch.Tensor, fmt: str, outliers: int = 2) -> torch.Tensor:
    """Per-row absmax scaling onto an FP4 grid, round to nearest, top-`outliers` |values| kept exact."""
    grid = _grid(fmt, groups.device, groups.dtype)
    mask = _outlier_mask(groups, outliers)
    rest = groups.masked_fill(mask, 0.0)
    scale = rest.abs().amax(dim=1, keepdim=True).clamp_min(MIN_ABSMAX) / grid[-1]
    scaled = rest / scale
    index = torch.bucketize(scaled.abs(), (grid[1:] + grid[:-1]) / 2)
    q = grid[index] * scaled.sign() * scale
    return torch.where(mask, groups, q)


def quantize_weight(w: torch.Tensor, fmt: str, group: int = 256, outliers: int = 2) -> torch.Tensor:
    """Quantize-dequantize a weight in flattened groups (no gradient; see `ste`)."""
    groups = _flat_groups(w.detach(), group, repeat_last=fmt == "int4")
    q = int_asym_groups(groups) if fmt == "int4" else fp4_groups(groups, fmt, outliers)
    return _ungroup_flat(q, w)


def quantize_activation(x: torch.Tensor, fmt: str, group: int = 256, outliers: int = 2,
                        stochastic: bool = False, rounding: str = "nearest") -> torch.Tensor:
    """Quantize-dequantize an activation in feature groups (no gradient; see `ste`)."""
    groups = _last_dim_groups(x.detach(), group)
    if fmt == "int4":
        q = int_sym_groups(groups, 4, outliers, stochastic, rounding)
    else:
        q = fp4_groups(groups, fmt, outliers)
    return _ungroup_last_dim(q, x)


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of `quantized`, the gradient of identity in `x`.

    Why this form: x - x.detach() is exactly 0, so the forward value is `quantized` bit for bit (the
    usual x + (q - x) rounds twice, and in bf16 lands off the grid)."""
    return quantized.detach() + (x - x.detach())


class QuantLinear(nn.Linear):
    """nn.Linear whose weight and input are fake-quantized in the forward pass (same parameters, same keys)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: QuantConfig = QuantConfig(),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        """Wrap an existing layer, reusing its Parameter objects (an optimizer built before still applies)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        # A model swapped while in eval mode stays there: stochastic rounding only while training.
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        weight = self.weight
        if cfg.weight_format is not None:
            weight = ste(weight, quantize_weight(weight, cfg.weight_format, cfg.weight_group, cfg.outliers))
        if cfg.act_format is not None:
            x = ste(x, quantize_activation(x, cfg.act_format, cfg.act_group, cfg.outliers,
                                           cfg.stochastic_round and self.training, cfg.act_rounding))
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"{super().extra_repr()}, weight={cfg.weight_format}/g{cfg.weight_group}, "
                f"act={cfg.act_format}/g{cfg.act_group}/{cfg.act_rounding}, outliers={cfg.outliers}")


def _excluded(name: str, config: QuantConfig) -> bool:
    last = name.rsplit(".", 1)[-1]
    if name in config.exclude or last in config.exclude:
        return True
    return config.include is not None and name not in config.include and last not in config.include


def quantize_model(model: nn.Module, config: QuantConfig | None = None,
                   master_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the model's nn.Linear layers for QuantLinear in place and return the model.

    Embeddings and norms are never touched (they are not nn.Linear); the output head is left out unless
    `config.quantize_head` is set, and anything named in `config.exclude` always.
    `master_dtype` (torch.float32 or torch.bfloat16) casts the master weights first.
    """
    config = config or QuantConfig()
    if master_dtype is not None:
        if master_dtype not in MASTER_DTYPES:
            raise ValueError(f"master_dtype must be one of {MASTER_DTYPES}, got {master_dtype}")
        model.to(master_dtype)
    head = None
    if not config.quantize_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            head = next((module for name, module in model.named_modules()
                         if name.rsplit(".", 1)[-1] in HEAD_NAMES), None)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module is not head and not _excluded(name, config)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module, config))
    return model


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the model's QuantLinear layers (what quantize_model swapped)."""
    return [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
