"""SASRec: self-attentive sequential recommendation (Kang & McAuley 2018).

A user's item history (left-padded with item 0) goes through learned item and position
embeddings and causal pre-LayerNorm Transformer blocks; the output at position t is scored
against the embeddings of candidate next items (input and output embeddings are shared), so
position t sees only items 1..t. Padding is masked out of attention as keys.

Differences from the paper's code, none of which matters much: the blocks are this
project's shared pre-LN `Block` (queries and keys both normalised; GELU MLP of width
`mlp_ratio * D` rather than a ReLU one of width D).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.attention import padding_segments
from research.nn.transformer import Block


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  num_items: int  # items are 1..num_items; 0 is padding
  max_len: int = 200  # the last `max_len` items of a history are read
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 1
  mlp_ratio: int = 1
  dropout: float = 0.2
  attention: str = "xla"
  dtype: str = "float32"


class SASRec(nnx.Module):

  def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    init = nnx.initializers.normal(stddev=1 / math.sqrt(d))  # unit-variance dot products
    self.item_embed = nnx.Embed(cfg.num_items + 1, d, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_len, d, embedding_init=init, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([
        Block(d, cfg.num_heads, mlp_dim=cfg.mlp_ratio * d, dropout=cfg.dropout,
              attention=cfg.attention, dtype=cfg.dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)

  def embed(self, items_BxT, *, rngs=None):
    T = items_BxT.shape[1]
    # The paper's sqrt(D) scaling keeps items, not positions, dominant at the input.
    x_BxTxD = (self.item_embed(items_BxT) * math.sqrt(self.cfg.embed_dim)
               + self.pos_embed(jnp.arange(self.cfg.max_len - T, self.cfg.max_len)))
    return self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs).astype(self.cfg.dtype)

  def encode(self, x_BxTxD, valid_BxT, *, rngs=None):
    """Blocks + final norm over embedded inputs; position t reads positions <= t only."""
    segments = padding_segments(valid_BxT)
    for block in self.blocks:
      x_BxTxD, _ = block(x_BxTxD, segment_ids=segments, causal=True, rngs=rngs)
    return self.norm(x_BxTxD).astype(jnp.float32)

  def __call__(self, items_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """[B, T, D]: the state after each position, to be scored against the next item."""
    return self.encode(self.embed(items_BxT, rngs=rngs), items_BxT != 0, rngs=rngs)

  def score_items(self, history_BxT, user_B):
    """[B, num_items + 1] scores of every item as the next one after `history`."""
    del user_B  # The history is the user.
    h_BxD = self(history_BxT[:, -self.cfg.max_len:])[:, -1]
    return self.item_embed.attend(h_BxD)
