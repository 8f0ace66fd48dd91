"""img2dataset for real, against an HTTP server on 127.0.0.1 started in the test process.

The server hands out generated JPEGs and every broken case the web has: 404,
a response slower than the timeout, corrupt bytes, HTML instead of an image,
a decompression bomb, and a `noai` header. The tests assert exact counts.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import itertools
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.shards import finished_shards, read_table, verify_manifest
from pipelines import ingest

DOWNLOAD_FLAGS = ["--download_processes", "1", "--download_threads", "4", "--download_timeout", "1",
                  "--download_image_size", "32", "--allow_private_network"]


def jpeg(index: int, size: tuple[int, int] = (48, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)).save(out, format="JPEG")
    return out.getvalue()


@contextmanager
def serve_images(delay: float = 0.0):
    """An HTTP server on 127.0.0.1 in a thread; yields (base URL, hit counter)."""
    hits = {"count": 0}
    changing = itertools.count()
    bomb = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(bomb, format="PNG")  # 90M pixels, a few KB on the wire

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the slow case)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits["count"] += 1
            path = self.path.split("?")[0]
            if delay:
                time.sleep(delay)
            if path.startswith("/img/"):
                self._send(jpeg(int(path[5:])))
            elif path == "/changing":
                self._send(jpeg(1000 + next(changing)))
            elif path == "/404":
                self.send_error(404)
            elif path == "/slow":
                time.sleep(3)
                self._send(jpeg(999))
            elif path == "/corrupt":
                self._send(jpeg(998)[:120])
            elif path == "/html":
                self._send(b"<html><body>not an image</body></html>", "text/html")
            elif path == "/bomb":
                self._send(bomb.getvalue(), "image/png")
            elif path == "/noai":
                self._send(jpeg(997), headers={"X-Robots-Tag": "noai"})
            else:
                self.send_error(500)

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_url_list_download_gives_exact_pairs_and_rejects(tmp_path):
    with serve_images() as (base, hits):
        rows = [{"url": f"{base}/img/{i}", "caption": f"a photo of thing {i}", "license": f"cc-{i}",
                 "txt": f"notes {i}"} for i in range(6)]
        rows += [
            {"url": f"{base}/img/0?copy=1", "caption": "same bytes as row 1", "license": "x"},  # sha256 duplicate
            {"url": f"{base}/changing", "caption": "first", "license": "x"},
            {"url": f"{base.upper()}/changing#frag", "caption": "same URL, other bytes", "license": "x"},
            {"url": f"{base}/404", "caption": "gone", "license": "x"},
            {"url": f"{base}/slow", "caption": "too slow", "license": "x"},
            {"url": f"{base}/corrupt", "caption": "broken jpeg", "license": "x"},
            {"url": f"{base}/html", "caption": "a web page", "license": "x"},
            {"url": f"{base}/bomb", "caption": "decompression bomb", "license": "x"},
            {"url": f"{base}/noai", "caption": "opted out", "license": "x"},
            {"url": "javascript:alert(1)", "caption": "script", "license": "x"},
            {"url": "file:///etc/passwd", "caption": "local file", "license": "x"},
            {"url": "", "caption": "no url", "license": "x"},
            {"url": f"{base}/img/7", "caption": "x" * 10_000_000, "license": "x"},  # 10 MB caption
        ]
        listing = write_jsonl(tmp_path / "list.jsonl", rows)
        argv = ["--url_list", str(listing), "--output", str(tmp_path / "raw"), *DOWNLOAD_FLAGS]
        result = ingest.run(argv)
        fetched = hits["count"]
        again = ingest.run(argv)  # up to date: nothing is fetched again, the download's figures are kept
        assert hits["count"] == fetched and again.manifest["shards"] == result.manifest["shards"]
        assert again.manifest["stats"]["download_success_rate"] == 0.6

    assert result.rows == 7
    assert result.rejects == {"bad_url": 3, "caption_too_long": 1, "download_failed": 6, "duplicate": 2}
    stats = result.manifest["stats"]
    assert (stats["download_attempted"], stats["download_succeeded"]) == (15, 9)
    assert stats["download_success_rate"] == 0.6
    assert stats["duplicates"] == {"sha256": 1, "url": 1}
    verify_manifest(tmp_path / "raw")
    pairs = read_table(tmp_path / "raw")
    assert pairs.column("key").to_pylist() == [f"list-{n:09d}" for n in (1, 2, 3, 4, 5, 6, 8)]
    assert pairs.column("license").to_pylist()[:6] == [f"cc-{i}" for i in range(6)]  # extra column kept
    # A list's own `txt` is data too (only an img2dataset folder's repeats its caption): it was dropped.
    assert pairs.column("txt").to_pylist() == [f"notes {i}" for i in range(6)] + [None]
    assert set(pairs.column("width").to_pylist()) == {32}
    assert all(hashlib.sha256(b).hexdigest() == s for b, s in zip(pairs.column("image").to_pylist(),
                                                                   pairs.column("sha256").to_pylist()))
    rejects = read_table(tmp_path / "raw" / "rejects")
    by_key = {r["key"]: r for r in rejects.to_pylist()}
    assert by_key["list-000000007"]["detail"] == "duplicate_of=list-000000001 by=sha256"
    assert by_key["list-000000009"]["detail"] == "duplicate_of=list-000000008 by=url"
    assert by_key["list-000000010"]["detail"] == "failed_to_download: HTTP Error 404: Not Found"
    assert by_key["list-000000011"]["detail"] == "failed_to_download: timed out"
    assert by_key["list-000000012"]["detail"] == "failed_to_resize: Image decoding error"
    assert by_key["list-000000014"]["detail"] == ("failed_to_resize: image area too large (refused from its "
                                                  "header, before decoding)")
    assert "X-Robots-Tag" in by_key["list-000000015"]["detail"]
    assert by_key["list-000000017"]["detail"].startswith("file:// URL refused")
    assert by_key["list-000000017"]["row"] == 17 and by_key["list-000000017"]["source"] == str(listing)
    assert not (tmp_path / "raw" / "_staging" / "download").exists()  # img2dataset's copy is dropped at the end


def test_private_network_urls_are_never_fetched_without_opt_in(tmp_path):
    with serve_images() as (base, hits):
        listing = write_jsonl(tmp_path / "list.jsonl", [{"url": f"{base}/img/{i}", "caption": "c"} for i in range(3)]
                              + [{"url": "http://169.254.169.254/latest/meta-data/", "caption": "metadata"},
                                 {"url": "http://2130706433/img/1", "caption": "127.0.0.1 spelled as an int"}])
        flags = [f for f in DOWNLOAD_FLAGS if f != "--allow_private_network"]
        # --input naming a list file is the same as --url_list (the Dagster asset passes --input)
        result = ingest.run(["--input", str(listing), "--output", str(tmp_path / "raw"), *flags])
        assert hits["count"] == 0
    assert result.rows == 0 and result.rejects == {"bad_url": 5}
    details = read_table(tmp_path / "raw" / "rejects").column("detail").to_pylist()
    assert all("private-network host" in d for d in details)


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_shards(directory)}


@pytest.mark.slow
def test_killed_download_resumes_to_the_uninterrupted_rows(tmp_path):
    with serve_images(delay=0.3) as (base, _):
        listing = tmp_path / "list.csv"
        lines = ["url,caption"] + [f"{base}/img/{i},thing number {i}" for i in range(11)]
        lines.insert(5, f"{base}/img/3,a repeated url")
        listing.write_text("\n".join(lines) + "\n")
        argv = ["--url_list", str(listing), "--list_shard_rows", "3", *DOWNLOAD_FLAGS[:-1],
                "--download_threads", "1", "--allow_private_network"]
        output = tmp_path / "killed"
        cmd = [sys.executable, "-m", "pipelines.cli", "ingest", *argv, "--output", str(output)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        download = output / "_staging" / "download"

        def kill_after_the_first_shard() -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None and not any(download.glob("*_stats.json")):
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

        killer = threading.Thread(target=kill_after_the_first_shard)
        killer.start()  # the uninterrupted baseline runs meanwhile (img2dataset needs the main thread)
        baseline = ingest.run([*argv, "--output", str(tmp_path / "baseline")])
        killer.join()
        done = len(list(download.glob("*_stats.json")))
        assert 0 < done < 4, "the kill must land in the middle of the download"
        assert not (output / "manifest.json").exists()
        resumed = ingest.run([*argv, "--output", str(output)])

    assert resumed.rows == baseline.rows == 11 and resumed.rejects == baseline.rejects == {"duplicate": 1}
    assert resumed.manifest["stats"]["download_attempted"] == 12
    assert _digests(output) == _digests(tmp_path / "baseline")
    assert _digests(output / "rejects") == _digests(tmp_path / "baseline" / "rejects")


@pytest.mark.slow
def test_img2dataset_webdataset_folder_is_an_input(tmp_path):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    with serve_images() as (base, _):
        table = pa.table({"url": [f"{base}/img/{i}" for i in range(4)] + [f"{base}/404"],
                          "text": [f"thing {i}" for i in range(5)]})
        pq.write_table(table, tmp_path / "list.parquet")
        download(url_list=str(tmp_path / "list.parquet"), input_format="parquet", caption_col="text",
                 output_folder=str(tmp_path / "wds"), output_format="webdataset", processes_count=1,
                 thread_count=2, image_size=32, timeout=2)
    result = ingest.run(["--input", str(tmp_path / "wds"), "--output", str(tmp_path / "raw")])
    assert result.rows == 4 and result.rejects == {"download_failed": 1}
    pairs = read_table(tmp_path / "raw")
    assert pairs.column("caption").to_pylist() == [f"thing {i}" for i in range(4)]
    assert pc.all(pc.equal(pairs.column("source"), "wds")).as_py()


@pytest.mark.slow
def test_a_headerless_list_with_its_own_column_names_keeps_its_keys_urls_and_captions(tmp_path):
    """CC12M-style: no header row, columns named by flags. Staging writes key/url/caption whatever the list
    called them; the ingest job read the user's names there and crashed after the download (or wrote null
    URLs, or threw the list's keys away)."""
    with serve_images() as (base, _):
        listing = tmp_path / "cc.tsv"
        listing.write_text(f'id-a\t{base}/img/1\t"Best" photo of a thing\nid-b\t{base}/img/2\ta second thing\n'
                           f'id-c\t{base}/img/1?again\tthe first image again\n')
        result = ingest.run(["--url_list", str(listing), "--output", str(tmp_path / "raw"), *DOWNLOAD_FLAGS,
                             "--url_list_columns", "SAMPLE_ID,URL,TEXT", "--url_column", "URL",
                             "--caption_column", "TEXT", "--key_column", "SAMPLE_ID"])
    assert result.rows == 2 and result.rejects == {"duplicate": 1}
    pairs = read_table(tmp_path / "raw").to_pylist()
    assert [(p["key"], p["url"], p["caption"]) for p in pairs] == [
        ("id-a", f"{base}/img/1", '"Best" photo of a thing'), ("id-b", f"{base}/img/2", "a second thing")]
    (duplicate,) = read_table(tmp_path / "raw" / "rejects").to_pylist()
    assert (duplicate["key"], duplicate["detail"]) == ("id-c", "duplicate_of=id-a by=sha256")


