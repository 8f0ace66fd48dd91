"""Misconfigured resources fail the run before any stage writes, naming the field; remote storage publishes."""

import os
from types import SimpleNamespace

import dagster as dg
import fsspec
import fsspec.implementations.memory
import pyarrow as pa
import pytest

from assets.definitions import stage_assets
from assets.resources import (BeamRunnerResource, CaptionerResource, LLMEngineResource, QualityGatesResource,
                              StorageResource)
from curation.schema import PAIR_SCHEMA
from curation.shards import read_manifest, shard_name, write_manifest, write_table_atomic
from tests.assets.helpers import add_builds, failing_reject_ratio, stage_resources


def _failure_message(result) -> str:
    events = [e for e in result.all_events if e.is_failure]
    return "\n".join(str(e.event_specific_data.error) for e in events if hasattr(e.event_specific_data, "error"))


@pytest.mark.parametrize("overrides, field", [
    ({"llm": LLMEngineResource(engine="gpt-nonsense")}, "LLMEngineResource.engine"),
    ({"llm": LLMEngineResource(model="/no/such/model/dir")}, "LLMEngineResource.model"),
    ({"captioner": CaptionerResource(engine="openai")}, "CaptionerResource.base_url"),
    ({"beam_runner": BeamRunnerResource(runner="NopeRunner")}, "BeamRunnerResource.runner"),
    ({"beam_runner": BeamRunnerResource(launcher="ssh")}, "BeamRunnerResource.launcher"),
    ({"beam_runner": BeamRunnerResource(stage_options={"captions": {"a": "b"}})}, "BeamRunnerResource.stage_options"),
])
def test_a_misconfigured_resource_fails_fast_and_writes_nothing(instance, tmp_path, monkeypatch, overrides, field):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    add_builds(instance, "b1")
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                            resources=stage_resources(tmp_path / "root", **overrides),
                            run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 50}}}})
    assert not result.success
    assert field in _failure_message(result)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.parquet"))
    assert not result.get_asset_materialization_events()


def test_a_missing_source_fails_naming_the_config_field(instance, tmp_path):
    add_builds(instance, "b1")
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                            selection=["raw_pairs"], resources=stage_resources(tmp_path),
                            run_config={"ops": {"raw_pairs": {"config": {"source": str(tmp_path / "absent")}}}})
    assert not result.success
    assert "IngestRunConfig.source" in _failure_message(result)
    assert not (tmp_path / "b1" / "raw_pairs").exists()


@pytest.mark.parametrize("ops", [
    {"raw_pairs": {"config": {"source": "SHARDS"}}},  # a real source: no demo flags bring a captioner
    {"raw_pairs": {"config": {"demo_pairs": 50}}, "captioned_pairs": {"config": {"demo_sized": False}}},
])
def test_a_run_whose_caption_step_has_no_model_fails_at_its_first_step(instance, tmp_path, ops):
    """The default CaptionerResource (no model) passed its setup, and the caption stage refused to start
    only after ingest, balance and rewrite had run."""
    (tmp_path / "shards").mkdir()
    ops["raw_pairs"]["config"] = {k: str(tmp_path / "shards") if v == "SHARDS" else v
                                  for k, v in ops["raw_pairs"]["config"].items()}
    add_builds(instance, "b1")
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                            resources=stage_resources(tmp_path / "root"), run_config={"ops": ops})
    assert not result.success and "CaptionerResource.model is empty" in _failure_message(result)
    assert not result.get_asset_materialization_events()
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.parquet"))
    ingest_only = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                                 selection=["raw_pairs"], resources=stage_resources(tmp_path / "root"),
                                 run_config={"ops": {"raw_pairs": ops["raw_pairs"]}})
    assert "CaptionerResource" not in _failure_message(ingest_only)  # a run without the caption step is fine


