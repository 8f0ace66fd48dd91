"""The low-bit optimizer core: Stable-SPAM, SPAM, simulated 4-bit training and low-bit optimizer states."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from training.optim.quant import QuantConfig, QuantLinear, quantize_model, quantized_layers
from training.optim.spam import SPAM
from training.optim.stable_spam import StableSPAM

OPTIMIZERS = ("stable_spam", "spam", "adamw")


def build_optimizer(name: str, params: Iterable, **kwargs: Any) -> torch.optim.Optimizer:
    """Build an optimizer by name: "stable_spam" (the trainer's default), "spam" or "adamw" (torch's own).

    Keyword arguments go to the constructor unchanged, so a bad option fails there with its own message.
    """
    if name == "stable_spam":
        return StableSPAM(params, **kwargs)
    if name == "spam":
        return SPAM(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {OPTIMIZERS}")


__all__ = ["OPTIMIZERS", "QuantConfig", "QuantLinear", "SPAM", "StableSPAM", "build_optimizer", "quantize_model",
           "quantized_layers"]
