"""Audio-visual classifiers: one modality alone, late fusion, early fusion, and a cross-attention
fusion Transformer.

Inputs are a dict {"audio": waveforms [B, S], "image": [B, 8, 8], "present": [B, 2]} (1.0 where
audio, image is there). The audio goes through the log-mel front end of `research.audio`
(normalization and SpecAugment in the config, as `research.models.audio.AudioClassifier`).

  audio, image  `research.models.cnn.CNN` on the log-mels / the image; the other input unused.
  late          both CNNs as classifiers; the prediction is the mean of the log-probabilities
                of the modalities present (one missing: the other's alone).
  early         both CNNs as encoders (their head outputs `embed_dim` features), concatenated
                and classified by `research.models.mlp.MLP`; a missing modality's features
                are a learned "missing" vector.
  attention     audio tokens (non-overlapping (time, mel) patches of the log-mels, as AST) and
                image tokens (patches of the image), each with learned position and modality
                embeddings; each layer updates every audio token by self-attention over the
                audio and cross-attention to the image tokens, and every image token the other
                way round (`research.nn.transformer.Block`, i.e. `MultiHeadAttention`). The two
                mean-pooled streams, concatenated, feed one Linear head. A missing modality's
                tokens are a learned "missing" token (plus positions).

Modality dropout (training with one input absent, drawn by the task) is what teaches the
fusion models the "missing" paths; its inputs arrive zeroed, and `present` says which.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research import audio
from research.audio import AugmentConfig, LogMelConfig
from research.models.audio import spectrogram_size
from research.models.cnn import CNN, CNNConfig
from research.models.mlp import MLP, MLPConfig
from research.models.vit import patchify
from research.nn.transformer import Block

KINDS = ("audio", "image", "late", "early", "attention")
FUSIONS = ("late", "early", "attention")


@dataclasses.dataclass(frozen=True)
class CrossTransformerConfig:
  audio_patch: tuple[int, int] = (4, 8)  # (frames, mel bands)
  image_patch: int = 2
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64
  mlp_dim: int = 128
  dropout: float = 0.1
  attention: str = "xla"

  def __post_init__(self):
    object.__setattr__(self, "audio_patch", tuple(self.audio_patch))


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  frontend: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  kind: str = "attention"
  num_classes: int = 10
  image_side: int = 8
  # CNNs of the audio, image, late and early kinds (channels and num_classes are set here).
  audio_cnn: CNNConfig = dataclasses.field(default_factory=lambda: CNNConfig(widths=(16, 32)))
  image_cnn: CNNConfig = dataclasses.field(default_factory=lambda: CNNConfig(widths=(16, 32)))
  embed_dim: int = 64  # early fusion: each encoder's features
  head: MLPConfig | None = None  # early fusion's classifier of the 2 x embed_dim features
  transformer: CrossTransformerConfig = dataclasses.field(default_factory=CrossTransformerConfig)
  dtype: str = "float32"
  labels: tuple[str, ...] = ()
  # Fusion kinds: each modality also gets its own classifier (late fusion: its branch; early
  # and attention: a Linear head on its features) whose loss training adds (`aux_weight`).
  aux_heads: bool = True

  def __post_init__(self):
    object.__setattr__(self, "labels", tuple(self.labels))


def _cnn(cfg: CNNConfig, classes: int, dtype: str, rngs: nnx.Rngs) -> CNN:
  return CNN(dataclasses.replace(cfg, channels=1, num_classes=classes, dtype=dtype), rngs=rngs)


class CrossTransformer(nnx.Module):
  """Audio and image token streams, each attending to itself and, across, to the other; `head`
  classifies the two `pooled` streams, concatenated (`FusionClassifier.outputs`)."""

  def __init__(self, cfg: CrossTransformerConfig, frontend: LogMelConfig, image_side: int,
               classes: int, *, dtype: str, rngs: nnx.Rngs):
    c = self.cfg = cfg
    (pt, pm), pi, D = c.audio_patch, c.image_patch, c.embed_dim
    if frontend.n_mels % pm or image_side % pi:
      raise ValueError(f"audio_patch {c.audio_patch} must divide the {frontend.n_mels} mel bands "
                       f"and image_patch {pi} the image side {image_side}")
    self.frames = spectrogram_size(frontend.num_frames, frontend.n_mels, c.audio_patch)[0]
    audio_tokens = (self.frames // pt) * (frontend.n_mels // pm)
    image_tokens = (image_side // pi) ** 2
    init = nnx.initializers.normal(0.02)
    self.audio_embed = nnx.Linear(pt * pm, D, dtype=dtype, rngs=rngs)
    self.image_embed = nnx.Linear(pi * pi, D, dtype=dtype, rngs=rngs)
    # Position embeddings carry the modality too: the two tables are separate.
    self.audio_pos = nnx.Param(init(rngs.params(), (1, audio_tokens, D)))
    self.image_pos = nnx.Param(init(rngs.params(), (1, image_tokens, D)))
    self.audio_missing = nnx.Param(init(rngs.params(), (1, 1, D)))
    self.image_missing = nnx.Param(init(rngs.params(), (1, 1, D)))
    block = dict(mlp_dim=c.mlp_dim, dropout=c.dropout, cross_attention=True,
                 attention=c.attention, dtype=dtype, rngs=rngs)
    self.audio_blocks = nnx.List([Block(D, c.num_heads, **block) for _ in range(c.num_layers)])
    self.image_blocks = nnx.List([Block(D, c.num_heads, **block) for _ in range(c.num_layers)])
    self.audio_norm = nnx.LayerNorm(D, dtype=dtype, rngs=rngs)
    self.image_norm = nnx.LayerNorm(D, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(2 * D, classes, kernel_init=nnx.initializers.zeros, dtype=dtype,
                           rngs=rngs)

  def tokens(self, spec_BxTxM, image_BxHxW, present_Bx2, *, rngs=None):
    """The final (audio [B, Na, D], image [B, Ni, D]) tokens, before normalization."""
    c = self.cfg
    spec = jnp.pad(spec_BxTxM, ((0, 0), (0, self.frames - spec_BxTxM.shape[1]), (0, 0)))
    a_BxNxD = self.audio_embed(patchify(spec[..., None], c.audio_patch))
    i_BxNxD = self.image_embed(patchify(image_BxHxW[..., None], c.image_patch))
    has_audio, has_image = present_Bx2[:, 0, None, None] > 0, present_Bx2[:, 1, None, None] > 0
    a_BxNxD = jnp.where(has_audio, a_BxNxD, self.audio_missing.value) + self.audio_pos.value
    i_BxNxD = jnp.where(has_image, i_BxNxD, self.image_missing.value) + self.image_pos.value
    for audio_block, image_block in zip(self.audio_blocks, self.image_blocks):
      # Both streams read the other's tokens of the previous layer (symmetric).
      a_next, _ = audio_block(a_BxNxD, context_BxSxD=i_BxNxD, rngs=rngs)
      i_next, _ = image_block(i_BxNxD, context_BxSxD=a_BxNxD, rngs=rngs)
      a_BxNxD, i_BxNxD = a_next, i_next
    return a_BxNxD, i_BxNxD

  def pooled(self, spec_BxTxM, image_BxHxW, present_Bx2, *, rngs=None):
    """The mean-pooled (audio [B, D], image [B, D]) streams."""
    a, i = self.tokens(spec_BxTxM, image_BxHxW, present_Bx2, rngs=rngs)
    return self.audio_norm(a).mean(1), self.image_norm(i).mean(1)


class FusionClassifier(nnx.Module):

  def __init__(self, cfg: FusionConfig, *, rngs: nnx.Rngs):
    if cfg.kind not in KINDS:
      raise ValueError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.labels and len(cfg.labels) != cfg.num_classes:
      raise ValueError(f"{len(cfg.labels)} labels for {cfg.num_classes} classes")
    cfg.frontend.check()
    self.cfg = c = cfg
    C, dt = c.num_classes, c.dtype
    if c.kind in ("audio", "late"):
      self.audio_net = _cnn(c.audio_cnn, C, dt, rngs)
    if c.kind in ("image", "late"):
      self.image_net = _cnn(c.image_cnn, C, dt, rngs)
    if c.kind == "early":
      if c.head is None or c.head.in_features != 2 * c.embed_dim or c.head.out_features != C:
        raise ValueError(f"early fusion needs head: an MLPConfig from {2 * c.embed_dim} "
                         f"features to {C} classes")
      self.audio_net = _cnn(c.audio_cnn, c.embed_dim, dt, rngs)
      self.image_net = _cnn(c.image_cnn, c.embed_dim, dt, rngs)
      init = nnx.initializers.normal(0.02)
      self.audio_missing = nnx.Param(init(rngs.params(), (1, c.embed_dim)))
      self.image_missing = nnx.Param(init(rngs.params(), (1, c.embed_dim)))
      self.head = MLP(c.head, rngs=rngs)
    if c.kind == "attention":
      self.fusion = CrossTransformer(c.transformer, c.frontend, c.image_side, C, dtype=dt,
                                     rngs=rngs)
    if c.aux_heads and c.kind in ("early", "attention"):
      d = c.embed_dim if c.kind == "early" else c.transformer.embed_dim
      self.audio_aux = nnx.Linear(d, C, dtype=dt, rngs=rngs)
      self.image_aux = nnx.Linear(d, C, dtype=dt, rngs=rngs)

  def spectrogram(self, waves_BxS, *, rngs=None):
    """Normalized log-mels [B, T, n_mels]; SpecAugment in training (`rngs` given)."""
    key = rngs.dropout() if rngs is not None else None
    return audio.features(waves_BxS, self.cfg.frontend, self.cfg.augment, key)

  def __call__(self, inputs: dict, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32; late fusion: log-probabilities)."""
    return self.outputs(inputs, rngs=rngs)[0]

  def outputs(self, inputs: dict, *, rngs: nnx.Rngs | None = None):
    """(logits [B, C], {modality: its own logits [B, C]}: the auxiliary classifiers of a fusion
    model with `aux_heads`, else empty)."""
    kind, aux = self.cfg.kind, self.cfg.aux_heads
    image_BxHxW = inputs["image"]
    present_Bx2 = inputs["present"].astype(jnp.float32)
    spec = self.spectrogram(inputs["audio"], rngs=rngs) if kind != "image" else None
    if kind == "audio":
      return self.audio_net(spec[..., None], rngs=rngs), {}
    if kind == "image":
      return self.image_net(image_BxHxW[..., None], rngs=rngs), {}
    if kind == "attention":
      a_BxD, i_BxD = self.fusion.pooled(spec, image_BxHxW, present_Bx2, rngs=rngs)
      logits = self.fusion.head(jnp.concatenate([a_BxD, i_BxD], -1)).astype(jnp.float32)
      if not aux:
        return logits, {}
      return logits, {"audio": self.audio_aux(a_BxD).astype(jnp.float32),
                      "image": self.image_aux(i_BxD).astype(jnp.float32)}
    a = self.audio_net(spec[..., None], rngs=rngs)
    i = self.image_net(image_BxHxW[..., None], rngs=rngs)
    if kind == "late":
      logp_Bx2xC = jnp.stack([jax.nn.log_softmax(a), jax.nn.log_softmax(i)], axis=1)
      # A clip with neither modality (never drawn) would divide by zero.
      weights_Bx2 = present_Bx2 / jnp.maximum(present_Bx2.sum(1, keepdims=True), 1.0)
      fused = jnp.einsum("bmc,bm->bc", logp_Bx2xC, weights_Bx2)
      return fused, ({"audio": a, "image": i} if aux else {})
    extra = {"audio": self.audio_aux(a).astype(jnp.float32),
             "image": self.image_aux(i).astype(jnp.float32)} if aux else {}
    a = jnp.where(present_Bx2[:, :1] > 0, a, self.audio_missing.value)
    i = jnp.where(present_Bx2[:, 1:] > 0, i, self.image_missing.value)
    return self.head(jnp.concatenate([a, i], axis=-1), rngs=rngs), extra
