import io
import json

import pyarrow.parquet as pq
from PIL import Image

from curation.demo_data import CONCEPTS, concept_weights, demo_metadata, generate
from curation.shards import read_manifest, read_table


def test_concepts_are_long_tailed(demo_dir):
    counts = read_manifest(demo_dir / "pool")["concept_counts"]
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    print("top concepts:", ranked[:5])
    print("bottom concepts:", ranked[-5:])
    values = [v for _, v in ranked]
    assert sum(values) == 400
    assert values[0] >= 10 * max(values[len(values) // 2], 1)  # a heavy head over the median
    assert sum(1 for v in values if v <= 2) >= len(values) // 2  # and a long thin tail
    weights = sorted(concept_weights(0), reverse=True)
    assert weights[0] / weights[-1] > 100


def test_images_decode_and_captions_are_noisy(demo_dir):
    t = read_table(demo_dir / "pool")
    captions = t.column("caption").to_pylist()
    decodable = 0
    for data in t.column("image").to_pylist():
        try:
            Image.open(io.BytesIO(data)).load()
            decodable += 1
        except OSError:
            pass
    assert 0.9 * t.num_rows < decodable < t.num_rows  # a few are deliberately truncated
    assert any(c.startswith(("IMG_", "DSC", "Photo by", "©")) for c in captions)
    assert any("on a plain background" in c for c in captions)
    assert any(not c.strip() for c in captions)


def test_eval_split_has_every_label(demo_dir):
    t = pq.read_table(next((demo_dir / "eval").glob("part-*.parquet")))
    classes = json.loads((demo_dir / "classes.json").read_text())
    assert len(classes) == len(CONCEPTS) == 100
    labels = set(read_table(demo_dir / "eval").column("label").to_pylist())
    assert labels == set(classes)
    assert {"label", "colour", "shape", "image"} <= set(t.column_names)


def test_same_seed_same_bytes(tmp_path):
    generate(tmp_path / "a", n_pairs=30, n_eval=5, seed=3)
    generate(tmp_path / "b", n_pairs=30, n_eval=5, seed=3)
    generate(tmp_path / "c", n_pairs=30, n_eval=5, seed=4)
    a, b, c = (read_table(tmp_path / x / "pool") for x in "abc")
    assert a.equals(b)
    assert not a.column("image").equals(c.column("image"))


def test_demo_metadata_covers_every_label():
    entries = demo_metadata()
    assert len(entries) == len(set(entries))
    assert all(c.label in entries for c in CONCEPTS)
