"""The data card: what a dataset build did, in one Markdown page with plots, written beside the training shards.

What it reads, and from where:
- The chain of stages upstream of the export: each stage directory holds a
  stage-config file (written by `pipelines.common.begin_stage`) whose `input`
  names the directory it read. The card follows that chain back from the
  export's input and reads each `manifest.json` it finds (rows, rejects by
  reason, stats). A stage without a manifest, or a chain that leaves the
  machine, ends the walk; the card says which stages it saw.
- The entry-count curve: the balance stage's entry counts, a Parquet file (or
  directory) beside its output whose name starts with `entry_counts`, or one
  its manifest names under `stats`. Absent: the card says "not available".
- Rewrite acceptance: the rewrite stage's manifest `stats` (accepted count and
  rejected counts by reason). Absent: "not available".
- Caption lengths and the contact sheet: the exported rows themselves.

Everything here is pure (pyarrow, numpy, matplotlib with the Agg backend).
"""

from __future__ import annotations

import io
import json
import textwrap
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from curation.export import valid_rewrites  # noqa: E402
from curation.languages import word_count  # noqa: E402
from curation.shards import MANIFEST, atomic_write_bytes, atomic_write_figure  # noqa: E402

DATACARD = "datacard.md"
ENTRY_COUNTS_PLOT = "datacard_entry_counts.png"
LENGTHS_PLOT = "datacard_caption_lengths.png"
REWRITE_PLOT = "datacard_rewrite_acceptance.png"
CONTACT_SHEET = "datacard_contact_sheet.png"
CONTACT_SHEET_IMAGES = 16
NOT_AVAILABLE = "not available"

# Column names the balance stage may use for counts before and after sampling, most specific first.
_BEFORE_NAMES = ("count_before", "matches", "matched", "count", "total", "pool_count", "before")
_AFTER_NAMES = ("count_after", "kept", "kept_count", "balanced", "balanced_count", "after")


@dataclass
class StageRecord:
    """One upstream stage as its manifest describes it."""

    stage: str
    directory: Path
    manifest: dict

    @property
    def rows_out(self) -> int:
        return int(self.manifest.get("rows", 0))

    @property
    def rejects(self) -> dict[str, int]:
        return dict(self.manifest.get("rejects", {}).get("by_reason", {}))

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {}) or {}


def upstream_stages(input_dir: str | Path, stage_config_name: str, limit: int = 32) -> list[StageRecord]:
    """The stages that produced `input_dir`, oldest first, found by following each stage's recorded input."""
    records: list[StageRecord] = []
    seen: set[Path] = set()
    current = Path(input_dir).resolve()
    while current not in seen and len(records) < limit:
        seen.add(current)
        manifest_path = current / MANIFEST
        if not manifest_path.is_file():
            break
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            break
        records.append(StageRecord(str(manifest.get("stage", current.name)), current, manifest))
        recorded = current / stage_config_name
        if not recorded.is_file():
            break
        upstream = json.loads(recorded.read_text()).get("input")
        if not upstream:
            break
        current = Path(upstream).resolve()
    return records[::-1]


def stage_count_rows(records: list[StageRecord]) -> list[dict]:
    """Rows in, rows out, rejects by reason and rows dropped without a reject, for every stage; rows in is the
    stage's own stat if it has one.

    Balance drops the pairs its draw does not keep: that is the curation, not bad data, so they are no
    rejects, and it counts them (`rows_dropped_by_sampling`). For any other stage the count is what rows in
    less rows out and rejects leaves, which should be 0: the card shows it, since anything else is rows the
    manifests do not account for.
    """
    table = []
    previous_out: int | None = None
    for record in records:
        stats = record.stats
        rejected = sum(record.rejects.values())
        rows_in = stats.get("rows_in")
        if not isinstance(rows_in, (int, float)):
            rows_in = previous_out if previous_out is not None else record.rows_out + rejected
        table.append({"stage": record.stage, "rows_in": int(rows_in), "rows_out": record.rows_out,
                      "rejected": rejected,
                      "dropped": int(stats.get("rows_dropped_by_sampling", int(rows_in) - record.rows_out - rejected)),
                      "by_reason": record.rejects})
        previous_out = record.rows_out
    return table


