"""A tiny GPT trains the same with Pallas flash attention (interpreted on CPU) as with XLA."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from research.models.gpt import GPT, GPTConfig


def _train(attention: str, tokens_BxT, steps: int = 3):
  cfg = GPTConfig(vocab_size=32, block_size=tokens_BxT.shape[1], num_layers=2, num_heads=2,
                  embed_dim=32, attention=attention)
  graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits_BxTxV = nnx.merge(graphdef, params)(tokens_BxT[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return losses, params


def test_gpt_trains_the_same_with_pallas_attention():
  tokens_BxT = jax.random.randint(jax.random.key(0), (4, 41), 0, 32)
  xla_losses, xla_params = _train("xla", tokens_BxT)
  pallas_losses, pallas_params = _train("pallas", tokens_BxT)
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
  assert xla_losses[-1] < xla_losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pallas_params, xla_params)
