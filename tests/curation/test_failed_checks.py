import pyarrow as pa
import pytest

from curation.failed_checks import (
    FAILED_CHECKS, FailedChecksError, failed_checks, record_failed_checks, verify_input,
)
from curation.schema import PAIR_SCHEMA
from curation.shards import ManifestError, shard_name, write_manifest, write_table_atomic


def _dataset(directory, captions: list[str]) -> dict:
    rows = [{"key": f"k{i}", "caption": c, "image": b"\xff\xd8", "width": 8, "height": 8, "sha256": f"{i:064x}",
             "source": "t"} for i, c in enumerate(captions)]
    info = write_table_atomic(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), directory / shard_name(0))
    return write_manifest(directory, stage="test", config={}, shards=[info])


def test_an_output_whose_checks_failed_is_refused_as_input_until_it_passes(tmp_path):
    manifest = _dataset(tmp_path, ["a red bus", "two dogs"])
    assert verify_input(tmp_path) == manifest  # nothing recorded: an input like any other
    record_failed_checks(tmp_path, manifest, ["reject_ratio_under_threshold", "schema_valid"])
    assert failed_checks(tmp_path, manifest) == ["reject_ratio_under_threshold", "schema_valid"]
    with pytest.raises(FailedChecksError, match=r"failed its quality checks \(reject_ratio_under_threshold, "
                                                r"schema_valid\).*delete .*failed_checks\.json"):
        verify_input(tmp_path, checksums=False)
    record_failed_checks(tmp_path, manifest, [])  # judged again, and passed
    assert not (tmp_path / FAILED_CHECKS).exists() and verify_input(tmp_path) == manifest


def test_a_failed_input_is_refused_before_any_byte_is_hashed(tmp_path, monkeypatch):
    import curation.shards

    manifest = _dataset(tmp_path, ["a red bus"])
    record_failed_checks(tmp_path, manifest, ["schema_valid"])
    monkeypatch.setattr(curation.shards, "file_sha256", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(FailedChecksError):
        verify_input(tmp_path)


def test_a_record_judges_only_the_output_it_was_made_for(tmp_path):
    before = _dataset(tmp_path, ["a red bus", "two dogs"])
    record_failed_checks(tmp_path, before, ["rows_conserved"])
    after = _dataset(tmp_path, ["a red bus", "three dogs"])  # rebuilt since: not judged yet
    assert failed_checks(tmp_path, before) == ["rows_conserved"] and failed_checks(tmp_path, after) == []
    assert verify_input(tmp_path) == after


def test_an_unreadable_record_is_an_error_not_a_pass(tmp_path):
    manifest = _dataset(tmp_path, ["a red bus"])
    (tmp_path / FAILED_CHECKS).write_text('{"failed": ["schema_valid"]')
    with pytest.raises(ManifestError, match="unreadable"):
        verify_input(tmp_path)
    (tmp_path / FAILED_CHECKS).write_text('{"failed": ["schema_valid"]}')  # which output it judged is lost
    with pytest.raises(ManifestError, match="cannot be told"):
        failed_checks(tmp_path, manifest)
