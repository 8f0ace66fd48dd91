import json
import math
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from curation.demo_data import generate
from curation.schema import SchemaError
from curation.shards import shard_name
from training import loop, step
from training.cli import demo_flags, run, summary
from training.config import RunMismatch, TrainConfig
from training.metrics_log import MetricsLog
from tests.training.fast_runs import FAST, fast_config as _config



def test_resume_continues_the_same_run(raw_pairs, tmp_path):
    """The checkpoint at step 4 falls inside the log window 4..6: the resumed row at 6 still averages 4, 5, 6.
    The evaluation due at step 4 is made before the stop there; the resume may spell the paths otherwise."""
    run = dict(steps=8, checkpoint_every=4, grad_accum=2, log_every=3, eval_every=4)
    straight = loop.train(_config(raw_pairs, tmp_path / "straight", **run))
    assert straight.steps == 8 and straight.metrics["samples_seen"] == 8 * 2 * 16
    first = loop.train(_config(raw_pairs, tmp_path / "resumed", stop_after_steps=4, **run))
    assert first.stopped_early and first.checkpoint.name == "step-0000004"
    assert json.loads((first.checkpoint / "state.json").read_text())["loss_window"][1] == 1  # step 4
    second = loop.train(TrainConfig(input=f"{raw_pairs}/.", output=f"{tmp_path}/./resumed/", **{**FAST, **run}))
    assert second.steps == 8 and not second.stopped_early
    losses = {name: MetricsLog.series(tmp_path / name / "metrics.csv", "loss") for name in ("straight", "resumed")}
    assert [s for s, _ in losses["resumed"]] == [s for s, _ in losses["straight"]] == [3, 6, 8]
    recalls = {name: MetricsLog.series(tmp_path / name / "metrics.csv", "holdout_i2t_r@1")
               for name in ("straight", "resumed")}
    assert [s for s, _ in recalls["resumed"]] == [s for s, _ in recalls["straight"]] == [4, 8]
    for (_, a), (_, b) in zip(losses["straight"], losses["resumed"]):
        assert abs(a - b) < 1e-4
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed")]
    for key, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][key], atol=1e-5), key
    # Changing what is trained is refused rather than silently mixed into the old run.
    with pytest.raises(ValueError, match="lr"):
        loop.train(_config(raw_pairs, tmp_path / "resumed", **{**run, "lr": 5e-3}))


def test_a_log_row_reads_the_device_once(demo_pairs, tmp_path, monkeypatch):
    """Its values come from the health read's one stacked sync, made at log rows only: nothing else in the
    loop or the step reads a tensor back to the host (on CUDA each such read waits for the GPU)."""
    syncs, reads = [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        def reading(self, *args, _real=getattr(torch.Tensor, name), _name=name):
            frame = sys._getframe(1).f_code
            syncs.append((frame.co_filename, frame.co_name, _name))
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, reading)
    real_read = step.StepHealth.read

    def read(self, reset_loss=True):
        reads.append(reset_loss)
        return real_read(self, reset_loss)

    monkeypatch.setattr(step.StepHealth, "read", read)
    result = loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, log_every=2))
    assert result.steps == 4
    assert reads == [True, True]  # the rows at steps 2 and 4; the final save reuses step 4's report
    in_loop = [s for s in syncs if s[0] in (loop.__file__, step.__file__)]
    assert in_loop and {(function, kind) for _, function, kind in in_loop} == {("read", "tolist")}
    logged = MetricsLog.series(tmp_path / "run" / "metrics.csv", "logit_scale")
    assert [s for s, _ in logged] == [2, 4]
    final = load_file(tmp_path / "run" / "model.safetensors")["logit_scale"]
    assert logged[-1][1] == pytest.approx(math.exp(final.item()), rel=1e-6)


