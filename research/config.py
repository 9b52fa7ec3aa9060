"""Config-as-code: every experiment is an `ml_collections.ConfigDict` built in Python.

`base()` holds the fields every experiment accepts, `optimizer` among them (see
`research.train.optim`); experiments add their own sections (`model`, `data`, ...).
`config.model` holds the fields of the model's config dataclass (`model_config`); an experiment
offering several models has `config.model.kind` and one such section per kind
(`config.model.<kind>`). Command-line overrides `--config.a.b=value` are parsed against the
type of the existing field (unknown keys are refused, with the valid ones listed), and
`validate()` rejects bad values before any compute.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
from typing import Sequence

import ml_collections

from research.models import gpt
from research.nn import attention as nn_attention
from research.train import optim


class ConfigError(ValueError):
  """A mistake in the user's config or command line: reported in one line, no traceback."""


PARALLELISM = ("dp", "fsdp")
NONFINITE_POLICIES = ("stop", "skip")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 1000
  c.batch_size = 32
  c.learning_rate = 1e-3
  c.min_learning_rate = 1e-4  # end of the decay
  c.warmup_steps = 100
  c.decay_steps = 0  # step at which the decay ends (warmup included); 0 = steps
  # The learning-rate schedule (research.train.optim.SCHEDULES): "cosine" decay after the
  # warmup, or "wsd": warmup, stable, then decay over the last `decay_fraction` of decay_steps,
  # linearly or "1-sqrt" (`decay_shape`); decay_fraction=0 stays at learning_rate.
  c.schedule = "cosine"
  c.decay_fraction = 0.2  # wsd only
  c.decay_shape = "linear"  # wsd only
  # `name` and that optimizer's own fields; setting another name resets them to its defaults.
  c.optimizer = optim.optimizer_fields("adamw")
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


def phase_config(config: ml_collections.ConfigDict, name: str,
                 overrides: dict) -> ml_collections.ConfigDict:
  """The config of a phase run (`research.train.task.Phase`) of `config`: its `base()` fields
  with `overrides` (keys that are not `base()` fields are the phase's own, and ignored here),
  its model and data sections, and the workdir `<workdir>/<name>`."""
  sub = base()
  for key in sub:
    sub[key] = config[key]
  for key, value in overrides.items():
    if key in sub:
      sub[key] = value
  sub.workdir = os.path.join(config.workdir, name)
  for section in ("model", "data", "pretrain"):
    if section in config:
      sub[section] = config[section]
  return sub


def model_config(cls, *, exclude: Sequence[str] = (), **values) -> ml_collections.ConfigDict:
  """A `config.model` section for the model config dataclass `cls`: each field at its default,
  or at `values`. Left out are `dtype` (`config.compute_dtype` sets it) and the fields in
  `exclude`, which `build` derives from the data: `cls(**section, vocab_size=...,
  dtype=config.compute_dtype)` then makes the model's config."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = (set(values) | set(exclude)) - set(fields)
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
  section = {}
  for name, field in fields.items():
    if name == "dtype" or name in exclude:
      continue
    if name in values:
      value = values[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
    else:
      raise ValueError(f"{cls.__name__}.{name} has no default: give it a value or exclude it")
    if field.type in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)  # so that --config overrides parse as floats
    section[name] = value
  return ml_collections.ConfigDict(section)


def model_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields of the model a run trains: `config.model`, or `config.model[config.model.kind]`
  in an experiment that offers several models."""
  model = config.get("model", ml_collections.ConfigDict())
  if "kind" in model and isinstance(model.get(model.kind), ml_collections.ConfigDict):
    return model[model.kind]
  return model


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


def _set_optimizer(config: ml_collections.ConfigDict, name: str) -> None:
  """Another optimizer name replaces config.optimizer by that optimizer's defaults."""
  if name not in optim.OPTIMIZERS:
    raise ConfigError(f"unknown config.optimizer.name {name!r}; valid names: "
                      f"{', '.join(optim.OPTIMIZERS)}")
  if config.get("optimizer", {}).get("name") != name:
    config.optimizer = ml_collections.ConfigDict(optim.optimizer_fields(name))


