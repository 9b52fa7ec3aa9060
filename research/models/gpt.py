"""GPT: a decoder-only Transformer (Radford et al. 2018/2019), the nanoGPT way.

Token + position embeddings (learned, or rotary), pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm, and logits through the tied input
embedding. `decode` runs the same blocks against a KV cache, one or more tokens at a time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  block_size: int  # longest context the model is trained on
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_ratio: int = 4  # 0: attention-only blocks (Olsson et al. 2022's induction-head models)
  dropout: float = 0.0
  use_bias: bool = False
  position: str = "learned"  # "learned" or "rope"
  attention: str = "xla"  # see research.nn.attention
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: bool = False  # recompute each block's activations in the backward pass


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def rope(x_BxTxHxD: jax.Array, positions_T: jax.Array) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + D/2)."""
  d = x_BxTxHxD.shape[-1]
  inv_freq = 1.0 / (10_000 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angle_TxD2 = positions_T[:, None].astype(jnp.float32) * inv_freq[None, :]
  sin, cos = jnp.sin(angle_TxD2)[None, :, None, :], jnp.cos(angle_TxD2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxHxD.dtype)


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    linear = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=_normal(0.02), **linear)
    # GPT-2's scaled init: residual projections shrink with depth.
    self.out = nnx.Linear(d, d, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.num_layers)), **linear)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BxTxD, *, rngs=None, cache=None, pos=None):
    cfg = self.cfg
    B, T, D = x_BxTxD.shape
    H = cfg.num_heads
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(
        self.qkv(x_BxTxD.reshape(B * T, D)).reshape(B, T, 3 * H, D // H), 3, axis=2)
    start = 0 if pos is None else pos
    if cfg.position == "rope":
      positions_T = start + jnp.arange(T)
      q_BxTxHxK, k_BxTxHxK = rope(q_BxTxHxK, positions_T), rope(k_BxTxHxK, positions_T)
    if cache is None:
      y_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, causal=True,
                                        implementation=cfg.attention)
    else:
      k_BxSxHxK = jax.lax.dynamic_update_slice(cache["k"], k_BxTxHxK.astype(cache["k"].dtype),
                                               (0, start, 0, 0))
      v_BxSxHxK = jax.lax.dynamic_update_slice(cache["v"], v_BxTxHxK.astype(cache["v"].dtype),
                                               (0, start, 0, 0))
      cache = {"k": k_BxSxHxK, "v": v_BxSxHxK}
      S = k_BxSxHxK.shape[1]
      # Query t (at absolute position start + t) sees cache slots 0 .. start + t.
      mask_TxS = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
      y_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxHxK.astype(q_BxTxHxK.dtype),
                                        v_BxSxHxK.astype(q_BxTxHxK.dtype), causal=False,
                                        mask_BxHxTxS=mask_TxS[None, None])
    y_BxTxD = self.out(y_BxTxHxK.reshape(B * T, D)).reshape(B, T, D)
    return self.dropout(y_BxTxD, deterministic=rngs is None, rngs=rngs), cache


class MLP(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, h = cfg.embed_dim, cfg.mlp_ratio * cfg.embed_dim
    linear = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.up = nnx.Linear(d, h, kernel_init=_normal(0.02), **linear)
    self.down = nnx.Linear(h, d, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.num_layers)), **linear)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BxTxD, *, rngs=None):
    x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1])  # see `research.nn.transformer.MLP`
    y_NxD = self.down(jax.nn.gelu(self.up(x_NxD), approximate=True))
    return self.dropout(y_NxD.reshape(x_BxTxD.shape), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    norm = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(cfg.embed_dim, **norm)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.embed_dim, **norm) if cfg.mlp_ratio else None
    self.mlp = MLP(cfg, rngs=rngs) if cfg.mlp_ratio else None

  def __call__(self, x_BxTxD, *, rngs=None, cache=None, pos=None):
    a_BxTxD, cache = self.attn(self.norm1(x_BxTxD), rngs=rngs, cache=cache, pos=pos)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.mlp is None:
      return x_BxTxD, cache
    return x_BxTxD + self.mlp(self.norm2(x_BxTxD), rngs=rngs), cache


class GPT(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    if cfg.embed_dim % cfg.num_heads:
      raise ValueError(f"embed_dim={cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}")
    if cfg.position not in ("learned", "rope"):
      raise ValueError(f"unknown position embedding {cfg.position!r}; choose learned or rope")
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=_normal(0.02),
                           dtype=cfg.dtype, rngs=rngs)
    if cfg.position == "learned":
      self.pos_embed = nnx.Embed(cfg.block_size, cfg.embed_dim, embedding_init=_normal(0.02),
                                 dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.LayerNorm(cfg.embed_dim, use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)

  @property
  def context_length(self) -> int:
    return self.cfg.block_size

  def _embed(self, tokens_BxT, start):
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.position == "learned":
      x_BxTxD = x_BxTxD + self.pos_embed(start + jnp.arange(tokens_BxT.shape[1]))[None]
    return x_BxTxD

  def _logits(self, x_BxTxD):
    # Tied weights: the output layer is the transposed input embedding; softmax in float32.
    B, T, D = x_BxTxD.shape
    logits_NxV = self.embed.attend(self.norm(x_BxTxD).reshape(B * T, D))
    return logits_NxV.reshape(B, T, -1).astype(jnp.float32)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, T, V] for next-token prediction; `rngs` given = training (dropout on)."""
    x_BxTxD = self.dropout(self._embed(tokens_BxT, 0), deterministic=rngs is None, rngs=rngs)
    for block in self.blocks:
      if self.cfg.remat:
        x_BxTxD = nnx.remat(lambda b, x: b(x, rngs=rngs)[0])(block, x_BxTxD)
      else:
        x_BxTxD, _ = block(x_BxTxD, rngs=rngs)
    return self._logits(x_BxTxD)

  def init_cache(self, batch_size: int) -> list[dict[str, jax.Array]]:
    cfg = self.cfg
    shape = (batch_size, cfg.block_size, cfg.num_heads, cfg.embed_dim // cfg.num_heads)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
            for _ in range(cfg.num_layers)]

  def decode(self, tokens_BxT, cache, pos):
    """Logits for `tokens_BxT` placed at positions pos..pos+T-1, reading and extending `cache`."""
    x_BxTxD = self._embed(tokens_BxT, pos)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_BxTxD, layer_cache = block(x_BxTxD, cache=layer_cache, pos=pos)
      new_cache.append(layer_cache)
    return self._logits(x_BxTxD), new_cache
