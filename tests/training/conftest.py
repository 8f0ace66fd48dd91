"""Training fixtures: pair-schema shards made by the real ingest from the session demo data."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def raw_pairs(demo_dir, tmp_path_factory) -> Path:
    """The demo pool through ingest: 4 pair-schema shards (about 390 rows) with a manifest.

    Beam is imported here, not at module level, so the CUDA tests collect on the GPU machine, which has no Beam.
    """
    from pipelines import ingest

    out = tmp_path_factory.mktemp("train-raw") / "raw_pairs"
    ingest.run(["--input", str(demo_dir / "pool"), "--output", str(out)])
    return out