def _entry_counts_path(record: StageRecord) -> Path | None:
    for value in record.stats.values():
        if isinstance(value, str) and "entry_count" in value and value.endswith(".parquet"):
            candidate = record.directory / value
            if candidate.exists():
                return candidate
    matches = sorted(p for p in record.directory.glob("entry_counts*") if not p.name.startswith("."))
    return matches[0] if matches else None


def _pick(names: list[str], wanted: tuple[str, ...]) -> str | None:
    for name in wanted:
        if name in names:
            return name
    return None


def entry_count_curves(records: list[StageRecord]) -> tuple[np.ndarray, np.ndarray | None, str] | None:
    """(counts before, counts after or None, source file) from the balance stage, sorted descending."""
    for record in records:
        if record.stage != "balance":
            continue
        path = _entry_counts_path(record)
        if path is None:
            return None
        table = pq.read_table(path)
        numeric = [f.name for f in table.schema if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                   and not f.name.endswith("id") and f.name != "p"]
        before = _pick(numeric, _BEFORE_NAMES) or (numeric[0] if numeric else None)
        if before is None:
            return None
        after = _pick([n for n in numeric if n != before], _AFTER_NAMES)
        def sort(name: str) -> np.ndarray:
            values = table.column(name).to_numpy(zero_copy_only=False).astype(float)
            return np.sort(values[values > 0])[::-1]  # a log-log curve of the entries that occur

        source = f"{path.name} ({before}" + (f", {after})" if after else ")")
        return sort(before), (sort(after) if after else None), source
    return None


def _numbers(stats: dict, prefix: str = "") -> Iterable[tuple[str, float]]:
    """(dotted name, value) of every number in a stats dict, one level of nesting or more."""
    for name, value in stats.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{name}", value


def _is_accepted_count(name: str) -> bool:
    return name in ("kept", "accepted") or name.startswith("accepted") or name.endswith("_accepted")


def rewrite_acceptance(records: list[StageRecord]) -> dict | None:
    """Accepted rewrites and rejected ones by reason, from the rewrite stage's manifest stats.

    Understands counters named `kept` / `accepted*` and `rejected.<reason>`
    (flat, or nested under any key, e.g. `{"rejected_by_reason": {"echo": 3}}`).
    """
    for record in records:
        if record.stage != "rewrite":
            continue
        accepted: int | None = None
        by_reason: dict[str, int] = {}
        for name, value in _numbers(record.stats):
            parts = name.split(".")
            if len(parts) > 1 and any(part.startswith("reject") for part in parts[:-1]):
                by_reason[parts[-1]] = by_reason.get(parts[-1], 0) + int(value)
            elif _is_accepted_count(parts[-1]):
                accepted = (accepted or 0) + int(value)
        if accepted is None and not by_reason:
            return None
        return {"accepted": accepted, "rejected_by_reason": dict(sorted(by_reason.items()))}
    return None


def word_counts(texts: Iterable[str | None]) -> np.ndarray:
    """Words as validation counts them: a Chinese caption is not one word."""
    return np.array([word_count(t) for t in texts if t], dtype=np.int64)


@dataclass
class CaptionLengths:
    """Words per caption, by kind, over the exported rows."""

    alt_text: np.ndarray
    rewrites: np.ndarray
    fused: np.ndarray
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        def describe(values: np.ndarray) -> dict:
            if not len(values):
                return {"count": 0}
            return {"count": int(len(values)), "mean": round(float(values.mean()), 2),
                    "median": float(np.median(values)), "p95": float(np.percentile(values, 95))}
        return {"alt_text": describe(self.alt_text), "rewrites": describe(self.rewrites), "fused": describe(self.fused)}


def caption_lengths(shards: list[Path], samples: int = CONTACT_SHEET_IMAGES) -> CaptionLengths:
    """Word counts of every caption kind, plus the first `samples` rows (the shuffled order) for the contact sheet."""
    alt, rewrites, fused, picked = [], [], [], []
    for path in shards:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(columns=["caption", "rewrites", "fused_caption"]):
            alt.append(word_counts(batch.column(0).to_pylist()))
            # The rewrites training draws from: a fallback copy of the caption is none.
            captions, rows = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            rewrites.append(word_counts(r for caption, row in zip(captions, rows)
                                        for r in valid_rewrites(caption or "", row)))
            fused.append(word_counts(batch.column(2).to_pylist()))
        if len(picked) < samples and parquet.metadata.num_rows:
            head = parquet.read_row_group(0, columns=["key", "image", "caption", "rewrites", "fused_caption"])
            picked += head.slice(0, samples - len(picked)).to_pylist()
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return CaptionLengths(join(alt), join(rewrites), join(fused), picked)


