"""The shared machinery of the spike-aware optimizers: tensor buckets, moment storage, state validation.

Why a base class: StableSPAM and SPAM differ only in how they reshape the gradient and schedule the
reset. Both keep Adam's m and v (fp32 whatever the parameter dtype, or blockwise 8/4-bit), a small
per-tensor statistics vector (kept as a device tensor so that no step ever needs `.item()`), and a count
of skipped non-finite steps. The step works on buckets of tensors that share a device and dtypes, with
`torch._foreach_*` ops.

Launch counts. torch's multi-tensor kernels take one scalar for the whole list (or a list of *host*
floats); a list of per-tensor 0-d device tensors runs as one kernel per tensor (the fast path needs equal
shapes), and the `Tensor scalars` overloads of addcmul/addcdiv want CPU tensors, i.e. a host sync. So
every per-tensor device scalar (clip threshold, AdaGN scale, skip flag, bias corrections) costs one
kernel per tensor in this path, and the code keeps both those ops and the passes over memory few (the
Adam update ends in one `addcdiv` with the step size folded into the denominator).
`StableSPAM(fused=True)` does the whole per-element step in two Triton launches per bucket.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from training.optim import lowbit_state as lb

# Elements of one low-bit bucket (see MultiTensorOptimizer._buckets): its fp32 decode buffers and the
# step's temporaries are ~40 bytes per element, so ~0.7 GB whatever the model's size. A tensor larger
# than this is a bucket of its own.
LOWBIT_BUCKET_ELEMENTS = 2 ** 24


def _chunks(params: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of `params` of at most `limit` elements each (a larger tensor alone)."""
    chunks: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if chunks[-1] and size + p.numel() > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks


STATE_BITS = (32, 8, 4)
# Group options that schedulers change during training (any of them lr, OneCycleLR/CyclicLR the betas,
# some recipes weight decay): load_state_dict restores them from the checkpoint, as torch's optimizers
# do. Every other option of `defaults` defines the algorithm or the state layout: a checkpoint saved with
# another value is refused.
SCHEDULED_OPTIONS = ("lr", "betas", "weight_decay")
# Keys that older state dicts may carry but that are implementation choices of the constructor.
IMPLEMENTATION_KEYS = ("fused",)


