"""The sharded train step drops a non-finite update bit for bit: a NaN loss with finite
gradients, and a finite loss whose gradients are NaN (through a `custom_vjp`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import sharding
from research.train import optim
from research.train.step import init_state, make_train_step

CLEAN, NAN_LOSS, NAN_GRADS = 0.0, 1.0, 2.0


@jax.custom_vjp
def nan_gradient_if(x, flag):
  """The identity on `x`; its backward pass returns NaN where `flag` is set."""
  return x


def _fwd(x, flag):
  return x, flag


def _bwd(flag, g):
  return jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)


nan_gradient_if.defvjp(_fwd, _bwd)


class Net(nnx.Module):
  """Big enough for FSDP to shard its first kernel; BatchNorm gives it non-parameter state."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(16, 256, rngs=rngs)
    self.bn = nnx.BatchNorm(256, rngs=rngs)
    self.out = nnx.Linear(256, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.bn(self.lin(x), use_running_average=False)))[:, 0]


def loss_fn(model, batch, rngs):
  mode = batch["mode"].max()
  pred = nan_gradient_if(model(batch["x"]), (mode == NAN_GRADS).astype(jnp.float32))
  loss = jnp.mean((pred - batch["y"]) ** 2)
  assert loss.dtype == jnp.float32
  # A NaN added to the loss alone: its gradient stays finite.
  loss = loss + jnp.where(mode == NAN_LOSS, jnp.nan, 0.0)
  return loss, {"loss": loss}


def host_bytes(state):
  """Every array of the state as raw bytes: equal means bit-identical."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state))]


@pytest.mark.parametrize("parallelism", ["dp", "fsdp"])
def test_nonfinite_loss_or_gradients_leave_the_state_bit_identical(parallelism):
  config = config_lib.base()
  config.update(warmup_steps=0, learning_rate=1e-2)
  tx = optim.make_optimizer(config)
  graphdef, state = init_state(Net(nnx.Rngs(0)), tx)
  assert jax.tree.leaves(state.rest)  # BatchNorm's running statistics
  mesh = sharding.make_mesh(jax.devices())
  shardings = sharding.state_shardings(state, mesh, parallelism)
  if parallelism == "fsdp":
    assert shardings.params["lin"]["kernel"].spec == jax.sharding.PartitionSpec(None, sharding.DATA)
  state = jax.device_put(state, shardings)
  step = make_train_step(graphdef, loss_fn, tx, mesh=mesh, state_sharding=shardings,
                         parallelism=parallelism, seed=0)
  rng = np.random.default_rng(0)

  def batch(mode):
    return sharding.global_batch({"x": rng.normal(size=(16, 16)).astype(np.float32),
                                  "y": rng.normal(size=16).astype(np.float32),
                                  "mode": np.full(16, mode, np.float32)}, mesh)

  def run(state, mode):
    before = host_bytes((state.params, state.rest, state.opt_state))
    state, metrics = step(state, batch(mode))
    after = host_bytes((state.params, state.rest, state.opt_state))
    return state, metrics, before, after

  state, metrics, before, after = run(state, CLEAN)  # a real update, so "unchanged" means something
  assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 0
  assert sum(a != b for a, b in zip(before, after)) == len(before)  # params, stats and moments

  state, metrics, before, after = run(state, NAN_LOSS)
  assert np.isnan(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert after == before
  assert (int(state.step), int(state.skipped), int(state.first_nonfinite)) == (2, 1, 2)

  state, metrics, before, after = run(state, NAN_GRADS)
  assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
  assert after == before
  assert (int(state.step), int(state.skipped), int(state.first_nonfinite)) == (3, 2, 2)

  state, metrics, before, after = run(state, CLEAN)  # and training goes on
  assert int(state.skipped) == 2 and after[0] != before[0]
