"""`make speedrun`: wall time to nanoGPT's Shakespeare quality, this project's recipe against nanoGPT.

For each seed, one after the other in this process: nanoGPT's model and step in PyTorch
(benchmarks/torch_gpt.py, `gpt_shakespeare:baby`'s config, 2000 steps), then this project's
`gpt_shakespeare:speedrun` through its own sharded train step. Both draw training windows from
the same split; every `--snapshot-every` seconds of training wall time each side's model is
copied aside (the clock stops meanwhile), and afterwards every copy is scored on the same
validation windows (every `--stride`-th start, context 64; `benchmarks/val_loss_noise.py`).
The target is the PyTorch run's own all-window val loss at its step 2000; reported for each side
is the training wall time of the first copy at or below it, and `ratio` = ours / PyTorch.
Training wall time counts everything after the data is in memory: model init, compilation,
steps; not the scoring.

`--ablation` also trains, per seed, `baby` with the speedrun's changes added one at a time
(`experiments.gpt_shakespeare.SPEEDRUN_CHANGES`, the last row being the recipe itself), so the
table shows what each change is worth at this scale (median over seeds).

  make speedrun [ARGS="--seeds 0 1 2 --ablation --out DIR"]
  make speedrun ARGS="--tiny"      # seconds: a few steps per side, for tests

Results: benchmarks/results/speedrun.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


class Clock:
  """Training wall time, paused while a snapshot is taken."""

  def __init__(self):
    self.elapsed, self.since = 0.0, time.perf_counter()

  def now(self) -> float:
    return self.elapsed + time.perf_counter() - self.since

  def pause(self) -> float:
    self.elapsed = self.now()
    return self.elapsed

  def resume(self) -> None:
    self.since = time.perf_counter()


def train_pytorch(config, tokens: dict, snapshot_every: float) -> list[dict]:
  """nanoGPT's model and step for `config.steps`; snapshots: [{seconds, step, state}]."""
  import torch

  from benchmarks import torch_gpt
  from research.data.text import LMBatches

  m = config.model
  batches = LMBatches(tokens["train"], m.block_size, config.batch_size, config.seed)
  clock = Clock()
  torch.manual_seed(config.seed)
  model = torch_gpt.GPT(int(tokens["vocab_size"]), m.block_size, m.num_layers, m.num_heads,
                        m.embed_dim)
  optimizer, lr_at = torch_gpt.make_optimizer(model, config)
  snapshots, next_at = [], snapshot_every
  for step in range(1, config.steps + 1):
    batch = batches(step - 1)
    torch_gpt.train_step(model, optimizer, lr_at(step - 1),
                         torch.from_numpy(batch["inputs"]).long(),
                         torch.from_numpy(batch["targets"]).long(), config.grad_clip)
    if clock.now() >= next_at or step == config.steps:
      seconds = clock.pause()
      snapshots.append({"seconds": seconds, "step": step,
                        "state": {k: v.clone() for k, v in model.state_dict().items()}})
      next_at = seconds + snapshot_every
      clock.resume()
  snapshots[-1]["model"] = model
  return snapshots


def train_jax(config, snapshot_every: float) -> list[dict]:
  """The project's loop setup and sharded train step; snapshots of the parameters it evaluates
  (schedule-free AdamW: the average) as host arrays: [{seconds, step, params, rest}]."""
  import jax

  import experiments
  from research import sharding
  from research.train import loop

  task = experiments.load("gpt_shakespeare").build(config)  # reads the data: not timed
  clock = Clock()
  with tempfile.TemporaryDirectory() as tmp:
    config.workdir = tmp
    run = loop.setup(task, config, experiment="gpt_shakespeare:speedrun")
    snapshots, next_at = [], snapshot_every
    for step in range(1, config.steps + 1):
      batch = sharding.global_batch(task.train_data(step - 1), run.mesh)
      run.state, _ = run.train_step(run.state, batch)
      if clock.now() >= next_at or step == config.steps:
        jax.block_until_ready(run.state)
        seconds = clock.pause()
        evaluated = jax.device_get(run.evaluated_state())
        snapshots.append({"seconds": seconds, "step": step, "params": evaluated.params,
                          "rest": evaluated.rest})
        next_at = seconds + snapshot_every
        clock.resume()
    snapshots[-1]["graphdef"] = run.graphdef
    run.close()
  return snapshots


def pytorch_scorer(snapshots: list[dict], val: np.ndarray, context: int, stride: int):
  from benchmarks.val_loss_noise import torch_loss_fn, window_losses

  model = snapshots[-1]["model"]

  def score(snapshot: dict) -> float:
    model.load_state_dict(snapshot["state"])
    return float(window_losses(torch_loss_fn(model), val, context, stride=stride).mean())

  return score


