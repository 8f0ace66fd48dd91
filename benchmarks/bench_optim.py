"""Optimizer step time and state bytes per parameter on a Llama-350M-shaped parameter set.

Compares StableSPAM (fp32 and 8-bit states; the foreach path and, on CUDA, the fused Triton kernels),
SPAM, torch.optim.AdamW(fused=True) and the plain per-tensor reference from the tests (the shape of the
paper's own code: a Python loop with host syncs), with each one's ratio to fused AdamW.
Targets: StableSPAM <= 1.3x fused AdamW's step time; 8-bit states <= 2.1 bytes per parameter.

On CUDA it times the full 368M-parameter set (well under a minute on an H100, Triton compiles
included). Without CUDA it times a small CPU set and the GPU figures are NOT measured. Bytes per
parameter for the 350M shapes come from each optimizer's own state spec on "meta" parameters (no
memory), and on CUDA also from the state actually allocated. Imports only torch, triton (for fused)
and this repo's training.optim and test reference: no transformers, Beam or Dagster.

    python benchmarks/bench_optim.py [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.training.optim.reference import ReferenceStableSPAM  # noqa: E402
from training.optim import SPAM, StableSPAM  # noqa: E402
from training.optim.lowbit_state import state_bytes  # noqa: E402

LLAMA_350M = dict(hidden=1024, layers=24, ffn=2736, vocab=32000)
CPU_SMALL = dict(hidden=256, layers=4, ffn=688, vocab=4000)


def llama_shapes(hidden: int, layers: int, ffn: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama decoder: embeddings, per-layer attention/MLP/norms, final norm, lm_head."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def make_params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
        p.grad = torch.randn(shape, device=device) * 1e-3
        params.append(p)
    return params


def time_steps(step: Callable[[], None], steps: int, device: str) -> float:
    """Median milliseconds per optimizer step after warm-up."""
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def step_peak_bytes(step: Callable[[], None]) -> int:
    """CUDA bytes a step allocates above what it starts with (weights, grads, states): its temporaries.
    Why: low-bit states save memory only if the step does not spend it again on decode buffers."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def planned_bytes_per_param(shapes: list[tuple[int, ...]], bits: int) -> float:
    """StableSPAM's state bytes/param for `shapes`, from its state spec on meta parameters (no memory)."""
    return StableSPAM([torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes],
                      state_bits=bits).state_bytes_per_param()


def candidates(device: str, fused: bool) -> dict[str, Callable[[list], object]]:
    """Name -> constructor; the first is the baseline the ratios are taken against."""
    made: dict[str, Callable[[list], object]] = {}
    if device == "cuda":
        made["AdamW(fused)"] = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0, fused=True)
    else:
        made["AdamW(foreach)"] = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0, foreach=True)
    made["StableSPAM fp32"] = lambda p: StableSPAM(p, lr=1e-4)
    if fused:
        made["StableSPAM fp32 fused"] = lambda p: StableSPAM(p, lr=1e-4, fused=True)
    made["StableSPAM 8-bit"] = lambda p: StableSPAM(p, lr=1e-4, state_bits=8)
    if fused:
        made["StableSPAM 8-bit fused"] = lambda p: StableSPAM(p, lr=1e-4, state_bits=8, fused=True)
    made["SPAM fp32"] = lambda p: SPAM(p, lr=1e-4)
    made["reference (per-tensor)"] = lambda p: ReferenceStableSPAM(p, lr=1e-4)
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = LLAMA_350M if device == "cuda" else CPU_SMALL
    shapes = llama_shapes(**dims)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"device={device}  parameter set: {dims} = {n_params / 1e6:.1f}M params in {len(shapes)} tensors")
    if device == "cpu":
        print("NOTE: no CUDA here: the step times below are a small CPU set; GPU figures are NOT measured.")
    fused = device == "cuda" and triton_available()
    if not fused:
        print("StableSPAM(fused=True): needs CUDA and triton; not timed here")
    made = candidates(device, fused)

    params = make_params(shapes, device)
    results = {}
    for name, make in made.items():
        opt = make(params)
        steps = max(3, args.steps // 4) if name.startswith("reference") else args.steps
        ms = time_steps(opt.step, steps, device)
        per_param = state_bytes(opt.state) / n_params if isinstance(opt, torch.optim.Optimizer) else 8.0
        peak = f"   step temporaries {step_peak_bytes(opt.step) / n_params:5.2f} bytes/param" if device == "cuda" else ""
        results[name] = ms
        del opt
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name:24s} {ms:9.2f} ms/step   state {per_param:5.2f} bytes/param (allocated){peak}")
    base = results[next(iter(made))]
    print(f"\nratio to {next(iter(made))} (target: StableSPAM <= 1.3x fused AdamW):")
    for name, ms in results.items():
        print(f"  {name:24s} {ms / base:6.2f}x")
    for bits in ("fp32", "8-bit"):
        if f"StableSPAM {bits} fused" in results:
            print(f"Triton kernels vs foreach, {bits} states: "
                  f"{results[f'StableSPAM {bits}'] / results[f'StableSPAM {bits} fused']:.2f}x faster")
    del params

    print(f"\nstep time with the 350M set's tensor count, one element per tensor, on {device}: the launch and")
    print("dispatch floor of a step, which only fewer kernels (fused) or a CUDA graph can lower:")
    tiny = make_params([(1,)] * len(llama_shapes(**LLAMA_350M)), device)
    for name, make in made.items():
        if not name.startswith("reference"):
            print(f"  {name:24s} {time_steps(make(tiny).step, args.steps, device):7.2f} ms/step floor")

    print("\nstate bytes/param on the Llama-350M shapes, from the optimizer's state spec (target 8-bit <= 2.1):")
    full = llama_shapes(**LLAMA_350M)
    for bits in (8, 4, 32):
        print(f"  {bits:2d}-bit states: {planned_bytes_per_param(full, bits):.4f}")


if __name__ == "__main__":
    main()
