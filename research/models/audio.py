"""Classifiers of raw waveforms: the log-mel front end, then a Transformer, a CNN or an MLP.

`AudioClassifier` reads waveforms [B, clip_samples] at the front end's rate and computes the
normalized log-mel spectrogram itself (`research.audio`), so the features' parameters and the
training set's normalization live in its config (model.json): a run folder classifies a wav
file without the dataset. In training (`rngs` given) it adds the configured noise and
SpecAugment masks, drawn from the step's dropout key.

The backbones, on the spectrogram [B, T, n_mels]:
  transformer  `SpectrogramTransformer`, AST-style (Gong et al. 2021): non-overlapping
               patch_time x patch_freq patches, linearly embedded, learned positions, the
               shared pre-LN `Block`s, mean or [CLS] pooling.
  cnn          `research.models.cnn.CNN` (a small ResNet) on the spectrogram as a 1-channel image.
  mlp          `research.models.mlp.MLP` on each mel band's mean and standard deviation over time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research import audio
from research.audio import AugmentConfig, LogMelConfig
from research.models.cnn import CNN, CNNConfig
from research.models.mlp import MLP, MLPConfig
from research.nn.transformer import Block

KINDS = ("transformer", "cnn", "mlp")
POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class SpectrogramTransformerConfig:
  frames: int = 61  # spectrogram frames (padded with zeros to a multiple of patch_time)
  n_mels: int = 40
  patch_time: int = 4
  patch_freq: int = 8
  num_classes: int = 10
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 96
  mlp_dim: int = 192
  dropout: float = 0.1
  pool: str = "mean"
  attention: str = "xla"
  dtype: str = "float32"

  @property
  def grid(self) -> tuple[int, int]:
    return -(-self.frames // self.patch_time), self.n_mels // self.patch_freq


class SpectrogramTransformer(nnx.Module):

  def __init__(self, cfg: SpectrogramTransformerConfig, *, rngs: nnx.Rngs):
    c = cfg
    if c.n_mels % c.patch_freq:
      raise ValueError(f"n_mels={c.n_mels} is not divisible by patch_freq={c.patch_freq}")
    if c.pool not in POOLS:
      raise ValueError(f"unknown pool {c.pool!r}; choose one of {', '.join(POOLS)}")
    if c.embed_dim % c.num_heads:
      raise ValueError(f"embed_dim={c.embed_dim} is not divisible by num_heads={c.num_heads}")
    self.cfg = c
    self.patch_embed = nnx.Linear(c.patch_time * c.patch_freq, c.embed_dim, dtype=c.dtype,
                                  rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, c.embed_dim))) if c.pool == "cls" else None
    rows, cols = c.grid
    self.pos_embed = nnx.Param(init(rngs.params(), (1, rows * cols + (c.pool == "cls"),
                                                    c.embed_dim)))
    self.dropout = nnx.Dropout(c.dropout)
    self.blocks = nnx.List([
        Block(c.embed_dim, c.num_heads, mlp_dim=c.mlp_dim, dropout=c.dropout,
              attention=c.attention, dtype=c.dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = nnx.LayerNorm(c.embed_dim, dtype=c.dtype, rngs=rngs)
    self.head = nnx.Linear(c.embed_dim, c.num_classes, kernel_init=nnx.initializers.zeros,
                           dtype=c.dtype, rngs=rngs)

  def patchify(self, spec_BxTxM: jax.Array) -> jax.Array:
    """[B, T, M] -> [B, rows * cols, patch_time * patch_freq], time-major patch order."""
    c, (rows, cols) = self.cfg, self.cfg.grid
    B, T, M = spec_BxTxM.shape
    x = jnp.pad(spec_BxTxM, ((0, 0), (0, rows * c.patch_time - T), (0, 0)))
    x = x.reshape(B, rows, c.patch_time, cols, c.patch_freq)
    return x.transpose(0, 1, 3, 2, 4).reshape(B, rows * cols, c.patch_time * c.patch_freq)

  def __call__(self, spec_BxTxM: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.patch_embed(self.patchify(spec_BxTxM))
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token.value, (x.shape[0], 1, x.shape[2])).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
    x = self.dropout(x + self.pos_embed.value, deterministic=rngs is None, rngs=rngs)
    for block in self.blocks:
      x, _ = block(x, rngs=rngs)
    x = self.norm(x)
    x = x[:, 0] if self.cls_token is not None else x.mean(axis=1)
    return self.head(x).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class AudioClassifierConfig:
  frontend: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  kind: str = "cnn"  # which of the backbone configs below is used (the others stay None)
  transformer: SpectrogramTransformerConfig | None = None
  cnn: CNNConfig | None = None
  mlp: MLPConfig | None = None
  labels: tuple[str, ...] = ()  # class names, in the order of the logits (for `predict`)

  def __post_init__(self):  # a list (from JSON or a config) would make the config unhashable
    object.__setattr__(self, "labels", tuple(self.labels))

  @property
  def num_classes(self) -> int:
    backbone = getattr(self, self.kind)
    return backbone.out_features if self.kind == "mlp" else backbone.num_classes


class AudioClassifier(nnx.Module):

  def __init__(self, cfg: AudioClassifierConfig, *, rngs: nnx.Rngs):
    if cfg.kind not in KINDS:
      raise ValueError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    backbone = getattr(cfg, cfg.kind)
    if backbone is None:
      raise ValueError(f"kind={cfg.kind!r} but its config `{cfg.kind}` is None")
    cfg.frontend.check()
    if cfg.labels and len(cfg.labels) != cfg.num_classes:
      raise ValueError(f"{len(cfg.labels)} labels for {cfg.num_classes} classes")
    self.cfg = f = cfg
    frames, mels = f.frontend.num_frames, f.frontend.n_mels
    if cfg.kind == "transformer":
      if (backbone.frames, backbone.n_mels) != (frames, mels):
        raise ValueError(f"transformer frames x n_mels {backbone.frames}x{backbone.n_mels} "
                         f"differ from the front end's {frames}x{mels}")
      self.backbone = SpectrogramTransformer(backbone, rngs=rngs)
    elif cfg.kind == "cnn":
      self.backbone = CNN(backbone, rngs=rngs)
    else:
      if backbone.in_features != 2 * mels:
        raise ValueError(f"mlp in_features={backbone.in_features}, expected 2 x n_mels = {2 * mels}")
      self.backbone = MLP(backbone, rngs=rngs)

  def features(self, waves_BxS: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Normalized log-mels [B, T, n_mels]; augmented in training (`rngs` given)."""
    key = rngs.dropout() if rngs is not None else None
    return audio.features(waves_BxS, self.cfg.frontend, self.cfg.augment, key)

  def classify(self, spec_BxTxM: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32) of normalized log-mels."""
    if self.cfg.kind == "cnn":
      return self.backbone(spec_BxTxM[..., None], rngs=rngs)
    if self.cfg.kind == "mlp":
      pooled = jnp.concatenate([spec_BxTxM.mean(axis=1), spec_BxTxM.std(axis=1)], axis=-1)
      return self.backbone(pooled, rngs=rngs)
    return self.backbone(spec_BxTxM, rngs=rngs)

  def __call__(self, waves_BxS: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32) of waveforms [B, clip_samples]."""
    return self.classify(self.features(waves_BxS, rngs=rngs), rngs=rngs)
