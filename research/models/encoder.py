"""A BERT-style bidirectional Transformer encoder, with a classification head and an MLM head.

Token + learned position embeddings, pre-LayerNorm `research.nn.transformer.Block`s that
attend only to real tokens (PAD = 0 is masked out of every attention), and a final LayerNorm.

`EncoderClassifier` pools the token states by their masked mean. BERT reads a [CLS] token
instead, but [CLS] learns its role from next-sentence prediction; with MLM-only pretraining
(or none) its state carries no sentence-level signal, while the mean of the token states is
built from exactly what MLM trains (Sentence-BERT found mean pooling the better default).

`MaskedLM` (Devlin et al. 2019) predicts masked tokens through the transposed token
embedding; after pretraining, its `encoder` initializes a classifier's (see
`research.tasks.masked_lm`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.data.subword import PAD
from research.nn.attention import padding_segments
from research.nn.transformer import Block


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int
  max_len: int  # longest input (learned positions)
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 256
  mlp_ratio: int = 4
  dropout: float = 0.1
  attention: str = "xla"  # see research.nn.attention
  dtype: str = "float32"  # compute dtype; parameters stay float32
  num_classes: int = 0  # outputs of `EncoderClassifier`'s head (unused by the others)


def _normal(std: float = 0.02):
  return nnx.initializers.normal(stddev=std)


class Encoder(nnx.Module):

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.embed = nnx.Embed(cfg.vocab_size, d, embedding_init=_normal(), dtype=cfg.dtype, rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_len, d, embedding_init=_normal(), dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([
        Block(d, cfg.num_heads, mlp_dim=cfg.mlp_ratio * d, dropout=cfg.dropout,
              attention=cfg.attention, dtype=cfg.dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, segment_ids_BxT: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Token states [B, T, D]; positions holding PAD are never attended to.

    `segment_ids_BxT` packs several sequences into a row: ids 1, 2, ... per sequence, 0 for
    padding. Tokens attend only within their sequence, and positions restart at each, so a
    packed sequence gets the states it would get alone.
    """
    T = tokens_BxT.shape[1]
    if T > self.cfg.max_len:
      raise ValueError(f"input of {T} tokens is longer than max_len={self.cfg.max_len}")
    if segment_ids_BxT is None:
      segments, positions_BxT = padding_segments(tokens_BxT != PAD), jnp.arange(T)[None]
    else:
      segments, positions_BxT = segment_ids_BxT, positions_in_segments(segment_ids_BxT)
    x_BxTxD = self.embed(tokens_BxT) + self.pos_embed(positions_BxT)
    x_BxTxD = self.dropout(x_BxTxD, deterministic=rngs is None, rngs=rngs)
    for block in self.blocks:
      x_BxTxD, _ = block(x_BxTxD, segment_ids=segments, rngs=rngs)
    return self.norm(x_BxTxD)


def positions_in_segments(segment_ids_BxT: jax.Array) -> jax.Array:
  """Each token's index within its run of equal segment ids, e.g. [1 1 1 2 2 0] -> [0 1 2 0 1 0]."""
  T = segment_ids_BxT.shape[1]
  t_BxT = jnp.broadcast_to(jnp.arange(T), segment_ids_BxT.shape)
  starts_BxT = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                                segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  return t_BxT - jax.lax.cummax(jnp.where(starts_BxT, t_BxT, 0), axis=1)


class EncoderClassifier(nnx.Module):
  """Encoder -> masked mean over real tokens -> dropout -> Linear."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    if cfg.num_classes < 1:
      raise ValueError(f"EncoderClassifier needs num_classes >= 1, got {cfg.num_classes}")
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.head = nnx.Linear(cfg.embed_dim, cfg.num_classes, kernel_init=_normal(),
                           dtype=cfg.dtype, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    h_BxTxD = self.encoder(tokens_BxT, rngs=rngs)
    valid_BxTx1 = (tokens_BxT != PAD)[..., None].astype(h_BxTxD.dtype)
    pooled_BxD = (h_BxTxD * valid_BxTx1).sum(1) / jnp.maximum(valid_BxTx1.sum(1), 1)
    pooled_BxD = self.dropout(pooled_BxD, deterministic=rngs is None, rngs=rngs)
    return self.head(pooled_BxD).astype(jnp.float32)


class MaskedLM(nnx.Module):
  """Encoder -> Linear -> GELU -> LayerNorm -> logits through the tied token embedding."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.transform = nnx.Linear(d, d, kernel_init=_normal(), dtype=cfg.dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

  def __call__(self, tokens_BxT: jax.Array, positions_BxP: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, P, V] (float32) at the P predicted positions of each row: only those go
    through the vocabulary-sized matmul."""
    h_BxTxD = self.encoder(tokens_BxT, rngs=rngs)
    h_BxPxD = jnp.take_along_axis(h_BxTxD, positions_BxP[..., None], axis=1)
    h_BxPxD = self.norm(jax.nn.gelu(self.transform(h_BxPxD)))
    return self.encoder.embed.attend(h_BxPxD).astype(jnp.float32) + self.bias.value
