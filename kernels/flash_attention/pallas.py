"""Pallas flash-attention kernels: forward, dq, and dk/dv.

All three work on head-major, padded arrays (q, do: [B, H, T, D]; k, v: [B, K, S, D];
T and S multiples of the block sizes); `api.py` does the transposes, padding and
the `custom_vjp`. One program handles one (batch, head, block) tile and loops over
the other sequence with `lax.fori_loop`, reading its tiles out of a whole-sequence
block of k/v (forward, dq) or q/do (dk/dv). That is the shape the Triton lowering
wants (it has no cross-program accumulators) and that Mosaic TPU and the CPU
interpreter also accept, so the same kernel bodies serve all three.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class Config:
  """Static parameters shared by the three kernels (hashable: a jit static arg)."""
  sm_scale: float
  causal: bool
  block_q: int
  block_k: int
  seq_k: int  # unpadded key length: keys at or past it are padding
  target: str  # "gpu" (Triton), "tpu" (Mosaic TPU) or "interpret"


def _acc_dtype(dtype):
  # float32 accumulation; float64 inputs (interpret-mode tests) keep float64.
  return jnp.promote_types(dtype, jnp.float32)


def _dot(a, b, contract, acc_dtype):
  """a @ b contracting dims `contract` = (a_dim, b_dim), without materializing a transpose."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                         preferred_element_type=acc_dtype)


def _visible(cfg, q_start, k_start, q_seg_Qx1, kv_seg_1xK):
  """[block_q, block_k] mask of the keys each query may attend to, or None if all."""
  shape = (cfg.block_q, cfg.block_k)
  k_idx = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  masks = []
  if cfg.causal:
    masks.append(q_start + lax.broadcasted_iota(jnp.int32, shape, 0) >= k_idx)
  if cfg.seq_k % cfg.block_k:
    masks.append(k_idx < cfg.seq_k)
  if q_seg_Qx1 is not None:
    masks.append(q_seg_Qx1 == kv_seg_1xK)
  return functools.reduce(jnp.logical_and, masks) if masks else None


def _scores(cfg, q, k, q_start, k_start, q_seg_Qx1, kv_seg_1xK, acc_dtype):
  """Scaled logits of a tile; invisible entries are -inf so exp() zeroes them exactly."""
  s_QxK = _dot(q, k, (1, 1), acc_dtype) * cfg.sm_scale
  mask_QxK = _visible(cfg, q_start, k_start, q_seg_Qx1, kv_seg_1xK)
  return s_QxK if mask_QxK is None else jnp.where(mask_QxK, s_QxK, -jnp.inf)


def _loop(cfg, lower, upper, body, init):
  """`lax.fori_loop`; interpreted, always as a while loop. Static bounds make a scan, and the
  interpreter evaluates a scan traced without mesh axes on operands that vary over the `dp`
  step's axis, which jax 0.10's varying-axes check rejects."""
  if cfg.target == "interpret":
    upper = jnp.asarray(upper, jnp.int32)
    return lax.while_loop(lambda c: c[0] < upper, lambda c: (c[0] + 1, body(c[0], c[1])),
                          (jnp.int32(lower), init))[1]
  return lax.fori_loop(lower, upper, body, init)


