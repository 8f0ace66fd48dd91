"""One asset per stage, all made the same way: the stage's job, its manifest as metadata, its checks.

A build is a partition of the `builds` dynamic partitions: every asset of
build B reads and writes only under `storage.root/B/`, so rebuilding one
build never touches another. Within a build, asset X reads the directory of
the asset before it and writes `B/X/`; the stage job resumes from its
finished shards, so a step retried from the UI only does the shards left.
"""

import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import dagster as dg
import pyarrow.parquet as pq

from assets import checks
from assets.build_records import (
    CHECKS_NOT_FINISHED, failed_upstream_checks, overwrite_pending, record_checks, record_upstream, upstream_changed,
)
from assets.config import (
    DEMO_SOURCE, BalanceRunConfig, CaptionRunConfig, ExportRunConfig, IngestRunConfig, RewriteRunConfig,
    StageConfig, TrainRunConfig,
)
from assets.build_source import build_source, is_demo_build, recorded_source
from assets.launch import load_stage_module, run_stage
from assets.report import located, location_metadata, plot_markdown, rows_in, stage_metadata
from assets.resources import QualityGatesResource
from curation.rejects import Reason
from curation.shards import (
    OVERWRITE_SENTINEL, ManifestError, is_complete, read_manifest,
)
from pipelines.common import STAGE_CONFIG

builds = dg.DynamicPartitionsDefinition(name="builds")
DEFAULT_BUILD = "default"
GPU_POOL = "gpu"
RESOURCE_KEYS = ("storage", "beam_runner", "llm", "captioner", "gates")
FUSION_KEY_ENV = "CLIP_CURATION_FUSION_API_KEY"


def gpu_k8s_config(cpu: str, memory: str, gpus: int = 1, accelerator: str = "nvidia-l4") -> dict:
    """The dagster-k8s/config tag of a GPU step: a GPU request and a GPU node pool."""
    return {
        "container_config": {"resources": {
            "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": memory, "nvidia.com/gpu": str(gpus)},
        }},
        "pod_spec_config": {
            "node_selector": {"cloud.google.com/gke-accelerator": accelerator},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def cpu_k8s_config(cpu: str, memory: str) -> dict:
    return {"container_config": {"resources": {"requests": {"cpu": cpu, "memory": memory},
                                               "limits": {"memory": memory}}}}


@dataclass(frozen=True)
class Stage:
    """How one stage becomes an asset."""

    name: str
    asset: str
    module: str
    upstream: Optional[str]
    config: type
    description: str
    engine: Optional[str] = None                 # resource key whose settings become stage flags
    extra_assets: tuple[str, ...] = ()           # more outputs of the same job (balance: entry_counts)
    extra_checks: tuple[tuple[str, str, bool], ...] = ()
    pair_output: bool = True                     # output holds pair shards with a manifest
    beam: bool = True                            # a Beam job (takes runner flags); else a plain program
    rejects: bool = True                         # rejects rows (with a reason); else refuses bad input
    gpu: bool = False
    k8s: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether the stage's job module exists in this checkout (found without importing it)."""
        return importlib.util.find_spec(self.module) is not None


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "raw_pairs", "pipelines.ingest", None, IngestRunConfig,
          "Canonical pair shards from the raw source (demo, Parquet shards or a URL list), with rejects.",
          k8s=cpu_k8s_config("4", "8Gi")),
    Stage("balance", "balanced_pairs", "pipelines.balance", "raw_pairs", BalanceRunConfig,
          "MetaCLIP balancing: substring matching against the metadata, then per-entry sampling with cap t.",
          extra_assets=("entry_counts",),
          extra_checks=((checks.BALANCED, "No entry keeps many more pairs than its keep probabilities promise.",
                         True),),
          k8s=cpu_k8s_config("8", "16Gi")),
    Stage("rewrite", "rewritten_pairs", "pipelines.rewrite", "balanced_pairs", RewriteRunConfig,
          "LaCLIP rewrites of every caption by the LLM engine.", engine="llm",
          extra_checks=((checks.REWRITES, "Share of rows with a valid rewrite over the threshold.", True),),
          gpu=True, k8s=gpu_k8s_config("8", "48Gi")),
    Stage("caption", "captioned_pairs", "pipelines.caption", "rewritten_pairs", CaptionRunConfig,
          "Synthetic captions by the vision-language captioner, fused with the alt-text (VeCLIP).",
          engine="captioner",
          extra_checks=((checks.CAPTIONS, "Share of rows with a synthetic caption over the threshold.", True),),
          # Two models on one device (a 7B VLM and an 8B fusion LLM, 0.45 of it each): an L4's 24 GB holds
          # neither, an A100's 80 GB both.
          gpu=True, k8s=gpu_k8s_config("8", "48Gi", accelerator="nvidia-a100-80gb")),
    Stage("export", "training_shards", "pipelines.export", "captioned_pairs", ExportRunConfig,
          "The training shards, their manifest (the contract with training) and a data card.", rejects=False,
          extra_checks=((checks.ROWS_CONSERVED, "The shards (and tar twins) hold every row of the upstream.", True),),
          k8s=cpu_k8s_config("4", "8Gi")),
    Stage("train", "clip_model", "training.cli", "training_shards", TrainRunConfig,
          "A CLIP model trained on the training shards, with its zero-shot metrics.", pair_output=False,
          beam=False, gpu=True, k8s=gpu_k8s_config("16", "64Gi")),
)