def plot_entry_counts(before: np.ndarray, after: np.ndarray | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = np.arange(1, len(before) + 1)
    ax.plot(ranks, before, label="before balancing")
    if after is not None:
        ax.plot(np.arange(1, len(after) + 1), after, label="after balancing")
    ax.set(xscale="log", yscale="log", xlabel="entry rank", ylabel="pairs matching the entry",
           title="Metadata entry counts, sorted")
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_caption_lengths(lengths: CaptionLengths, path: Path) -> None:
    kinds = [("alt-text", lengths.alt_text), ("rewrites", lengths.rewrites), ("fused", lengths.fused)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=False)
    for ax, (name, values) in zip(axes, kinds):
        if len(values):
            ax.hist(values, bins=np.arange(0, max(int(values.max()), 1) + 2) - 0.5)
        else:
            ax.text(0.5, 0.5, NOT_AVAILABLE, ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{name} (n={len(values)})", xlabel="words", ylabel="captions")
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_rewrite_acceptance(acceptance: dict, path: Path) -> None:
    labels = (["accepted"] if acceptance["accepted"] is not None else []) + list(acceptance["rejected_by_reason"])
    values = ([acceptance["accepted"]] if acceptance["accepted"] is not None else []) + list(
        acceptance["rejected_by_reason"].values())
    total = max(sum(values), 1)
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(labels) + 1.5))
    ax.barh(labels, [v / total for v in values], color=["tab:green" if label == "accepted" else "tab:red"
                                                        for label in labels])
    ax.invert_yaxis()
    ax.set(xlabel="share of generated rewrites", title="Rewrite acceptance by reject reason")
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)
    plt.close(fig)


def _wrap(label: str, text: str | None, width: int = 34, lines: int = 2) -> str:
    body = textwrap.shorten(text or "-", width=width * lines, placeholder="...")
    return "\n".join(textwrap.wrap(f"{label}: {body}", width)[:lines + 1])


def plot_contact_sheet(samples: list[dict], path: Path) -> None:
    """A 4x4 grid: each image with its alt-text, its first rewrite and its fused caption."""
    fig, axes = plt.subplots(4, 4, figsize=(14, 17))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95, wspace=0.08, hspace=0.45)
    for ax, row in zip(axes.flat, samples + [None] * (len(axes.flat) - len(samples))):
        ax.axis("off")
        if row is None:
            continue
        try:
            with Image.open(io.BytesIO(row["image"])) as image:
                ax.imshow(image.convert("RGB"))
        except Exception:  # an image the card cannot show must not stop the card
            ax.text(0.5, 0.5, "undecodable", ha="center", va="center", transform=ax.transAxes)
        rewrite = (row.get("rewrites") or [None])[0]
        caption = "\n".join([_wrap("alt", row["caption"]), _wrap("rewrite", rewrite),
                             _wrap("fused", row.get("fused_caption"))])
        ax.set_title(caption, fontsize=7, loc="left")
    with warnings.catch_warnings():  # emoji in alt-texts have no glyph in the default font; they show as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        atomic_write_figure(fig, path, dpi=80)
    plt.close(fig)


