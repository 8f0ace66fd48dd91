"""Running one stage's job from a Dagster step: in process, or through Dagster Pipes.

Whatever the launcher, the job is the same `pipelines.<stage>.run(argv)` (or
`training.cli.run`) with the same flags, and it leaves its manifest in the
output directory; the asset then reads that manifest back. So the metadata
and checks have one code path, and the job code knows nothing of Dagster.
"""

import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.k8s_pod import job_pod_spec, unmounted
from assets.resources import EXECUTOR_ENV, BeamRunnerResource, misconfigured

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
    spec = _checked_job_pod(beam, argv, env, step_k8s or {})
    try:
        from dagster_k8s import PipesK8sClient
    except ImportError as exc:
        raise misconfigured("BeamRunnerResource", "launcher",
                            "'k8s' needs dagster-k8s installed in the code location image") from exc
    PipesK8sClient().run(context=context, image=beam.k8s_image, command=["python", *command[1:]], env=env,
                         namespace=beam.k8s_namespace, base_pod_spec=spec)
    return None


def _flag_values(argv: list[str]) -> dict[str, str]:
    """Each `--name value` or `--name=value` of a job's flags; a repeated flag's last, as argparse takes it."""
    values = {}
    for i, flag in enumerate(argv):
        if flag.startswith("--") and "=" in flag:
            name, value = flag[2:].split("=", 1)
            values[name] = value
        elif flag.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[flag[2:]] = argv[i + 1]
    return values


def _job_paths(argv: list[str], env: dict[str, str]) -> list[str]:
    """The paths a job pod must see, made absolute: its input and output, any other flag naming a path
    that exists here (a model folder, a metadata file), and the credentials file."""
    values = _flag_values(argv)
    paths = [values.get("input"), values.get("output"),
             *(v for name, v in values.items() if name not in ("input", "output") and v.startswith(("/", "./"))
               and os.path.exists(v)),
             env.get("GOOGLE_APPLICATION_CREDENTIALS")]
    return [os.path.abspath(p) for p in paths if p]


def _checked_job_pod(beam: BeamRunnerResource, argv: list[str], env: dict[str, str], step_k8s: dict) -> dict:
    """The job pod's spec, refused (before any pod starts) where it could only fail inside the pod: under the
    k8s executor, whose step pod already holds the stage's GPU, or without a mount for a path its job reads
    or writes (see `_job_paths`)."""
    if os.environ.get(EXECUTOR_ENV) == "k8s":
        raise misconfigured("BeamRunnerResource", "launcher", f"'k8s' under {EXECUTOR_ENV}=k8s: each step is "
                            "already a pod with its stage's requests, and a job pod beside it would hold a second "
                            "GPU; use 'in_process' or 'subprocess'")
    spec = job_pod_spec(beam.k8s_pod_spec, step_k8s)
    missing = unmounted(spec, _job_paths(argv, env))
    if missing:
        raise misconfigured("BeamRunnerResource", "k8s_pod_spec", f"the job pod mounts nothing at {missing}: "
                            "mount the staging volume (and the credentials secret, the model and metadata "
                            "volumes) at the same paths as the step")
    return spec
