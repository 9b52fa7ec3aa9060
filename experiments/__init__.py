"""The experiment registry: every module of this package that defines `get_config`.

An experiment module has a docstring (first line: what it shows; then its command, expected
result and runtime), `VARIANTS` (the first is the default), `get_config(variant)` and
`build(config) -> research.train.task.Task`. It may also define `COMMANDS = {"name": fn(argv)}`
for things to do with a trained run (e.g. `translate`; `research.load.load_model` rebuilds the
run's model without its data). Adding a module adds the experiment.
An experiment made of several runs (a sweep, a comparison) defines `run(config, experiment=spec)
-> {split: metrics}` instead of `build`: it trains each sub-run, an ordinary run of another
experiment in a subfolder of its workdir, and writes its report there.
"""

from __future__ import annotations

import importlib
import pkgutil
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

