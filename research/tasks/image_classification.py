"""Image classification: `research.tasks.classification` plus what images need.

Pixels are normalized with the training set's mean and standard deviation. Augmentation
(`augmentation=True`) takes a random crop of each training image padded by 4 black pixels
and flips half of them left-right; it runs in numpy on the host, drawing from a generator
seeded by (seed, step), so a batch stays a pure function of the step (exact resume) and every
model shares one compiled train step whatever the augmentation. After training, the run
folder gets `misclassified_test.png`: test images the model got wrong, with true and predicted
labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from research.data.batching import padded_batches
from research.evaluate.plots import plot_misclassified
from research.tasks.classification import classification_task
from research.train.task import Task

_AUGMENT_STREAM = 1  # keeps the crops' generator apart from EpochBatches' shuffles


def normalization(images_NxHxW: np.ndarray) -> tuple[float, float]:
  """Mean and standard deviation of the pixels (scaled to [0, 1]) of the training images."""
  x = images_NxHxW.astype(np.float64) / 255
  return float(x.mean()), float(x.std())


def normalize(images_BxHxW: np.ndarray, mean: float, std: float) -> np.ndarray:
  """uint8 [B, H, W] -> float32 [B, H, W, 1] with the training set's zero mean, unit variance."""
  return ((images_BxHxW.astype(np.float32) / 255 - mean) / std)[..., None]


def augment(images_BxHxW: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crops of the images zero-padded by `pad` pixels, each flipped left-right with p=1/2."""
  B, H, W = images_BxHxW.shape
  padded = np.pad(images_BxHxW, ((0, 0), (pad, pad), (pad, pad)))
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, B))
  flip = rng.random(B) < 0.5
  rows_BxH = dy[:, None] + np.arange(H)
  cols_BxW = dx[:, None] + np.where(flip[:, None], np.arange(W)[::-1], np.arange(W))
  return padded[np.arange(B)[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]


def predict(model: nnx.Module, images_NxHxWx1: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes [N] in evaluation mode."""
  logits = nnx.jit(lambda model, x: model(x))
  predictions = [np.asarray(logits(model, b["inputs"]).argmax(-1))[b["mask"] > 0]
                 for b in padded_batches({"inputs": images_NxHxWx1}, batch_size)]
  return np.concatenate(predictions)


def image_classification_task(config, model: nnx.Module, splits: dict[str, dict[str, np.ndarray]],
                              class_names: Sequence[str], *, eval_batch_size: int,
                              augmentation: bool = False) -> Task:
  """Trains on `splits["train"]` ({"image": uint8 [N, H, W], "label": [N]}) and evaluates on
  every other split; `augmentation` turns on crop-and-flip augmentation. `config` gives
  batch_size, seed and workdir."""
  mean, std = normalization(splits["train"]["image"])

  def transform(batch):
    return {**batch, "inputs": normalize(batch["inputs"], mean, std)}

  def crop_and_flip(batch, step):
    rng = np.random.default_rng([config.seed, _AUGMENT_STREAM, step])
    return {**batch, "inputs": augment(batch["inputs"], rng)}

  arrays = {name: {"inputs": s["image"], "labels": s["label"]} for name, s in splits.items()}
  task = classification_task(
      config, model, arrays.pop("train"), arrays, class_names, transform=transform,
      eval_batch_size=eval_batch_size, augment=crop_and_flip if augmentation else None)

  def finish(model, workdir: Path):
    test = splits["test"]
    predictions = predict(model, normalize(test["image"], mean, std), eval_batch_size)
    titles = [f"{class_names[t]}\n-> {class_names[p]}" for t, p in zip(test["label"], predictions)]
    plot_misclassified(test["image"], test["label"], predictions, titles,
                       workdir / "misclassified_test.png", what="test images", cmap="gray_r",
                       vmin=0, vmax=255)

  task.finish = finish
  return task
