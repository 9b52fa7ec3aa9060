"""`make bench-mfu`: model FLOPs utilization of a GPT training step on this machine's devices.

  python -m benchmarks.mfu [--size gpt2-small] [--batch 16] [--steps 30] [--dtype bfloat16]
                           [--attention auto] [--parallelism dp] [--out benchmarks/results]

Trains on random tokens (nothing to download) with the project's own sharded train step over
all devices, and reports the median ms per step, tokens/s and MFU = FLOPs per token x tokens/s
/ (peak FLOP/s x devices), with FLOPs per token from the model's `flops_per_token` (the formula
of `research.flops`; a test checks it against XLA's cost analysis) and the peak from its table by device kind. CPUs have no
peak in the table: MFU is then left out. `gpt2-small` is 12 layers, width 768, context 1024
and GPT-2's 50,304-token (padded) vocabulary: the size of issue 4's accelerator target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax

from research import flops, sharding
from research.models.gpt import GPT, GPTConfig
from research.train import optim
from research.train.step import init_state, make_train_step

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "gpt2-small": dict(num_layers=12, num_heads=12, embed_dim=768, block_size=1024,
                       vocab_size=50304),
    "tiny": dict(num_layers=2, num_heads=2, embed_dim=32, block_size=16, vocab_size=64),
}


class _Fields(dict):
  """The config fields `optim.make_optimizer` reads, as a dict with attribute access: this
  entry point avoids `research.config` (ml_collections) and the task modules that import it, so
  it runs on an accelerator image without them (tests/kernels/test_dispatch_lowering.py)."""
  __getattr__ = dict.__getitem__


def next_token_loss(model, batch, rngs=None):
  """`research.tasks.language_model.next_token_loss`, which this module cannot import (above)."""
  logits_BxTxV = model(batch["inputs"], rngs=rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), batch["targets"]).mean()
  return loss, {"loss": loss}


def measure(size: str, *, batch: int, steps: int, dtype: str, attention: str,
            parallelism: str) -> dict:
  """Median step time, tokens/s and MFU of `steps` timed training steps (after 3 warm-up)."""
  shape = SIZES[size]
  config = _Fields(steps=steps, learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=10,
                   decay_steps=0, schedule="cosine", grad_clip=1.0,
                   optimizer=dict(optim.optimizer_fields("adamw"), b1=0.9, b2=0.95,
                                  weight_decay=0.1))
  mesh = sharding.make_mesh()
  if batch % mesh.size:
    raise ValueError(f"--batch {batch} is not divisible by the {mesh.size} devices")
  model = GPT(GPTConfig(**shape, attention=attention, dtype=dtype), rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(config)
  graphdef, host_state = init_state(model, tx)
  state_sharding = sharding.state_shardings(host_state, mesh, parallelism)
  state = jax.device_put(host_state, state_sharding)
  del host_state
  flops_per_token = model.flops_per_token(shape["block_size"])
  del model
  train_step = make_train_step(graphdef, next_token_loss, tx, mesh=mesh,
                               state_sharding=state_sharding, parallelism=parallelism, seed=0)
  rng = np.random.default_rng(0)

  def batch_at():
    tokens = rng.integers(0, shape["vocab_size"], (batch, shape["block_size"] + 1), np.int32)
    return sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)

  batches = [batch_at() for _ in range(4)]  # made once: the step, not the host, is timed
  step_ms = []
  for i in range(3 + steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    if i >= 3:
      step_ms.append(1000 * (time.perf_counter() - start))
  ms = statistics.median(step_ms)
  tokens_per_second = batch * shape["block_size"] / (ms / 1000)
  peak = flops.device_peak_flops(jax.devices()[0], dtype)
  return {"size": size, **shape, "batch": batch, "dtype": dtype, "attention": attention,
          "parallelism": parallelism, "devices": mesh.size,
          "device_kind": jax.devices()[0].device_kind, "median_step_ms": ms,
          "tokens_per_second": tokens_per_second, "flops_per_token": flops_per_token,
          "peak_flops_per_device": peak,
          "mfu": flops_per_token * tokens_per_second / (peak * mesh.size) if peak else None,
          "final_loss": float(metrics["loss"])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
  parser.add_argument("--batch", type=int, default=16, help="sequences per step, all devices")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--parallelism", choices=("dp", "fsdp"), default="dp")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  try:
    result = measure(args.size, batch=args.batch, steps=args.steps, dtype=args.dtype,
                     attention=args.attention, parallelism=args.parallelism)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stamp = time.strftime("%Y-%m-%d")
  command = ("python -m benchmarks.mfu " + " ".join(
      f"--{k} {v}" for k, v in vars(args).items() if k != "out"))
  name = f"mfu_{args.size}_{result['device_kind'].replace(' ', '_')}"
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{name}.json").write_text(
      json.dumps({"date": stamp, "command": command, "jax": jax.__version__, **result},
                 indent=2) + "\n")
  mfu = "n/a (no peak for this device)" if result["mfu"] is None else f"**{result['mfu']:.1%}**"
  lines = [f"# MFU, {args.size} on {result['devices']} x {result['device_kind']} ({stamp})", "",
           f"`{command}`; jax {jax.__version__}.", "",
           "| median ms/step | tokens/s | FLOPs/token | MFU |", "|---|---|---|---|",
           f"| {result['median_step_ms']:.1f} | {result['tokens_per_second']:,.0f} | "
           f"{result['flops_per_token']:.3g} | {mfu} |"]
  (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
