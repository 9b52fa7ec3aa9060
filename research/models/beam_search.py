"""Greedy and beam-search decoding under jit, for any model that steps a cache.

Both take `step(tokens_N, cache, pos) -> (logits_NxV, cache)`: the next-token logits for the
token at position `pos` of each of N sequences. Every leaf of `cache` has the batch on its
leading axis; beam search repeats it for the beams (row b * K + k) and reorders it as beams
are chosen. What never changes while decoding (an encoder's output) belongs in the closure
of `step` instead, repeated with `repeat_beams`, so that it is never copied.

Beam search keeps `beam_size` live hypotheses and the `beam_size` best finished ones per
sentence, scored as GNMT does (Wu et al. 2016; alpha = 0.6 in Vaswani et al. 2017):
log p(y) / lp(|y|), lp(n) = ((5 + n) / 6) ** alpha, |y| counting EOS. It stops when no live
hypothesis can still beat the worst kept finished one of its sentence.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]

NEG_INF = -1e9  # finite, so that sums of impossible scores never become nan


def length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def repeat_beams(tree, beam_size: int):
  """Each row of every leaf `beam_size` times in a row: the layout beam search steps over."""
  return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def greedy_search(step: StepFn, cache, *, batch_size: int, max_len: int, bos: int,
                  eos: int) -> jax.Array:
  """[B, max_len] most likely next tokens, fed back; positions after EOS hold EOS."""

  def cond(carry):
    i, _, done_B, _ = carry
    return (i < max_len) & ~jnp.all(done_B)

  def body(carry):
    i, tokens_BxL, done_B, cache = carry
    previous_B = jnp.where(i == 0, bos, tokens_BxL[:, jnp.maximum(i - 1, 0)])
    logits_BxV, cache = step(previous_B, cache, i)
    token_B = jnp.where(done_B, eos, jnp.argmax(logits_BxV, axis=-1))
    return i + 1, tokens_BxL.at[:, i].set(token_B), done_B | (token_B == eos), cache

  tokens_BxL = jnp.full((batch_size, max_len), eos, jnp.int32)
  init = (jnp.int32(0), tokens_BxL, jnp.zeros(batch_size, bool), cache)
  return jax.lax.while_loop(cond, body, init)[1]


def beam_search(step: StepFn, cache, *, batch_size: int, beam_size: int, max_len: int, bos: int,
                eos: int, alpha: float = 0.6) -> tuple[jax.Array, jax.Array]:
  """The finished hypotheses [B, K, max_len] (best first; EOS-filled after their EOS) and
  their scores [B, K]. Hypotheses still live at `max_len` tokens count as finished there."""
  B, K = batch_size, beam_size
  cache = repeat_beams(cache, K)

  def gather_beams(x_BxKx, index_BxM):
    return jnp.take_along_axis(x_BxKx, index_BxM.reshape(index_BxM.shape + (1,) * (x_BxKx.ndim - 2)),
                               axis=1)

  def cond(carry):
    i, _, alive_logp_BxK, _, finished_score_BxK, _ = carry
    # log p only falls as a hypothesis grows, so its best possible score is its log p
    # over the largest length penalty.
    best_alive_B = alive_logp_BxK[:, 0] / length_penalty(max_len, alpha)
    hopeless_B = finished_score_BxK[:, -1] >= best_alive_B
    return (i < max_len) & ~jnp.all(hopeless_B)

  def body(carry):
    i, alive_BxKxL, alive_logp_BxK, finished_BxKxL, finished_score_BxK, cache = carry
    previous_N = jnp.where(i == 0, bos, alive_BxKxL[:, :, jnp.maximum(i - 1, 0)]).reshape(B * K)
    logits_NxV, cache = step(previous_N, cache, i)
    V = logits_NxV.shape[-1]
    logp_BxKxV = alive_logp_BxK[:, :, None] + jax.nn.log_softmax(logits_NxV).reshape(B, K, V)
    # The 2K best extensions hold at least K that do not end (each beam has one EOS).
    logp_Bx2K, index_Bx2K = jax.lax.top_k(logp_BxKxV.reshape(B, K * V), 2 * K)
    beam_Bx2K, token_Bx2K = index_Bx2K // V, index_Bx2K % V
    seqs_Bx2KxL = gather_beams(alive_BxKxL, beam_Bx2K).at[:, :, i].set(token_Bx2K)
    ends_Bx2K = (token_Bx2K == eos) | (i == max_len - 1)

    # Live: the K best that do not end; their caches follow them.
    live_logp_Bx2K = jnp.where(ends_Bx2K, NEG_INF, logp_Bx2K)
    alive_logp_BxK, pick_BxK = jax.lax.top_k(live_logp_Bx2K, K)
    alive_BxKxL = gather_beams(seqs_Bx2KxL, pick_BxK)
    rows_N = (jnp.arange(B)[:, None] * K + gather_beams(beam_Bx2K, pick_BxK)).reshape(B * K)
    cache = jax.tree.map(lambda x: x[rows_N], cache)

    # Finished: the K best of those kept so far and those ending now.
    end_score_Bx2K = jnp.where(ends_Bx2K, logp_Bx2K / length_penalty(i + 1.0, alpha), NEG_INF)
    scores_Bx3K = jnp.concatenate([finished_score_BxK, end_score_Bx2K], axis=1)
    seqs_Bx3KxL = jnp.concatenate([finished_BxKxL, seqs_Bx2KxL], axis=1)
    finished_score_BxK, pick_BxK = jax.lax.top_k(scores_Bx3K, K)
    finished_BxKxL = gather_beams(seqs_Bx3KxL, pick_BxK)
    return i + 1, alive_BxKxL, alive_logp_BxK, finished_BxKxL, finished_score_BxK, cache

  # Only the first beam is live at the start, so the K beams do not all repeat it.
  alive_logp_BxK = jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF), (B, 1))
  seqs_BxKxL = jnp.full((B, K, max_len), eos, jnp.int32)
  init = (jnp.int32(0), seqs_BxKxL, alive_logp_BxK, seqs_BxKxL,
          jnp.full((B, K), 2 * NEG_INF), cache)
  _, _, _, finished_BxKxL, finished_score_BxK, _ = jax.lax.while_loop(cond, body, init)
  return finished_BxKxL, finished_score_BxK