def available_stages() -> list[Stage]:
    """The prefix of the chain whose job modules exist here: an asset is defined only if its input can be."""
    present: list[Stage] = []
    for stage in STAGES:
        if not stage.available or (stage.upstream and stage.upstream not in {s.asset for s in present}):
            break
        present.append(stage)
    return present


def build_name(context: dg.AssetExecutionContext) -> str:
    return context.partition_key if context.has_partition_key else DEFAULT_BUILD


def _stamp(path: Path) -> Optional[tuple[int, int, int]]:
    """A file's inode, modification time and size, None without it: unchanged across a run, it was kept
    (an atomic rewrite renames a new file in, so even a same-size rewrite in the same tick shows)."""
    if not path.is_file():
        return None
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def _captioner_model_missing(context: dg.AssetExecutionContext, build_dir: Path) -> bool:
    """True when this run's caption step will refuse to start for want of a captioner model: no model in
    the CaptionerResource, none in the caption step's extra_flags, and a build that is not demo-sized (only
    the demo flags bring one). Asked at every step, so the run fails at its first one, not after ingest,
    balance and rewrite have spent their hours."""
    caption = next(stage for stage in STAGES if stage.name == "caption")
    steps = context.run.step_keys_to_execute  # a re-execution's remaining steps; None: the job's
    selected = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys

    def in_run(asset: str) -> bool:
        return asset in steps if steps is not None else dg.AssetKey(asset) in selected

    if context.resources.captioner.model or not in_run(caption.asset):
        return False
    ops = context.run.run_config.get("ops") or {}
    config = (ops.get(caption.asset) or {}).get("config") or {}
    if any(flag.split("=", 1)[0] == "--captioner_model" for flag in config.get("extra_flags") or []):
        return False
    demo_sized = config.get("demo_sized")
    # The raw pairs the caption step will see: those this run's ingest makes (what its config asks for)
    # before those on disk, which it replaces.
    if demo_sized is None and (in_run("raw_pairs") or not (build_dir / "raw_pairs" / STAGE_CONFIG).is_file()):
        ingest = (ops.get("raw_pairs") or {}).get("config") or {}
        demo_sized = (ingest.get("source") or recorded_source(build_dir) or DEMO_SOURCE) == DEMO_SOURCE
    if demo_sized is None:
        demo_sized = is_demo_build(build_dir)
    return not demo_sized


def _engine_flags(stage: Stage, resources) -> list[str]:
    adapter = ENGINE_FLAGS.get(stage.name)
    return adapter(resources) if stage.engine is not None and adapter else []


def _flag(name: str, value) -> list[str]:
    return [] if value in (None, "") else [f"--{name}={value}"]


def _llm_flags(llm, prefix: str, options_flag: str, **extra_options) -> list[str]:
    """The llm resource's engine, model and backend settings as one stage's `<prefix>_*` flags."""
    options = llm.engine_options() | extra_options
    return [f"--{prefix}_engine={llm.engine}", *_flag(f"{prefix}_model", llm.model),
            *_flag(f"{prefix}_gguf_file", llm.gguf_file), *_flag(f"{prefix}_dtype", llm.dtype),
            *([f"--{options_flag}={json.dumps(options)}"] if options else [])]


