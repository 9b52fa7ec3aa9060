"""Checks shared by the kernel tests, as fixtures so each kernel's test file can use them.

The usual test: `check_vjp(kernel_fn, reference_fn, args)` compares a kernel's outputs
and the gradients with respect to every argument against a plain-JAX reference that
runs in float32 (float64 for float64 inputs), at a tolerance set by the kernel's dtype.
Interpret-mode Pallas fills outputs with NaN before a kernel runs, so an element a
kernel forgets to write fails these comparisons (see `test_interpreter_poisons_outputs`).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Largest error allowed, relative to the largest magnitude in the reference: a few times
# what rounding the inputs and output to the dtype alone costs.
TOLERANCE = {"float64": 1e-12, "float32": 5e-6, "float16": 2e-3, "bfloat16": 1.5e-2}


@pytest.fixture
def key(request):
  """A PRNG key per test case: different across cases, the same on every run."""
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def assert_close():
  """assert_close(actual, expected, dtype, what): finite, and max error / max |expected| <= tol."""

  def check(actual, expected, dtype, what="output"):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: {np.sum(~np.isfinite(actual))} non-finite values"
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    error = np.abs(actual - expected).max(initial=0.0) / scale
    tol = TOLERANCE[jnp.dtype(dtype).name]
    assert error <= tol, f"{what}: relative max error {error:.2e} > {tol:.0e} ({jnp.dtype(dtype)})"

  return check


@pytest.fixture
def check_vjp(assert_close, key):
  """check_vjp(fn, ref, args): fn's output and its gradients wrt every arg match ref's.

  `ref` gets the args upcast to float32 (float64 stays), so low-precision kernels are
  judged against a full-precision answer on identical inputs.
  """

  def check(fn, ref, args):
    dtype = args[0].dtype
    out, fn_vjp = jax.vjp(fn, *args)
    upcast = [a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in args]
    expected, ref_vjp = jax.vjp(ref, *upcast)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert_close(out, expected, dtype)
    cotangent = jax.random.normal(key, out.shape, expected.dtype)
    grads, ref_grads = fn_vjp(cotangent.astype(out.dtype)), ref_vjp(cotangent)
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
      assert grad.dtype == args[i].dtype, f"grad {i} dtype {grad.dtype} != {args[i].dtype}"
      assert_close(grad, ref_grad, dtype, what=f"gradient wrt arg {i}")

  return check