def _counts_table(rows: list[dict], exported: int) -> list[str]:
    """The upstream stages' counts, then export's own row (it refuses bad input: nothing rejected or dropped)."""
    if not rows:
        return [f"Stage counts: {NOT_AVAILABLE} (no upstream manifest reachable from the input)."]
    lines = ["| stage | rows in | rows out | rejected | dropped, no reject | rejected by reason |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in row["by_reason"].items()) or "-"
        lines.append(f"| {row['stage']} | {row['rows_in']} | {row['rows_out']} | {row['rejected']} | "
                     f"{row['dropped']} | {reasons} |")
    lines.append(f"| export | {exported} | {exported} | 0 | 0 | - |")
    return lines + ["", "Dropped, no reject: for balance, the pairs MetaCLIP's draw did not keep (the curation "
                        "itself); for any other stage it should be 0, and anything else is rows the stage "
                        "manifests do not account for."]


def write_datacard(output: str | Path, *, records: list[StageRecord], export_summary: dict,
                   shards: list[Path]) -> dict:
    """Write datacard.md and its PNGs into `output`; return {"datacard": name, "plots": [names], "lengths": ...}."""
    output = Path(output)
    plots: list[str] = []
    counts = stage_count_rows(records)
    lengths = caption_lengths(shards)
    lines = [f"# Data card: {output.name}", "",
             f"Exported {export_summary['rows']} pairs in {export_summary['shards']} Parquet shards "
             f"({export_summary['bytes'] / 1e6:.1f} MB), seed {export_summary['seed']}, "
             f"schema {export_summary['schema_version']}, shard target {export_summary['target_bytes'] / 2**20:g} MiB.",
             "", "## Counts at every stage", "",
             "Read from the manifest of each upstream stage (followed through each stage's recorded input): "
             + (", ".join(f"`{r.directory}`" for r in records) or "none") + ".", ""]
    lines += _counts_table(counts, export_summary["rows"])

    lines += ["", "## Entry counts before and after balancing", ""]
    curves = entry_count_curves(records)
    if curves is None or not len(curves[0]):
        lines.append(f"Entry counts: {NOT_AVAILABLE} (no balance stage upstream, it saved no entry_counts file, "
                     f"or no entry matched).")
    else:
        before, after, source = curves
        plot_entry_counts(before, after, output / ENTRY_COUNTS_PLOT)
        plots.append(ENTRY_COUNTS_PLOT)
        lines += [f"From `{source}`: {len(before)} entries with a match; top before: {before[:3].astype(int).tolist()}"
                  + (f", top after: {after[:3].astype(int).tolist()}" if after is not None else ", after: "
                     + NOT_AVAILABLE) + ".", "", f"![entry counts]({ENTRY_COUNTS_PLOT})"]

    lines += ["", "## Caption lengths (words)", ""]
    summary = lengths.summary()
    lines += ["| kind | captions | mean | median | p95 |", "|---|---:|---:|---:|---:|"]
    for kind, stats in summary.items():
        lines.append(f"| {kind} | {stats['count']} | {stats.get('mean', '-')} | {stats.get('median', '-')} | "
                     f"{stats.get('p95', '-')} |")
    plot_caption_lengths(lengths, output / LENGTHS_PLOT)
    plots.append(LENGTHS_PLOT)
    lines += ["", f"![caption lengths]({LENGTHS_PLOT})"]

    lines += ["", "## Rewrite acceptance by reject reason", ""]
    acceptance = rewrite_acceptance(records)
    if acceptance is None:
        lines.append(f"Rewrite acceptance: {NOT_AVAILABLE} (no rewrite stage upstream, or no counts in its stats).")
    else:
        total = (acceptance["accepted"] or 0) + sum(acceptance["rejected_by_reason"].values())
        if acceptance["accepted"] is not None:
            lines.append(f"Accepted {acceptance['accepted']} of {total} generated rewrites "
                         f"({acceptance['accepted'] / max(total, 1):.1%}).")
        lines += ["", "| reason | rejected | share |", "|---|---:|---:|"]
        lines += [f"| {reason} | {n} | {n / max(total, 1):.1%} |"
                  for reason, n in acceptance["rejected_by_reason"].items()]
        plot_rewrite_acceptance(acceptance, output / REWRITE_PLOT)
        plots.append(REWRITE_PLOT)
        lines += ["", f"![rewrite acceptance]({REWRITE_PLOT})"]

    lines += ["", "## Contact sheet", ""]
    if lengths.samples:
        plot_contact_sheet(lengths.samples, output / CONTACT_SHEET)
        plots.append(CONTACT_SHEET)
        lines += [f"The first {len(lengths.samples)} rows of the shuffled order, with alt-text, one rewrite and the "
                  "fused caption.", "", f"![contact sheet]({CONTACT_SHEET})"]
    else:
        lines.append(f"Contact sheet: {NOT_AVAILABLE} (no rows).")
    atomic_write_bytes(output / DATACARD, ("\n".join(lines) + "\n").encode())
    return {"datacard": DATACARD, "plots": plots, "caption_lengths": summary, "stage_counts": counts}