def _rewrite_engine_flags(resources) -> list[str]:
    """The llm resource as rewrite flags; an empty field leaves the stage's (or its demo's) value."""
    llm = resources.llm
    return [*_llm_flags(llm, "rewrite", "rewrite_engine_options"), *_flag("rewrite_temperature", llm.temperature),
            *_flag("rewrite_top_p", llm.top_p), *_flag("rewrite_max_new_tokens", llm.max_new_tokens)]


def _caption_engine_flags(resources) -> list[str]:
    """The captioner resource as caption flags, and the llm resource as its fusion LLM (VeCLIP fuses with the
    LLM that rewrites); an empty field leaves the stage's (or its demo's) value."""
    captioner, llm = resources.captioner, resources.llm
    flags = [f"--captioner_engine={captioner.engine}", *_flag("captioner_model", captioner.model),
             *_flag("vec_max_new_tokens", captioner.max_new_tokens)]
    # Only a served engine takes an endpoint: the transformers and vLLM captioners refuse a base_url.
    if captioner.engine == "openai" and captioner.base_url:
        flags.append(f"--captioner_options={json.dumps({'base_url': captioner.base_url})}")
    # The fusion LLM reads its key from a variable of its own: OPENAI_API_KEY holds the captioner's.
    own_key = {"api_key_env": FUSION_KEY_ENV} if llm.engine == "openai" and llm.api_key else {}
    return flags + _llm_flags(llm, "fusion", "fusion_options", **own_key)


# Stage name -> how its engine resource becomes the stage's flags.
ENGINE_FLAGS: dict[str, Callable] = {"rewrite": _rewrite_engine_flags, "caption": _caption_engine_flags}


def stage_argv(stage: Stage, config: StageConfig, input_dir: Path, output: Path, build_dir: Path, resources,
               overwrite: bool) -> list[str]:
    """The stage's command line: input/output/seed, runner, demo sizing, engine, stage config, extras."""
    argv = ["--input", str(input_dir), "--output", str(output), "--seed", str(config.seed)]
    argv += resources.beam_runner.flags(stage.name) if stage.beam else []
    demo_sized = config.demo_sized if config.demo_sized is not None else is_demo_build(build_dir)
    if demo_sized:
        module = load_stage_module(stage.module)
        argv += list(module.demo_flags(build_dir)) if hasattr(module, "demo_flags") else []
    argv += _engine_flags(stage, resources) + config.stage_flags() + list(config.extra_flags)
    return argv + (["--overwrite"] if overwrite else [])


def _environment(stage: Stage, resources) -> dict[str, str]:
    env = dict(resources.beam_runner.environment())
    if stage.engine == "captioner":
        env.update(resources.llm.environment(FUSION_KEY_ENV))  # the fusion LLM's key, apart from the captioner's
    if stage.engine:
        env.update(getattr(resources, stage.engine).environment())
    return env


def stage_checks(stage: Stage, output: Path, manifest: dict, metadata: dict, config: StageConfig,
                 gates: QualityGatesResource, input_manifest: Optional[dict]) -> list[dg.AssetCheckResult]:
    """Evaluate the stage's declared checks on the output just written."""
    export = stage.name == "export"
    results = [checks.schema_valid(stage.asset, output, training=export),
               checks.checksums_match(stage.asset, output, export=export)]
    if stage.name == "ingest":
        rejected, n_in = manifest.get("rejects", {}).get("rows", 0), rows_in(manifest)
        dead = manifest.get("rejects", {}).get("by_reason", {}).get(Reason.DOWNLOAD_FAILED, 0)
        results.append(checks.reject_ratio(stage.asset, (rejected - dead) / max(n_in - dead, 1), gates.max_reject_ratio,
                                           download=(dead / max(n_in, 1), gates.max_download_failure_ratio)))
    elif stage.rejects:
        results.append(checks.reject_ratio(stage.asset, metadata["reject_ratio"], gates.max_balance_reject_ratio
                                           if stage.name == "balance" else gates.max_reject_ratio))
    if export:
        results.append(checks.rows_conserved(stage.asset, output, manifest, input_manifest["rows"]))
    if stage.name == "balance":
        recorded = manifest.get("config", {})
        t = float(recorded.get("t") or getattr(config, "t", None) or 20000)
        results.append(checks.judged(stage.asset, checks.BALANCED, lambda: checks.entries_balanced(
            stage.asset, output, t, gates.balance_slack, online=bool(recorded.get("online_curation")))))
    if stage.name == "rewrite":
        results.append(checks.judged(stage.asset, checks.REWRITES, lambda: checks.valid_rewrite_share(
            stage.asset, output, gates.min_rewrite_share)))
    if stage.name == "caption":
        results.append(checks.judged(stage.asset, checks.CAPTIONS, lambda: checks.share_filled(
            stage.asset, checks.CAPTIONS, output, "synthetic_caption", gates.min_caption_share)))
    return results


