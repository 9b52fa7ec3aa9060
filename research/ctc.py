"""Connectionist temporal classification (Graves et al. 2006): the loss, decoding, error rates.

`ctc_loss` is the CTC negative log-likelihood of (logits, valid frames, labels padded with -1),
equal to `optax.ctc_loss`'s (see its docstring for why it is not a call to it). Decoding
works on one utterance's log-probabilities [T, C] in numpy:

  greedy_decode       the best class of each frame, repeats collapsed, blanks dropped
                      ("1 1 _ 1" -> "11": a blank separates a repeated label).
  prefix_beam_search  the labellings with the highest total probability, summed over all the
                      alignments that collapse to them (Hannun et al. 2014, without a language
                      model): per prefix, the probability of ending in a blank and in its last
                      label, so "1 _ 1" and "1 1" extend a prefix differently.

`error_rates` scores transcripts as words (one digit = one word) with jiwer: the digit error
rate (substitutions + deletions + insertions over reference digits) and the fraction of
utterances transcribed exactly.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import jiwer
import numpy as np


_LOG_ZERO = -1e5  # log(0) stand-in that keeps gradients finite (optax uses the same)


def ctc_loss(logits_BxTxC: jax.Array, frames_B: jax.Array, labels_BxN: jax.Array,
             blank: int) -> jax.Array:
  """Per-utterance negative log-likelihood [B]: -log sum over every alignment of the first
  `frames` frames that collapses to the labels (padded with negative ids).

  The forward (alpha) recursion of Graves et al. (2006) in log space over the labels with
  blanks interleaved, as `optax.ctc_loss` computes it (tests compare the two and a brute-force
  sum). It is written here because optax starts its scan from constants, which `jax.shard_map`
  (the data-parallel train step) rejects as a carry that its per-device outputs replace; this
  one starts from arrays derived from the logits.
  """
  B, T, _ = logits_BxTxC.shape
  N = labels_BxN.shape[1]
  logp_TxBxC = jax.nn.log_softmax(logits_BxTxC.astype(jnp.float32)).swapaxes(0, 1)
  lengths_B = (labels_BxN >= 0).sum(1)
  labels_BxN = jnp.maximum(labels_BxN, 0)
  # Extended labels: blank, l1, blank, l2, ..., lN, blank ([B, 2N + 1]).
  ext_BxS = jnp.full((B, 2 * N + 1), blank, labels_BxN.dtype).at[:, 1::2].set(labels_BxN)
  S = 2 * N + 1
  # A label may follow the label two back (skipping the blank between) unless they are equal.
  skip_BxS = jnp.zeros((B, S), bool).at[:, 2:].set(
      (ext_BxS[:, 2:] != blank) & (ext_BxS[:, 2:] != ext_BxS[:, :-2]))
  emit = lambda logp_BxC: jnp.take_along_axis(logp_BxC, ext_BxS, axis=1)
  zero_BxS = jnp.zeros_like(logp_TxBxC[0, :, :1]) + jnp.full((B, S), _LOG_ZERO)
  # Frame 0 is the leading blank or the first label.
  alpha_BxS = jnp.where(jnp.arange(S)[None, :] < 2, emit(logp_TxBxC[0]), zero_BxS)

  def step(alpha_BxS, inputs):
    logp_BxC, t = inputs
    shift1 = jnp.concatenate([zero_BxS[:, :1], alpha_BxS[:, :-1]], axis=1)
    shift2 = jnp.concatenate([zero_BxS[:, :2], alpha_BxS[:, :-2]], axis=1)
    shift2 = jnp.where(skip_BxS, shift2, _LOG_ZERO)
    new = jnp.logaddexp(jnp.logaddexp(alpha_BxS, shift1), shift2) + emit(logp_BxC)
    new = jnp.maximum(new, _LOG_ZERO)
    return jnp.where((t < frames_B)[:, None], new, alpha_BxS), None

  alpha_BxS, _ = jax.lax.scan(step, alpha_BxS, (logp_TxBxC[1:], jnp.arange(1, T)))
  last = jnp.take_along_axis(alpha_BxS, 2 * lengths_B[:, None], axis=1)[:, 0]
  before = jnp.take_along_axis(alpha_BxS, jnp.maximum(2 * lengths_B - 1, 0)[:, None], axis=1)[:, 0]
  before = jnp.where(lengths_B > 0, before, _LOG_ZERO)
  return -jnp.logaddexp(last, before)


def log_softmax(logits_TxC: np.ndarray) -> np.ndarray:
  z = np.asarray(logits_TxC, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def greedy_decode(logits_TxC: np.ndarray, blank: int) -> list[int]:
  """Best path: argmax per frame, repeats merged, blanks removed."""
  best = np.asarray(logits_TxC).argmax(axis=-1)
  out, previous = [], None
  for c in best.tolist():
    if c != previous and c != blank:
      out.append(c)
    previous = c
  return out


def _logsumexp(a: float, b: float) -> float:
  if a == -math.inf:
    return b
  if b == -math.inf:
    return a
  m = max(a, b)
  return m + math.log(math.exp(a - m) + math.exp(b - m))


def prefix_beam_search(logits_TxC: np.ndarray, blank: int, beam_size: int = 8,
                       prune: float = -12.0) -> list[tuple[tuple[int, ...], float]]:
  """The `beam_size` best labellings and their log-probabilities (summed over alignments), best
  first. Classes below `prune` (log-probability) at a frame are not tried as extensions."""
  logp_TxC = log_softmax(logits_TxC)
  # prefix -> (log P(prefix, ending in blank), log P(prefix, ending in its last label))
  beams = {(): (0.0, -math.inf)}
  for logp_C in logp_TxC:
    candidates = [c for c in np.flatnonzero(logp_C >= prune).tolist()]
    if blank not in candidates:
      candidates.append(blank)
    grown: dict[tuple[int, ...], list[float]] = collections.defaultdict(
        lambda: [-math.inf, -math.inf])
    for prefix, (p_blank, p_label) in beams.items():
      total = _logsumexp(p_blank, p_label)
      for c in candidates:
        p = float(logp_C[c])
        if c == blank:  # the prefix stays, now ending in a blank
          entry = grown[prefix]
          entry[0] = _logsumexp(entry[0], total + p)
          continue
        last = prefix[-1] if prefix else None
        extended = grown[prefix + (c,)]
        if c == last:
          # "1 1" stays "1"; only a path through a blank ("1 _ 1") makes "11".
          extended[1] = _logsumexp(extended[1], p_blank + p)
          same = grown[prefix]
          same[1] = _logsumexp(same[1], p_label + p)
        else:
          extended[1] = _logsumexp(extended[1], total + p)
    # Prefixes reached by no alignment ("11" after a frame of "1" alone) are dropped.
    scored = sorted(((prefix, p) for prefix, p in grown.items()
                     if _logsumexp(*p) > -math.inf), key=lambda kv: -_logsumexp(*kv[1]))
    beams = {prefix: tuple(p) for prefix, p in scored[:beam_size]}
  ranked = sorted(((prefix, _logsumexp(*p)) for prefix, p in beams.items()), key=lambda kv: -kv[1])
  return ranked


def beam_decode(logits_TxC: np.ndarray, blank: int, beam_size: int = 8) -> list[int]:
  return list(prefix_beam_search(logits_TxC, blank, beam_size)[0][0])


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
  """Digit error rate (and its parts) and utterance accuracy of digit strings ("404"), each
  digit a word, computed by jiwer. References must not be empty."""
  if len(references) != len(hypotheses) or not references:
    raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
  words = lambda s: " ".join(s)
  out = jiwer.process_words([words(r) for r in references], [words(h) for h in hypotheses])
  digits = sum(len(r) for r in references)
  return {"der": out.wer,
          "substitutions": out.substitutions / digits,
          "deletions": out.deletions / digits,
          "insertions": out.insertions / digits,
          "utterance_accuracy": float(np.mean([r == h for r, h in zip(references, hypotheses)]))}
