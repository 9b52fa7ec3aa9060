"""Batches as pure functions of the step.

A resumed run asks for batch `step` and gets exactly what the uninterrupted run got; no
iterator state needs saving. Every process computes the same whole batch;
`research.sharding.global_batch` hands each device its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

@dataclasses.dataclass
class EpochBatches:
  """Shuffled passes over a fixed set of examples (the last partial batch of a pass is dropped)."""

  arrays: dict[str, np.ndarray]
  batch_size: int
  seed: int

  def __post_init__(self):
    self.size = len(next(iter(self.arrays.values())))
    if self.size < self.batch_size:
      raise ValueError(f"{self.size} examples are fewer than one batch of {self.batch_size}")
    self._epoch, self._order = -1, None

  @property
  def steps_per_epoch(self) -> int:
    return self.size // self.batch_size

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
    rows = self._order[i * self.batch_size:(i + 1) * self.batch_size]
    return {k: v[rows] for k, v in self.arrays.items()}


def padded_batches(arrays: dict[str, np.ndarray],
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order; the last batch is padded, and `mask` is 0 on padding."""
  size = len(next(iter(arrays.values())))
  for start in range(0, size, batch_size):
    index = np.arange(start, start + batch_size)
    valid = index < size
    index = np.where(valid, index, 0)
    yield {**{k: v[index] for k, v in arrays.items()}, "mask": valid.astype(np.float32)}
