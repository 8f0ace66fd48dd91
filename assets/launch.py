"""Running one stage's job from a Dagster step: in process, or through Dagster Pipes.

Whatever the launcher, the job is the same `pipelines.<stage>.run(argv)` (or
`training.cli.run`) with the same flags, and it leaves its manifest in the
output directory; the asset then reads that manifest back. So the metadata
and checks have one code path, and the job code knows nothing of Dagster.
"""

import contextlib
import copy
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.resources import BeamRunnerResource, misconfigured, spec_value

PIPES_ENTRY = "assets.pipes_job"


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` set in this process for the duration of an in-process job, then put back as it was."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_stage_module(module_name: str):
    """The stage's job module, or a clear failure when that stage is not implemented in this checkout."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise dg.Failure(description=f"stage module {module_name} is not installed in this code location; "
                                         f"this asset cannot run until it exists") from exc
        raise


def job_pod_spec(base: dict, step_k8s: dict) -> dict:
    """The job pod's PodSpec: the resource's (volumes, mounts) plus the step's `dagster-k8s/config` requests,
    node selector and tolerations, so a rewrite job lands on a GPU node with its GPU, as its step would.

    Whatever `base` sets itself wins; nothing of it is changed in place.
    """
    spec = copy.deepcopy(base)
    containers = spec_value(spec, "containers") or [{}]
    spec.pop("containers", None)
    spec["containers"] = containers
    resources = step_k8s.get("container_config", {}).get("resources")
    if resources and spec_value(containers[0], "resources") is None:
        containers[0]["resources"] = copy.deepcopy(resources)
    for name, value in step_k8s.get("pod_spec_config", {}).items():
        if spec_value(spec, name) is None:
            spec[name] = copy.deepcopy(value)
    return spec


def run_stage(context: dg.AssetExecutionContext, module_name: str, argv: list[str], beam: BeamRunnerResource,
              env: dict[str, str], is_beam_job: bool = True, step_k8s: Optional[dict] = None):
    """Run `module.run(argv)` with the launcher the Beam resource asks for; raise on failure.

    In process, the job's own result comes back (training's metrics); through
    Pipes, None: the asset reads what it needs from the output directory.
    A program that is not a Beam job (training) runs in process unless a
    launcher is named explicitly. `step_k8s` is the step's `dagster-k8s/config`,
    whose requests a k8s job pod takes over.
    """
    launcher = beam.effective_launcher()
    if not is_beam_job and beam.launcher == "auto":
        launcher = "in_process"  # not a Beam job: the runner does not concern it
    context.log.info(f"{module_name} via {launcher}: {' '.join(argv)}")
    if launcher == "in_process":
        with _environment(env):  # the resources' keys and credentials, as a launched job gets them
            return load_stage_module(module_name).run(argv)
    command = [sys.executable, "-m", PIPES_ENTRY, module_name, *argv]
    if launcher == "subprocess":
        dg.PipesSubprocessClient(env=env, cwd=str(Path.cwd())).run(context=context, command=command)
        return None
    try:
        from dagster_k8s import PipesK8sClient
    except ImportError as exc:
        raise misconfigured("BeamRunnerResource", "launcher",
                            "'k8s' needs dagster-k8s installed in the code location image") from exc
    PipesK8sClient().run(context=context, image=beam.k8s_image, command=["python", *command[1:]], env=env,
                         base_pod_spec=job_pod_spec(beam.k8s_pod_spec, step_k8s or {}))
    return None
