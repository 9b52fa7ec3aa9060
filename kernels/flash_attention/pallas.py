"""Pallas flash-attention kernels: forward, dq, and dk/dv.

All three work on head-major, padded arrays (q, do: [B, H, T, D]; k, v: [B, K, S, D];
T and S multiples of the block sizes); `api.py` does the transposes, padding and
the `custom_vjp`. One program handles one (batch, head, block) tile and loops over
the other sequence with `lax.fori_loop`, reading its tiles out of a whole-sequence
block of k/v (forward, dq) or q/do (dk/dv). That is the shape the Triton lowering
wants (it has no cross-program accumulators) and that Mosaic TPU and the CPU
interpreter also accept, so the same kernel bodies serve all three.

Softmax runs in base 2 (log2(e) folded into the logit scale, `exp2` on the tile), as
FlashAttention-2 and the Triton tutorial kernel do: one multiply fewer per logit than `exp`.
The saved lse stays a natural log, so the residual contract (o, lse = log sum exp of the
sm_scale-scaled logits) is the same for every implementation. Key tiles that need no causal or
padding mask (causal ones wholly below the diagonal, and every tile without padded keys) run
a loop of their own with no iota, compare or select; only segment ids, which are data, are
still applied there (and dk/dv keeps the padding mask when the key length is ragged: which
key tile holds padding depends on its program).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One kernel's launch tunables: its tile and, for Triton only, warps and pipeline stages."""
  block_q: int
  block_k: int
  num_warps: int | None = None
  num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
  """Static parameters of the three kernels (hashable: a jit static arg)."""
  sm_scale: float
  causal: bool
  seq_k: int  # unpadded key length: keys at or past it are padding
  target: str  # "gpu" (Triton), "tpu" (Mosaic TPU) or "interpret"
  fwd: Tiles
  dq: Tiles
  dkdv: Tiles

  @property
  def q_multiple(self) -> int:
    """What the query length is padded to a multiple of: every kernel's q tile divides it."""
    return max(self.fwd.block_q, self.dq.block_q, self.dkdv.block_q)

  @property
  def k_multiple(self) -> int:
    return max(self.fwd.block_k, self.dq.block_k, self.dkdv.block_k)


def default_tiles(target: str, head_dim: int) -> dict[str, Tiles]:
  """Untuned-here defaults per kernel, {"fwd", "dq", "dkdv"}: Tiles.

  GPU: the defaults of jax's own Pallas Triton attention (jax/experimental/pallas/ops/gpu/
  attention.py, jax 0.10.2: `BlockSizes.get_default()` and `mha`/`_mha_backward`): forward
  128 x 128 tiles with 4 warps up to head_dim 64 and 8 above, 2 stages; backward 32 x 32 tiles
  for both dq and dk/dv, 4 warps (it takes 8 only for tiles of 128 x 128 or more), 2 stages.
  Small backward tiles keep its float32 accumulators (dq; dk and dv) in registers. TPU and the
  interpreter: 128 x 128, which fills the MXU and the lane tiles. Replace with numbers from
  `python -m kernels.flash_attention.bench` on the device when there are some.
  """
  if target == "gpu":
    return dict(fwd=Tiles(128, 128, 4 if head_dim <= 64 else 8, 2),
                dq=Tiles(32, 32, 4, 2), dkdv=Tiles(32, 32, 4, 2))
  return dict(fwd=Tiles(128, 128), dq=Tiles(128, 128), dkdv=Tiles(128, 128))


def _acc_dtype(dtype):
  # float32 accumulation; float64 inputs (interpret-mode tests) keep float64.
  return jnp.promote_types(dtype, jnp.float32)