def _num_k_blocks(cfg, q_block, seq_k_padded):
  """Key blocks a query block must visit; causal skips the ones wholly in its future."""
  num_k = seq_k_padded // cfg.block_k
  if not cfg.causal:
    return num_k
  last_q = (q_block + 1) * cfg.block_q  # one past this block's last query
  return jnp.minimum(lax.div(last_q + cfg.block_k - 1, jnp.int32(cfg.block_k)), num_k)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, cfg):
  i = pl.program_id(2)
  q_QxD = q_ref[...]
  acc_dtype = _acc_dtype(q_QxD.dtype)
  q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, carry):
    acc_QxD, m_Qx1, l_Qx1 = carry
    keys = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
    kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[:, keys]
    s_QxK = _scores(cfg, q_QxD, k_ref[keys, :], i * cfg.block_q, j * cfg.block_k,
                    q_seg_Qx1, kv_seg_1xK, acc_dtype)
    m_new_Qx1 = jnp.maximum(m_Qx1, s_QxK.max(axis=1, keepdims=True))
    # A row that has seen no visible key yet has max -inf; shift by 0 instead so
    # exp() gives 0 rather than exp(-inf + inf) = NaN.
    shift_Qx1 = jnp.where(m_new_Qx1 == -jnp.inf, 0.0, m_new_Qx1)
    p_QxK = jnp.exp(s_QxK - shift_Qx1)
    rescale_Qx1 = jnp.exp(m_Qx1 - shift_Qx1)
    v_KxD = v_ref[keys, :]
    acc_QxD = rescale_Qx1 * acc_QxD + _dot(p_QxK.astype(v_KxD.dtype), v_KxD, (1, 0), acc_dtype)
    l_Qx1 = rescale_Qx1 * l_Qx1 + p_QxK.sum(axis=1, keepdims=True)
    return acc_QxD, m_new_Qx1, l_Qx1

  init = (jnp.zeros(q_QxD.shape, acc_dtype),
          jnp.full((cfg.block_q, 1), -jnp.inf, acc_dtype),
          jnp.zeros((cfg.block_q, 1), acc_dtype))
  acc_QxD, m_Qx1, l_Qx1 = _loop(cfg, 0, _num_k_blocks(cfg, i, k_ref.shape[0]), body, init)
  # Rows with no visible key (segment ids, padding) output 0, and lse = +inf makes
  # every backward exp(s - lse) vanish for them.
  empty_Qx1 = l_Qx1 == 0
  o_ref[...] = (acc_QxD / jnp.where(empty_Qx1, 1.0, l_Qx1)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty_Qx1, jnp.inf, m_Qx1 + jnp.log(l_Qx1)).astype(lse_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, cfg):
  i = pl.program_id(2)
  q_QxD, do_QxD = q_ref[...], do_ref[...]
  lse_Qx1, delta_Qx1 = lse_ref[...], delta_ref[...]
  acc_dtype = _acc_dtype(q_QxD.dtype)
  q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, dq_QxD):
    keys = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
    kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[:, keys]
    k_KxD, v_KxD = k_ref[keys, :], v_ref[keys, :]
    s_QxK = _scores(cfg, q_QxD, k_KxD, i * cfg.block_q, j * cfg.block_k,
                    q_seg_Qx1, kv_seg_1xK, acc_dtype)
    p_QxK = jnp.exp(s_QxK - lse_Qx1)
    dp_QxK = _dot(do_QxD, v_KxD, (1, 1), acc_dtype)
    ds_QxK = p_QxK * (dp_QxK - delta_Qx1)
    return dq_QxD + _dot(ds_QxK.astype(k_KxD.dtype), k_KxD, (1, 0), acc_dtype)

  dq_QxD = _loop(cfg, 0, _num_k_blocks(cfg, i, k_ref.shape[0]), body,
                         jnp.zeros(q_QxD.shape, acc_dtype))
  dq_ref[...] = (dq_QxD * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, cfg):
  j = pl.program_id(2)
  k_KxD, v_KxD = k_ref[...], v_ref[...]
  acc_dtype = _acc_dtype(k_KxD.dtype)
  kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(i, carry):
    dk_KxD, dv_KxD = carry
    queries = pl.ds(pl.multiple_of(i * cfg.block_q, cfg.block_q), cfg.block_q)
    q_QxD, do_QxD = q_ref[queries, :], do_ref[queries, :]
    q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[queries, :]
    s_QxK = _scores(cfg, q_QxD, k_KxD, i * cfg.block_q, j * cfg.block_k,
                    q_seg_Qx1, kv_seg_1xK, acc_dtype)
    p_QxK = jnp.exp(s_QxK - lse_ref[queries, :])
    dv_KxD = dv_KxD + _dot(p_QxK.astype(do_QxD.dtype), do_QxD, (0, 0), acc_dtype)
    dp_QxK = _dot(do_QxD, v_KxD, (1, 1), acc_dtype)
    ds_QxK = p_QxK * (dp_QxK - delta_ref[queries, :])
    dk_KxD = dk_KxD + _dot(ds_QxK.astype(q_QxD.dtype), q_QxD, (0, 0), acc_dtype)
    return dk_KxD, dv_KxD

  # Causal: query blocks wholly before this key block never see it.
  first = lax.div(j * cfg.block_k, jnp.int32(cfg.block_q)) if cfg.causal else 0
  zeros = jnp.zeros(k_KxD.shape, acc_dtype)
  dk_KxD, dv_KxD = _loop(cfg, first, q_ref.shape[0] // cfg.block_q, body, (zeros, zeros))
  dk_ref[...] = (dk_KxD * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


def _compiler_params(cfg, head_dim, grid_rank):
  if cfg.target == "gpu":
    # Triton: pallas_call with the Mosaic GPU back-end is deprecated in favour of
    # warp-specialized `plgpu.kernel` programs, which this portable kernel is not.
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if cfg.target == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, head_dim, name):
  call = lambda out_shape: pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=_compiler_params(cfg, head_dim, len(grid)),
      interpret=cfg.target == "interpret", name=name)

  def run(*operands):
    # Inside `jax.shard_map` (the `dp` train step) every output must state which mesh axes
    # it varies over: all those any operand varies over, so operands are cast to that too.
    varying = frozenset().union(*(_varying(x) for x in operands if x is not None))
    if not varying:
      return call(out_shape)(*operands)
    operands = [x if x is None or _varying(x) == varying
                else lax.pcast(x, tuple(varying - _varying(x)), to="varying") for x in operands]
    mat = jax.sharding.ManualAxisType(varying=varying)
    return call(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat),
                             out_shape))(*operands)

  return run


def _varying(x) -> frozenset:
  return jax.typeof(x).manual_axis_type.varying


