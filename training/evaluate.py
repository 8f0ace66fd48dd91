"""Held-out evaluation: zero-shot classification from prompt templates, and image<->text retrieval.

Zero-shot follows CLIP/open_clip: every class name fills every template, the
normalised text embeddings of a class are averaged and normalised again, and
each image goes to the class with the highest cosine. Retrieval ranks all
held-out texts per image (and all images per text) by cosine and reports
Recall@1/5/10. Pairs whose texts tokenize alike (web alt-text repeats) share
one text: it is one candidate for image->text, and any of its images is a hit
for text->image, so a duplicated caption cannot cost a perfect model its hit.
Otherwise only the row's own pair is a hit, and a candidate that ties with it
ranks before it, so a model that cannot tell its inputs apart scores zero,
not one. The shards' held-out pool is capped
(`holdout_max_pairs`): the first held-out rows in shard order, read until
there are enough, and scored in row chunks rather than one N x N matrix.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from curation.failed_checks import verify_input
from curation.shards import is_complete, read_table, shard_paths
from training.data import ShardStream, StreamSpec
from training.image_transforms import CorruptImage, decode, eval_transform, normalise
from training.model import encode_images, encode_texts
from training.tokenizer import encode

# Generic CLIP-style templates (not tuned to the demo's alt-texts).
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an illustration of a {}.", "a drawing of a {}.",
             "a close-up photo of a {}.", "a photo of the {}.")
RECALL_AT = (1, 5, 10)
EVAL_BATCH = 128  # images or texts encoded at once
RANK_CHUNK = 1024  # query rows scored at a time: memory grows with the pool, not its square


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def class_weights(model, tokenizer, classes: list[str], templates: Iterable[str], context_length: int,
                  device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """(classes x dim) zero-shot weights: mean of normalised template embeddings, renormalised."""
    templates = list(templates)
    rows = []
    for name in classes:
        tokens, _ = encode(tokenizer, [t.format(name) for t in templates], context_length)
        with _autocast(device, precision):
            features = encode_texts(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        mean = features.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


LABELLED_COLUMNS = ("image", "label")


def _missing_columns(eval_dir: str | Path, names: Iterable[str]) -> None:
    missing = [c for c in LABELLED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"eval split {eval_dir} lacks column(s) {missing}; it needs image bytes and a label")


def load_labelled(eval_dir: str | Path) -> pa.Table:
    table = read_table(eval_dir)
    _missing_columns(eval_dir, table.column_names)
    return table


def _check_labels(eval_dir: str | Path, labels: list, classes: list[str]) -> None:
    """Every label is a name in the class list: zero-shot has no class to score a row against otherwise."""
    nulls = sum(label is None for label in labels)
    if nulls:
        raise ValueError(f"eval split {eval_dir}: {nulls} row(s) have no label")
    unknown = sorted(set(labels) - set(classes), key=str)
    if unknown:
        raise ValueError(f"eval split {eval_dir}: labels {unknown[:5]} are not in the class list "
                         f"({len(classes)} classes)")


def _check_captions(path: Path) -> None:
    """A caption column (retrieval's texts) has a text on every row: the tokenizer failed on a null at the
    first evaluation, with a message that named no file or row."""
    if "caption" not in pq.read_schema(path).names:
        return
    captions = pq.read_table(path, columns=["caption"]).column("caption")
    if captions.null_count:
        row = pc.index(pc.is_null(captions), True).as_py() + 1
        raise ValueError(f"eval split file {path}: row {row} has no caption ({captions.null_count} row(s) in all); "
                         f"retrieval needs a text for every image")


def check_eval_inputs(eval_dir: str, classes_path: Path | None) -> None:
    """The labelled split's files, columns and labels and its classes.json, before training (the label
    column only, no image): found wrong at the final evaluation, they would stop the run at its end."""
    if not eval_dir:
        return
    if is_complete(eval_dir):  # a split with a manifest: its files match it, and its checks did not fail
        verify_input(eval_dir, checksums=False)
    paths = shard_paths(eval_dir)
    if not paths:
        raise FileNotFoundError(f"eval split {eval_dir} holds no Parquet shards")
    for path in paths:
        _missing_columns(path, pq.read_schema(path).names)
        _check_captions(path)
    if classes_path is None or not classes_path.is_file():
        raise FileNotFoundError(f"zero-shot needs a classes.json; none at {classes_path} (--classes names one)")
    labels = [label for path in paths for label in pq.read_table(path, columns=["label"]).column("label").to_pylist()]
    _check_labels(eval_dir, labels, load_classes(classes_path))


def _image_features(model, images: list[bytes], image_size: int, device: torch.device, precision: str,
                    batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """Features of the decodable images, and the indices of those that were."""
    features, kept = [], []
    for chunk_start, chunk in zip(range(0, len(images), batch_size), _batches(images, batch_size)):
        pixels = []
        for offset, data in enumerate(chunk):
            try:
                pixels.append(eval_transform(decode(data), image_size))
                kept.append(chunk_start + offset)
            except CorruptImage:
                continue
        if pixels:
            with _autocast(device, precision):
                features.append(encode_images(model, normalise(torch.stack(pixels).to(device))))
    return (torch.cat(features) if features else torch.empty(0)), kept


@torch.no_grad()
def zero_shot(model, tokenizer, table: pa.Table, classes: list[str], features: torch.Tensor, kept: list[int], *,
              context_length: int, device: torch.device, precision: str = "fp32",
              templates: Iterable[str] = TEMPLATES) -> dict:
    """Top-1/top-5 accuracy over `classes`, plus accuracy per attribute column (e.g. colour, shape), for the
    labelled split `table` whose decodable images `kept` have the image `features`."""
    labels = table.column("label").to_pylist()
    weights = class_weights(model, tokenizer, classes, templates, context_length, device, precision)
    logits = 100.0 * features @ weights.T
    target = torch.tensor([classes.index(labels[i]) for i in kept], device=logits.device)
    top5 = logits.topk(min(5, len(classes)), dim=1).indices
    predicted = top5[:, 0]
    result = {"zeroshot_top1": (predicted == target).float().mean().item(),
              "zeroshot_top5": (top5 == target[:, None]).any(dim=1).float().mean().item(),
              "zeroshot_chance": 1.0 / len(classes), "zeroshot_images": len(kept),
              "zeroshot_corrupt_images": table.num_rows - len(kept)}
    # An attribute column whose value is a function of the label (the demo's colour and shape) gets its own score.
    for column in table.column_names:
        if column in ("key", "image", "label", "caption"):
            continue
        values = table.column(column).to_pylist()
        by_label: dict[str, set] = {}
        for label, value in zip(labels, values):
            by_label.setdefault(label, set()).add(value)
        if not all(isinstance(v, str) for v in values) or any(len(v) > 1 for v in by_label.values()):
            continue
        of_class = [next(iter(by_label.get(c, {None}))) for c in classes]
        hits = [of_class[p] == values[i] for p, i in zip(predicted.tolist(), kept)]
        result[f"zeroshot_{column}_acc"] = sum(hits) / max(len(hits), 1)
        result[f"zeroshot_{column}_chance"] = 1.0 / len(set(values))
    return result


def true_pair_ranks(queries: torch.Tensor, candidates: torch.Tensor, query_groups: torch.Tensor | None = None,
                    candidate_groups: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of query i's best true candidate (one of its group; default: candidate i): how many
    candidates of other groups score at least as high (ties count against it)."""
    if query_groups is None:
        query_groups = candidate_groups = torch.arange(queries.shape[0], device=queries.device)
    ranks = []
    for start in range(0, queries.shape[0], RANK_CHUNK):
        scores = queries[start:start + RANK_CHUNK] @ candidates.T
        own = query_groups[start:start + RANK_CHUNK, None] == candidate_groups[None, :]
        # The best true candidate with a score: one NaN image does not sink the others of its group.
        true = scores.masked_fill(~own | scores.isnan(), float("-inf")).max(dim=1, keepdim=True).values
        rank = ((scores >= true) & ~own).sum(dim=1)
        ranks.append(torch.where(true[:, 0].isneginf(), torch.iinfo(rank.dtype).max, rank))  # all NaN: never found
    return torch.cat(ranks)


