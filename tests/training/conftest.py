"""Training fixtures: pair-schema shards made by the real ingest from the session demo data, or written directly."""

from pathlib import Path

import pytest

from training.demo_shards import write_demo_pairs


@pytest.fixture(scope="session")
def raw_pairs(demo_dir, tmp_path_factory) -> Path:
    """The demo pool through ingest: 4 pair-schema shards (about 390 rows) with a manifest.

    Beam is imported here, not at module level, so the CUDA tests collect on the GPU machine, which has no Beam.
    """
    from pipelines import ingest

    out = tmp_path_factory.mktemp("train-raw") / "raw_pairs"
    ingest.run(["--input", str(demo_dir / "pool"), "--output", str(out)])
    return out


@pytest.fixture(scope="session")
def demo_pairs(tmp_path_factory):
    """Two small pair datasets written without Beam (the CUDA tests run where Beam is absent)."""
    root = tmp_path_factory.mktemp("demo-pairs")
    return [write_demo_pairs(root / name, 240, rows_per_shard=80, row_group_rows=40, seed=seed)
            for seed, name in enumerate(("a", "b"))]
