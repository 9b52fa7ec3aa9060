"""Audio-visual classification: `research.tasks.classification` on paired, degraded inputs.

A training batch is a pure function of (seed, step): `EpochBatches` picks the pairs, then a
generator seeded by (seed, step) places each clip at a random offset in the window, draws its
noise and the image's occlusion and noise (`research.data.audio_visual.degraded`) and, for the
fusion models, modality dropout: with probability `modality_dropout` an example loses one of
its two inputs (audio or image, evenly), zeroed, with `present` saying so. The single-modality
models are trained without it (dropping their only input would teach nothing).

Evaluation runs on three versions of the test pairs, degraded once by the data seed: `test`
(both inputs), `test_no_audio` and `test_no_image` (that input zeroed and marked absent), each
with the usual accuracy, macro F1, confusion matrix and per-class report. Fusion models with
auxiliary classifiers train on `fusion_loss`. The normalization of the log-mels is measured on the degraded training clips (noise is part of
what the model hears) and stored in the model's config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from research import audio
from research.audio import LogMelConfig
from research.data import audio_visual as av
from research.data import speech
from research.data.batching import EpochBatches
from research.tasks.classification import classification_task
from research.train.task import Task

_STREAM = 3  # keeps this task's draws apart from EpochBatches' shuffles
MISSING = {"test": (1.0, 1.0), "test_no_audio": (0.0, 1.0), "test_no_image": (1.0, 0.0)}


def normalization(train: av.Pairs, degrade: av.Degrade, cfg: LogMelConfig, data_seed: int,
                  chunk: int = 512) -> tuple[float, float]:
  """Mean and standard deviation of the log-mels of the centred, degraded training clips."""
  cfg = dataclasses.replace(cfg, mean=0.0, std=1.0)
  rng = np.random.default_rng([data_seed, _STREAM + 100])  # not a training step's stream
  total, total_sq, count = 0.0, 0.0, 0
  for start in range(0, len(train), chunk):
    rows = slice(start, start + chunk)
    waves = av.noisy_audio(speech.place(train.waves[rows], train.lengths[rows]), rng, degrade)
    spec = np.asarray(audio.log_mel_jit(waves, cfg), np.float64)
    total, total_sq, count = total + spec.sum(), total_sq + (spec ** 2).sum(), count + spec.size
  mean = total / count
  return float(mean), float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))


def with_present(arrays: dict[str, np.ndarray], present_Nx2: np.ndarray) -> dict[str, np.ndarray]:
  """The arrays with `present` [N, 2] set and each absent input zeroed."""
  return {**arrays, "present": present_Nx2,
          "audio": np.where(present_Nx2[:, :1] > 0, arrays["audio"], 0.0).astype(np.float32),
          "image": np.where(present_Nx2[:, 1:, None] > 0, arrays["image"], 0.0).astype(np.float32)}


def with_missing(arrays: dict[str, np.ndarray], present: tuple[float, float]) -> dict[str, np.ndarray]:
  """The arrays with every example's `present` set to `present` (an absent input zeroed)."""
  return with_present(arrays, np.tile(np.asarray(present, np.float32), (len(arrays["labels"]), 1)))


def drop_modalities(batch: dict[str, np.ndarray], prob: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """`present` [B, 2]: each example loses one input with probability `prob`, which one evenly;
  the lost input is zeroed."""
  n = len(batch["labels"])
  dropped = rng.random(n) < prob
  which = rng.integers(0, 2, n)
  present = np.ones((n, 2), np.float32)
  present[dropped, which[dropped]] = 0.0
  return with_present(batch, present)


def fusion_loss(aux_weight: float):
  """Cross-entropy of the fused logits plus `aux_weight` x each modality's own classifier's
  (over the examples that have that modality). Trained on the fused loss alone, a fusion
  model leans on whichever input it learns first and leaves the other's branch weak (in
  late fusion the image's: 30% audio-only accuracy against 61% for the audio model alone);
  the auxiliary losses make each branch learn on its own too (Wang et al. 2020)."""

  def loss_fn(model, batch, rngs=None):
    inputs, labels_B = batch["inputs"], batch["labels"]
    logits_BxC, aux = model.outputs(inputs, rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()
    metrics = {"accuracy": (logits_BxC.argmax(-1) == labels_B).mean()}
    for m, name in enumerate(("audio", "image")):
      if name not in aux:
        continue
      has_B = inputs["present"][:, m].astype(jnp.float32)
      ce_B = optax.softmax_cross_entropy_with_integer_labels(aux[name], labels_B)
      metrics[f"loss_{name}"] = (ce_B * has_B).sum() / jnp.maximum(has_B.sum(), 1.0)
      loss = loss + aux_weight * metrics[f"loss_{name}"]
    return loss, {**metrics, "loss": loss}

  return loss_fn


def pack(batch: dict[str, np.ndarray]) -> dict:
  """What the model reads: {"inputs": {"audio", "image", "present"}, "labels"[, "mask"]}."""
  out = {k: v for k, v in batch.items() if k not in ("audio", "image", "present")}
  out["inputs"] = {k: batch[k] for k in ("audio", "image", "present")}
  return out


def audio_visual_task(config, make_model, pairs: dict[str, av.Pairs], class_names, *,
                      frontend: LogMelConfig, degrade: av.Degrade, data_seed: int,
                      modality_dropout: float, eval_batch_size: int, time_shift: bool = True,
                      aux_weight: float = 0.0) -> Task:
  """Trains `make_model(frontend with the degraded training clips' normalization)` on
  `pairs["train"]`; evaluates on the test pairs whole and with each input missing."""
  train = pairs["train"]
  mean, std = normalization(train, degrade, frontend, data_seed)
  model = make_model(dataclasses.replace(frontend, mean=mean, std=std))
  batches = EpochBatches({"index": np.arange(len(train), dtype=np.int64)}, config.batch_size,
                         config.seed)
  S = train.waves.shape[1]

  def train_batch(step):
    rows = batches(step)["index"]
    rng = np.random.default_rng([config.seed, _STREAM, step])
    lengths = train.lengths[rows]
    offsets = ((rng.random(len(rows)) * (S - lengths + 1)).astype(np.int64) if time_shift
               else None)
    part = av.Pairs(train.waves[rows], lengths, train.images[rows], train.labels[rows], [],
                    train.image_ids[rows])
    return drop_modalities(av.degraded(part, degrade, rng, offsets), modality_dropout, rng)

  test = av.test_set(pairs["test"], degrade, data_seed)
  evals = {split: with_missing(test, present) for split, present in MISSING.items()}
  task = classification_task(config, model, train_batch, evals, class_names, transform=pack,
                             eval_batch_size=eval_batch_size)
  if aux_weight > 0:
    task.loss_fn = fusion_loss(aux_weight)
  return task