def test_the_captioner_guard_judges_the_raw_pairs_this_run_makes_not_those_on_disk(instance, tmp_path, monkeypatch):
    """The guard read "demo build" from the raw_pairs already on disk: a build switched to the demo source
    was refused at its first step, and one switched away from it ran until its caption step failed."""
    from curation.demo_data import generate

    generate(tmp_path / "mine", n_pairs=40, n_eval=10)
    add_builds(instance, "b1")
    resources = stage_resources(tmp_path / "root")
    own = {"source": str(tmp_path / "mine" / "pool")}
    assert dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["raw_pairs"],
                          resources=resources, run_config={"ops": {"raw_pairs": {"config": own}}}).success
    with monkeypatch.context() as patch:
        failing_reject_ratio(patch)  # stops the run after raw_pairs: only its first step matters here
        to_demo = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                                 resources=resources, run_config={"ops": {"raw_pairs": {"config": {
                                     "source": "demo", "demo_pairs": 40, "overwrite": True}}}})
    assert "CaptionerResource" not in _failure_message(to_demo)
    assert to_demo.asset_materializations_for_node("raw_pairs")
    back = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                          resources=resources, run_config={"ops": {"raw_pairs": {"config": {**own, "overwrite": True}}}})
    assert "CaptionerResource.model is empty" in _failure_message(back)
    assert not back.get_asset_materialization_events()


def test_a_remote_root_gets_the_stage_output_with_its_manifest(instance, tmp_path, monkeypatch):
    """fsspec's in-memory file system stands in for s3:// or gs://: the same code path as a bucket."""
    add_builds(instance, "b1")
    storage = StorageResource(root="memory://clip-curation-test/builds", staging=str(tmp_path / "staging"))
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["raw_pairs"],
                            resources=stage_resources(tmp_path, storage=storage),
                            run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 60, "demo_shard_rows": 20}}}})
    assert result.success
    metadata = result.asset_materializations_for_node("raw_pairs")[0].metadata
    assert metadata["path"].value == "memory://clip-curation-test/builds/b1/raw_pairs"
    fs = fsspec.filesystem("memory")
    local = read_manifest(tmp_path / "staging" / "b1" / "raw_pairs")
    remote = fs.cat_file("/clip-curation-test/builds/b1/raw_pairs/manifest.json")
    assert remote == (tmp_path / "staging" / "b1" / "raw_pairs" / "manifest.json").read_bytes()
    for shard in local["shards"]:
        assert fs.size(f"/clip-curation-test/builds/b1/raw_pairs/{shard['name']}") == shard["bytes"]
    assert metadata["up_to_date"].value is False
    # Every path shown is the published one, not a node-local staging path beside the bucket's.
    assert metadata["shard_paths"].value == [f"memory://clip-curation-test/builds/b1/raw_pairs/{shard['name']}"
                                             for shard in local["shards"]]

    # A no-op rerun says so and uploads nothing; an overwrite with fewer shards leaves no stale one remote.
    put = []
    real_put = fsspec.implementations.memory.MemoryFileSystem.put_file
    fsspec.implementations.memory.MemoryFileSystem.put_file = lambda self, lpath, rpath, **kw: (
        put.append(rpath), real_put(self, lpath, rpath, **kw))
    try:
        again = dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["raw_pairs"],
                               resources=stage_resources(tmp_path, storage=storage),
                               run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 60,
                                                                            "demo_shard_rows": 20}}}})
        assert again.asset_materializations_for_node("raw_pairs")[0].metadata["up_to_date"].value is True
        assert put == []
        smaller = {"ops": {"raw_pairs": {"config": {"demo_pairs": 60, "demo_shard_rows": 1000, "overwrite": True}}}}
        assert dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["raw_pairs"],
                              resources=stage_resources(tmp_path, storage=storage), run_config=smaller).success
    finally:
        fsspec.implementations.memory.MemoryFileSystem.put_file = real_put
    names = {p.rsplit("/", 1)[-1] for p in fs.find("/clip-curation-test/builds/b1/raw_pairs")
             if "/rejects/" not in p and p.endswith(".parquet")}
    assert names == {s["name"] for s in read_manifest(tmp_path / "staging" / "b1" / "raw_pairs")["shards"]}
    assert len(names) < len(local["shards"])

    # An output that fails its checks stays in staging: in the bucket it would look like a finished dataset.
    add_builds(instance, "b2")
    with monkeypatch.context() as patch:
        failing_reject_ratio(patch)
        failed = dg.materialize(stage_assets, instance=instance, partition_key="b2", selection=["raw_pairs"],
                                resources=stage_resources(tmp_path, storage=storage), raise_on_error=False,
                                run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 60,
                                                                             "demo_shard_rows": 20}}}})
    assert not failed.success and (tmp_path / "staging" / "b2" / "raw_pairs" / "manifest.json").is_file()
    assert not fs.exists("/clip-curation-test/builds/b2")
    kept_local = failed.asset_materializations_for_node("raw_pairs")[0].metadata
    assert kept_local["path"].value == str(tmp_path / "staging" / "b2" / "raw_pairs")
    assert all(path.startswith(str(tmp_path / "staging" / "b2")) for path in kept_local["shard_paths"].value)


