"""The caption stage end to end on real demo JPEGs: tiny VLM + tiny fusion LM built here, Beam, resume, rejects."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.engines.vision_tiny import build_tiny_vlm
from curation.rejects import Reason
from curation.schema import validate
from curation.shards import read_manifest
from pipelines import caption, ingest
from pipelines.common import StageConfigMismatch

pytestmark = pytest.mark.slow  # builds two models and runs Beam several times: ~1 minute on 2 cores

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_text_lm(path: Path) -> Path:
    """A random-weight Llama with a locally trained word tokenizer and a chat template: a stand-in fusion LLM."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from wordfreq import top_n_list

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.train_from_iterator([" ".join(top_n_list("en", 2000))],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.chat_template = CHAT
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-models")
    return build_tiny_vlm(root / "tiny-vlm"), build_tiny_text_lm(root / "tiny-lm")


def _broken_png_header() -> bytes:
    """A PNG whose header claims 20000x20000 pixels."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"IHDR")
    data[at + 4:at + 12] = struct.pack(">II", 20000, 20000)
    data[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 17])))
    return bytes(data)


@pytest.fixture(scope="module")
def pairs(demo_dir, tmp_path_factory) -> Path:
    """Two shards of ingested demo pairs (60 rows each); two rows carry a broken or a 20000x20000 image."""
    root = tmp_path_factory.mktemp("caption-input")
    ingest.run(["--input", str(demo_dir / "pool"), "--output", str(root / "raw")])
    out = root / "pairs"
    out.mkdir()
    for i, shard in enumerate(sorted((root / "raw").glob("part-*.parquet"))[:2]):
        table = pq.read_table(shard).slice(0, 60)
        if i == 1:
            images = table.column("image").to_pylist()
            images[3], images[7] = b"\x89PNG broken beyond repair", _broken_png_header()
            table = table.set_column(table.column_names.index("image"), table.schema.field("image"),
                                     pa.array(images, pa.binary()))
        pq.write_table(table, out / shard.name)
    return out


def _flags(pairs: Path, output: Path, models, *extra) -> list[str]:
    vlm, lm = models
    return ["--input", str(pairs), "--output", str(output), "--seed", "3", "--captioner_model", str(vlm),
            "--captioner_options", json.dumps({"cpu_threads": 1}), "--vec_max_new_tokens", "12",
            "--images_per_batch", "16", "--fusion_model", str(lm), "--fusion_dtype", "float32", *extra]


def test_captions_fusion_rejects_manifest_and_resume(pairs, models, tmp_path, capsys):
    output = tmp_path / "captioned"
    result = caption.run(_flags(pairs, output, models))
    manifest = result.manifest
    stats = manifest["stats"]

    # Bad images are counted rejects with their reasons; every other row is captioned and kept.
    assert result.rejects == {Reason.IMAGE_TOO_LARGE: 1, Reason.UNDECODABLE_IMAGE: 1}
    from pipelines.common import REJECTS_DIR
    rejected = pa.concat_tables(pq.read_table(p) for p in sorted((output / REJECTS_DIR).glob("*.parquet")))
    assert sorted(rejected.column("row").to_pylist()) == [4, 8]  # rows 3 and 7 of the shard, counted from 1
    assert result.rows == 118 and stats["image.prepared"] == 118
    table = pq.read_table(output / "part-00001.parquet")
    validate(table)
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())

    # A VeC for every row unless it stayed degenerate (counted); fused = a kept fusion or the VeC itself.
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))]).to_pylist()
    with_vec = [r for r in rows if r["synthetic_caption"] is not None]
    assert len(rows) - len(with_vec) == stats.get("vec.null", 0)
    assert with_vec and all(r["fused_caption"] is not None for r in with_vec)
    assert all(r["fused_caption"] is None for r in rows if r["synthetic_caption"] is None)
    changed = sum(r["fused_caption"] != r["synthetic_caption"] for r in with_vec)
    assert changed == stats.get("fusion.kept", 0)
    assert stats.get("fusion.kept", 0) + stats.get("fusion.fallback_to_vec", 0) + stats.get(
        "fusion.empty_alt_text", 0) == len(with_vec)

    # The manifest says which models and prompts made these captions, and that the VLM is a random toy.
    assert stats["captioner_is_random_tiny_model"] is True and stats["vec_prompt_version"] == "vec-v1"
    assert stats["fusion_prompt_version"] == "vecap-v1" and stats["captioner_model"] == str(models[0])
    assert any("RANDOM weights" in w for w in manifest["warnings"])
    assert read_manifest(output)["warnings"] == manifest["warnings"]  # on disk, not only in the returned dict
    assert "RANDOM weights" in capsys.readouterr().out

    # Resume: a lost shard is redone with exactly the same bytes and the totals still count every shard.
    before = (output / "part-00000.parquet").read_bytes()
    (output / "part-00000.parquet").unlink()
    again = caption.run(_flags(pairs, output, models))
    assert (output / "part-00000.parquet").read_bytes() == before
    assert again.manifest["stats"]["resumed_shards"] == 1
    assert again.manifest["stats"]["vec.kept"] == stats["vec.kept"] and again.rows == result.rows

    with pytest.raises(StageConfigMismatch):
        caption.run(_flags(pairs, output, models, "--vec_temperature", "0.5"))
    with pytest.raises(StageConfigMismatch, match="another input or config"):  # the seed draws the VeCs too
        caption.run([*_flags(pairs, output, models), "--seed", "7"])


def test_the_vec_prompt_is_a_flag_and_part_of_the_recorded_config():
    """It could not be set: a model that wants a short task prefix got the 27-word instruction."""
    options = caption.CaptionOptions(["--captioner_model", "m", "--vec_prompt", "caption en"])
    assert caption.config_from(options).prompt == "caption en"
    assert caption.config_from(options).recorded()["prompt"] == "caption en"


def test_without_fusion_and_demo_flags(pairs, tmp_path, capsys):
    flags = caption.demo_flags(tmp_path)
    assert "--no_fusion" in flags and (tmp_path / "models" / "tiny-vlm" / "config.json").is_file()
    single = tmp_path / "one-shard"
    single.mkdir()
    shutil.copy(sorted(pairs.glob("part-*.parquet"))[0], single)
    caption.main(["--input", str(single), "--output", str(tmp_path / "out"), *flags])
    printed = capsys.readouterr().out
    assert printed.count("RANDOM weights") >= 2  # before the run and after the summary
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.column("fused_caption").null_count == table.num_rows
    assert table.column("synthetic_caption").null_count < table.num_rows
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stats"]["fusion"] == "skipped"


def test_an_empty_shard_and_a_shard_of_broken_images_are_captioned_as_empty(pairs, tmp_path):
    """Arrow could not take an empty (null-typed) index list: the run died on an empty shard, or on a batch
    whose every image was rejected."""
    source = tmp_path / "edge"
    source.mkdir()
    table = pq.read_table(sorted(pairs.glob("part-*.parquet"))[0])
    pq.write_table(table.slice(0, 0), source / "part-00000.parquet")
    broken = table.slice(0, 3).set_column(table.column_names.index("image"), table.schema.field("image"),
                                          pa.array([b"not an image"] * 3, pa.binary()))
    pq.write_table(broken, source / "part-00001.parquet")
    result = caption.run(["--input", str(source), "--output", str(tmp_path / "out"), *caption.demo_flags(tmp_path)])
    assert result.manifest["rows"] == 0 and result.manifest["rejects"]["rows"] == 3
    assert [s["rows"] for s in result.manifest["shards"]] == [0, 0]


def test_a_failing_captioner_is_retried_and_a_persistent_failure_keeps_finished_shards(pairs, models, tmp_path,
                                                                                      monkeypatch):
    """A VLM server restarting fails one call: retried, not split. One that stays down stops the run; the
    shard written in an earlier pipeline run stays (all shards in one run kept nothing: they are written
    after a GroupByKey that waits for the last image)."""
    from curation.engines.vision_transformers import TransformersVisionEngine

    output = tmp_path / "captioned"
    real = TransformersVisionEngine.caption
    calls: list[tuple[int, bool]] = []

    def flaky(self, images, prompt, params):
        down = (output / "part-00000.parquet").exists() or not calls  # the first call, and after shard 0
        calls.append((len(images), down))
        if down:
            raise RuntimeError("connection refused (injected)")
        return real(self, images, prompt, params)

    monkeypatch.setattr(TransformersVisionEngine, "caption", flaky)
    flags = _flags(pairs, output, models, "--caption_shards_per_run", "1", "--caption_engine_backoff_s", "0",
                   "--no_fusion")
    with pytest.raises(Exception, match="connection refused"):
        caption.run(flags)
    assert calls[0][1] and not calls[1][1] and calls[1][0] == calls[0][0]  # the same batch again, and it passed
    down = [size for size, failed in calls[2:] if failed]
    assert down[:3] == [down[0]] * 3 and down[0] > 1 and set(down[3:]) == {1}  # 3 tries, then image by image
    assert [p.name for p in sorted(output.glob("part-*.parquet"))] == ["part-00000.parquet"]
    monkeypatch.setattr(TransformersVisionEngine, "caption", real)
    again = caption.run(flags)
    assert again.manifest["stats"]["resumed_shards"] == 1 and again.rows == 118


def test_a_repeated_key_or_a_caption_of_another_type_is_refused_before_anything_is_written(pairs, tmp_path):
    """Captions are joined back by key: a key in two rows gave both one VeC; an int64 caption column ran
    through and left its type in the output."""
    from curation.schema import SchemaError

    table = pq.read_table(sorted(pairs.glob("part-*.parquet"))[0]).slice(0, 4)
    flags = caption.demo_flags(tmp_path)
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    pq.write_table(pa.concat_tables([table, table.slice(2, 1)]), doubled / "part-00000.parquet")
    with pytest.raises(SchemaError, match=rf"duplicate key {table.column('key')[2].as_py()!r}.*row 5"):
        caption.run(["--input", str(doubled), "--output", str(tmp_path / "out"), *flags])
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", pa.array(range(4))),
                   numbers / "part-00000.parquet")
    with pytest.raises(SchemaError, match="column holds int64, which caption cannot read.*caption"):
        caption.run(["--input", str(numbers), "--output", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
