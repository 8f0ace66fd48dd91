"""What a build remembers about its stage outputs, under `B/.upstream/`, between runs.

Dagster's event log says what ran; these small files say what the files on disk were made from, so that
a later run (a retry, a re-execution, a downstream asset materialised alone) can tell a rebuilt
upstream, an output whose checks failed, or an overwrite still to do. Every write is atomic.
"""

import json
from pathlib import Path
from typing import Optional

import dagster as dg

from curation.failed_checks import failed_checks, manifest_fingerprint, record_failed_checks
from curation.shards import OVERWRITE_SENTINEL, atomic_write_bytes

UPSTREAM_MARKER = ".upstream"
# Recorded as an output's failed check while its checks run (see record_checks).
CHECKS_NOT_FINISHED = "checks_not_finished"


def upstream_changed(build_dir: Path, asset: str, input_manifest: Optional[dict]) -> bool:
    """True when this asset's output was made from other upstream files than today's (a rebuilt upstream)."""
    marker = build_dir / UPSTREAM_MARKER / f"{asset}.sha256"
    return (input_manifest is not None and marker.is_file()
            and marker.read_text() != manifest_fingerprint(input_manifest))


def record_upstream(build_dir: Path, asset: str, input_manifest: Optional[dict]) -> None:
    if input_manifest is not None:
        (build_dir / UPSTREAM_MARKER).mkdir(exist_ok=True)
        marker = build_dir / UPSTREAM_MARKER / f"{asset}.sha256"
        atomic_write_bytes(marker, manifest_fingerprint(input_manifest).encode())


def _legacy_checks_record(build_dir: Path, asset: str) -> Path:
    """Where versions before the record moved into the output kept an output's failed checks."""
    return build_dir / UPSTREAM_MARKER / f"{asset}.failed-checks.json"


def record_checks(build_dir: Path, asset: str, manifest: dict, failed: list[str]) -> None:
    """Remember (or forget) the checks this output failed: a later run that materialises a downstream
    asset alone must not build on it (a failed blocking check only stops the run it ran in)."""
    record_failed_checks(build_dir / asset, manifest, failed)
    _legacy_checks_record(build_dir, asset).unlink(missing_ok=True)


def failed_upstream_checks(build_dir: Path, asset: str, manifest: dict) -> list[str]:
    """The checks this very output (same manifest) failed when it was materialised, wherever the version
    that materialised it recorded them; none recorded: []."""
    legacy = _legacy_checks_record(build_dir, asset)
    if legacy.is_file():
        record = json.loads(legacy.read_text())
        return record["failed"] if record["manifest"] == manifest_fingerprint(manifest) else []
    return failed_checks(build_dir / asset, manifest)


def _overwrite_marker(build_dir: Path, asset: str) -> Path:
    """Where a build records the run that asked to overwrite this asset's output (see `overwrite_pending`)."""
    return build_dir / UPSTREAM_MARKER / f"{asset}.overwritten-by"


def _root_run_id(context: dg.AssetExecutionContext) -> str:
    """One id for a run and its re-executions, which share the root run id and reuse its config."""
    return context.run.root_run_id or context.run.run_id


def overwrite_pending(build_dir: Path, asset: str, output: Path, context: dg.AssetExecutionContext) -> bool:
    """Whether this attempt must still wipe the output its run asked to overwrite.

    The run's first attempt leaves a sentinel file in the output before its
    job runs; the job's wipe deletes it with the rest. A later attempt of the
    same run (a retry, a re-execution) wipes again only while the sentinel is
    there: the earlier attempt failed before its wipe. Once it is gone the
    wipe is done, however that attempt ended (an exception, or a killed process
    that ran no cleanup), and the retry resumes what it made. An output that
    is absent or empty has nothing to lose: it gets no sentinel.
    """
    marker, root = _overwrite_marker(build_dir, asset), _root_run_id(context)
    sentinel = output / OVERWRITE_SENTINEL
    if marker.is_file() and marker.read_text() == root:
        return sentinel.is_file()
    if output.is_dir() and any(output.iterdir()):
        sentinel.write_text(root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, root.encode())
    return True
