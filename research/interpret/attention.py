"""Attention patterns of a trained GPT, recomputed from its own layers.

The model's forward pass never materializes its attention weights (the fused kernels do not
have them), so this module replays it: the residual stream is advanced block by block with
the model's own blocks, and at each block the query/key projections of `CausalSelfAttention`
are applied to the block's normalized input to form the softmax maps. A test checks that these
maps, applied to the values, give back the block's attention output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.models.gpt import GPT, rope


def _head_maps(attn, x_BxTxD) -> jax.Array:
  """Causal softmax weights [B, H, T, T] of one `CausalSelfAttention` (query t, key s)."""
  cfg = attn.cfg
  B, T, D = x_BxTxD.shape
  H = cfg.num_heads
  q_BxTxHxK, k_BxTxHxK, _ = jnp.split(attn.qkv(x_BxTxD).reshape(B, T, 3 * H, D // H), 3, axis=2)
  if cfg.position == "rope":
    q_BxTxHxK, k_BxTxHxK = rope(q_BxTxHxK, jnp.arange(T)), rope(k_BxTxHxK, jnp.arange(T))
  logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK.astype(jnp.float32),
                              k_BxTxHxK.astype(jnp.float32)) / jnp.sqrt(D // H)
  causal_TxT = jnp.tril(jnp.ones((T, T), bool))
  return jax.nn.softmax(jnp.where(causal_TxT, logits_BxHxTxT, -jnp.inf), axis=-1)


def attention_maps(model: GPT, tokens_BxT: jax.Array) -> jax.Array:
  """Attention weights of every layer and head, [L, B, H, T, T] (rows: queries; sum to 1)."""
  x_BxTxD = model._embed(tokens_BxT, 0)  # the model's token + position embedding
  maps = []
  for block in model.blocks:
    maps.append(_head_maps(block.attn, block.norm1(x_BxTxD)))
    x_BxTxD, _ = block(x_BxTxD)
  return jnp.stack(maps)


def plot_attention(maps_HxTxT, labels: list[str], path, *, title: str):
  """One heatmap per head, side by side; axis ticks are the tokens when there are few."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  maps_HxTxT = np.asarray(maps_HxTxT)
  H, T, _ = maps_HxTxT.shape
  cols = min(H, 4)
  rows = -(-H // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows + 0.4), squeeze=False)
  for h, ax in enumerate(axes.ravel()):
    if h >= H:
      ax.axis("off")
      continue
    ax.imshow(maps_HxTxT[h], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {h}", fontsize=9)
    if T <= 40:
      ax.set_xticks(range(T), labels, fontsize=6, rotation=90)
      ax.set_yticks(range(T), labels, fontsize=6)
    else:
      ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
