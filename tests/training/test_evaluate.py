"""Retrieval scoring: ties count against the true pair, pairs sharing a text share its hits, known ranks give
known recalls, the held-out pool is capped."""

import pytest
import torch
import torch.nn.functional as F

from curation.shards import read_table
from training import data, evaluate
from training.data import StreamSpec
from training.evaluate import holdout_retrieval, recall_at_k, text_groups, true_pair_ranks
from training.model import build_model, clip_config
from training.shard_set import inspect_shards, is_holdout
from training.tokenizer import train_bpe


def test_constant_features_retrieve_nothing():
    """Every candidate ties with the true pair: a model that cannot tell inputs apart gets no hit."""
    same = F.normalize(torch.ones(20, 4), dim=-1)
    result = recall_at_k(same, same, "x")
    assert result["x_pairs"] == 20
    assert all(result[f"x_{d}_r@{k}"] == 0.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_a_perfect_ranking_scores_one():
    features = torch.eye(12)
    result = recall_at_k(features, features, "x")
    assert all(result[f"x_{d}_r@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_a_known_rank_gives_known_recalls():
    """Text 0 scores 3rd of 6 for image 0 (two texts above it), every other image's text 1st."""
    texts = torch.eye(6)
    images = torch.eye(6)
    images[0] = torch.tensor([0.5, 1.0, 0.8, 0.0, 0.0, 0.0])
    assert true_pair_ranks(images, texts).tolist() == [2, 0, 0, 0, 0, 0]
    result = recall_at_k(images, texts, "x")
    assert result["x_i2t_r@1"] == pytest.approx(5 / 6)
    assert result["x_i2t_r@5"] == 1.0
    # Text->image: for text 1, image 0 scores 1.0 too, a tie, which puts image 1 second.
    assert true_pair_ranks(texts, images).tolist() == [0, 1, 0, 0, 0, 0]
    assert result["x_t2i_r@1"] == pytest.approx(5 / 6)


def test_a_caption_that_repeats_costs_a_perfect_model_no_hit():
    """Web alt-text repeats: pairs 1 and 3 share a caption, so their texts embed alike. That text is one
    candidate for image->text, and either of its images is a hit for text->image."""
    tokens = torch.tensor([[5, 6, 0], [7, 8, 0], [9, 9, 9], [7, 8, 0], [4, 0, 0]])
    groups = text_groups(tokens)
    assert groups[1] == groups[3] and len(set(groups.tolist())) == 4
    texts = torch.eye(5)
    texts[3] = texts[1]
    images = texts.clone()
    images[3] = F.normalize(texts[1] + 0.1 * texts[4], dim=0)  # another photo of the same caption
    plain = recall_at_k(images, texts, "x")
    assert plain["x_i2t_r@1"] == pytest.approx(3 / 5) and plain["x_t2i_r@1"] == pytest.approx(4 / 5)
    merged = recall_at_k(images, texts, "x", groups)
    assert all(merged[f"x_{d}_r@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    # Image 4 now prefers the shared caption: a distinct text above the true one still counts against it.
    images[4] = F.normalize(texts[1] + 0.5 * texts[4], dim=0)
    assert recall_at_k(images, texts, "x", groups)["x_i2t_r@1"] == pytest.approx(4 / 5)


def test_ranks_are_the_same_in_chunks(monkeypatch):
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(50, 8), dim=-1), F.normalize(torch.randn(50, 8), dim=-1)
    groups = torch.arange(50) % 20
    whole, grouped = true_pair_ranks(a, b), true_pair_ranks(a, b, groups, groups)
    monkeypatch.setattr(evaluate, "RANK_CHUNK", 7)
    assert torch.equal(true_pair_ranks(a, b), whole)
    assert torch.equal(true_pair_ranks(a, b, groups, groups), grouped)


def test_nan_features_are_never_a_hit():
    features = torch.full((5, 3), float("nan"))
    assert recall_at_k(features, features, "x")["x_i2t_r@10"] == 0.0
    # One NaN image of a text's two: the text still finds the other.
    texts, images = torch.eye(3), torch.eye(3)
    texts[2], images[2] = texts[1], float("nan")
    assert recall_at_k(images, texts, "x", torch.tensor([0, 1, 1]))["x_t2i_r@1"] == 1.0


def test_the_held_out_pool_is_capped_and_read_only_as_far_as_needed(raw_pairs, monkeypatch):
    keys = read_table(raw_pairs, columns=["key"]).column("key").to_pylist()
    held = sum(is_holdout(k, 0.2) for k in keys)
    shards = inspect_shards(raw_pairs)
    tokenizer = train_bpe(read_table(raw_pairs, columns=["caption"]).column("caption").to_pylist(), 300, 16)
    model = build_model(clip_config("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    image_size=32, context_length=16), seed=0).eval()
    reads = []
    real = data.read_unit
    monkeypatch.setattr(data, "read_unit", lambda shards, unit, columns, rows=None: reads.append((unit, columns))
                        or real(shards, unit, columns, rows))

    def pairs(cap: int) -> int:
        spec = StreamSpec(shards, 0, 32, 16, holdout_fraction=0.2, train=False, max_rows=cap)
        return holdout_retrieval(model, tokenizer, spec, device=torch.device("cpu"), batch_size=8)["holdout_pairs"]

    assert held > 20 and pairs(10_000) == held
    image_reads = [u for u, columns in reads if "image" in columns]
    assert len(image_reads) == len(shards.units)
    reads.clear()
    assert pairs(5) == 5
    assert len([u for u, columns in reads if "image" in columns]) < len(shards.units)


def test_an_eval_split_whose_checks_failed_is_refused_before_training(tmp_path):
    import pyarrow as pa

    from curation.failed_checks import FailedChecksError, record_failed_checks
    from curation.shards import write_manifest, write_table_atomic
    from training.evaluate import check_eval_inputs

    table = pa.table({"key": ["a", "b"], "image": [b"x", b"y"], "label": ["dog", "cat"]})
    manifest = write_manifest(tmp_path, stage="eval", config={},
                              shards=[write_table_atomic(table, tmp_path / "part-00000.parquet")])
    (tmp_path / "classes.json").write_text('["dog", "cat"]')
    check_eval_inputs(str(tmp_path), tmp_path / "classes.json")  # a split like any other
    record_failed_checks(tmp_path, manifest, ["schema_valid"])
    with pytest.raises(FailedChecksError, match="schema_valid"):
        check_eval_inputs(str(tmp_path), tmp_path / "classes.json")


def test_a_null_eval_caption_and_a_class_listed_twice_are_refused_before_training(tmp_path):
    """Found at the first evaluation, a null caption stopped the run in the tokenizer naming no file or row,
    and a repeated class halved zero-shot's reported chance."""
    import pyarrow as pa

    from curation.shards import write_table_atomic
    from training.evaluate import check_eval_inputs

    (tmp_path / "classes.json").write_text('["dog", "cat"]')
    table = pa.table({"key": ["a", "b", "c"], "image": [b"x", b"y", b"z"], "label": ["dog", "cat", "dog"],
                      "caption": ["a dog", "a cat", "another dog"]})
    write_table_atomic(table, tmp_path / "part-00000.parquet")
    check_eval_inputs(str(tmp_path), tmp_path / "classes.json")
    write_table_atomic(table.set_column(3, "caption", pa.array(["a dog", None, None], pa.string())),
                       tmp_path / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"part-00000.parquet: row 2 has no caption \(2 row\(s\) in all\)"):
        check_eval_inputs(str(tmp_path), tmp_path / "classes.json")
    write_table_atomic(table, tmp_path / "part-00000.parquet")
    (tmp_path / "classes.json").write_text('["dog", "cat", "dog"]')
    with pytest.raises(ValueError, match=r"names \['dog'\] more than once"):
        check_eval_inputs(str(tmp_path), tmp_path / "classes.json")


def test_retrieval_counts_the_texts_it_cut_to_the_context(raw_pairs):
    """A caption longer than the context is retrieved by its head alone: the metrics say how many were."""
    tokenizer = train_bpe(read_table(raw_pairs, columns=["caption"]).column("caption").to_pylist(), 300, 8)
    model = build_model(clip_config("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    image_size=32, context_length=8), seed=0).eval()
    captions = ["a dog", "a red circle " * 10, "two cats", "a blue square on a white table beside a green cup"]
    features = F.normalize(torch.randn(len(captions), model.config.projection_dim), dim=-1)
    with torch.no_grad():
        metrics = evaluate.retrieval_on_table(model, tokenizer, features, list(range(len(captions))), captions,
                                              context_length=8, device=torch.device("cpu"), prefix="eval")
    assert metrics["eval_pairs"] == 4 and metrics["eval_truncated_texts"] == 2
    spec = StreamSpec(inspect_shards(raw_pairs), 0, 32, 8, holdout_fraction=0.2, train=False, max_rows=20)
    held = holdout_retrieval(model, tokenizer, spec, device=torch.device("cpu"), batch_size=8)
    assert 0 < held["holdout_truncated_texts"] <= held["holdout_pairs"], held
