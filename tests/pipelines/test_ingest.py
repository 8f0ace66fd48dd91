import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from curation.demo_data import generate
from curation.shards import finished_shards, iter_batches, read_table, verify_manifest
from pipelines import ingest
from pipelines.common import StageConfigMismatch


def test_ingest_normalises_and_rejects_with_reasons(demo_dir, tmp_path):
    result = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")],
                        test_pipeline=BeamTestPipeline(options=beam.options.pipeline_options.PipelineOptions(
                            ["--runner=DirectRunner"])))
    rejects = result.rejects
    # The demo pool holds truncated JPEGs, empty captions and byte-identical duplicates on purpose.
    assert set(rejects) <= {"undecodable_image", "empty_caption", "duplicate"} and rejects
    assert result.rows + sum(rejects.values()) == 400
    verify_manifest(tmp_path / "raw")
    rows = sum(b.num_rows for _, b in iter_batches(tmp_path / "raw"))  # schema-checked on the way
    assert rows == result.rows
    rejected = read_table(tmp_path / "raw" / "rejects")
    assert set(rejected.column_names) >= {"key", "reason", "detail", "source", "row"}
    assert all(r.startswith("demo-") for r in rejected.column("key").to_pylist())
    kept = read_table(tmp_path / "raw")
    assert kept.column("sha256").unique().to_pylist().__len__() == kept.num_rows  # exact dedup leaves no twin
    winners = set(kept.column("key").to_pylist())
    for row in rejected.filter(pc.equal(rejected.column("reason"), "duplicate")).to_pylist():
        assert row["detail"].startswith("duplicate_of=") and row["detail"].split()[0][13:] in winners
        assert row["detail"].split()[0][13:] < row["key"]  # the smallest key wins


def test_rerun_is_up_to_date_and_other_config_is_refused(demo_dir, tmp_path):
    argv = ["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw")]
    first = ingest.run(argv)
    written = (tmp_path / "raw" / "manifest.json").read_bytes()
    again = ingest.run(argv)
    # Nothing to do: the manifest of the run that did the work stays, its timings and creation time too.
    assert again.up_to_date and not first.up_to_date
    assert again.manifest == first.manifest and (tmp_path / "raw" / "manifest.json").read_bytes() == written
    with pytest.raises(StageConfigMismatch, match="--overwrite"):
        ingest.run(argv + ["--max_caption_chars", "10"])
    assert ingest.run(argv + ["--max_caption_chars", "10", "--overwrite"]).rejects["caption_too_long"] > 0


def test_missing_caption_column_names_the_file(demo_dir, tmp_path):
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing column\(s\) \['alt'\]"):
        ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw"), "--caption_column", "alt"])


def _digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_shards(directory)}


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_the_uninterrupted_result(tmp_path):
    generate(tmp_path / "src", n_pairs=1200, n_eval=0, rows_per_shard=15)
    baseline = tmp_path / "baseline"
    ingest.run(["--input", str(tmp_path / "src" / "pool"), "--output", str(baseline)])

    output = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", "--input", str(tmp_path / "src" / "pool"),
           "--output", str(output)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not finished_shards(output) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = finished_shards(output)
    assert 0 < len(written) < 80, "the kill must land in the middle of the stage"
    assert not (output / "manifest.json").exists()
    for path in written:  # every visible shard is complete and readable
        assert sum(b.num_rows for _, b in iter_batches(path)) == pq.ParquetFile(path).metadata.num_rows > 0

    ingest.run(["--input", str(tmp_path / "src" / "pool"), "--output", str(output)])
    assert _digests(output) == _digests(baseline)
    assert read_table(output).equals(read_table(baseline))


def test_quality_filters_are_off_by_default_and_count_what_they_remove(demo_dir, tmp_path):
    plain = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "plain")])
    assert "quality_filter" not in plain.rejects and plain.manifest["stats"]["filtered"] == {}
    result = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw"),
                         "--filter_min_caption_chars", "12", "--filter_max_caption_chars", "40"])
    filtered = result.manifest["stats"]["filtered"]
    assert set(filtered) == {"min_caption_chars", "max_caption_chars"} and all(filtered.values())
    plain_before_dedup = plain.rows + plain.rejects["duplicate"]
    filtered_before_dedup = result.rows + result.rejects["duplicate"]
    assert sum(filtered.values()) == result.rejects["quality_filter"] == plain_before_dedup - filtered_before_dedup
    lengths = [len(c) for c in read_table(tmp_path / "raw").column("caption").to_pylist()]
    assert 12 <= min(lengths) and max(lengths) <= 40
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "x"),
                    "--filter_max_aspect_ratio", "0.5"])