def test_a_model_output_is_published_once_with_its_file_list_last(tmp_path, monkeypatch):
    """The trained model has no shard manifest: every rerun uploaded all of it again, and a remote copy cut
    short looked like a whole one. Its file list now marks a finished upload and tells a rerun nothing changed."""
    from assets.resources import FILE_LIST

    storage = StorageResource(root="memory://model-publish/builds", staging=str(tmp_path))
    model = storage.build_dir("b1") / "clip_model"
    (model / "checkpoints" / "step-8").mkdir(parents=True)
    (model / "checkpoints" / "step-8" / "model.safetensors").write_bytes(b"x" * 1000)
    (model / "metrics.json").write_text("{}")
    # What killed writes left: never uploaded (a stage or the trainer removes them when it runs again).
    (model / ".metrics.json.tmp-7-0a1b2c").write_text("{")
    (model / "checkpoints" / ".step-16.tmp-7").mkdir()
    (model / "checkpoints" / ".step-16.tmp-7" / "model.safetensors").write_bytes(b"y" * 10)
    put = []
    real_put = fsspec.implementations.memory.MemoryFileSystem.put_file
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "put_file",
                        lambda self, lpath, rpath, **kw: (put.append(rpath.rsplit("/", 1)[-1]),
                                                          real_put(self, lpath, rpath, **kw)))
    storage.publish("b1", "clip_model")
    assert put == ["model.safetensors", "metrics.json", FILE_LIST]  # the marker last
    storage.publish("b1", "clip_model")
    assert len(put) == 3  # unchanged: nothing uploaded again
    (model / "metrics.json").write_text('{"steps": 16}')
    storage.publish("b1", "clip_model")
    assert put[3:] == ["metrics.json", FILE_LIST]  # the weights the remote list vouches for stay
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/model-publish/builds/b1/clip_model/metrics.json") == b'{"steps": 16}'
    # A remote copy of another size (cut short by hand, say) is uploaded again; so is everything when
    # the remote marker is gone: an upload cut short vouches for nothing.
    fs.pipe_file("/model-publish/builds/b1/clip_model/checkpoints/step-8/model.safetensors", b"x" * 10)
    (model / "metrics.json").write_text('{"steps": 24}')
    storage.publish("b1", "clip_model")
    assert put[5:] == ["model.safetensors", "metrics.json", FILE_LIST]
    fs.rm_file(f"/model-publish/builds/b1/clip_model/{FILE_LIST}")
    storage.publish("b1", "clip_model")
    assert put[8:] == ["model.safetensors", "metrics.json", FILE_LIST]


