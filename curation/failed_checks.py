"""The quality checks a stage output failed, recorded inside the output itself.

An output whose checks failed keeps its files (the next run resumes from them,
and a person can look at what went wrong), but nothing may read it as a
finished dataset: not a later Dagster run that materialises a downstream asset
alone, not a stage or the trainer pointed at the directory from the command
line. So the record sits beside the manifest, and every reader of an input goes
through `verify_input`. The record names the manifest it judged: an output
rebuilt since is judged afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from curation.shards import ManifestError, atomic_write_bytes, manifest_fingerprint, read_manifest, verify_manifest

FAILED_CHECKS = "failed_checks.json"


class FailedChecksError(ManifestError):
    """A dataset whose own quality checks failed, read as an input."""


def record_failed_checks(directory: str | Path, manifest: dict, failed: list[str]) -> None:
    """Record the checks this output failed, or clear the record when none did."""
    record = Path(directory) / FAILED_CHECKS
    if failed:
        atomic_write_bytes(record, json.dumps({"manifest": manifest_fingerprint(manifest), "failed": failed}).encode())
    else:
        record.unlink(missing_ok=True)


def failed_checks(directory: str | Path, manifest: dict) -> list[str]:
    """The checks this very output (same manifest) failed when it was made; none recorded: []."""
    record = Path(directory) / FAILED_CHECKS
    if not record.is_file():
        return []
    try:
        recorded = json.loads(record.read_text())
        judged, failed = recorded["manifest"], list(recorded["failed"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{record} is unreadable ({exc}): the output's checks cannot be told; materialise "
                            f"it again") from exc
    return failed if judged == manifest_fingerprint(manifest) else []


def verify_input(directory: str | Path, checksums: bool = True) -> dict:
    """`verify_manifest` for a dataset about to be read as input: it also refuses one whose checks failed,
    before any byte is hashed (hashing a large pool takes hours)."""
    if failed := failed_checks(directory, read_manifest(directory)):
        raise FailedChecksError(
            f"{directory} failed its quality checks ({', '.join(failed)}) and is not a finished dataset: fix it "
            f"(or the gates) and materialise it again; to read it anyway, delete {Path(directory) / FAILED_CHECKS}")
    return verify_manifest(directory, checksums=checksums)
