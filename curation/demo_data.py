"""The embedded demo dataset, drawn on the fly: no download, same bytes for the same seed.

Images are real JPEGs of procedurally drawn scenes: N objects of one concept
(a colour and a shape) on a background, sometimes with a small distractor.
Alt-texts imitate the web: some accurate, some partial, some junk, and the
concepts follow a Zipf law, so a few are everywhere and most are rare. That
gives MetaCLIP balancing a real head to flatten, and gives the trainer a
held-out split with known labels for zero-shot checks.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw
from tqdm import tqdm

from curation.shards import ShardWriter, atomic_write_bytes, write_manifest

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "purple": (130, 50, 170), "orange": (245, 130, 20), "black": (15, 15, 15), "white": (250, 250, 250),
    "pink": (245, 120, 190), "brown": (120, 70, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring", "stripe", "pentagon")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
COUNTS = ("one", "two", "three", "four")
BACKGROUNDS = ((200, 200, 200), (235, 225, 205), (180, 200, 215), (90, 90, 100), (210, 235, 210))
JUNK = ("IMG_{n:04d}.jpg", "DSC{n:05d}", "Photo by {name}", "© {name} Photography", "click here for more",
        "🔥🔥🔥", "✨ new post ✨", "image", "untitled-{n}", "Download free HD wallpaper", "{name}")
NAMES = ("Jane Doe", "Marco Rossi", "Aiko Tanaka", "Lena Fischer", "Sam Okafor", "Priya Nair")

RAW_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("url", pa.string()),
    pa.field("caption", pa.string()), pa.field("image", pa.binary()),
])
EVAL_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("image", pa.binary()), pa.field("caption", pa.string()),
    pa.field("label", pa.string()), pa.field("colour", pa.string()), pa.field("shape", pa.string()),
])


@dataclass(frozen=True)
class Concept:
    colour: str
    shape: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


CONCEPTS: tuple[Concept, ...] = tuple(Concept(c, s) for c in COLOURS for s in SHAPES)


def concept_weights(seed: int, exponent: float = 1.1) -> list[float]:
    """Zipf weights over CONCEPTS, with the rank order shuffled by the seed."""
    ranks = list(range(1, len(CONCEPTS) + 1))
    random.Random(seed).shuffle(ranks)
    return [1.0 / r ** exponent for r in ranks]


def _polygon(cx: float, cy: float, r: float, sides: int, rotation: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rotation + 2 * math.pi * i / sides), cy + r * math.sin(rotation + 2 * math.pi * i / sides))
            for i in range(sides)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5), fill=fill)
    elif shape == "star":
        outer, inner = _polygon(cx, cy, r, 5), _polygon(cx, cy, r * 0.45, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "stripe":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_scene(concept: Concept, count: int, rng: random.Random, size: tuple[int, int] = (96, 96)) -> bytes:
    """A JPEG of `count` objects of `concept`, maybe with one small distractor of another concept."""
    width, height = size
    background = rng.choice([b for b in BACKGROUNDS if b != COLOURS[concept.colour]])
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    cols = 2 if count > 1 else 1
    rows = math.ceil(count / cols)
    cell_w, cell_h = width / cols, height / rows
    r = 0.38 * min(cell_w, cell_h)
    for i in range(count):
        cx = cell_w * (i % cols + 0.5) + rng.uniform(-0.08, 0.08) * cell_w
        cy = cell_h * (i // cols + 0.5) + rng.uniform(-0.08, 0.08) * cell_h
        draw_shape(draw, concept.shape, cx, cy, r * rng.uniform(0.8, 1.0), COLOURS[concept.colour])
    if rng.random() < 0.2:
        other = rng.choice(CONCEPTS)
        draw_shape(draw, other.shape, rng.uniform(0, width), rng.uniform(0, height), r * 0.3, COLOURS[other.colour])
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def alt_text(concept: Concept, count: int, rng: random.Random) -> str:
    """A web-like alt-text: accurate, partial, junk, or accurate with junk around it."""
    noun = concept.shape if count == 1 else PLURALS[concept.shape]
    number = COUNTS[count - 1]
    junk = rng.choice(JUNK).format(n=rng.randrange(10_000), name=rng.choice(NAMES))
    kind = rng.random()
    if kind < 0.45:
        return rng.choice((
            f"{number} {concept.colour} {noun} on a plain background",
            f"A photo of {number} {concept.colour} {noun}.",
            f"{concept.colour} {concept.shape} icon",
            f"{concept.colour.capitalize()} {noun}, flat illustration",
            f"{number} {concept.colour} {noun}",
        ))
    if kind < 0.65:
        return rng.choice((f"some {PLURALS[concept.shape]}", f"{concept.colour} shapes", "abstract geometric art",
                           f"a {concept.shape}", f"{concept.colour} pattern"))
    if kind < 0.85:
        return f"{junk} | {concept.colour} {noun}" if rng.random() < 0.5 else f"{concept.colour} {noun} - {junk}"
    return junk


def generate(out_dir: str | Path, n_pairs: int = 3000, n_eval: int = 500, seed: int = 0,
             rows_per_shard: int = 500, broken_fraction: float = 0.01) -> dict:
    """Write the raw pool (`pool/`), a labelled eval split (`eval/`) and `classes.json`.

    A small `broken_fraction` of pool rows is deliberately bad (truncated JPEG,
    empty caption, or a byte-identical duplicate image) so ingest's rejects
    and dedup have something real to count.
    """
    if n_pairs <= 0 or n_eval < 0:
        raise ValueError("n_pairs must be positive and n_eval non-negative")
    out = Path(out_dir)
    rng = random.Random(seed)
    weights = concept_weights(seed)
    concept_counts: dict[str, int] = {c.label: 0 for c in CONCEPTS}
    pool = ShardWriter(out / "pool", RAW_SCHEMA, rows_per_shard=rows_per_shard, resume=False)
    previous: bytes | None = None
    for i in tqdm(range(n_pairs), desc="demo pool", unit="pair", mininterval=1.0):
        concept = rng.choices(CONCEPTS, weights)[0]
        concept_counts[concept.label] += 1
        count = rng.randint(1, 4)
        size = (rng.randint(64, 160), rng.randint(64, 160))
        image = draw_scene(concept, count, rng, size)
        caption = alt_text(concept, count, rng)
        damage = rng.random()
        if damage < broken_fraction / 3:
            image = image[: len(image) // 2]
        elif damage < 2 * broken_fraction / 3:
            caption = "   "
        elif damage < broken_fraction and previous is not None:
            image = previous
        previous = image
        pool.write([{"key": f"demo-{seed}-{i:07d}", "url": f"https://demo.invalid/{i:07d}.jpg",
                     "caption": caption, "image": image}])
    pool_shards = pool.close()
    write_manifest(out / "pool", stage="demo_pool", config={"n_pairs": n_pairs, "seed": seed}, shards=pool_shards,
                   concept_counts=concept_counts)

    eval_rng = random.Random(seed + 1)
    evaluation = ShardWriter(out / "eval", EVAL_SCHEMA, rows_per_shard=rows_per_shard, resume=False)
    for i in range(n_eval):
        concept = CONCEPTS[i % len(CONCEPTS)]
        count = eval_rng.randint(1, 4)
        image = draw_scene(concept, count, eval_rng, (eval_rng.randint(64, 160), eval_rng.randint(64, 160)))
        evaluation.write([{"key": f"eval-{seed}-{i:06d}", "image": image,
                           "caption": f"{COUNTS[count - 1]} {concept.colour} {PLURALS[concept.shape] if count > 1 else concept.shape}",
                           "label": concept.label, "colour": concept.colour, "shape": concept.shape}])
    eval_shards = evaluation.close()
    write_manifest(out / "eval", stage="demo_eval", config={"n_eval": n_eval, "seed": seed}, shards=eval_shards)
    atomic_write_bytes(out / "classes.json", json.dumps([c.label for c in CONCEPTS]).encode())
    atomic_write_bytes(out / "metadata.json", json.dumps(demo_metadata()).encode())
    return concept_counts


def demo_metadata() -> list[str]:
    """A MetaCLIP-format metadata list that covers the demo's concepts, plus common words that match often."""
    entries = [str(i) for i in range(100)]
    entries += list(COLOURS) + [c.capitalize() for c in COLOURS] + list(SHAPES) + list(PLURALS.values())
    entries += [c.label for c in CONCEPTS] + [f"{c.colour} {PLURALS[c.shape]}" for c in CONCEPTS]
    entries += list(COUNTS) + ["photo", "image", "icon", "illustration", "pattern", "shapes", "background",
                               "art", "wallpaper", "Photography", "geometric", "abstract"]
    return list(dict.fromkeys(entries))
