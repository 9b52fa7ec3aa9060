"""Attention patterns of a trained Transformer, recorded by its own attention modules.

Fused kernels never materialize the attention weights, so `attention_maps` switches every
`MultiHeadAttention` of the model to its explicit path (`keep_weights`), runs the model's own
forward pass once, and collects the softmax weights each module recorded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.attention import MultiHeadAttention, Weights


def attention_maps(model: nnx.Module, *inputs) -> jax.Array:
  """Weights of every attention module and head, [L, B, H, T, S] (rows: queries; sum to 1),
  from `model(*inputs)`; modules in the order of their paths (`blocks.0`, `blocks.1`, ...)."""
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, MultiHeadAttention)]
  for m in modules:
    m.keep_weights = True
  try:
    model(*inputs)
    recorded = nnx.pop(model, Weights)
  finally:
    for m in modules:
      m.keep_weights = False
  maps = jax.tree.leaves(recorded)
  if not maps:
    raise ValueError(f"{type(model).__name__} has no MultiHeadAttention")
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