def test_opencv_refuses_a_decompression_bomb_before_decoding_it_and_cut_stats_are_named(tmp_path, monkeypatch):
    """img2dataset decoded an image whole before comparing its area: OpenCV's own limit is set for its workers."""
    import json as json_module

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.download import DownloadConfig, download_stats, drop_torn_shards, run_img2dataset

    seen = {}
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setattr("img2dataset.download", lambda **kwargs: seen.update(
        limit=__import__("os").environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")))
    (tmp_path / "fetch").mkdir()
    pq.write_table(pa.table({"url": ["http://e.com/a.jpg"], "row": [0]}), tmp_path / "fetch" / "part-00000.parquet")
    run_img2dataset(tmp_path / "fetch", tmp_path / "download", DownloadConfig(max_image_area=1e6), 10)
    assert seen == {"limit": "1000000"}
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "00000_stats.json").write_text(json_module.dumps({"count": 3})[:-3])
    with pytest.raises(ValueError, match=r"00000_stats.json is not valid JSON.*delete it and its .parquet"):
        download_stats(tmp_path / "download")
    # A resumed download deletes the torn shard, which img2dataset's incremental mode then fetches again.
    for name in ("00000.parquet", "00001.parquet", "000010.parquet"):
        (tmp_path / "download" / name).write_bytes(b"PAR1")
    (tmp_path / "download" / "00001_stats.json").write_text(json_module.dumps({"count": 1, "successes": 1}))
    assert drop_torn_shards(tmp_path / "download") == ["00000"]
    assert {p.name for p in (tmp_path / "download").iterdir()} == {
        "000010.parquet", "00001.parquet", "00001_stats.json"}
    assert download_stats(tmp_path / "download")["download_succeeded"] == 1


def test_a_resumed_download_fetches_a_torn_shard_again(tmp_path, monkeypatch):
    """Killed while img2dataset wrote a shard's stats, the rerun stopped at the torn file, asking for a delete."""
    from curation.download import DownloadConfig
    from pipelines import ingest

    download = tmp_path / "download"
    download.mkdir(parents=True)
    (download / "00000.parquet").write_bytes(b"PAR1")
    (download / "00000_stats.json").write_text('{"count": 3, "succ')
    fetched = []
    monkeypatch.setattr(ingest, "run_img2dataset", lambda fetch, out, config, rows: fetched.append(
        sorted(p.name for p in out.iterdir())))
    ingest._download({"download": DownloadConfig(), "shard_rows": 10}, tmp_path)
    assert fetched == [[]]  # img2dataset saw no trace of the torn shard, so it downloads it again
