"""What the imports share: a checkpoint's named tensors placed into a model's parameter tree,
every parameter found with its shape and every tensor read; the model built around them without
a random init; and a memory check before loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import ConfigError

# (checkpoint tensor names, path in the parameter tree, how the converter combines them)
Entry = tuple[tuple[str, ...], tuple, str]


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def param_shapes(cls, cfg) -> dict:
  """The pure parameter dict of `cls(cfg)` with shape-only leaves (nothing allocated): the
  `want` of `assemble`, and the shapes an export fills."""
  return nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()


def build(cls, cfg, params: dict) -> nnx.Module:
  """`cls(cfg)` holding `params` (a pure dict from `assemble`), built abstractly: no random
  init of weights that are replaced at once."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  state.replace_by_pure_dict(params)
  return nnx.merge(graphdef, state)


def assemble(tensors: dict[str, np.ndarray], entries: Iterable[Entry], want: dict,
             convert: Callable[[str, list[np.ndarray]], np.ndarray | None], *, where: str,
             needed_by: str, reader: str, source: str, unread_hint: str,
             ignore: Callable[[str], bool] = lambda name: False) -> dict:
  """The pure parameter dict shaped like `want` (e.g. `nnx.eval_shape`'s parameters): each
  entry's tensors go through `convert(how, arrays)` (None: they cannot fit) and must match the
  shape at its path; a tensor no entry reads is an error unless `ignore(name)`. The words of
  the one-line errors: `needed_by` ("a BertModel with 6 layers"), `reader` ("BERT"), `source`
  ("config.json"), `unread_hint`."""
  params, used = {}, set()
  for names, path, how in entries:
    missing = [n for n in names if n not in tensors]
    if missing:
      raise ConfigError(f"{where} lacks the tensor {missing[0]} ({needed_by} needs it)")
    value = convert(how, [tensors[n] for n in names])
    shape = tuple(get_path(want, path).shape)
    if value is None or value.shape != shape:
      src = " + ".join(f"{n} {list(tensors[n].shape)}" for n in names)
      raise ConfigError(f"{where}: {src} does not fit {'/'.join(map(str, path))} {list(shape)} "
                        f"({source} and the weights disagree)")
    # jax arrays, like the weights a model's constructor makes: a model holding host numpy
    # arrays beside jax ones gets them placed apart (orbax restores numpy leaves as saved,
    # on every device, and jax leaves on the template's device) and mixes devices.
    set_path(params, path, jnp.asarray(value, dtype=jnp.float32))
    used.update(names)
  extra = sorted(k for k in tensors if k not in used and not ignore(k))
  if extra:
    raise ConfigError(f"{where} has tensors this {reader} does not read: {', '.join(extra[:4])}"
                      f"{' ...' if len(extra) > 4 else ''} ({len(extra)}); {unread_hint}")
  return params


def check_memory(float32_bytes: int) -> None:
  """Fails before allocating when the float32 weights, twice (the tensors and the model they go
  into), cannot fit in the memory the OS can still give."""
  available = available_memory()
  if available is not None and 2 * float32_bytes > available:
    raise ConfigError(f"the checkpoint needs about {2 * float32_bytes / 2**30:.1f} GiB to load "
                      f"as float32 (its tensors and the model), and {available / 2**30:.1f} GiB "
                      f"are free")


def available_memory() -> int | None:
  """Bytes the OS can still give (MemAvailable: free memory and reclaimable caches)."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
