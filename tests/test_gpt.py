"""Properties of the GPT and LSTM language models: shapes, causality, cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models.gpt import GPT, GPTConfig
from research.models.lstm import LSTMConfig, LSTMLM
from research.models.sampling import generate, sample_logits

V, T = 11, 12


def gpt(**kw):
  cfg = dict(vocab_size=V, block_size=T, num_layers=2, num_heads=2, embed_dim=16)
  return GPT(GPTConfig(**{**cfg, **kw}), rngs=nnx.Rngs(0))


def lstm():
  return LSTMLM(LSTMConfig(vocab_size=V, embed_dim=8, hidden_dim=16, num_layers=2), rngs=nnx.Rngs(0))


def tokens(B=2, length=T, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, V)


@pytest.mark.parametrize("make", [gpt, lambda: gpt(position="rope", use_bias=True), lstm])
def test_logits_shape_and_dtype(make):
  logits = make()(tokens())
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32


def test_gpt_parameter_count_matches_nanogpt_baby():
  model = GPT(GPTConfig(vocab_size=65, block_size=64), rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 804_096


def with_table(model, name, table):
  """A copy of `model` whose embedding module `name` holds `table` (possibly a tracer)."""
  graphdef, state = nnx.split(model)
  pure = state.to_pure_dict()
  pure[name]["embedding"] = table
  return nnx.merge(graphdef, pure)


def _assert_causal(grad_of_output_at):
  for t in (0, 5, T - 1):
    grad_SxD = grad_of_output_at(t)
    assert np.all(grad_SxD[t + 1:] == 0), f"output {t} depends on a later position"
    assert np.all(np.abs(grad_SxD[:t + 1]).sum(-1) > 0), f"output {t} ignores an earlier position"


def test_gpt_is_causal_through_gradients():
  # Position s's learned embedding enters the network only at position s.
  model, x = gpt(), tokens()
  output_at = lambda t, table: with_table(model, "pos_embed", table)(x)[:, t].sum()
  table = model.pos_embed.embedding.value
  _assert_causal(lambda t: jax.grad(output_at, argnums=1)(t, table))


def test_lstm_is_causal_through_gradients():
  # With each token used once, its embedding row is the input at exactly one position.
  model = LSTMLM(LSTMConfig(vocab_size=T, embed_dim=8, hidden_dim=16, num_layers=2), rngs=nnx.Rngs(0))
  x = jnp.arange(T)[None]
  output_at = lambda t, table: with_table(model, "embed", table)(x)[:, t].sum()
  table = model.embed.embedding.value
  _assert_causal(lambda t: jax.grad(output_at, argnums=1)(t, table)[x[0]])


def test_rope_gpt_outputs_ignore_later_tokens():
  model, x = gpt(position="rope"), tokens()
  for t in (0, 5, T - 2):
    changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % V)
    np.testing.assert_array_equal(model(x)[:, :t + 1], model(changed)[:, :t + 1])
    assert not np.allclose(model(x)[:, t + 1:], model(changed)[:, t + 1:])


@pytest.mark.parametrize("make", [gpt, lambda: gpt(position="rope"), lstm])
def test_cached_decoding_equals_full_recomputation(make):
  model = make()
  x = tokens()
  full_BxTxV = model(x)
  cache = model.init_cache(2)
  prefill_BxPxV, cache = model.decode(x[:, :4], cache, 0)
  steps = [prefill_BxPxV]
  for t in range(4, T):
    logits, cache = model.decode(x[:, t:t + 1], cache, t)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, atol=1e-5)


@pytest.mark.parametrize("make", [gpt, lstm])
def test_greedy_generation_equals_argmax_of_full_forward(make):
  model = make()
  prompt = tokens(B=2, length=3)
  out = generate(model, prompt, T - 3, key=jax.random.key(0), temperature=0)
  assert out.shape == (2, T)
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Each new token is the argmax of a full forward pass over everything before it.
  np.testing.assert_array_equal(out[:, 3:], model(out[:, :-1])[:, 2:].argmax(-1))


def test_generation_beyond_the_context_keeps_going():
  model = gpt()
  # Weights 30x their init: logits that depend on the whole window and on positions, not
  # mostly on the last token, so a wrong window or position changes the greedy tokens.
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: 30 * x, params))
  out = generate(model, tokens(B=4, length=2), 3 * T, key=jax.random.key(1), temperature=0)
  assert out.shape == (4, 2 + 3 * T)
  # By hand, for T = 12: the first span reads the prompt and fills the context (tokens 2..12);
  # each later span starts over from the newest T/2 = 6 tokens at position 0 and adds 7.
  windows = [(0, range(2, 13)), (7, range(13, 20)), (14, range(20, 27)), (21, range(27, 34)),
             (28, range(34, 38))]
  assert T == 12 and [i for _, span in windows for i in span] == list(range(2, 2 + 3 * T))
  for start, span in windows:
    # Greedy: token i is the argmax of a full (causal) forward pass over out[start:i].
    predicted = model(out[:, start:span.stop - 1]).argmax(-1)
    np.testing.assert_array_equal(out[:, span.start:span.stop], predicted[:, span.start - start - 1:])


def test_top_k_only_draws_from_the_k_largest():
  logits = jnp.array([[0.0, 5.0, 4.0, -1.0, 3.0]])
  draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_k=2))(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(draws).tolist()) == {1, 2}


def test_dropout_is_on_only_with_rngs():
  model = gpt(dropout=0.5)
  x = tokens()
  np.testing.assert_array_equal(model(x), model(x))
  assert not np.allclose(model(x, rngs=nnx.Rngs(dropout=0)), model(x, rngs=nnx.Rngs(dropout=1)))
