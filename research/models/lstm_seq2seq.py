"""The recurrent translation model Transformers replaced: an LSTM encoder-decoder with attention.

A bidirectional LSTM encoder; an LSTM decoder whose state initialises from the mean encoder
output; global "general" attention after the decoder (Luong et al. 2015, without input
feeding, so teacher-forced training runs each layer as one scan over the whole target); the
attentional state is projected to the embedding width and scored against the tied target
embedding (Press & Wolf 2017), as in the Transformer.
It has the same `encode` / `init_cache` / `decode` / `__call__` interface as
`research.models.seq2seq.Seq2SeqTransformer` (context: the encoder's outputs and attention
keys; cache: the decoder's (c, h) per layer), so training and beam search are shared.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.data.subword import PAD
from research.models.lstm import LSTM


@dataclasses.dataclass(frozen=True)
class LSTMSeq2SeqConfig:
  src_vocab_size: int
  tgt_vocab_size: int
  shared_vocab: bool = True
  embed_dim: int = 256
  hidden_dim: int = 512  # the decoder's; each encoder direction has half
  num_encoder_layers: int = 1
  num_decoder_layers: int = 2
  dropout: float = 0.2
  dtype: str = "float32"


def reverse_valid(x_BxTxD, lengths_B):
  """Reverses the first `lengths` steps of each row and leaves the padding in place."""
  T = x_BxTxD.shape[1]
  t_T = jnp.arange(T)
  index_BxT = jnp.where(t_T < lengths_B[:, None], lengths_B[:, None] - 1 - t_T, t_T)
  return jnp.take_along_axis(x_BxTxD, index_BxT[:, :, None], axis=1)


class LSTMSeq2Seq(nnx.Module):

  def __init__(self, cfg: LSTMSeq2SeqConfig, *, rngs: nnx.Rngs):
    if cfg.shared_vocab and cfg.src_vocab_size != cfg.tgt_vocab_size:
      raise ValueError("a shared vocabulary needs src_vocab_size == tgt_vocab_size")
    if cfg.hidden_dim % 2:
      raise ValueError(f"hidden_dim={cfg.hidden_dim} must be even (two encoder directions)")
    self.cfg = cfg
    E, H = cfg.embed_dim, cfg.hidden_dim
    common = dict(dtype=cfg.dtype, rngs=rngs)
    # Small enough that the tied output layer starts with small logits.
    embed = dict(embedding_init=nnx.initializers.normal(E ** -0.5), **common)
    self.tgt_embed = nnx.Embed(cfg.tgt_vocab_size, E, **embed)
    self.src_embed = self.tgt_embed if cfg.shared_vocab else nnx.Embed(cfg.src_vocab_size, E, **embed)
    sizes = [E] + [H] * cfg.num_encoder_layers
    self.forward = nnx.List([LSTM(i, H // 2, **common) for i in sizes[:-1]])
    self.backward = nnx.List([LSTM(i, H // 2, **common) for i in sizes[:-1]])
    self.bridge = nnx.Linear(H, 2 * H * cfg.num_decoder_layers, **common)
    self.decoder = nnx.List([LSTM(i, H, **common)
                             for i in [E] + [H] * (cfg.num_decoder_layers - 1)])
    self.attention_key = nnx.Linear(H, H, use_bias=False, **common)  # Luong's W_a
    self.combine = nnx.Linear(2 * H, E, **common)  # h~ = tanh(W_c [context; h])
    self.dropout = nnx.Dropout(cfg.dropout)

  def _drop(self, x, rngs):
    return self.dropout(x, deterministic=rngs is None, rngs=rngs)

  def encode(self, src_BxS, *, rngs=None) -> dict:
    valid_BxS = src_BxS != PAD
    lengths_B = valid_BxS.sum(axis=1)
    x_BxSxD = self.src_embed(src_BxS)
    for forward, backward in zip(self.forward, self.backward):
      x_BxSxD = self._drop(x_BxSxD, rngs)
      _, f_BxSxH = forward(x_BxSxD)
      # Padding comes after each sentence in both directions, so it never reaches real steps.
      _, b_BxSxH = backward(reverse_valid(x_BxSxD, lengths_B))
      x_BxSxD = jnp.concatenate([f_BxSxH, reverse_valid(b_BxSxH, lengths_B)], axis=-1)
    return {"x": self._drop(x_BxSxD, rngs), "valid": valid_BxS}

  def init_cache(self, memory: dict, max_len: int | None = None) -> tuple[dict, list]:
    """(the encoder's outputs and their attention keys; the decoder's (c, h) per layer, from
    the mean encoder output)."""
    del max_len  # The carries hold the whole history.
    x_BxSxH, valid_BxS = memory["x"], memory["valid"]
    weights_BxS = valid_BxS / jnp.maximum(valid_BxS.sum(axis=1, keepdims=True), 1)
    mean_BxH = jnp.einsum("bs,bsh->bh", weights_BxS.astype(x_BxSxH.dtype), x_BxSxH)
    init_Bx2LxH = jnp.tanh(self.bridge(mean_BxH)).reshape(mean_BxH.shape[0], -1, self.cfg.hidden_dim)
    carries = [(init_Bx2LxH[:, 2 * i], init_Bx2LxH[:, 2 * i + 1]) for i in range(len(self.decoder))]
    context = {"memory": x_BxSxH, "keys": self.attention_key(x_BxSxH), "valid": valid_BxS}
    return context, carries

  def decode(self, tokens_BxT, context: dict, cache: list, pos=None, *, rngs=None):
    del pos  # The carries hold the whole history.
    x_BxTxD = self.tgt_embed(tokens_BxT)
    carries = []
    for layer, carry in zip(self.decoder, cache):
      carry, x_BxTxD = layer(self._drop(x_BxTxD, rngs), carry)
      carries.append(carry)
    scores_BxTxS = jnp.einsum("bth,bsh->bts", x_BxTxD, context["keys"])
    scores_BxTxS = jnp.where(context["valid"][:, None, :], scores_BxTxS, -1e9)
    weights_BxTxS = jax.nn.softmax(scores_BxTxS.astype(jnp.float32), axis=-1)
    context_BxTxH = jnp.einsum("bts,bsh->bth", weights_BxTxS.astype(x_BxTxD.dtype),
                               context["memory"])
    h_BxTxE = jnp.tanh(self.combine(jnp.concatenate([context_BxTxH, x_BxTxD], axis=-1)))
    return self.tgt_embed.attend(self._drop(h_BxTxE, rngs)).astype(jnp.float32), carries

  def __call__(self, src_BxS, tgt_in_BxT, *, rngs=None):
    """Teacher forcing: the decoder reads the whole target in one scan per layer."""
    context, cache = self.init_cache(self.encode(src_BxS, rngs=rngs))
    return self.decode(tgt_in_BxT, context, cache, rngs=rngs)[0]
