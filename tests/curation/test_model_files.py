"""A local model's fingerprint (curation.engines.model_files): content, not paths or modification times."""

import os

from curation.engines.model_files import BLOCKS, HEAD, WHOLE, model_fingerprint


def test_a_fingerprint_follows_the_bytes_and_not_the_clock(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = bytearray(os.urandom(WHOLE + HEAD * 3))  # sampled, not hashed whole
    (model / "model.safetensors").write_bytes(weights)
    (model / "config.json").write_text('{"hidden_size": 32}')
    before = model_fingerprint(str(model))
    os.utime(model / "model.safetensors", ns=(1, 1))  # downloaded afresh: same bytes, another time
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    assert model_fingerprint(str(model)) == before
    middle = HEAD + (len(weights) - HEAD) // 2  # a fine-tune changes weights throughout, the middle too
    block = (len(weights) - HEAD) // BLOCKS
    weights[middle - block // 2:middle + block // 2] = os.urandom(block // 2 * 2)
    (model / "model.safetensors").write_bytes(weights)
    assert model_fingerprint(str(model)) != before
    (model / "config.json").write_text('{"hidden_size": 64}')
    assert len({before, model_fingerprint(str(model))}) == 2


def test_a_gguf_file_counts_alone_and_a_hub_id_has_none(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF one")
    named = model_fingerprint(str(tmp_path), "a.gguf")
    (tmp_path / "__init__.py").write_text("# the wheel's code")
    assert model_fingerprint(str(tmp_path), "a.gguf") == named
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct") is None
