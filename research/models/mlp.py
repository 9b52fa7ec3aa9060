"""The plain multilayer perceptron: Dense -> activation -> dropout, repeated, then Dense.

A baseline for any input that is (or flattens to) a feature vector: bag-of-words counts,
pixels. Featurization belongs to the data code; the model only sees [B, ...] numbers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):

  def __init__(self, in_features: int, hidden_sizes: Sequence[int], out_features: int, *,
               dropout: float = 0.0, activation=nnx.relu, dtype="float32", rngs: nnx.Rngs):
    sizes = [in_features, *hidden_sizes]
    self.hidden = nnx.List([nnx.Linear(i, o, dtype=dtype, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_features, dtype=dtype, rngs=rngs)
    self.activation = activation
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxF: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, out_features] (float32); inputs [B, ...] are flattened to [B, in_features]."""
    x_BxF = x_BxF.reshape(x_BxF.shape[0], -1)
    for layer in self.hidden:
      x_BxF = self.dropout(self.activation(layer(x_BxF)), deterministic=rngs is None, rngs=rngs)
    return self.out(x_BxF).astype(jnp.float32)
