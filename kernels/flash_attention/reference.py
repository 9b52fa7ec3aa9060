"""Plain-JAX attention with the kernels' exact semantics: the ground truth for tests.

It materializes the [B, H, T, S] logits, so it is for checking, not for long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_segment_ids(segment_ids, seq_q: int, seq_k: int):
  """`segment_ids` as (q [B, T], kv [B, S]) int32 ids, or (None, None).

  A single [B, T] array serves both sides (self-attention, T == S); a pair gives
  separate query and key ids. Query t may attend key s only if their ids are equal.
  """
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if seq_q != seq_k:
      raise ValueError(f"a single segment_ids array needs seq_q == seq_k, got {seq_q} and "
                       f"{seq_k}; pass a (q_segment_ids, kv_segment_ids) pair")
    q_seg = kv_seg = segment_ids
  return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def visible_mask(seq_q: int, seq_k: int, *, causal: bool, q_seg_BxT=None, kv_seg_BxS=None):
  """[B or 1, 1, T, S] boolean mask (True = may attend), or None when nothing is masked.

  Causal is top-left aligned, as in `jax.nn.dot_product_attention`: query t sees keys 0..t.
  """
  mask = None
  if causal:
    mask = jnp.tril(jnp.ones((seq_q, seq_k), bool))[None, None]
  if q_seg_BxT is not None:
    seg = (q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :])[:, None]
    mask = seg if mask is None else mask & seg
  return mask


def probabilities(q_BxTxHxD, k_BxSxKxD, *, causal=False, segment_ids=None, sm_scale=None):
  """Returns (softmax weights p [B, H, T, S], lse [B, H, T]), both float32 or wider.

  Rows that see no key at all (from segment ids) have p = 0 and lse = -inf.
  """
  _, T, H, D = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1:3]
  q_seg, kv_seg = split_segment_ids(segment_ids, T, S)
  dtype = jnp.promote_types(q_BxTxHxD.dtype, jnp.float32)
  scale = D ** -0.5 if sm_scale is None else sm_scale
  k_BxSxHxD = jnp.repeat(k_BxSxKxD, H // K, axis=2).astype(dtype)
  s_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD.astype(dtype), k_BxSxHxD,
                         precision="highest") * scale
  mask = visible_mask(T, S, causal=causal, q_seg_BxT=q_seg, kv_seg_BxS=kv_seg)
  if mask is not None:
    s_BxHxTxS = jnp.where(mask, s_BxHxTxS, -jnp.inf)
  m_BxHxTx1 = jax.lax.stop_gradient(s_BxHxTxS.max(axis=-1, keepdims=True))
  m_BxHxTx1 = jnp.where(jnp.isfinite(m_BxHxTx1), m_BxHxTx1, 0.0)  # empty rows: avoid inf - inf
  e_BxHxTxS = jnp.exp(s_BxHxTxS - m_BxHxTx1)
  l_BxHxTx1 = e_BxHxTxS.sum(axis=-1, keepdims=True)
  p_BxHxTxS = e_BxHxTxS / jnp.where(l_BxHxTx1 == 0, 1.0, l_BxHxTx1)
  return p_BxHxTxS, (m_BxHxTx1 + jnp.log(l_BxHxTx1))[..., 0]


def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, causal=False, segment_ids=None,
              sm_scale=None):
  """Returns (out [B, T, H, D] in q's dtype, lse [B, H, T] in float32 or wider).

  Computed in float32 (float64 for float64 inputs). Rows that see no key at all
  (from segment ids) output 0 and have lse = -inf.
  """
  p_BxHxTxS, lse_BxHxT = probabilities(q_BxTxHxD, k_BxSxKxD, causal=causal,
                                       segment_ids=segment_ids, sm_scale=sm_scale)
  return weighted_values(p_BxHxTxS, v_BxSxKxD).astype(q_BxTxHxD.dtype), lse_BxHxT


def weighted_values(p_BxHxTxS, v_BxSxKxD):
  """sum_s p[b, h, t, s] v[b, s, kv head of h] -> [B, T, H, D] in p's dtype."""
  H, K = p_BxHxTxS.shape[1], v_BxSxKxD.shape[2]
  v_BxSxHxD = jnp.repeat(v_BxSxKxD, H // K, axis=2).astype(p_BxHxTxS.dtype)
  return jnp.einsum("bhts,bshd->bthd", p_BxHxTxS, v_BxSxHxD, precision="highest")
