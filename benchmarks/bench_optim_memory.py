"""Peak host memory of an optimizer step, per parameter, against torch's AdamW in the same script (CPU).

Low-bit states save memory only if the step does not spend the saving again on decode buffers and
temporaries, so this measures the whole step, not the stored state. Each optimizer runs in its own
process (peak RSS is per process) with glibc's mmap threshold lowered, so that freed buffers leave RSS
and the peak is the peak of live memory, not of the allocator's cache. On CUDA, bench_optim.py prints
the same figure from torch's allocator ("step temporaries").

    python benchmarks/bench_optim_memory.py [--tensors 16]     # 16 x (4096 x 1024) = 67M fp32 params
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from training.optim.multi_tensor import LOWBIT_BUCKET_ELEMENTS

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # label -> python constructing `opt` over `params`
    "AdamW (torch, foreach)": "torch.optim.AdamW(params, foreach=True)",
    "StableSPAM fp32 states": "StableSPAM(params)",
    "StableSPAM 8-bit states": "StableSPAM(params, state_bits=8)",
    "StableSPAM 4-bit states": "StableSPAM(params, state_bits=4)",
    "StableSPAM 8-bit, one bucket": "StableSPAM(params, state_bits=8)",
}
CHILD = """
import resource, sys, torch
from training.optim import StableSPAM, multi_tensor
torch.set_num_threads(2)
if {whole}:
    multi_tensor.LOWBIT_BUCKET_ELEMENTS = 10 ** 15  # as before chunking: the whole model decoded at once
params = [torch.nn.Parameter(torch.randn(4096, 1024) * 0.02) for _ in range({tensors})]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = {make}
for _ in range(3):
    opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_bytes(make: str, tensors: int, whole: bool) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    code = CHILD.format(make=make, tensors=tensors, whole=whole)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=16, help="4096 x 1024 fp32 tensors (4.2M params each)")
    args = parser.parse_args()
    n = args.tensors * 4096 * 1024
    floor = 8 * n  # the weights and their gradients, fp32
    print(f"{n / 1e6:.0f}M fp32 params; peak RSS of a step above weights and gradients, per parameter:")
    runs = dict(RUNS)
    if n <= LOWBIT_BUCKET_ELEMENTS:  # the whole model is one chunk already: the row would repeat the 8-bit one
        del runs["StableSPAM 8-bit, one bucket"]
        print(f"  (no 'one bucket' row: {n} params fit in one chunk of {LOWBIT_BUCKET_ELEMENTS}; "
              f"pass --tensors {LOWBIT_BUCKET_ELEMENTS // (4096 * 1024) + 1} or more to compare)")
    results = {label: (peak_bytes(make, args.tensors, label.endswith("one bucket")) - floor) / n
               for label, make in runs.items()}
    base = results["AdamW (torch, foreach)"]
    for label, per_param in results.items():
        print(f"  {label:30s} {per_param:6.1f} B/param   {per_param / base:5.2f}x AdamW")
    print("(includes the interpreter and torch themselves, and a low-bit step's decode buffers of one chunk, "
          "LOWBIT_BUCKET_ELEMENTS: fixed costs, which weigh less per parameter on a larger model)")


if __name__ == "__main__":
    main()
