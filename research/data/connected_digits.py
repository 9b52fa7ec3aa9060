"""Connected digits: utterances of 1-7 spoken digits built from FSDD recordings.

An utterance is one speaker saying a random digit string: that speaker's recordings of each
digit (drawn from one split's recordings only, so the test utterances are made of the
official test recordings, indices 0-4), each trimmed of its silent ends, cut to at most
`max_word_s` and scaled to a random level, joined by random silent gaps, with silence before
and after, then background noise (white or pink, at a random signal-to-noise ratio) over the
whole utterance. Everything is drawn from a numpy generator, so an utterance set is a pure
function of its seed: `utterances(recordings, count, cfg, seed)` for the fixed test set,
`utterances(..., seed=[seed, stream, step])` for a training batch of any step.

Waveforms come left-aligned in a window of `max_samples` (zero after `lengths`), labels as
digit ids padded with -1.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from research.data import speech

PAD_LABEL = -1


@dataclasses.dataclass(frozen=True)
class UtteranceConfig:
  sample_rate: int = 8000
  min_digits: int = 1
  max_digits: int = 7
  max_seconds: float = 6.0  # the window; a longer draw gets its silences shortened to fit
  max_word_s: float = 0.8  # a trimmed recording is cut around its middle to this length
  gap_s: tuple[float, float] = (0.05, 0.3)  # silence between digits (uniform)
  edge_s: tuple[float, float] = (0.05, 0.3)  # silence before the first and after the last
  gain_db: tuple[float, float] = (-6.0, 6.0)  # each word's level around the target RMS
  target_rms: float = 0.05
  snr_db: tuple[float, float] = (5.0, 30.0)  # background noise, relative to the speech
  pink_noise: float = 0.5  # probability that an utterance's noise is pink rather than white
  trim_db: float = 30.0  # ends quieter than the word's loudest 10 ms frame by this are cut

  @property
  def max_samples(self) -> int:
    return int(round(self.max_seconds * self.sample_rate))

  def check(self) -> None:
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, "
                       f"{self.max_digits}")
    if self.max_digits * self.max_word_s >= self.max_seconds:
      raise ValueError(f"max_seconds={self.max_seconds} cannot hold {self.max_digits} words of "
                       f"{self.max_word_s} s")
    for name in ("gap_s", "edge_s", "gain_db", "snr_db"):
      low, high = getattr(self, name)
      if low > high:
        raise ValueError(f"{name}: low {low} > high {high}")


@dataclasses.dataclass
class Utterances:
  waves: np.ndarray  # [N, max_samples] float32, left-aligned, zero after `lengths`
  lengths: np.ndarray  # [N] samples
  labels: np.ndarray  # [N, max_digits] digit ids, PAD_LABEL after the utterance's digits
  sources: list[list[str]]  # the recordings each utterance was built from, in order

  def __len__(self):
    return len(self.lengths)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"inputs": self.waves, "lengths": self.lengths, "labels": self.labels}


def transcript(labels: Sequence[int]) -> str:
  """Digit ids -> their string, e.g. [4, 0, 4] -> "404" (padding dropped)."""
  return "".join(str(int(d)) for d in labels if d != PAD_LABEL)


def trim(x: np.ndarray, rate: int, db: float) -> np.ndarray:
  """`x` without the ends whose 10 ms frames are `db` below its loudest frame."""
  hop = max(1, rate // 100)
  frames = len(x) // hop
  if frames < 2:
    return x
  energy = (x[:frames * hop].reshape(frames, hop) ** 2).mean(1)
  loud = np.flatnonzero(energy >= energy.max() * 10 ** (-db / 10))
  return x[loud[0] * hop:(loud[-1] + 1) * hop]


class Pool:
  """One split's recordings, trimmed, indexed by (speaker, digit)."""

  def __init__(self, recordings: speech.Recordings, cfg: UtteranceConfig):
    self.words, self.names = [], []
    by_key: dict[tuple[str, int], list[int]] = {}
    max_len = int(cfg.max_word_s * cfg.sample_rate)
    for clip, label, name in zip(recordings.clips, recordings.labels, recordings.names):
      word = speech.fit(trim(np.asarray(clip, np.float32), cfg.sample_rate, cfg.trim_db), max_len)
      rms = float(np.sqrt((word ** 2).mean())) if len(word) else 0.0
      if rms == 0:
        continue
      speaker = name.split("_")[1] if name.count("_") >= 2 else ""
      by_key.setdefault((speaker, int(label)), []).append(len(self.words))
      self.words.append(word / rms)
      self.names.append(name)
    # Speakers with every digit: an utterance is one speaker's.
    self.speakers = sorted({s for s, _ in by_key if all((s, d) in by_key for d in range(10))})
    if not self.speakers:
      raise ValueError("no speaker has a recording of every digit")
    self.by_key = by_key


def _noise(rng: np.random.Generator, n: int, pink: bool) -> np.ndarray:
  """Unit-power white or pink (1/f power) noise."""
  x = rng.standard_normal(n)
  if pink:
    spectrum = np.fft.rfft(x)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / np.sqrt(f), n)
  return x / np.sqrt((x ** 2).mean())


def utterance(rng: np.random.Generator, pool: Pool, cfg: UtteranceConfig
              ) -> tuple[np.ndarray, list[int], list[str]]:
  """(waveform, digits, recording names) of one utterance drawn from `pool`."""
  rate = cfg.sample_rate
  speaker = pool.speakers[rng.integers(len(pool.speakers))]
  count = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
  digits = [int(d) for d in rng.integers(0, 10, count)]
  picks = [pool.by_key[speaker, d][rng.integers(len(pool.by_key[speaker, d]))] for d in digits]
  words = [pool.words[i] * cfg.target_rms * 10 ** (rng.uniform(*cfg.gain_db) / 20) for i in picks]
  gaps = rng.uniform(*cfg.gap_s, count - 1)
  edges = rng.uniform(*cfg.edge_s, 2)
  speech_len = sum(len(w) for w in words)
  silence = (gaps.sum() + edges.sum()) * rate
  if speech_len + silence > cfg.max_samples:  # shrink the silences to fit the window
    room = cfg.max_samples - speech_len - 1
    scale = max(room, 0) / silence
    gaps, edges = gaps * scale, edges * scale
  pieces = [np.zeros(int(edges[0] * rate), np.float32)]
  for i, w in enumerate(words):
    pieces.append(w)
    pieces.append(np.zeros(int((gaps[i] if i < count - 1 else edges[1]) * rate), np.float32))
  x = np.concatenate(pieces)[:cfg.max_samples]
  power = float((np.concatenate(words) ** 2).mean())
  snr = rng.uniform(*cfg.snr_db)
  noise = _noise(rng, len(x), bool(rng.random() < cfg.pink_noise))
  x = x + noise * np.sqrt(power / 10 ** (snr / 10))
  return np.clip(x, -1, 1).astype(np.float32), digits, [pool.names[i] for i in picks]


def utterances(pool: Pool, count: int, cfg: UtteranceConfig, seed) -> Utterances:
  """`count` utterances from `pool`, a pure function of `seed` (an int or a list of ints)."""
  rng = np.random.default_rng(seed)
  waves = np.zeros((count, cfg.max_samples), np.float32)
  lengths = np.zeros(count, np.int32)
  labels = np.full((count, cfg.max_digits), PAD_LABEL, np.int32)
  sources = []
  for n in range(count):
    x, digits, names = utterance(rng, pool, cfg)
    waves[n, :len(x)], lengths[n] = x, len(x)
    labels[n, :len(digits)] = digits
    sources.append(names)
  return Utterances(waves, lengths, labels, sources)
