"""`resnet report RUN_DIR`: draw a run's metrics.jsonl (loss, accuracy, lr, images/s) to a PNG.

Works on a live run or a finished one, without W&B. After a restart the jsonl file holds the
steps replayed since the last checkpoint twice; the later line wins, as it is the one the
resumed run actually went on from.
"""
from __future__ import annotations

import json
from pathlib import Path

from resnet.runfolder import METRICS_FILE

DEFAULT_PNG = "report.png"

# (panel title, y label, [(metric key, legend label), ...]); panels with no data are left blank.
PANELS = [
    ("Loss", "loss", [("loss", "train"), ("val_loss", "val")]),
    ("Accuracy", "accuracy", [("top1", "train top-1"), ("top5", "train top-5"),
                              ("val_top1", "val top-1"), ("val_top5", "val top-5")]),
    ("Learning rate", "lr", [("lr", "lr")]),
    ("Throughput", "images/s", [("img_per_s", "total"), ("img_per_s_per_device", "per device")]),
]


class ReportError(RuntimeError):
    """The run directory has nothing to draw; the message says what is missing."""


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from a jsonl file (later lines win; unreadable lines skipped)."""
    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # e.g. the last line of a run killed mid-write
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, {})[step] = float(value)
    return series


def _load(run_dir: Path) -> dict[str, dict[int, float]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"no {METRICS_FILE} in {run_dir}: is this a run directory (run.dir) "
                          "of a run that has logged at least one step?")
    series = read_metrics(path)
    series.pop("step", None)
    series.pop("time", None)
    if not series:
        raise ReportError(f"{path} holds no metrics yet")
    return series


def _draw(series: dict[str, dict[int, float]], title: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (panel, ylabel, keys) in zip(axes, PANELS):
        drawn = False
        for key, label in keys:
            points = series.get(key)
            if not points:
                continue
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], label=label,
                    marker="o" if len(steps) < 20 else None, markersize=3)
            drawn = True
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return fig


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's metrics into `out` (default RUN_DIR/report.png); return the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    series = _load(run_dir)
    out = Path(out) if out else run_dir / DEFAULT_PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    last_step = max(max(points) for points in series.values())
    fig = _draw(series, f"{run_dir.resolve().name} (up to step {last_step})")
    fig.savefig(out, dpi=100)
    return out
