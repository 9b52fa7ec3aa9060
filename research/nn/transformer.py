"""Pre-LayerNorm Transformer layers shared by the encoder, encoder-decoder, ViT and SASRec.

`Block` is self-attention (bidirectional or causal, padding and packed sequences given as
segment ids), optional cross-attention to an encoder's output, and an MLP, each on a residual
branch. Both attentions are `research.nn.attention.MultiHeadAttention`, the module the GPT
uses too, so every model picks its kernel the same way.
"""

from __future__ import annotations

import jax
from flax import nnx

from research.nn.attention import MultiHeadAttention


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
    self.self_attention = MultiHeadAttention(dim, num_heads, implementation=attention, **common)
    self.norm_cross = nnx.LayerNorm(dim, **norm) if cross_attention else None
    self.cross_attention = (MultiHeadAttention(dim, num_heads, implementation=attention, **common)
                            if cross_attention else None)
    self.norm_mlp = nnx.LayerNorm(dim, **norm)
    self.mlp = MLP(dim, mlp_dim, **common)

  def __call__(self, x_BxTxD, *, segment_ids=None, causal=False, context_BxSxD=None,
               context_segment_ids=None, rngs=None, cache=None, pos=0, context_kv=None):
    """Returns (output, cache); `cache` is the self-attention's and `context_kv` the
    cross-attention's precomputed keys and values (see MultiHeadAttention)."""
    a_BxTxD, cache = self.self_attention(self.norm_self(x_BxTxD), segment_ids=segment_ids,
                                         causal=causal, rngs=rngs, cache=cache, pos=pos)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.cross_attention is not None:
      c_BxTxD, _ = self.cross_attention(self.norm_cross(x_BxTxD), context_BxSxD,
                                        segment_ids=context_segment_ids, rngs=rngs,
                                        context_kv=context_kv)
      x_BxTxD = x_BxTxD + c_BxTxD
    return x_BxTxD + self.mlp(self.norm_mlp(x_BxTxD), rngs=rngs), cache
