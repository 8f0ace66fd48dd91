"""A full demo build through Dagster on the production instance config (deploy/dagster.yaml) and real PostgreSQL."""

import shutil
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from assets.definitions import stage_assets
from assets.stages import available_stages, builds
from tests.assets.helpers import demo_run_config, stage_resources
from tests.deploy.postgres_server import binaries, running_postgres

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed (apt-get install postgresql)")]


@pytest.fixture
def postgres_instance(tmp_path, monkeypatch):
    """A DagsterInstance built from deploy/dagster.yaml, its env vars pointing at a fresh local server."""
    with running_postgres() as pg:
        for name, value in (("HOST", pg["host"]), ("PORT", str(pg["port"])), ("USER", pg["user"]),
                            ("PASSWORD", pg["password"]), ("DB", pg["db"])):
            monkeypatch.setenv(f"DAGSTER_PG_{name}", value)
        monkeypatch.setenv("DAGSTER_COMPUTE_LOG_DIR", str(tmp_path / "compute_logs"))
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance, pg


def test_a_demo_build_is_recorded_in_postgres(postgres_instance, tmp_path):
    instance, pg = postgres_instance
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    instance.add_dynamic_partitions(builds.name, ["pg-build"])
    result = dg.materialize(stage_assets, instance=instance, partition_key="pg-build",
                            resources=stage_resources(tmp_path / "builds"), run_config=demo_run_config())
    assert result.success
    assets = {name for stage in available_stages() for name in (stage.asset, *stage.extra_assets)}

    # Straight from the database: the run, and one materialisation per asset for this partition.
    with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname=pg["db"]) as conn:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute("SELECT asset_key, partition FROM event_logs WHERE run_id = %s "
                    "AND dagster_event_type = 'ASSET_MATERIALIZATION'", (result.run_id,))
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s "
                    "AND dagster_event_type = 'ASSET_CHECK_EVALUATION'", (result.run_id,))
        (checks,) = cur.fetchone()
    assert {dg.AssetKey.from_db_string(key).to_user_string() for key, _ in rows} == assets
    assert {partition for _, partition in rows} == {"pg-build"}
    assert checks == sum(len(a.check_specs_by_output_name) for a in stage_assets)

    # And through a second instance reading the same database, as the webserver would.
    with dg.DagsterInstance.from_config(instance.root_directory) as reader:
        run = reader.get_run_by_id(result.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        latest = reader.get_latest_materialization_event(dg.AssetKey("raw_pairs"))
        assert latest.run_id == result.run_id
        assert latest.asset_materialization.metadata["rows_out"].value > 0
        assert reader.get_dynamic_partitions(builds.name) == ["pg-build"]
