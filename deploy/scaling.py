"""The scale plan's arithmetic: per-stage work for a MetaCLIP-scale build, from throughput figures.

`deploy/SCALING.md` holds the table this prints. When a benchmark gives a
new figure, change it in FIGURES (with where it came from) and paste the new
table: `python deploy/scaling.py`. Every figure says whether it was measured
in this project (CPU, `benchmarks/`) or is an assumption (every GPU figure:
no GPU was available where the project was measured).
"""

import math
from dataclasses import dataclass

POOL_PAIRS = 1.6e9          # the raw pool
KEPT_PAIRS = 400e6          # after balancing (MetaCLIP 400M)
SHARD_BYTES = 256 * 2**20   # export's default training shard target


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str             # "measured: ..." or "assumption: ..."


FIGURES: dict[str, Figure] = {
    "pair_bytes": Figure(50e3, "bytes/pair", "assumption: JPEG at ~256-384 px plus text, as MetaCLIP/LAION shards"),
    "ingest_pairs_per_node_s": Figure(1500, "pairs/s per 16-core node",
                                      "assumption: img2dataset download rate, network bound"),
    "match_captions_per_core_s": Figure(103_357, "captions/s/core",
                                        "measured: benchmarks/bench_matching.py, 293k entries, 2-core shared VM"),
    "copy_mb_per_core_s": Figure(111, "MB/s/core", "measured: benchmarks/bench_export.py plain pyarrow copy"),
    "export_mb_per_core_s": Figure(10.0, "MB/s/core",
                                   "measured: benchmarks/bench_export.py, whole stage incl. data card"),
    "rewrites_per_caption": Figure(4, "rewrites", "LaCLIP's k"),
    "rewrite_new_tokens": Figure(25, "tokens/rewrite", "demo: 20 new tokens at most; alt-text length"),
    "rewrite_tokens_per_gpu_s": Figure(3000, "new tokens/s/GPU",
                                       "assumption: vLLM 0.32, 8B instruct model, H100, batched, prefix cache"),
    "caption_images_per_gpu_s": Figure(40, "images/s/GPU", "assumption: vLLM 0.32, ~7B VLM, H100, 48-token captions"),
    "fusion_new_tokens": Figure(40, "tokens/caption", "VeCLIP fusion output length"),
}


def _f(name: str) -> float:
    return FIGURES[name].value


def plan() -> list[tuple[str, str, str, str]]:
    """(stage, work, resource-hours, note) rows."""
    pool_bytes, kept_bytes = POOL_PAIRS * _f("pair_bytes"), KEPT_PAIRS * _f("pair_bytes")
    ingest_node_h = POOL_PAIRS / _f("ingest_pairs_per_node_s") / 3600
    match_core_h = POOL_PAIRS / _f("match_captions_per_core_s") / 3600
    balance_io_core_h = (pool_bytes + kept_bytes) / (_f("copy_mb_per_core_s") * 1e6) / 3600
    rewrite_tokens = KEPT_PAIRS * _f("rewrites_per_caption") * _f("rewrite_new_tokens")
    rewrite_gpu_h = rewrite_tokens / _f("rewrite_tokens_per_gpu_s") / 3600
    caption_gpu_h = KEPT_PAIRS / _f("caption_images_per_gpu_s") / 3600
    fusion_gpu_h = KEPT_PAIRS * _f("fusion_new_tokens") / _f("rewrite_tokens_per_gpu_s") / 3600
    export_core_h = kept_bytes / (_f("export_mb_per_core_s") * 1e6) / 3600
    shards = math.ceil(kept_bytes / SHARD_BYTES)
    return [
        ("ingest", f"{POOL_PAIRS / 1e9:.1f}B pairs, {pool_bytes / 1e12:.0f} TB", f"{ingest_node_h:,.0f} node-h",
         "network bound (assumption)"),
        ("balance: match", f"{POOL_PAIRS / 1e9:.1f}B captions", f"{match_core_h:,.1f} core-h", "measured rate"),
        ("balance: sample + write", f"read {pool_bytes / 1e12:.0f} TB, write {kept_bytes / 1e12:.0f} TB",
         f"{balance_io_core_h:,.0f} core-h", "I/O bound, measured copy rate"),
        ("rewrite", f"{rewrite_tokens / 1e9:.0f}B new tokens", f"{rewrite_gpu_h:,.0f} GPU-h", "GPU rate assumed"),
        ("caption (VeC)", f"{KEPT_PAIRS / 1e6:.0f}M images", f"{caption_gpu_h:,.0f} GPU-h", "GPU rate assumed"),
        ("caption (fusion)", f"{KEPT_PAIRS * _f('fusion_new_tokens') / 1e9:.0f}B new tokens",
         f"{fusion_gpu_h:,.0f} GPU-h", "GPU rate assumed"),
        ("export", f"{kept_bytes / 1e12:.0f} TB -> {shards:,} shards of 256 MiB "
                   f"(~{SHARD_BYTES / _f('pair_bytes'):,.0f} pairs each)", f"{export_core_h:,.0f} core-h",
         "measured rate"),
    ]


def render() -> str:
    lines = ["| stage | work | cost | basis |", "|---|---|---|---|"]
    lines += [f"| {stage} | {work} | {cost} | {note} |" for stage, work, cost, note in plan()]
    lines += ["", "| figure | value | unit | source |", "|---|---|---|---|"]
    lines += [f"| {name} | {f.value:,g} | {f.unit} | {f.source} |" for name, f in FIGURES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
