"""Audio-visual digits (after AV-MNIST, Vielzeuf et al. 2018): a spoken digit paired with a
handwritten image of the same digit, each degraded so that neither alone is enough.

Audio: FSDD's official split (`research.data.speech`: recordings 0-4 of every speaker and digit
are the test clips). Images: scikit-learn's bundled `load_digits` (1,797 8x8 grey images with
16 levels, no download), split once into disjoint train and test images, stratified by digit,
by `data_seed`. Each clip is paired with an image of its digit from the same split: the images
of a digit are dealt out in a seeded random order, cycled, so each is used about equally
often. The pairs, like the image split, are a pure function of `data_seed`, not of the
training seed: every model seed sees the same examples and is tested on the same test pairs.

Degradation (`Degrade`), applied to the placed waveform and the [0, 1] image:
  audio   white noise over the whole 1 s window, at an SNR drawn per example uniformly from
          [snr_db_min, snr_db_max] (signal power over the clip's nonzero samples, as
          `research.audio.add_noise`);
  image   an `occlusion` x `occlusion` square blanked at a random place, then Gaussian pixel
          noise of standard deviation `image_noise`.
Training batches draw fresh noise and occlusions from (seed, step) (a resumed run sees the
same ones); the test pairs are degraded once, by `data_seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.data import speech

IMAGE_SIDE = 8
_TEST_STREAM = 7  # keeps the test set's noise apart from the split's and pairing's draws


@dataclasses.dataclass(frozen=True)
class Degrade:
  # Chosen from a few single-modality runs (test accuracy; FSDD has no validation split) so
  # that each modality alone stays far below 100%: -3..3 dB left the audio CNN at 36% after
  # 300 steps, 0..6 dB at 51%; noise 0.6 with a 4x4 square left a 2-stage image CNN at 48%
  # after 1000 steps, 0.4 with 3x3 at 70%.
  snr_db_min: float = 0.0
  snr_db_max: float = 6.0
  image_noise: float = 0.4  # std of the Gaussian pixel noise, pixels in [0, 1]
  occlusion: int = 3  # side of the blanked square (0: none)


@dataclasses.dataclass
class Pairs:
  """Paired examples of one split; the clips left-aligned in the window with their lengths."""
  waves: np.ndarray  # [N, S] float32
  lengths: np.ndarray  # [N] int32
  images: np.ndarray  # [N, 8, 8] float32 in [0, 1], clean
  labels: np.ndarray  # [N] int32, the digit of both
  audio_names: list[str]  # FSDD file names
  image_ids: np.ndarray  # [N] index into load_digits

  def __len__(self):
    return len(self.labels)


def digit_images(test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{"train", "test"}: (images [N, 8, 8] in [0, 1], labels [N], ids [N] into load_digits),
  disjoint, each digit split in the same proportion."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images, labels = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)
  rng = np.random.default_rng([seed, 0])
  test = np.zeros(len(labels), bool)
  for d in range(10):
    ids = rng.permutation(np.flatnonzero(labels == d))
    test[ids[:round(test_fraction * len(ids))]] = True
  return {split: (images[keep], labels[keep], np.flatnonzero(keep))
          for split, keep in (("train", ~test), ("test", test))}


def pair(audio_labels: np.ndarray, image_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For each clip, the index of an image with its label: each digit's images in a random
  order, dealt out in turn (cycled when there are more clips than images)."""
  out = np.zeros(len(audio_labels), np.int64)
  for d in np.unique(audio_labels):
    clips = np.flatnonzero(audio_labels == d)
    pool = rng.permutation(np.flatnonzero(image_labels == d))
    if not len(pool):
      raise ValueError(f"no image of digit {d} to pair with")
    out[clips] = pool[np.arange(len(clips)) % len(pool)]
  return out


def load(manual_dir: str = "", *, sample_rate: int, clip_samples: int, data_seed: int = 0,
         test_fraction: float = 0.3, max_per_class: int = 0) -> dict[str, Pairs]:
  """{"train", "test"} pairs: FSDD's official split, each clip with an image of its split."""
  clips = speech.load_fsdd(manual_dir, sample_rate=sample_rate, protocol="official",
                           max_per_class=max_per_class)
  images = digit_images(test_fraction, data_seed)
  out = {}
  for i, split in enumerate(("train", "test")):
    rec, (imgs, img_labels, ids) = clips[split], images[split]
    chosen = pair(rec.labels, img_labels, np.random.default_rng([data_seed, 1, i]))
    waves, lengths = speech.left_aligned(rec.clips, clip_samples)
    out[split] = Pairs(waves, lengths, imgs[chosen], rec.labels.copy(), list(rec.names), ids[chosen])
  return out


def noisy_audio(waves_BxS: np.ndarray, rng: np.random.Generator, cfg: Degrade) -> np.ndarray:
  """White noise at an SNR drawn per clip from [snr_db_min, snr_db_max], over the whole window."""
  active = np.maximum((waves_BxS != 0).sum(-1, keepdims=True), 1)
  power = (waves_BxS.astype(np.float64) ** 2).sum(-1, keepdims=True) / active
  snr_db = rng.uniform(cfg.snr_db_min, cfg.snr_db_max, (len(waves_BxS), 1))
  scale = np.sqrt(power / 10 ** (snr_db / 10))
  return (waves_BxS + rng.standard_normal(waves_BxS.shape) * scale).astype(np.float32)


def noisy_images(images_BxHxW: np.ndarray, rng: np.random.Generator, cfg: Degrade) -> np.ndarray:
  """A random `occlusion`-sided square blanked, then Gaussian noise on every pixel."""
  B, H, W = images_BxHxW.shape
  out = images_BxHxW.astype(np.float32).copy()
  if cfg.occlusion:
    s = cfg.occlusion
    top, left = rng.integers(0, H - s + 1, B), rng.integers(0, W - s + 1, B)
    rows, cols = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
    square = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + s)
              & (cols >= left[:, None, None]) & (cols < left[:, None, None] + s))
    out[square] = 0.0
  return (out + rng.standard_normal(out.shape) * cfg.image_noise).astype(np.float32)


def degraded(pairs: Pairs, cfg: Degrade, rng: np.random.Generator,
             offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{"audio": [N, S], "image": [N, 8, 8], "labels"}: the clips placed in the window (centred
  unless `offsets`), then both modalities degraded."""
  waves = speech.place(pairs.waves, pairs.lengths, offsets)
  return {"audio": noisy_audio(waves, rng, cfg), "image": noisy_images(pairs.images, rng, cfg),
          "labels": pairs.labels}


def test_set(pairs: Pairs, cfg: Degrade, data_seed: int) -> dict[str, np.ndarray]:
  """The test pairs, centred and degraded once by `data_seed` (the same for every model)."""
  return degraded(pairs, cfg, np.random.default_rng([data_seed, _TEST_STREAM]))
