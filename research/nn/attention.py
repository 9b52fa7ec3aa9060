"""Multi-head attention: the one module every Transformer here is built from, and the one
function that computes its softmax(QKᵀ)V core.

`dot_product_attention` takes the masks the kernels can take — causal, and segment ids (a
query attends only keys of its own segment: padding and packed sequences) — and runs them on
the implementation asked for (`kernels.flash_attention.IMPLEMENTATIONS`: `xla`, `cudnn`,
`pallas`, `mosaic`, `auto`). A dense mask runs on XLA or cuDNN only; asking a Pallas kernel for
one is an error, never a silent switch.

`MultiHeadAttention` is self- or cross-attention with fused or separate q/k/v projections,
grouped-query attention (`num_kv_heads`), optional RoPE and QK-norm, and a KV cache. Steps of
cached decoding read the cache through XLA whatever the training implementation: one query
row against a cache is a matrix-vector product, not what a flash kernel is for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.flash_attention import IMPLEMENTATIONS, flash_attention, reference
from kernels.flash_attention.dispatch import PALLAS_FAMILY

__all__ = ["IMPLEMENTATIONS", "MultiHeadAttention", "check_supported", "dot_product_attention",
           "padding_segments", "rope"]


def check_supported(implementation: str) -> None:
  """Fails early, with a readable message, for a choice this machine cannot run."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"choose one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU; "
                     f"this run's backend is {jax.default_backend()!r}")


def padding_segments(valid_BxS: jax.Array, num_queries: int | None = None):
  """Segment ids that mask padding keys: (q ids [B, T], kv ids [B, S]).

  Self-attention (`num_queries` None): padding positions form their own segment 0, so a
  padding query still has keys (itself) and stays finite. Cross-attention: every query is in
  segment 1 and sees the real keys.
  """
  kv_seg_BxS = valid_BxS.astype(jnp.int32)
  if num_queries is None:
    return kv_seg_BxS, kv_seg_BxS
  return jnp.ones((valid_BxS.shape[0], num_queries), jnp.int32), kv_seg_BxS


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                          causal: bool = False, segment_ids=None, mask_BxHxTxS=None,
                          implementation: str = "xla", return_weights: bool = False):
  """Scaled dot-product attention; K (kv heads) divides H (query heads) for GQA/MQA.

  Args:
    causal: query t attends keys 0..t (top-left aligned).
    segment_ids: None, one [B, T] array (self-attention) or a (q [B, T], kv [B, S]) pair;
      a query attends only keys with its id (see `padding_segments`).
    mask_BxHxTxS: a dense boolean mask (True = attend; broadcastable), on top of the above;
      only `xla`, `cudnn` and `auto` (which then picks XLA) take one.
    implementation: see `kernels.flash_attention.flash_attention`.
    return_weights: also return the softmax weights [B, H, T, S], computed explicitly in
      float32 by `kernels.flash_attention.reference` (whatever `implementation` says: only
      that path has them); no dense mask then.

  Returns:
    [B, T, H, D] in q's dtype, or (that, weights) with `return_weights`.
  """
  check_supported(implementation)
  if return_weights:
    if mask_BxHxTxS is not None:
      raise ValueError("return_weights takes causal and segment-id masks, not a dense mask")
    # The kernels' plain-JAX reference: the one path that materializes the weights.
    weights_BxHxTxS, _ = reference.probabilities(q_BxTxHxD, k_BxSxKxD, causal=causal,
                                                 segment_ids=segment_ids)
    out_BxTxHxD = reference.weighted_values(weights_BxHxTxS, v_BxSxKxD)
    return out_BxTxHxD.astype(q_BxTxHxD.dtype), weights_BxHxTxS
  if mask_BxHxTxS is None:
    return flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal,
                           segment_ids=segment_ids, implementation=implementation)
  if implementation in PALLAS_FAMILY:
    raise ValueError(f"attention implementation {implementation!r} takes causal and segment-id "
                     "masks, not a dense mask; use xla or cudnn for this call")
  T, S = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  q_seg, kv_seg = reference.split_segment_ids(segment_ids, T, S)
  segments = reference.visible_mask(T, S, causal=False, q_seg_BxT=q_seg, kv_seg_BxS=kv_seg)
  mask = mask_BxHxTxS if segments is None else segments & mask_BxHxTxS
  return jax.nn.dot_product_attention(
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, is_causal=causal,
      implementation="cudnn" if implementation == "cudnn" else "xla")