def jax_scorer(snapshots: list[dict], val: np.ndarray, context: int, stride: int):
  import jax
  import optax
  from flax import nnx

  from benchmarks.val_loss_noise import window_losses

  graphdef = snapshots[-1]["graphdef"]

  @jax.jit
  def loss_N(params, rest, inputs_NxT, targets_NxT):
    logits_NxTxV = nnx.merge(graphdef, params, rest)(inputs_NxT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_NxTxV, targets_NxT).mean(-1)

  def score(snapshot: dict) -> float:
    loss_fn = lambda inputs, targets: loss_N(snapshot["params"], snapshot["rest"], inputs, targets)
    return float(window_losses(loss_fn, val, context, stride=stride).mean())

  return score


def time_to_target(snapshots: list[dict], score, target: float | None = None,
                   every: int = 0) -> tuple[float | None, float]:
  """(training seconds of the first snapshot whose val loss is at or below `target`, target).

  Scoring a snapshot costs seconds, so not all are scored: the last (whose loss is the target
  when `target` is None), every `every`-th for the curve (none if 0), then a bisection between
  the last scored snapshot above the target and the first at or below it, which assumes the
  loss does not dip under the target and back between two scored snapshots. Scored snapshots
  get a `val_loss`."""
  def loss(i: int) -> float:
    if "val_loss" not in snapshots[i]:
      snapshots[i]["val_loss"] = score(snapshots[i])
    return snapshots[i]["val_loss"]

  last = len(snapshots) - 1
  target = loss(last) if target is None else target
  coarse = sorted({*range(0, last, every), last}) if every else [last]
  first = next((i for i, value in zip(coarse, [loss(i) for i in coarse]) if value <= target), None)
  if first is None:
    return None, target
  above, below = max((i for i in coarse if i < first), default=-1), first
  while below - above > 1:
    middle = (above + below) // 2
    if loss(middle) <= target:
      below = middle
    else:
      above = middle
  return snapshots[below]["seconds"], target


def curve(snapshots: list[dict]) -> list[tuple[float, float]]:
  return [(s["seconds"], s["val_loss"]) for s in snapshots if "val_loss" in s]


def configs(tiny: bool, ablation: bool) -> tuple[object, list[tuple[str, object]]]:
  """nanoGPT's (`baby`) config for PyTorch, and the project's runs: [(label, config)]."""
  import experiments
  from experiments.gpt_shakespeare import SPEEDRUN_CHANGES
  from research import config as config_lib

  def make(variant: str, overrides=()):
    c = config_lib.apply_overrides(experiments.get_config(f"gpt_shakespeare:{variant}"),
                                   list(overrides))
    c.progress_bar = False
    if tiny:  # a few steps of the same models, checkpointing and evaluation out of the way
      c.steps = c.eval_every = c.checkpoint_every = c.log_every = 6
      c.warmup_steps = 2
    return c

  runs = []
  if ablation:
    runs.append(("baby", make("baby")))
    changed = []
    for label, overrides in SPEEDRUN_CHANGES[:-1]:
      changed += overrides
      runs.append((f"+ {label}", make("baby", changed)))
  runs.append(("speedrun", make("speedrun")))
  return make("baby"), runs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--ablation", action="store_true",
                      help="also train baby with the speedrun's changes added one at a time")
  parser.add_argument("--snapshot-every", type=float, default=1.0, help="seconds of training")
  parser.add_argument("--stride", type=int, default=16, help="score every stride-th window")
  parser.add_argument("--curve-every", type=int, default=4,
                      help="score every n-th snapshot of nanoGPT and the recipe for the plot")
  parser.add_argument("--tiny", action="store_true", help="a few steps per side (tests)")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)

  from research import sharding
  from research.tasks.language_model import load_char_data

  torch_config, runs = configs(args.tiny, args.ablation)
  sharding.split_cpu_into_devices(*(c.batch_size for _, c in runs))
  tokenizer, tokens = load_char_data(torch_config)
  tokens["vocab_size"] = tokenizer.vocab_size
  context = torch_config.model.block_size
  if any(c.model.block_size != context for _, c in runs):
    raise SystemExit("error: every run is scored on windows of the same context")
  started = time.perf_counter()
  rows, curves = [], {}
  for seed in args.seeds:
    torch_config.seed = seed
    snaps = train_pytorch(torch_config, tokens, args.snapshot_every)
    score = pytorch_scorer(snaps, tokens["val"], context, args.stride)
    pytorch_seconds, target = time_to_target(snaps, score, every=args.curve_every)
    curves[f"pytorch/{seed}"] = curve(snaps)
    rows.append({"run": "pytorch", "seed": seed, "target": target,
                 "seconds_to_target": pytorch_seconds, "final_val_loss": target,
                 "steps": torch_config.steps, "train_seconds": snaps[-1]["seconds"]})
    print(json.dumps(rows[-1]), flush=True)
    for label, config in runs:
      config.seed = seed
      snaps = train_jax(config, args.snapshot_every)
      score = jax_scorer(snaps, tokens["val"], context, args.stride)
      seconds, _ = time_to_target(snaps, score, target,
                                  every=args.curve_every if label == "speedrun" else 0)
      curves[f"{label}/{seed}"] = curve(snaps)
      rows.append({"run": label, "seed": seed, "target": target, "seconds_to_target": seconds,
                   "final_val_loss": snaps[-1]["val_loss"], "steps": config.steps,
                   "train_seconds": snaps[-1]["seconds"],
                   "ratio": None if seconds is None else seconds / pytorch_seconds})
      print(json.dumps(rows[-1]), flush=True)
  report(args, rows, curves, [label for label, _ in runs], time.perf_counter() - started, argv)
  return 0


