"""Encoder-decoder Transformer for translation (Vaswani et al. 2017), pre-LayerNorm.

Sinusoidal positions, embeddings scaled by sqrt(D), and the output layer tied to the target
embedding (also to the source embedding when the two languages share one vocabulary). The
interface every translation model here has:

- `encode(src_BxS) -> memory` (a dict with the source padding mask `valid`),
- `init_cache(memory, max_len) -> (context, cache)`: what decoding reads and never changes
  (here the cross-attention keys and values, computed once) and what each step updates
  (here the self-attention KV cache of `max_len` target positions),
- `decode(tokens_BxT, context, cache, pos) -> (logits_BxTxV, cache)` for target positions
  pos..pos+T-1,
- `__call__(src_BxS, tgt_in_BxT) -> logits_BxTxV`, teacher-forced.
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
class Seq2SeqConfig:
  src_vocab_size: int
  tgt_vocab_size: int
  shared_vocab: bool = True  # one embedding for source, target and output
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  num_heads: int = 4
  embed_dim: int = 256
  mlp_dim: int = 1024
  dropout: float = 0.1
  attention: str = "xla"
  dtype: str = "float32"


def sinusoid(positions_T: jax.Array, dim: int) -> jax.Array:
  """The fixed position encoding of Vaswani et al. (2017), [T, dim]: sin and cos halves."""
  inv_freq = 1.0 / (10_000 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angle_TxD2 = positions_T[:, None].astype(jnp.float32) * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(angle_TxD2), jnp.cos(angle_TxD2)], axis=-1)


class Seq2SeqTransformer(nnx.Module):

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    if cfg.shared_vocab and cfg.src_vocab_size != cfg.tgt_vocab_size:
      raise ValueError("a shared vocabulary needs src_vocab_size == tgt_vocab_size")
    self.cfg = cfg
    d = cfg.embed_dim
    # Unit-variance inputs after the sqrt(D) scaling; small logits through the tied output.
    embed = dict(embedding_init=nnx.initializers.normal(d ** -0.5), dtype=cfg.dtype, rngs=rngs)
    self.tgt_embed = nnx.Embed(cfg.tgt_vocab_size, d, **embed)
    self.src_embed = self.tgt_embed if cfg.shared_vocab else nnx.Embed(cfg.src_vocab_size, d, **embed)
    block = dict(mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, attention=cfg.attention,
                 dtype=cfg.dtype, rngs=rngs)
    self.encoder = nnx.List([Block(d, cfg.num_heads, **block)
                             for _ in range(cfg.num_encoder_layers)])
    self.decoder = nnx.List([Block(d, cfg.num_heads, cross_attention=True, **block)
                             for _ in range(cfg.num_decoder_layers)])
    self.encoder_norm = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
    self.decoder_norm = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def _embed(self, embed: nnx.Embed, tokens_BxT, start, rngs):
    x_BxTxD = embed(tokens_BxT) * self.cfg.embed_dim ** 0.5
    x_BxTxD = x_BxTxD + sinusoid(start + jnp.arange(tokens_BxT.shape[1]), self.cfg.embed_dim)
    return self.dropout(x_BxTxD.astype(self.cfg.dtype), deterministic=rngs is None, rngs=rngs)

  def encode(self, src_BxS, *, rngs=None) -> dict:
    valid_BxS = src_BxS != PAD
    segments = padding_segments(valid_BxS)
    x_BxSxD = self._embed(self.src_embed, src_BxS, 0, rngs)
    for block in self.encoder:
      x_BxSxD, _ = block(x_BxSxD, segment_ids=segments, rngs=rngs)
    return {"x": self.encoder_norm(x_BxSxD), "valid": valid_BxS}

  def init_cache(self, memory: dict, max_len: int) -> tuple[dict, list]:
    """(the cross-attention keys and values of every decoder layer, and the source mask;
    empty self-attention caches for `max_len` target positions)."""
    B = memory["x"].shape[0]
    context = {"valid": memory["valid"],
               "kv": [b.cross_attention.context_kv(memory["x"]) for b in self.decoder]}
    return context, [b.self_attention.init_cache(B, max_len, self.cfg.dtype) for b in self.decoder]

  def decode(self, tokens_BxT, context: dict, cache: list, pos, *, rngs=None):
    x_BxTxD = self._embed(self.tgt_embed, tokens_BxT, pos, rngs)
    context_segments = padding_segments(context["valid"], tokens_BxT.shape[1])
    new_cache = []
    for block, context_kv, layer_cache in zip(self.decoder, context["kv"], cache):
      x_BxTxD, layer_cache = block(x_BxTxD, context_segment_ids=context_segments, rngs=rngs,
                                   cache=layer_cache, pos=pos, context_kv=context_kv)
      new_cache.append(layer_cache)
    return self.tgt_embed.attend(self.decoder_norm(x_BxTxD)).astype(jnp.float32), new_cache

  def __call__(self, src_BxS, tgt_in_BxT, *, rngs=None):
    """Teacher forcing: logits for every target position, in one parallel pass."""
    memory = self.encode(src_BxS, rngs=rngs)
    context_segments = padding_segments(memory["valid"], tgt_in_BxT.shape[1])
    x_BxTxD = self._embed(self.tgt_embed, tgt_in_BxT, 0, rngs)
    for block in self.decoder:
      x_BxTxD, _ = block(x_BxTxD, causal=True, context_BxSxD=memory["x"],
                         context_segment_ids=context_segments, rngs=rngs)
    return self.tgt_embed.attend(self.decoder_norm(x_BxTxD)).astype(jnp.float32)
