"""What a build is made from: its raw source (a shards folder, a URL list or the generated demo), kept.

A build recorded nothing of its source, and the ingest config's defaults
named the demo: a plain "Materialize" of a partition (or a backfill), which
runs with the default config, generated a demo pool for a build made from a
crawl, and the rebuilt upstream then wiped every stage after it. Now the
first ingest of a build records its source under `B/.upstream/source.json`
(a demo's size and seed sit in `B/demo/demo_params.json`); a config field
left empty means the build's own, and one that names another source, size
or seed is refused unless the run says `overwrite`.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.build_records import UPSTREAM_MARKER
from assets.config import DEMO_PAIRS_DEFAULT, DEMO_SHARD_ROWS_DEFAULT, DEMO_SOURCE, IngestRunConfig
from curation.shards import atomic_write_bytes
from pipelines.common import STAGE_CONFIG

DEMO_PARAMS = "demo_params.json"
SOURCE_RECORD = "source.json"


def is_demo_build(build_dir: Path) -> bool:
    """A build whose raw pairs came from the generated demo pool."""
    recorded = build_dir / "raw_pairs" / STAGE_CONFIG
    if not recorded.is_file():
        return False
    return json.loads(recorded.read_text()).get("input") == str((build_dir / "demo" / "pool").resolve())


def recorded_source(build_dir: Path) -> Optional[str]:
    """The build's source: "demo" or a resolved path; for a build from before the record, "demo" if its raw
    pairs came from the demo pool; None for a build not ingested yet (or one of those that did not)."""
    path = build_dir / UPSTREAM_MARKER / SOURCE_RECORD
    if path.is_file():
        return json.loads(path.read_text())["source"]
    return DEMO_SOURCE if is_demo_build(build_dir) else None


def _demo_params(build_dir: Path) -> Optional[dict]:
    path = build_dir / "demo" / DEMO_PARAMS
    return json.loads(path.read_text()) if path.is_file() and (build_dir / "demo" / "classes.json").is_file() else None


def _refuse(build: str, what: str, fields: str) -> dg.Failure:
    return dg.Failure(description=f"build {build!r} was made from {what}; IngestRunConfig {fields} asks for "
                                  f"another. Leave it empty to use the build's own, or set overwrite: true to "
                                  f"rebuild the build from the new one (every later stage is rebuilt too)")


def build_source(config: IngestRunConfig, build_dir: Path) -> Path:
    """The raw input of the build, refused where it is not the one the build was made from (see the module
    docstring); for the demo, a pool generated once per build under `B/demo`, where the later stages' demo
    flags look for its eval split and classes."""
    build = build_dir.name
    ingested = (build_dir / "raw_pairs" / STAGE_CONFIG).is_file()
    recorded = recorded_source(build_dir)
    if recorded is None and ingested and not config.source:  # overwrite or not: which source is it to be?
        raise dg.Failure(description=f"build {build!r} was ingested before builds recorded their source: name it "
                                     f"once in IngestRunConfig.source (a shards folder, a URL list or 'demo')")
    source = config.source or recorded or DEMO_SOURCE
    if source != DEMO_SOURCE:
        path = Path(source).expanduser()
        if not path.exists():
            raise dg.Failure(description=f"IngestRunConfig.source: {path} does not exist")
        source = str(path.resolve())
    if recorded is not None and source != recorded and not config.overwrite:
        raise _refuse(build, recorded, "source")
    if source != DEMO_SOURCE:
        _record(build_dir, source)
        return Path(source)
    old = _demo_params(build_dir)
    own = old if recorded == DEMO_SOURCE and old is not None else {}  # the demo the build was made from
    wanted = {"n_pairs": config.demo_pairs or own.get("n_pairs") or DEMO_PAIRS_DEFAULT, "seed": config.seed,
              "rows_per_shard": config.demo_shard_rows or own.get("rows_per_shard") or DEMO_SHARD_ROWS_DEFAULT}
    if own and own != wanted and not config.overwrite:
        names = {"n_pairs": "demo_pairs", "seed": "seed", "rows_per_shard": "demo_shard_rows"}
        differ = [names[k] for k in wanted if own.get(k) != wanted[k]]
        raise _refuse(build, f"a demo of {own['n_pairs']} pairs, seed {own['seed']} and {own['rows_per_shard']} "
                             f"rows per shard", "/".join(differ))
    if old != wanted:
        _generate_demo(build_dir, wanted)
    _record(build_dir, DEMO_SOURCE)
    return build_dir / "demo" / "pool"


def _generate_demo(build_dir: Path, params: dict) -> None:
    """Generated beside the demo and swapped in whole: a generation that fails (or is killed) leaves the demo
    that the finished raw_pairs was made from, and the later stages read, as it was."""
    from curation.demo_data import generate

    partial = build_dir / ".demo.partial"
    shutil.rmtree(partial, ignore_errors=True)
    generate(partial, n_pairs=params["n_pairs"], n_eval=max(params["n_pairs"] // 10, 100), seed=params["seed"],
             rows_per_shard=params["rows_per_shard"])
    (partial / DEMO_PARAMS).write_text(json.dumps(params))
    shutil.rmtree(build_dir / "demo", ignore_errors=True)
    partial.rename(build_dir / "demo")


def _record(build_dir: Path, source: str) -> None:
    (build_dir / UPSTREAM_MARKER).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(build_dir / UPSTREAM_MARKER / SOURCE_RECORD, json.dumps({"source": source}).encode())
