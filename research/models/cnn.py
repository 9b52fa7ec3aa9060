"""A small ResNet for low-resolution images: 3x3 convolutions, BatchNorm, residual stages.

A 3x3 stem convolution reads the full-resolution image; each stage then halves the resolution
and widens the channels (28x28 -> 14, 7, 4 with three stages), which keeps the convolutions
cheap enough to train on a laptop CPU; a global average pool feeds one Linear head.

BatchNorm normalizes with the batch's statistics in training (`rngs` given) and with its
running averages in evaluation (`rngs=None`); the running averages are model state outside
the parameters, which the training loop carries and averages across devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  channels: int = 1
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)  # one stage per width
  blocks_per_stage: int = 1
  dropout: float = 0.0  # before the head
  dtype: str = "float32"

  def __post_init__(self):  # a list (from JSON or a config) would make the config unhashable
    object.__setattr__(self, "widths", tuple(self.widths))


class ResidualBlock(nnx.Module):
  """relu(x' + BN(conv(relu(BN(conv(x)))))), x' = x, or a strided 1x1 projection of it."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
    conv = dict(use_bias=False, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), strides=stride, **conv)
    self.norm1 = nnx.BatchNorm(out_ch, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), **conv)
    # Zero scale: each block starts as the identity, which steadies early training.
    self.norm2 = nnx.BatchNorm(out_ch, scale_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)
    reshape = stride != 1 or in_ch != out_ch
    self.project = nnx.Conv(in_ch, out_ch, (1, 1), strides=stride, **conv) if reshape else None
    self.norm_project = nnx.BatchNorm(out_ch, dtype=dtype, rngs=rngs) if reshape else None

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    eval_ = not train
    y = nnx.relu(self.norm1(self.conv1(x_BxHxWxC), use_running_average=eval_))
    y = self.norm2(self.conv2(y), use_running_average=eval_)
    shortcut = x_BxHxWxC
    if self.project is not None:
      shortcut = self.norm_project(self.project(x_BxHxWxC), use_running_average=eval_)
    return nnx.relu(y + shortcut)


class CNN(nnx.Module):

  def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
    self.cfg = c = cfg
    self.stem = nnx.Conv(c.channels, c.widths[0], (3, 3), use_bias=False, dtype=c.dtype, rngs=rngs)
    self.stem_norm = nnx.BatchNorm(c.widths[0], dtype=c.dtype, rngs=rngs)
    blocks, in_ch = [], c.widths[0]
    for stage, width in enumerate(c.widths):
      for i in range(c.blocks_per_stage):
        stride = 2 if i == 0 else 1
        blocks.append(ResidualBlock(in_ch, width, stride, dtype=c.dtype, rngs=rngs))
        in_ch = width
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(c.dropout)
    self.head = nnx.Linear(in_ch, c.num_classes, dtype=c.dtype, rngs=rngs)

  def __call__(self, images_BxHxWxC: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, num_classes] (float32); `rngs=None` is evaluation (running BatchNorm stats)."""
    train = rngs is not None
    x = nnx.relu(self.stem_norm(self.stem(images_BxHxWxC), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train=train)
    x_BxC = x.mean(axis=(1, 2))
    x_BxC = self.dropout(x_BxC, deterministic=not train, rngs=rngs)
    return self.head(x_BxC).astype(jnp.float32)
