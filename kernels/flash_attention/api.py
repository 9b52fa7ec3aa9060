"""`flash_attention`: validation, implementation choice, and the Pallas `custom_vjp`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.flash_attention import dispatch, mosaic, pallas, reference

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "mosaic", "auto")
_COMPILED_DTYPES = {  # what the compiled kernels accept, per back-end
    "gpu": (jnp.float32, jnp.bfloat16, jnp.float16),
    "tpu": (jnp.float32, jnp.bfloat16),
}
# TPU keeps the whole k and v of one head in VMEM (twice, for double buffering).
_TPU_KV_VMEM_BYTES = 8 * 2**20


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None,
                    sm_scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None,
                    implementation: str = "auto", interpret: bool | None = None):
  """Scaled dot-product attention, softmax(q k^T * sm_scale) v, per head.

  Args:
    q: [batch, seq_q, heads, head_dim].
    k, v: [batch, seq_k, kv_heads, head_dim]; kv_heads divides heads (GQA, MQA
      when kv_heads == 1): query head h reads kv head h // (heads // kv_heads).
    causal: query t attends keys 0..t (top-left aligned, as `jax.nn.dot_product_attention`).
    segment_ids: None; one int [batch, seq] array for both sides (needs seq_q ==
      seq_k); or a (q_segment_ids [batch, seq_q], kv_segment_ids [batch, seq_k])
      pair. A query attends only keys with the same id (packed sequences).
    sm_scale: logit scale; default 1 / sqrt(head_dim).
    block_q, block_k: Pallas tile sizes, powers of two >= 8, for all three kernels (None:
      each kernel's own default, `pallas.default_tiles`), clipped to the sequence; sequences
      need not be multiples of them (they are padded, and padded keys masked).
    implementation: "pallas" (this package's kernels), "xla" or "cudnn" (through
      `jax.nn.dot_product_attention`), or "auto" (`dispatch.choose`): on GPU cuDNN where it
      serves the call, else XLA, and Pallas only where measured faster on this device kind;
      on TPU compiled Pallas where the shapes allow; else XLA (never the slow interpreter).
      "mosaic": the Hopper (sm_90) Mosaic GPU kernels of `mosaic.py` (bf16/fp16, head dim
      64 or 128, blocks multiples of 128: default 128 x 128); interpreted on CPU.
    interpret: run Pallas in interpret mode; None means only on CPU.

  Returns:
    [batch, seq_q, heads, head_dim] in q's dtype. Queries that may attend no key
    at all get 0 from Pallas; XLA and cuDNN return the mean of v there instead.
  """
  backend = jax.default_backend()
  q_seg, kv_seg = _validate(q, k, v, segment_ids, block_q, block_k, implementation)
  interpret = backend == "cpu" if interpret is None else interpret
  # Why each of this package's kernels cannot run this call here (None: it can).
  unsupported = {
      "pallas": _pallas_unsupported(backend, interpret, q, k, block_q, block_k),
      "mosaic": _mosaic_unsupported(backend, interpret, q, q_seg, causal, block_q, block_k)}
  if implementation == "auto":
    device = jax.devices()[0]
    implementation = dispatch.choose(
        backend, device_kind=device.device_kind,
        compute_capability=getattr(device, "compute_capability", None), dtype=q.dtype.name,
        head_dim=q.shape[-1], causal=causal, masked=q_seg is not None, interpret=interpret,
        pallas_unsupported=unsupported)
  if unsupported.get(implementation):
    raise ValueError(f"implementation={implementation!r} is unsupported here: "
                     f"{unsupported[implementation]}")
  if implementation == "cudnn" and backend != "gpu":
    raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; the backend is {backend!r}")
  if implementation in ("xla", "cudnn"):
    mask = reference.visible_mask(q.shape[1], k.shape[1], causal=False, q_seg_BxT=q_seg,
                                  kv_seg_BxS=kv_seg)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=causal,
                                        implementation=implementation)
  if implementation == "mosaic":
    target = "mosaic-interpret" if interpret else "mosaic"
  else:
    target = "interpret" if interpret else backend
  return _pallas_attention(q, k, v, q_seg, kv_seg, causal=causal, sm_scale=sm_scale,
                           block_q=block_q, block_k=block_k, target=target)


def _mosaic_unsupported(backend, interpret, q, q_seg, causal, block_q, block_k) -> str | None:
  """Why the Hopper kernels cannot run this call here (no Hopper GPU and not interpreted, or
  shapes they do not take), or None if they can."""
  if not interpret:
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if backend != "gpu" or capability not in (None, "9.0"):
      return ("it needs an NVIDIA Hopper GPU (sm_90), or interpret=True; the backend is "
              f"{backend!r}" + (f" (compute capability {capability})" if capability else ""))
  cfg = _mosaic_config(q.shape[-1], causal, None, q.shape[1], interpret, block_q, block_k)
  return mosaic.unsupported(cfg, q.shape[-1], q.dtype, q_seg is not None)


def _mosaic_config(head_dim, causal, sm_scale, seq_k, interpret, block_q, block_k):
  default_q, default_k = mosaic.DEFAULT_BLOCKS
  return mosaic.Config(sm_scale=head_dim ** -0.5 if sm_scale is None else float(sm_scale),
                       causal=causal, block_q=block_q or default_q, block_k=block_k or default_k,
                       seq_k=seq_k, interpret=interpret)


def _validate(q, k, v, segment_ids, block_q, block_k, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
  if not q.ndim == k.ndim == v.ndim == 4:
    raise ValueError("q, k, v must be [batch, seq, heads, head_dim]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"k and v must be [batch, seq_k, kv_heads, head_dim] matching q's batch "
                     f"and head_dim; got q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"kv_heads={k.shape[2]} must divide heads={q.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block is not None and (block < 8 or block & (block - 1)):
      raise ValueError(f"{name}={block} must be a power of two >= 8")
  (batch, seq_q), seq_k = q.shape[:2], k.shape[1]
  q_seg, kv_seg = reference.split_segment_ids(segment_ids, seq_q, seq_k)
  if q_seg is not None and (q_seg.shape != (batch, seq_q) or kv_seg.shape != (batch, seq_k)):
    raise ValueError(f"segment ids must be [batch, seq]: expected {(batch, seq_q)} and "
                     f"{(batch, seq_k)}, got {q_seg.shape} and {kv_seg.shape}")
  return q_seg, kv_seg


def _pallas_unsupported(backend, interpret, q, k, block_q, block_k) -> str | None:
  """Why the Pallas kernels cannot run these shapes here, or None if they can. A block size
  given (not None) is every kernel's on that side; the others are `pallas.default_tiles`."""
  if interpret:
    return None
  if backend not in _COMPILED_DTYPES:
    return f"Pallas compiles only for GPU and TPU, and the backend is {backend!r}"
  if q.dtype not in _COMPILED_DTYPES[backend]:
    return f"dtype {q.dtype} is not compiled on {backend}"
  head_dim = q.shape[-1]
  tiles = pallas.default_tiles(backend, head_dim).values()
  blocks_q = [block_q or t.block_q for t in tiles]
  blocks_k = [block_k or t.block_k for t in tiles]
  if backend == "gpu":
    # Triton tiles must be powers of two, and its dot needs every side >= 16.
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
      return f"head_dim={head_dim} must be a power of two in [16, 256] on GPU"
    # (`_block` clips a tile to the sequence but never below 16.)
    if min(blocks_q + blocks_k) < 16:
      return "block sizes must be >= 16 on GPU"
  if backend == "tpu":
    if min(blocks_q + blocks_k) < 128:
      return "block sizes must be multiples of 128 on TPU"
    kv_bytes = 4 * _round_up(k.shape[1], max(blocks_k)) * head_dim * k.dtype.itemsize
    if kv_bytes > _TPU_KV_VMEM_BYTES:
      return f"seq_k={k.shape[1]} is too long: one head's k and v need {kv_bytes} bytes of VMEM"
  return None


def _round_up(n, m):
  return -(-n // m) * m


def _block(block, seq):
  """The tile used: `block`, or less for a short sequence (its next power of two, >= 16)."""
  return min(block, max(16, pl.next_power_of_2(seq)))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_q", "block_k",
                                             "target"))