def test_near_dup_is_opt_in_and_leaves_no_close_pair(demo_dir, tmp_path):
    from curation.dedup import perceptual_hash

    result = ingest.run(["--input", str(demo_dir / "pool"), "--output", str(tmp_path / "raw"), "--near_dup_bits", "2"])
    duplicates = result.manifest["stats"]["duplicates"]
    assert duplicates.get("phash", 0) == result.rejects.get("near_duplicate", 0) > 0
    hashes = [perceptual_hash(b) for b in read_table(tmp_path / "raw").column("image").to_pylist()]
    assert all(bin(a ^ b).count("1") > 2 for i, a in enumerate(hashes) for b in hashes[:i])


def test_two_worker_processes_give_the_same_bytes(demo_dir, tmp_path):
    argv = ["--input", str(demo_dir / "pool")]
    ingest.run([*argv, "--output", str(tmp_path / "one")])
    ingest.run([*argv, "--output", str(tmp_path / "two"), "--direct_num_workers=2",
                "--direct_running_mode=multi_processing"])
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    assert _digests(tmp_path / "one" / "rejects") == _digests(tmp_path / "two" / "rejects")


def test_folder_of_images_with_a_captions_file(tmp_path):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for i, name in enumerate(["cats/a.jpg", "cats/b.png", "dog.jpg", "nocaption.jpg"]):
        Image.new("RGB", (30 + i, 20), (i * 40, 0, 0)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "dog.txt").write_text("a dog from its sidecar file")
    Image.new("RGB", (40, 20), (0, 90, 0)).save(folder / "latin1.jpg")
    (folder / "latin1.txt").write_bytes(b"caf\xe9 terrace")  # not UTF-8: a reject, not a silent U+FFFD
    # The captions file's own column names: --caption_column names its caption column.
    (tmp_path / "captions.csv").write_text("file,text\ncats/a.jpg,a cat\ncats/b.png,another cat\n"
                                           "broken.jpg,broken\n")
    result = ingest.run(["--input", str(folder), "--captions_file", str(tmp_path / "captions.csv"),
                         "--caption_column", "text", "--output", str(tmp_path / "raw"), "--list_shard_rows", "2"])
    assert result.rows == 3
    assert result.rejects == {"empty_caption": 1, "undecodable_image": 1, "non_utf8_caption": 1}
    pairs = read_table(tmp_path / "raw")
    assert pairs.column("key").to_pylist() == ["cats/a", "cats/b", "dog"]
    assert pairs.column("caption").to_pylist() == ["a cat", "another cat", "a dog from its sidecar file"]
    assert len(result.manifest["shards"]) == 3
    # A folder that changed since (one more image, cats/a also as a PNG) is not resumed into: its staged
    # shards were cut from the old listing, so resuming lost the new images and wrote others twice.
    Image.new("RGB", (30, 20), (9, 9, 9)).save(folder / "cats" / "a.png")
    (tmp_path / "captions.csv").write_text("file,text\ncats/a.jpg,a cat\ncats/a.png,a cat as a PNG\n"
                                           "cats/b.png,another cat\nbroken.jpg,broken\n")
    argv = ["--input", str(folder), "--captions_file", str(tmp_path / "captions.csv"), "--caption_column", "text",
            "--output", str(tmp_path / "raw"), "--list_shard_rows", "2"]
    with pytest.raises(StageConfigMismatch, match="--overwrite"):
        ingest.run(argv)
    again = ingest.run([*argv, "--overwrite"])
    # Two images that differ only in suffix keep it in their keys, so no key is used twice.
    assert read_table(again.output).column("key").to_pylist() == ["cats/a.jpg", "cats/a.png", "cats/b", "dog"]
    (tmp_path / "captions.csv").write_text("file,caption\nmissing.jpg,x\n")
    with pytest.raises(ValueError, match="not in"):
        ingest.run(["--input", str(folder), "--captions_file", str(tmp_path / "captions.csv"),
                    "--output", str(tmp_path / "raw2")])


