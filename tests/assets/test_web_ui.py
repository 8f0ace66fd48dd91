"""The Dagster web UI in a real browser: launch a whole build from the asset graph and read a check result.

Debian's chromium driven by playwright. CI installs it with
`apt-get install -y chromium`; without it the test is skipped.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
BUILD = "ui-build"
BUILD_TIMEOUT_S = 900

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed (apt-get install chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster dev did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def dagster_dev(tmp_path):
    """`dagster dev` on 127.0.0.1 in its own process group, with a temp DAGSTER_HOME and one build partition."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "CLIP_CURATION_ROOT": str(tmp_path / "builds"),
           "CLIP_CURATION_INBOX": str(tmp_path / "inbox"),
           # Launchpad defaults for a small demo build (the UI launches with the default config).
           "CLIP_CURATION_DEMO_PAIRS": "24", "CLIP_CURATION_TRAIN_STEPS": "8", "CLIP_CURATION_TRAIN_BATCH": "8",
           # The demo's random tiny VLM skips fusion, so fused_caption is all null; the trainer's demo flags
           # still ask for fused captions when the column exists.
           "CLIP_CURATION_FUSED_RATIO": "0"}
    subprocess.run([sys.executable, "-c", "import dagster as dg; "
                    f"dg.DagsterInstance.get().add_dynamic_partitions('builds', ['{BUILD}'])"],
                   env=env, check=True, cwd=REPO)
    port = _free_port()
    log = tmp_path / "dagster-dev.log"
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    with open(log, "w") as out:
        process = subprocess.Popen([dagster, "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_server(url, process, log)
        yield url, tmp_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        time.sleep(1)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the code servers and daemon of the group, if any linger
        except ProcessLookupError:
            pass


def _wait_for_run_status(page, url: str) -> str:
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        page.goto(f"{url}/runs", wait_until="domcontentloaded")
        page.wait_for_timeout(3000)
        for status in ("Success", "Failure", "Canceled"):
            if page.get_by_text(status, exact=True).count():
                return status
        page.wait_for_timeout(5000)
    return "timeout"


def test_launch_a_build_from_the_asset_graph_and_read_its_checks(dagster_dev):
    url, tmp_path = dagster_dev
    screenshots = Path(os.environ.get("CLIP_CURATION_SCREENSHOTS", tmp_path))
    screenshots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.goto(f"{url}/asset-groups/curation", wait_until="domcontentloaded")
            page.get_by_text("raw_pairs").first.wait_for(timeout=60_000)
            page.screenshot(path=str(screenshots / "asset-graph.png"))

            page.get_by_role("button", name="Materialize all…").click()
            page.get_by_role("button", name="All", exact=True).click()
            page.get_by_role("button", name="Launch 1 run").click()
            page.get_by_text("Launched run").wait_for(timeout=30_000)

            status = _wait_for_run_status(page, url)
            page.screenshot(path=str(screenshots / "runs.png"))
            builds = tmp_path / "builds" / BUILD
            assert status == "Success", f"run ended {status}; outputs: {sorted(p.name for p in builds.glob('*'))}"

            page.goto(f"{url}/assets/raw_pairs?view=checks", wait_until="domcontentloaded")
            page.get_by_text("schema_valid").first.wait_for(timeout=60_000)
            page.get_by_text("schema_valid").first.click()
            page.get_by_text("Passed", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(screenshots / "raw_pairs-checks.png"))
            assert page.get_by_text("This is a blocking asset check").count()
        finally:
            browser.close()
    assert (tmp_path / "builds" / BUILD / "raw_pairs" / "manifest.json").is_file()
    assert (screenshots / "raw_pairs-checks.png").stat().st_size > 10_000