def _median(values: list) -> float | None:
  """Median where a run that never reached the target counts as infinitely slow."""
  if not values:
    return None
  m = statistics.median([float("inf") if v is None else v for v in values])
  return None if m == float("inf") else m


def report(args, rows: list[dict], curves: dict, labels: list[str], seconds: float,
           argv) -> None:
  import jax
  import torch

  from benchmarks.gpt_vs_pytorch import _cpu_name
  from experiments.gpt_shakespeare import SPEEDRUN_CHANGES

  stamp = time.strftime("%Y-%m-%d")
  machine = f"{_cpu_name()}, {len(os.sched_getaffinity(0))} cores, {jax.device_count()} JAX device(s)"
  versions = f"jax {jax.__version__}, torch {torch.__version__}"
  given = argv if argv is not None else sys.argv[1:]
  command = "python -m benchmarks.speedrun " + " ".join(given)

  def seconds_of(run):
    return [r["seconds_to_target"] for r in rows if r["run"] == run]

  summary = {run: {"median_seconds_to_target": _median(seconds_of(run)),
                   "median_ratio": _median([r["ratio"] for r in rows if r["run"] == run])}
             for run in labels}
  summary["pytorch"] = {"median_seconds_to_target": _median(seconds_of("pytorch"))}
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "speedrun.json").write_text(json.dumps(
      {"date": stamp, "machine": machine, "versions": versions, "command": command,
       "ratio": summary["speedrun"]["median_ratio"], "summary": summary, "rows": rows,
       "curves": curves}, indent=2) + "\n")

  def fmt(value, unit=" s", digits=1):
    return "not reached" if value is None else f"{value:.{digits}f}{unit}"

  lines = [f"# Speedrun: wall time to nanoGPT's Shakespeare quality ({stamp})", "",
           f"`{command}` ({seconds / 60:.0f} min) on {machine}; {versions}. Target: the "
           "PyTorch run's all-window val loss at its step 2000 (same seed); val loss scored on "
           f"every {args.stride}th validation window; times are training wall time "
           "(compilation included).", "",
           "| seed | target | nanoGPT (PyTorch) | speedrun | ratio |", "|---|---|---|---|---|"]
  for seed in args.seeds:
    ours = next(r for r in rows if r["run"] == "speedrun" and r["seed"] == seed)
    lines.append(f"| {seed} | {ours['target']:.4f} | "
                 f"{fmt(next(r for r in rows if r['run'] == 'pytorch' and r['seed'] == seed)['seconds_to_target'])} | "
                 f"{fmt(ours['seconds_to_target'])} | {fmt(ours['ratio'], 'x', 2)} |")
  lines += ["", f"Median ratio (ours / PyTorch): **{fmt(summary['speedrun']['median_ratio'], 'x', 2)}**."]
  if len(labels) > 1:
    lines += ["", "## Ablation: the speedrun's changes added one at a time to `baby`", "",
              "| changes so far | steps | median time to target | median ratio | median final val loss |",
              "|---|---|---|---|---|"]
    lines.append(f"| nanoGPT (PyTorch) | {rows[0]['steps']} | "
                 f"{fmt(summary['pytorch']['median_seconds_to_target'])} | 1.00x | "
                 f"{statistics.median(r['final_val_loss'] for r in rows if r['run'] == 'pytorch'):.4f} |")
    for label in labels:
      runs = [r for r in rows if r["run"] == label]
      name = f"+ {SPEEDRUN_CHANGES[-1][0]} (= speedrun)" if label == "speedrun" else label
      lines.append(f"| {name} | {runs[0]['steps']} | "
                   f"{fmt(summary[label]['median_seconds_to_target'])} | "
                   f"{fmt(summary[label]['median_ratio'], 'x', 2)} | "
                   f"{statistics.median(r['final_val_loss'] for r in runs):.4f} |")
  (args.out / "speedrun.md").write_text("\n".join(lines) + "\n")
  _plot(curves, rows, args.out / "speedrun.png")
  print("\n".join(lines))


def _plot(curves: dict, rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {}
  for name, points in curves.items():
    run = name.split("/")[0]
    if run not in ("pytorch", "speedrun"):
      continue
    line, = ax.plot(*zip(*points), marker="o", markersize=2, linewidth=1, color=colors.get(run),
                    label=None if run in colors else {"pytorch": "nanoGPT (PyTorch)"}.get(run, run))
    colors[run] = line.get_color()
  targets = [r["target"] for r in rows if r["run"] == "pytorch"]
  ax.axhline(statistics.mean(targets), color="gray", linestyle="--", linewidth=1,
             label="target (mean over seeds)")
  ax.set_xlabel("training wall time (s)")
  ax.set_ylabel("all-window validation loss")
  ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
  ax.set_title("gpt_shakespeare: time to nanoGPT's quality on a 2-core CPU")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())