@pytest.mark.parametrize("text, message", [
    ("", r"list.csv: line 1: the file is empty"),
    ("link,alt\nhttp://example.com/a.jpg,x\n", r"list.csv: line 1: missing column\(s\) \['url', 'caption'\]"),
    ('url,caption\nhttp://example.com/a.jpg,"open quote\n', r"list.csv: line \d+: broken CSV"),
])
def test_a_broken_url_list_stops_before_anything_is_written(tmp_path, text, message):
    from curation.url_lists import UrlListError

    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(UrlListError, match=message):
        ingest.run(["--url_list", str(tmp_path / "list.csv"), "--output", str(tmp_path / "raw")])
    assert not (tmp_path / "raw").exists()
    with pytest.raises(ValueError, match="not both"):
        ingest.run(["--url_list", str(tmp_path / "list.csv"), "--input", str(tmp_path / "shards"),
                    "--output", str(tmp_path / "r")])
    # An --output holding the list: --overwrite would delete it before staging it.
    with pytest.raises(ValueError, match="overlaps .*list.csv, which this stage reads"):
        ingest.run(["--url_list", str(tmp_path / "list.csv"), "--output", str(tmp_path), "--overwrite"])
    assert (tmp_path / "list.csv").read_text() == text


def test_a_mistyped_column_is_named_and_a_zero_key_is_a_key(tmp_path):
    from curation.schema import SchemaError

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buffer, format="JPEG")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": [0, 1], "caption": [1, 2], "image": [buffer.getvalue()] * 2}),
                   tmp_path / "in" / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"int64, not text \(file .*part-00000.parquet, column .caption.\)"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    pq.write_table(pa.table({"key": [0, 1], "caption": ["a red square", "the same"],
                             "image": [buffer.getvalue()] * 2}), tmp_path / "in" / "part-00000.parquet")
    result = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2")])
    assert read_table(result.output).column("key").to_pylist() == ["0"]  # key 0 is a key, not a missing one
    assert result.rejects == {"duplicate": 1}
    # pandas writes a categorical column dictionary-encoded: still text.
    captions = pa.array(["a red square", "the same"]).dictionary_encode()
    pq.write_table(pa.table({"key": ["a", "b"], "caption": captions, "image": [buffer.getvalue()] * 2}),
                   tmp_path / "in" / "part-00000.parquet")
    assert ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out3")]).rows == 1