def _extra_results(stage: Stage, output: Path, manifest: dict, where: str) -> Iterator[dg.MaterializeResult]:
    """Materialisations of a job's side outputs: balance's entry counts (the file named in its stats), at
    `where` the output is (published or local)."""
    stats = manifest.get("stats", {})
    for asset in stage.extra_assets:
        name = str(stats.get(asset, f"{asset}.parquet"))
        path = output / name
        metadata: dict = {"path": dg.MetadataValue.path(located(where, name))}
        if path.is_file():
            metadata["entries"] = pq.ParquetFile(path).metadata.num_rows
        metadata.update({k: v for k, v in stats.items() if k.startswith(("before_", "after_", "t", "metadata_"))
                         and isinstance(v, (int, float))})
        for name in stats.get("plots", []):
            if (output / name).is_file():
                metadata["entry_count_plot"] = plot_markdown(output / name)
        yield dg.MaterializeResult(asset_key=asset, metadata=metadata)


def _model_metadata(output: Path, result) -> dict:
    """The trained model: where it is, its metrics (from the result, or metrics.json after a Pipes run), curves."""
    metrics = getattr(result, "metrics", None)
    if metrics is None and (output / "metrics.json").is_file():
        metrics = json.loads((output / "metrics.json").read_text())
    metrics = metrics or {}
    metadata: dict = {"path": dg.MetadataValue.path(str(output)), "metrics": dg.MetadataValue.json(metrics)}
    for name in ("zeroshot_top1", "zeroshot_top5", "final_loss", "steps", "seconds"):
        if isinstance(metrics.get(name), (int, float)):
            metadata[name] = metrics[name]
    for plot in sorted(output.glob("*.png")):
        metadata[f"plot_{plot.stem}"] = plot_markdown(plot)
    return metadata


