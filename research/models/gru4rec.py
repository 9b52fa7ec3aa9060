"""GRU4Rec-style recurrent recommender (Hidasi et al. 2016): the baseline SASRec replaced.

Item embeddings -> GRU x L -> a state per position, scored like SASRec's against the shared
item embeddings and trained with the same objective, so the two differ only in the sequence
model. (The original trains on sessions in parallel with ranking losses and separate output
weights; here the data are the same per-user histories SASRec reads.) The state stays at
zero through left padding, so padding never changes it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GRU4RecConfig:
  num_items: int  # items are 1..num_items; 0 is padding
  max_len: int = 200  # the last `max_len` items of a history are read
  embed_dim: int = 64  # also the GRU's width, so its states score against item embeddings
  num_layers: int = 1
  dropout: float = 0.2
  dtype: str = "float32"


class GRU(nnx.Module):
  """One GRU layer (Cho et al. 2014, with the reset gate applied after the recurrent matmul,
  as cuDNN and PyTorch do). The input projection of all steps is one matmul outside the scan."""

  def __init__(self, in_features: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.inputs = nnx.Linear(in_features, 3 * hidden, dtype=dtype, rngs=rngs)
    self.recurrent = nnx.Linear(hidden, 3 * hidden, kernel_init=nnx.initializers.orthogonal(),
                                dtype=dtype, rngs=rngs)

  def __call__(self, x_BxTxD, valid_BxT, h_BxH=None):
    """(final state, states [B, T, H]); where `valid` is False the state is carried unchanged.
    h None = zeros."""
    gates_TxBx3H = self.inputs(x_BxTxD).swapaxes(0, 1)
    if h_BxH is None:
      # Zeros derived from the input share its sharding (and varying type in shard_map).
      h_BxH = jnp.zeros_like(gates_TxBx3H[0, :, :self.recurrent.in_features])

    def step(h_BxH, inputs):
      gates_Bx3H, valid_B = inputs
      xr, xz, xn = jnp.split(gates_Bx3H, 3, axis=-1)
      hr, hz, hn = jnp.split(self.recurrent(h_BxH), 3, axis=-1)
      r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
      new_BxH = (1 - z) * jnp.tanh(xn + r * hn) + z * h_BxH
      h_BxH = jnp.where(valid_B[:, None], new_BxH, h_BxH)
      return h_BxH, h_BxH

    h_BxH, h_TxBxH = jax.lax.scan(step, h_BxH, (gates_TxBx3H, valid_BxT.swapaxes(0, 1)))
    return h_BxH, h_TxBxH.swapaxes(0, 1)


class GRU4Rec(nnx.Module):

  def __init__(self, cfg: GRU4RecConfig, *, rngs: nnx.Rngs):
    if cfg.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {cfg.num_layers}")
    self.cfg = cfg
    d = cfg.embed_dim
    init = nnx.initializers.normal(stddev=1 / math.sqrt(d))
    self.item_embed = nnx.Embed(cfg.num_items + 1, d, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([GRU(d, d, dtype=cfg.dtype, rngs=rngs) for _ in range(cfg.num_layers)])
    self.dropout = nnx.Dropout(cfg.dropout)

  def encode(self, x_BxTxD, valid_BxT, *, rngs=None):
    """GRU layers over embedded inputs; the state at t has read positions <= t only."""
    for layer in self.layers:
      x_BxTxD = self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)
      _, x_BxTxD = layer(x_BxTxD, valid_BxT)
    return self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs).astype(jnp.float32)

  def __call__(self, items_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """[B, T, D]: the state after each position, to be scored against the next item."""
    return self.encode(self.item_embed(items_BxT).astype(self.cfg.dtype), items_BxT != 0,
                       rngs=rngs)

  def score_items(self, history_BxT, user_B):
    """[B, num_items + 1] scores of every item as the next one after `history`."""
    del user_B  # The history is the user.
    h_BxD = self(history_BxT[:, -self.cfg.max_len:])[:, -1]
    return self.item_embed.attend(h_BxD)
