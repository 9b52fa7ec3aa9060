"""The recurrent sentence classifier that Transformers replaced: embeddings -> BiLSTM -> pool.

Each direction is a `research.models.lstm.LSTM` over right-padded inputs. The forward one
reads padding only after a sentence's last token, so its states at real tokens never see
it; the backward one reads each sentence reversed within its own length (padding still at
the end), then its states are put back in order. The sentence vector is the masked mean of
the concatenated states, and a dense layer maps it to logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.data.subword import PAD
from research.models.lstm import LSTM


def reverse_within_length(x_BxTx_, lengths_B):
  """Reverses each row's first `length` positions and leaves the rest (padding) in place."""
  t_T = jnp.arange(x_BxTx_.shape[1])
  index_BxT = jnp.where(t_T < lengths_B[:, None], lengths_B[:, None] - 1 - t_T, t_T)
  return jnp.take_along_axis(x_BxTx_, index_BxT.reshape(*index_BxT.shape, *[1] * (x_BxTx_.ndim - 2)),
                             axis=1)


@dataclasses.dataclass(frozen=True)
class BiLSTMConfig:
  vocab_size: int
  num_classes: int
  embed_dim: int = 256
  hidden_dim: int = 256  # per direction
  dropout: float = 0.0  # on the embeddings and on the pooled vector
  dtype: str = "float32"


class BiLSTMClassifier(nnx.Module):

  def __init__(self, cfg: BiLSTMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim,
                           embedding_init=nnx.initializers.normal(0.1), dtype=cfg.dtype, rngs=rngs)
    self.forward = LSTM(cfg.embed_dim, cfg.hidden_dim, dtype=cfg.dtype, rngs=rngs)
    self.backward = LSTM(cfg.embed_dim, cfg.hidden_dim, dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.head = nnx.Linear(2 * cfg.hidden_dim, cfg.num_classes, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    valid_BxT = tokens_BxT != PAD
    lengths_B = valid_BxT.sum(axis=1)
    x_BxTxE = self.dropout(self.embed(tokens_BxT), deterministic=rngs is None, rngs=rngs)
    _, fwd_BxTxH = self.forward(x_BxTxE)
    _, bwd_BxTxH = self.backward(reverse_within_length(x_BxTxE, lengths_B))
    h_BxTx2H = jnp.concatenate([fwd_BxTxH, reverse_within_length(bwd_BxTxH, lengths_B)], axis=-1)
    valid_BxTx1 = valid_BxT[..., None].astype(h_BxTx2H.dtype)
    pooled_Bx2H = (h_BxTx2H * valid_BxTx1).sum(1) / jnp.maximum(valid_BxTx1.sum(1), 1)
    pooled_Bx2H = self.dropout(pooled_Bx2H, deterministic=rngs is None, rngs=rngs)
    return self.head(pooled_Bx2H).astype(jnp.float32)