def test_a_made_unique_key_that_another_row_holds_is_refused_before_the_manifest(tmp_path):
    """Two rows keyed x (other images): the second becomes x~<8 hex>. A third row that holds exactly that
    key itself would make two rows of one key: refused, named, with no manifest written."""
    from curation.schema import SchemaError
    from curation.shards import is_complete

    def jpeg(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
        return buffer.getvalue()

    (tmp_path / "in").mkdir()
    images = [jpeg((200, 0, 0)), jpeg((0, 200, 0)), jpeg((0, 0, 200))]
    pq.write_table(pa.table({"key": ["x", "x"], "caption": ["a red square", "a green square"], "image": images[:2]}),
                   tmp_path / "in" / "part-00000.parquet")
    first = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    made = next(k for k in read_table(first.output).column("key").to_pylist() if k != "x")
    pq.write_table(pa.table({"key": [made], "caption": ["a blue square"], "image": images[2:]}),
                   tmp_path / "in" / "part-00001.parquet")
    with pytest.raises(SchemaError, match=f"made unique by ingest is also another row's own key.*{made}"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2")])
    assert not is_complete(tmp_path / "out2")


def test_a_list_fixed_after_a_run_stopped_in_staging_is_staged_again(tmp_path):
    """The first run stops at line 6 with two shards staged and no stage config recorded yet. The fixed list,
    with other shard rows, must not reuse them: they were cut from the old list (rows 4 and 5 were lost)."""
    from curation.url_lists import UrlListError

    rows = [json.dumps({"url": f"http://10.0.0.{i}/x.jpg", "caption": f"thing {i}"}) for i in range(6)]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(rows[:4] + ["{broken"] + rows[4:]) + "\n")
    argv = ["--url_list", str(listing), "--output", str(tmp_path / "raw")]  # private hosts: screened, never fetched
    with pytest.raises(UrlListError, match="line 5: not valid JSON"):
        ingest.run([*argv, "--list_shard_rows", "2"])
    listing.write_text("\n".join(rows) + "\n")
    result = ingest.run([*argv, "--list_shard_rows", "3"])
    assert result.rejects == {"bad_url": 6}
    rejects = read_table(tmp_path / "raw" / "rejects")
    assert sorted(rejects.column("row").to_pylist()) == [1, 2, 3, 4, 5, 6]


def test_a_users_status_and_source_columns_are_data(tmp_path):
    """Only img2dataset's rows carry a download status; in a user's shards `status` is a column like any other,
    and a `source` column names each pair's source (otherwise: the input directory's name)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buffer, format="JPEG")
    other = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 200)).save(other, format="JPEG")
    (tmp_path / "crawl").mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["a red square", "a blue square"],
                             "image": [buffer.getvalue(), other.getvalue()], "status": ["published", "draft"],
                             "txt": ["x", "y"], "source": ["laion", None]}),
                   tmp_path / "crawl" / "part-00000.parquet")
    result = ingest.run(["--input", str(tmp_path / "crawl"), "--output", str(tmp_path / "raw")])
    assert result.rows == 2 and not result.rejects
    pairs = read_table(tmp_path / "raw")
    assert pairs.column("status").to_pylist() == ["published", "draft"] and pairs.column("txt").to_pylist() == ["x", "y"]
    assert pairs.column("source").to_pylist() == ["laion", "crawl"]


def test_an_img2dataset_folder_of_loose_files_is_refused(tmp_path):
    """img2dataset's "files" format has no image bytes in its Parquet and no tar: every row would have been
    an empty_image reject."""
    folder = tmp_path / "files"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["a cat"], "status": ["success"]}),
                   folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="only the parquet and webdataset output formats"):
        ingest.run(["--input", str(folder), "--output", str(tmp_path / "raw")])


def test_an_up_to_date_url_list_rerun_reads_no_list_while_a_changed_list_or_config_is_refused(tmp_path, monkeypatch):
    """Staging already finished for this config, so neither an up-to-date rerun nor a resume needs the list
    (a 400M-row list takes hours to parse); what tells a changed list is its fingerprint, read before."""
    from curation import download

    listing = tmp_path / "list.csv"  # private hosts: screened, never fetched
    listing.write_text("url,caption\n" + "".join(f"http://10.0.0.{i}/x.jpg,thing {i}\n" for i in range(5)))
    output = tmp_path / "raw"
    argv = ["--url_list", str(listing), "--output", str(output), "--list_shard_rows", "2"]
    ingest.run(argv)
    shards, rejects, manifest = _digests(output), _digests(output / "rejects"), (output / "manifest.json").read_bytes()

    def unread(*args, **kwargs):
        raise AssertionError("the URL list was read again")

    monkeypatch.setattr(download, "read_list", unread)
    again = ingest.run(argv)
    assert again.up_to_date and again.manifest == json.loads(manifest)
    assert (output / "manifest.json").read_bytes() == manifest
    (output / "part-00001.parquet").unlink()  # a run that lost a shard and its manifest resumes from staging
    (output / "manifest.json").unlink()
    resumed = ingest.run(argv)
    assert not resumed.up_to_date and resumed.rejects == {"bad_url": 5}
    assert _digests(output) == shards and _digests(output / "rejects") == rejects
    with pytest.raises(StageConfigMismatch, match="max_caption_chars"):
        ingest.run([*argv, "--max_caption_chars", "5"])
    listing.write_text("url,caption\nhttp://10.0.0.9/x.jpg,another thing\n")
    with pytest.raises(StageConfigMismatch, match="source_files"):
        ingest.run(argv)
    monkeypatch.undo()
    assert ingest.run([*argv, "--overwrite"]).rejects == {"bad_url": 1}


def test_a_staged_shard_lost_after_a_finished_run_is_staged_again_without_overwrite(tmp_path, monkeypatch):
    """A cleanup or partial restore that lost a staged list shard: the rerun stages it again (reading the
    list once more) and is up to date, or resumes; it was refused as another input ("pass --overwrite",
    which downloads everything again)."""
    from curation import download

    listing = tmp_path / "list.csv"  # private hosts: screened, never fetched
    listing.write_text("url,caption\n" + "".join(f"http://10.0.0.{i}/x.jpg,thing {i}\n" for i in range(5)))
    output, staged = tmp_path / "raw", tmp_path / "raw" / ingest.STAGING / "list"
    argv = ["--url_list", str(listing), "--output", str(output), "--list_shard_rows", "2"]
    ingest.run(argv)
    shards, rejects, lists = _digests(output), _digests(output / "rejects"), _digests(staged)
    manifest = (output / "manifest.json").read_bytes()
    real, reads = download.read_list, []

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(download, "read_list", counted)
    (staged / "part-00001.parquet").unlink()
    again = ingest.run(argv)
    assert again.up_to_date and (output / "manifest.json").read_bytes() == manifest
    assert len(reads) == 1 and _digests(staged) == lists and _digests(output) == shards
    for lost in (staged / "part-00002.parquet", output / "part-00002.parquet", output / "manifest.json"):
        lost.unlink()
    resumed = ingest.run(argv)
    assert not resumed.up_to_date and resumed.rejects == {"bad_url": 5}
    assert len(reads) == 2 and _digests(staged) == lists
    assert _digests(output) == shards and _digests(output / "rejects") == rejects
    assert ingest.run(argv).up_to_date and len(reads) == 2  # nothing lost: the list is not read


def test_an_up_to_date_image_folder_rerun_reads_no_captions_file_and_dot_names_the_folder(tmp_path, monkeypatch):
    """`--input .` gives the pairs the folder's name as their source, not an empty one."""
    from curation import folders

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / "a.jpg")
    (tmp_path / "captions.csv").write_text("file,caption\na.jpg,a red square\n")
    monkeypatch.chdir(folder)
    argv = ["--input", ".", "--captions_file", str(tmp_path / "captions.csv"), "--output", str(tmp_path / "raw")]
    first = ingest.run(argv)
    assert read_table(first.output).column("source").to_pylist() == ["photos"]
    real = folders.read_list
    monkeypatch.setattr(folders, "read_list", lambda *args, **kwargs: pytest.fail("the captions file was read"))
    assert ingest.run(argv).up_to_date
    monkeypatch.setattr(folders, "read_list", real)
    staged = tmp_path / "raw" / ingest.STAGING / "list" / "part-00000.parquet"
    staged.unlink()  # lost since: staged again, and the output is still the one it was made from
    assert ingest.run(argv).up_to_date and staged.is_file()


