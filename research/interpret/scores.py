"""Per-head scores of what an attention pattern does (Olsson et al. 2022).

Each score is the mean attention weight that a head puts, from a query position, on one
"target" key position, over the queries that have a target (`key_BxT >= 0`):

- induction: on a random segment followed by its repeat, from each token of the repeat to
  the token after its first occurrence (the token an induction head copies next);
- prefix matching: on random tokens, from a token that occurred before to the token that
  followed its previous occurrence (matching on the current token alone);
- previous token: to the token just before (the layer-0 half of the induction circuit).

Chance is the mean of 1/(t+1) over the scored queries; a perfect head scores 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def repeated_random_tokens(rng: np.random.Generator, batch: int, n: int, vocab: int) -> np.ndarray:
  """[batch, 2n] sequences: n uniform random tokens, then the same n again."""
  first_BxN = rng.integers(0, vocab, size=(batch, n))
  return np.concatenate([first_BxN, first_BxN], axis=1).astype(np.int32)


def induction_keys(length: int, repeat_start) -> np.ndarray:
  """Targets for sequences whose tokens from `repeat_start` (per row, or one int) repeat those
  from 0: query t >= repeat_start looks at t - repeat_start + 1; -1 elsewhere. [B or 1, T]."""
  start_Bx1 = np.reshape(np.asarray(repeat_start), (-1, 1))
  t_1xT = np.arange(length)[None]
  ok_BxT = (t_1xT >= start_Bx1) & (t_1xT < 2 * start_Bx1)
  return np.where(ok_BxT, t_1xT - start_Bx1 + 1, -1).astype(np.int32)


def prefix_matching_keys(tokens_BxT: np.ndarray) -> np.ndarray:
  """Target of query t: the position after the latest j < t - 1 with token j == token t; -1 if
  the token has not occurred before (or only just before, where the target is t itself)."""
  tokens_BxT = np.asarray(tokens_BxT)
  T = tokens_BxT.shape[1]
  same_BxTxS = tokens_BxT[:, :, None] == tokens_BxT[:, None, :]
  earlier_TxS = np.tril(np.ones((T, T), bool), k=-2)
  j_BxTxS = np.where(same_BxTxS & earlier_TxS, np.arange(T), -1)
  latest_BxT = j_BxTxS.max(axis=-1)
  return np.where(latest_BxT >= 0, latest_BxT + 1, -1).astype(np.int32)


def previous_token_keys(batch: int, length: int) -> np.ndarray:
  t_BxT = np.broadcast_to(np.arange(length), (batch, length))
  return np.where(t_BxT >= 1, t_BxT - 1, -1).astype(np.int32)


def attention_to(maps_LxBxHxTxT, key_BxT):
  """Per example: (sum over scored queries of the weight on their target [B, L, H], count [B])."""
  key_BxT = jnp.asarray(key_BxT)
  scored_BxT = key_BxT >= 0
  S = maps_LxBxHxTxT.shape[-1]
  onehot_BxTxS = (jnp.arange(S) == key_BxT[..., None]) & scored_BxT[..., None]
  sums_LxBxH = jnp.einsum("lbhts,bts->lbh", maps_LxBxHxTxT,
                          onehot_BxTxS.astype(maps_LxBxHxTxT.dtype))
  return sums_LxBxH.transpose(1, 0, 2), scored_BxT.sum(axis=1)


def score(maps_LxBxHxTxT, key_BxT) -> np.ndarray:
  """Mean attention of each head on the targets, [L, H]."""
  sums_BxLxH, count_B = attention_to(maps_LxBxHxTxT, key_BxT)
  return np.asarray(sums_BxLxH.sum(0) / jnp.maximum(count_B.sum(), 1))


def plot_head_scores(scores: dict[str, np.ndarray], path, *, title: str):
  """One [layer x head] grid per score, annotated."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  L, H = np.shape(next(iter(scores.values())))
  # A pretrained model's grid (SmolLM2: 30 x 9) gets taller and loses the per-cell numbers.
  annotate = L * H <= 64
  fig, axes = plt.subplots(1, len(scores), squeeze=False,
                           figsize=(max(3.2, 0.4 * H + 1.2) * len(scores), max(2.8, 0.25 * L + 1)))
  for ax, (name, s_LxH) in zip(axes[0], scores.items()):
    s_LxH = np.asarray(s_LxH)
    image = ax.imshow(s_LxH, cmap="magma", vmin=0, vmax=1, aspect="auto")
    if not annotate:
      fig.colorbar(image, ax=ax, fraction=0.05)
    for (l, h), v in np.ndenumerate(s_LxH if annotate else np.zeros((0, 0))):
      ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=8,
              color="black" if v > 0.5 else "white")
    ax.set_xticks(range(s_LxH.shape[1]))
    ax.set_yticks(range(s_LxH.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(name.replace("_", " "), fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def probe_keys(tokens_BxT: np.ndarray, repeat_start) -> dict[str, np.ndarray]:
  """The targets of each score on sequences whose tokens from `repeat_start` (int or per row)
  repeat those before it; prefix matching is scored on the unrepeated part only."""
  tokens_BxT = np.asarray(tokens_BxT)
  B, T = tokens_BxT.shape
  start_Bx1 = np.broadcast_to(np.reshape(np.asarray(repeat_start), (-1, 1)), (B, 1))
  first_BxT = np.arange(T)[None] < start_Bx1
  return {"induction": np.broadcast_to(induction_keys(T, start_Bx1), (B, T)),
          "prefix_matching": np.where(first_BxT, prefix_matching_keys(tokens_BxT), -1),
          "previous_token": previous_token_keys(B, T)}
