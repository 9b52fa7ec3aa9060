"""Config-as-code: every experiment is an `ml_collections.ConfigDict` built in Python.

`base()` holds the fields every experiment accepts; experiments add their own sections
(`model`, `data`, ...). Command-line overrides `--config.a.b=value` are parsed against the
type of the existing field, and `validate()` rejects bad values before any compute.
"""

from __future__ import annotations

import ast
import math
import os

import ml_collections


class ConfigError(ValueError):
  """A mistake in the user's config or command line: reported in one line, no traceback."""


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")
PARALLELISM = ("dp", "fsdp")
NONFINITE_POLICIES = ("stop", "skip")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 1000
  c.batch_size = 32
  c.learning_rate = 1e-3
  c.min_learning_rate = 1e-4  # end of the cosine decay
  c.warmup_steps = 100
  c.decay_steps = 0  # length of the cosine decay; 0 = steps
  c.weight_decay = 0.1
  c.b1 = 0.9
  c.b2 = 0.99
  c.grad_clip = 1.0
  c.eval_every = 250
  c.log_every = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.workdir = ""  # empty: runs/<name>/<timestamp>
  # How many devices the run is sharded over, and how: data parallel or fully sharded.
  c.parallelism = "dp"
  c.compute_dtype = "float32"
  c.grad_accum_steps = 1
  # What a non-finite loss or gradient does: stop the run, or skip that update.
  c.nonfinite = "stop"
  c.progress_bar = True
  # Multi-host: processes join JAX's distributed runtime through this coordinator
  # ("host:port"); SLURM and TPU-pod launches are detected without it.
  c.coordinator_address = ""
  c.num_processes = 1
  c.process_id = 0
  return c


def _parse(raw: str, current, key: str):
  """Parses `raw` into the type of the field's current value."""
  try:
    if isinstance(current, bool):
      lowered = raw.lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(raw)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
    # None-valued fields take any Python literal, else the raw string.
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  except (ValueError, SyntaxError):
    kind = type(current).__name__
    raise ConfigError(f"--config.{key}={raw!r}: expected a {kind}") from None


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += _leaf_keys(value, f"{prefix}{name}.")
    else:
      keys.append(prefix + name)
  return keys


def apply_overrides(config: ml_collections.ConfigDict, args: list[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` arguments to a copy of `config`."""
  config = ml_collections.ConfigDict(config.to_dict())
  for arg in args:
    if not arg.startswith("--config.") or "=" not in arg:
      raise ConfigError(f"unexpected argument {arg!r}: overrides look like --config.key=value")
    key, raw = arg[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
        node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_leaf_keys(config))}")
    value = _parse(raw, node[leaf], key)
    try:
      node[leaf] = value
    except TypeError:
      raise ConfigError(f"--config.{key}={raw!r}: expected a {type(node[leaf]).__name__}") from None
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the fields of `base()`; experiments check their own sections in `build`."""

  def require(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  for key in ("steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
              "keep_checkpoints", "grad_accum_steps"):
    require(config[key] > 0, f"config.{key} must be a positive integer, got {config[key]}")
  for key in ("warmup_steps", "decay_steps"):
    require(config[key] >= 0, f"config.{key} must be >= 0, got {config[key]}")
  for key in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip", "b1", "b2"):
    value = config[key]
    require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
            f"config.{key} must be a finite non-negative number, got {value!r}")
  require(config.learning_rate > 0, f"config.learning_rate must be > 0, got {config.learning_rate}")
  require(config.parallelism in PARALLELISM,
          f"unknown config.parallelism {config.parallelism!r}; choose one of {', '.join(PARALLELISM)}")
  require(config.nonfinite in NONFINITE_POLICIES,
          f"unknown config.nonfinite {config.nonfinite!r}; choose one of {', '.join(NONFINITE_POLICIES)}")
  require(config.compute_dtype in ("float32", "bfloat16"),
          f"unknown config.compute_dtype {config.compute_dtype!r}; choose float32 or bfloat16")
  micro_batch = config.batch_size // config.grad_accum_steps
  require(config.batch_size % config.grad_accum_steps == 0,
          f"config.batch_size={config.batch_size} is not divisible by "
          f"config.grad_accum_steps={config.grad_accum_steps}")
  require(micro_batch % num_devices == 0,
          f"config.batch_size={config.batch_size} (micro-batch {micro_batch}) is not divisible by "
          f"the {num_devices} devices; use a multiple of {num_devices}")
  attention = config.get("model", {}).get("attention")
  if attention is not None:
    require(attention in ATTENTION_IMPLEMENTATIONS,
            f"unknown config.model.attention {attention!r}; choose one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
  workdir = config.workdir
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"config.workdir {workdir!r} exists and is not a directory")
