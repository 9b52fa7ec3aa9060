"""Pre-LayerNorm Transformer layers shared by the encoder, encoder-decoder, ViT and SASRec.

`Block` is self-attention (bidirectional with a padding mask, or causal), optional
cross-attention to an encoder's output, and an MLP, each on a residual branch. Attention goes
through `research.nn.attention`, so every model picks its kernel the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.attention import dot_product_attention


def padding_mask(valid_BxS: jax.Array) -> jax.Array:
  """[B, 1, 1, S] attention mask from a [B, S] mask of real (non-padding) positions."""
  return valid_BxS.astype(bool)[:, None, None, :]


class MultiHeadAttention(nnx.Module):
  """Self-attention, or cross-attention when `context_BxSxD` is given; optional KV cache."""

  def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0, use_bias: bool = True,
               attention: str = "xla", dtype="float32", rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    self.num_heads, self.attention = num_heads, attention
    linear = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.query = nnx.Linear(dim, dim, **linear)
    self.key_value = nnx.Linear(dim, 2 * dim, **linear)
    self.out = nnx.Linear(dim, dim, **linear)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxTxD, context_BxSxD=None, *, mask_BxHxTxS=None, causal=False, rngs=None,
               cache=None, pos=None, context_kv=None):
    """Returns (output, cache). With `cache` (self-attention only), the keys and values of `x`
    are written at `pos` and the queries attend to cache slots up to their own position.
    `context_kv` = `self.context_kv(context)`, computed once when decoding step by step."""
    B, T, D = x_BxTxD.shape
    H = self.num_heads
    q_BxTxHxK = self.query(x_BxTxD.reshape(B * T, D)).reshape(B, T, H, D // H)
    if context_kv is None:
      context_kv = self.context_kv(x_BxTxD if context_BxSxD is None else context_BxSxD)
    k_BxSxHxK, v_BxSxHxK = context_kv
    if cache is not None:
      k_BxSxHxK = jax.lax.dynamic_update_slice(cache["k"], k_BxSxHxK, (0, pos, 0, 0))
      v_BxSxHxK = jax.lax.dynamic_update_slice(cache["v"], v_BxSxHxK, (0, pos, 0, 0))
      cache = {"k": k_BxSxHxK, "v": v_BxSxHxK}
      S = k_BxSxHxK.shape[1]
      seen_TxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
      mask_BxHxTxS = seen_TxS[None, None] if mask_BxHxTxS is None else mask_BxHxTxS & seen_TxS
      causal = False  # The cache mask already orders the positions.
    y_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, causal=causal,
                                      implementation=self.attention, mask_BxHxTxS=mask_BxHxTxS)
    y_BxTxD = self.out(y_BxTxHxK.reshape(B * T, D)).reshape(B, T, D)
    return self.dropout(y_BxTxD, deterministic=rngs is None, rngs=rngs), cache

  def context_kv(self, source_BxSxD):
    """The keys and values [B, S, H, D/H] of `source` (x itself for self-attention)."""
    B, S, D = source_BxSxD.shape
    H = self.num_heads
    kv_NxE = self.key_value(source_BxSxD.reshape(B * S, D))
    k_BxSxHxK, v_BxSxHxK = jnp.split(kv_NxE.reshape(B, S, 2 * H, D // H), 2, axis=2)
    return k_BxSxHxK, v_BxSxHxK

  def init_cache(self, batch_size: int, length: int, dtype="float32"):
    shape = (batch_size, length, self.num_heads, self.query.out_features // self.num_heads)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0, use_bias: bool = True,
               activation=jax.nn.gelu, dtype="float32", rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.activation = activation
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxTxD, *, rngs=None):
    # Dense layers see [B*T, D]: on 3-D activations XLA:CPU materializes a transposed copy of
    # each weight gradient's input, which made the MLP's backward pass 2x slower.
    x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1])
    y_NxD = self.down(self.activation(self.up(x_NxD)))
    return self.dropout(y_NxD.reshape(x_BxTxD.shape), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):
  """x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), context)] + MLP(LN(x))."""

  def __init__(self, dim: int, num_heads: int, *, mlp_dim: int, dropout: float = 0.0,
               cross_attention: bool = False, use_bias: bool = True, attention: str = "xla",
               dtype="float32", rngs: nnx.Rngs):
    common = dict(dropout=dropout, use_bias=use_bias, dtype=dtype, rngs=rngs)
    norm = dict(dtype=dtype, rngs=rngs)
    self.norm_self = nnx.LayerNorm(dim, **norm)
    self.self_attention = MultiHeadAttention(dim, num_heads, attention=attention, **common)
    self.norm_cross = nnx.LayerNorm(dim, **norm) if cross_attention else None
    self.cross_attention = (MultiHeadAttention(dim, num_heads, attention=attention, **common)
                            if cross_attention else None)
    self.norm_mlp = nnx.LayerNorm(dim, **norm)
    self.mlp = MLP(dim, mlp_dim, **common)

  def __call__(self, x_BxTxD, *, mask_BxHxTxS=None, causal=False, context_BxSxD=None,
               context_mask_BxHxTxS=None, rngs=None, cache=None, pos=None, context_kv=None):
    """Returns (output, cache); `cache` is the self-attention's and `context_kv` the
    cross-attention's precomputed keys and values (see MultiHeadAttention)."""
    a_BxTxD, cache = self.self_attention(self.norm_self(x_BxTxD), mask_BxHxTxS=mask_BxHxTxS,
                                         causal=causal, rngs=rngs, cache=cache, pos=pos)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.cross_attention is not None:
      c_BxTxD, _ = self.cross_attention(self.norm_cross(x_BxTxD), context_BxSxD,
                                        mask_BxHxTxS=context_mask_BxHxTxS, rngs=rngs,
                                        context_kv=context_kv)
      x_BxTxD = x_BxTxD + c_BxTxD
    return x_BxTxD + self.mlp(self.norm_mlp(x_BxTxD), rngs=rngs), cache
