"""Autoregressive sampling for any model with `init_cache`, `decode` and `context_length`.

A prompt is read in one pass (prefill); each new token is then one `decode` step against
the cache, so N tokens cost N steps. When a bounded cache (a Transformer's context) is
full, the newest half of the context is prefilled into a fresh cache and sampling goes on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
  """Draws token ids from `logits_BxV`; temperature 0 means greedy."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / temperature
  if top_k is not None and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4, 6, 7))
def _sample_span(graphdef, state, tokens_BxP, key, num_tokens, pos_offset, temperature, top_k):
  """Prefills `tokens_BxP` into a fresh cache and samples `num_tokens` more."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens_BxP.shape[0])
  logits_BxPxV, cache = model.decode(tokens_BxP, cache, pos_offset)

  def step(carry, key):
    logits_BxV, cache, pos = carry
    token_B = sample_logits(logits_BxV, key, temperature, top_k)
    logits_Bx1xV, cache = model.decode(token_B[:, None], cache, pos)
    return (logits_Bx1xV[:, 0], cache, pos + 1), token_B

  carry = (logits_BxPxV[:, -1], cache, pos_offset + tokens_BxP.shape[1])
  _, tokens_NxB = jax.lax.scan(step, carry, jax.random.split(key, num_tokens))
  return tokens_NxB.T


def generate(model: nnx.Module, prompt_BxP: jax.Array, num_tokens: int, *, key: jax.Array,
             temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
  """Returns the prompt followed by `num_tokens` sampled tokens, shape [B, P + num_tokens]."""
  graphdef, state = nnx.split(model)
  context = model.context_length
  tokens_BxN = jnp.asarray(prompt_BxP)
  if context is None:  # Unbounded (recurrent): one span.
    new = _sample_span(graphdef, state, tokens_BxN, key, num_tokens, 0, temperature, top_k)
    return jnp.concatenate([tokens_BxN, new], axis=1)
  # The last token sampled in a span is never fed back, so a span of n new tokens after
  # a prompt of p fills p + n - 1 cache slots.
  keep = max(1, context // 2)
  tokens_BxN = tokens_BxN[:, -context:]
  remaining = num_tokens
  out = [jnp.asarray(prompt_BxP)]
  while remaining > 0:
    n = min(remaining, context + 1 - tokens_BxN.shape[1])
    key, span_key = jax.random.split(key)
    new = _sample_span(graphdef, state, tokens_BxN, span_key, n, 0, temperature, top_k)
    out.append(new)
    remaining -= n
    tokens_BxN = jnp.concatenate([tokens_BxN, new], axis=1)[:, -keep:]
  return jnp.concatenate(out, axis=1)
