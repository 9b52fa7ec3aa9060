"""Supervised classification for any model mapping a batch of inputs to logits [B, C].

Data are arrays `{"inputs": [N, ...], "labels": [N]}`: the training set (or a function of the
step returning its whole batch, e.g. length-bucketed), and each evaluation split. `transform`
turns a batch of stored inputs into what the model reads (trimming padding, bag-of-words
counts, normalizing pixels).

Every evaluation writes, per split, accuracy and macro precision/recall/F1 (plus what
`decide` adds) to metrics.jsonl, and to the run folder `confusion_<split>.png` and
`per_class_<split>.json` (overwritten, so they describe the latest evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import optax

from research.config import ConfigError
from research.data.batching import EpochBatches, padded_batches
from research.evaluate.classification import (classification_metrics, confusion_matrix, per_class,
                                              plot_confusion_matrix)
from research.train.task import Task

Arrays = dict[str, np.ndarray]
# (split, logits [N, C], labels [N]) -> (predicted labels [N], extra metrics).
Decide = Callable[[str, np.ndarray, np.ndarray], tuple[np.ndarray, dict]]


def argmax_decide(split: str, logits_NxC: np.ndarray, labels_N: np.ndarray):
  del split, labels_N
  return logits_NxC.argmax(axis=-1), {}


def cross_entropy_loss(model, batch, rngs=None):
  logits_BxC = model(batch["inputs"], rngs=rngs)
  labels_B = batch["labels"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()
  accuracy = (logits_BxC.argmax(-1) == labels_B).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


def _eval_fn(model, batch):
  return {"logits": model(batch["inputs"]), "labels": batch["labels"], "mask": batch["mask"]}


def _log_softmax_loss(logits_NxC: np.ndarray, labels_N: np.ndarray) -> float:
  """Mean cross-entropy over the examples whose label the model has a logit for."""
  known = labels_N < logits_NxC.shape[1]
  if not known.any():
    return float("nan")
  z_NxC = logits_NxC[known].astype(np.float64)
  z_NxC = z_NxC - z_NxC.max(axis=1, keepdims=True)
  logp_NxC = z_NxC - np.log(np.exp(z_NxC).sum(axis=1, keepdims=True))
  return float(-np.take_along_axis(logp_NxC, labels_N[known, None], axis=1).mean())


def write_report(workdir: Path, split: str, labels_N, predictions_N, class_names: Sequence[str],
                 metrics: dict) -> None:
  """`confusion_<split>.png` and `per_class_<split>.json` in `workdir`."""
  cm = confusion_matrix(labels_N, predictions_N, len(class_names))
  pc = per_class(cm)
  classes = {name: {k: float(pc[k][i]) for k in ("precision", "recall", "f1", "support")}
             for i, name in enumerate(class_names)}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / f"per_class_{split}.json").write_text(
      json.dumps({"split": split, "metrics": metrics, "classes": classes}, indent=1) + "\n")
  plot_confusion_matrix(cm, list(class_names), workdir / f"confusion_{split}.png",
                        title=f"{split} confusion matrix (rows: true class)")


def classification_task(config, model, train: Arrays | Callable[[int], Arrays], evals: dict[str, Arrays],
                        class_names: Sequence[str], *, transform: Callable[[Arrays], Arrays] | None = None,
                        decide: Decide = argmax_decide, eval_batch_size: int | None = None,
                        augment: Callable[[Arrays, int], Arrays] | None = None,
                        tokenizer=None) -> Task:
  """A Task training `model` with cross-entropy on `train`, evaluated on each of `evals`.

  `augment(batch, step)` changes each training batch before `transform` (e.g. random crops
  drawn from a generator seeded by the step, so a resumed run sees the same batches).

  `decide` turns an eval split's logits into predictions over `class_names` (default argmax;
  e.g. a rejection threshold adds an extra class) and may add metrics; it sees the splits
  in the order of `evals`.
  """
  transform = transform or (lambda batch: batch)
  eval_batch_size = eval_batch_size or config.batch_size
  if eval_batch_size % jax.device_count():
    raise ConfigError(f"eval batch size {eval_batch_size} is not divisible by the "
                      f"{jax.device_count()} devices")
  batches = train if callable(train) else EpochBatches(train, config.batch_size, config.seed)
  workdir = Path(config.workdir)

  def train_data(step):
    batch = batches(step)
    return transform(augment(batch, step) if augment else batch)

  def eval_data(arrays):
    return lambda: (transform(batch) for batch in padded_batches(arrays, eval_batch_size))

  def summarize(split, outputs):
    keep = outputs["mask"] > 0
    logits_NxC, labels_N = outputs["logits"][keep], outputs["labels"][keep]
    predictions_N, extra = decide(split, logits_NxC, labels_N)
    metrics = {**classification_metrics(labels_N, predictions_N, len(class_names)),
               "loss": _log_softmax_loss(logits_NxC, labels_N), **extra}
    if jax.process_index() == 0:
      write_report(workdir, split, labels_N, predictions_N, class_names, metrics)
    return metrics

  return Task(model=model, loss_fn=cross_entropy_loss, train_data=train_data,
              eval_data={split: eval_data(arrays) for split, arrays in evals.items()},
              eval_fn=_eval_fn, summarize=summarize, tokenizer=tokenizer)
