"""Vision models: ViT patches and position embeddings, the ResNet's BatchNorm modes, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models.cnn import CNN, CNNConfig
from research.models.mlp import MLP, MLPConfig
from research.models.vit import ViT, ViTConfig, patchify

B, S, P = 3, 12, 4  # images of 12x12 pixels: a 3x3 grid of 4x4 patches


def images(seed=0, channels=1):
  return jax.random.normal(jax.random.key(seed), (B, S, S, channels))


def vit(pool="mean"):
  return ViT(ViTConfig(image_size=S, channels=1, patch_size=P, num_classes=5, num_layers=2,
                       num_heads=2, embed_dim=16, mlp_dim=32, pool=pool), rngs=nnx.Rngs(0))


def test_patchify_cuts_row_major_patches():
  x = images(channels=2)
  patches = patchify(x, P)
  assert patches.shape == (B, (S // P) ** 2, P * P * 2)
  # Patch (row 1, column 2) is pixels [4:8, 8:12], flattened row by row.
  np.testing.assert_array_equal(patches[:, 1 * 3 + 2], x[:, 4:8, 8:12].reshape(B, -1))


def test_vit_shapes():
  model = vit("cls")
  assert model.pos_embed.value.shape == (1, 1 + 9, 16)
  assert model.features(images()).shape == (B, 16)
  assert model(images()).shape == (B, 5)


def permute_patches(x_BxSxSx1, perm):
  g = S // P
  grid = x_BxSxSx1.reshape(B, g, P, g, P).transpose(0, 1, 3, 2, 4).reshape(B, g * g, P, P)
  return grid[:, perm].reshape(B, g, g, P, P).transpose(0, 1, 3, 2, 4).reshape(B, S, S, 1)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_sees_patch_order_only_through_position_embeddings(pool):
  model, x = vit(pool), images()
  perm = np.array([4, 0, 8, 2, 6, 1, 3, 7, 5])
  np.testing.assert_array_equal(patchify(permute_patches(x, perm), P), patchify(x, P)[:, perm])
  before = model.features(x)
  shuffled = model.features(permute_patches(x, perm))
  assert not np.allclose(before, shuffled, atol=1e-3)
  # Moving each patch's position embedding with it gives the same tokens, only reordered.
  offset = 1 if pool == "cls" else 0
  pos = model.pos_embed.value
  model.pos_embed.value = pos.at[:, offset:].set(pos[:, offset:][:, perm])
  np.testing.assert_allclose(model.features(permute_patches(x, perm)), before, atol=1e-5)


def test_cnn_shapes_and_parameters():
  model = CNN(CNNConfig(num_classes=7, widths=(4, 8, 16)), rngs=nnx.Rngs(0))
  assert model(images(), rngs=nnx.Rngs(dropout=1)).shape == (B, 7)
  assert model(images()).shape == (B, 7)
  strides = [b.conv1.strides for b in model.blocks]
  assert strides == [2, 2, 2]


def test_cnn_batchnorm_uses_batch_statistics_in_training_and_running_averages_in_eval():
  model = CNN(CNNConfig(num_classes=4, widths=(4, 8)), rngs=nnx.Rngs(0))
  x, y = images(0), images(1) * 3 + 1
  stats = lambda: jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  initial = [np.array(s) for s in stats()]
  # Evaluation: an example's output is independent of the rest of the batch and stats stay.
  eval_a = model(jnp.concatenate([x[:1], x[1:]]))
  eval_b = model(jnp.concatenate([x[:1], y[1:]]))
  np.testing.assert_allclose(eval_a[0], eval_b[0], atol=1e-5)
  assert all(np.array_equal(a, b) for a, b in zip(initial, stats()))
  # Training: the batch's statistics shape every output, and the running averages move.
  rngs = nnx.Rngs(dropout=0)
  train_a = model(jnp.concatenate([x[:1], x[1:]]), rngs=rngs)
  train_b = model(jnp.concatenate([x[:1], y[1:]]), rngs=rngs)
  assert not np.allclose(train_a[0], train_b[0], atol=1e-3)
  assert not all(np.array_equal(a, b) for a, b in zip(initial, stats()))


def test_mlp_flattens_images():
  model = MLP(MLPConfig(in_features=S * S, hidden_sizes=(8,), out_features=5), rngs=nnx.Rngs(0))
  assert model(images()).shape == (B, 5)
