"""An in-process job sees the environment its resources give it (API keys, credentials), and only while it runs."""

import os
import sys
import types

import dagster as dg
import pytest

from assets.launch import run_stage
from assets.resources import BeamRunnerResource


def test_an_in_process_job_gets_the_resources_environment(monkeypatch):
    seen = {}
    job = types.ModuleType("fake_stage_job")
    job.run = lambda argv: seen.update(argv=argv, key=os.environ.get("OPENAI_API_KEY")) or "done"
    monkeypatch.setitem(sys.modules, "fake_stage_job", job)
    monkeypatch.setenv("OPENAI_API_KEY", "the-code-location's")
    result = run_stage(dg.build_asset_context(), "fake_stage_job", ["--x"], BeamRunnerResource(),
                       {"OPENAI_API_KEY": "the-resource's"})
    assert result == "done" and seen == {"argv": ["--x"], "key": "the-resource's"}
    assert os.environ["OPENAI_API_KEY"] == "the-code-location's"  # put back afterwards


STAGING = {"volumes": [{"name": "scratch", "persistentVolumeClaim": {"claimName": "clip-curation-builds"}}],
           "containers": [{"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]}


def test_a_k8s_job_pod_without_the_staging_volume_is_refused():
    """The job wrote its output into its own pod's file system; the step then found nothing there."""
    with pytest.raises(dg.Failure, match="k8s_pod_spec: .*volumeMounts"):
        BeamRunnerResource(launcher="k8s", k8s_image="img").check()
    with pytest.raises(dg.Failure, match="k8s_pod_spec"):
        BeamRunnerResource(launcher="k8s", k8s_image="img", k8s_pod_spec={"volumes": STAGING["volumes"]}).check()
    BeamRunnerResource(launcher="k8s", k8s_image="img", k8s_pod_spec=STAGING).check()
    snake = {"volumes": STAGING["volumes"], "containers": [{"volume_mounts": [{"name": "scratch", "mount_path": "/s"}]}]}
    BeamRunnerResource(launcher="k8s", k8s_image="img", k8s_pod_spec=snake).check()


def _launched(monkeypatch, beam, argv, env, stage_name="rewrite") -> dict:
    from assets.stages import STAGES

    launched = {}

    class FakePipesK8sClient:
        def run(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setitem(sys.modules, "dagster_k8s", types.SimpleNamespace(PipesK8sClient=FakePipesK8sClient))
    stage = next(stage for stage in STAGES if stage.name == stage_name)
    assert run_stage(dg.build_asset_context(), stage.module, argv, beam, env, step_k8s=stage.k8s) is None
    return launched


def test_a_k8s_job_pod_gets_the_staging_volume_and_its_stage_s_gpu_request(monkeypatch):
    """The job pod had neither volumes nor the GPU its stage's step asks for."""
    monkeypatch.delenv("CLIP_CURATION_EXECUTOR", raising=False)
    beam = BeamRunnerResource(launcher="k8s", k8s_image="ghcr.io/x/gpu:1", k8s_pod_spec=STAGING, k8s_namespace="ml")
    launched = _launched(monkeypatch, beam, ["--input", "/scratch/b/in", "--output=/scratch/b/out"],
                         {"OPENAI_API_KEY": "k"})
    spec = launched["base_pod_spec"]
    assert launched["image"] == "ghcr.io/x/gpu:1" and launched["env"] == {"OPENAI_API_KEY": "k"}
    assert launched["namespace"] == "ml"
    assert launched["command"][:4] == ["python", "-m", "assets.pipes_job", "pipelines.rewrite"]
    assert spec["volumes"] == STAGING["volumes"]
    assert spec["containers"][0]["volumeMounts"] == STAGING["containers"][0]["volumeMounts"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["node_selector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "resources" not in STAGING["containers"][0]  # the resource's own spec is not changed in place


def test_a_k8s_job_pod_that_could_only_fail_inside_the_pod_is_refused_before_it_starts(monkeypatch, tmp_path):
    """An output or credentials path no mount holds, or a second GPU pod beside a k8s-executor step pod."""
    monkeypatch.delenv("CLIP_CURATION_EXECUTOR", raising=False)
    beam = BeamRunnerResource(launcher="k8s", k8s_image="img", k8s_pod_spec=STAGING)
    with pytest.raises(dg.Failure, match=r"mounts nothing at \['/data/out'\]"):
        _launched(monkeypatch, beam, ["--input", "/scratch/in", "--output", "/data/out"], {})
    with pytest.raises(dg.Failure, match="data/out"):  # a relative path is the step's, made absolute
        _launched(monkeypatch, beam, ["--input", "/scratch/in", "--output", "/scratch/out", "--output", "data/out"],
                  {})
    models = tmp_path / "models" / "llm"
    models.mkdir(parents=True)
    with pytest.raises(dg.Failure, match="models/llm"):  # a model folder the step sees, the pod would not
        _launched(monkeypatch, beam, ["--input", "/scratch/in", "--output", "/scratch/out",
                                      f"--rewrite_model={models}"], {})
    with pytest.raises(dg.Failure, match="/secrets/gcp/key.json"):
        _launched(monkeypatch, beam, ["--input", "/scratch/in", "--output", "/scratch/out"],
                  {"GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp/key.json"})
    monkeypatch.setenv("CLIP_CURATION_EXECUTOR", "k8s")
    with pytest.raises(dg.Failure, match="second GPU"):
        _launched(monkeypatch, beam, ["--input", "/scratch/in", "--output", "/scratch/out"], {})


def test_what_the_job_pod_spec_sets_itself_wins_resource_by_resource_and_the_api_server_would_accept_it():
    """A CPU limit of every job pod dropped the stage's GPU request; then a per-dict merge put the stage's
    8-CPU request beside a 4-CPU limit, and a GPU request of 1 beside a limit of 4: both refused by Kubernetes."""
    from assets.k8s_pod import _quantity, job_pod_spec
    from assets.stages import gpu_k8s_config

    own = {**STAGING, "nodeSelector": {"pool": "a100"},
           "tolerations": [{"key": "dedicated", "operator": "Exists"}],
           "containers": [{**STAGING["containers"][0], "resources": {"limits": {"cpu": "4", "memory": "8Gi"}}}]}
    spec = job_pod_spec(own, gpu_k8s_config("8", "48Gi"))
    resources = spec["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert resources["requests"] == {"nvidia.com/gpu": "1"}  # its own cpu/memory: limits only, as it said
    assert spec["nodeSelector"] == {"pool": "a100"} and "node_selector" not in spec  # its own pool, whole
    assert [t["key"] for t in spec["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    four = job_pod_spec({"containers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}]}, gpu_k8s_config("8", "48Gi"))
    assert four["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "nvidia.com/gpu" not in four["containers"][0]["resources"]["requests"]  # defaults to its limit
    low = job_pod_spec({"containers": [{"resources": {"requests": {"cpu": "16", "nvidia.com/gpu": "1"},
                                                      "limits": {"cpu": "4", "nvidia.com/gpu": "2"}}}]}, {})
    assert low["containers"][0]["resources"]["requests"] == {"cpu": "4", "nvidia.com/gpu": "2"}
    for spec in (spec, four):  # every request at or under its limit
        resources = spec["containers"][0]["resources"]
        assert all(_quantity(v) <= _quantity(resources["limits"][k]) for k, v in resources["requests"].items()
                   if k in resources["limits"])
    assert _quantity("48Gi") == 48 * 2 ** 30 and _quantity("500m") == 0.5
