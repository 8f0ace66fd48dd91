"""Host-to-device copies that never wait for the GPU: what an optimizer step may build on the host."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on CUDA copied from pinned memory without blocking. Why: a plain copy,
    or a Python scalar written into a CUDA tensor element (torch <= 2.13), is a blocking copy that syncs
    the stream, which a step must not do."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
