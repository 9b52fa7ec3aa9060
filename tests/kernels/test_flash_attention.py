"""Pallas flash attention (interpret mode on CPU) against the plain-JAX reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import kernels
from kernels.flash_attention import api, bench, reference

# Small blocks give several q and kv blocks (and a ragged last one) at tiny lengths.
BLOCKS = dict(block_q=16, block_k=16)


def _inputs(key, batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (batch, seq_q, heads, head_dim), dtype),
          jax.random.normal(kk, (batch, seq_k, kv_heads, head_dim), dtype),
          jax.random.normal(kv, (batch, seq_k, kv_heads, head_dim), dtype))


def _segments(key, batch, seq_q, seq_k, kind):
  """None; one [B, T] array; or a (q, kv) pair where q id 3 has no key (empty rows)."""
  if kind is None:
    return None
  kq, kk = jax.random.split(key)
  q_ids = jnp.sort(jax.random.randint(kq, (batch, seq_q), 0, 3), axis=1)
  if kind == "single":
    return q_ids
  kv_ids = jnp.sort(jax.random.randint(kk, (batch, seq_k), 0, 3), axis=1)
  return q_ids.at[:, -3:].set(3), kv_ids


def _check(check_vjp, key, shape, dtype, causal, segment_kind):
  batch, seq_q, seq_k, heads, kv_heads, head_dim = shape
  args = _inputs(key, batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
  segment_ids = _segments(jax.random.fold_in(key, 1), batch, seq_q, seq_k, segment_kind)
  common = dict(causal=causal, segment_ids=segment_ids)
  check_vjp(functools.partial(kernels.flash_attention, implementation="pallas", **BLOCKS, **common),
            lambda *a: reference.attention(*a, **common)[0], args)


# name: (batch, seq_q, seq_k, heads, kv_heads, head_dim), segment ids
SHAPES = {
    "mha": ((1, 64, 64, 2, 2, 32), None),  # whole blocks
    "gqa-ragged-packed": ((2, 40, 40, 4, 2, 64), "single"),  # ragged last block
    "mqa-short-q": ((2, 24, 56, 4, 1, 32), None),  # seq_q < seq_k, both ragged
    "long-q-empty-rows": ((1, 72, 40, 3, 3, 128), "pair"),  # odd heads, rows with no key
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,segment_kind", SHAPES.values(), ids=SHAPES.keys())
def test_matches_float64_reference(check_vjp, key, shape, segment_kind, causal):
  with jax.enable_x64(True):
    _check(check_vjp, key, shape, jnp.float64, causal, segment_kind)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_matches_reference_in_low_precision(check_vjp, key, dtype):
  _check(check_vjp, key, (2, 48, 48, 4, 2, 64), jnp.dtype(dtype), True, "single")


def test_rows_without_keys_are_zero_with_zero_gradient(key):
  q, k, v = _inputs(key, 1, 32, 32, 2, 1, 32, jnp.float32)
  ids = jnp.zeros((1, 32), jnp.int32)
  segment_ids = (ids.at[:, 20:].set(1), ids)  # queries 20.. match no key

  def loss(q, k, v):
    out = kernels.flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                  implementation="pallas", **BLOCKS)
    return jnp.sum(out ** 2), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_array_equal(out[:, 20:], 0.0)
  np.testing.assert_array_equal(grads[0][:, 20:], 0.0)
  for g in grads:
    assert np.isfinite(g).all()


@pytest.mark.parametrize("backend,head_dim,seq,dtype,reason", [
    ("gpu", 128, 4096, "bfloat16", None),
    ("gpu", 96, 4096, "bfloat16", "head_dim=96 must be a power of two"),
    ("tpu", 128, 4096, "float32", None),
    ("tpu", 128, 4096, "float16", "dtype float16 is not compiled on tpu"),
    ("tpu", 128, 16384, "bfloat16", "seq_k=16384 is too long"),
    ("cpu", 128, 4096, "float32", "Pallas compiles only for GPU and TPU"),
])
def test_where_compiled_pallas_is_supported(backend, head_dim, seq, dtype, reason):
  q = jax.ShapeDtypeStruct((1, seq, 4, head_dim), jnp.dtype(dtype))
  unsupported = api._pallas_unsupported(backend, False, q, q, None, None)  # default tiles
  if reason is None:
    assert unsupported is None
  else:
    assert reason in unsupported


def test_kernels_lower_to_triton_without_a_gpu():
  """Cross-platform lowering runs Pallas' Triton lowering (not Triton's compiler) on CPU."""
  q = jax.ShapeDtypeStruct((2, 1000, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

  def loss(q, k, v, ids):
    out = api._pallas_attention(q, k, v, ids, ids, causal=True, sm_scale=None, block_q=128,
                                block_k=64, target="gpu")
    return out.astype(jnp.float32).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  hlo = grads.trace(q, kv, kv, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_interpreter_poisons_outputs():
  """The no-NaN checks above catch unwritten output only because of this behaviour."""

  def write_first_half(x_ref, o_ref):
    o_ref[:4] = x_ref[:4]

  out = pl.pallas_call(write_first_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                       interpret=True)(jnp.ones(8, jnp.float32))
  assert np.isnan(out[4:]).all() and (out[:4] == 1).all()


def test_implementations_agree(key):
  q, k, v = _inputs(key, 2, 40, 40, 4, 2, 32, jnp.float32)
  segment_ids = _segments(key, 2, 40, 40, "single")
  outs = {impl: kernels.flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                        implementation=impl, **BLOCKS)
          for impl in ("pallas", "xla", "auto")}
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=2e-5)
  np.testing.assert_array_equal(outs["auto"], outs["xla"])  # auto takes XLA on CPU


@pytest.mark.parametrize("change,message", [
    (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))), "kv_heads=3 must divide heads=4"),
    (dict(q=jnp.zeros((8, 4, 16))), r"must be \[batch, seq, heads, head_dim\]"),
    (dict(v=jnp.zeros((2, 8, 2, 32))), "k and v must be"),
    (dict(implementation="triton"), "unknown implementation 'triton'"),
    (dict(block_q=24), "block_q=24 must be a power of two"),
    (dict(segment_ids=jnp.zeros((2, 9), jnp.int32)), r"segment ids must be \[batch, seq\]"),
    (dict(k=jnp.zeros((2, 9, 2, 16)), v=jnp.zeros((2, 9, 2, 16)),
          segment_ids=jnp.zeros((2, 8), jnp.int32)), "a single segment_ids array needs seq_q == seq_k"),
])
def test_bad_inputs_raise_clear_errors(change, message):
  args = dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 2, 16)), v=jnp.zeros((2, 8, 2, 16)))
  args.update(change)
  with pytest.raises(ValueError, match=message):
    kernels.flash_attention(**args)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what CPU cannot run")
@pytest.mark.parametrize("change,message", [
    (dict(implementation="cudnn"), "needs an NVIDIA GPU"),
    (dict(implementation="pallas", interpret=False), "Pallas compiles only for GPU and TPU"),
])
def test_unavailable_implementations_raise_on_cpu(change, message):
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match=message):
    kernels.flash_attention(q, q, q, **change)


def test_bench_harness_end_to_end(tmp_path):
  assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
  (md,) = tmp_path.glob("*.md")
  table = md.read_text()
  assert "| pallas |" in table and "| xla |" in table
  assert len(list(tmp_path.glob("*.json"))) == len(list(tmp_path.glob("*.png"))) == 1


# (block_q, block_k), (batch, seq_q, seq_k, heads, kv_heads, head_dim): unequal tiles, T != S
# both ways, ragged last blocks, so the causal bounds that mix block_q and block_k (the key
# blocks a query block visits, the first query block a key block sees) cut through tiles.
UNEQUAL_BLOCKS = {
    "16x32-short-q": ((16, 32), (1, 40, 72, 2, 1, 16)),
    "32x16-long-q": ((32, 16), (1, 72, 40, 2, 2, 16)),
    "64x16-long-q": ((64, 16), (1, 80, 56, 2, 1, 16)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("blocks,shape", UNEQUAL_BLOCKS.values(), ids=UNEQUAL_BLOCKS.keys())
def test_unequal_blocks_and_custom_scale_match_float64_reference(check_vjp, key, blocks, shape,
                                                                  causal):
  batch, seq_q, seq_k, heads, kv_heads, head_dim = shape
  common = dict(causal=causal, sm_scale=0.3)  # not 1/sqrt(16): a dropped sm_scale shows
  with jax.enable_x64(True):
    args = _inputs(key, batch, seq_q, seq_k, heads, kv_heads, head_dim, jnp.float64)
    check_vjp(functools.partial(kernels.flash_attention, implementation="pallas",
                                block_q=blocks[0], block_k=blocks[1], **common),
              lambda *a: reference.attention(*a, **common)[0], args)


def _failing_flash_attention(*args, **kwargs):
  raise RuntimeError("injected failure")


def test_bench_check_exits_nonzero_when_the_kernel_fails(monkeypatch, capsys):
  monkeypatch.setattr(bench.api, "flash_attention", _failing_flash_attention)
  assert bench.main(["--check"]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_bench_exits_nonzero_when_an_implementation_fails(tmp_path, monkeypatch):
  real = bench.attention_fn
  monkeypatch.setattr(bench, "attention_fn", lambda impl, causal, blocks, segment_ids: (
      _failing_flash_attention if impl == "xla" else real(impl, causal, blocks, segment_ids)))
  assert bench.main(["--tiny", "--impls", "pallas", "xla", "--out", str(tmp_path)]) == 1
  (md,) = tmp_path.glob("*.md")  # the table is still written, with the failure in it
  assert "| xla | fwd | True | 32 | 64 | 2 |  |  |  |  | failed: RuntimeError: injected failure |" \
      in md.read_text()
