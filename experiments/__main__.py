"""python -m experiments NAME[:VARIANT] [--config.key=value ...] | NAME COMMAND ... | --list"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

USAGE = ("usage: python -m experiments NAME[:VARIANT] [--config.key=value ...]\n"
         "       python -m experiments NAME COMMAND [args ...]\n"
         "       python -m experiments sample --init_from=CHECKPOINT_OR_RUN --prompt=TEXT ...\n"
         "       python -m experiments --list")


def _list() -> None:
  import experiments
  for name in experiments.EXPERIMENTS:
    module = experiments.load(name)
    summary = (module.__doc__ or "").strip().splitlines()[0]
    print(f"{name:24s} {summary}  [variants: {', '.join(module.VARIANTS)}]")


def _join_cluster(config) -> None:
  """Joins JAX's distributed runtime when this process is one of several."""
  import jax

  launched = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if config.coordinator_address:
    # CPU processes talk through gloo; GPUs and TPUs use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id)
  elif launched:
    jax.distributed.initialize()


def _run(spec: str, overrides: list[str]) -> int:
  import jax

  import experiments
  from research import config as config_lib
  from research import sharding
  from research.train import loop

  name, _ = experiments.parse_name(spec)
  config = config_lib.apply_overrides(experiments.get_config(spec), overrides)
  if not config.workdir:
    if config.coordinator_address:
      raise config_lib.ConfigError("multi-host runs need an explicit shared --config.workdir")
    config.workdir = str(Path("runs") / name / time.strftime("%Y%m%d-%H%M%S"))
  if not config.coordinator_address:
    sharding.split_cpu_into_devices(config.batch_size, *([config.eval_batch_size]
                                                         if config.get("eval_batch_size") else []))
  _join_cluster(config)
  config_lib.validate(config, jax.device_count())
  print(f"{spec}: workdir {config.workdir}", file=sys.stderr)
  module = experiments.load(name)
  if hasattr(module, "run"):  # a multi-run experiment: it trains its own sub-runs
    results = module.run(config, experiment=spec)
  else:
    results = loop.train(module.build(config), config, experiment=spec)
  if jax.process_index() != 0:
    return 0
  for split, metrics in results.items():
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                      if isinstance(v, float) and k not in ("step",))
    print(f"{split}: {shown}")
  print(f"run folder: {config.workdir}")
  return 0


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  if argv[0] == "--list":
    _list()
    return 0
  import experiments
  from research.config import ConfigError
  from research.train.loop import Diverged, Preempted

  try:
    if argv[0] == "sample":  # any language model, imported or trained here (experiments/_sample.py)
      from experiments import _sample
      return _sample.main(argv[1:])
    spec, rest = argv[0], argv[1:]
    module = experiments.load(experiments.parse_name(spec)[0])
    commands = getattr(module, "COMMANDS", {})
    if rest and rest[0] in commands:
      return commands[rest[0]](rest[1:]) or 0
    if rest and not rest[0].startswith("--"):
      known = ", ".join(commands) or "none"
      raise ConfigError(f"unknown command {rest[0]!r} for {spec} (commands: {known})")
    return _run(spec, rest)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Preempted as e:
    print(str(e), file=sys.stderr)
    return 0 if e.signum == signal.SIGTERM else 128 + e.signum


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main(sys.argv[1:]))
