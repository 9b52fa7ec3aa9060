"""Helpers for experiments made of several runs of other experiments (`run(config)` modules).

Each sub-run is an ordinary run of a single-run experiment (its own folder, config.json,
checkpoints, metrics, model.json), so it resumes, and `research.load.load_model` and
`research.interpret` work on it. A sub-run that already reached its steps is read back, not
trained again.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from research.evaluate.writer import read_metrics


def derive(config: ml_collections.ConfigDict, spec: str, **fields) -> ml_collections.ConfigDict:
  """The config of experiment `spec` with the fields it shares with `config` copied over, then
  `fields` (a dict value updates that section)."""
  import experiments

  sub = experiments.get_config(spec)
  unknown = sorted(set(fields) - set(sub))
  if unknown:
    raise ValueError(f"{spec} has no config fields {unknown}")

  def copy(dst, src):
    for key in dst:
      if key not in src:
        continue
      if isinstance(dst[key], ml_collections.ConfigDict):
        if isinstance(src[key], (dict, ml_collections.ConfigDict)):
          copy(dst[key], src[key])
      else:
        dst[key] = src[key]

  copy(sub, config)
  # The optimizer is taken whole: another name has other fields.
  sub.optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
  copy(sub, fields)
  return sub


def finished_metrics(config) -> list[dict] | None:
  """The metrics of the run in config.workdir if it has been evaluated at config.steps."""
  rows = read_metrics(Path(config.workdir) / "metrics.jsonl")
  done = any(r["step"] == config.steps and r["split"] != "train" for r in rows)
  return rows if done else None


def train_or_read(spec: str, config, *, finish: bool = True) -> list[dict]:
  """Trains `config` as a run of experiment `spec` (resuming its workdir) unless it is already
  finished; returns its metrics.jsonl rows."""
  import experiments
  from research.train import loop

  rows = finished_metrics(config)
  if rows is not None:
    print(f"{config.workdir}: finished earlier; skipped")
    return rows
  name, _ = experiments.parse_name(spec)
  task = experiments.load(name).build(config)
  if not finish:
    task.finish = None
  loop.train(task, config, experiment=spec)
  return read_metrics(Path(config.workdir) / "metrics.jsonl")


def write_config(config, spec: str) -> None:
  """The multi-run folder's own config.json (its sub-runs hold theirs)."""
  import json

  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(
      json.dumps({"experiment": spec, **config.to_dict()}, indent=2, sort_keys=True) + "\n")