def apply_overrides(config: ml_collections.ConfigDict, args: list[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` arguments to a copy of `config`. `--config.optimizer.name`
  goes first: a new name resets the optimizer's fields to its defaults, and the other
  `--config.optimizer.*` arguments then set that optimizer's fields."""
  config = ml_collections.ConfigDict(config.to_dict())
  for arg in args:
    if not arg.startswith("--config.") or "=" not in arg:
      raise ConfigError(f"unexpected argument {arg!r}: overrides look like --config.key=value")
  names = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config.optimizer.name=")]
  for name in names:
    _set_optimizer(config, name)
  for arg in args:
    key, raw = arg[len("--config."):].split("=", 1)
    if key == "optimizer.name":
      continue
    *parents, leaf = key.split(".")
    node, path = config, []
    for part in parents:
      child = node.get(part)
      if not isinstance(child, ml_collections.ConfigDict):
        break
      node, path = child, path + [part]
    if len(path) < len(parents) or leaf not in node or isinstance(node[leaf],
                                                                  ml_collections.ConfigDict):
      # The valid keys of the deepest section the key reaches (all of them at the top).
      prefix = "".join(f"{part}." for part in path)
      valid = ", ".join(prefix + k for k in _leaf_keys(node))
      raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
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
  for key in ("learning_rate", "min_learning_rate", "grad_clip"):
    value = config[key]
    require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
            f"config.{key} must be a finite non-negative number, got {value!r}")
  _validate_optimizer(config.get("optimizer"))
  require(config.get("schedule") in optim.SCHEDULES,
          f"unknown config.schedule {config.get('schedule')!r}; valid names: "
          f"{', '.join(optim.SCHEDULES)}")
  require(config.decay_shape in optim.DECAY_SHAPES,
          f"unknown config.decay_shape {config.decay_shape!r}; valid names: "
          f"{', '.join(optim.DECAY_SHAPES)}")
  fraction = config.decay_fraction
  require(isinstance(fraction, (int, float)) and 0 <= fraction <= 1,
          f"config.decay_fraction must be between 0 and 1, got {fraction!r}")
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
  model = config.get("model")
  if isinstance(model, ml_collections.ConfigDict) and "kind" in model:
    kinds = [k for k, v in model.items() if isinstance(v, ml_collections.ConfigDict)]
    require(model.kind in kinds,
            f"unknown config.model.kind {model.kind!r}; valid names: {', '.join(kinds)}")
  activation = model_section(config).get("mlp_activation")
  if activation is not None:
    require(activation in gpt.MLP_ACTIVATIONS,
            f"unknown config.model.mlp_activation {activation!r}; valid names: "
            f"{', '.join(gpt.MLP_ACTIVATIONS)}")
  attention = model_section(config).get("attention")
  if attention is not None:
    try:
      nn_attention.check_supported(attention)  # names from kernels.flash_attention
    except ValueError as e:
      raise ConfigError(f"config.model.attention: {e}") from None
  workdir = config.workdir
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"config.workdir {workdir!r} exists and is not a directory")


def _validate_optimizer(section) -> None:
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("the config has no optimizer section (a run written before config.optimizer "
                      "existed?); config.optimizer.name is one of " + ", ".join(optim.OPTIMIZERS))
  name = section.get("name")
  if name not in optim.OPTIMIZERS:
    raise ConfigError(f"unknown config.optimizer.name {name!r}; valid names: "
                      f"{', '.join(optim.OPTIMIZERS)}")
  expected = optim.optimizer_fields(name)
  if set(section) != set(expected):
    wrong = ", ".join(sorted(set(section) ^ set(expected)))
    raise ConfigError(f"config.optimizer does not match optimizer {name!r} ({wrong}); its fields: "
                      f"{', '.join(expected)}")
  for key, default in expected.items():
    value = section[key]
    if isinstance(default, float) and not (isinstance(value, (int, float)) and
                                           math.isfinite(value) and value >= 0):
      raise ConfigError(f"config.optimizer.{key} must be a finite non-negative number, got {value!r}")
