"""What an experiment hands the training loop: a model, a loss, data, and evaluations."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from flax import nnx

from research.train.step import LossFn


@dataclasses.dataclass
class Task:
  model: nnx.Module
  loss_fn: LossFn
  # step -> the whole batch `step` (every process computes the same one; the loop hands each
  # device its rows); a pure function of the step, so a resumed run sees the same data.
  train_data: Callable[[int], dict]
  # split -> () -> whole batches evaluated with `eval_fn` at every evaluation.
  eval_data: dict[str, Callable[[], Iterable[dict]]] = dataclasses.field(default_factory=dict)
  # (model, batch) -> dict of arrays, scalars or per-example; default: the loss_fn's metrics.
  eval_fn: Callable[[nnx.Module, dict], dict] | None = None
  # (split, outputs of all batches: scalars stacked, per-example arrays concatenated)
  # -> metrics; default: the mean of each output.
  summarize: Callable[[str, dict[str, np.ndarray]], dict] | None = None
  # Evaluations that need more than a batch function (e.g. decoding); model -> split -> metrics.
  evaluate: Callable[[nnx.Module], dict[str, dict]] | None = None
  # Called once after training, on process 0: samples, plots, reports.
  finish: Callable[[nnx.Module, Path], None] | None = None
  tokens_per_batch: int | None = None  # for tokens_per_second on train lines
  flops_per_token: float | None = None  # training FLOPs per token, for MFU
  log_x: bool = False  # plot metrics against log(step)
  # What turns text into the model's ids (an object with `save(directory)`, read back by
  # `research.load.load_tokenizer`); saved in the run folder's `tokenizer/`. None: ids only.
  tokenizer: Any = None
  # Runs trained before this one, in order (e.g. MLM pretraining before fine-tuning).
  phases: tuple["Phase", ...] = ()


@dataclasses.dataclass
class Phase:
  """A run the loop trains (or resumes) in `<workdir>/<name>` before the task's own, then hands
  over: `hand_over(trained model)` copies what the task's model takes from it. Skipped once
  the task's own run has a checkpoint."""
  name: str
  task: Task
  config: Any  # the phase's own run config; its workdir is `<workdir>/<name>`
  hand_over: Callable[[nnx.Module], None]
