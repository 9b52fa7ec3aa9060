"""The plain multilayer perceptron: Dense -> activation -> dropout, repeated, then Dense.

A baseline for any input that is (or flattens to) a feature vector: bag-of-words counts,
pixels. Featurization belongs to the data code; the model only sees [B, ...] numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  in_features: int  # inputs [B, ...] are flattened to this many features
  out_features: int
  hidden_sizes: tuple[int, ...] = (256,)  # one hidden layer per size; () is a linear model
  dropout: float = 0.0  # after each hidden layer
  activation: str = "relu"  # a function of jax.nn
  dtype: str = "float32"

  def __post_init__(self):  # a list (from JSON or a config) would make the config unhashable
    object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))


class MLP(nnx.Module):

  def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
    if not callable(getattr(jax.nn, cfg.activation, None)):
      raise ValueError(f"unknown activation {cfg.activation!r}: not a function of jax.nn")
    self.cfg = cfg
    sizes = [cfg.in_features, *cfg.hidden_sizes]
    self.hidden = nnx.List([nnx.Linear(i, o, dtype=cfg.dtype, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], cfg.out_features, dtype=cfg.dtype, rngs=rngs)
    self.activation = getattr(jax.nn, cfg.activation)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BxF: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, out_features] (float32); inputs [B, ...] are flattened to [B, in_features]."""
    x_BxF = x_BxF.reshape(x_BxF.shape[0], -1)
    for layer in self.hidden:
      x_BxF = self.dropout(self.activation(layer(x_BxF)), deterministic=rngs is None, rngs=rngs)
    return self.out(x_BxF).astype(jnp.float32)
