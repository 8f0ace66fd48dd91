"""The composition root: every asset, check, resource, schedule and sensor of the project, in one `Definitions`.

`dagster dev` in the repository root loads this module (pyproject's
`[tool.dagster]`). Only the stages whose job modules exist in this checkout
are defined (the chain from ingest up to the first missing stage), so the
code location always loads. Resource defaults come from the environment
(`CLIP_CURATION_*`), secrets through `dg.EnvVar` only.
"""

import os

import dagster as dg

from assets.automation import build_job, url_list_sensor, weekly_schedule
from assets.resources import (
    EXECUTOR_ENV, BeamRunnerResource, CaptionerResource, LLMEngineResource, QualityGatesResource, StorageResource,
)
from assets.stages import available_stages, stage_asset


def _executor():
    """Steps in their own pods on Kubernetes (deploy/helm), else one process per step."""
    if os.environ.get(EXECUTOR_ENV) == "k8s":
        from dagster_k8s import k8s_job_executor
        return k8s_job_executor
    return dg.multiprocess_executor


def _optional_secret(name: str):
    return dg.EnvVar(name) if os.environ.get(name) else None


stages = available_stages()
stage_assets = [stage_asset(stage) for stage in stages]
asset_names = [name for stage in stages for name in (stage.asset, *stage.extra_assets)]
dataset_build = build_job(asset_names)

defs = dg.Definitions(
    assets=stage_assets,
    jobs=[dataset_build],
    schedules=[weekly_schedule(dataset_build)],
    sensors=[url_list_sensor(dataset_build)],
    executor=_executor(),
    resources={
        "storage": StorageResource(root=os.environ.get("CLIP_CURATION_ROOT", "./runs"),
                                   staging=os.environ.get("CLIP_CURATION_STAGING", "./runs/.staging"),
                                   key=_optional_secret("CLIP_CURATION_STORAGE_KEY"),
                                   secret=_optional_secret("CLIP_CURATION_STORAGE_SECRET")),
        "beam_runner": BeamRunnerResource(runner=os.environ.get("CLIP_CURATION_RUNNER", "DirectRunner"),
                                          credentials=_optional_secret("GOOGLE_APPLICATION_CREDENTIALS")),
        "llm": LLMEngineResource(engine=os.environ.get("CLIP_CURATION_LLM_ENGINE", "transformers"),
                                 model=os.environ.get("CLIP_CURATION_LLM_MODEL", ""),
                                 base_url=os.environ.get("OPENAI_BASE_URL"),
                                 api_key=_optional_secret("OPENAI_API_KEY")),
        "captioner": CaptionerResource(engine=os.environ.get("CLIP_CURATION_CAPTIONER_ENGINE", "transformers"),
                                       model=os.environ.get("CLIP_CURATION_CAPTIONER_MODEL", ""),
                                       base_url=os.environ.get("OPENAI_BASE_URL"),
                                       api_key=_optional_secret("OPENAI_API_KEY")),
        "gates": QualityGatesResource(),
    },
)
