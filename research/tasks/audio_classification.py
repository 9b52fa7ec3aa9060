"""Spoken-word classification: `research.tasks.classification` plus what waveforms need.

Clips are stored left-aligned in a fixed window of `clip_samples` with their lengths. A
training batch places each clip at a random offset inside the window (`time_shift`, drawn in
numpy from a generator seeded by (seed, step), so a batch stays a pure function of the step);
evaluation centres them. The model (`research.models.audio.AudioClassifier`) reads the
waveforms and computes its own normalized log-mels on device; the normalization (mean and
standard deviation of the training set's log-mels) is measured here and stored in its config.
After training the run folder gets `misclassified_test.png`: the spectrograms of test clips
the model got wrong, with their true and predicted labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from research import audio
from research.audio import LogMelConfig
from research.data import speech
from research.data.batching import padded_batches
from research.evaluate.plots import plot_misclassified
from research.tasks.classification import classification_task
from research.train.task import Task

_SHIFT_STREAM = 2  # keeps the time shifts' generator apart from EpochBatches' shuffles


def arrays(recordings: speech.Recordings, clip_samples: int) -> dict[str, np.ndarray]:
  waves, lengths = speech.left_aligned(recordings.clips, clip_samples)
  return {"inputs": waves, "lengths": lengths, "labels": recordings.labels}


def normalization(waves_NxS: np.ndarray, lengths_N: np.ndarray, cfg: LogMelConfig,
                  chunk: int = 512) -> tuple[float, float]:
  """Mean and standard deviation of the log-mels of the (centred) clips."""
  total, total_sq, count = 0.0, 0.0, 0
  for start in range(0, len(waves_NxS), chunk):
    w = speech.place(waves_NxS[start:start + chunk], lengths_N[start:start + chunk])
    spec = np.asarray(audio.log_mel_jit(w, cfg), np.float64)
    total, total_sq, count = total + spec.sum(), total_sq + (spec ** 2).sum(), count + spec.size
  mean = total / count
  return float(mean), float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))


def normalized_frontend(cfg: LogMelConfig, train: dict[str, np.ndarray]) -> LogMelConfig:
  mean, std = normalization(train["inputs"], train["lengths"], dataclasses.replace(cfg, mean=0.0, std=1.0))
  return dataclasses.replace(cfg, mean=mean, std=std)


def probabilities(model: nnx.Module, waves_NxS: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Class probabilities [N, C] of centred clips, in evaluation mode."""
  logits = nnx.jit(lambda model, x: model(x))
  out = []
  for b in padded_batches({"inputs": waves_NxS}, batch_size):
    z = np.asarray(logits(model, b["inputs"]), np.float64)[b["mask"] > 0]
    z = np.exp(z - z.max(axis=1, keepdims=True))
    out.append(z / z.sum(axis=1, keepdims=True))
  return np.concatenate(out)


def audio_classification_task(config, make_model, splits: dict[str, speech.Recordings],
                              class_names: Sequence[str], frontend: LogMelConfig, *,
                              eval_batch_size: int, time_shift: bool = True) -> Task:
  """Trains `make_model(frontend with the training set's normalization)` on `splits["train"]`
  and evaluates it on every other split. `config` gives batch_size, seed and workdir."""
  data = {name: arrays(s, frontend.clip_samples) for name, s in splits.items()}
  frontend = normalized_frontend(frontend, data["train"])
  model = make_model(frontend)

  def centre(batch):
    if "lengths" not in batch:
      return batch
    batch = dict(batch)
    lengths = batch.pop("lengths")
    return {**batch, "inputs": speech.place(batch["inputs"], lengths)}

  def shift(batch, step):
    rng = np.random.default_rng([config.seed, _SHIFT_STREAM, step])
    batch = dict(batch)
    lengths = batch.pop("lengths")
    offsets = (rng.random(len(lengths)) * (frontend.clip_samples - lengths + 1)).astype(np.int64)
    return {**batch, "inputs": speech.place(batch["inputs"], lengths, offsets)}

  train = data.pop("train")
  task = classification_task(config, model, train, data, class_names, transform=centre,
                             eval_batch_size=eval_batch_size, augment=shift if time_shift else None)

  def finish(model, workdir: Path):
    if "test" not in data:
      return
    test = data["test"]
    waves = speech.place(test["inputs"], test["lengths"])
    probs = probabilities(model, waves, eval_batch_size)
    predictions = probs.argmax(1)
    spec = np.asarray(audio.log_mel_jit(waves, frontend))
    titles = [f"{name}\n{class_names[t]} -> {class_names[p]} ({q:.2f})" for name, t, p, q
              in zip(splits["test"].names, test["labels"], predictions, probs.max(1))]
    plot_misclassified(spec.transpose(0, 2, 1), test["labels"], predictions, titles,
                       workdir / "misclassified_test.png", what="test clips (probability)",
                       count=24, panel=(2.0, 1.9), origin="lower", aspect="auto", cmap="magma")

  task.finish = finish
  return task