def _pallas_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_seg_BxT, kv_seg_BxS, *, causal,
                      sm_scale, block_q, block_k, target):
  T, D = q_BxTxHxD.shape[1], q_BxTxHxD.shape[3]
  S = k_BxSxKxD.shape[1]
  if target.startswith("mosaic"):
    cfg = _mosaic_config(D, causal, sm_scale, S, target == "mosaic-interpret", block_q, block_k)
  else:
    # A block size given by the caller sets that side of every kernel's tile.
    tiles = {name: dataclasses.replace(t, block_q=_block(block_q or t.block_q, T),
                                       block_k=_block(block_k or t.block_k, S))
             for name, t in pallas.default_tiles(target, D).items()}
    cfg = pallas.Config(sm_scale=D ** -0.5 if sm_scale is None else float(sm_scale),
                        causal=causal, seq_k=S, target=target, **tiles)
  # Kernels see head-major [B, H, T, D] with T and S padded to whole blocks; padded
  # keys are masked inside, padded queries are computed and dropped here.
  pad_q, pad_k = _round_up(T, cfg.q_multiple) - T, _round_up(S, cfg.k_multiple) - S

  def head_major(x, pad):
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

  segs = (None, None)
  if q_seg_BxT is not None:
    segs = (jnp.pad(q_seg_BxT, ((0, 0), (0, pad_q)))[:, :, None],
            jnp.pad(kv_seg_BxS, ((0, 0), (0, pad_k)))[:, None, :])
  o_BxHxTxD = _flash(head_major(q_BxTxHxD, pad_q), head_major(k_BxSxKxD, pad_k),
                     head_major(v_BxSxKxD, pad_k), *segs, cfg)
  return jnp.swapaxes(o_BxHxTxD[:, :, :T], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
  return _kernels(cfg).forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _kernels(cfg):
  """The kernel module a config belongs to (same forward/backward contract)."""
  return mosaic if isinstance(cfg, mosaic.Config) else pallas


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
  o, lse = _kernels(cfg).forward(q, k, v, q_seg, kv_seg, cfg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, residuals, do):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  dq, dk, dv = _kernels(cfg).backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
