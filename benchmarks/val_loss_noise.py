"""How much of a logged validation loss is noise: gpt_shakespeare runs against their exact value.

A language model's logged val loss (here as in nanoGPT) is the mean over `eval_batches` x
`batch_size` random windows of the validation text: an estimate. This scores each finished
run's model on *every* window (the estimate's exact expectation), then resamples the estimate
to give its standard deviation and the chance that one draw lands at or below `--threshold`.
`--pytorch-seeds` also trains nanoGPT's model and step in PyTorch (benchmarks/torch_gpt.py,
as `make bench` does) on the same batches as the JAX run of that seed, and scores it the same
way, so the two implementations compare without the estimate's noise.

  make bench-noise ARGS="RUN [RUN ...] [--pytorch-seeds 0 1 2] [--threshold 1.89] [--stride 4]"

Results: benchmarks/results/val_loss_noise.{md,json}; see the README's language-model section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def window_losses(loss_fn, tokens: np.ndarray, context: int, *, stride: int = 1,
                  chunk: int = 2048) -> np.ndarray:
  """Mean next-token loss of each window tokens[s : s + context + 1], s = 0, stride, ...

  Covers every start `LMBatches` can draw, so with stride 1 the mean is the exact
  expectation of its estimate. `loss_fn(inputs_NxT, targets_NxT)` returns losses [N]."""
  starts = np.arange(0, len(tokens) - context, stride)
  losses = []
  for i in range(0, len(starts), chunk):
    windows_NxT1 = tokens[starts[i:i + chunk, None] + np.arange(context + 1)]
    losses.append(np.asarray(loss_fn(windows_NxT1[:, :-1], windows_NxT1[:, 1:]), np.float64))
  return np.concatenate(losses)


def estimate_spread(per_window: np.ndarray, windows: int, threshold: float, *,
                    draws: int = 4000, seed: int = 0) -> dict:
  """Distribution of the mean of `windows` windows drawn uniformly with replacement."""
  picks = np.random.default_rng(seed).integers(0, len(per_window), (draws, windows))
  estimates = per_window[picks].mean(axis=1)
  return {"estimate_sd": float(estimates.std()),
          "estimate_p5": float(np.percentile(estimates, 5)),
          "estimate_p95": float(np.percentile(estimates, 95)),
          "p_at_or_below_threshold": float((estimates <= threshold).mean())}


def jax_loss_fn(model):
  import jax
  import optax
  from flax import nnx

  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_N(state, inputs_NxT, targets_NxT):
    logits_NxTxV = nnx.merge(graphdef, state)(inputs_NxT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_NxTxV, targets_NxT).mean(-1)

  return lambda inputs, targets: loss_N(state, inputs, targets)


def torch_loss_fn(model):
  import torch
  import torch.nn.functional as F

  model.eval()

  def loss_N(inputs_NxT, targets_NxT):
    with torch.inference_mode():
      logits = model(torch.from_numpy(inputs_NxT).long())
      targets = torch.from_numpy(targets_NxT).long()
      return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(-1).numpy()

  return loss_N


def score_jax_run(workdir: str, stride: int, threshold: float) -> dict:
  from research.config import ConfigError
  from research.evaluate.writer import read_metrics
  from research.load import load_model
  from research.tasks.language_model import load_char_data

  model, _, config = load_model(workdir)
  spec = config.experiment
  if not spec.startswith("gpt_shakespeare"):
    raise ConfigError(f"{workdir} is a {spec} run; this reads gpt_shakespeare runs")
  logged = [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if r["split"] == "val"]
  if not logged:
    raise ConfigError(f"{workdir} has logged no validation loss yet")
  _, tokens = load_char_data(config)
  per_window = window_losses(jax_loss_fn(model), tokens["val"], config.model.block_size,
                             stride=stride)
  return {"implementation": "jax", "run": str(workdir), "seed": config.seed,
          "step": logged[-1]["step"], "logged_val_loss": logged[-1]["loss"],
          "all_windows_val_loss": float(per_window.mean()), "windows_scored": len(per_window),
          **estimate_spread(per_window, config.eval_batches * config.batch_size, threshold)}


def score_pytorch_seed(seed: int, stride: int, threshold: float) -> dict:
  import experiments
  from benchmarks.gpt_vs_pytorch import run_torch
  from research.tasks.language_model import load_char_data

  config = experiments.get_config("gpt_shakespeare:baby")
  config.seed = seed
  config.eval_every = config.steps  # the logged estimate: once, at the end
  tokenizer, tokens = load_char_data(config)
  tokens["vocab_size"] = tokenizer.vocab_size
  result = run_torch(config, tokens)
  per_window = window_losses(torch_loss_fn(result["model"]), tokens["val"],
                             config.model.block_size, stride=stride)
  return {"implementation": "pytorch", "run": "benchmarks/torch_gpt.py", "seed": seed,
          "step": config.steps, "logged_val_loss": result["val"][-1][1],
          "all_windows_val_loss": float(per_window.mean()), "windows_scored": len(per_window),
          **estimate_spread(per_window, config.eval_batches * config.batch_size, threshold)}


def _summary(rows: list[dict], implementation: str) -> str | None:
  losses = [r["all_windows_val_loss"] for r in rows if r["implementation"] == implementation]
  if not losses:
    return None
  spread = f", sd {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
  return (f"{implementation}: all-window val loss {statistics.mean(losses):.4f} over "
          f"{len(losses)} run(s){spread}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="*", help="gpt_shakespeare run folders (with checkpoints)")
  parser.add_argument("--pytorch-seeds", type=int, nargs="*", default=[])
  parser.add_argument("--threshold", type=float, default=1.89)
  parser.add_argument("--stride", type=int, default=1, help="score every stride-th window")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  if not args.runs and not args.pytorch_seeds:
    parser.error("give run folders, --pytorch-seeds, or both")
  if args.stride < 1:
    parser.error("--stride must be at least 1")

  from research.config import ConfigError
  started = time.perf_counter()
  rows = []
  try:
    for run in args.runs:
      rows.append(score_jax_run(run, args.stride, args.threshold))
      print(json.dumps(rows[-1]), flush=True)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for seed in args.pytorch_seeds:
    rows.append(score_pytorch_seed(seed, args.stride, args.threshold))
    print(json.dumps(rows[-1]), flush=True)

  stamp = time.strftime("%Y-%m-%d")
  every = "every start" if args.stride == 1 else f"every {args.stride}th start"
  given = argv if argv is not None else sys.argv[1:]
  command = "python -m benchmarks.val_loss_noise " + " ".join(given)
  lines = [f"# How noisy is the logged val loss of gpt_shakespeare ({stamp})", "",
           f"`{command}` ({time.perf_counter() - started:.0f} s). Logged: the run's own estimate "
           f"(mean over its random validation windows). All-window: mean over "
           f"{rows[0]['windows_scored']:,} windows ({every}). The estimate's "
           f"sd and 5–95% range come from resampling its windows; last column: the chance that "
           f"one estimate of that model is ≤ {args.threshold}.", "",
           "| implementation | seed | step | logged val loss | all-window val loss | estimate sd | "
           f"estimate 5–95% | P(estimate ≤ {args.threshold}) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['implementation']} | {r['seed']} | {r['step']} | "
                 f"{r['logged_val_loss']:.4f} | {r['all_windows_val_loss']:.4f} | "
                 f"{r['estimate_sd']:.4f} | {r['estimate_p5']:.4f}–{r['estimate_p95']:.4f} | "
                 f"{r['p_at_or_below_threshold']:.0%} |")
  lines += [""] + [s for s in (_summary(rows, "jax"), _summary(rows, "pytorch")) if s]
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "val_loss_noise.md").write_text("\n".join(lines) + "\n")
  (args.out / "val_loss_noise.json").write_text(json.dumps(
      {"date": stamp, "command": command, "rows": rows}, indent=2) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
