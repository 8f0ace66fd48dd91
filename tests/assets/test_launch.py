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


def test_a_k8s_job_pod_gets_the_staging_volume_and_its_stage_s_gpu_request(monkeypatch):
    """The job pod had neither volumes nor the GPU its stage's step asks for."""
    from assets.stages import STAGES

    launched = {}

    class FakePipesK8sClient:
        def run(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setitem(sys.modules, "dagster_k8s", types.SimpleNamespace(PipesK8sClient=FakePipesK8sClient))
    rewrite = next(stage for stage in STAGES if stage.name == "rewrite")
    beam = BeamRunnerResource(launcher="k8s", k8s_image="ghcr.io/x/gpu:1", k8s_pod_spec=STAGING)
    assert run_stage(dg.build_asset_context(), "pipelines.rewrite", ["--input", "/scratch/b/in"], beam,
                     {"OPENAI_API_KEY": "k"}, step_k8s=rewrite.k8s) is None
    spec = launched["base_pod_spec"]
    assert launched["image"] == "ghcr.io/x/gpu:1" and launched["env"] == {"OPENAI_API_KEY": "k"}
    assert launched["command"][:4] == ["python", "-m", "assets.pipes_job", "pipelines.rewrite"]
    assert spec["volumes"] == STAGING["volumes"]
    assert spec["containers"][0]["volumeMounts"] == STAGING["containers"][0]["volumeMounts"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["node_selector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "resources" not in STAGING["containers"][0]  # the resource's own spec is not changed in place


def test_what_the_job_pod_spec_sets_itself_wins_over_the_stage_s_requests():
    from assets.launch import job_pod_spec
    from assets.stages import gpu_k8s_config

    own = {**STAGING, "nodeSelector": {"pool": "a100"},
           "containers": [{**STAGING["containers"][0], "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}
    spec = job_pod_spec(own, gpu_k8s_config("8", "48Gi"))
    assert spec["nodeSelector"] == {"pool": "a100"} and "node_selector" not in spec
    assert spec["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert spec["tolerations"]  # what it does not set still comes from the stage