@dataclasses.dataclass(frozen=True)
class _Specs:
  q: pl.BlockSpec  # q, o, do, dq
  rows: pl.BlockSpec  # per-query lse, delta: [B, H, T, 1]
  kv: pl.BlockSpec  # k, v (the kv head of query head h)
  dkv: pl.BlockSpec  # dk, dv per query head
  segments: tuple  # (q_seg, kv_seg), or (None, None) without segment ids


def _specs(cfg, q_BxHxTxD, k_BxKxSxD, with_segments: bool, tile_q: bool) -> _Specs:
  """Grid (B, H, n): the tiled side (q if `tile_q`, else kv) takes block n of its
  sequence, the other side its whole padded sequence."""
  _, H, T, D = q_BxHxTxD.shape
  K, S = k_BxKxSxD.shape[1:3]
  group = H // K  # GQA: query head h reads kv head h // group
  tq, qn = (cfg.block_q, lambda n: n) if tile_q else (T, lambda n: 0)
  tk, kn = (S, lambda n: 0) if tile_q else (cfg.block_k, lambda n: n)
  segments = (None, None)
  if with_segments:  # q ids as [B, T, 1] and kv ids as [B, 1, S]: they broadcast to a tile.
    segments = (pl.BlockSpec((None, tq, 1), lambda b, h, n: (b, qn(n), 0)),
                pl.BlockSpec((None, 1, tk), lambda b, h, n: (b, 0, kn(n))))
  return _Specs(
      q=pl.BlockSpec((None, None, tq, D), lambda b, h, n: (b, h, qn(n), 0)),
      rows=pl.BlockSpec((None, None, tq, 1), lambda b, h, n: (b, h, qn(n), 0)),
      kv=pl.BlockSpec((None, None, tk, D), lambda b, h, n: (b, h // group, kn(n), 0)),
      dkv=pl.BlockSpec((None, None, tk, D), lambda b, h, n: (b, h, kn(n), 0)),
      segments=segments)


def forward(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, cfg: Config):
  """Returns (o [B, H, T, D] in q's dtype, lse [B, H, T, 1] in the accumulation dtype)."""
  B, H, T, D = q_BxHxTxD.shape
  sp = _specs(cfg, q_BxHxTxD, k_BxKxSxD, q_seg_BxTx1 is not None, tile_q=True)
  acc_dtype = _acc_dtype(q_BxHxTxD.dtype)
  return _call(
      _forward_kernel, cfg, grid=(B, H, T // cfg.block_q),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments], out_specs=[sp.q, sp.rows],
      out_shape=[jax.ShapeDtypeStruct(q_BxHxTxD.shape, q_BxHxTxD.dtype),
                 jax.ShapeDtypeStruct((B, H, T, 1), acc_dtype)],
      head_dim=D, name="flash_attention_forward",
  )(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS)


def backward(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, o_BxHxTxD,
             lse_BxHxTx1, do_BxHxTxD, cfg: Config):
  """Returns (dq, dk, dv), dk and dv per kv head; nothing of size T x S is stored."""
  B, H, T, D = q_BxHxTxD.shape
  K, S = k_BxKxSxD.shape[1:3]
  acc_dtype = _acc_dtype(q_BxHxTxD.dtype)
  # delta_i = sum_d o_id do_id = sum_j p_ij dp_ij: the softmax-backward row term.
  delta_BxHxTx1 = jnp.sum(o_BxHxTxD.astype(acc_dtype) * do_BxHxTxD.astype(acc_dtype),
                          axis=-1, keepdims=True)
  operands = (q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, do_BxHxTxD,
              lse_BxHxTx1, delta_BxHxTx1)
  with_segments = q_seg_BxTx1 is not None

  sp = _specs(cfg, q_BxHxTxD, k_BxKxSxD, with_segments, tile_q=True)
  dq = _call(
      _dq_kernel, cfg, grid=(B, H, T // cfg.block_q),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments, sp.q, sp.rows, sp.rows], out_specs=sp.q,
      out_shape=jax.ShapeDtypeStruct(q_BxHxTxD.shape, q_BxHxTxD.dtype),
      head_dim=D, name="flash_attention_dq",
  )(*operands)

  # dk/dv come out per query head and are summed over each kv head's group below;
  # with groups, keep them in the accumulation dtype until that sum.
  group = H // K
  dkv_dtype = k_BxKxSxD.dtype if group == 1 else acc_dtype
  sp = _specs(cfg, q_BxHxTxD, k_BxKxSxD, with_segments, tile_q=False)
  dk, dv = _call(
      _dkdv_kernel, cfg, grid=(B, H, S // cfg.block_k),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments, sp.q, sp.rows, sp.rows],
      out_specs=[sp.dkv, sp.dkv],
      out_shape=[jax.ShapeDtypeStruct((B, H, S, D), dkv_dtype)] * 2,
      head_dim=D, name="flash_attention_dkdv",
  )(*operands)
  if group > 1:
    dk, dv = (x.reshape(B, K, group, S, D).sum(axis=2).astype(k_BxKxSxD.dtype) for x in (dk, dv))
  return dq, dk, dv
