"""The audio front end in JAX: log-mel spectrograms, SpecAugment and additive noise.

`log_mel(waves_BxS, cfg)` frames the signal (no padding at the end, as `tf.signal.stft`'s
default), applies a periodic Hann window, takes `jnp.fft.rfft` of each frame (zero-padded to
`fft_length`), then the power (|X|^2, or |X| with power=1) through a mel filterbank built like
TensorFlow's `tf.signal.linear_to_mel_weight_matrix` (HTK mel scale 1127 ln(1 + f/700),
triangles in mel space, the DC bin zeroed), and the natural log with a floor. It is a pure
function of arrays, so it compiles inside whatever jitted step calls it (the models of
`research.models.audio` call it on raw waveforms, on device).

Training-time augmentation, also on device and keyed by the step's random key (so a resumed
run draws the same masks): white noise at a chosen signal-to-noise ratio added to the
waveform, and SpecAugment's time and frequency masks (Park et al. 2019) on the spectrogram.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
  sample_rate: int = 8000  # Hz; files at other rates are resampled to it
  clip_samples: int = 8000  # every clip is padded (centred) or cropped to this many samples
  frame_length: int = 256  # samples per STFT frame (32 ms at 8 kHz)
  frame_step: int = 128  # hop between frames (16 ms)
  fft_length: int = 256
  n_mels: int = 40
  fmin: float = 20.0  # Hz, the lowest mel band's lower edge
  fmax: float = 4000.0  # Hz, the highest band's upper edge (at most sample_rate / 2)
  power: float = 2.0  # 2: power spectrum, 1: magnitude
  log_floor: float = 1e-6  # log(max(mel, floor))
  mean: float = 0.0  # the training set's log-mel mean and standard deviation (set by the data)
  std: float = 1.0

  @property
  def num_frames(self) -> int:
    return 1 + (self.clip_samples - self.frame_length) // self.frame_step  # a Python int

  def frames(self, samples):
    """Whole STFT frames in `samples` samples (at least 1); numbers or arrays."""
    return jnp.maximum(1 + (samples - self.frame_length) // self.frame_step, 1)

  def check(self) -> None:
    """ValueError naming the first inconsistent field."""
    if self.frame_length > self.fft_length:
      raise ValueError(f"frame_length={self.frame_length} exceeds fft_length={self.fft_length}")
    if self.clip_samples < self.frame_length:
      raise ValueError(f"clip_samples={self.clip_samples} is shorter than one frame "
                       f"({self.frame_length})")
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, "
                       f"fmax={self.fmax}, sample_rate={self.sample_rate}")
    if self.n_mels < 1 or self.frame_step < 1 or self.std <= 0 or self.log_floor <= 0:
      raise ValueError("n_mels, frame_step, std and log_floor must be positive")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training-only augmentation, applied on device (evaluation and prediction skip it)."""
  noise_prob: float = 0.0  # fraction of training clips given white noise
  noise_snr_db: float = 20.0  # its signal-to-noise ratio (signal power over the clip's nonzero samples)
  time_masks: int = 0  # SpecAugment: masks of 0..time_mask_width frames each
  time_mask_width: int = 8
  freq_masks: int = 0  # masks of 0..freq_mask_width mel bins each
  freq_mask_width: int = 6