def _nan_at(monkeypatch, calls: set[int]) -> None:
    """Make the step's loss NaN at these (1-based) calls."""
    real, seen = step.contrastive_loss, {"n": 0}

    def sometimes_nan(image, text, scale):
        seen["n"] += 1
        loss = real(image, text, scale)
        return loss * float("nan") if seen["n"] in calls else loss

    monkeypatch.setattr(step, "contrastive_loss", sometimes_nan)


def test_non_finite_losses_are_skipped_then_stop_the_run(raw_pairs, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 4, 5, 6})
    with pytest.raises(loop.TrainingDiverged,
                       match=r"3 steps in a row with a non-finite loss or gradient norm .*steps 4\.\.6") as info:
        loop.train(_config(raw_pairs, tmp_path / "nan", steps=20, max_bad_steps=3, gradient_checkpointing=True))
    checkpoint = tmp_path / "nan" / "checkpoints" / "step-0000006"
    assert str(checkpoint) in str(info.value)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["bad_steps"] == 4  # step 2 was skipped too, then training went on
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_a_diverged_run_resumes_from_its_last_good_weights_with_a_lower_lr(raw_pairs, tmp_path, monkeypatch):
    """What the stop message advises is what a resume accepts; a run that did not diverge still refuses it."""
    _nan_at(monkeypatch, {3, 4, 5})
    run = dict(steps=8, max_bad_steps=3, warmup_steps=2)
    with pytest.raises(loop.TrainingDiverged, match="may change --grad_clip, --lr, --max_bad_steps, --warmup_steps"):
        loop.train(_config(raw_pairs, tmp_path / "run", **run))
    monkeypatch.undo()
    retried = loop.train(_config(raw_pairs, tmp_path / "run", **{**run, "lr": 1e-4, "warmup_steps": 4}))
    assert retried.steps == 8 and retried.metrics["bad_steps"] == 3
    lrs = dict(MetricsLog.series(tmp_path / "run" / "metrics.csv", "lr"))
    assert lrs[2] == pytest.approx(1e-3)  # the first run: warmup 2 to its peak
    # Resumed at step 5, the schedule is the new one: warmup 4, peak 1e-4, cosine to 0 after step 8. A row
    # shows the rate its step trained with: step 5 the peak, step 8 the last above 0.
    for at in (6, 7, 8):
        assert lrs[at] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * (at - 5) / 4)), abs=1e-12)
    assert lrs[8] > 0
    with pytest.raises(ValueError, match="lr"):
        loop.train(_config(raw_pairs, tmp_path / "run", **{**run, "lr": 1e-5}))


def test_wrong_shards_fail_before_any_training(raw_pairs, tmp_path):
    (tmp_path / "bad").mkdir()
    table = pq.read_table(sorted(raw_pairs.glob("part-*.parquet"))[0]).drop_columns(["image"])
    pq.write_table(table, tmp_path / "bad" / shard_name(0))
    with pytest.raises(SchemaError, match="'image'"):
        loop.train(_config(tmp_path / "bad", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SchemaError, match="fused_caption"):
        loop.train(_config(raw_pairs, tmp_path / "out", fused_ratio=0.5))
    # A shard written elsewhere with a nullable caption: refused from its footer, not mid-epoch by the tokenizer.
    table = pq.read_table(sorted(raw_pairs.glob("part-*.parquet"))[0])
    captions = table.column("caption").to_pylist()
    captions[3] = None
    nullable = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions))
    for statistics in (True, False):  # and from the column itself where the footer has no statistics
        pq.write_table(nullable, tmp_path / "bad" / shard_name(0), write_statistics=statistics)
        with pytest.raises(SchemaError, match="1 row\\(s\\) have no caption"):
            loop.train(_config(tmp_path / "bad", tmp_path / "out"))


