"""Training settings: refused when they cannot run, and what a resume may change."""

import pytest

from training.config import TrainConfig, resolve_precision, resume_mismatches


@pytest.mark.parametrize("field, value", [
    ("log_every", 0), ("eval_every", -1), ("threads", -2), ("image_size", -32), ("context_length", -1),
    ("vocab_size", -5),
])
def test_a_setting_that_cannot_run_is_refused_before_any_work(field, value):
    """`--log_every 0` was accepted, and the run divided by it after the tokenizer, the model and a step."""
    with pytest.raises(ValueError, match=f"invalid training settings: {field}="):
        TrainConfig(**{field: value})


def test_a_resume_compares_paths_by_what_they_name(tmp_path, monkeypatch):
    """The input is checked by its contents' fingerprint and the output is where the checkpoint was found, so
    neither's spelling makes another run; a local tokenizer is the folder it names, and another one differs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "other-tok").mkdir()
    saved = TrainConfig(input="work/shards", output="work/model", tokenizer="tok").to_dict()
    assert resume_mismatches(saved, TrainConfig(input=str(tmp_path / "work" / "shards"), output="./work/model/",
                                                tokenizer=str(tmp_path / "tok"))) == []
    assert resume_mismatches(saved, TrainConfig(input="work/shards", output="work/model",
                                                tokenizer="other-tok")) == ["tokenizer"]
    assert resume_mismatches(saved, TrainConfig(input="work/shards", output="work/model", tokenizer="tok",
                                                lr=1.0)) == ["lr"]


def test_settings_that_only_trade_speed_or_memory_may_change_on_resume():
    """Gradient checkpointing gives the same weights: resuming an out-of-memory run with it was refused."""
    saved = TrainConfig().to_dict()
    assert resume_mismatches(saved, TrainConfig(gradient_checkpointing=True, compile=True)) == []


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu_and_bf16_needs_cuda():
    assert [resolve_precision("auto", device) for device in ("cuda", "cpu")] == ["bf16", "fp32"]
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match="bf16 autocast is for CUDA"):
        resolve_precision("bf16", "cpu")


def test_a_flag_that_its_companion_would_leave_unused_is_refused():
    """--classes without --eval ran no zero-shot, and --vocab_size beside --tokenizer sized nothing."""
    with pytest.raises(ValueError, match="--classes names the eval split's classes: pass --eval too"):
        TrainConfig(input="in", output="out", classes="classes.json")
    with pytest.raises(ValueError, match="--vocab_size sizes the BPE trained when no --tokenizer is given"):
        TrainConfig(input="in", output="out", tokenizer="tok", vocab_size=1234)
    assert TrainConfig(input="in", output="out", eval="eval", classes="classes.json").classes_path.name == "classes.json"
