"""`make bench`: this codebase's gpt_shakespeare:baby against the same model and step in PyTorch.

Both train the same GPT (4 layers, 4 heads, width 128, context 64, batch 12, AdamW, clip 1.0,
warmup + cosine) on the same batches of Tiny Shakespeare, one after the other on this
machine, and are evaluated on the same 20 validation batches every `--eval-every` steps.
Reported: median milliseconds per training step and tokens/s (evaluation excluded), their
ratio, and the training wall time each needs to first reach `--target` validation loss.

  python -m benchmarks.gpt_vs_pytorch [--steps 2000] [--eval-every 100] [--target 1.886]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import experiments
from research import config as config_lib
from research import sharding
from research.data.text import LMBatches
from research.evaluate.writer import read_metrics
from research.train import loop

RESULTS = Path(__file__).resolve().parent / "results"


def run_jax(config) -> dict:
  """Trains with the project's own loop; times come from its metrics.jsonl."""
  task = experiments.load("gpt_shakespeare").build(config)
  loop.train(task, config, experiment="gpt_shakespeare:baby")
  rows = read_metrics(Path(config.workdir) / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train" and "step_time_ms" in r]
  # Each train line's step_time_ms covers the steps since the previous line (eval excluded).
  elapsed, previous, clock = {}, 1, 0.0  # step 1 compiles and is not timed
  for r in train:
    clock += r["step_time_ms"] / 1000 * (r["step"] - previous)
    elapsed[r["step"]], previous = clock, r["step"]
  val = [(r["step"], r["loss"]) for r in rows if r["split"] == "val"]
  return {"step_ms": [r["step_time_ms"] for r in train], "val": val,
          "seconds_at": {s: elapsed[s] for s, _ in val}}


def run_torch(config, tokens: dict[str, np.ndarray]) -> dict:
  import torch

  from benchmarks import torch_gpt

  torch.manual_seed(config.seed)
  m = config.model
  model = torch_gpt.GPT(int(tokens["vocab_size"]), m.block_size, m.num_layers, m.num_heads,
                        m.embed_dim)
  optimizer, lr_at = torch_gpt.make_optimizer(model, config)
  train = LMBatches(tokens["train"], m.block_size, config.batch_size, config.seed)
  val = LMBatches(tokens["val"], m.block_size, config.batch_size, seed=10_000 + config.seed)
  val_batches = [val(i) for i in range(config.eval_batches)]
  step_ms, val_curve, seconds_at, clock = [], [], {}, 0.0
  for step in range(1, config.steps + 1):
    batch = train(step - 1)
    start = time.perf_counter()
    torch_gpt.train_step(model, optimizer, lr_at(step - 1), torch.from_numpy(batch["inputs"]).long(),
                         torch.from_numpy(batch["targets"]).long(), config.grad_clip)
    seconds = time.perf_counter() - start
    if step > 1:  # as for JAX, the first step is warm-up
      step_ms.append(1000 * seconds)
      clock += seconds
    if step % config.eval_every == 0 or step == config.steps:
      val_curve.append((step, torch_gpt.eval_loss(model, val_batches)))
      seconds_at[step] = clock
  return {"step_ms": step_ms, "val": val_curve, "seconds_at": seconds_at, "model": model}


def time_to(result: dict, target: float) -> float | None:
  return next((result["seconds_at"][s] for s, loss in result["val"] if loss <= target), None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--target", type=float, default=1.886)
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)

  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:baby"), [
      f"--config.steps={args.steps}", f"--config.eval_every={args.eval_every}",
      f"--config.checkpoint_every={args.steps}", "--config.progress_bar=false"])
  sharding.split_cpu_into_devices(config.batch_size)  # as `python -m experiments` does
  from research.tasks.language_model import load_char_data
  tokenizer, tokens = load_char_data(config)
  tokens["vocab_size"] = tokenizer.vocab_size

  with tempfile.TemporaryDirectory() as tmp:
    config.workdir = tmp
    results = {"jax": run_jax(config)}
  results["pytorch"] = run_torch(config, tokens)

  import torch
  tokens_per_step = config.batch_size * config.model.block_size
  summary = {}
  for name, r in results.items():
    ms = statistics.median(r["step_ms"])
    summary[name] = {"median_step_ms": ms, "tokens_per_second": tokens_per_step / (ms / 1000),
                     "final_val_loss": r["val"][-1][1],
                     "seconds_to_target": time_to(r, args.target),
                     "train_seconds": r["seconds_at"][max(r["seconds_at"])]}
  speedup = summary["jax"]["tokens_per_second"] / summary["pytorch"]["tokens_per_second"]
  stamp = time.strftime("%Y-%m-%d")
  machine = f"{_cpu_name()}, {os.cpu_count()} cores, {jax.device_count()} JAX device(s)"
  versions = f"jax {jax.__version__}, torch {torch.__version__}"
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "gpt_vs_pytorch.json").write_text(json.dumps(
      {"date": stamp, "machine": machine, "versions": versions, "args": vars(args) | {"out": str(args.out)},
       "summary": summary, "speedup": speedup, "curves": {k: v["val"] for k, v in results.items()}},
      indent=2) + "\n")

  def fmt(seconds):
    return "not reached" if seconds is None else f"{seconds:.1f} s"

  lines = [f"# gpt_shakespeare:baby, JAX vs PyTorch ({stamp})", "",
           f"`make bench` (= `python -m benchmarks.gpt_vs_pytorch --steps {args.steps} "
           f"--eval-every {args.eval_every} --target {args.target}`) on {machine}; {versions}; "
           f"{config.model.num_layers} layers, width {config.model.embed_dim}, context "
           f"{config.model.block_size}, batch {config.batch_size}, fp32.", "",
           "| | median ms/step | tokens/s | val loss at the end | train time to val loss "
           f"{args.target} | train time, all {args.steps} steps |", "|---|---|---|---|---|---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {s['median_step_ms']:.1f} | {s['tokens_per_second']:,.0f} | "
                 f"{s['final_val_loss']:.4f} | {fmt(s['seconds_to_target'])} | "
                 f"{s['train_seconds']:.1f} s |")
  lines += ["", f"JAX / PyTorch tokens/s: **{speedup:.2f}x**."]
  (args.out / "gpt_vs_pytorch.md").write_text("\n".join(lines) + "\n")
  _plot(results, args.target, args.out / "gpt_vs_pytorch.png")
  print("\n".join(lines))
  return 0


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _plot(results: dict, target: float, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    ax.plot([r["seconds_at"][s] for s, _ in r["val"]], [l for _, l in r["val"]], marker="o",
            markersize=3, label=name)
  ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"val loss {target}")
  ax.set_xlabel("training wall time (s)")
  ax.set_ylabel("validation loss")
  ax.set_title("gpt_shakespeare:baby on a 2-core CPU")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())
