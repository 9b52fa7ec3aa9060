"""Transformer vs LSTM: char-level language models with equal parameters, data and time.

A GPT and an LSTM of 0.80M parameters each, with the same data and optimizer, each trained for
the same wall-clock budget on Tiny Shakespeare.

Command:  make experiment NAME=transformer_vs_lstm ARGS=--config.workdir=runs/transformer_vs_lstm
          ... --config.budget_seconds=600                 (a longer race)
          make experiment NAME=transformer_vs_lstm:tiny   (seconds; for tests)
Expected: both models have 0.80M parameters (gpt_shakespeare:baby and lstm_shakespeare:baby).
          A short calibration run measures each model's step time on this machine; each then
          trains for budget_seconds / step time steps (training time only: evaluations and
          compilation are not counted). `comparison.png` plots val bits per character against
          training wall time for both; `comparison.json` holds the numbers. The outcome depends
          on the machine: the GPT's steps parallelize over the sequence, the LSTM's do not.
Runtime:  about 2 x budget_seconds (default 180 s) plus 2 minutes, on a 2-core CPU.
Data:     tfds `tiny_shakespeare` (or --config.data.text_file=PATH).
Design:   the runs are `<workdir>/gpt` (a gpt_shakespeare run) and `<workdir>/lstm` (an
          lstm_shakespeare run); `plan.json` keeps the measured step times and step counts so a
          rerun of the same command resumes with the same plan. config.steps caps each model's
          steps.
"""

import json
import math
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import _multirun
from research import config as config_lib
from research.load import load_model

VARIANTS = ("default", "tiny")
MODELS = {"gpt": "gpt_shakespeare:baby", "lstm": "lstm_shakespeare:baby"}


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  import experiments

  c = config_lib.base()
  c.data = dict(dataset="tiny_shakespeare", manual_dir="", text_file="")
  # config.model.<name>: the model sections of the two baby experiments, 0.80M parameters
  # each (the GPT's block_size is `context`).
  gpt = experiments.get_config("gpt_shakespeare:baby").model.to_dict()
  del gpt["block_size"]
  c.model = dict(gpt=gpt, lstm=experiments.get_config("lstm_shakespeare:baby").model)
  c.context = 64
  c.budget_seconds = 180.0
  c.calibration_steps = 40
  c.sample = dict(prompt="\n", num_tokens=500, count=3, temperature=0.8, top_k=200)
  c.eval_batches = 20
  c.update(steps=1_000_000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, log_every=10)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.99, weight_decay=0.1)
  if variant == "tiny":
    c.model.gpt.update(num_layers=1, num_heads=2, embed_dim=32)
    c.model.lstm.update(num_layers=1, embed_dim=16, hidden_dim=32)
    c.context = 16
    c.budget_seconds = 2.0
    c.calibration_steps = 12
    c.eval_batches = 2
    c.sample.update(num_tokens=24, count=1)
    c.update(steps=20, batch_size=8, warmup_steps=2, log_every=4)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def _sub_config(config, name: str, workdir: Path, steps: int):
  evals = 20  # points on each curve
  model = config.model[name].to_dict()
  if name == "gpt":
    model["block_size"] = config.context
  return _multirun.derive(
      config, MODELS[name], workdir=str(workdir), steps=steps, model=model,
      eval_every=max(1, steps // evals), checkpoint_every=max(1, steps // 4))


def _calibrate(config, name: str, workdir: Path) -> tuple[float, int]:
  """Median seconds per train step of model `name` and its parameter count, from a short run
  (deleted afterwards)."""
  sub = _sub_config(config, name, workdir, config.calibration_steps)
  sub.update(log_every=max(1, config.calibration_steps // 4), eval_every=config.calibration_steps,
             eval_batches=1, checkpoint_every=config.calibration_steps)
  rows = _multirun.train_or_read(MODELS[name], sub, finish=False)
  model, _, _ = load_model(workdir)
  shutil.rmtree(workdir)
  seconds = float(np.median([r["step_time_ms"] for r in rows
                             if r["split"] == "train" and "step_time_ms" in r])) / 1000
  return seconds, sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def training_time(rows: list[dict]) -> dict[int, float]:
  """Seconds of training (step times, not evaluation) up to each logged step."""
  seconds, last, clock = 0.0, 0, {}
  for r in rows:
    if r["split"] == "train" and r.get("step_time_ms") is not None:
      seconds += r["step_time_ms"] / 1000 * (r["step"] - last)
      last = r["step"]
      clock[r["step"]] = seconds
  return clock


def run(config, *, experiment: str) -> dict[str, dict]:
  workdir = Path(config.workdir)
  _multirun.write_config(config, experiment)
  plan_path = workdir / "plan.json"
  plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
  results, curves = {}, {}
  for name in MODELS:
    if name not in plan:
      seconds, params = _calibrate(config, name, workdir / f"calibrate_{name}")
      steps = min(config.steps, max(1, int(config.budget_seconds / seconds)))
      plan[name] = {"step_time_ms": 1000 * seconds, "steps": steps, "params": params}
      plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    print(f"transformer_vs_lstm: {name}: {plan[name]['params']:,} parameters, "
          f"{plan[name]['steps']} steps of {plan[name]['step_time_ms']:.1f} ms")
    sub = _sub_config(config, name, workdir / name, plan[name]["steps"])
    rows = _multirun.train_or_read(MODELS[name], sub)
    clock = training_time(rows)
    val = [r for r in rows if r["split"] == "val"]
    # An evaluation happens right after a logged step, so its time is that step's.
    curves[name] = [(clock[max(s for s in clock if s <= r["step"])], r["loss"] / math.log(2))
                    for r in val if any(s <= r["step"] for s in clock)]
    results[name] = {"params": plan[name]["params"], "steps": plan[name]["steps"],
                     "train_seconds": curves[name][-1][0],
                     "val_bits_per_char": val[-1]["loss"] / math.log(2)}
  # The plan's step counts come from a short calibration, so the runs' real training times
  # differ a little; compare both at the time the shorter one trained.
  common = min(r["train_seconds"] for r in results.values())
  for name, r in results.items():
    r["val_bits_per_char_at_common_seconds"] = next(
        (bpc for seconds, bpc in reversed(curves[name]) if seconds <= common + 1e-9), math.nan)
  (workdir / "comparison.json").write_text(json.dumps(
      {"budget_seconds": config.budget_seconds, "common_seconds": common, **results},
      indent=2) + "\n")
  _plot(curves, results, workdir / "comparison.png")
  print(f"comparison.json and comparison.png in {workdir}")
  return {name: {k: float(v) for k, v in r.items()} for name, r in results.items()}


def _plot(curves, results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, curve in curves.items():
    seconds, bpc = zip(*curve)
    r = results[name]
    ax.plot(seconds, bpc, marker="o", markersize=3,
            label=f"{name.upper()} ({r['params'] / 1e6:.2f}M params, {r['steps']} steps): "
                  f"{r['val_bits_per_char']:.3f} bpc")
  ax.set_xlabel("training wall time (s)")
  ax.set_ylabel("val bits per character")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("Tiny Shakespeare: Transformer vs LSTM, same parameters and time")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
