"""Hopper (sm_90) flash attention in Pallas Mosaic GPU: forward, dq, and dk/dv.

Same contract as `pallas.py` (head-major, padded q/do [B, H, T, D], k/v [B, K, S, D]; forward
returns o and a natural-log lse [B, H, T, 1] in float32; `backward` returns dq, dk, dv), so
`api.py`'s `custom_vjp` runs either. Each kernel is one `plgpu.kernel` whose CTA has three
warpgroups: two compute warpgroups, each owning half of the CTA's query (or key) rows, and
one copy warpgroup that streams the other sequence's tiles through a ring of `_SLOTS`
shared-memory slots with TMA, gated by "loaded" and "consumed" barriers (warp specialization).
Operand tiles live in 128-byte-swizzled shared memory and every matmul is a `wgmma`.

Which key blocks a query block visits (and which query blocks a key block visits) comes from
`key_ranges` and `query_ranges`, plain JAX run before the kernels: causal attention stops at the
diagonal and segment ids cut each range down to the blocks that share an id, so wholly invisible
blocks are never loaded. Inside a range, blocks that need no mask (below the diagonal, not the
ragged last block, no segment ids) take an unmasked fast path.

Interpret mode (`Config.interpret`) runs the same kernels on CPU through jax's GPU interpreter
(threads, barriers, TMA and shared memory simulated). It lacks register layouts, `wgmma` on
transposed refs and `pl.run_state` accumulators, so there the matmuls are `lax.dot_general` on
loaded tiles and layout casts are skipped (`_mma`, `_matmul`, `_load`, `_iota`, `_zeros`); the
rest of each kernel is the code that is lowered for the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG_ROWS = 64  # rows of one wgmma (M) per warpgroup
_COMPUTE_WGS = 2
_SLOTS = 2  # depth of the copy warpgroup's ring of shared-memory tiles
# Hopper has 228 KiB of shared memory per SM and at most 227 KiB per block.
SMEM_LIMIT_BYTES = 227 * 1024
DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128)
DEFAULT_BLOCKS = (128, 128)  # (block_q, block_k)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel parameters (hashable: a jit static argument).

  block_q: query rows per CTA in the forward and dq kernels (half per compute warpgroup),
    and the padding multiple of T. block_k: key rows per streamed tile in the
    forward, keys per CTA in dk/dv (half per compute warpgroup), and the padding multiple of S.
    The dq kernel streams key tiles of block_k // 2 and dk/dv query tiles of 64 rows.
  """
  sm_scale: float
  causal: bool
  block_q: int
  block_k: int
  seq_k: int  # unpadded key length: keys at or past it are padding
  interpret: bool = False

  @property
  def q_multiple(self):  # what T is padded to
    return self.block_q

  @property
  def k_multiple(self):  # what S is padded to
    return self.block_k

  @property
  def block_k_dq(self):
    return self.block_k // 2

  @property
  def block_q_dkv(self):
    return WG_ROWS


def smem_bytes(cfg: Config, head_dim: int, itemsize: int, segments: bool) -> dict[str, int]:
  """Shared memory each kernel allocates (tiles, row vectors, barriers), in bytes."""
  barrier = 8
  rows = cfg.block_q
  seg = 4 if segments else 0

  def streamed(tile_rows, tiles, row_vectors):
    return _SLOTS * (tile_rows * head_dim * itemsize * tiles + tile_rows * row_vectors)

  fwd = (rows * head_dim * itemsize + rows * (4 + seg)  # q (then o), lse, q segment ids
         + streamed(cfg.block_k, 2, seg) + barrier * (2 * _COMPUTE_WGS + 4 * _SLOTS))
  dq = (2 * rows * head_dim * itemsize + rows * (8 + seg)  # q, do, lse, delta, ids
        + streamed(cfg.block_k_dq, 2, seg) + barrier * (4 * _COMPUTE_WGS + 4 * _SLOTS))
  dkv = (2 * cfg.block_k * head_dim * itemsize + cfg.block_k * seg  # k, v, kv ids
         + streamed(cfg.block_q_dkv, 2, 8 + seg) + barrier * (4 * _COMPUTE_WGS + 6 * _SLOTS))
  return {"forward": fwd, "dq": dq, "dkdv": dkv}


