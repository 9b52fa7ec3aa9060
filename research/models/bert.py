"""BERT as Devlin et al. (2019) built it: the architecture of Hugging Face's `BertModel`, so
pretrained checkpoints (e.g. all-MiniLM-L6-v2) load into it (`research.pretrained.hf`).

It differs from this project's own encoder (`research.models.encoder`, pre-LN) where BERT does:
post-LayerNorm layers (x = LN(x + Attn(x)); x = LN(x + MLP(x))), word + learned absolute
position + token-type embeddings followed by a LayerNorm, the exact (erf) GELU, the
checkpoint's LayerNorm epsilon, and a pooler (tanh(Linear([CLS] state))). Attention is
`research.nn.attention.MultiHeadAttention` (query and fused key/value projections with bias),
so BERT picks its kernel like every other Transformer here.

Padding: a position whose `mask` is 0 (default: tokens equal to `pad_token_id`) is never
attended to. Its own output differs from `transformers`' (there a padding query attends the
real tokens; here it attends padding only) and means nothing in either.

`mean_pool` is sentence-transformers' pooling (the mean of the real tokens' states), what
all-MiniLM-L6-v2's sentence embeddings are. `BertClassifier` puts a linear head on mean
pooling, the [CLS] state or the pooler's output. Dropout: hidden dropout as BERT's (after the
embeddings and on each residual branch); the attention probabilities get none (the attention
kernels have no dropout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.attention import MultiHeadAttention, padding_segments
from research.nn.transformer import MLP

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf), BERT's
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
POOLINGS = ("mean", "cls", "pooler")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2  # 0: no token-type embeddings
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  mlp_dim: int = 3072
  activation: str = "gelu"  # a key of ACTIVATIONS (`hidden_act` in config.json)
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1  # `hidden_dropout_prob`
  pad_token_id: int = 0
  pooler: bool = True  # the tanh pooler on [CLS]
  attention: str = "xla"  # see research.nn.attention
  dtype: str = "float32"  # compute dtype; parameters stay float32
  # BertClassifier only:
  num_classes: int = 0
  pooling: str = "mean"  # mean | cls | pooler

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"BertConfig.activation {self.activation!r} is not one of "
                       f"{', '.join(ACTIVATIONS)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"BertConfig.pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}")


def _normal(std: float = 0.02):
  return nnx.initializers.normal(stddev=std)


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it: the fast E[x²] - E[x]² loses digits.
  return nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                       dtype=cfg.dtype, rngs=rngs)


class PostLNBlock(nnx.Module):
  """x = LN(x + SelfAttn(x)); x = LN(x + MLP(x)): BERT's layer."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.attention = MultiHeadAttention(d, cfg.num_heads, use_bias=True, dropout=cfg.dropout,
                                        implementation=cfg.attention, dtype=cfg.dtype,
                                        kernel_init=_normal(), out_init=_normal(), rngs=rngs)
    self.norm_attention = _layer_norm(cfg, rngs)
    self.mlp = MLP(d, cfg.mlp_dim, dropout=cfg.dropout, activation=ACTIVATIONS[cfg.activation],
                   dtype=cfg.dtype, rngs=rngs)
    self.norm_mlp = _layer_norm(cfg, rngs)

  def __call__(self, x_BxTxD, *, segment_ids=None, rngs=None):
    a_BxTxD, _ = self.attention(x_BxTxD, segment_ids=segment_ids, rngs=rngs)
    x_BxTxD = self.norm_attention(x_BxTxD + a_BxTxD)
    return self.norm_mlp(x_BxTxD + self.mlp(x_BxTxD, rngs=rngs))


class Bert(nnx.Module):
  """`BertModel`: token states [B, T, D] (and the pooler's output through `pool`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = cfg.embed_dim, cfg.dtype
    self.embed = nnx.Embed(cfg.vocab_size, d, embedding_init=_normal(), dtype=dt, rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_position_embeddings, d, embedding_init=_normal(),
                               dtype=dt, rngs=rngs)
    self.type_embed = (nnx.Embed(cfg.type_vocab_size, d, embedding_init=_normal(), dtype=dt,
                                 rngs=rngs) if cfg.type_vocab_size else None)
    self.embed_norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([PostLNBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.pooler = (nnx.Linear(d, d, kernel_init=_normal(), dtype=dt, rngs=rngs)
                   if cfg.pooler else None)

  def __call__(self, tokens_BxT: jax.Array, *, token_types_BxT: jax.Array | None = None,
               mask_BxT: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Last hidden states [B, T, D]. `mask_BxT` (1/True = real token) defaults to
    tokens != pad_token_id; `token_types_BxT` to 0 (sentence A)."""
    T = tokens_BxT.shape[1]
    if T > self.cfg.max_position_embeddings:
      raise ValueError(f"input of {T} tokens is longer than max_position_embeddings="
                       f"{self.cfg.max_position_embeddings}")
    if mask_BxT is None:
      mask_BxT = tokens_BxT != self.cfg.pad_token_id
    x_BxTxD = self.embed(tokens_BxT) + self.pos_embed(jnp.arange(T))[None]
    if self.type_embed is not None:
      types_BxT = (jnp.zeros_like(tokens_BxT) if token_types_BxT is None else token_types_BxT)
      x_BxTxD = x_BxTxD + self.type_embed(types_BxT)
    x_BxTxD = self.dropout(self.embed_norm(x_BxTxD), deterministic=rngs is None, rngs=rngs)
    segments = padding_segments(mask_BxT.astype(bool))
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, segment_ids=segments, rngs=rngs)
    return x_BxTxD

  def pool(self, h_BxTxD: jax.Array) -> jax.Array:
    """The pooler's output tanh(W h[CLS] + b) [B, D] (`pooler_output` in transformers)."""
    if self.pooler is None:
      raise ValueError("this BERT has no pooler (BertConfig.pooler=False)")
    return jnp.tanh(self.pooler(h_BxTxD[:, 0]))


def mean_pool(h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """sentence-transformers' mean pooling: the mean of the real tokens' states [B, D]."""
  m_BxTx1 = mask_BxT[..., None].astype(h_BxTxD.dtype)
  return (h_BxTxD * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1e-9)


class BertClassifier(nnx.Module):
  """Bert -> pooling (`cfg.pooling`: mean of real tokens, [CLS] state, or the pooler) ->
  dropout -> Linear: BERT's fine-tuning recipe."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    if cfg.num_classes < 1:
      raise ValueError(f"BertClassifier needs num_classes >= 1, got {cfg.num_classes}")
    if cfg.pooling == "pooler" and not cfg.pooler:
      raise ValueError("BertConfig.pooling='pooler' needs a checkpoint with a pooler")
    self.cfg = cfg
    self.bert = Bert(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.head = nnx.Linear(cfg.embed_dim, cfg.num_classes, kernel_init=_normal(),
                           dtype=cfg.dtype, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    mask_BxT = tokens_BxT != self.cfg.pad_token_id
    h_BxTxD = self.bert(tokens_BxT, mask_BxT=mask_BxT, rngs=rngs)
    if self.cfg.pooling == "mean":
      pooled_BxD = mean_pool(h_BxTxD, mask_BxT)
    elif self.cfg.pooling == "cls":
      pooled_BxD = h_BxTxD[:, 0]
    else:
      pooled_BxD = self.bert.pool(h_BxTxD)
    pooled_BxD = self.dropout(pooled_BxD, deterministic=rngs is None, rngs=rngs)
    return self.head(pooled_BxD).astype(jnp.float32)
