"""Classifiers of raw waveforms: the log-mel front end, then a Transformer, a CNN or an MLP.

`AudioClassifier` reads waveforms [B, clip_samples] at the front end's rate and computes the
normalized log-mel spectrogram itself (`research.audio`), so the features' parameters and the
training set's normalization live in its config (model.json): a run folder classifies a wav
file without the dataset. In training (`rngs` given) it adds the configured noise and
SpecAugment masks, drawn from the step's dropout key.

The backbones, on the spectrogram [B, T, n_mels]:
  transformer  `research.models.vit.ViT`, AST-style (Gong et al. 2021): the spectrogram as a
               1-channel image of (frames padded to a multiple of the patch's height, n_mels),
               cut into non-overlapping (time, mel) patches.
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
from research.models.vit import ViT, ViTConfig

KINDS = ("transformer", "cnn", "mlp")


def spectrogram_size(frames: int, n_mels: int, patch: tuple[int, int]) -> tuple[int, int]:
  """The transformer's image size: the frames padded to a whole number of patches."""
  return -(-frames // patch[0]) * patch[0], n_mels


@dataclasses.dataclass(frozen=True)
class AudioClassifierConfig:
  frontend: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  kind: str = "cnn"  # which of the backbone configs below is used (the others stay None)
  transformer: ViTConfig | None = None
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
      expected = spectrogram_size(frames, mels, backbone.patch)
      if tuple(backbone.image_size) != expected or backbone.channels != 1:
        raise ValueError(f"transformer image_size {backbone.image_size} x {backbone.channels} "
                         f"channels; the front end gives {expected} x 1")
      self.backbone = ViT(backbone, rngs=rngs)
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
    frames = self.cfg.transformer.image_size[0]
    spec_BxTxM = jnp.pad(spec_BxTxM, ((0, 0), (0, frames - spec_BxTxM.shape[1]), (0, 0)))
    return self.backbone(spec_BxTxM[..., None], rngs=rngs)

  def __call__(self, waves_BxS: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32) of waveforms [B, clip_samples]."""
    return self.classify(self.features(waves_BxS, rngs=rngs), rngs=rngs)
