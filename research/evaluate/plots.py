"""Plots of a run folder: metrics.jsonl (one PNG per metric, every split on it) and the
examples a classifier got wrong."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from research.evaluate.writer import read_metrics  # noqa: E402

# Timing fields describe the machine, not the model.
_NOT_PLOTTED = {"step", "split", "tokens_per_second", "step_time_ms", "mfu", "learning_rate",
                "wall_s"}


def plot_metrics(workdir: Path, log_x: bool = False) -> list[Path]:
  """Writes `<metric>.png` for each metric in metrics.jsonl; returns the paths."""
  workdir = Path(workdir)
  series = defaultdict(lambda: defaultdict(list))  # metric -> split -> [(step, value)]
  for row in read_metrics(workdir / "metrics.jsonl"):
    for key, value in row.items():
      if key not in _NOT_PLOTTED and isinstance(value, (int, float)) and not isinstance(value, bool):
        series[key][row["split"]].append((row["step"], value))
  paths = []
  for metric, by_split in series.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, points in sorted(by_split.items()):
      steps, values = zip(*points)
      ax.plot(steps, values, label=split, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if log_x:
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{workdir.parent.name}: {metric}")
    fig.tight_layout()
    path = workdir / f"{metric}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_misclassified(images_N, labels_N: np.ndarray, predictions_N: np.ndarray, titles_N,
                       path: Path, *, what: str, count: int = 36, panel=(1.7, 1.9),
                       **imshow) -> None:
  """A grid of the first `count` examples whose prediction is wrong: `images_N[i]` drawn with
  `imshow`'s options, titled `titles_N[i]`."""
  wrong = np.flatnonzero(labels_N != predictions_N)[:count]
  cols = 6
  rows = max(1, -(-len(wrong) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * panel[0], rows * panel[1]), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, i in zip(axes.flat, wrong):
    ax.imshow(images_N[i], **imshow)
    ax.set_title(titles_N[i], fontsize=6)
  fig.suptitle(f"misclassified {what} ({len(wrong)} of {int((labels_N != predictions_N).sum())} "
               f"shown; true -> predicted)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
