"""A run folder's model, rebuilt for inference without its data: `load_model(workdir)`.

When a run starts, the training loop writes beside `config.json` (process 0):

  model.json   {"class": "research.models.gpt.GPT", "config_class": "research.models.gpt.GPTConfig",
                "config": {...the fields of model.cfg...}}
  tokenizer/   the task's tokenizer, if it has one: tokenizer.json ({"kind": ...}) and its files

Every model is built as `Cls(cfg, *, rngs)` from a frozen dataclass kept as `model.cfg`, so
these files and the newest checkpoint's parameters are all `load_model` reads: no dataset, no
experiment module, no optimizer state.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import sys
import typing
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from research.config import ConfigError

MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"


def _qualified(obj) -> str:
  return f"{obj.__module__}.{obj.__qualname__}"


def _import(path: str):
  module, _, name = path.rpartition(".")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError, ValueError):
    raise ConfigError(f"{path} (named in {MODEL_FILE}) cannot be imported") from None


def _from_json(hint, value):
  """A JSON value as the dataclass field typed `hint` wants it: nested dataclasses rebuilt,
  lists (JSON's tuples) back to tuples."""
  for t in (hint, *typing.get_args(hint)):
    if dataclasses.is_dataclass(t) and isinstance(value, dict):
      return config_from_dict(t, value)
  if isinstance(value, list):
    return tuple(_from_json(None, v) for v in value)
  return value


def config_from_dict(cls, values: dict):
  """`cls(**values)` after a JSON round trip; unknown fields are a ConfigError."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"{cls.__name__} has no fields {', '.join(unknown)} (valid: "
                      f"{', '.join(sorted(fields))})")
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # an annotation that does not resolve at runtime: no hints, plain values
    hints = {}
  return cls(**{k: _from_json(hints.get(k), v) for k, v in values.items()})


def describe_model(model: nnx.Module) -> dict:
  """model.json's content for `model`; ValueError saying why if it cannot be rebuilt from it."""
  cls, cfg = type(model), getattr(model, "cfg", None)
  if cfg is None or not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
    raise ValueError(f"{_qualified(cls)} keeps no dataclass config as `model.cfg`")
  spec = {"class": _qualified(cls), "config_class": _qualified(type(cfg)),
          "config": dataclasses.asdict(cfg)}
  try:
    spec = json.loads(json.dumps(spec))
  except TypeError as e:
    raise ValueError(f"{_qualified(type(cfg))} does not convert to JSON ({e})") from None
  # Rebuilt from the description alone (abstractly: no compute), it must have the same variables.
  try:
    rebuilt = build_abstract(spec)
  except Exception as e:  # a constructor that is not Cls(cfg, *, rngs)
    raise ValueError(f"{_qualified(cls)}(cfg, rngs=...) fails: {type(e).__name__}: {e}") from None
  shapes = lambda m: {"/".join(map(str, path)): tuple(x.shape) for path, x in
                      jax.tree_util.tree_leaves_with_path(nnx.state(m).to_pure_dict())}
  want, got = shapes(model), shapes(rebuilt)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:3]
    raise ValueError(f"{_qualified(cls)} rebuilt from its cfg has other variables "
                     f"({', '.join(f'{k} {v}' for k, v in diff)})")
  return spec


def build_abstract(spec: dict) -> nnx.Module:
  """The model of a model.json description, with abstract (shape-only) variables."""
  cls, config_cls = _import(spec["class"]), _import(spec["config_class"])
  cfg = config_from_dict(config_cls, spec["config"])
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def write_run_description(workdir: Path, model: nnx.Module, tokenizer=None) -> None:
  """Writes model.json and tokenizer/ into `workdir` (see the module docstring). A model that
  cannot be described gets a warning, not an error: the run trains, but `load_model` refuses it."""
  workdir = Path(workdir)
  try:
    spec = describe_model(model)
  except ValueError as e:
    print(f"warning: {workdir / MODEL_FILE} not written, so load_model cannot read this run: {e}",
          file=sys.stderr)
    return
  tmp = workdir / f".{MODEL_FILE}.tmp"
  tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
  tmp.replace(workdir / MODEL_FILE)
  if tokenizer is not None:
    tmp_dir, final = workdir / f".{TOKENIZER_DIR}.tmp", workdir / TOKENIZER_DIR
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tokenizer.save(tmp_dir)
    shutil.rmtree(final, ignore_errors=True)
    tmp_dir.rename(final)


def load_tokenizer(directory: str | Path):
  """The tokenizer saved in `directory` by its class's `save`, whichever kind it is."""
  from research.data.hf_tokenizer import HFTokenizer
  from research.data.subword import SubwordTokenizer, TokenizerPair
  from research.data.text import CharTokenizer

  kinds = {"char": CharTokenizer, "sentencepiece": SubwordTokenizer, "pair": TokenizerPair,
           "hf_tokenizers": HFTokenizer}
  path = Path(directory) / "tokenizer.json"
  if not path.exists():
    raise ConfigError(f"{directory} holds no tokenizer (no tokenizer.json)")
  kind = json.loads(path.read_text()).get("kind")
  if kind not in kinds:
    raise ConfigError(f"{path}: unknown tokenizer kind {kind!r}; known: {', '.join(kinds)}")
  return kinds[kind].load(directory)


def saved_tokenizer(workdir: str | Path):
  """The tokenizer a run folder already holds (a resumed run reuses it), or None."""
  directory = Path(workdir) / TOKENIZER_DIR
  return load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None


def load_model(workdir: str | Path):
  """(model, tokenizer or None, config) of a run folder: the model rebuilt from model.json with
  the newest checkpoint's parameters (optimizer state not read), the saved tokenizer, and the
  run's config.json as a ConfigDict (with its `experiment` name). Reads no dataset."""
  from research.train import optim
  from research.train.checkpoint import Checkpoints

  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise ConfigError(f"{workdir} is not a run folder (no config.json)")
  saved = json.loads((workdir / "config.json").read_text())
  if not (workdir / MODEL_FILE).exists():
    runs = sorted(p.name for p in workdir.iterdir() if (p / "config.json").exists())
    if runs:
      raise ConfigError(f"{workdir} holds a {saved.get('experiment')} run made of the runs in its "
                        f"subfolders ({', '.join(runs)}); load one of those")
    raise ConfigError(f"{workdir} has no {MODEL_FILE} (the run was written before run folders "
                      f"described their model, or its model is not built as Cls(cfg, *, rngs)); "
                      f"train it again to load it")
  config = ml_collections.ConfigDict(saved)
  abstract = build_abstract(json.loads((workdir / MODEL_FILE).read_text()))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  params, rest = place(params.to_pure_dict()), place(rest.to_pure_dict())
  # The optimizer state is read only where the model to use lives in it (schedule-free's average).
  opt_state = None
  if optim.evaluates_its_average(config):
    opt_state = place(jax.eval_shape(optim.make_optimizer(config).init, params))
  if not (workdir / "checkpoints").is_dir():
    raise ConfigError(f"{workdir} has no checkpoint to load")
  checkpoints = Checkpoints(workdir / "checkpoints", keep=1, read_only=True)
  try:
    restored = checkpoints.restore_model(params, rest, opt_state)
  finally:
    checkpoints.close()
  if restored is None:
    raise ConfigError(f"{workdir} has no checkpoint to load")
  params = optim.eval_params(config)(restored["params"], restored["opt_state"])
  model = nnx.merge(graphdef, params, restored["rest"])
  tokenizer = (load_tokenizer(workdir / TOKENIZER_DIR) if (workdir / TOKENIZER_DIR).is_dir()
               else None)
  return model, tokenizer, config
