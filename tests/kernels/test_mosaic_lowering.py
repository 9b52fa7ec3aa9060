"""The Hopper Mosaic GPU kernels without a GPU: lowering for CUDA, validation, block ranges,
and (slow) numerics through jax's GPU interpreter."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.flash_attention import mosaic, reference

_CALL = re.compile(r"stablehlo\.custom_call @mosaic_gpu")


@pytest.fixture
def fake_gpu(monkeypatch):
  """`flash_attention` sees a GPU backend, so implementation='mosaic' compiles (not
  interprets) and can be lowered for CUDA from this CPU machine."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _lower_grad(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal, segments,
                **blocks):
  q = jax.ShapeDtypeStruct((batch, seq_q, heads, head_dim), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((batch, seq_k, kv_heads, head_dim), jnp.dtype(dtype))
  ids = (jax.ShapeDtypeStruct((batch, seq_q), jnp.int32),
         jax.ShapeDtypeStruct((batch, seq_k), jnp.int32))

  def loss(q, k, v, q_ids, kv_ids):
    out = kernels.flash_attention(q, k, v, causal=causal, implementation="mosaic",
                                  segment_ids=(q_ids, kv_ids) if segments else None, **blocks)
    return out.astype(jnp.float32).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grads.trace(q, kv, kv, *ids).lower(lowering_platforms=("cuda",)).as_text()


# (batch, seq_q, seq_k, heads, kv_heads, head_dim), dtype, causal, segments
LOWERINGS = {
    "mha-d128-bf16": ((1, 256, 256, 2, 2, 128), "bfloat16", False, False),
    "gqa-causal-ragged-d64-f16": ((2, 200, 200, 4, 2, 64), "float16", True, False),
    "mqa-segments-d128-f16": ((1, 300, 130, 4, 1, 128), "float16", False, True),
    "gqa-causal-segments-short-q-d64-bf16": ((1, 90, 520, 4, 2, 64), "bfloat16", True, True),
}


@pytest.mark.parametrize("shape,dtype,causal,segments", LOWERINGS.values(),
                         ids=LOWERINGS.keys())
def test_forward_and_gradients_lower_to_mosaic_gpu(fake_gpu, shape, dtype, causal, segments):
  hlo = _lower_grad(*shape, dtype, causal, segments)
  assert len(_CALL.findall(hlo)) == 3  # forward, dq, dk/dv
  assert "xla.gpu.triton" not in hlo


def test_bigger_tiles_lower(fake_gpu):
  hlo = _lower_grad(1, 512, 512, 2, 1, 64, "bfloat16", True, False, block_q=256, block_k=256)
  assert len(_CALL.findall(hlo)) == 3


@pytest.mark.parametrize("change,message", [
    # two ring slots of k and v tiles of 256 x 128 bf16 alone are 256 KiB
    (dict(block_k=256), "the forward kernel needs .* bytes of shared memory"),
    (dict(block_q=64), "block_q=64 must be a multiple of 128"),
    (dict(head_dim=96), "head_dim=96 is not supported"),
    (dict(dtype="float32"), "dtype float32 is not supported"),
])
def test_unsupported_configs_are_rejected_before_lowering(fake_gpu, change, message):
  args = dict(head_dim=128, dtype="bfloat16")
  args.update(change)
  blocks = {k: v for k, v in change.items() if k.startswith("block")}
  with pytest.raises(ValueError, match="implementation='mosaic' is unsupported here: " + message):
    _lower_grad(1, 256, 256, 2, 2, args["head_dim"], args["dtype"], False, False, **blocks)


def test_smem_footprint_of_the_defaults_fits():
  cfg = mosaic.Config(sm_scale=1.0, causal=True, block_q=128, block_k=128, seq_k=4096)
  used = mosaic.smem_bytes(cfg, 128, 2, segments=True)
  assert max(used.values()) <= mosaic.SMEM_LIMIT_BYTES
  big = mosaic.Config(sm_scale=1.0, causal=True, block_q=128, block_k=256, seq_k=4096)
  assert mosaic.smem_bytes(big, 128, 2, segments=False)["forward"] > mosaic.SMEM_LIMIT_BYTES


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what CPU cannot run")
def test_compiled_mosaic_needs_a_hopper_gpu():
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
    kernels.flash_attention(q, q, q, implementation="mosaic", interpret=False)


def _block_visibility(mask_BxTxS, block_q, block_k):
  B, T, S = mask_BxTxS.shape
  return mask_BxTxS.reshape(B, T // block_q, block_q, S // block_k, block_k).any(axis=(2, 4))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("segments", [None, "sorted", "unsorted"])
@pytest.mark.parametrize("block_q,block_k", [(128, 128), (64, 128), (128, 64)])
def test_block_ranges_match_reference_mask(causal, segments, block_q, block_k):
  """Each query block's key range (and each key block's query range) is exactly the span from
  the first to the last block holding a visible (query, real key) pair."""
  B, T, S, seq_k = 2, 384, 512, 450  # keys 450.. are padding
  rng = np.random.default_rng(0)
  q_seg = kv_seg = None
  if segments:
    q_seg = rng.integers(0, 4, (B, T))
    kv_seg = rng.integers(0, 4, (B, S))
    if segments == "sorted":
      q_seg, kv_seg = np.sort(q_seg, axis=1), np.sort(kv_seg, axis=1)
    q_seg[:, -70:] = 9  # the last queries see no key: an empty range
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
  mask = reference.visible_mask(T, S, causal=causal, q_seg_BxT=q_seg, kv_seg_BxS=kv_seg)
  mask = np.broadcast_to(True if mask is None else np.asarray(mask)[:, 0], (B, T, S)).copy()
  mask[:, :, seq_k:] = False
  cfg = mosaic.Config(sm_scale=1.0, causal=causal, block_q=128, block_k=128, seq_k=seq_k)
  visible = _block_visibility(mask, block_q, block_k)
  for axis, ranges in ((2, mosaic.key_ranges), (1, mosaic.query_ranges)):
    lo, hi = map(np.asarray, ranges(cfg, B, T, S, block_q, block_k, q_seg, kv_seg))
    v = np.moveaxis(visible, 3 - axis, 1)  # [B, blocks that own a range, blocks in it]
    n = v.shape[2]
    any_ = v.any(axis=2)
    expect_lo = np.where(any_, v.argmax(axis=2), 0)
    expect_hi = np.where(any_, n - v[:, :, ::-1].argmax(axis=2), 0)
    np.testing.assert_array_equal(lo, expect_lo)
    np.testing.assert_array_equal(hi, expect_hi)


def test_segment_ranges_skip_blocks():
  """Packed sequences: a query block's range covers only its own documents' key blocks."""
  ids = jnp.repeat(jnp.arange(4), 256)[None]  # four documents of 256 tokens
  cfg = mosaic.Config(sm_scale=1.0, causal=False, block_q=128, block_k=128, seq_k=1024)
  lo, hi = mosaic.key_ranges(cfg, 1, 1024, 1024, 128, 128, ids, ids)
  np.testing.assert_array_equal(lo[0], [0, 0, 2, 2, 4, 4, 6, 6])
  np.testing.assert_array_equal(hi[0], [2, 2, 4, 4, 6, 6, 8, 8])


@pytest.mark.slow
@pytest.mark.parametrize("segments", [True, False], ids=["segments", "no-segments"])
def test_interpreted_kernels_match_reference(check_vjp, key, segments):
  """The kernels themselves (barriers, TMA ring, ranges, masks) run in jax's GPU interpreter
  on CPU: causal, GQA, ragged lengths; with segment ids (rows that see no key; every tile
  masked) and without (unmasked tiles below the diagonal, masked ones on it)."""
  kq, kk, kv, ks = jax.random.split(key, 4)
  dtype = jnp.bfloat16  # about a minute each on 2 cores; float16 takes as long
  q = jax.random.normal(kq, (1, 100, 2, 64), dtype)
  k = jax.random.normal(kk, (1, 136, 1, 64), dtype)
  v = jax.random.normal(kv, (1, 136, 1, 64), dtype)
  segment_ids = None
  if segments:
    k1, k2 = jax.random.split(ks)
    q_ids = jnp.sort(jax.random.randint(k1, (1, 100), 0, 3), axis=1).at[:, -3:].set(7)
    kv_ids = jnp.sort(jax.random.randint(k2, (1, 136), 0, 3), axis=1)
    segment_ids = (q_ids, kv_ids)
  common = dict(causal=True, segment_ids=segment_ids)
  check_vjp(functools.partial(kernels.flash_attention, implementation="mosaic", **common),
            lambda *a: reference.attention(*a, **common)[0], (q, k, v))


@pytest.mark.slow
def test_interpreted_forward_keeps_the_lse_contract(key):
  """Residuals as `pallas.forward` gives them: o in the input dtype, lse [B, H, T, 1] float32 in
  natural log, +inf for rows that see no key; here with padded keys (seq_k < S)."""
  B, H, K, T, S, D, seq_k = 1, 2, 1, 128, 256, 64, 200
  kq, kk, kv, ks = jax.random.split(key, 4)
  q = jax.random.normal(kq, (B, H, T, D), jnp.bfloat16)
  k = jax.random.normal(kk, (B, K, S, D), jnp.bfloat16)
  v = jax.random.normal(kv, (B, K, S, D), jnp.bfloat16)
  q_ids = jnp.sort(jax.random.randint(ks, (B, T), 0, 2), axis=1).at[:, -5:].set(7)
  kv_ids = jnp.sort(jax.random.randint(ks, (B, S), 0, 2), axis=1)
  cfg = mosaic.Config(sm_scale=0.2, causal=False, block_q=128, block_k=128, seq_k=seq_k,
                      interpret=True)
  o, lse = mosaic.forward(q, k, v, q_ids[:, :, None], kv_ids[:, None, :], cfg)
  assert o.dtype == q.dtype and lse.shape == (B, H, T, 1) and lse.dtype == jnp.float32
  token_major = lambda x: jnp.swapaxes(x, 1, 2)
  _, ref_lse = reference.probabilities(token_major(q), token_major(k[:, :, :seq_k]),
                                       segment_ids=(q_ids, kv_ids[:, :seq_k]), sm_scale=0.2)
  lse, ref_lse = np.asarray(lse[..., 0]), np.asarray(ref_lse)
  assert np.isposinf(lse[:, :, -5:]).all()
  np.testing.assert_allclose(lse[:, :, :-5], ref_lse[:, :, :-5], atol=1e-4)