def check_range(name: str, value: float, low: float, high: float, high_open: bool = True) -> None:
    """Raise a ValueError naming the hyperparameter when it is not a number or outside [low, high) (or
    [low, high]). A bool is no number here: lr=True would otherwise pass as 1.0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid {name}={value!r}: must be a number")
    ok = low <= value < high if high_open else low <= value <= high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"invalid {name}={value!r}: must be in [{low}, {high}{bracket}")


def check_interval(name: str, value: int | None, allow_none: bool = True) -> None:
    """Raise a ValueError unless `value` is a positive int (or None, meaning "never", when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        never = " or None (never)" if allow_none else ""
        raise ValueError(f"invalid {name}={value!r}: must be a positive int{never}")


def check_int(name: str, value: object, least: int) -> None:
    """Raise a ValueError naming the option unless `value` is an int (not a bool) >= `least`: a float
    size such as 256.0 passed every range check, then failed in torch at the first step."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"invalid {name}={value!r}: must be an int >= {least}")


def check_common(options: dict) -> dict:
    """Validate the options every spike-aware optimizer shares; return them with betas a tuple and the
    block size resolved (None for fp32 states, the bit width's default when not given)."""
    lr, betas, eps = options["lr"], options["betas"], options["eps"]
    state_bits, block_size = options["state_bits"], options["block_size"]
    check_range("lr", lr, 0.0, math.inf)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas={betas!r}: need two values")
    check_range("betas[0]", betas[0], 0.0, 1.0)
    check_range("betas[1]", betas[1], 0.0, 1.0)
    check_range("eps", eps, 0.0, math.inf)
    if eps == 0:  # a skipped tensor's step size is 0: eps keeps its update at m / inf = 0, never 0 * inf
        raise ValueError("invalid eps=0: must be > 0")
    check_range("weight_decay", options["weight_decay"], 0.0, math.inf)
    if isinstance(state_bits, bool) or not isinstance(state_bits, int) or state_bits not in STATE_BITS:
        raise ValueError(f"invalid state_bits={state_bits!r}: must be one of {STATE_BITS}")
    if state_bits == 32:
        if block_size is not None:
            raise ValueError(f"invalid block_size={block_size!r}: it only applies to quantized states (state_bits 8 or 4)")
    else:
        block_size = lb.DEFAULT_BLOCK[state_bits] if block_size is None else block_size
        check_int("block_size", block_size, 2)
        lb.StateLayout(state_bits, block_size, 1)  # validates the block size
    return {**options, "betas": tuple(betas), "block_size": block_size}


def casts_exactly(saved: torch.dtype, wanted: torch.dtype) -> bool:
    """True when every value of dtype `saved` is also a value of `wanted`: the same dtype, or a wider float."""
    return saved == wanted or (saved.is_floating_point and wanted.is_floating_point
                               and torch.promote_types(saved, wanted) == wanted)


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """Moments, statistics and arithmetic in fp32 whatever the parameter dtype (bf16 moments cannot follow
    a 0.1% per-step decay), fp64 for fp64 parameters (so tests can compare at 1e-12)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def ema_coefficient(value: float, dtype: torch.dtype) -> float:
    """`value` as a `dtype` tensor holds it. An EMA computed in `dtype` weighs by this number, so its
    complement and its bias correction must use it too: 0.99999 is 1 - 1.0014e-5 in fp32, and beside the
    exact 1 - 0.99999 the weights summed to 1.0014, biasing AdaGN at the BF16 setting by 0.07%."""
    return torch.tensor(value, dtype=dtype).item()


def bias_correction(coefficient: float, count: torch.Tensor) -> torch.Tensor:
    """1 - coefficient^count, computed in fp64 and given back in count's dtype. In fp32 the power alone
    rounds by ~6e-8, which is 0.3% of 1 - 0.99999^2."""
    return (1 - torch.pow(coefficient, count.double())).to(count.dtype)


def cosine_ramp(step: int, length: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step >= length)."""
    if length <= 0:
        return end
    frac = min(step, length) / length
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def clipped_copies(grads: list[torch.Tensor], finite: torch.Tensor, dtype: torch.dtype,
                   tau: torch.Tensor | None = None, ratio: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Working copies of the gradients in `dtype` (the user's grads stay intact): elements with |g| > tau
    scaled by ratio (AdaClip; skipped without tau), and a tensor that is not `finite` all zeros.

    A Python loop of `where`s: foreach has no select and no comparison, and no arithmetic turns a NaN
    into a number. The multi-tensor alternative (abs, subtract tau, sign, clamp, split and rescale) was
    measured: twice the memory passes for fewer launches, slower on CPU, and on a 350M set the GPU is
    memory-bound at this point.
    """
    out = []
    for i, (g, keep) in enumerate(zip(grads, finite.unbind())):
        g = g.to(dtype)
        if tau is not None:
            g = torch.where(g.abs() > tau[i], g * ratio[i], g)
        out.append(torch.where(keep, g, 0))
    return out


class MomentOptimizer(Optimizer, abc.ABC):
    """Adam-style optimizer base: buckets, m/v storage (fp32 or quantized), load-time validation."""

    stats_fields: tuple[str, ...] = ()

    @staticmethod
    @abc.abstractmethod
    def check_options(options: dict) -> dict:
        """Raise a clear ValueError on an invalid option; return the options normalised (check_common)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with every group's options checked like the constructor's, plus the group's global
        step counter T (host int: schedules need no device sync). T is per group, where the reference code
        keeps one for the optimizer: the same for the groups given to the constructor, while a group added
        later starts its reset schedule and c_T decay from 0, as a fresh set of parameters would."""
        param_group = dict(param_group)
        if param_group.get("state_bits", self.defaults["state_bits"]) != self.defaults["state_bits"]:
            param_group.setdefault("block_size", None)  # the default block size belongs to the default bit width
        # A refused group must not stay behind in param_groups, where it would break every later step: the
        # options are checked before torch appends it, its parameters (normalised by torch) right after.
        param_group.update(self.check_options({**self.defaults, **param_group}))
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)
        try:
            self._check_params(self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """Raise a ValueError naming a parameter this implementation cannot step (none by default)."""

    # ---- state --------------------------------------------------------------------------------
    def _layout(self, p: torch.Tensor, group: dict) -> lb.StateLayout | None:
        bits = group["state_bits"]
        return None if bits == 32 else lb.StateLayout(bits, group["block_size"], p.numel())

    def _expected_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every state tensor of `p`: what is allocated, checked on load, counted."""
        dtype = compute_dtype(p)
        spec = {"stats": ((len(self.stats_fields),), dtype)}
        layout = self._layout(p, group)
        if layout is None:
            spec["exp_avg"] = (tuple(p.shape), dtype)
            spec["exp_avg_sq"] = (tuple(p.shape), dtype)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                spec[name] = ((layout.code_bytes,), torch.uint8)
                spec[name + "_scale"] = ((layout.n_blocks,), torch.float32)
            # Codes and scales depend on the element count in whole blocks only: the parameter's shape is
            # recorded so that a state saved for another shape (a transposed matrix, a shorter vector
            # padded to the same blocks) is refused on load rather than permuted against the elements.
            spec["param_shape"] = ((p.dim(),), torch.int64)
        return spec

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            for name, (shape, dtype) in self._expected_state(p, group).items():
                state[name] = torch.zeros(shape, dtype=dtype, device=p.device)
            if group["state_bits"] != 32:  # all-zero blocks must decode to 0 whatever the code
                layout = self._layout(p, group)
                zeros = torch.zeros(p.shape, device=p.device)
                state["exp_avg"], state["exp_avg_scale"] = lb.quantize(zeros, layout, "signed")
                state["exp_avg_sq"], state["exp_avg_sq_scale"] = lb.quantize(zeros, layout, "nonneg")
                state["param_shape"] = torch.tensor(p.shape, dtype=torch.int64, device=p.device)
        return state

    def _load_moments(self, params: list[torch.Tensor], states: list[dict],
                      group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], lb.BucketMoments | None]:
        """m and v of a bucket as tensors the foreach math updates in place (decoded copies when quantized)."""
        if group["state_bits"] == 32:
            return [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], None
        coded = lb.BucketMoments(params, [self._layout(p, group) for p in params],
                                 [s["exp_avg"] for s in states], [s["exp_avg_scale"] for s in states],
                                 [s["exp_avg_sq"] for s in states], [s["exp_avg_sq_scale"] for s in states],
                                 compute_dtype(params[0]))
        return coded.m, coded.v, coded

    def _store_moments(self, states: list[dict], coded: lb.BucketMoments | None, seed: int,
                       updated: torch.Tensor | None) -> None:
        """Write decoded moments back as codes, rounding stochastically from a generator seeded with `seed`
        (deterministic: a resumed run draws the same noise). `updated` (per tensor, on the device) marks the
        tensors whose moments this step changed; the others keep their codes bit for bit (None: all
        changed). A no-op for fp32 states, updated in place (where a skipped tensor's m and v are exact)."""
        if coded is None:
            return
        device = states[0]["exp_avg"].device
        # Made on first use: torch's Optimizer pickles only defaults/state/param_groups.
        generators = self.__dict__.setdefault("_rounding_generators", {})
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        parts = coded.encode(generators[device].manual_seed(seed), updated)
        names = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
        for name, chunks in zip(names, parts):
            torch._foreach_copy_([s[name] for s in states], chunks)

    def skipped_steps(self) -> int:
        """Total (tensor, step) pairs skipped for non-finite gradients. Syncs: call it for logging only."""
        idx = self.stats_fields.index("skipped")
        total = sum(s["stats"][idx] for s in self.state.values() if "stats" in s)
        return int(total) if torch.is_tensor(total) else 0

    def state_bytes_per_param(self) -> float:
        """Bytes of optimizer state per parameter element once every parameter has stepped (moments, codes,
        scales, statistics), from the same spec that allocates the state: no step or memory needed, so it
        works on "meta" parameters too."""
        total = numel = 0
        for group in self.param_groups:
            for p in group["params"]:
                numel += p.numel()
                for shape, dtype in self._expected_state(p, group).values():
                    total += math.prod(shape) * dtype.itemsize
        return total / max(numel, 1)

    # ---- step ---------------------------------------------------------------------------------
    def _buckets(self, group: dict) -> dict[tuple, list[torch.Tensor]]:
        """Parameters with a gradient, grouped by (device, dtype, grad dtype): the unit of one foreach pass.

        torch itself refuses a .grad on another device or of another shape; another dtype is allowed with
        `param.grad_dtype` (e.g. fp32 gradients of bf16 weights), so the grad dtype is part of the key.
        Quantized states are decoded a bucket at a time into fp32 buffers, so their buckets are cut at
        LOWBIT_BUCKET_ELEMENTS: decoding the whole model at once made the step's peak memory twice that
        of fp32 states (on CPU, 67M params: peak RSS 42.0 bytes per parameter above weights and gradients,
        fp32 states 18.2, chunked 8-bit 16.5).
        """
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to update
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            buckets[(p.device, p.dtype, p.grad.dtype)].append(p)
        if group["state_bits"] == 32:
            return buckets
        return {(*key, part): chunk for key, params in buckets.items()
                for part, chunk in enumerate(_chunks(params, LOWBIT_BUCKET_ELEMENTS))}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            group["step"] += 1
            for bucket, params in enumerate(self._buckets(group).values()):
                states = [self._init_state(p, group) for p in params]
                grads = [p.grad for p in params]
                seed = (group["step"] * 1_000_003 + index * 7_919 + bucket) % (2 ** 63)
                self._step_bucket(group, group["step"], params, grads, states, seed)
        return loss

    @abc.abstractmethod
    def _step_bucket(self, group: dict, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict], seed: int) -> None:
        """One step of the algorithm over a (device, dtype) bucket: what StableSPAM and SPAM define."""

    # ---- state dicts --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's, plus the version of the low-bit code maps (`lowbit_state.CODE_FORMAT`)."""
        return {**super().state_dict(), "code_format": lb.CODE_FORMAT}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same class with the same algorithm options, or raise a clear ValueError.

        Scheduled options (SCHEDULED_OPTIONS) and the step counter are restored from the state dict, as
        torch does; implementation choices made by the constructor (fused) are kept. torch's own loader
        would also cast every floating state to the parameter's dtype (and quantized codes with them);
        this one checks every shape and stores each state tensor in the dtype the optimizer allocates it
        in (`_expected_state`: fp32 moments and statistics, fp64 for fp64 parameters; uint8 codes; fp32
        scales). A saved tensor of another dtype is cast only where that is exact (e.g. bf16 moments
        upcast to fp32); one the cast would round or change in kind (fp64 moments into fp32, float
        codes) is refused, and so are quantized states of another format (`code_format`) or saved for a
        parameter of another shape. torch's load hooks run around it, as in torch's own method.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            adapted = pre_hook(self, state_dict)
            state_dict = state_dict if adapted is None else adapted
        self._load_checked(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError("not an optimizer state dict: needs 'state' and 'param_groups'")
        code_format = state_dict.get("code_format")
        if code_format != lb.CODE_FORMAT and any(g.get("state_bits", 32) != 32 for g in saved_groups):
            written = "records no code format" if code_format is None else f"has code format {code_format}"
            raise ValueError(f"the state dict's quantized moments {written}, this optimizer reads format "
                             f"{lb.CODE_FORMAT}: its codes could decode to other moments. Resume with the version "
                             f"that saved it, or start the optimizer state over")
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
            for option in self.defaults:
                if option not in SCHEDULED_OPTIONS and saved[option] != group[option]:
                    raise ValueError(
                        f"param group {i}: the state dict was saved with {option}={saved[option]!r}, this "
                        f"optimizer has {option}={group[option]!r}; {option} is part of the algorithm or the state "
                        f"layout, so build the optimizer with the saved value to resume")
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
                if not casts_exactly(value.dtype, dtype):
                    raise ValueError(f"param {pid}: state '{name}' is {value.dtype}, which does not cast exactly to "
                                     f"the {dtype} this optimizer keeps it in for a {p.dtype} parameter; saved for "
                                     f"parameters of another dtype or by another optimizer")
                new_state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)
            if "param_shape" in entry and entry["param_shape"].tolist() != list(p.shape):
                raise ValueError(f"param {pid}: its quantized state was saved for a parameter of shape "
                                 f"{tuple(entry['param_shape'].tolist())}, this parameter has shape {tuple(p.shape)}")
        for group, saved in zip(self.param_groups, saved_groups):  # in place: schedulers hold these dicts
            group.update({k: v for k, v in saved.items() if k not in ("params",) + IMPLEMENTATION_KEYS})
        self.state = new_state