def materialise(stage: Stage, context: dg.AssetExecutionContext, config: StageConfig) -> Iterator[dg.MaterializeResult]:
    """Run the stage for this build and yield its materialisation(s) with the check results."""
    resources = context.resources
    build = build_name(context)
    build_dir = resources.storage.build_dir(build)
    output = build_dir / stage.asset
    if _captioner_model_missing(context, build_dir):
        raise dg.Failure(description="CaptionerResource.model is empty, and this run's caption step needs a model "
                                     "for a build that is not demo-sized: set the resource's model (or "
                                     "--captioner_model in the caption step's extra_flags)")
    input_manifest = None
    if stage.upstream is None:
        input_dir = build_source(config, build_dir)
        input_manifest = read_manifest(input_dir) if input_dir.is_dir() and is_complete(input_dir) else None
    else:
        input_dir = build_dir / stage.upstream
        if not is_complete(input_dir):
            raise dg.Failure(description=f"{stage.asset}: upstream {stage.upstream} of build {build!r} has no "
                                         f"manifest at {input_dir}; materialise it first")
        try:
            # Every stage's job checks its input's files against the manifest itself (begin_stage, or the
            # trainer's --verify_checksums), and only when it has work: hashing them here would read the
            # whole upstream on every materialisation, an up-to-date one too.
            input_manifest = read_manifest(input_dir)
        except ManifestError as exc:
            raise dg.Failure(description=f"{stage.asset}: upstream {stage.upstream} is corrupt: {exc}") from exc
        failed = failed_upstream_checks(build_dir, stage.upstream, input_manifest)
        if failed:
            raise dg.Failure(description=f"{stage.asset}: upstream {stage.upstream} of build {build!r} failed its "
                                         f"checks ({', '.join(failed)}); fix it (or the QualityGatesResource) and "
                                         f"materialise it again first")
    if upstream_changed(build_dir, stage.asset, input_manifest):
        changed = stage.upstream or "the source"
        context.log.warning(f"{changed} of build {build!r} changed since {stage.asset} was made: rebuilding it")
        shutil.rmtree(output, ignore_errors=True)
    # Recorded before the run: a retry after a failure then resumes the shards made from this upstream.
    record_upstream(build_dir, stage.asset, input_manifest)
    overwrite = config.overwrite and overwrite_pending(build_dir, stage.asset, output, context)
    argv = stage_argv(stage, config, input_dir, output, build_dir, resources, overwrite)
    before = _stamp(output / "manifest.json")
    start = time.perf_counter()
    result = run_stage(context, stage.module, argv, resources.beam_runner, _environment(stage, resources),
                       is_beam_job=stage.beam, step_k8s=stage.k8s)
    # Left by an earlier run whose job failed before its wipe, where this one resumed without one: the
    # output is this run's now, and no re-execution of that run may wipe it.
    (output / OVERWRITE_SENTINEL).unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    up_to_date = before is not None and _stamp(output / "manifest.json") == before  # it found nothing to do
    if not stage.pair_output:
        published = resources.storage.publish(build, stage.asset)
        metadata = {**_model_metadata(output, result), "path": dg.MetadataValue.path(published),
                    "duration_s": round(elapsed, 3)}
        yield dg.MaterializeResult(asset_key=stage.asset, metadata=metadata)
        return
    manifest = read_manifest(output)
    # Unjudged until its checks return: a step killed while they read every shard (the longest part of a
    # no-op step; a Terminate in the UI, an evicted pod) leaves an output no downstream run or CLI stage
    # reads as finished.
    record_checks(build_dir, stage.asset, manifest, [CHECKS_NOT_FINISHED])
    # A no-op step keeps the manifest (and figures) of the run that made the output: say so beside them.
    metadata = {**stage_metadata(manifest, output, str(output)), "step_duration_s": round(elapsed, 3),
                "up_to_date": up_to_date}
    results = stage_checks(stage, output, manifest, metadata, config, resources.gates, input_manifest)
    failed = [check.check_name for check in results if not check.passed]
    record_checks(build_dir, stage.asset, manifest, failed)
    for check in results:
        if not check.passed:
            context.log.warning(f"check {check.check_name} failed: {dict(check.metadata)}")
    if failed:  # published, a failed output would look like a finished dataset to whatever reads the storage
        context.log.warning(f"{stage.asset} is not published to the storage root: {', '.join(failed)} failed")
    else:
        metadata.update(location_metadata(manifest, resources.storage.publish(build, stage.asset)))
    yield dg.MaterializeResult(asset_key=stage.asset, metadata=metadata, check_results=results)
    yield from _extra_results(stage, output, manifest, metadata["path"].value)


def stage_asset(stage: Stage) -> dg.AssetsDefinition:
    """The Dagster definition of one stage (a multi-asset when its job has side outputs)."""
    specs = [dg.AssetSpec(stage.asset, description=stage.description, group_name="curation",
                          deps=[stage.upstream] if stage.upstream else [],
                          kinds={"beam", "parquet"} if stage.pair_output else {"pytorch"})]
    specs += [dg.AssetSpec(extra, description=f"{extra} written by the {stage.name} job, beside {stage.asset}.",
                           group_name="curation", deps=[stage.upstream] if stage.upstream else [],
                           kinds={"parquet"}) for extra in stage.extra_assets]
    check_specs = checks.specs(stage.asset, *stage.extra_checks, rejects=stage.rejects) if stage.pair_output else []
    # Every step needs every resource: a misconfigured one then fails the run at its first step, before
    # anything is written, rather than hours later at the stage that uses it.
    resource_keys = set(RESOURCE_KEYS)
    tags = {"dagster-k8s/config": stage.k8s, "clip-curation/stage": stage.name}
    if stage.gpu:
        tags["clip-curation/gpu"] = "true"
    config_cls = stage.config

    def compute(context: dg.AssetExecutionContext, config: config_cls):
        yield from materialise(stage, context, config)

    return dg.multi_asset(
        name=stage.asset, specs=specs, check_specs=check_specs, partitions_def=builds,
        required_resource_keys=resource_keys, op_tags=tags, pool=GPU_POOL if stage.gpu else None,
        description=stage.description,
    )(compute)