def test_shards_that_differ_from_their_manifest_fail_before_any_training(raw_pairs, tmp_path):
    """Sizes are always checked (a stat per file); the sha256s with --verify_checksums."""
    from curation.shards import ManifestError

    copy = tmp_path / "copy"
    shutil.copytree(raw_pairs, copy)
    shard = sorted(copy.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-1]))  # a copy cut short
    with pytest.raises(ManifestError, match=f"{shard.name} holds {len(data) - 1} bytes, its manifest {len(data)}"):
        loop.train(_config(copy, tmp_path / "out"))
    data[len(data) // 2] ^= 0xFF  # one byte flipped, the size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its manifest checksum"):
        loop.train(_config(copy, tmp_path / "out", verify_checksums=True))
    assert not (tmp_path / "out").exists()


def test_verify_checksums_hashes_the_input_only_while_steps_are_left(raw_pairs, tmp_path, monkeypatch):
    """A rerun of a finished run (the Dagster train step of an up-to-date build) only saves and evaluates:
    hashing the whole pool again would cost hours for nothing. A resume with steps left hashes it first."""
    hashed = []
    real = loop.verify_manifest
    monkeypatch.setattr(loop, "verify_manifest", lambda source, **kw: hashed.append(source) or real(source, **kw))
    run = dict(steps=4, checkpoint_every=2, verify_checksums=True)
    loop.train(_config(raw_pairs, tmp_path / "run", stop_after_steps=2, **run))
    loop.train(_config(raw_pairs, tmp_path / "run", **run))  # resumes at step 2 of 4
    assert hashed == [str(raw_pairs)] * 2
    again = loop.train(_config(raw_pairs, tmp_path / "run", **run))  # resumes at step 4 of 4
    assert again.steps == 4 and not again.stopped_early and len(hashed) == 2
    loop.train(_config(raw_pairs, tmp_path / "fresh", steps=2, verify_checksums=True, resume=False))
    assert len(hashed) == 3


def test_wrong_settings_and_eval_inputs_fail_before_overwrite_clears_anything(raw_pairs, tmp_path):
    """Found after `--overwrite` had cleared the output (preset, tokenizer), or after the last step (eval
    split, classes.json: no model was saved), these stopped a run only once its cost was paid."""
    earlier = loop.train(_config(raw_pairs, tmp_path / "run", steps=2, checkpoint_every=2))
    kept = sorted(p.name for p in earlier.output.iterdir())
    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"]}), tmp_path / "eval" / shard_name(0))
    wrong = [
        (dict(preset="vit-b32"), r"unknown model preset 'vit-b32'"),
        (dict(tokenizer=str(tmp_path / "nowhere"), vocab_size=0), r"no tokenizer at .*nowhere: it is neither a"),
        (dict(eval=str(tmp_path / "missing")), r"no shards at .*missing"),
        (dict(eval=str(tmp_path / "eval")), r"lacks column\(s\) \['label'\]"),
        (dict(grad_clip=-1.0), r"invalid training settings: grad_clip=-1.0"),
        # Found once the model was built or the first batch drawn: after the overwrite.
        (dict(batch_size=5000), r"fewer than a batch of 5000"),
        (dict(batch_size=1), r"a contrastive batch of one pair"),
    ] + ([] if torch.cuda.is_available() else [(dict(precision="bf16"), r"bf16 autocast is for CUDA")])
    for settings, message in wrong:
        with pytest.raises((ValueError, OSError), match=message):
            loop.train(_config(raw_pairs, tmp_path / "run", steps=2, overwrite=True, **settings))
        assert sorted(p.name for p in earlier.output.iterdir()) == kept, settings
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"], "label": ["cat"]}), tmp_path / "eval" / shard_name(0))
    with pytest.raises(FileNotFoundError, match="zero-shot needs a classes.json"):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=2, overwrite=True, eval=str(tmp_path / "eval")))
    (tmp_path / "classes.json").write_text("{}")  # beside the split, where the demo keeps it
    with pytest.raises(ValueError, match="must hold a non-empty JSON list"):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=2, overwrite=True, eval=str(tmp_path / "eval")))
    (tmp_path / "classes.json").write_text('["dog"]')
    with pytest.raises(ValueError, match=r"labels \['cat'\] are not in the class list \(1 classes\)"):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=2, overwrite=True, eval=str(tmp_path / "eval")))
    pq.write_table(pa.table({"key": ["a", "b"], "image": [b"x", b"y"], "label": ["dog", None]}),
                   tmp_path / "eval" / shard_name(0))
    with pytest.raises(ValueError, match=r"1 row\(s\) have no label"):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=2, overwrite=True, eval=str(tmp_path / "eval")))
    assert sorted(p.name for p in earlier.output.iterdir()) == kept