def unsupported(cfg: Config, head_dim: int, dtype, segments: bool) -> str | None:
  """Why these kernels cannot take this configuration, or None: checked before lowering."""
  if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
    return (f"dtype {jnp.dtype(dtype)} is not supported by the Mosaic GPU kernels "
            "(bfloat16, float16)")
  if head_dim not in HEAD_DIMS:
    return f"head_dim={head_dim} is not supported by the Mosaic GPU kernels (one of {HEAD_DIMS})"
  if cfg.block_q % (_COMPUTE_WGS * WG_ROWS):
    return f"block_q={cfg.block_q} must be a multiple of {_COMPUTE_WGS * WG_ROWS} for Mosaic GPU"
  if cfg.block_k % (_COMPUTE_WGS * WG_ROWS):
    return f"block_k={cfg.block_k} must be a multiple of {_COMPUTE_WGS * WG_ROWS} for Mosaic GPU"
  for kernel, used in smem_bytes(cfg, head_dim, jnp.dtype(dtype).itemsize, segments).items():
    if used > SMEM_LIMIT_BYTES:
      return (f"the {kernel} kernel needs {used} bytes of shared memory with block_q="
              f"{cfg.block_q}, block_k={cfg.block_k}, head_dim={head_dim}, more than Hopper's "
              f"{SMEM_LIMIT_BYTES} per block")
  return None


def key_ranges(cfg: Config, batch: int, T: int, S: int, block_q: int, block_k: int,
               q_seg_BxT=None, kv_seg_BxS=None):
  """(lo, hi) [batch, T / block_q] int32: the key blocks (block_k wide) query block i visits
  are lo[:, i] <= j < hi[:, i]. T and S are padded lengths; keys at or past `cfg.seq_k` are
  padding.

  Exact at block granularity: block j is in range iff some query of block i may attend some
  real key of block j (causal, padding, segment ids), or it lies between two such blocks (only
  possible with unsorted segment ids). Masks inside the kernels handle the rest. A query block
  that sees no key gets (0, 0).
  """
  return _ranges(cfg, batch, T, S, block_q, block_k, q_seg_BxT, kv_seg_BxS, axis=2)


def query_ranges(cfg: Config, batch: int, T: int, S: int, block_q: int, block_k: int,
                 q_seg_BxT=None, kv_seg_BxS=None):
  """(lo, hi) [batch, S / block_k]: the query blocks (block_q tall) key block j is visited by."""
  return _ranges(cfg, batch, T, S, block_q, block_k, q_seg_BxT, kv_seg_BxS, axis=1)


def _ranges(cfg, batch, T, S, block_q, block_k, q_seg_BxT, kv_seg_BxS, axis):
  nq, nk = T // block_q, S // block_k
  if q_seg_BxT is None:
    # Block (i, j) is visible iff its first key is real and (causal) not after its last query.
    first_k = jnp.arange(nk)[None, :] * block_k
    visible = jnp.broadcast_to(first_k < cfg.seq_k, (nq, nk))
    if cfg.causal:
      visible &= (jnp.arange(nq)[:, None] + 1) * block_q - 1 >= first_k
    visible = jnp.broadcast_to(visible, (batch, nq, nk))
  else:
    # Per element with the ids (so exact with causal too), reduced per block pair; XLA fuses
    # the compare into the reduce, so no B x T x S array is stored.
    t, s = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    same = (q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]) & (s < cfg.seq_k)
    if cfg.causal:
      same &= t >= s
    visible = same.reshape(batch, nq, block_q, nk, block_k).any(axis=(2, 4))
  # First and one-past-last visible block along `axis` (key blocks per q block for axis=2,
  # q blocks per key block for axis=1); an empty range is (0, 0).
  n = visible.shape[axis]
  idx = lax.broadcasted_iota(jnp.int32, visible.shape, axis)
  lo = jnp.where(visible, idx, n).min(axis=axis)
  hi = jnp.where(visible, idx + 1, 0).max(axis=axis)
  return jnp.where(hi == 0, 0, lo).astype(jnp.int32), hi.astype(jnp.int32)


# ---- in-kernel helpers -------------------------------------------------------------------

_TILING = plgpu.TilingTransform((8, 64))
_SWIZZLE = plgpu.SwizzleTransform(128)


def _tile_smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=(_TILING, _SWIZZLE))


def _mma(acc, a, b, interpret, transpose_b=False):
  """acc + a @ b (b^T if transpose_b) on the tensor cores; a: registers or shared memory,
  b: shared memory."""
  if interpret:
    return acc + _interpret_dot(a, b, transpose_b)
  b = _t(b) if transpose_b else b
  return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _matmul(a, b, shape, interpret, transpose_b=False):
  """a @ b (b^T if transpose_b) into a fresh float32 accumulator."""
  if interpret:
    return _interpret_dot(a, b, transpose_b)
  b = _t(b) if transpose_b else b

  def scoped(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32))


