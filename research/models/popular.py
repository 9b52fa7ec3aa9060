"""The most-popular baseline: every user gets the items rated most often in training.

It has no parameters: the counts are a non-trainable variable, set by `set_counts` after the
model is built and saved in checkpoints like any other model state, so it goes through the
same training loop (one no-op step), evaluation and `recommend` command as the trained models.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx


class Counts(nnx.Variable):
  """How often each item was rated in the training data."""


@dataclasses.dataclass(frozen=True)
class PopularConfig:
  num_items: int  # items are 1..num_items; 0 is padding


class MostPopular(nnx.Module):

  def __init__(self, cfg: PopularConfig, *, rngs: nnx.Rngs | None = None):
    del rngs  # nothing random
    self.cfg = cfg
    self.counts = Counts(jnp.zeros((cfg.num_items + 1,), jnp.float32))

  def set_counts(self, counts_V: np.ndarray) -> None:
    """Scores from how often each item (0..num_items) was rated."""
    if len(counts_V) != self.cfg.num_items + 1:
      raise ValueError(f"{len(counts_V)} counts for {self.cfg.num_items + 1} items (0 included)")
    # Ties (many items share a count) break towards the lower item id, so that a tied true
    # item is not always ranked last; the offset is below 1, so it never reorders counts.
    ids_V = np.arange(len(counts_V))
    self.counts[...] = jnp.asarray(counts_V - ids_V / len(counts_V), jnp.float32)

  def score_items(self, history_BxT, user_B):
    """[B, num_items + 1]: the same popularity scores for every user."""
    del history_BxT
    return jnp.broadcast_to(self.counts[...], (user_B.shape[0], self.counts.shape[0]))
