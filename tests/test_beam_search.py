"""Beam search: equal to greedy at width 1, better than greedy where greedy fails, exact when
the beam covers the whole search space, and scoring what the model scores."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models.beam_search import (beam_search, greedy_search, length_penalty,
                                          repeat_beams)
from research.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig
from research.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

BOS, EOS = 2, 3


def model_step(model, src_BxS, max_len, beam_size=1):
  context, cache = model.init_cache(model.encode(src_BxS), max_len)
  context = repeat_beams(context, beam_size)

  def step(tokens_N, cache, pos):
    logits_Nx1xV, cache = model.decode(tokens_N[:, None], context, cache, pos)
    return logits_Nx1xV[:, 0], cache

  return step, cache


@nnx.jit(static_argnames=("beam_size", "max_len", "alpha"))
def model_beam_search(model, src_BxS, *, beam_size, max_len, alpha):
  step, cache = model_step(model, src_BxS, max_len, beam_size)
  return beam_search(step, cache, batch_size=src_BxS.shape[0], beam_size=beam_size,
                     max_len=max_len, bos=BOS, eos=EOS, alpha=alpha)


@nnx.jit(static_argnames="max_len")
def model_greedy_search(model, src_BxS, *, max_len):
  step, cache = model_step(model, src_BxS, max_len)
  return greedy_search(step, cache, batch_size=src_BxS.shape[0], max_len=max_len, bos=BOS, eos=EOS)


forward = nnx.jit(lambda model, src, tgt: model(src, tgt))


def transformer(V=12):
  return Seq2SeqTransformer(Seq2SeqConfig(V, V, num_encoder_layers=1, num_decoder_layers=2,
                                          num_heads=2, embed_dim=16, mlp_dim=32),
                            rngs=nnx.Rngs(0))


def lstm(V=12):
  return LSTMSeq2Seq(LSTMSeq2SeqConfig(V, V, embed_dim=8, hidden_dim=16), rngs=nnx.Rngs(0))


MODELS = pytest.mark.parametrize("make", [transformer, lstm], ids=["transformer", "lstm"])


def random_sources(B=4, S=5, V=12):
  return jax.random.randint(jax.random.key(1), (B, S), 4, V)


def teacher_forced_logp(model, src_BxS, seqs_BxL):
  """log p of each sequence up to and including its first EOS (or all of it), and its length."""
  tgt_in = jnp.concatenate([jnp.full((len(seqs_BxL), 1), BOS), seqs_BxL[:, :-1]], axis=1)
  logp_BxLxV = jax.nn.log_softmax(forward(model, src_BxS, tgt_in))
  token_logp = np.take_along_axis(np.asarray(logp_BxLxV), np.asarray(seqs_BxL)[..., None], -1)[..., 0]
  out = []
  for row, seq in zip(token_logp, np.asarray(seqs_BxL)):
    n = list(seq).index(EOS) + 1 if EOS in seq else len(seq)
    out.append((row[:n].sum(), n))
  return out


@MODELS
def test_beam_of_one_without_length_penalty_is_greedy(make):
  model, src = make(), random_sources()
  greedy = model_greedy_search(model, src, max_len=10)
  seqs, _ = model_beam_search(model, src, beam_size=1, max_len=10, alpha=0.0)
  np.testing.assert_array_equal(seqs[:, 0], greedy)


@MODELS
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_scores_are_the_models_length_normalized_log_probabilities(make, alpha):
  # Rescoring every returned hypothesis by teacher forcing checks that caches followed their beams.
  model, src = make(), random_sources()
  seqs_BxKxL, scores_BxK = model_beam_search(model, src, beam_size=3, max_len=8, alpha=alpha)
  for k in range(3):
    rescored = teacher_forced_logp(model, src, seqs_BxKxL[:, k])
    expected = [logp / length_penalty(n, alpha) for logp, n in rescored]
    np.testing.assert_allclose(scores_BxK[:, k], expected, rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(scores_BxK, axis=1) <= 0), "hypotheses are not sorted best first"


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_a_beam_covering_the_search_space_finds_the_best_sequence(alpha):
  V, L = 5, 3
  model = transformer(V)
  src = random_sources(B=2, V=V)
  seqs_BxKxL, _ = model_beam_search(model, src, beam_size=V ** (L - 1), max_len=L, alpha=alpha)
  # Every output: up to L tokens, ending at its first EOS or at the length limit.
  candidates = [c for c in itertools.product(range(V), repeat=L)
                if EOS not in c[:-1] or c[c.index(EOS) + 1:] == (EOS,) * (L - 1 - c.index(EOS))]
  for b in range(2):
    rows = jnp.array(candidates)
    scored = teacher_forced_logp(model, jnp.tile(src[b:b + 1], (len(rows), 1)), rows)
    best = max(range(len(rows)), key=lambda i: scored[i][0] / length_penalty(scored[i][1], alpha))
    np.testing.assert_array_equal(seqs_BxKxL[b, 0], rows[best])


def markov_step(table_VxV):
  """A model whose next-token logits depend on the previous token only; no cache."""
  logits_VxV = jnp.log(jnp.asarray(table_VxV))
  return lambda tokens_N, cache, pos: (logits_VxV[tokens_N], cache)


def test_beam_search_finds_what_greedy_misses():
  # From BOS: "4" (0.6) or "5" (0.4). After "4" the mass spreads over three tokens; "5" then
  # ends surely. Greedy commits to "4" (best continuation 0.6 * 0.34 = 0.204); the best
  # sequence is "5 EOS" (0.4).
  eps = 1e-6
  table = np.full((7, 7), eps)
  table[BOS, 4], table[BOS, 5] = 0.6, 0.4
  table[4, 6], table[4, 4], table[4, EOS] = 0.34, 0.33, 0.33
  table[5, EOS] = 1.0
  table[6, EOS] = table[EOS, EOS] = 1.0
  step = markov_step(table / table.sum(1, keepdims=True))
  cache = {"unused": jnp.zeros((1, 1))}
  greedy = greedy_search(step, cache, batch_size=1, max_len=4, bos=BOS, eos=EOS)
  np.testing.assert_array_equal(greedy[0], [4, 6, EOS, EOS])
  seqs, scores = beam_search(step, cache, batch_size=1, beam_size=2, max_len=4, bos=BOS, eos=EOS,
                             alpha=0.0)
  np.testing.assert_array_equal(seqs[0, 0], [5, EOS, EOS, EOS])
  np.testing.assert_allclose(scores[0, 0], np.log(0.4), atol=1e-4)


def test_length_penalty_is_gnmts():
  assert length_penalty(1, 0.6) == 1.0
  np.testing.assert_allclose(length_penalty(10, 0.6), (15 / 6) ** 0.6)
  assert length_penalty(10, 0.0) == 1.0
