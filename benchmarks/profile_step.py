"""Where a gpt_shakespeare training step spends its time: a jax.profiler trace, summed per op.

  python -m benchmarks.profile_step [--variant baby] [--calls 10] [--top 25]

Times `jax.jit(jax.grad(loss))` of the experiment's GPT on random tokens (forward only and
forward + backward, medians), then traces `--calls` calls and prints the device time per HLO
op and per op kind (fusion names without their number), as used for
benchmarks/results/cpu_step_profile.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import experiments
from research.models.gpt import GPT, GPTConfig
from research.tasks.language_model import next_token_loss

_HOST_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")


def _median_ms(fn, *args, calls: int = 40) -> float:
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1000 * (time.perf_counter() - start))
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="baby")
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)

  config = experiments.get_config(f"gpt_shakespeare:{args.variant}")
  m = config.model
  model = GPT(GPTConfig(vocab_size=65, block_size=m.block_size, num_layers=m.num_layers,
                        num_heads=m.num_heads, embed_dim=m.embed_dim), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens_BxT = np.random.default_rng(0).integers(0, 65, (config.batch_size, m.block_size))
  batch = {"inputs": tokens_BxT.astype(np.int32), "targets": tokens_BxT.astype(np.int32)}

  def loss(params):
    return next_token_loss(nnx.merge(graphdef, params, rest), batch, None)[0]

  grad = jax.jit(jax.grad(loss))
  print(f"forward {_median_ms(jax.jit(loss), params):.1f} ms, "
        f"forward + backward {_median_ms(grad, params):.1f} ms (medians)")

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.calls):
      jax.block_until_ready(grad(params))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]

  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_HOST_EVENTS):
      per_op[e["name"]] += e.get("dur", 0) / 1000 / args.calls
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[re.sub(r"\.\d+$", "", name)] += ms
  print(f"\ntraced op time per call: {sum(per_op.values()):.1f} ms\n\nby kind:")
  for name, ms in per_kind.most_common(args.top):
    print(f"  {ms:7.2f} ms  {name}")
  print("\nlargest ops:")
  for name, ms in per_op.most_common(args.top):
    print(f"  {ms:7.2f} ms  {name}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
