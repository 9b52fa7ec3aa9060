"""The run folder's metric streams: `metrics.jsonl` (one object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
  """Lines of a metrics.jsonl; a torn last line (a killed process) is ignored."""
  if not Path(path).exists():
    return []
  rows = []
  for line in Path(path).read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


class MetricWriter:
  """Writes `{"step", "split", **metrics}` lines; only process 0 of a run writes."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.path = Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops lines past `step`: a resumed run writes them again, identically."""
    if self.enabled and self.path.exists():
      kept = [r for r in read_metrics(self.path) if r["step"] <= step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in clean.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
    for k, v in clean.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tensorboard.add_scalar(f"{split}/{k}", v, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
