"""Images per second of the transformers captioner: batched against one image at a time, on CPU and GPU.

The VLM is LLaVA-shaped at a realistic small scale (CLIP ViT-B/16 at 224 px,
196 image tokens, and a 30-layer 576-wide Llama, SmolLM2-135M's shape) with
random weights, built from a config and loaded through the same
`from_pretrained` path as a real model. Decoding is greedy with a fixed token
budget, so both runs do the same work. The GPU section skips without CUDA.

    python benchmarks/bench_caption.py [--images 8] [--new_tokens 12] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from curation.demo_data import generate  # noqa: E402
from curation.engines.base import SamplingParams  # noqa: E402
from curation.engines.vision_tiny import build_tiny_vlm  # noqa: E402
from curation.engines.vision_transformers import TransformersVisionEngine  # noqa: E402
from curation.images import prepare_image  # noqa: E402
from curation.shards import read_table  # noqa: E402

PROMPT = "Write one short sentence saying what this picture shows."


def demo_images(root: Path, n: int) -> list[Image.Image]:
    generate(root / "demo", n_pairs=max(n * 2, 20), n_eval=10, seed=0, broken_fraction=0.0)
    table = read_table(root / "demo" / "pool")
    images = [prepare_image(data) for data in table.column("image").to_pylist()]
    return [p.image for p in images if hasattr(p, "image")][:n]


def measure(engine: TransformersVisionEngine, images: list[Image.Image], batch: int,
            new_tokens: int) -> tuple[float, int]:
    """Seconds to caption all images `batch` at a time, and tokens generated."""
    params = [SamplingParams(new_tokens, 0.0, 1.0, i) for i in range(len(images))]
    engine.batch_size = batch
    engine.caption(images[:batch], PROMPT, params[:batch])  # warm-up: allocator, kernels, caches
    start = time.perf_counter()
    out = engine.caption(images, PROMPT, params)
    return time.perf_counter() - start, sum(g.completion_tokens for g in out)


def compare(device: str, model: Path, images: list[Image.Image], batch: int, new_tokens: int, dtype: str) -> None:
    engine = TransformersVisionEngine(str(model), device=device, dtype=dtype, batch_size=batch)
    single_s, single_tokens = measure(engine, images, 1, new_tokens)
    batched_s, batched_tokens = measure(engine, images, batch, new_tokens)
    n = len(images)
    print(f"[{device}] one at a time: {n / single_s:7.2f} images/s ({single_tokens / single_s:7.1f} tokens/s)")
    print(f"[{device}] batch of {batch:>3}:  {n / batched_s:7.2f} images/s "
          f"({batched_tokens / batched_s:7.1f} tokens/s)")
    print(f"[{device}] batched / one at a time: {single_s / batched_s:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="Images per CPU measurement.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=12)
    parser.add_argument("--gpu_images", type=int, default=256)
    parser.add_argument("--gpu_batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; on a shared small machine 1 avoids OpenMP spin-wait stalls.")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model = build_tiny_vlm(root / "llava-base-random", size="base")
        params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 4 / 1e6
        print(f"built a LLaVA-shaped VLM with random weights ({params:.0f}M parameters) "
              f"in {time.perf_counter() - start:.1f}s; torch threads={torch.get_num_threads()}")
        images = demo_images(root, max(args.images, args.gpu_images if torch.cuda.is_available() else 0))
        compare("cpu", model, images[:args.images], args.batch, args.new_tokens, "float32")
        if torch.cuda.is_available():
            compare("cuda", model, images[:args.gpu_images], args.gpu_batch, args.new_tokens, "bfloat16")
        else:
            print("[cuda] skipped: no CUDA device")


if __name__ == "__main__":
    main()
