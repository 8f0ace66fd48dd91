"""The shared machinery of the spike-aware optimizers: tensor buckets, moment storage, state validation.

Why a base class: StableSPAM and SPAM differ only in how they reshape the gradient and schedule the
reset. Both keep Adam's m and v (fp32 or blockwise 8/4-bit), a small per-tensor statistics vector
(kept as a device tensor so that no step ever needs `.item()`), and a count of skipped non-finite steps.
The step works on buckets of tensors that share a device and dtype, with `torch._foreach_*` ops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from training.optim import lowbit_state as lb

STATE_BITS = (32, 8, 4)
# Options that decide the layout of a tensor's state: loading a state saved with other values is an error.
LAYOUT_OPTIONS = ("state_bits", "block_size")


def check_range(name: str, value: float, low: float, high: float, high_open: bool = True) -> None:
    """Raise a ValueError naming the hyperparameter when it is outside [low, high) (or [low, high])."""
    ok = low <= value < high if high_open else low <= value <= high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"invalid {name}={value!r}: must be in [{low}, {high}{bracket}")


def check_common(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 state_bits: int, block_size: int | None) -> int | None:
    """Validate the options every spike-aware optimizer shares; return the resolved block size."""
    check_range("lr", lr, 0.0, math.inf)
    if len(betas) != 2:
        raise ValueError(f"invalid betas={betas!r}: need two values")
    check_range("betas[0]", betas[0], 0.0, 1.0)
    check_range("betas[1]", betas[1], 0.0, 1.0)
    check_range("eps", eps, 0.0, math.inf)
    check_range("weight_decay", weight_decay, 0.0, math.inf)
    if state_bits not in STATE_BITS:
        raise ValueError(f"invalid state_bits={state_bits!r}: must be one of {STATE_BITS}")
    if state_bits == 32:
        if block_size is not None:
            raise ValueError(f"invalid block_size={block_size!r}: it only applies to quantized states (state_bits 8 or 4)")
        return None
    block = lb.DEFAULT_BLOCK[state_bits] if block_size is None else block_size
    lb.StateLayout(state_bits, block, 1)  # validates the block size
    return block


def stats_dtype(param: torch.Tensor) -> torch.dtype:
    """Per-tensor statistics in fp32, or fp64 for fp64 parameters (so tests can compare at 1e-12)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def cosine_ramp(step: int, length: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step >= length)."""
    if length <= 0:
        return end
    frac = min(step, length) / length
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def masked_scale(grads: list[torch.Tensor], finite: torch.Tensor, tau: torch.Tensor | None,
                 ratio: torch.Tensor | None) -> list[torch.Tensor]:
    """New gradient tensors: elements with |g| > tau scaled by ratio, whole tensor zeroed where not finite.

    One fused `where` per tensor (foreach has no select); the scalars stay on the device.
    """
    out = []
    keep = finite.unbind()
    if tau is None:
        for g, k in zip(grads, keep):
            out.append(torch.where(k, g, 0))
        return out
    for g, k, t, r in zip(grads, keep, tau.unbind(), ratio.unbind()):
        out.append(torch.where(k, torch.where(g.abs() > t, g * r, g), 0))
    return out


class MomentOptimizer(Optimizer):
    """Adam-style optimizer base: buckets, m/v storage (fp32 or quantized), load-time validation."""

    stats_fields: tuple[str, ...] = ()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, plus the group's global step counter T (host int: schedules need no device sync)."""
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("step", 0)

    # ---- state --------------------------------------------------------------------------------
    def _layout(self, p: torch.Tensor, group: dict) -> lb.StateLayout | None:
        bits = group["state_bits"]
        return None if bits == 32 else lb.StateLayout(bits, group["block_size"], p.numel())

    def _expected_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every state tensor of `p`; the contract checked on load."""
        spec = {"stats": ((len(self.stats_fields),), stats_dtype(p))}
        layout = self._layout(p, group)
        if layout is None:
            spec["exp_avg"] = (tuple(p.shape), p.dtype)
            spec["exp_avg_sq"] = (tuple(p.shape), p.dtype)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                spec[name] = ((layout.code_bytes,), torch.uint8)
                spec[name + "_scale"] = ((layout.n_blocks,), torch.float32)
        return spec

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            for name, (shape, dtype) in self._expected_state(p, group).items():
                state[name] = torch.zeros(shape, dtype=dtype, device=p.device)
            if group["state_bits"] != 32:  # all-zero blocks must decode to 0 whatever the code
                layout = self._layout(p, group)
                zeros = torch.zeros_like(p)
                state["exp_avg"], state["exp_avg_scale"] = lb.quantize_signed(zeros, layout)
                state["exp_avg_sq"], state["exp_avg_sq_scale"] = lb.quantize_nonneg_sqrt(zeros, layout)
        return state

    def _load_moments(self, params: list[torch.Tensor], states: list[dict],
                      group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], lb.BucketMoments | None]:
        """m and v of a bucket as tensors the foreach math updates in place (decoded copies when quantized)."""
        if group["state_bits"] == 32:
            return [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], None
        coded = lb.BucketMoments(params, [self._layout(p, group) for p in params],
                                 [s["exp_avg"] for s in states], [s["exp_avg_scale"] for s in states],
                                 [s["exp_avg_sq"] for s in states], [s["exp_avg_sq_scale"] for s in states])
        return coded.m, coded.v, coded

    def _store_moments(self, states: list[dict], coded: lb.BucketMoments | None) -> None:
        """Write decoded moments back as codes (a no-op for fp32 states, which were updated in place)."""
        if coded is None:
            return
        parts = coded.encode()
        names = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
        for name, chunks in zip(names, parts):
            torch._foreach_copy_([s[name] for s in states], chunks)

    def skipped_steps(self) -> int:
        """Total (tensor, step) pairs skipped for non-finite gradients. Syncs: call it for logging only."""
        idx = self.stats_fields.index("skipped")
        total = sum(s["stats"][idx] for s in self.state.values() if "stats" in s)
        return int(total) if torch.is_tensor(total) else 0

    def state_bytes_per_param(self) -> float:
        """Bytes of optimizer state per parameter element (moments, codes, scales and statistics)."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"] if p in self.state)
        return lb.state_bytes(self.state) / max(n, 1)

    # ---- step ---------------------------------------------------------------------------------
    def _buckets(self, group: dict) -> dict[tuple, list[torch.Tensor]]:
        """Parameters with a gradient, grouped by (device, dtype): the unit of one foreach pass."""
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            buckets[(p.device, p.dtype)].append(p)
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
            for params in self._buckets(group).values():
                states = [self._init_state(p, group) for p in params]
                grads = [p.grad for p in params]
                self._step_bucket(group, group["step"], params, grads, states)
        return loss

    def _step_bucket(self, group: dict, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict]) -> None:
        raise NotImplementedError

    # ---- state dicts --------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same class with the same layout options, or raise a clear ValueError.

        torch's own loader would cast every floating state to the parameter's dtype (and quantized codes
        with them); this one keeps each state tensor's own dtype and checks every shape.
        """
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError("not an optimizer state dict: needs 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, optimizer has "
                             f"{len(self.param_groups)}")
        id_to_param: dict[int, tuple[torch.Tensor, dict]] = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i}: state dict has {len(saved['params'])} params, "
                                 f"optimizer has {len(group['params'])}")
            missing = set(self.defaults) - set(saved)
            if missing:
                raise ValueError(f"param group {i}: options {sorted(missing)} are missing; the state dict was saved "
                                 f"by another optimizer than {type(self).__name__}")
            for option in LAYOUT_OPTIONS + ("code_exact",):
                if option in group and saved.get(option) != group[option]:
                    raise ValueError(f"param group {i}: state dict was saved with {option}={saved.get(option)!r}, "
                                     f"this optimizer uses {option}={group[option]!r}")
            id_to_param.update((pid, (p, group)) for pid, p in zip(saved["params"], group["params"]))
        new_state: dict[torch.Tensor, dict] = defaultdict(dict)
        for pid, entry in saved_state.items():
            if pid not in id_to_param:
                raise ValueError(f"state dict has state for unknown param id {pid}")
            p, group = id_to_param[pid]
            expected = self._expected_state(p, group)
            if set(entry) != set(expected):
                raise ValueError(f"param {pid} (shape {tuple(p.shape)}): state keys {sorted(entry)} do not match "
                                 f"{sorted(expected)}; saved by another optimizer or with other options")
            for name, (shape, dtype) in expected.items():
                value = entry[name]
                if tuple(value.shape) != shape:
                    raise ValueError(f"param {pid}: state '{name}' has shape {tuple(value.shape)}, expected {shape} "
                                     f"for a parameter of shape {tuple(p.shape)}")
                new_state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)
        for group, saved in zip(self.param_groups, saved_groups):  # in place: schedulers hold these dicts
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = new_state