def hertz_to_mel(f):
  return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_matrix(n_mels: int, num_spectrogram_bins: int, sample_rate: int, fmin: float,
               fmax: float) -> np.ndarray:
  """[num_spectrogram_bins, n_mels] triangular filters, as tf.signal.linear_to_mel_weight_matrix."""
  linear_hz = np.linspace(0.0, sample_rate / 2, num_spectrogram_bins)[1:]  # DC bin zeroed below
  bins_mel = hertz_to_mel(linear_hz)[:, None]
  edges = np.linspace(hertz_to_mel(fmin), hertz_to_mel(fmax), n_mels + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  lower_slope = (bins_mel - lower) / (center - lower)
  upper_slope = (upper - bins_mel) / (upper - center)
  weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
  return np.concatenate([np.zeros((1, n_mels)), weights]).astype(np.float32)


def hann_window(length: int) -> np.ndarray:
  """The periodic Hann window (tf.signal.hann_window's default)."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def frame(waves_BxS: jax.Array, frame_length: int, frame_step: int) -> jax.Array:
  """[B, S] -> [B, T, frame_length], T = 1 + (S - frame_length) // frame_step (no end padding)."""
  T = 1 + (waves_BxS.shape[-1] - frame_length) // frame_step
  index_TxL = np.arange(T)[:, None] * frame_step + np.arange(frame_length)[None, :]
  return waves_BxS[..., index_TxL]


def stft(waves_BxS: jax.Array, frame_length: int, frame_step: int, fft_length: int) -> jax.Array:
  """Complex [B, T, fft_length // 2 + 1]: Hann-windowed frames through rfft."""
  frames = frame(waves_BxS.astype(jnp.float32), frame_length, frame_step) * hann_window(frame_length)
  return jnp.fft.rfft(frames, n=fft_length, axis=-1)


def log_mel(waves_BxS: jax.Array, cfg: LogMelConfig, *, normalize: bool = False) -> jax.Array:
  """Log-mel spectrogram [B, T, n_mels] (float32) of waveforms [B, S]; `normalize` subtracts
  cfg.mean and divides by cfg.std."""
  spectrum = jnp.abs(stft(waves_BxS, cfg.frame_length, cfg.frame_step, cfg.fft_length))
  if cfg.power != 1:
    spectrum = spectrum ** cfg.power
  weights = mel_matrix(cfg.n_mels, cfg.fft_length // 2 + 1, cfg.sample_rate, cfg.fmin, cfg.fmax)
  mel_BxTxM = jnp.einsum("btf,fm->btm", spectrum, weights, precision=jax.lax.Precision.HIGHEST)
  out = jnp.log(jnp.maximum(mel_BxTxM, cfg.log_floor))
  return (out - cfg.mean) / cfg.std if normalize else out


@functools.partial(jax.jit, static_argnames="cfg")
def log_mel_jit(waves_BxS: jax.Array, cfg: LogMelConfig) -> jax.Array:
  return log_mel(waves_BxS, cfg)


def add_noise(key: jax.Array, waves_BxS: jax.Array, snr_db: float, prob: float) -> jax.Array:
  """White noise at `snr_db` added to a `prob` fraction of the clips; the signal power is the
  mean square over each clip's nonzero samples (the padding does not count)."""
  k_pick, k_noise = jax.random.split(key)
  active = jnp.maximum((waves_BxS != 0).sum(-1, keepdims=True), 1)
  power = (waves_BxS ** 2).sum(-1, keepdims=True) / active
  scale = jnp.sqrt(power / 10 ** (snr_db / 10))
  noise = jax.random.normal(k_noise, waves_BxS.shape, waves_BxS.dtype) * scale
  picked = jax.random.uniform(k_pick, (waves_BxS.shape[0], 1)) < prob
  return jnp.where(picked, waves_BxS + noise, waves_BxS)


def _masks(key: jax.Array, batch: int, size: int, count: int, max_width: int) -> jax.Array:
  """[B, size] bool: True inside any of `count` random spans of 0..max_width per example."""
  k_width, k_start = jax.random.split(key)
  width = jax.random.randint(k_width, (batch, count), 0, max_width + 1)
  start = (jax.random.uniform(k_start, (batch, count)) * jnp.maximum(size - width, 0)).astype(jnp.int32)
  pos = jnp.arange(size)[None, None, :]
  return ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(axis=1)


def spec_augment(key: jax.Array, spec_BxTxM: jax.Array, aug: AugmentConfig,
                 fill: float = 0.0) -> jax.Array:
  """SpecAugment's time and frequency masks, set to `fill` (0 = the mean of a normalized
  spectrogram)."""
  B, T, M = spec_BxTxM.shape
  k_time, k_freq = jax.random.split(key)
  masked = jnp.zeros((B, T, M), bool)
  if aug.time_masks:
    masked |= _masks(k_time, B, T, aug.time_masks, aug.time_mask_width)[:, :, None]
  if aug.freq_masks:
    masked |= _masks(k_freq, B, M, aug.freq_masks, aug.freq_mask_width)[:, None, :]
  return jnp.where(masked, fill, spec_BxTxM)


def features(waves_BxS: jax.Array, cfg: LogMelConfig, aug: AugmentConfig,
             key: jax.Array | None) -> jax.Array:
  """Normalized log-mels [B, T, n_mels] of waveforms; with a `key` (training), augmented."""
  if key is not None and aug.noise_prob > 0:
    waves_BxS = add_noise(jax.random.fold_in(key, 1), waves_BxS.astype(jnp.float32),
                          aug.noise_snr_db, aug.noise_prob)
  spec = log_mel(waves_BxS, cfg, normalize=True)
  if key is not None and (aug.time_masks or aug.freq_masks):
    spec = spec_augment(jax.random.fold_in(key, 2), spec, aug)
  return spec
