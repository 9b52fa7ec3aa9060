"""Speech recognizers trained with CTC: waveform -> log-mels -> conv subsampling -> encoder -> logits.

`CTCRecognizer` reads waveforms [B, S] with their lengths, computes the normalized log-mel
spectrogram on device (`research.audio`, augmented in training as `AudioClassifier` does),
then two 3x3 convolutions of stride 2 over (time, mel) with ReLU (the subsampling front of
ESPnet/Conformer: 4x fewer frames, 64 ms per output frame with the default 16 ms hop), a
linear projection of each frame's channels x mel bands to the model width, and an encoder:

  transformer  pre-LayerNorm `research.nn.transformer.Block`s (the project's encoder layers)
               with sinusoidal positions, attending only to the utterance's own frames
               (padding is a segment of its own, `research.nn.attention.padding_segments`).
  bilstm       layers of forward and backward `research.models.lstm.LSTM`s, the backward one
               reading each utterance reversed within its length (as `BiLSTMClassifier`).

The head maps each frame to `num_labels + 1` logits: the labels, then the CTC blank (the
last class). Outputs are (logits [B, T', C] float32, valid frames [B]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research import audio
from research.audio import AugmentConfig, LogMelConfig
from research.models.bilstm import reverse_within_length
from research.models.lstm import LSTM
from research.models.seq2seq import sinusoid
from research.nn.attention import padding_segments
from research.nn.transformer import Block

KINDS = ("transformer", "bilstm")


@dataclasses.dataclass(frozen=True)
class CTCTransformerConfig:
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 144
  mlp_dim: int = 576
  dropout: float = 0.1
  attention: str = "xla"


@dataclasses.dataclass(frozen=True)
class CTCBiLSTMConfig:
  num_layers: int = 2
  hidden_dim: int = 128  # per direction
  dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class CTCRecognizerConfig:
  frontend: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  kind: str = "transformer"
  transformer: CTCTransformerConfig | None = None
  bilstm: CTCBiLSTMConfig | None = None
  subsample_channels: int = 64
  labels: tuple[str, ...] = tuple(str(d) for d in range(10))  # class i's text; blank = last
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "labels", tuple(self.labels))

  @property
  def num_classes(self) -> int:
    return len(self.labels) + 1

  @property
  def blank(self) -> int:
    return len(self.labels)


def subsampled_length(frames):
  """Frames after two stride-2 convolutions with SAME padding: ceil(ceil(T / 2) / 2)."""
  return (frames + 3) // 4


class CTCRecognizer(nnx.Module):

  def __init__(self, cfg: CTCRecognizerConfig, *, rngs: nnx.Rngs):
    if cfg.kind not in KINDS:
      raise ValueError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    encoder = getattr(cfg, cfg.kind)
    if encoder is None:
      raise ValueError(f"kind={cfg.kind!r} but its config `{cfg.kind}` is None")
    cfg.frontend.check()
    self.cfg = cfg
    C, dtype = cfg.subsample_channels, cfg.dtype
    conv = dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME", dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(1, C, **conv)
    self.conv2 = nnx.Conv(C, C, **conv)
    mels = subsampled_length(cfg.frontend.n_mels)
    width = encoder.embed_dim if cfg.kind == "transformer" else 2 * encoder.hidden_dim
    d_in = encoder.embed_dim if cfg.kind == "transformer" else encoder.hidden_dim
    self.project = nnx.Linear(C * mels, d_in, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(encoder.dropout)
    if cfg.kind == "transformer":
      t = encoder
      self.blocks = nnx.List([
          Block(t.embed_dim, t.num_heads, mlp_dim=t.mlp_dim, dropout=t.dropout,
                attention=t.attention, dtype=dtype, rngs=rngs) for _ in range(t.num_layers)])
      self.norm = nnx.LayerNorm(t.embed_dim, dtype=dtype, rngs=rngs)
    else:
      b = encoder
      self.forward_lstms = nnx.List([
          LSTM(b.hidden_dim if i == 0 else 2 * b.hidden_dim, b.hidden_dim, dtype=dtype, rngs=rngs)
          for i in range(b.num_layers)])
      self.backward_lstms = nnx.List([
          LSTM(b.hidden_dim if i == 0 else 2 * b.hidden_dim, b.hidden_dim, dtype=dtype, rngs=rngs)
          for i in range(b.num_layers)])
    self.head = nnx.Linear(width, cfg.num_classes, dtype=dtype, rngs=rngs)

  def features(self, waves_BxS: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Normalized log-mels [B, T, n_mels]; augmented in training (`rngs` given)."""
    key = rngs.dropout() if rngs is not None else None
    return audio.features(waves_BxS, self.cfg.frontend, self.cfg.augment, key)

  def __call__(self, waves_BxS: jax.Array, lengths_B: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """(logits [B, T', num_classes] float32, valid output frames [B]) of waveforms [B, S]
    whose first `lengths` samples are the utterance."""
    spec_BxTxM = self.features(waves_BxS, rngs=rngs)
    T = spec_BxTxM.shape[1]
    frames_B = jnp.minimum(self.cfg.frontend.frames(lengths_B), T)
    valid_BxT = jnp.arange(T)[None, :] < frames_B[:, None]
    x = jnp.where(valid_BxT[..., None], spec_BxTxM, 0.0)[..., None].astype(self.cfg.dtype)
    x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))  # [B, T', M', C]
    B, Tq = x.shape[:2]
    out_B = jnp.minimum(subsampled_length(frames_B), Tq)
    x_BxTxD = self.project(x.reshape(B * Tq, -1)).reshape(B, Tq, -1)
    valid_BxT = jnp.arange(Tq)[None, :] < out_B[:, None]
    deterministic = rngs is None
    if self.cfg.kind == "transformer":
      x_BxTxD = x_BxTxD + sinusoid(jnp.arange(Tq), x_BxTxD.shape[-1]).astype(x_BxTxD.dtype)
      x_BxTxD = self.dropout(x_BxTxD, deterministic=deterministic, rngs=rngs)
      segments = padding_segments(valid_BxT)
      for block in self.blocks:
        x_BxTxD, _ = block(x_BxTxD, segment_ids=segments, rngs=rngs)
      h_BxTxD = self.norm(x_BxTxD)
    else:
      h_BxTxD = self.dropout(x_BxTxD, deterministic=deterministic, rngs=rngs)
      for fwd, bwd in zip(self.forward_lstms, self.backward_lstms):
        _, f_BxTxH = fwd(h_BxTxD)
        _, b_BxTxH = bwd(reverse_within_length(h_BxTxD, out_B))
        h_BxTxD = jnp.concatenate([f_BxTxH, reverse_within_length(b_BxTxH, out_B)], axis=-1)
        h_BxTxD = self.dropout(h_BxTxD, deterministic=deterministic, rngs=rngs)
    logits = self.head(h_BxTxD.reshape(B * Tq, -1)).reshape(B, Tq, -1)
    return logits.astype(jnp.float32), out_B
