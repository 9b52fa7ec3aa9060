"""Leave-one-out next-item recommendation for any model with `score_items`.

Models map a batch of histories (left-padded item ids) and user indices to scores over all
items, `score_items(history_BxT, user_B) -> [B, num_items + 1]`, and train with one of:
- `next_item`: sequence models (`model(items_BxT) -> states_BxTxD`, `model.item_embed`): the
  state after each position scores the true next item against one sampled item the user
  never rated in training, with binary cross-entropy (SASRec's objective);
- `bpr`: pairs (user, rated item, unrated item), BPR's pairwise log-loss;
- `none`: nothing to learn (the most-popular baseline).
Validation reads each user's training items and predicts the validation item; test also
reads the validation item and predicts the test item. Metrics: see `research.evaluate.ranking`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from research.data import movielens
from research.data.batching import EpochBatches, padded_batches
from research.evaluate import ranking
from research.train.task import Task

K = 10  # HR@10 and NDCG@10, as the SASRec paper reports
NUM_SAMPLED_NEGATIVES = 100
EVAL_SEED = 0  # the sampled protocol's negatives depend on the data alone, not config.seed


def next_item_loss(model, batch, rngs=None):
  h_BxTxD = model(batch["inputs"], rngs=rngs)
  pos_BxT = (h_BxTxD * model.item_embed(batch["targets"])).sum(-1)
  neg_BxT = (h_BxTxD * model.item_embed(batch["negatives"])).sum(-1)
  valid_BxT = (batch["targets"] != 0).astype(jnp.float32)
  bce_BxT = -jax.nn.log_sigmoid(pos_BxT) - jax.nn.log_sigmoid(-neg_BxT)
  loss = (bce_BxT * valid_BxT).sum() / jnp.maximum(valid_BxT.sum(), 1.0)
  return loss, {"loss": loss}


def bpr_loss(model, batch, rngs=None):
  del rngs
  scores_Bx2 = model.score_pairs(batch["user"], jnp.stack([batch["item"], batch["negatives"]], 1))
  margin_B = scores_Bx2[:, 0] - scores_Bx2[:, 1]
  loss = -jax.nn.log_sigmoid(margin_B).mean()
  return loss, {"loss": loss, "pair_accuracy": (margin_B > 0).mean()}


def no_loss(model, batch, rngs=None):
  del model, batch, rngs
  loss = jnp.zeros(())
  return loss, {"loss": loss}


OBJECTIVES = {"next_item": next_item_loss, "bpr": bpr_loss, "none": no_loss}


@dataclasses.dataclass
class WithNegatives:
  """Batches of `examples`, plus for each item of `examples[positives]` (0 = padding) one
  item the batch row's user never rated in training, drawn uniformly: a pure function of the
  step, like the batches."""

  examples: EpochBatches
  seen_UxV: np.ndarray  # [U, num_items + 1] training items of each user
  positives: str
  seed: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    batch = self.examples(step)
    rng = np.random.default_rng([self.seed, 1, step])
    positives = batch[self.positives]
    user = np.broadcast_to(batch["user"].reshape(-1, *[1] * (positives.ndim - 1)), positives.shape)
    num_items = self.seen_UxV.shape[1] - 1
    negatives = rng.integers(1, num_items + 1, positives.shape, dtype=np.int32)
    while (clash := self.seen_UxV[user, negatives]).any():
      negatives[clash] = rng.integers(1, num_items + 1, clash.sum(), dtype=np.int32)
    batch["negatives"] = np.where(positives != 0, negatives, 0).astype(np.int32)
    return batch


def windows(sequence: np.ndarray, length: int) -> list[np.ndarray]:
  """Windows of `length + 1` items, from the end back, each starting where the next one
  ends, so every transition (item -> next item) is in exactly one. The paper trains on the
  last window only; the earlier ones add the rest of long histories (and nothing to users
  with at most `length + 1` items)."""
  return [sequence[max(0, end - length - 1):end] for end in range(len(sequence), 1, -length)]


def train_batches(split: movielens.LeaveOneOut, num_items: int, objective: str, *,
                  max_len: int, batch_size: int, seed: int) -> WithNegatives:
  users = np.arange(len(split.train), dtype=np.int32)
  seen = movielens.seen_mask(split.train, num_items)
  if objective == "next_item":
    # Windows of each user's training sequence, shifted by one: position t predicts item t + 1.
    chunks = [(user, w) for user, s in zip(users, split.train) for w in windows(s, max_len)]
    examples = {"user": np.array([user for user, _ in chunks], np.int32),
                "inputs": movielens.left_pad([w[:-1] for _, w in chunks], max_len),
                "targets": movielens.left_pad([w[1:] for _, w in chunks], max_len)}
    positives = "targets"
  else:
    examples = {"user": np.repeat(users, [len(s) for s in split.train]),
                "item": np.concatenate(split.train).astype(np.int32)}
    positives = "item"
  return WithNegatives(EpochBatches(examples, batch_size, seed), seen, positives, seed)


def eval_arrays(split: movielens.LeaveOneOut, num_items: int, which: str,
                max_len: int) -> dict[str, np.ndarray]:
  """One row per user: the history the model reads, the true item, the 100 sampled
  negatives, and what full ranking excludes (the history's items: the user rated them)."""
  if which == "val":
    history, target = split.train, split.val
  else:
    history, target = [np.append(s, v) for s, v in zip(split.train, split.val)], split.test
  rated = movielens.seen_mask([np.concatenate([s, [v, t]]) for s, v, t in
                               zip(split.train, split.val, split.test)], num_items)
  return {"history": movielens.left_pad(history, max_len),
          "user": np.arange(len(history), dtype=np.int32),
          "target": target.astype(np.int32),
          "negatives": ranking.sample_negatives(rated, NUM_SAMPLED_NEGATIVES,
                                                [EVAL_SEED, ("val", "test").index(which)]),
          "exclude": movielens.seen_mask(history, num_items)}


def eval_fn(model, batch):
  scores_BxV = model.score_items(batch["history"], batch["user"])
  return {"rank": ranking.sampled_rank(scores_BxV, batch["target"], batch["negatives"]),
          "rank_full": ranking.full_rank(scores_BxV, batch["target"], batch["exclude"]),
          "mask": batch["mask"]}


def summarize(split: str, outputs: dict[str, np.ndarray]) -> dict[str, float]:
  del split
  w = outputs["mask"]
  return {f"hr_at_{K}": ranking.hit_rate(outputs["rank"], K, w),
          f"ndcg_at_{K}": ranking.ndcg(outputs["rank"], K, w),
          f"hr_at_{K}_full": ranking.hit_rate(outputs["rank_full"], K, w),
          f"ndcg_at_{K}_full": ranking.ndcg(outputs["rank_full"], K, w)}


def recommendation_task(config, model, split: movielens.LeaveOneOut, num_items: int,
                        objective: str, *, max_len: int, eval_batch_size: int) -> Task:
  """Trains `model` with `objective` on histories of up to `max_len` items and evaluates the
  leave-one-out `val` and `test` items. `config` gives batch_size and seed."""
  train = train_batches(split, num_items, objective, max_len=max_len,
                        batch_size=config.batch_size, seed=config.seed)
  evals = {which: eval_arrays(split, num_items, which, max_len) for which in ("val", "test")}
  return Task(
      model=model, loss_fn=OBJECTIVES[objective], train_data=train,
      eval_data={which: (lambda a=arrays: padded_batches(a, eval_batch_size))
                 for which, arrays in evals.items()},
      eval_fn=eval_fn, summarize=summarize)
