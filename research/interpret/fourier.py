"""The Fourier picture of modular arithmetic (Nanda et al. 2023): which frequencies of Z_p an
embedding uses.

A model that groks a + b mod p represents each residue x by cos(2πkx/p) and sin(2πkx/p) for
a few key frequencies k; its embedding matrix, written in the Fourier basis of Z_p, has almost
all of its norm on those frequencies. A random embedding spreads it over all (p+1)/2.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np


def frequency_norms(w_PxD) -> jnp.ndarray:
  """Norm of each frequency k = 0 .. p//2 of the rows of `w_PxD` (row x = residue x).

  Frequency k > 0 spans the cos and sin directions of the orthonormal real Fourier basis of
  Z_p, so the squared norms sum to the squared Frobenius norm of `w_PxD` (Parseval).
  """
  p = w_PxD.shape[0]
  c_KxD = jnp.fft.rfft(jnp.asarray(w_PxD, jnp.float32), axis=0)
  energy_K = jnp.sum(jnp.abs(c_KxD) ** 2, axis=1) / p
  # Frequencies 0 < k < p/2 stand for both k and p - k, which rfft folds into one.
  both = (jnp.arange(energy_K.shape[0]) > 0) & (2 * jnp.arange(energy_K.shape[0]) != p)
  return jnp.sqrt(jnp.where(both, 2 * energy_K, energy_K))


def top_k_fraction(norms_K, k: int) -> jnp.ndarray:
  """Fraction of the squared norm held by the `k` largest frequencies."""
  energy_K = jnp.asarray(norms_K) ** 2
  return jnp.sum(jnp.sort(energy_K)[::-1][:k]) / jnp.sum(energy_K)


def key_frequencies(norms_K, k: int) -> list[int]:
  """The `k` frequencies with the largest norm, largest first."""
  return [int(i) for i in np.argsort(-np.asarray(norms_K))[:k]]


def plot_frequency_norms(norms_K, path: Path, *, title: str, highlight: list[int] = ()) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  norms_K = np.asarray(norms_K)
  colors = ["tab:red" if k in highlight else "tab:blue" for k in range(len(norms_K))]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.bar(np.arange(len(norms_K)), norms_K, color=colors, width=0.8)
  for k in highlight:
    ax.annotate(str(k), (k, norms_K[k]), ha="center", va="bottom", fontsize=8)
  ax.set_xlabel("frequency k")
  ax.set_ylabel("norm of the embedding in the Fourier basis")
  ax.set_title(title)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)
