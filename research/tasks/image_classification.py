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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from research.data.batching import padded_batches  # noqa: E402
from research.tasks.classification import classification_task  # noqa: E402
from research.train.task import Task  # noqa: E402

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


def plot_misclassified(images_NxHxW: np.ndarray, labels_N: np.ndarray, predictions_N: np.ndarray,
                       class_names: Sequence[str], path: Path, count: int = 36) -> None:
  """A grid of the first `count` misclassified images, titled `true -> predicted`."""
  wrong = np.flatnonzero(labels_N != predictions_N)[:count]
  cols = 6
  rows = max(1, -(-len(wrong) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, i in zip(axes.flat, wrong):
    ax.imshow(images_NxHxW[i], cmap="gray_r", vmin=0, vmax=255)
    ax.set_title(f"{class_names[labels_N[i]]}\n-> {class_names[predictions_N[i]]}", fontsize=7)
  fig.suptitle(f"misclassified test images ({len(wrong)} of {int((labels_N != predictions_N).sum())}"
               f" shown; true -> predicted)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
    plot_misclassified(test["image"], test["label"], predictions, class_names,
                       workdir / "misclassified_test.png")

  task.finish = finish
  return task