def test_a_resumed_pair_output_uploads_only_its_new_shards(tmp_path, monkeypatch):
    storage = StorageResource(root="memory://pairs-publish/builds", staging=str(tmp_path))
    output = storage.build_dir("b1") / "raw_pairs"
    rows = [{"key": f"k{i}", "caption": f"caption {i}", "image": b"\xff\xd8", "width": 8, "height": 8,
             "sha256": f"{i:064x}", "source": "t"} for i in range(4)]
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    infos = [write_table_atomic(table.slice(i, 1), output / shard_name(i)) for i in range(2)]
    write_manifest(output, stage="ingest", config={}, shards=infos)
    (output / "rejects").mkdir()
    (output / "rejects" / "part-00000.parquet").write_bytes(b"r" * 10)
    put = []
    real_put = fsspec.implementations.memory.MemoryFileSystem.put_file
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "put_file",
                        lambda self, lpath, rpath, **kw: (put.append(rpath.split("raw_pairs/")[1]),
                                                          real_put(self, lpath, rpath, **kw)))
    storage.publish("b1", "raw_pairs")
    assert put == ["part-00000.parquet", "part-00001.parquet", "rejects/part-00000.parquet", "manifest.json"]
    infos.append(write_table_atomic(table.slice(2, 2), output / shard_name(2)))
    write_manifest(output, stage="ingest", config={}, shards=infos)
    storage.publish("b1", "raw_pairs")
    # Files no manifest lists (rejects, data card, plots) are small and go again.
    assert put[4:] == ["part-00002.parquet", "rejects/part-00000.parquet", "manifest.json"]
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/pairs-publish/builds/b1/raw_pairs/manifest.json") == (output / "manifest.json").read_bytes()
    infos[0] = write_table_atomic(table.slice(0, 2), output / shard_name(0))  # rewritten: another sha256
    write_manifest(output, stage="ingest", config={}, shards=infos)
    storage.publish("b1", "raw_pairs")
    assert put[7:] == ["part-00000.parquet", "rejects/part-00000.parquet", "manifest.json"]


@pytest.mark.parametrize("resource, field", [
    (QualityGatesResource(min_rewrite_share=50.0), "QualityGatesResource.min_rewrite_share"),  # a percent
    (QualityGatesResource(max_reject_ratio=20.0), "QualityGatesResource.max_reject_ratio"),
    (QualityGatesResource(min_caption_share=float("nan")), "QualityGatesResource.min_caption_share"),
    (QualityGatesResource(balance_slack=-1.0), "QualityGatesResource.balance_slack"),
    # Beam options a stage would refuse, found at the run's first step rather than at that stage.
    (BeamRunnerResource(runner="DataflowRunner", stage_options={"rewrite": {"machine_typ": "g2-standard-8"}}),
     r"BeamRunnerResource.stage_options\['rewrite'\]: --machine_typ"),
    (LLMEngineResource(engine="openai", base_url="http://127.0.0.1:1/v1"), "LLMEngineResource.model"),
    (LLMEngineResource(engine="openai", model="m", base_url="http://127.0.0.1:1/v1", dtype="float16"),
     "LLMEngineResource.dtype"),
])
def test_settings_that_would_fail_late_or_do_nothing_fail_at_setup(resource, field):
    with pytest.raises(dg.Failure, match=field):
        resource.setup_for_execution(dg.build_init_resource_context())


def test_an_unknown_storage_protocol_names_the_field():
    with pytest.raises(dg.Failure, match="StorageResource.root"):
        StorageResource(root="nosuchproto://bucket").setup_for_execution(dg.build_init_resource_context())