def _dot(a, b, contract, acc_dtype):
  """a @ b contracting dims `contract` = (a_dim, b_dim), without materializing a transpose."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                         preferred_element_type=acc_dtype)


def _visible(cfg, t: Tiles, q_start, k_start, q_seg_Qx1, kv_seg_1xK, *, causal, padded):
  """[block_q, block_k] mask of the keys each query may attend to, or None if all.

  `causal` and `padded` are static: the caller knows when a tile needs no causal mask (wholly
  below the diagonal) or no padding mask (no key at or past seq_k)."""
  shape = (t.block_q, t.block_k)
  masks = []
  if causal or padded:
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  if causal:
    masks.append(q_start + lax.broadcasted_iota(jnp.int32, shape, 0) >= k_idx)
  if padded:
    masks.append(k_idx < cfg.seq_k)
  if q_seg_Qx1 is not None:
    masks.append(q_seg_Qx1 == kv_seg_1xK)
  return functools.reduce(jnp.logical_and, masks) if masks else None


def _scores_log2(cfg, t, q, k, q_start, k_start, q_seg_Qx1, kv_seg_1xK, acc_dtype, *, causal,
                 padded):
  """Logits of a tile in base 2 (s * sm_scale * log2 e); invisible entries are -inf so
  exp2() zeroes them exactly."""
  s_QxK = _dot(q, k, (1, 1), acc_dtype) * (cfg.sm_scale * LOG2_E)
  mask_QxK = _visible(cfg, t, q_start, k_start, q_seg_Qx1, kv_seg_1xK, causal=causal,
                      padded=padded)
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


def _key_block_ranges(cfg, t: Tiles, q_block, seq_k_padded):
  """(unmasked, visible): key blocks [0, unmasked) need no causal or padding mask, blocks
  [unmasked, visible) need one, and causal blocks from `visible` on lie wholly in the future."""
  num_k = seq_k_padded // t.block_k
  unmasked = cfg.seq_k // t.block_k  # blocks with no padded key
  if not cfg.causal:
    return unmasked, num_k
  first_q = q_block * t.block_q
  # Key block j is wholly visible when its last key, (j+1)*block_k - 1, is <= first_q; both
  # are multiples of 8, so that is (j+1)*block_k <= first_q.
  unmasked = jnp.minimum(lax.div(first_q, jnp.int32(t.block_k)), unmasked)
  visible = jnp.minimum(lax.div(first_q + t.block_q + t.block_k - 1, jnp.int32(t.block_k)),
                        num_k)
  return jnp.minimum(unmasked, visible), visible


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, cfg):
  t = cfg.fwd
  i = pl.program_id(2)
  q_QxD = q_ref[...]
  acc_dtype = _acc_dtype(q_QxD.dtype)
  q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[...]

  def body(causal, padded):
    def step(j, carry):
      acc_QxD, m_Qx1, l_Qx1 = carry  # m: running max of the base-2 logits
      keys = pl.ds(pl.multiple_of(j * t.block_k, t.block_k), t.block_k)
      kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[:, keys]
      s_QxK = _scores_log2(cfg, t, q_QxD, k_ref[keys, :], i * t.block_q, j * t.block_k,
                           q_seg_Qx1, kv_seg_1xK, acc_dtype, causal=causal, padded=padded)
      m_new_Qx1 = jnp.maximum(m_Qx1, s_QxK.max(axis=1, keepdims=True))
      shift_Qx1 = m_new_Qx1
      if causal or padded or q_seg_Qx1 is not None:
        # A row that has seen no visible key yet has max -inf; shift by 0 instead so
        # exp2() gives 0 rather than exp2(-inf + inf) = NaN. (Unmasked tiles see every key.)
        shift_Qx1 = jnp.where(m_new_Qx1 == -jnp.inf, 0.0, m_new_Qx1)
      p_QxK = jnp.exp2(s_QxK - shift_Qx1)
      rescale_Qx1 = jnp.exp2(m_Qx1 - shift_Qx1)
      v_KxD = v_ref[keys, :]
      acc_QxD = rescale_Qx1 * acc_QxD + _dot(p_QxK.astype(v_KxD.dtype), v_KxD, (1, 0),
                                             acc_dtype)
      l_Qx1 = rescale_Qx1 * l_Qx1 + p_QxK.sum(axis=1, keepdims=True)
      return acc_QxD, m_new_Qx1, l_Qx1
    return step

  init = (jnp.zeros(q_QxD.shape, acc_dtype),
          jnp.full((t.block_q, 1), -jnp.inf, acc_dtype),
          jnp.zeros((t.block_q, 1), acc_dtype))
  unmasked, visible = _key_block_ranges(cfg, t, i, k_ref.shape[0])
  carry = _loop(cfg, 0, unmasked, body(causal=False, padded=False), init)
  acc_QxD, m_Qx1, l_Qx1 = _loop(cfg, unmasked, visible,
                                body(causal=cfg.causal, padded=cfg.seq_k % t.block_k != 0),
                                carry)
  # Rows with no visible key (segment ids, padding) output 0, and lse = +inf makes
  # every backward exp2(s - lse) vanish for them. lse is a natural log: m / log2(e) + ln l.
  empty_Qx1 = l_Qx1 == 0
  o_ref[...] = (acc_QxD / jnp.where(empty_Qx1, 1.0, l_Qx1)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty_Qx1, jnp.inf,
                           m_Qx1 * (1 / LOG2_E) + jnp.log(l_Qx1)).astype(lse_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse2_ref, delta_ref, dq_ref,
               *, cfg):
  t = cfg.dq
  i = pl.program_id(2)
  q_QxD, do_QxD = q_ref[...], do_ref[...]
  lse2_Qx1, delta_Qx1 = lse2_ref[...], delta_ref[...]
  acc_dtype = _acc_dtype(q_QxD.dtype)
  q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[...]

  def body(causal, padded):
    def step(j, dq_QxD):
      keys = pl.ds(pl.multiple_of(j * t.block_k, t.block_k), t.block_k)
      kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[:, keys]
      k_KxD, v_KxD = k_ref[keys, :], v_ref[keys, :]
      s_QxK = _scores_log2(cfg, t, q_QxD, k_KxD, i * t.block_q, j * t.block_k,
                           q_seg_Qx1, kv_seg_1xK, acc_dtype, causal=causal, padded=padded)
      p_QxK = jnp.exp2(s_QxK - lse2_Qx1)
      dp_QxK = _dot(do_QxD, v_KxD, (1, 1), acc_dtype)
      ds_QxK = p_QxK * (dp_QxK - delta_Qx1)
      return dq_QxD + _dot(ds_QxK.astype(k_KxD.dtype), k_KxD, (1, 0), acc_dtype)
    return step

  unmasked, visible = _key_block_ranges(cfg, t, i, k_ref.shape[0])
  dq_QxD = _loop(cfg, 0, unmasked, body(causal=False, padded=False),
                 jnp.zeros(q_QxD.shape, acc_dtype))
  dq_QxD = _loop(cfg, unmasked, visible,
                 body(causal=cfg.causal, padded=cfg.seq_k % t.block_k != 0), dq_QxD)
  dq_ref[...] = (dq_QxD * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse2_ref, delta_ref,
                 dk_ref, dv_ref, *, cfg):
  t = cfg.dkdv
  j = pl.program_id(2)
  k_KxD, v_KxD = k_ref[...], v_ref[...]
  acc_dtype = _acc_dtype(k_KxD.dtype)
  kv_seg_1xK = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(causal):
    def step(i, carry):
      dk_KxD, dv_KxD = carry
      queries = pl.ds(pl.multiple_of(i * t.block_q, t.block_q), t.block_q)
      q_QxD, do_QxD = q_ref[queries, :], do_ref[queries, :]
      q_seg_Qx1 = None if q_seg_ref is None else q_seg_ref[queries, :]
      # Whether this key block holds padding depends on the program, so the padding mask
      # is kept in both loops when the key length is ragged.
      s_QxK = _scores_log2(cfg, t, q_QxD, k_KxD, i * t.block_q, j * t.block_k,
                           q_seg_Qx1, kv_seg_1xK, acc_dtype, causal=causal,
                           padded=cfg.seq_k % t.block_k != 0)
      p_QxK = jnp.exp2(s_QxK - lse2_ref[queries, :])
      dv_KxD = dv_KxD + _dot(p_QxK.astype(do_QxD.dtype), do_QxD, (0, 0), acc_dtype)
      dp_QxK = _dot(do_QxD, v_KxD, (1, 1), acc_dtype)
      ds_QxK = p_QxK * (dp_QxK - delta_ref[queries, :])
      dk_KxD = dk_KxD + _dot(ds_QxK.astype(q_QxD.dtype), q_QxD, (0, 0), acc_dtype)
      return dk_KxD, dv_KxD
    return step

  num_q = q_ref.shape[0] // t.block_q
  zeros = jnp.zeros(k_KxD.shape, acc_dtype)
  if cfg.causal:
    # Query blocks wholly before this key block never see it; from the first query block
    # whose first query is at or past this block's last key on, every query sees every key.
    first = lax.div(j * t.block_k, jnp.int32(t.block_q))
    unmasked = jnp.minimum(lax.div((j + 1) * t.block_k + t.block_q - 1, jnp.int32(t.block_q)),
                           num_q)
    carry = _loop(cfg, first, unmasked, body(causal=True), (zeros, zeros))
    dk_KxD, dv_KxD = _loop(cfg, unmasked, num_q, body(causal=False), carry)
  else:
    dk_KxD, dv_KxD = _loop(cfg, 0, num_q, body(causal=False), (zeros, zeros))
  dk_ref[...] = (dk_KxD * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


def _compiler_params(cfg, t: Tiles, grid_rank):
  if cfg.target == "gpu":
    # Triton: pallas_call with the Mosaic GPU back-end is deprecated in favour of
    # warp-specialized `plgpu.kernel` programs, which this portable kernel is not.
    return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
  if cfg.target == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def _call(kernel, cfg, t, grid, in_specs, out_specs, out_shape, name):
  call = lambda out_shape: pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=_compiler_params(cfg, t, len(grid)),
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


def _specs(t: Tiles, q_BxHxTxD, k_BxKxSxD, with_segments: bool, tile_q: bool) -> _Specs:
  """Grid (B, H, n): the tiled side (q if `tile_q`, else kv) takes block n of its
  sequence, the other side its whole padded sequence."""
  _, H, T, D = q_BxHxTxD.shape
  K, S = k_BxKxSxD.shape[1:3]
  group = H // K  # GQA: query head h reads kv head h // group
  tq, qn = (t.block_q, lambda n: n) if tile_q else (T, lambda n: 0)
  tk, kn = (S, lambda n: 0) if tile_q else (t.block_k, lambda n: n)
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
  B, H, T, _ = q_BxHxTxD.shape
  sp = _specs(cfg.fwd, q_BxHxTxD, k_BxKxSxD, q_seg_BxTx1 is not None, tile_q=True)
  acc_dtype = _acc_dtype(q_BxHxTxD.dtype)
  return _call(
      _forward_kernel, cfg, cfg.fwd, grid=(B, H, T // cfg.fwd.block_q),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments], out_specs=[sp.q, sp.rows],
      out_shape=[jax.ShapeDtypeStruct(q_BxHxTxD.shape, q_BxHxTxD.dtype),
                 jax.ShapeDtypeStruct((B, H, T, 1), acc_dtype)],
      name="flash_attention_forward",
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
  # The kernels rebuild p = exp2(s * log2 e - lse * log2 e): lse in base 2, scaled here once.
  # (Scaling a ref read inside the kernel also trips jax 0.10's varying-axes check when the
  # interpreter runs inside the `dp` step's shard_map.)
  lse2_BxHxTx1 = lse_BxHxTx1 * LOG2_E
  operands = (q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, do_BxHxTxD,
              lse2_BxHxTx1, delta_BxHxTx1)
  with_segments = q_seg_BxTx1 is not None

  sp = _specs(cfg.dq, q_BxHxTxD, k_BxKxSxD, with_segments, tile_q=True)
  dq = _call(
      _dq_kernel, cfg, cfg.dq, grid=(B, H, T // cfg.dq.block_q),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments, sp.q, sp.rows, sp.rows], out_specs=sp.q,
      out_shape=jax.ShapeDtypeStruct(q_BxHxTxD.shape, q_BxHxTxD.dtype),
      name="flash_attention_dq",
  )(*operands)

  # dk/dv come out per query head and are summed over each kv head's group below;
  # with groups, keep them in the accumulation dtype until that sum.
  group = H // K
  dkv_dtype = k_BxKxSxD.dtype if group == 1 else acc_dtype
  sp = _specs(cfg.dkdv, q_BxHxTxD, k_BxKxSxD, with_segments, tile_q=False)
  dk, dv = _call(
      _dkdv_kernel, cfg, cfg.dkdv, grid=(B, H, S // cfg.dkdv.block_k),
      in_specs=[sp.q, sp.kv, sp.kv, *sp.segments, sp.q, sp.rows, sp.rows],
      out_specs=[sp.dkv, sp.dkv],
      out_shape=[jax.ShapeDtypeStruct((B, H, S, D), dkv_dtype)] * 2,
      name="flash_attention_dkdv",
  )(*operands)
  if group > 1:
    dk, dv = (x.reshape(B, K, group, S, D).sum(axis=2).astype(k_BxKxSxD.dtype) for x in (dk, dv))
  return dq, dk, dv