def test_a_resume_needs_no_longer_the_tokenizer_the_run_was_started_with(raw_pairs, tmp_path):
    """It trains on the copy saved with the run; checking --tokenizer up front must not break the resume."""
    from training.tokenizer import train_bpe

    named = tmp_path / "tokenizer"
    train_bpe(["a red circle", "two blue squares"] * 50, 300, 16).save_pretrained(named)
    settings = dict(steps=4, checkpoint_every=2, tokenizer=str(named), vocab_size=0)
    assert loop.train(_config(raw_pairs, tmp_path / "run", stop_after_steps=2, **settings)).stopped_early
    shutil.rmtree(named)
    assert loop.train(_config(raw_pairs, tmp_path / "run", **settings)).steps == 4


def test_a_stop_found_at_a_log_row_still_writes_that_row(raw_pairs, tmp_path, monkeypatch):
    """Step 5 was good, 6..8 were not: the row at 8 holds step 5's loss, which the retry keeps."""
    _nan_at(monkeypatch, {6, 7, 8})
    with pytest.raises(loop.TrainingDiverged):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=20, max_bad_steps=3, log_every=4))
    assert [s for s, _ in MetricsLog.series(tmp_path / "run" / "metrics.csv", "loss")] == [4, 8]


def test_a_late_stop_still_keeps_the_last_good_weights(raw_pairs, tmp_path, monkeypatch):
    """Counters are read every 4 steps: the run learns at step 8 of a stop at step 5, and steps 6..8 changed nothing."""
    reference = loop.train(_config(raw_pairs, tmp_path / "two", steps=20, stop_after_steps=2))
    _nan_at(monkeypatch, {3, 4, 5})
    with pytest.raises(loop.TrainingDiverged,
                       match=r"3 steps in a row with a non-finite loss or gradient norm \(steps 3\.\.5\); "
                             r"training stopped at step 8") as info:
        loop.train(_config(raw_pairs, tmp_path / "late", steps=20, max_bad_steps=3, log_every=4))
    checkpoint = tmp_path / "late" / "checkpoints" / "step-0000008"
    assert str(checkpoint) in str(info.value)
    assert json.loads((checkpoint / "state.json").read_text())["bad_steps"] == 3
    good = load_file(reference.checkpoint / "model.safetensors")
    for key, tensor in load_file(checkpoint / "model.safetensors").items():
        assert torch.equal(tensor, good[key]), key


def test_a_resume_may_spell_precision_as_auto_and_an_image_smaller_than_a_patch_is_refused(demo_pairs, tmp_path):
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, stop_after_steps=2)).stopped_early
    assert loop.train(_config(demo_pairs[0], tmp_path / "run", steps=4, precision="fp32")).steps == 4  # auto here
    with pytest.raises(ValueError, match="smaller than the tiny preset's patch size"):
        loop.train(_config(demo_pairs[0], tmp_path / "small", steps=2, image_size=4))
    assert not (tmp_path / "small").exists()


