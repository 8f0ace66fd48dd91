"""Where training metrics go: a long-format CSV (the record), TensorBoard if installed, and a PNG of the curves.

The CSV is appended to, so a resumed run continues the same file and the
curves stay continuous; rows past the resume step (logged after the last
checkpoint by the interrupted run) are dropped on resume, by writing the
kept rows to a new file that replaces the old one (a kill then leaves one or
the other whole). A row a kill cut short is skipped when the file is read.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from curation.shards import atomic_write_bytes, atomic_write_figure

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
FIELDS = ("step", "metric", "value")


class MetricsLog:
    """Appends metric rows; on resume keeps the rows up to the resume step (a fresh file, header first, if none)."""

    def __init__(self, output: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output) / METRICS_CSV
        kept = [r for r in self.read(self.path) if int(r["step"]) <= resume_step] \
            if resume_step and self.path.is_file() else []
        self._write_all(kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a test extra, not a runtime requirement
                SummaryWriter = None
            if SummaryWriter is not None:
                # Events from the resume step on go: the CSV keeps its rows up to that step, and so does this.
                # A fresh start (a run killed before its first checkpoint, run again) keeps none: its events
                # file stayed beside the new one, and the curves showed both runs' steps 1, 2, ...
                events = Path(output) / "tensorboard"
                if not resume_step:
                    shutil.rmtree(events, ignore_errors=True)
                self.writer = SummaryWriter(str(events), purge_step=resume_step + 1 if resume_step else None)

    def _write_all(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())

    def log(self, step: int, values: dict[str, float]) -> None:
        self._append(step, values)
        self._to_tensorboard(step, values)

    def replace(self, step: int, values: dict[str, float]) -> None:
        """Log `values` at `step` in place of rows of the same metrics there: a finished run rerun (it
        resumes at its last step) writes its final metrics once, not once per run. TensorBoard kept the
        first run's events at this step, so only metrics new there go to it."""
        rows = self.read(self.path)
        logged = {r["metric"] for r in rows if int(r["step"]) == step}
        self._write_all([r for r in rows if not (int(r["step"]) == step and r["metric"] in values)])
        self._append(step, values)
        self._to_tensorboard(step, {name: value for name, value in values.items() if name not in logged})

    def metrics_at(self, step: int) -> set[str]:
        """The names of the metrics logged at `step`."""
        return {r["metric"] for r in self.read(self.path) if int(r["step"]) == step}

    def _append(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                writer.writerow([step, name, value])

    def _to_tensorboard(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The rows, less a last one a kill cut short (no value, or no number where one belongs)."""
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if _complete(r)]

    @staticmethod
    def series(path: str | Path, metric: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["value"])) for r in MetricsLog.read(path) if r["metric"] == metric]


def _complete(row: dict) -> bool:
    try:
        int(row["step"]), float(row["value"])
    except (TypeError, ValueError):
        return False
    return bool(row["metric"])


def plot_curves(output: str | Path, accuracy_metric: str = "zeroshot_top1") -> Path | None:
    """loss.png-style figure: training loss and, where evaluated, zero-shot accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(output) / METRICS_CSV
    loss = MetricsLog.series(path, "loss")
    if not loss:
        return None
    accuracy = MetricsLog.series(path, accuracy_metric)
    figure, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5, 3.5), squeeze=False)
    axes[0][0].plot(*zip(*loss))
    axes[0][0].set(xlabel="step", ylabel="contrastive loss", title="training loss")
    if accuracy:
        axes[0][1].plot(*zip(*accuracy), marker="o")
        axes[0][1].set(xlabel="step", ylabel=accuracy_metric, title="held-out zero-shot accuracy", ylim=(0, 1))
    figure.tight_layout()
    out = Path(output) / CURVES_PNG
    atomic_write_figure(figure, out, dpi=100)
    plt.close(figure)
    return out
