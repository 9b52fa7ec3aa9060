"""The experiment registry: every module of this package that defines `get_config`.

An experiment module has a docstring (first line: what it shows; then its command, expected
result and runtime), `VARIANTS` (the first is the default), `get_config(variant)` and
`build(config) -> research.train.task.Task`. It may also define `COMMANDS = {"name": fn(argv)}`
for things to do with a trained run (e.g. `translate`). Adding a module adds the experiment.
An experiment made of several runs (a sweep, a comparison) defines `run(config, experiment=spec)
-> {split: metrics}` instead of `build`: it trains each sub-run, an ordinary run of another
experiment in a subfolder of its workdir, and writes its report there.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from types import ModuleType

from research.config import ConfigError

EXPERIMENTS = sorted(m.name for m in pkgutil.iter_modules(__path__)
                     if not m.name.startswith("_") and not m.ispkg)


def load(name: str) -> ModuleType:
  if name not in EXPERIMENTS:
    raise ConfigError(f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
  return importlib.import_module(f"experiments.{name}")


def parse_name(spec: str) -> tuple[str, str | None]:
  """`name[:variant]` -> (name, variant or None for the module's default)."""
  name, _, variant = spec.partition(":")
  return name, variant or None


def get_config(spec: str):
  """The config of `name[:variant]`, checking both exist."""
  name, variant = parse_name(spec)
  module = load(name)
  if variant is not None and variant not in module.VARIANTS:
    raise ConfigError(f"unknown variant {variant!r} of {name}; valid: {', '.join(module.VARIANTS)}")
  return module.get_config(variant or module.VARIANTS[0])


def load_run(workdir: str | Path):
  """(experiment spec, config, task with the newest checkpoint's parameters) of a run folder."""
  import ml_collections
  from flax import nnx

  from research.train import checkpoint, optim
  from research.train.step import init_state

  workdir = Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise ConfigError(f"{workdir} is not a run folder (no config.json)")
  saved = json.loads(path.read_text())
  spec = saved.pop("experiment")
  config = ml_collections.ConfigDict(saved)
  module = load(parse_name(spec)[0])
  if not hasattr(module, "build"):
    raise ConfigError(f"{workdir} holds a {spec} run, made of the runs in its subfolders; "
                      f"load one of those")
  task = module.build(config)
  graphdef, state = init_state(task.model, optim.make_optimizer(config))
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  restored = ckpts.restore_latest(state)
  ckpts.close()
  if restored is None:
    raise ConfigError(f"{workdir} has no checkpoint to load")
  task.model = nnx.merge(graphdef, restored.params, restored.rest)
  return spec, config, task
