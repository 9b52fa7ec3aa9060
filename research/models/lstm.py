"""The recurrent language model that Transformers replaced: Embedding -> LSTM x L -> Dense."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research import flops


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  vocab_size: int
  embed_dim: int = 128
  hidden_dim: int = 256
  num_layers: int = 2
  dropout: float = 0.0
  dtype: str = "float32"


def _forget_bias_one(key, shape, dtype=jnp.float32):
  # Gates are ordered (input, forget, cell, output); a forget bias of 1 lets gradients
  # flow through time early in training (Jozefowicz et al. 2015).
  hidden = shape[0] // 4
  return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1.0)


class LSTM(nnx.Module):
  """One LSTM layer. The input projection of all steps is one matmul outside the scan."""

  def __init__(self, in_features: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.inputs = nnx.Linear(in_features, 4 * hidden, bias_init=_forget_bias_one, dtype=dtype,
                             rngs=rngs)
    self.recurrent = nnx.Linear(hidden, 4 * hidden, use_bias=False,
                                kernel_init=nnx.initializers.orthogonal(), dtype=dtype, rngs=rngs)

  def __call__(self, x_BxTxD, carry=None):
    """Returns ((c, h) after the last step, h at every step); carry None = zeros."""
    gates_TxBx4H = self.inputs(x_BxTxD).swapaxes(0, 1)
    if carry is None:
      # Zeros derived from the input share its sharding (and varying type in shard_map).
      zeros_BxH = jnp.zeros_like(gates_TxBx4H[0, :, :self.recurrent.in_features])
      carry = (zeros_BxH, zeros_BxH)

    def step(carry, gates_Bx4H):
      c_BxH, h_BxH = carry
      i, f, g, o = jnp.split(gates_Bx4H + self.recurrent(h_BxH), 4, axis=-1)
      c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
      h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
      return (c_BxH, h_BxH), h_BxH

    carry, h_TxBxH = jax.lax.scan(step, carry, gates_TxBx4H)
    return carry, h_TxBxH.swapaxes(0, 1)


class LSTMLM(nnx.Module):

  def __init__(self, cfg: LSTMConfig, *, rngs: nnx.Rngs):
    if cfg.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {cfg.num_layers}")
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, rngs=rngs)
    sizes = [cfg.embed_dim] + [cfg.hidden_dim] * cfg.num_layers
    self.layers = nnx.List([LSTM(i, o, dtype=cfg.dtype, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])
    self.dropout = nnx.Dropout(cfg.dropout)
    self.head = nnx.Linear(cfg.hidden_dim, cfg.vocab_size, dtype=cfg.dtype, rngs=rngs)

  context_length = None  # a recurrent model reads any length

  def init_cache(self, batch_size: int):
    zeros_BxH = jnp.zeros((batch_size, self.cfg.hidden_dim), self.cfg.dtype)
    return [(zeros_BxH, zeros_BxH) for _ in self.layers]

  def decode(self, tokens_BxT, cache, pos=None, *, rngs=None):
    """Logits for `tokens_BxT` continuing from the (c, h) carries in `cache` (None: start)."""
    del pos  # The carries hold the whole history.
    x_BxTxD = self.embed(tokens_BxT)
    new_cache = []
    for layer, carry in zip(self.layers, cache or [None] * len(self.layers)):
      x_BxTxD = self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)
      carry, x_BxTxD = layer(x_BxTxD, carry)
      new_cache.append(carry)
    x_BxTxD = self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)
    return self.head(x_BxTxD).astype(jnp.float32), new_cache

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    logits_BxTxV, _ = self.decode(tokens_BxT, None, rngs=rngs)
    return logits_BxTxV

  def flops_per_token(self, context: int | None = None) -> float:
    """Training FLOPs per token: every matrix once per token, whatever the context."""
    del context
    return 6 * flops.matmul_params(self)