def rope(x_BxTxHxD: jax.Array, positions_T: jax.Array, theta: float = 10_000.0,
         scaling: tuple = ()) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + D/2): the "half-split"
  layout of Hugging Face's Llama (llama.cpp's GGUF files permute q and k for interleaved pairs
  (2i, 2i + 1); `research.pretrained.gguf` undoes that). Frequencies theta^(-2i/D), rescaled
  as `scaled_frequencies(..., scaling)` says."""
  d = x_BxTxHxD.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  inv_freq = scaled_frequencies(inv_freq, scaling)
  angle_TxD2 = positions_T[:, None].astype(jnp.float32) * inv_freq[None, :]
  sin, cos = jnp.sin(angle_TxD2)[None, :, None, :], jnp.cos(angle_TxD2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxHxD.dtype)


def scaled_frequencies(inv_freq: jax.Array, scaling: tuple) -> jax.Array:
  """RoPE's D/2 frequencies under `scaling` (`GPTConfig.rope_scaling`): () leaves them;
  ("llama3", factor, low_freq_factor, high_freq_factor, original context length) is Llama
  3.1's rescaling (`llama3_frequencies`); ("divisors", d_1, ..., d_D/2) divides each by its
  own: llama.cpp's `rope_freqs` tensor, or linear position scaling when all are equal."""
  if not scaling:
    return inv_freq
  kind, *values = scaling
  if kind == "llama3" and len(values) == 4:
    return llama3_frequencies(inv_freq, *values)
  if kind == "divisors" and len(values) == inv_freq.shape[0]:
    return inv_freq / jnp.asarray(values, jnp.float32)
  raise ValueError(f"rope_scaling={scaling!r}: expected (), ('llama3', factor, "
                   f"low_freq_factor, high_freq_factor, context) or ('divisors', "
                   f"{inv_freq.shape[0]} numbers)")


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, context):
  """Llama 3.1's RoPE scaling: wavelengths longer than context / low_freq_factor slow down by
  `factor`, those shorter than context / high_freq_factor stay, and the ones between blend."""
  wavelength = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
  smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelength >= context / high_freq_factor) & (wavelength <= context / low_freq_factor)
  return jnp.where(medium, blended, scaled)


class Weights(nnx.Intermediate):
  """Attention weights [B, H, T, S] kept by a `MultiHeadAttention` with `keep_weights` set."""


