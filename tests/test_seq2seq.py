"""Properties of the translation models: causal decoder, padding-blind encoder, cached decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.data.subword import BOS, EOS, PAD
from research.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig
from research.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

V, T = 16, 8


def transformer(shared_vocab=True):
  return Seq2SeqTransformer(Seq2SeqConfig(V, V, shared_vocab=shared_vocab, num_encoder_layers=2,
                                          num_decoder_layers=2, num_heads=2, embed_dim=16,
                                          mlp_dim=32), rngs=nnx.Rngs(0))


def lstm(shared_vocab=True):
  return LSTMSeq2Seq(LSTMSeq2SeqConfig(V, V, shared_vocab=shared_vocab, embed_dim=8, hidden_dim=16,
                                       num_encoder_layers=2, num_decoder_layers=2),
                     rngs=nnx.Rngs(0))


MODELS = pytest.mark.parametrize("make", [transformer, lstm], ids=["transformer", "lstm"])
forward = nnx.jit(lambda model, src, tgt: model(src, tgt))


def sources():
  """Two sources of different lengths (ids, EOS, PAD...), [2, 7]."""
  return jnp.array([[5, 6, 7, 8, 9, EOS, PAD], [10, 11, EOS, PAD, PAD, PAD, PAD]])


def targets():
  """Decoder inputs with every token distinct: BOS then 4 .. 4 + T - 2, [2, T]."""
  return jnp.tile(jnp.array([BOS] + list(range(4, 4 + T - 1)))[None], (2, 1))


@MODELS
def test_decoder_is_causal_through_gradients(make):
  # Separate vocabularies: the target embedding is the decoder's input alone. Output t is the
  # logit of an unused token, so the tied output layer adds gradient to that row only.
  model, src, tgt = make(shared_vocab=False), sources(), targets()
  unused = V - 1
  graphdef, state = nnx.split(model)

  @jax.jit
  def grad_of_output(table):
    def outputs(table):
      pure = state.to_pure_dict()
      pure["tgt_embed"]["embedding"] = table
      return nnx.merge(graphdef, pure)(src, tgt)[:, :, unused].sum(0)
    return jax.jacrev(outputs)(table)  # [T, V, D]

  grad_TxVxD = grad_of_output(model.tgt_embed.embedding.value)
  for t in (0, 3, T - 1):
    grad_VxD = grad_TxVxD[t]
    rows = np.asarray(tgt[0])
    assert np.all(grad_VxD[rows[t + 1:]] == 0), f"output {t} depends on a later input"
    assert np.all(np.abs(grad_VxD[rows[:t + 1]]).sum(-1) > 0), f"output {t} ignores an earlier one"


@MODELS
def test_encoder_ignores_padding(make):
  model, src, tgt = make(), sources(), targets()
  longer = jnp.pad(src, ((0, 0), (0, 5)), constant_values=PAD)
  full = forward(model, src, tgt)
  np.testing.assert_allclose(forward(model, longer, tgt), full, atol=1e-5)
  # The short row alone, cut to its own length, gives its row of the batch.
  np.testing.assert_allclose(forward(model, src[1:, :3], tgt[1:]), full[1:], atol=1e-5)


@MODELS
def test_cached_decoding_equals_teacher_forcing(make):
  model, src, tgt = make(), sources(), targets()

  @nnx.jit(static_argnums=2)
  def chunked(model, src, sizes):
    """Feeds the target in chunks of `sizes` positions, each continuing the cache."""
    (context, cache), out, pos = model.init_cache(model.encode(src), T), [], 0
    for size in sizes:
      logits_BxCxV, cache = model.decode(tgt[:, pos:pos + size], context, cache, pos)
      out.append(logits_BxCxV)
      pos += size
    return jnp.concatenate(out, axis=1)

  full_BxTxV = forward(model, src, tgt)
  np.testing.assert_allclose(chunked(model, src, (1,) * T), full_BxTxV, atol=1e-5)
  np.testing.assert_allclose(chunked(model, src, (3, T - 3)), full_BxTxV, atol=1e-5)


@MODELS
def test_dropout_is_on_only_in_training(make):
  model = make()
  model = type(model)(dataclasses.replace(model.cfg, dropout=0.5), rngs=nnx.Rngs(0))
  src, tgt = sources(), targets()
  dropped = nnx.jit(lambda model, src, tgt: model(src, tgt, rngs=nnx.Rngs(dropout=1)))
  np.testing.assert_array_equal(forward(model, src, tgt), forward(model, src, tgt))
  assert not np.allclose(dropped(model, src, tgt), forward(model, src, tgt))


def test_shared_vocabulary_shares_one_embedding():
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(transformer(shared_vocab=False)) - count(transformer()) == V * 16
  with pytest.raises(ValueError, match="shared vocabulary"):
    Seq2SeqTransformer(Seq2SeqConfig(V, V + 1), rngs=nnx.Rngs(0))
