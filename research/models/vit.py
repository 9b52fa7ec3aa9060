"""Vision Transformer: an image cut into patches is a sequence of tokens (Dosovitskiy et al. 2020).

Patches are flattened and projected by one Linear (the same map as a conv with kernel = stride
= patch size); learned position embeddings are the only thing that tells the encoder where a
patch was. The encoder is the shared pre-LN `Block`, bidirectional; the image is summarized by
a class token or the mean of the patch tokens. Images and patches may be rectangular (height,
width): a spectrogram (time, mel) is an image too (AST, Gong et al. 2021).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.transformer import Block

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int | tuple[int, int] = 28  # side, or (height, width)
  channels: int = 1
  patch_size: int | tuple[int, int] = 4  # side, or (height, width)
  num_classes: int = 10
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 64
  mlp_dim: int = 128
  dropout: float = 0.0
  pool: str = "mean"  # "cls": a learned token's output; "mean": the mean of the patch tokens
  attention: str = "xla"
  dtype: str = "float32"

  @property
  def patch(self) -> tuple[int, int]:
    return _pair(self.patch_size)

  @property
  def num_patches(self) -> int:
    (h, w), (ph, pw) = _pair(self.image_size), self.patch
    return (h // ph) * (w // pw)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def patchify(images_BxHxWxC: jax.Array, patch: int | tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, (H/ph)*(W/pw), ph*pw*C], patches in row-major order."""
  B, H, W, C = images_BxHxWxC.shape
  ph, pw = _pair(patch)
  x = images_BxHxWxC.reshape(B, H // ph, ph, W // pw, pw, C)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (H // ph) * (W // pw), ph * pw * C)


class ViT(nnx.Module):

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    c = config
    if any(size % patch for size, patch in zip(_pair(c.image_size), c.patch)):
      raise ValueError(f"image_size={c.image_size} is not divisible by patch_size={c.patch_size}")
    if c.pool not in POOLS:
      raise ValueError(f"unknown pool {c.pool!r}; choose one of {', '.join(POOLS)}")
    self.cfg = c
    (ph, pw) = c.patch
    self.patch_embed = nnx.Linear(ph * pw * c.channels, c.embed_dim, dtype=c.dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = (nnx.Param(jnp.zeros((1, 1, c.embed_dim))) if c.pool == "cls" else None)
    tokens = c.num_patches + (c.pool == "cls")
    self.pos_embed = nnx.Param(init(rngs.params(), (1, tokens, c.embed_dim)))
    self.dropout = nnx.Dropout(c.dropout)
    self.blocks = nnx.List([
        Block(c.embed_dim, c.num_heads, mlp_dim=c.mlp_dim, dropout=c.dropout,
              attention=c.attention, dtype=c.dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = nnx.LayerNorm(c.embed_dim, dtype=c.dtype, rngs=rngs)
    # A zero head starts every class at the same logit, so early gradients shape the features.
    self.head = nnx.Linear(c.embed_dim, c.num_classes, kernel_init=nnx.initializers.zeros,
                           dtype=c.dtype, rngs=rngs)

  def features(self, images_BxHxWxC: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The pooled image representation [B, D] the head classifies."""
    x_BxNxD = self.patch_embed(patchify(images_BxHxWxC, self.cfg.patch_size))
    if self.cls_token is not None:
      cls_Bx1xD = jnp.broadcast_to(self.cls_token.value, (x_BxNxD.shape[0], 1, x_BxNxD.shape[2]))
      x_BxNxD = jnp.concatenate([cls_Bx1xD.astype(x_BxNxD.dtype), x_BxNxD], axis=1)
    x_BxNxD = self.dropout(x_BxNxD + self.pos_embed.value, deterministic=rngs is None, rngs=rngs)
    for block in self.blocks:
      x_BxNxD, _ = block(x_BxNxD, rngs=rngs)
    x_BxNxD = self.norm(x_BxNxD)
    return x_BxNxD[:, 0] if self.cls_token is not None else x_BxNxD.mean(axis=1)

  def __call__(self, images_BxHxWxC: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32)."""
    return self.head(self.features(images_BxHxWxC, rngs=rngs)).astype(jnp.float32)