@pytest.mark.slow
def test_a_compiled_run_trains(demo_pairs, tmp_path):
    result = loop.train(_config(demo_pairs[0], tmp_path / "compiled", steps=6, compile=True, lr=2e-3))
    losses = [v for _, v in MetricsLog.series(tmp_path / "compiled" / "metrics.csv", "loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert CLIPModel.from_pretrained(tmp_path / "compiled").logit_scale is not None  # saved from the plain model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_run_on_cuda(demo_pairs, tmp_path):
    """Eager only: benchmarks/bench_train.py --compile runs the compiled towers on CUDA, at the real size."""
    result = loop.train(_config(demo_pairs[0], tmp_path / "gpu", steps=4, workers=2))
    assert math.isfinite(result.metrics["final_loss"]) and result.metrics["bad_steps"] == 0


@pytest.fixture(scope="module")
def larger_demo(tmp_path_factory):
    """1500 pairs (more of the rare concepts than the session demo), ingested, with its labelled eval split."""
    root = tmp_path_factory.mktemp("larger-demo")
    from pipelines import ingest  # Beam: not at module level, so the CUDA tests collect where Beam is absent

    generate(root / "demo", n_pairs=1500, n_eval=200, seed=0, rows_per_shard=250)
    ingest.run(["--input", str(root / "demo" / "pool"), "--output", str(root / "raw_pairs")])
    return root


@pytest.mark.slow
def test_short_cpu_run_lowers_the_loss_and_beats_chance_on_held_out_classes(larger_demo, capsys):
    output = larger_demo / "clip_model"
    argv = ["--input", str(larger_demo / "raw_pairs"), "--output", str(output), "--steps", "120",
            "--batch_size", "64", "--image_size", "32", "--lr", "2e-3", "--warmup_steps", "12", "--weight_decay", "0.1",
            "--workers", "1", "--threads", "1", "--eval_every", "60", "--no-progress",
            "--eval", str(larger_demo / "demo" / "eval")]
    result = run(argv)
    m = result.metrics
    assert m["final_loss"] < m["first_loss"] - 0.5
    # 100 classes "colour shape", chance 1% (top-5: 5%). In 120 steps the model learns colour well (10 classes,
    # chance 10%; 0.77-0.93 seen) and shape barely, so top-1 is mostly colour right times shape lucky (0.045-0.14
    # seen across thread counts and optimizers). The margins below hold for all of those runs.
    assert m["zeroshot_colour_acc"] >= 5 * m["zeroshot_colour_chance"]
    assert m["zeroshot_top5"] >= 4 * 5 * m["zeroshot_chance"]
    assert m["zeroshot_top1"] >= 3 * m["zeroshot_chance"]
    assert m["holdout_i2t_r@10"] > 10 / m["holdout_pairs"]
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["zeroshot_top1"] == m["zeroshot_top1"]
    assert (output / "curves.png").stat().st_size > 0
    assert len(MetricsLog.series(output / "metrics.csv", "zeroshot_top1")) == 2  # mid-run and final
    # The output loads anywhere with plain transformers.
    model = CLIPModel.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    processor = CLIPImageProcessor.from_pretrained(output)
    pixels = processor(images=[__import__("PIL.Image", fromlist=["Image"]).new("RGB", (50, 40), "red")],
                       return_tensors="pt")["pixel_values"]
    tokens = tokenizer(["a red circle", "a blue square"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    assert out.logits_per_image.shape == (1, 2)
    print(summary(result))
    assert "zero-shot top1" in capsys.readouterr().out


def test_demo_flags_point_at_the_demo_eval_split(tmp_path):
    flags = demo_flags(tmp_path)
    assert flags[flags.index("--eval") + 1] == str(tmp_path / "demo" / "eval")
    assert flags[flags.index("--classes") + 1] == str(tmp_path / "demo" / "classes.json")
    assert "--fused_ratio" not in flags  # nothing captioned yet
    assert "--overwrite" not in flags  # a retried train step resumes; the demo starts over on a RunMismatch


def test_the_bpe_learns_from_the_texts_the_run_samples_only(raw_pairs, tmp_path):
    """Every row's rewrite says "zzqx": the run's tokenizer has a token for it only if the run draws rewrites."""
    variant = tmp_path / "with-rewrites"
    variant.mkdir()
    for i, path in enumerate(sorted(raw_pairs.glob("part-*.parquet"))):
        table = pq.read_table(path)
        rewrites = pa.array([["zzqx unseen wording"]] * table.num_rows, pa.list_(pa.string()))
        pq.write_table(table.set_column(table.column_names.index("rewrites"), "rewrites", rewrites),
                       variant / shard_name(i))
    for use_rewrites in (False, True):
        output = tmp_path / f"rewrites-{use_rewrites}"
        loop.train(_config(variant, output, steps=1, use_rewrites=use_rewrites))
        vocabulary = AutoTokenizer.from_pretrained(output).get_vocab()
        assert any("zzqx" in token for token in vocabulary) == use_rewrites


def test_quantize_trains_the_towers_in_4_bit_and_saves_full_precision_weights(raw_pairs, tmp_path, monkeypatch):
    """Stable-SPAM is made for 4-bit training, and the trainer had no way to run it."""
    from training import model as model_module
    from training.optim import quantized_layers

    built = []
    real = model_module.build_model
    monkeypatch.setattr(loop, "build_model", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    run = dict(steps=4, checkpoint_every=2, log_every=1)
    full = loop.train(_config(raw_pairs, tmp_path / "full", **run))
    four = loop.train(_config(raw_pairs, tmp_path / "int4", quantize="int4", **run))
    layers = quantized_layers(built[-1])
    assert not quantized_layers(built[0]) and layers
    assert not any(name.endswith(("visual_projection", "text_projection")) for name in layers)
    assert {name.split(".")[0] for name in layers} == {"vision_model", "text_model"}
    assert math.isfinite(four.metrics["final_loss"]) and four.metrics["bad_steps"] == 0
    losses = [MetricsLog.series(tmp_path / name / "metrics.csv", "loss")[0][1] for name in ("full", "int4")]
    assert losses[0] != losses[1]  # the same first batch and weights: only the 4-bit forward differs
    # The saved model is a plain CLIPModel with the master weights; the run continues only in 4 bits.
    assert load_file(tmp_path / "int4" / "model.safetensors").keys() == load_file(
        tmp_path / "full" / "model.safetensors").keys()
    assert type(CLIPModel.from_pretrained(tmp_path / "int4").text_model.encoder.layers[0].mlp.fc1) is torch.nn.Linear
    with pytest.raises(ValueError, match="quantize"):
        loop.train(_config(raw_pairs, tmp_path / "int4", **{**run, "steps": 6}))


def test_a_run_made_before_the_optimizers_took_their_papers_settings_says_how_to_continue(raw_pairs, tmp_path):
    """Such a run recorded beta2 0.98 and eps 1e-6 and ran Stable-SPAM's 4-bit set: the same command now
    resolves to other settings, which its optimizer state does not load into."""
    old = dict(beta2=0.98, eps=1e-6, spam_gamma1=0.7, spam_gamma2=0.9, momentum_reset_interval=500)
    first = loop.train(_config(raw_pairs, tmp_path / "run", steps=4, checkpoint_every=2, stop_after_steps=2, **old))
    state = first.checkpoint / "state.json"
    saved = json.loads(state.read_text())
    for name in ("spam_gamma1", "spam_gamma2", "spam_theta", "momentum_reset_interval", "quantize"):
        del saved["config"][name]  # as that version wrote it
    state.write_text(json.dumps(saved))
    with pytest.raises(RunMismatch, match=r"beta2, eps differ.*to continue it, pass --beta2 0.98 --eps 1e-6 "
                                               r"--spam_gamma1 0.7 --spam_gamma2 0.9 --momentum_reset_interval 500"):
        loop.train(_config(raw_pairs, tmp_path / "run", steps=4, checkpoint_every=2))
    assert loop.train(_config(raw_pairs, tmp_path / "run", steps=4, checkpoint_every=2, **old)).steps == 4