@pytest.mark.parametrize("fields, field", [
    ({"engine": "transformers", "max_num_seqs": 8}, "LLMEngineResource.max_num_seqs"),
    ({"engine": "transformers", "tensor_parallel_size": 2}, "LLMEngineResource.tensor_parallel_size"),
    ({"engine": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", "gguf_file": "m.gguf"},
     "LLMEngineResource.gguf_file"),
    ({"engine": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", "enable_prefix_caching": False},
     "LLMEngineResource.enable_prefix_caching"),
    ({"dtype": "int3"}, "LLMEngineResource.dtype"),
    ({"engine": "transformers", "gpu_memory_utilization": 0.5}, "LLMEngineResource.gpu_memory_utilization"),
])
def test_llm_settings_a_backend_cannot_use_are_refused(fields, field):
    with pytest.raises(dg.Failure, match=field):
        LLMEngineResource(**fields).setup_for_execution(dg.build_init_resource_context())


def test_llm_resource_settings_reach_the_rewrite_engine():
    """Every LLMEngineResource field lands in the rewrite stage's RewriteConfig through the stage's own flags."""
    from assets.stages import ENGINE_FLAGS
    from pipelines.rewrite import RewriteOptions, config_from

    llm = LLMEngineResource(engine="vllm", model="/models/llama", gguf_file="q4.gguf", dtype="float16",
                            max_num_seqs=512, gpu_memory_utilization=0.8, tensor_parallel_size=2,
                            enable_prefix_caching=False, base_url="http://ignored-for-vllm/v1")
    config = config_from(RewriteOptions(["--input", "a", "--output", "b", *ENGINE_FLAGS["rewrite"](SimpleNamespace(llm=llm))]))
    assert (config.engine, config.model, config.gguf_file, config.dtype) == ("vllm", "/models/llama", "q4.gguf",
                                                                             "float16")
    assert config.engine_options == {"max_num_seqs": 512, "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2,
                                     "enable_prefix_caching": False}
    served = LLMEngineResource(engine="openai", model="m", base_url="http://127.0.0.1:9/v1")
    config = config_from(RewriteOptions(["--input", "a", "--output", "b", *ENGINE_FLAGS["rewrite"](SimpleNamespace(llm=served))]))
    assert config.engine_options == {"base_url": "http://127.0.0.1:9/v1"} and config.dtype == "auto"
    LLMEngineResource(engine="transformers", enable_prefix_caching=True, dtype="bfloat16").setup_for_execution(
        dg.build_init_resource_context())


def test_captioner_endpoint_reaches_only_a_served_captioner_and_the_llm_fuses():
    """base_url (from OPENAI_BASE_URL in the definitions) went to every engine: transformers refused it. And the
    caption stage fused with the bundled SmolLM2 whatever LLM the build was given."""
    from assets.stages import ENGINE_FLAGS
    from pipelines.caption import CaptionOptions, config_from

    local = CaptionerResource(engine="transformers", model="/models/vlm", base_url="http://127.0.0.1:9/v1")
    llm = LLMEngineResource(engine="vllm", model="/models/llama", max_num_seqs=64)
    flags = ENGINE_FLAGS["caption"](SimpleNamespace(captioner=local, llm=llm))
    config = config_from(CaptionOptions(["--input", "a", "--output", "b", *flags]))
    assert config.captioner_engine == "transformers" and config.captioner_options == {}
    assert (config.fusion_engine, config.fusion_model, config.fusion_options) == ("vllm", "/models/llama",
                                                                                  {"max_num_seqs": 64})
    served = CaptionerResource(engine="openai", model="m", base_url="http://127.0.0.1:9/v1")
    flags = ENGINE_FLAGS["caption"](SimpleNamespace(captioner=served, llm=LLMEngineResource()))
    config = config_from(CaptionOptions(["--input", "a", "--output", "b", *flags]))
    assert config.captioner_options == {"base_url": "http://127.0.0.1:9/v1"}
    assert config.fusion_model == CaptionOptions([]).fusion_model  # an empty llm model keeps the stage's


def test_the_fusion_llm_and_a_served_captioner_each_send_their_own_key(monkeypatch):
    """Both engines read OPENAI_API_KEY: the captioner's key overwrote the LLM's, and every fusion call sent
    the VLM endpoint's key to the LLM endpoint."""
    from assets.stages import ENGINE_FLAGS, STAGES, _environment
    from curation.engines import EngineSpec, make_text_engine
    from pipelines.caption import CaptionOptions, config_from

    resources = SimpleNamespace(
        captioner=CaptionerResource(engine="openai", model="vlm", base_url="http://127.0.0.1:9/v1", api_key="VLM-KEY"),
        llm=LLMEngineResource(engine="openai", model="llm", base_url="http://127.0.0.1:8/v1", api_key="LLM-KEY"),
        beam_runner=BeamRunnerResource())
    caption = next(stage for stage in STAGES if stage.name == "caption")
    for name, value in _environment(caption, resources).items():
        monkeypatch.setenv(name, value)
    config = config_from(CaptionOptions(["--input", "a", "--output", "b", *ENGINE_FLAGS["caption"](resources)]))
    fusion = make_text_engine(EngineSpec(config.fusion_engine, config.fusion_model, options=config.fusion_options))
    assert fusion.client.api_key == "LLM-KEY" and os.environ["OPENAI_API_KEY"] == "VLM-KEY"
    assert "api_key_env" not in config.recorded()["fusion_options"]


def test_fusion_temperature_is_set_in_the_caption_run_config_not_taken_from_the_rewrites():
    from assets.config import CaptionRunConfig
    from pipelines.caption import CaptionOptions, config_from

    def fusion_temperature(run_config: CaptionRunConfig) -> float:
        return config_from(CaptionOptions(["--input", "a", "--output", "b", "--captioner_model", "m",
                                           *run_config.stage_flags()])).fusion_temperature

    assert fusion_temperature(CaptionRunConfig(fusion_temperature=0.05)) == 0.05
    assert fusion_temperature(CaptionRunConfig()) == CaptionOptions([]).fusion_temperature != 0.05


def test_credentials_holding_a_key_instead_of_its_path_are_refused_without_echoing_it():
    key = '{"type": "service_account", "private_key": "' + "k" * 3000 + '"}'
    with pytest.raises(dg.Failure) as error:
        BeamRunnerResource(credentials=key).check()
    assert "credentials" in str(error.value) and "private_key" not in str(error.value)


def test_stage_options_may_name_the_beam_stages():
    from assets.resources import BEAM_STAGES
    from assets.stages import STAGES

    assert set(BEAM_STAGES) == {stage.name for stage in STAGES if stage.beam}


def test_the_balance_run_config_turns_on_metaclip2_padding():
    from assets.config import BalanceRunConfig
    from pipelines.balance import BalanceOptions

    def padding(run_config: BalanceRunConfig) -> bool:
        return BalanceOptions(["--input", "a", "--output", "b", *run_config.stage_flags()]).metaclip2_padding

    assert padding(BalanceRunConfig(metaclip2_padding=True)) and not padding(BalanceRunConfig())


def test_the_train_step_leaves_the_checksums_to_the_trainer_and_extra_flags_can_turn_them_off():
    """The step reads the export's manifest only; the trainer hashes the shards when it has steps to run."""
    from assets.config import TrainRunConfig
    from training.cli import parse_args

    def verifies(run_config: TrainRunConfig) -> bool:
        return parse_args(["--input", "a", "--output", "b", *run_config.stage_flags(),
                           *run_config.extra_flags]).verify_checksums

    assert verifies(TrainRunConfig()) and not verifies(TrainRunConfig(extra_flags=["--no-verify_checksums"]))


def test_beam_switches_are_flags_without_values_and_a_value_beam_refuses_fails_the_resource_check():
    """Options render as --name=value: a switch (save_main_session) then made Beam's parser exit the step
    with SystemExit 2, after the resource check had passed it."""
    runner = BeamRunnerResource(options={"save_main_session": "true", "use_public_ips": "false",
                                         "no_pipeline_type_check": "", "num_workers": "4"})
    assert runner.flags() == ["--runner=DirectRunner", "--no_pipeline_type_check", "--num_workers=4",
                              "--save_main_session", "--no_use_public_ips"]
    for options in ({"save_main_session": "yes"}, {"num_workers": "four"}, {"dataflow_kms_key": ""}):
        with pytest.raises(dg.Failure, match="BeamRunnerResource.options: Beam refuses"):
            BeamRunnerResource(options=options).check()
    with pytest.raises(dg.Failure, match=r"stage_options\[.rewrite.\]: Beam refuses"):
        BeamRunnerResource(stage_options={"rewrite": {"max_num_workers": "many"}}).check()
