"""Shared fixtures: a small demo dataset made once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels (StableSPAM(fused=True)) then run in Triton's CPU interpreter. The variable must be
    # set before triton is first imported: its own library functions are built according to it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from curation.demo_data import generate  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """400 pairs in 4 raw shards, 100 labelled eval images, classes.json and metadata.json."""
    path = tmp_path_factory.mktemp("demo")
    generate(path, n_pairs=400, n_eval=100, seed=0, rows_per_shard=100, broken_fraction=0.03)
    return path