def _interpret_dot(a, b, transpose_b):
  # The interpreter's wgmma takes neither `transpose_ref` nor an accumulator carried
  # through `pl.run_state`, so interpreted kernels multiply loaded tiles instead.
  a = a if isinstance(a, jax.Array) else a[...]
  return lax.dot_general(a, b[...], (((1,), (1 if transpose_b else 0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _t(ref):
  return plgpu.transpose_ref(ref, (1, 0))


# Register layouts steer the Mosaic GPU lowering; the interpreter has no layouts (it rejects
# `layout_cast` and layout-taking loads), so in interpret mode these are plain jnp.

def _zeros(shape, interpret):
  x = jnp.zeros(shape, jnp.float32)
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _row_vector(value, rows, interpret):
  x = jnp.full((rows,), value, jnp.float32)
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _load(ref, index, axis, interpret):
  """Vector `index` of a [n, len] shared-memory array, laid out as rows (axis=1 reduced) or
  columns (axis=0)."""
  if interpret:
    return ref[index]
  return plgpu.load(ref.at[index], (), layout=plgpu.Layout.WGMMA.reduce(axis))


def _iota(shape, dim, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _rows(x, shape):  # [rows] -> broadcast along columns
  return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):  # [cols] -> broadcast along rows
  return lax.broadcast_in_dim(x, shape, [1])


@dataclasses.dataclass(frozen=True)
class _Stream:
  """Tiles the copy warpgroup streams: step i's tile is `src(i)`, stored in `smem.at[slot]`."""
  smem: object
  loaded: object  # one barrier per slot
  src: object


def _produce(streams, consumed, count):
  """Copy warpgroup: issue TMA copies of steps 0..count-1, each once its slot is free."""
  def issue(i, slot):
    for s in streams:
      plgpu.copy_gmem_to_smem(s.src(i), s.smem.at[slot], s.loaded.at[slot])

  for i in range(_SLOTS):
    pl.when(i < count)(functools.partial(issue, i, i))

  def body(i, carry):
    slot = lax.rem(i, _SLOTS)
    plgpu.barrier_wait(consumed.at[slot])  # both compute warpgroups are done with step i - SLOTS
    issue(i, slot)
    return carry

  lax.fori_loop(_SLOTS, jnp.maximum(count, _SLOTS), body, 0)

  # Observe the last steps' releases too: barrier phases stay paired (the interpreter checks
  # that a thread waiting on a barrier saw every phase).
  def tail(i, carry):
    plgpu.barrier_wait(consumed.at[lax.rem(i, _SLOTS)])
    return carry
  lax.fori_loop(jnp.maximum(count - _SLOTS, 0), count, tail, 0)


def _wait_loaded(streams, slot):
  for s in streams:
    plgpu.barrier_wait(s.loaded.at[slot])


def _drain(streams, consumed, lo, hi):
  """A compute warpgroup's steps past its own range: wait (keeping barrier phases in step)
  and release them, so the copy warpgroup can move on for the other warpgroup."""
  def body(i, carry):
    slot = lax.rem(i, _SLOTS)
    _wait_loaded(streams, slot)
    plgpu.barrier_arrive(consumed.at[slot])
    return carry
  lax.fori_loop(lo, hi, body, 0)


def _split_role(wg, compute, copy):
  @pl.when(wg < _COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(232, action="increase")
    compute()

  @pl.when(wg == _COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    copy()


def _visible(cfg, shape, row_start, col_start, rows_are_queries, segs):
  """[rows, cols] mask of the tile, or None if nothing is masked (in the WGMMA layout)."""
  row = row_start + _iota(shape, 0, cfg.interpret)
  col = col_start + _iota(shape, 1, cfg.interpret)
  q, k = (row, col) if rows_are_queries else (col, row)
  masks = []
  if cfg.causal:
    masks.append(q >= k)
  if cfg.seq_k % cfg.block_k:
    masks.append(k < cfg.seq_k)
  if segs is not None:
    row_ids, col_ids = segs
    masks.append(_rows(row_ids, shape) == _cols(col_ids, shape))
  return functools.reduce(jnp.logical_and, masks) if masks else None


def _fast_end(cfg, lo, hi, first_query, block, segments):
  """End of the leading run of steps [lo, .) whose key tiles (`block` wide) need no mask
  for rows from `first_query` on: below the diagonal and free of padding."""
  if segments:
    return lo
  end = hi
  if cfg.causal:  # block j is wholly visible to the first row iff (j + 1) * block - 1 <= first
    end = jnp.minimum(end, lax.div(first_query + 1, jnp.int32(block)))
  if cfg.seq_k % cfg.block_k:
    end = jnp.minimum(end, cfg.seq_k // block)
  return jnp.clip(end, lo, hi)


def _causal_end(cfg, hi, last_query, block):
  """Steps past the one holding key `last_query` are wholly in the future of these rows."""
  if not cfg.causal:
    return hi
  return jnp.minimum(hi, lax.div(last_query, jnp.int32(block)) + 1)


def _key_streams(b, kv_h, lo, block, k, v, kv_seg):
  """The copy warpgroup's streams in the query-block kernels (forward, dq): step j is key tile
  lo + j (`block` wide) of k and v, and of the kv segment ids unless `kv_seg` is None. k, v and
  kv_seg are (global ref, shared-memory slots, their "loaded" barriers)."""
  keys = lambda j: pl.ds((lo + j) * block, block)
  streams = [_Stream(smem, bar, lambda j, ref=ref: ref.at[b, kv_h, keys(j)])
             for ref, smem, bar in (k, v)]
  if kv_seg is not None:
    ref, smem, bar = kv_seg
    streams.append(_Stream(smem, bar, lambda j: ref.at[b, keys(j)]))
  return streams


def _own_steps(cfg, lo, hi, q_start, rows, block, segments):
  """(n_mine, n_fast) of a compute warpgroup in the query-block kernels: of the CTA's key steps
  [0, hi - lo), it computes [0, n_mine) for its `rows` queries from `q_start` (the rest it only
  releases), the first n_fast of them unmasked. (Exact ranges keep n_mine >= 0; the clamp
  guards the drain count if they ever were not.)"""
  n_mine = jnp.maximum(_causal_end(cfg, hi, q_start + rows - 1, block) - lo, 0)
  return n_mine, _fast_end(cfg, lo, lo + n_mine, q_start, block, segments) - lo


def _softmax_step(cfg, s, m, l, acc, mask):
  """One online-softmax update in base 2. s is already scaled by sm_scale * log2(e)."""
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, s.max(axis=1))
  # A row with no visible key so far has max -inf: shift by 0 so exp2 gives 0, not NaN.
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp2(s - _rows(shift, s.shape))
  alpha = jnp.exp2(m - shift)
  l = l * alpha + p.sum(axis=1)
  acc = acc * _rows(alpha, acc.shape)
  return p, m_new, l, acc


# ---- forward -----------------------------------------------------------------------------

def forward(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, cfg: Config):
  """Returns (o [B, H, T, D] in q's dtype, lse [B, H, T, 1] float32, natural log)."""
  B, H, T, D = q_BxHxTxD.shape
  K, S = k_BxKxSxD.shape[1:3]
  dtype = q_BxHxTxD.dtype
  segments = q_seg_BxTx1 is not None
  _check(cfg, D, dtype, segments)
  q_seg, kv_seg = _flat_segments(q_seg_BxTx1, kv_seg_Bx1xS)
  kv_lo, kv_hi = key_ranges(cfg, B, T, S, cfg.block_q, cfg.block_k, q_seg, kv_seg)
  group, bk, rows = H // K, cfg.block_k, cfg.block_q // _COMPUTE_WGS
  scale2 = cfg.sm_scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, *rest):
    if segments:
      q_seg_ref, kv_seg_ref, o_ref, lse_ref, smem, bars = rest
    else:
      (o_ref, lse_ref, smem, bars), q_seg_ref, kv_seg_ref = rest, None, None
    q_smem, lse_smem, k_smem, v_smem, qseg_smem, kvseg_smem = smem
    q_bar, k_bar, v_bar, qseg_bar, kvseg_bar, consumed = bars
    h, qi, b = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    lo, hi = lo_ref[b, qi], hi_ref[b, qi]
    streams = _key_streams(b, lax.div(h, jnp.int32(group)), lo, bk, (k_ref, k_smem, k_bar),
                           (v_ref, v_smem, v_bar),
                           (kv_seg_ref, kvseg_smem, kvseg_bar) if segments else None)

    def compute():
      q_start = qi * cfg.block_q + wg * rows
      my_q, my_lse = q_smem.at[wg], lse_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(q_start, rows)], my_q, q_bar.at[wg])
      if segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[b, pl.ds(q_start, rows)], qseg_smem.at[wg],
                                qseg_bar.at[wg])
        plgpu.barrier_wait(qseg_bar.at[wg])
        q_ids = _load(qseg_smem, wg, 1, cfg.interpret)
      plgpu.barrier_wait(q_bar.at[wg])
      n_mine, n_fast = _own_steps(cfg, lo, hi, q_start, rows, bk, segments)

      def step(i, carry, masked):
        acc, m, l = carry
        slot = lax.rem(i, _SLOTS)
        plgpu.barrier_wait(k_bar.at[slot])
        s = _matmul(my_q, k_smem.at[slot], (rows, bk), cfg.interpret, True) * scale2
        mask = None
        if masked:
          segs = None
          if segments:
            plgpu.barrier_wait(kvseg_bar.at[slot])
            k_ids = _load(kvseg_smem, slot, 0, cfg.interpret)
            segs = (q_ids, k_ids)
          mask = _visible(cfg, s.shape, q_start, (lo + i) * bk, True, segs)
        elif segments:  # keep this warpgroup's barrier phases in step
          plgpu.barrier_wait(kvseg_bar.at[slot])
        p, m, l, acc = _softmax_step(cfg, s, m, l, acc, mask)
        plgpu.barrier_wait(v_bar.at[slot])
        acc = _mma(acc, p.astype(dtype), v_smem.at[slot], cfg.interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m, l

      carry = (_zeros((rows, D), cfg.interpret), _row_vector(-jnp.inf, rows, cfg.interpret),
               _row_vector(0.0, rows, cfg.interpret))
      carry = lax.fori_loop(0, n_fast, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(n_fast, n_mine, functools.partial(step, masked=True), carry)
      _drain(streams, consumed, n_mine, hi - lo)

      # Rows that saw no key output 0, and lse = +inf zeroes every backward exp(s - lse).
      empty = l == 0.0
      o = acc / _rows(jnp.where(empty, 1.0, l), acc.shape)
      my_q[...] = o.astype(dtype)
      my_lse[...] = jnp.where(empty, jnp.inf, m * _LN2 + jnp.log(jnp.where(empty, 1.0, l)))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, h, pl.ds(q_start, rows)])
      plgpu.copy_smem_to_gmem(my_lse, lse_ref.at[b, h, pl.ds(q_start, rows)])
      plgpu.wait_smem_to_gmem(0)

    _split_role(wg, compute, lambda: _produce(streams, consumed, hi - lo))

  seg_smem = lambda n: plgpu.SMEM(n, jnp.int32)
  scratch = [
      (_tile_smem((_COMPUTE_WGS, rows, D), dtype),
       plgpu.SMEM((_COMPUTE_WGS, rows), jnp.float32),
       _tile_smem((_SLOTS, bk, D), dtype), _tile_smem((_SLOTS, bk, D), dtype),
       seg_smem((_COMPUTE_WGS, rows)) if segments else None,
       seg_smem((_SLOTS, bk)) if segments else None),
      (plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=_SLOTS),
       plgpu.Barrier(num_barriers=_SLOTS),
       plgpu.Barrier(num_barriers=_COMPUTE_WGS) if segments else None,
       plgpu.Barrier(num_barriers=_SLOTS) if segments else None,
       plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=_SLOTS)),
  ]
  out_type = (jax.ShapeDtypeStruct((B, H, T, D), dtype),
              jax.ShapeDtypeStruct((B, H, T), jnp.float32))
  segs = (q_seg, kv_seg) if segments else ()
  o, lse = _kernel(kernel, out_type, scratch, (H, T // cfg.block_q, B), ("heads", "q", "batch"),
                   cfg, "mosaic_flash_forward")(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, kv_lo, kv_hi,
                                                *segs)
  return o, lse[..., None]


# ---- backward ----------------------------------------------------------------------------

def backward(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxTx1, kv_seg_Bx1xS, o_BxHxTxD,
             lse_BxHxTx1, do_BxHxTxD, cfg: Config):
  """Returns (dq, dk, dv); dk and dv are accumulated per kv head inside the kernel."""
  B, H, T, D = q_BxHxTxD.shape
  K, S = k_BxKxSxD.shape[1:3]
  dtype = q_BxHxTxD.dtype
  segments = q_seg_BxTx1 is not None
  _check(cfg, D, dtype, segments)
  q_seg, kv_seg = _flat_segments(q_seg_BxTx1, kv_seg_Bx1xS)
  # delta_i = sum_d o_id do_id; both row vectors are kept in base 2 for exp2.
  delta = jnp.einsum("bhtd,bhtd->bht", o_BxHxTxD.astype(jnp.float32),
                     do_BxHxTxD.astype(jnp.float32))
  lse2 = lse_BxHxTx1[..., 0].astype(jnp.float32) * _LOG2E
  dq = _dq(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, do_BxHxTxD, lse2, delta, q_seg, kv_seg, cfg)
  dk, dv = _dkdv(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, do_BxHxTxD, lse2, delta, q_seg, kv_seg, cfg)
  return dq, dk, dv


def _dq(q, k, v, do, lse2, delta, q_seg, kv_seg, cfg):
  B, H, T, D = q.shape
  K, S = k.shape[1:3]
  dtype, segments = q.dtype, q_seg is not None
  group, bk, rows = H // K, cfg.block_k_dq, cfg.block_q // _COMPUTE_WGS
  kv_lo, kv_hi = key_ranges(cfg, B, T, S, cfg.block_q, bk, q_seg, kv_seg)
  scale2 = cfg.sm_scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, *rest):
    if segments:
      q_seg_ref, kv_seg_ref, dq_ref, smem, bars = rest
    else:
      (dq_ref, smem, bars), q_seg_ref, kv_seg_ref = rest, None, None
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, qseg_smem, kvseg_smem = smem
    q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, qseg_bar, kvseg_bar, consumed = bars
    h, qi, b = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    lo, hi = lo_ref[b, qi], hi_ref[b, qi]
    streams = _key_streams(b, lax.div(h, jnp.int32(group)), lo, bk, (k_ref, k_smem, k_bar),
                           (v_ref, v_smem, v_bar),
                           (kv_seg_ref, kvseg_smem, kvseg_bar) if segments else None)

    def compute():
      q_start = qi * cfg.block_q + wg * rows
      my = lambda ref: ref.at[wg]
      rows_of = pl.ds(q_start, rows)
      loads = [(q_ref.at[b, h, rows_of], q_smem, q_bar),
               (do_ref.at[b, h, rows_of], do_smem, do_bar),
               (lse_ref.at[b, h, rows_of], lse_smem, lse_bar),
               (delta_ref.at[b, h, rows_of], delta_smem, delta_bar)]
      if segments:
        loads.append((q_seg_ref.at[b, rows_of], qseg_smem, qseg_bar))
      for src, dst, bar in loads:
        plgpu.copy_gmem_to_smem(src, my(dst), my(bar))
      for _, _, bar in loads:
        plgpu.barrier_wait(my(bar))
      lse = _load(lse_smem, wg, 1, cfg.interpret)
      dlt = _load(delta_smem, wg, 1, cfg.interpret)
      q_ids = _load(qseg_smem, wg, 1, cfg.interpret) if segments else None
      n_mine, n_fast = _own_steps(cfg, lo, hi, q_start, rows, bk, segments)

      def step(i, dq_acc, masked):
        slot = lax.rem(i, _SLOTS)
        plgpu.barrier_wait(k_bar.at[slot])
        s = _matmul(my(q_smem), k_smem.at[slot], (rows, bk), cfg.interpret, True) * scale2
        segs = None
        if segments:
          plgpu.barrier_wait(kvseg_bar.at[slot])
          if masked:
            segs = (q_ids, _load(kvseg_smem, slot, 0, cfg.interpret))
        p = jnp.exp2(s - _rows(lse, s.shape))
        mask = _visible(cfg, s.shape, q_start, (lo + i) * bk, True, segs) if masked else None
        if mask is not None:
          p = jnp.where(mask, p, 0.0)
        plgpu.barrier_wait(v_bar.at[slot])
        dp = _matmul(my(do_smem), v_smem.at[slot], (rows, bk), cfg.interpret, True)
        ds = p * (dp - _rows(dlt, dp.shape))
        dq_acc = _mma(dq_acc, ds.astype(dtype), k_smem.at[slot], cfg.interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return dq_acc

      dq_acc = lax.fori_loop(0, n_fast, functools.partial(step, masked=False),
                             _zeros((rows, D), cfg.interpret))
      dq_acc = lax.fori_loop(n_fast, n_mine, functools.partial(step, masked=True), dq_acc)
      _drain(streams, consumed, n_mine, hi - lo)
      my(q_smem)[...] = (dq_acc * cfg.sm_scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my(q_smem), dq_ref.at[b, h, rows_of])
      plgpu.wait_smem_to_gmem(0)

    _split_role(wg, compute, lambda: _produce(streams, consumed, hi - lo))

  per_wg = lambda dt: plgpu.SMEM((_COMPUTE_WGS, rows), dt)
  scratch = [
      (_tile_smem((_COMPUTE_WGS, rows, D), dtype), _tile_smem((_COMPUTE_WGS, rows, D), dtype),
       per_wg(jnp.float32), per_wg(jnp.float32),
       _tile_smem((_SLOTS, bk, D), dtype), _tile_smem((_SLOTS, bk, D), dtype),
       per_wg(jnp.int32) if segments else None,
       plgpu.SMEM((_SLOTS, bk), jnp.int32) if segments else None),
      tuple(plgpu.Barrier(num_barriers=_COMPUTE_WGS) for _ in range(4))
      + (plgpu.Barrier(num_barriers=_SLOTS), plgpu.Barrier(num_barriers=_SLOTS),
         plgpu.Barrier(num_barriers=_COMPUTE_WGS) if segments else None,
         plgpu.Barrier(num_barriers=_SLOTS) if segments else None,
         plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=_SLOTS)),
  ]
  segs = (q_seg, kv_seg) if segments else ()
  return _kernel(kernel, jax.ShapeDtypeStruct(q.shape, dtype), scratch,
                 (H, T // cfg.block_q, B), ("heads", "q", "batch"), cfg, "mosaic_flash_dq",
                 )(q, k, v, do, lse2, delta, kv_lo, kv_hi, *segs)


def _dkdv(q, k, v, do, lse2, delta, q_seg, kv_seg, cfg):
  """One CTA per (kv head, block_k keys); it streams the query tiles of every query head in
  the kv head's group, so dk and dv are summed over the group in float32 registers."""
  B, H, T, D = q.shape
  K, S = k.shape[1:3]
  dtype, segments = q.dtype, q_seg is not None
  group, bq, rows = H // K, cfg.block_q_dkv, cfg.block_k // _COMPUTE_WGS
  q_lo, q_hi = query_ranges(cfg, B, T, S, bq, cfg.block_k, q_seg, kv_seg)
  scale2 = cfg.sm_scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, *rest):
    if segments:
      q_seg_ref, kv_seg_ref, dk_ref, dv_ref, smem, bars = rest
    else:
      (dk_ref, dv_ref, smem, bars), q_seg_ref, kv_seg_ref = rest, None, None
    k_smem, v_smem, kseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem = smem
    k_bar, v_bar, kseg_bar, q_bar, do_bar, lse_bar, delta_bar, qseg_bar, consumed = bars
    kv_h, ki, b = lax.axis_index("heads"), lax.axis_index("k"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    lo, hi = lo_ref[b, ki], hi_ref[b, ki]
    span = hi - lo
    # Step i: query head kv_h * group + i // span, query tile lo + i % span.
    head = lambda i: kv_h * group + lax.div(i, span)
    tile = lambda i: pl.ds((lo + lax.rem(i, span)) * bq, bq)
    streams = [_Stream(q_smem, q_bar, lambda i: q_ref.at[b, head(i), tile(i)]),
               _Stream(do_smem, do_bar, lambda i: do_ref.at[b, head(i), tile(i)]),
               _Stream(lse_smem, lse_bar, lambda i: lse_ref.at[b, head(i), tile(i)]),
               _Stream(delta_smem, delta_bar, lambda i: delta_ref.at[b, head(i), tile(i)])]
    if segments:
      streams.append(_Stream(qseg_smem, qseg_bar, lambda i: q_seg_ref.at[b, tile(i)]))

    def compute():
      k_start = ki * cfg.block_k + wg * rows
      my = lambda ref: ref.at[wg]
      keys_of = pl.ds(k_start, rows)
      loads = [(k_ref.at[b, kv_h, keys_of], k_smem, k_bar),
               (v_ref.at[b, kv_h, keys_of], v_smem, v_bar)]
      if segments:
        loads.append((kv_seg_ref.at[b, keys_of], kseg_smem, kseg_bar))
      for src, dst, bar in loads:
        plgpu.copy_gmem_to_smem(src, my(dst), my(bar))
      for _, _, bar in loads:
        plgpu.barrier_wait(my(bar))
      k_ids = (_load(kseg_smem, wg, 1, cfg.interpret)
               if segments else None)
      # The CTA's query range serves both warpgroups; with causal masking the second one (later
      # keys) also steps through a few query tiles it cannot see, masked to zero.
      shape = (rows, bq)

      def step(t, carry, head, masked):
        dk_acc, dv_acc = carry
        i = head * span + t  # stream step: query tile lo + t of the group's query head `head`
        slot = lax.rem(i, _SLOTS)
        q_start = (lo + t) * bq
        for s_ in streams:
          plgpu.barrier_wait(s_.loaded.at[slot])
        # Transposed tile: rows are this warpgroup's keys, columns the streamed queries.
        sT = _matmul(my(k_smem), q_smem.at[slot], shape, cfg.interpret, True) * scale2
        lse = _load(lse_smem, slot, 0, cfg.interpret)
        pT = jnp.exp2(sT - _cols(lse, shape))
        if masked:
          segs = (k_ids, _load(qseg_smem, slot, 0, cfg.interpret)) if segments else None
          pT = jnp.where(_visible(cfg, shape, k_start, q_start, False, segs), pT, 0.0)
        dv_acc = _mma(dv_acc, pT.astype(dtype), do_smem.at[slot], cfg.interpret)
        dpT = _matmul(my(v_smem), do_smem.at[slot], shape, cfg.interpret, True)
        dlt = _load(delta_smem, slot, 0, cfg.interpret)
        dsT = pT * (dpT - _cols(dlt, shape))
        dk_acc = _mma(dk_acc, dsT.astype(dtype), q_smem.at[slot], cfg.interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk_acc, dv_acc

      # Per query head: tiles holding a query before this warpgroup's last key straddle the
      # diagonal and are masked (causal), the rest unmasked; segment ids mask every tile.
      # Padded keys need no mask: their dk, dv rows are dropped by the wrapper.
      n_diag = 0
      if cfg.causal:
        n_diag = jnp.clip(pl.cdiv(k_start + rows - 1, jnp.int32(bq)) - lo, 0, span)
      if segments:
        n_diag = span

      def head_steps(head, carry):
        if cfg.causal or segments:
          carry = lax.fori_loop(0, n_diag, functools.partial(step, head=head, masked=True),
                                carry)
        return lax.fori_loop(n_diag, span, functools.partial(step, head=head, masked=False),
                             carry)

      zeros = _zeros((rows, D), cfg.interpret)
      dk_acc, dv_acc = lax.fori_loop(0, group, head_steps, (zeros, zeros))
      my(k_smem)[...] = (dk_acc * cfg.sm_scale).astype(dtype)
      my(v_smem)[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my(k_smem), dk_ref.at[b, kv_h, keys_of])
      plgpu.copy_smem_to_gmem(my(v_smem), dv_ref.at[b, kv_h, keys_of])
      plgpu.wait_smem_to_gmem(0)

    _split_role(wg, compute, lambda: _produce(streams, consumed, group * span))

  per_wg = lambda: _tile_smem((_COMPUTE_WGS, rows, D), dtype)
  slots = lambda dt: plgpu.SMEM((_SLOTS, bq), dt)
  scratch = [
      (per_wg(), per_wg(),
       plgpu.SMEM((_COMPUTE_WGS, rows), jnp.int32) if segments else None,
       _tile_smem((_SLOTS, bq, D), dtype), _tile_smem((_SLOTS, bq, D), dtype),
       slots(jnp.float32), slots(jnp.float32), slots(jnp.int32) if segments else None),
      (plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=_COMPUTE_WGS),
       plgpu.Barrier(num_barriers=_COMPUTE_WGS) if segments else None)
      + tuple(plgpu.Barrier(num_barriers=_SLOTS) for _ in range(4))
      + (plgpu.Barrier(num_barriers=_SLOTS) if segments else None,
         plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=_SLOTS)),
  ]
  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  segs = (q_seg, kv_seg) if segments else ()
  return _kernel(kernel, (kv_type, kv_type), scratch, (K, S // cfg.block_k, B),
                 ("heads", "k", "batch"), cfg, "mosaic_flash_dkdv",
                 )(q, k, v, do, lse2, delta, q_lo, q_hi, *segs)


# ---- plumbing ----------------------------------------------------------------------------

def _check(cfg, head_dim, dtype, segments):
  reason = unsupported(cfg, head_dim, dtype, segments)
  if reason:
    raise ValueError(reason)


def _flat_segments(q_seg_BxTx1, kv_seg_Bx1xS):
  if q_seg_BxTx1 is None:
    return None, None
  return q_seg_BxTx1[:, :, 0], kv_seg_Bx1xS[:, 0, :]


def _kernel(body, out_type, scratch, grid, grid_names, cfg, name):
  interpret = None
  if cfg.interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    interpret = InterpretGPUParams()
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=_COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
      kernel_name=name)