class MultiHeadAttention(nnx.Module):
  """Self-attention, or cross-attention to a `context`; optional KV cache for decoding.

  `fused_qkv` projects q, k and v with one matrix (self-attention only, as GPT-2 does);
  otherwise `query` and `key_value` are separate, so keys and values can come from a context.
  Dense layers see [B*T, D]: on 3-D activations XLA:CPU copies each weight gradient's input.
  """

  def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None,
               fused_qkv: bool = False, use_rope: bool = False, rope_theta: float = 10_000.0,
               rope_scaling: tuple = (),
               qk_norm: bool = False, use_bias: bool = True, qkv_bias: bool = False,
               dropout: float = 0.0, implementation: str = "xla",
               dtype="float32", kernel_init=None, out_init=None, rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    if dim % num_heads or num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must divide dim={dim}, and num_kv_heads="
                       f"{num_kv_heads} must divide num_heads")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
    self.use_rope, self.rope_theta, self.implementation = use_rope, rope_theta, implementation
    self.rope_scaling = tuple(rope_scaling)  # see `rope`
    if use_rope:
      scaled_frequencies(jnp.ones(dim // num_heads // 2), self.rope_scaling)  # a bad one raises
    self.keep_weights = False  # set by research.interpret to record the attention weights
    init = {} if kernel_init is None else dict(kernel_init=kernel_init)
    linear = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
    kv_dim = 2 * num_kv_heads * self.head_dim
    # qkv_bias: q/k/v biases even without use_bias's on the out-projection (Qwen2).
    qkv = dict(linear, use_bias=use_bias or qkv_bias)
    if fused_qkv:
      self.qkv = nnx.Linear(dim, dim + kv_dim, **init, **qkv)
    else:
      self.query = nnx.Linear(dim, dim, **init, **qkv)
      self.key_value = nnx.Linear(dim, kv_dim, **init, **qkv)
    self.out = nnx.Linear(dim, dim, **({} if out_init is None else dict(kernel_init=out_init)),
                          **linear)
    norm = dict(dtype=dtype, rngs=rngs)
    self.q_norm = nnx.RMSNorm(self.head_dim, **norm) if qk_norm else None
    self.k_norm = nnx.RMSNorm(self.head_dim, **norm) if qk_norm else None
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxTxD, context_BxSxD=None, *, causal=False, segment_ids=None, rngs=None,
               cache=None, pos=0, context_kv=None):
    """Returns (output [B, T, D], cache).

    With `cache` (self-attention), the keys and values of `x` are written at positions
    pos..pos+T-1 and query t attends cache slots 0..pos+t. `context_kv` =
    `self.context_kv(context)`, computed once when decoding step by step.
    """
    B, T, D = x_BxTxD.shape
    H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
    decoding = cache is not None or context_kv is not None
    x_NxD = x_BxTxD.reshape(B * T, D)
    if hasattr(self, "qkv"):
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh = jnp.split(
          self.qkv(x_NxD).reshape(B, T, H + 2 * K, Dh), [H, H + K], axis=2)
    else:
      q_BxTxHxDh = self.query(x_NxD).reshape(B, T, H, Dh)
      if context_kv is None:
        context_kv = self.context_kv(x_BxTxD if context_BxSxD is None else context_BxSxD)
      k_BxSxKxDh, v_BxSxKxDh = context_kv
    if self.q_norm is not None:
      q_BxTxHxDh, k_BxSxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxSxKxDh)
    if self.use_rope:
      positions_T = pos + jnp.arange(T)
      q_BxTxHxDh = rope(q_BxTxHxDh, positions_T, self.rope_theta, self.rope_scaling)
      k_BxSxKxDh = rope(k_BxSxKxDh, positions_T, self.rope_theta, self.rope_scaling)
    implementation, mask_1x1xTxS = self.implementation, None
    if cache is not None:
      k_BxSxKxDh = jax.lax.dynamic_update_slice(cache["k"], k_BxSxKxDh.astype(cache["k"].dtype),
                                                (0, pos, 0, 0))
      v_BxSxKxDh = jax.lax.dynamic_update_slice(cache["v"], v_BxSxKxDh.astype(cache["v"].dtype),
                                                (0, pos, 0, 0))
      cache = {"k": k_BxSxKxDh, "v": v_BxSxKxDh}
      k_BxSxKxDh, v_BxSxKxDh = (a.astype(q_BxTxHxDh.dtype) for a in (k_BxSxKxDh, v_BxSxKxDh))
      S = k_BxSxKxDh.shape[1]
      mask_1x1xTxS = (jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None])[None, None]
      causal = False  # the cache mask orders the positions
    if decoding:
      implementation = "xla"  # see the module docstring
    y = dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal,
                              segment_ids=segment_ids, mask_BxHxTxS=mask_1x1xTxS,
                              implementation=implementation, return_weights=self.keep_weights)
    if self.keep_weights:
      y, weights_BxHxTxS = y
      self.sow(Weights, "weights", weights_BxHxTxS)
    y_BxTxD = self.out(y.reshape(B * T, D)).reshape(B, T, D)
    return self.dropout(y_BxTxD, deterministic=rngs is None, rngs=rngs), cache

  def context_kv(self, source_BxSxD):
    """The keys and values [B, S, K, D/H] of `source` (x itself for self-attention)."""
    B, S, D = source_BxSxD.shape
    kv_NxE = self.key_value(source_BxSxD.reshape(B * S, D))
    k_BxSxKxDh, v_BxSxKxDh = jnp.split(
        kv_NxE.reshape(B, S, 2 * self.num_kv_heads, self.head_dim), 2, axis=2)
    return k_BxSxKxDh, v_BxSxKxDh

  def init_cache(self, batch_size: int, length: int, dtype="float32"):
    shape = (batch_size, length, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
