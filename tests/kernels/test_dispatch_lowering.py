"""`implementation="auto"` against a fake measured table, and the Pallas kernels lowered from
CPU for the targets this machine does not have: Triton (CUDA) and Mosaic TPU."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

import kernels
from kernels.flash_attention import api, bench, dispatch, pallas, reference

H200 = dict(device_kind="NVIDIA H200", compute_capability="9.0")


def _row(causal=True, masked=False, dtype="bfloat16", head_dim=128, **tflops):
  return dict(device_kind="NVIDIA H200", dtype=dtype, head_dim=head_dim, causal=causal,
              masked=masked, tflops=tflops)


def _choose(table, backend="gpu", dtype="bfloat16", head_dim=128, causal=True, masked=False,
            interpret=False, unsupported=None, device=H200):
  return dispatch.choose(backend, **device, dtype=dtype, head_dim=head_dim, causal=causal,
                         masked=masked, interpret=interpret,
                         pallas_unsupported=unsupported or {"pallas": None, "mosaic": None},
                         table=table)


@pytest.mark.parametrize("dtype,head_dim,masked,expected", [
    ("bfloat16", 128, False, "cudnn"),
    ("float16", 64, False, "cudnn"),
    ("float32", 128, False, "xla"),  # cuDNN flash attention has no float32
    ("bfloat16", 96, False, "cudnn"),
    ("bfloat16", 100, False, "xla"),  # not a multiple of 8
    ("bfloat16", 256, False, "cudnn"),  # Hopper takes up to 256
    ("bfloat16", 128, True, "xla"),  # segment ids would be a dense bias on cuDNN
])
def test_gpu_never_gets_pallas_without_a_measurement(dtype, head_dim, masked, expected):
  assert _choose([], dtype=dtype, head_dim=head_dim, masked=masked) == expected


def test_head_dim_256_is_not_cudnn_before_hopper():
  a100 = dict(device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
  assert _choose([], head_dim=256, device=a100) == "xla"
  assert _choose([], head_dim=128, device=a100) == "cudnn"


def test_pallas_only_where_the_table_says_it_is_faster():
  table = [_row(causal=True, pallas=500.0, mosaic=650.0, cudnn=600.0, xla=100.0),
           _row(causal=False, pallas=400.0, mosaic=590.0, cudnn=600.0, xla=100.0),
           _row(masked=True, pallas=300.0, cudnn=50.0, xla=120.0),
           _row(dtype="float32", pallas=90.0, xla=100.0)]
  assert _choose(table, causal=True) == "mosaic"  # the fastest, and faster than cuDNN
  assert _choose(table, causal=False) == "cudnn"  # both kernels slower than cuDNN
  assert _choose(table, masked=True) == "pallas"  # baseline XLA there, not the faster cuDNN
  assert _choose(table, dtype="float32") == "xla"
  # A measured-faster kernel that cannot take these shapes is skipped.
  assert _choose(table, unsupported={"pallas": None, "mosaic": "needs sm_90"}) == "cudnn"
  # Rows are per device kind, dtype and head_dim.
  assert _choose(table, head_dim=64) == "cudnn"
  assert _choose(table, device=dict(device_kind="NVIDIA H100 80GB HBM3",
                                    compute_capability="9.0")) == "cudnn"
  # Without the baseline's own figure there is nothing to compare against.
  assert _choose([_row(pallas=900.0, xla=1.0)]) == "cudnn"


def test_tpu_and_cpu_rules():
  table = [_row(pallas=1.0, cudnn=2.0)]
  assert _choose(table, backend="tpu") == "pallas"
  assert _choose(table, backend="tpu", unsupported={"pallas": "seq_k too long"}) == "xla"
  assert _choose(table, backend="cpu") == "xla"
  assert _choose(table, backend="cpu", interpret=True) == "xla"
  assert _choose(table, backend="gpu", interpret=True) == "xla"


def test_shipped_table_has_no_rows():
  """Only a device run fills it (`bench --record`); an empty table means cuDNN/XLA on GPU."""
  assert json.loads(dispatch.TABLE.read_text())["rows"] == []


def test_record_writes_rows_that_choose_reads(tmp_path):
  path = tmp_path / "measured.json"
  common = dict(mode="fwd+bwd", status="ok", dtype="bfloat16", head_dim=128, causal=True,
                batch=2, heads=16)
  rows = [dict(common, impl="pallas", seq=8192, tflops=700.0),
          dict(common, impl="cudnn", seq=8192, tflops=600.0),
          dict(common, impl="pallas", seq=1024, tflops=1.0),  # shorter: not the recorded one
          dict(common, impl="xla", seq=8192, status="OOM"),
          dict(common, impl="cudnn", seq=8192, tflops=9e9, mode="fwd")]
  dispatch.record(rows, "NVIDIA H200", "0.11.2", "test", path)
  dispatch.record(rows, "NVIDIA H200", "0.11.2", "test", path)  # replaces, does not duplicate
  (row,) = dispatch.load_table(path)
  assert row["tflops"] == {"pallas": 700.0, "cudnn": 600.0} and row["seq"] == 8192
  assert _choose(dispatch.load_table(path)) == "pallas"


def test_bench_refuses_to_record_on_cpu(tmp_path):
  with pytest.raises(SystemExit, match="only from a GPU or TPU"):
    bench.main(["--tiny", "--record", "--out", str(tmp_path)])


def test_auto_in_the_api_follows_the_rule_on_a_mocked_gpu(monkeypatch):
  """The wiring: flash_attention asks `dispatch.choose` with this device and call, and runs
  what it says (the implementations themselves are spies: there is no GPU here)."""
  ran = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(**H200)])
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, *a, implementation, **kw: ran.append(implementation) or q)
  monkeypatch.setattr(api, "_pallas_attention",
                      lambda q, *a, target, **kw: ran.append(f"pallas:{target}") or q)
  table = [_row(head_dim=64, causal=True, pallas=2.0, cudnn=1.0)]
  monkeypatch.setattr(dispatch, "load_table", lambda path=None: table)
  q = jnp.zeros((1, 32, 2, 64), jnp.bfloat16)
  ids = jnp.zeros((1, 32), jnp.int32)
  for causal, segment_ids, dtype in [(True, None, jnp.bfloat16), (False, None, jnp.bfloat16),
                                     (True, ids, jnp.bfloat16), (True, None, jnp.float32)]:
    x = q.astype(dtype)
    kernels.flash_attention(x, x, x, causal=causal, segment_ids=segment_ids, interpret=False)
  assert ran == ["pallas:gpu", "cudnn", "xla", "xla"]
  monkeypatch.setattr(dispatch, "load_table", lambda path=None: [])
  kernels.flash_attention(q, q, q, causal=True, interpret=False)
  assert ran[-1] == "cudnn"
  # The Hopper kernel, where it is measured fastest.
  table = [_row(head_dim=64, causal=True, pallas=2.0, mosaic=3.0, cudnn=1.0)]
  monkeypatch.setattr(dispatch, "load_table", lambda path=None: table)
  kernels.flash_attention(q, q, q, causal=True, interpret=False)
  assert ran[-1] == "pallas:mosaic"


# (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, segment ids)
LOWERING_SHAPES = {
    "gqa-causal-segments-ragged": (2, 1000, 1000, 4, 2, 128, True, True),
    "mha-full": (1, 256, 256, 2, 2, 64, False, False),
    "mqa-causal-short-q": (1, 384, 640, 4, 1, 128, True, False),
}
TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


def _lowered(target, platform, shape, grad, context):
  batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, with_segments = shape
  q = jax.ShapeDtypeStruct((batch, seq_q, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq_k, kv_heads, head_dim), jnp.bfloat16)
  ids = ((jax.ShapeDtypeStruct((batch, seq_q), jnp.int32),
          jax.ShapeDtypeStruct((batch, seq_k), jnp.int32)) if with_segments else (None, None))

  def out(q, k, v, ids):
    return api._pallas_attention(q, k, v, *ids, causal=causal, sm_scale=None, block_q=None,
                                 block_k=None, target=target)

  fn = (jax.grad(lambda *a: out(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        if grad else out)
  with context:
    return jax.jit(fn).trace(q, kv, kv, ids).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("shape", LOWERING_SHAPES.values(), ids=LOWERING_SHAPES.keys())
def test_kernels_lower_for_cuda_through_triton(shape, grad):
  """Pallas' Triton lowering (not Triton's compiler): catches API misuse and unsupported
  ops in the kernel bodies without a GPU."""
  hlo = _lowered("gpu", "cuda", shape, grad, contextlib.nullcontext())
  assert hlo.count("xla.gpu.triton") == (3 if grad else 1)  # forward; + dq, dk/dv


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("shape", LOWERING_SHAPES.values(), ids=LOWERING_SHAPES.keys())
def test_kernels_lower_for_tpu_through_mosaic(shape, grad):
  """An abstract TPU device (jax.sharding.AbstractDevice) gives Mosaic TPU the chip it asks
  for, so the kernels lower to Mosaic from CPU."""
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=TPU)
  hlo = _lowered("tpu", "tpu", shape, grad, use_abstract_mesh(mesh))
  assert hlo.count("tpu_custom_call") == (3 if grad else 1)
  names = {"flash_attention_forward", "flash_attention_dq", "flash_attention_dkdv"}
  assert {n for n in names if n in hlo} == (names if grad else {"flash_attention_forward"})


def _loop_bodies(jaxpr):
  """The body jaxprs of a kernel's top-level loops (while, or scan for static bounds)."""
  return [eqn.params["body_jaxpr" if eqn.primitive.name == "while" else "jaxpr"].jaxpr
          for eqn in jaxpr.eqns if eqn.primitive.name in ("while", "scan")]