def text_groups(input_ids: torch.Tensor) -> torch.Tensor:
    """Per pair, an id shared by the pairs whose (padded) tokens are the same: texts the model cannot tell apart."""
    return torch.unique(input_ids, dim=0, return_inverse=True)[1]


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, prefix: str,
                groups: torch.Tensor | None = None) -> dict:
    """Image->text and text->image Recall@k where row i of each side is the pair; `groups` (text_groups)
    merges pairs that share a text."""
    result = {f"{prefix}_pairs": int(image_features.shape[0])}
    if groups is None:
        groups = torch.arange(image_features.shape[0])
    groups = groups.to(image_features.device)
    distinct, first = _first_of_each(groups)
    for direction, ranks in (("i2t", true_pair_ranks(image_features, text_features[first], groups, distinct)),
                             ("t2i", true_pair_ranks(text_features, image_features, groups, groups))):
        for k in RECALL_AT:
            result[f"{prefix}_{direction}_r@{k}"] = (ranks < k).float().mean().item()
    return result


def _first_of_each(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct group ids and the row where each first occurs."""
    distinct, inverse = torch.unique(groups, return_inverse=True)
    rows = torch.arange(groups.shape[0], device=groups.device)
    first = torch.full_like(distinct, groups.shape[0]).scatter_reduce(0, inverse, rows, reduce="amin")
    return distinct, first


@torch.no_grad()
def retrieval_on_table(model, tokenizer, image_features: torch.Tensor, kept: list[int], captions: list[str], *,
                       context_length: int, device: torch.device, precision: str = "fp32", prefix: str,
                       batch_size: int = EVAL_BATCH) -> dict:
    """Retrieval between the `kept` images' features and their captions, and how many of those were cut to
    the context (a long caption's tail is no part of what was retrieved by)."""
    texts = [captions[i] for i in kept]
    text_features, token_ids, truncated = [], [], 0
    for chunk in _batches(texts, batch_size):
        tokens, cut = encode(tokenizer, chunk, context_length)
        truncated += cut
        token_ids.append(tokens["input_ids"])
        with _autocast(device, precision):
            text_features.append(encode_texts(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))
    if not kept:
        return {f"{prefix}_pairs": 0}
    return {**recall_at_k(image_features, torch.cat(text_features), prefix, text_groups(torch.cat(token_ids))),
            f"{prefix}_truncated_texts": truncated}


@torch.no_grad()
def holdout_retrieval(model, tokenizer, spec: StreamSpec, *, device: torch.device, precision: str = "fp32",
                      batch_size: int = EVAL_BATCH) -> dict:
    """Retrieval over the shards' first `spec.max_rows` held-out rows (alt-text as the text, centre crop), and
    how many of those texts were cut to the context."""
    image_features, text_features, token_ids, truncated = [], [], [], 0
    for batch in ShardStream(spec, tokenizer, batch_size):
        token_ids.append(batch["input_ids"])
        truncated += batch["counts"].get("truncated_texts", 0)
        with _autocast(device, precision):
            image_features.append(encode_images(model, normalise(batch["pixel_values"].to(device))))
            text_features.append(encode_texts(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    if not image_features:
        return {"holdout_pairs": 0}
    return {**recall_at_k(torch.cat(image_features), torch.cat(text_features), "holdout",
                          text_groups(torch.cat(token_ids))), "holdout_truncated_texts": truncated}


def load_classes(path: str | Path) -> list[str]:
    classes = json.loads(Path(path).read_text())
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path} must hold a non-empty JSON list of class names")
    if repeated := sorted(c for c, n in collections.Counter(classes).items() if n > 1):
        # Two rows of weights for one name: a label matches the first, and chance is read as 1/len(list).
        raise ValueError(f"{path} names {repeated[:5]} more than once; each class must be listed once")
    return classes


def evaluate_all(model, tokenizer, *, holdout: StreamSpec | None, eval_dir: str | None, classes_path: Path | None,
                 image_size: int, context_length: int, device: torch.device, precision: str = "fp32") -> dict:
    """Every evaluation that has data: zero-shot and retrieval on the labelled split, retrieval on the holdout."""
    was_training = model.training
    model.eval()
    metrics: dict = {}
    try:
        if eval_dir:
            # Decoded and encoded once for both scores: each evaluation on rank 0 holds the others back.
            table = load_labelled(eval_dir)
            classes = load_classes(classes_path)
            _check_labels(eval_dir, table.column("label").to_pylist(), classes)
            features, kept = _image_features(model, table.column("image").to_pylist(), image_size, device,
                                             precision, EVAL_BATCH)
            if not kept:
                raise ValueError(f"none of the {table.num_rows} images of eval split {eval_dir} decodes: zero-shot "
                                 f"has nothing to score")
            metrics.update(zero_shot(model, tokenizer, table, classes, features, kept,
                                     context_length=context_length, device=device, precision=precision))
            if "caption" in table.column_names:
                metrics.update(retrieval_on_table(
                    model, tokenizer, features, kept, table.column("caption").to_pylist(),
                    context_length=context_length, device=device, precision=precision, prefix="eval"))
        if holdout is not None and holdout.holdout_fraction > 0:
            metrics.update(holdout_retrieval(model, tokenizer, holdout, device=device, precision=precision))
    finally:
        model.train(was_training)
    return metrics
