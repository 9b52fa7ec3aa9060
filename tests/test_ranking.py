"""HR@k and NDCG@k, sampled and full ranking, against rankings computed by hand."""

import math

import numpy as np
import pytest

from research.evaluate import ranking


def test_ranks_and_metrics_by_hand():
  # Items 0..5, item 0 is padding. User 0's true item is 2, user 1's is 5.
  scores = np.array([[9.0, 0.1, 0.5, 0.7, 0.2, 0.6],
                     [9.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
  target = np.array([2, 5])
  negatives = np.array([[1, 4], [1, 3]])
  # User 0: negatives score 0.1, 0.2 < 0.5 -> rank 0. User 1: both beat 0.5 -> rank 2.
  np.testing.assert_array_equal(ranking.sampled_rank(scores, target, negatives), [0, 2])
  exclude = np.zeros((2, 6), bool)
  exclude[0, 3] = True  # user 0 rated item 3 (0.7), so only item 5 (0.6) beats the true item
  np.testing.assert_array_equal(ranking.full_rank(scores, target, exclude), [1, 4])
  ranks = np.array([1, 4, 12])
  assert ranking.hit_rate(ranks, 10) == pytest.approx(2 / 3)
  assert ranking.hit_rate(ranks, 2) == pytest.approx(1 / 3)
  assert ranking.ndcg(ranks, 10) == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / 3)
  assert ranking.ndcg(np.array([0]), 10) == 1.0


def test_ties_count_against_the_true_item():
  scores = np.zeros((1, 12))
  assert int(ranking.sampled_rank(scores, np.array([3]), np.array([[1, 2, 4]]))[0]) == 3
  assert int(ranking.full_rank(scores, np.array([3]), np.zeros((1, 12), bool))[0]) == 10
  assert ranking.hit_rate(np.array([10]), 10) == 0.0


def test_padding_rows_carry_no_weight():
  assert ranking.hit_rate(np.array([0, 50, 50]), 10, np.array([1, 0, 0])) == 1.0
  assert ranking.ndcg(np.array([1, 0]), 10, np.array([1.0, 0.0])) == pytest.approx(1 / math.log2(3))


def test_full_rank_is_the_position_in_a_sorted_list():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(20, 50))
  target = rng.integers(1, 50, 20)
  exclude = rng.random((20, 50)) < 0.3
  exclude[np.arange(20), target] = False
  ranks = np.asarray(ranking.full_rank(scores, target, exclude))
  for u in range(20):
    candidates = [i for i in range(1, 50) if not exclude[u, i]]
    order = sorted(candidates, key=lambda i: -scores[u, i])
    assert ranks[u] == order.index(target[u])


def test_sampled_negatives_are_distinct_unrated_and_seeded():
  rng = np.random.default_rng(1)
  seen = rng.random((30, 400)) < 0.5
  negatives = ranking.sample_negatives(seen, 100, seed=[0, 1])
  assert negatives.shape == (30, 100) and (negatives > 0).all()
  assert not seen[np.arange(30)[:, None], negatives].any()
  assert all(len(set(row)) == 100 for row in negatives.tolist())
  np.testing.assert_array_equal(ranking.sample_negatives(seen, 100, seed=[0, 1]), negatives)
  assert not np.array_equal(ranking.sample_negatives(seen, 100, seed=[0, 2]), negatives)