def _primitives(jaxpr) -> set[str]:
  """Every primitive in a jaxpr, nested jaxprs (pjit, cond, loops) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner)
  return names


MASK_OPS = {"iota", "select_n"}


@pytest.mark.parametrize("causal,seq_k", [(True, 256), (False, 200)], ids=["causal", "ragged"])
def test_unmasked_key_blocks_build_no_mask(causal, seq_k):
  """Each kernel splits its loop: tiles that need no causal or padding mask (causal tiles
  wholly below the diagonal; tiles with no padded key) run in a loop with no iota or select,
  and only the rest build a mask. (dk/dv without causal has one loop: whether its key tile
  holds padding depends on the program.)"""
  tiles = pallas.default_tiles("gpu", 64)
  cfg = pallas.Config(sm_scale=0.125, causal=causal, seq_k=seq_k, target="gpu", **tiles)
  q = jnp.zeros((1, 1, 256, 64), jnp.bfloat16)
  lse = jnp.zeros((1, 1, 256, 1), jnp.float32)
  fwd = jax.make_jaxpr(lambda q: pallas.forward(q, q, q, None, None, cfg))(q)
  bwd = jax.make_jaxpr(lambda q, lse: pallas.backward(q, q, q, None, None, q, lse, q, cfg))(
      q, lse)
  kernel_jaxprs = [e.params["jaxpr"] for j in (fwd, bwd) for e in j.jaxpr.eqns
                   if e.primitive.name == "pallas_call"]
  assert len(kernel_jaxprs) == 3
  for name, kernel in zip(("forward", "dq", "dkdv"), kernel_jaxprs):
    masks = [bool(MASK_OPS & _primitives(body)) for body in _loop_bodies(kernel)]
    if name == "dkdv":  # diagonal query tiles first, then those wholly after the key tile
      assert masks == ([True, False] if causal else [True]), name
    else:
      assert masks == [False, True], name


def test_exp2_softmax_keeps_the_natural_log_lse(key):
  """The residual contract: lse = log sum exp(s * sm_scale) in natural log, as the reference
  has it, though the kernel works in base 2."""
  with jax.enable_x64(True):
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (1, 40, 2, 16), jnp.float64)
    k = jax.random.normal(kk, (1, 40, 2, 16), jnp.float64)
    tiles = {n: pallas.Tiles(16, 16) for n in ("fwd", "dq", "dkdv")}
    cfg = pallas.Config(sm_scale=0.3, causal=True, seq_k=40, target="interpret", **tiles)
    pad = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, 8), (0, 0)))
    _, lse = pallas.forward(pad(q), pad(k), pad(k), None, None, cfg)
    _, expected = reference.attention(q, k, k, causal=True, sm_scale=0.3)
    np.testing.assert_allclose(lse[:, :, :40, 0], expected, rtol=1e-12)


# What the lent accelerator image lacks (issue 16): the entry points must not import them.
MISSING_ON_DEVICE = ("ml_collections", "tensorflow_datasets", "tensorboardX", "grain")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _blocking_env(tmp_path) -> dict:
  """Environment for a subprocess in which importing any of MISSING_ON_DEVICE fails."""
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(
      "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in MISSING_ON_DEVICE))
  return dict(os.environ, PYTHONPATH=f"{shim}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu")


def test_device_entry_points_import_nothing_the_device_lacks(tmp_path):
  env = _blocking_env(tmp_path)
  blocked = subprocess.run([sys.executable, "-c", "import ml_collections"], env=env,
                           capture_output=True, text=True)
  assert "halted; None in sys.modules" in blocked.stderr  # the shim works
  run = subprocess.run(
      [sys.executable, "-c", "import kernels.flash_attention.bench, benchmarks.mfu; "
       "import sys; sys.exit(benchmarks.mfu.main(['--size', 'tiny', '--batch', '8', "
       f"'--steps', '1', '--dtype', 'float32', '--out', {str(tmp_path / 'mfu')!r}]))"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_on_cpu(tmp_path):
  """benchmarks/gpu_check.sh --dry-run: every stage at tiny sizes (interpret mode), with the
  modules the device lacks blocked; any stage that errs or times out fails this."""
  out = tmp_path / "out"
  env = dict(_blocking_env(tmp_path), OUT=str(out), PY=sys.executable)
  run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  stages = {r["stage"]: r["status"] for r in rows if "status" in r and "impl" not in r}
  expected = {"env", "smoke", "headline", "tiles", "check", "mfu", "trace"}
  assert set(stages) == expected, stages
  assert run.returncode == 0, (stages, run.stdout[-3000:])
  assert all(state == "ok" for state in stages.values()), stages  # tiles (mosaic) included
  assert {r.get("impl") for r in rows if r["stage"] == "smoke"} >= {"pallas"}
  assert any(r["stage"] == "headline" and r.get("status") == "ok" and "error" in r for r in rows)
  assert any(r["stage"] == "mfu" and r.get("tokens_per_second") for r in rows)
  assert list((out / "trace").rglob("*.xplane.pb")), "no profiler trace written"
  assert not (out / "measured.json").exists()  # a dry run records nothing
