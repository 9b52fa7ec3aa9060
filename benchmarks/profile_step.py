"""Where a gpt_shakespeare training step spends its time: a jax.profiler trace, summed per op.

  python -m benchmarks.profile_step [--variant baby] [--train-step] [--calls 10] [--top 25]

Times `jax.jit(jax.grad(loss))` of the experiment's GPT on random tokens on one device
(forward only and forward + backward, medians), then traces `--calls` calls and prints the
device time per HLO op and per op kind (fusion names without their number). `--train-step`
does the same for the whole sharded train step (gradients, all-reduce, AdamW) over one XLA
device per core, as `python -m experiments` runs it; XLA_FLAGS in the environment apply, so
flags can be compared. As used for benchmarks/results/cpu_step_profile.md.
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
from research import sharding
from research.models.gpt import GPT, GPTConfig
from research.tasks.language_model import next_token_loss
from research.train import optim
from research.train.step import init_state, make_train_step

_HOST_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt", "Wait",
                "Rendezvous")


def _train_step_call(model, config, batch):
  """One call = one training step of the sharded train step, state carried between calls."""
  mesh = sharding.make_mesh()
  tx = optim.make_optimizer(config)
  graphdef, state = init_state(model, tx)
  shardings = sharding.state_shardings(state, mesh, config.parallelism)
  state = jax.device_put(state, shardings)
  step = make_train_step(graphdef, next_token_loss, tx, mesh=mesh, state_sharding=shardings,
                         parallelism=config.parallelism, seed=0)
  placed = sharding.global_batch(batch, mesh)

  def call():
    nonlocal state
    state, metrics = step(state, placed)
    return metrics

  return call


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
  parser.add_argument("--train-step", action="store_true",
                      help="the sharded train step over one device per core, not jax.grad")
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)

  config = experiments.get_config(f"gpt_shakespeare:{args.variant}")
  if args.train_step:
    sharding.split_cpu_into_devices(config.batch_size)  # before JAX first touches a device
  m = config.model
  model = GPT(GPTConfig(**m, vocab_size=65), rngs=nnx.Rngs(0))
  tokens_BxT = np.random.default_rng(0).integers(0, 65, (config.batch_size, m.block_size))
  batch = {"inputs": tokens_BxT.astype(np.int32), "targets": tokens_BxT.astype(np.int32)}

  if args.train_step:
    call = _train_step_call(model, config, batch)
    print(f"train step {_median_ms(call, calls=200):.1f} ms (median of 200) on "
          f"{jax.device_count()} device(s)")
  else:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      return next_token_loss(nnx.merge(graphdef, params, rest), batch, None)[0]

    grad = jax.jit(jax.grad(loss))
    print(f"forward {_median_ms(jax.jit(loss), params):.1f} ms, "
          f"forward + backward {_median_ms(grad, params):.1f} ms (medians)")
    call = lambda: grad(params)

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.calls):
      jax.block_until_ready(call())
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]

  per_op = collections.Counter()
  # Inside a collective: the time a device waits for the others to arrive.
  waiting = sum(e.get("dur", 0) for e in events
                if e.get("ph") == "X" and e["name"] == "Rendezvous") / 1000 / args.calls
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_HOST_EVENTS):
      per_op[e["name"]] += e.get("dur", 0) / 1000 / args.calls
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[re.sub(r"\.\d+$", "", name)] += ms
  print(f"\ntraced op time per call, summed over {jax.device_count()} device(s): "
        f"{sum(per_op.values()):.1f} ms, of which collectives waiting at their rendezvous "
        f"{waiting:.1f} ms\n\nby kind:")
  for name, ms in per_kind.most_common(args.top):
    print(f"  {ms:7.2f} ms  {name}")
  print("\nlargest ops:")
  for name, ms in per_op.most_common(args.top):
    print(f"  {ms:7.2f} ms  {name}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
