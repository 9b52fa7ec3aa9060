"""Top-k ranking metrics for leave-one-out recommendation: HR@k and NDCG@k.

A user has one held-out item; its rank r (0 = first) counts the competing items that score
at least as high, so ties count against the true item (a constant scorer gets HR 0, not 1).

Two protocols:
- sampled (Kang & McAuley 2018, after Koren 2008): the true item competes with 100 items the
  user never rated, drawn uniformly without replacement with a fixed seed;
- full: the true item competes with every item except padding and the items excluded by the
  caller (here: the items in the model's input history, which the user has already rated).
Sampled metrics are much higher and can order models differently than full ranking does
(Krichene & Rendle 2020, "On Sampled Metrics for Item Recommendation").

HR@k = 1 if r < k; NDCG@k = 1 / log2(r + 2) if r < k (one relevant item, so IDCG = 1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def sampled_rank(scores_BxV, target_B, negatives_BxN):
  """How many of each user's sampled negatives score at least as high as the true item."""
  target_Bx1 = jnp.take_along_axis(scores_BxV, target_B[:, None], axis=1)
  negatives_BxN = jnp.take_along_axis(scores_BxV, negatives_BxN, axis=1)
  return (negatives_BxN >= target_Bx1).sum(axis=1)


def full_rank(scores_BxV, target_B, exclude_BxV):
  """How many items, other than the true one, padding (0) and `exclude`, score at least as high."""
  target_Bx1 = jnp.take_along_axis(scores_BxV, target_B[:, None], axis=1)
  items_V = jnp.arange(scores_BxV.shape[1])
  competes_BxV = ~exclude_BxV & (items_V[None] != target_B[:, None]) & (items_V[None] != 0)
  return ((scores_BxV >= target_Bx1) & competes_BxV).sum(axis=1)


def hit_rate(rank_B, k: int, weight_B=None) -> float:
  return _mean(np.asarray(rank_B) < k, weight_B)


def ndcg(rank_B, k: int, weight_B=None) -> float:
  rank_B = np.asarray(rank_B)
  return _mean(np.where(rank_B < k, 1.0 / np.log2(rank_B + 2.0), 0.0), weight_B)


def _mean(values_B, weight_B) -> float:
  weight_B = np.ones(len(values_B)) if weight_B is None else np.asarray(weight_B, np.float64)
  return float((values_B * weight_B).sum() / weight_B.sum())


def sample_negatives(seen_UxV: np.ndarray, count: int, seed) -> np.ndarray:
  """[U, count] distinct items per user that the user never rated (`seen` False; 0 = padding)."""
  rng = np.random.default_rng(seed)
  negatives = np.empty((len(seen_UxV), count), np.int32)
  for row, seen_V in zip(negatives, seen_UxV):
    candidates = np.flatnonzero(~seen_V[1:]) + 1
    if len(candidates) < count:
      raise ValueError(f"a user rated all but {len(candidates)} items; {count} negatives needed")
    row[:] = rng.choice(candidates, count, replace=False)
  return negatives