def _photos(folder, n: int):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 25, 100, 200 - i * 20)).save(folder / f"img{i:02d}.jpg")
        (folder / f"img{i:02d}.txt").write_text(f"picture number {i}")
    return folder


def test_an_image_folder_staging_killed_then_rerun_at_another_shard_size_loses_no_image(tmp_path, monkeypatch):
    """The shard size was not recorded for a folder: the rerun kept the 2-row shards staged and cut the rest at
    3 rows, so images 4 and 5 fell between the two cuts, neither pair nor reject."""
    import curation.folders

    photos, out = _photos(tmp_path / "photos", 10), tmp_path / "out"
    real, written = curation.folders.write_parts_atomic, []

    def killed_at_the_third(parts, schema, path):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real(parts, schema, path)

    monkeypatch.setattr(curation.folders, "write_parts_atomic", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        ingest.run(["--input", str(photos), "--output", str(out), "--list_shard_rows", "2"])
    monkeypatch.undo()
    result = ingest.run(["--input", str(photos), "--output", str(out), "--list_shard_rows", "3"])  # staged anew
    assert result.rows == 10 and not result.rejects
    assert sorted(read_table(out).column("key").to_pylist()) == [f"img{i:02d}" for i in range(10)]


def test_a_parquet_captions_file_inside_the_folder_and_a_file_captioned_twice(tmp_path):
    photos = _photos(tmp_path / "photos", 2)
    pq.write_table(pa.table({"file": ["img00.jpg", "img01.jpg"], "caption": ["a first", "a second"]}),
                   photos / "captions.parquet")  # made the folder read as shards, and the flag ignored
    result = ingest.run(["--input", str(photos), "--captions_file", str(photos / "captions.parquet"),
                         "--output", str(tmp_path / "out")])
    assert sorted(read_table(tmp_path / "out").column("caption").to_pylist()) == ["a first", "a second"]
    assert result.rows == 2
    (tmp_path / "twice.csv").write_text("file,caption\nimg00.jpg,a dog\nimg01.jpg,a cat\nimg00.jpg,a beach\n")
    with pytest.raises(ValueError, match=r"twice.csv: line 4: 'img00.jpg' has a caption on line 2 already"):
        ingest.run(["--input", str(photos), "--captions_file", str(tmp_path / "twice.csv"),
                    "--output", str(tmp_path / "out2")])
