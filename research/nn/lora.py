"""Low-rank adapters (LoRA; Hu et al. 2021) on the `nnx.Linear` layers of any model.

    add_lora(model, rank=8, alpha=16.0, targets=r"attn/(qkv|out)", rngs=nnx.Rngs(0))
    merge_lora(model)  # folds every adapter into its kernel: a plain nnx.Linear again

`LoRALinear` is an `nnx.Linear` whose output gains `(x @ lora_a @ lora_b) * alpha / rank`;
`lora_b` starts at zero, so a model with fresh adapters computes what it computed before. The
base kernel keeps its name (`.../qkv/kernel`), so a checkpoint's weights load by the same paths
and an optimizer mask on the name `lora_` trains the adapters alone
(`research.train.optim`, `config.train.trainable`).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx


class LoRALinear(nnx.Linear):
  """`nnx.Linear` plus a trainable low-rank update of its kernel."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               use_bias: bool = True, dtype=None, rngs: nnx.Rngs, **linear):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs,
                     **linear)
    # A random, B zero (the paper's init): the update starts at zero but its gradient does not.
    self.lora_a = nnx.Param(nnx.initializers.normal(stddev=1 / rank)(
        rngs.params(), (in_features, rank)))
    self.lora_b = nnx.Param(jnp.zeros((rank, out_features)))
    self.lora_scale = alpha / rank

  def __call__(self, x):
    y = super().__call__(x)
    dtype = y.dtype
    a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
    return y + ((x.astype(dtype) @ a) @ b) * jnp.asarray(self.lora_scale, dtype)

  def merged_kernel(self):
    return self.kernel[...] + self.lora_scale * (self.lora_a[...] @ self.lora_b[...])


def _path(path) -> str:
  return "/".join(map(str, path))


def _set(model: nnx.Module, path, module: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = module
  else:
    setattr(parent, path[-1], module)


def linear_paths(model: nnx.Module) -> list[str]:
  """The paths ("blocks/0/attn/qkv") of the model's plain `nnx.Linear` layers."""
  return [_path(p) for p, m in nnx.iter_graph(model) if type(m) is nnx.Linear]


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str,
             rngs: nnx.Rngs) -> list[str]:
  """Turns every `nnx.Linear` whose path matches the regex `targets` (`re.search`) into a
  `LoRALinear` holding the same kernel and bias, in place; returns the paths adapted.
  ValueError if none matches."""
  found = [(p, m) for p, m in nnx.iter_graph(model)
           if type(m) is nnx.Linear and re.search(targets, _path(p))]
  if not found:
    raise ValueError(f"LoRA targets {targets!r} match no linear layer (they are "
                     f"{', '.join(linear_paths(model)[:6])}, ...)")
  for path, old in found:
    new = LoRALinear(old.in_features, old.out_features, rank=rank, alpha=alpha,
                     use_bias=old.use_bias, dtype=old.dtype, param_dtype=old.param_dtype,
                     precision=old.precision, kernel_init=nnx.initializers.zeros_init(),
                     rngs=rngs)
    new.kernel = old.kernel  # the same weights, not a copy: the base stays as loaded
    if old.use_bias:
      new.bias = old.bias
    _set(model, path, new)
  return [_path(p) for p, _ in found]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Replaces every `LoRALinear` by an `nnx.Linear` whose kernel holds kernel + scale·A·B, in
  place (the model then computes the same function without adapters); returns the model."""
  for path, old in [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]:
    new = nnx.eval_shape(lambda: nnx.Linear(
        old.in_features, old.out_features, use_bias=old.use_bias, dtype=old.dtype,
        param_dtype=old.param_dtype, precision=old.precision, rngs=nnx.Rngs(0)))
    new.kernel = nnx.Param(old.merged_kernel())
    if old.use_bias:
      new.bias = nnx.Param(old.bias[...])
    _set(model, path, new)
  return model
