"""Data parallel (shard_map + pmean) and FSDP match one device; checkpoints move between meshes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import experiments
from research import config as config_lib
from research import sharding
from research.data.text import LMBatches
from research.models.gpt import GPT, GPTConfig
from research.tasks.language_model import next_token_loss
from research.train import optim
from research.train.checkpoint import Checkpoints
from research.train.step import init_state, make_train_step

STEPS = 4


def config(**overrides):
  c = config_lib.base()
  c.update(steps=100, batch_size=16, warmup_steps=0, learning_rate=3e-3, **overrides)
  return c


def model():
  return GPT(GPTConfig(vocab_size=64, block_size=16, num_layers=2, num_heads=2, embed_dim=64),
             rngs=nnx.Rngs(0))


def train(devices, parallelism, *, accum_steps=1, remat=False, dtype="float32"):
  """Losses and final parameters of a few steps on a mesh of `devices`."""
  c = config()
  m = GPT(GPTConfig(vocab_size=64, block_size=16, num_layers=2, num_heads=2, embed_dim=64,
                    remat=remat, dtype=dtype), rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(c)
  graphdef, state = init_state(m, tx)
  mesh = sharding.make_mesh(devices)
  shardings = sharding.state_shardings(state, mesh, parallelism)
  state = jax.device_put(state, shardings)
  step = make_train_step(graphdef, next_token_loss, tx, mesh=mesh, state_sharding=shardings,
                         parallelism=parallelism, seed=0, accum_steps=accum_steps)
  data = LMBatches(np.random.default_rng(0).integers(0, 64, 5000).astype(np.int32), 16, 16, seed=0)
  curves = []
  for i in range(STEPS):
    state, metrics = step(state, sharding.global_batch(data(i), mesh))
    curves.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return np.array(curves), state


def test_global_batch_gives_each_device_its_rows():
  mesh = sharding.make_mesh()
  rows = np.arange(16 * 3).reshape(16, 3)
  placed = sharding.global_batch({"x": rows}, mesh)["x"]
  per_device = 16 // mesh.size
  for shard in placed.addressable_shards:
    i = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(shard.data, rows[i * per_device:(i + 1) * per_device])
  with pytest.raises(ValueError, match="does not split over"):
    sharding.global_batch({"x": rows[:mesh.size + 1]}, mesh)


def assert_same_training(a, b, rtol=1e-5):
  """Same losses and gradient norms; parameters equal up to Adam's amplified rounding."""
  np.testing.assert_allclose(a[0], b[0], rtol=rtol)
  for x, y in zip(jax.tree.leaves(a[1].params), jax.tree.leaves(b[1].params)):
    np.testing.assert_allclose(x, y, atol=1e-3)


@pytest.fixture(scope="module")
def one_device():
  return train(jax.devices()[:1], "dp")


@pytest.mark.parametrize("parallelism", ["dp", "fsdp"])
def test_eight_devices_train_like_one(one_device, parallelism):
  assert_same_training(train(jax.devices(), parallelism), one_device)


def test_gradient_accumulation_and_remat_leave_the_step_unchanged(one_device):
  assert_same_training(train(jax.devices()[:1], "dp", accum_steps=4, remat=True), one_device)


def test_bfloat16_compute_keeps_float32_parameters(one_device):
  curves, state = train(jax.devices()[:1], "dp", dtype="bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  np.testing.assert_allclose(curves, one_device[0], rtol=3e-2)


def test_fsdp_really_shards_parameters_and_optimizer_state():
  _, state = train(jax.devices(), "fsdp")
  qkv = state.params["blocks"][0]["attn"]["qkv"]["kernel"]  # [64, 192]
  assert qkv.sharding.spec == P(None, sharding.DATA)
  assert {s.data.shape for s in qkv.addressable_shards} == {(64, 24)}
  mu = state.opt_state[1][0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
  assert mu.sharding.spec == P(None, sharding.DATA)
  norm = state.params["blocks"][0]["norm1"]["scale"]  # too small to be worth splitting
  assert norm.sharding.spec == P()


@pytest.mark.parametrize("saved_on, restored_on", [(8, 1), (1, 8)])
def test_checkpoints_restore_onto_another_device_count(tmp_path, saved_on, restored_on):
  tx = optim.make_optimizer(config())
  _, state = init_state(model(), tx)
  state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))

  def placed(n):
    mesh = sharding.make_mesh(jax.devices()[:n])
    return jax.device_put(state, sharding.state_shardings(state, mesh, "fsdp"))

  ckpts = Checkpoints(tmp_path, keep=2)
  ckpts.save(placed(saved_on))
  ckpts.wait()
  target = jax.tree.map(np.zeros_like, placed(restored_on))
  target = jax.device_put(target, jax.tree.map(lambda x: x.sharding, placed(restored_on)))
  restored = Checkpoints(tmp_path, keep=2).restore_latest(target)
  for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == t.sharding


# Multi-host (two processes of four devices, dp and fsdp, resumed): tests/test_multihost.py.


def test_config_names_of_every_experiment_include_parallelism():
  for name in experiments.EXPERIMENTS:
    assert experiments.get_config(name).parallelism in config_lib.PARALLELISM


def test_cpu_device_count_divides_every_batch_and_respects_the_cores():
  assert sharding.cpu_device_count(2, (12,)) == 2
  assert sharding.cpu_device_count(16, (12, 128)) == 4
  assert sharding.cpu_device_count(4, (6,)) == 3
  assert sharding.cpu_device_count(64, (1024,)) == sharding.MAX_CPU_DEVICES
  assert sharding.cpu_device_count(8, (7,)) == 7
  assert sharding.cpu_device_count(8, (9, 15)) == 3
  assert sharding.cpu_device_count(1, (12,)) == 1


def test_simulated_cpu_devices_wait_long_for_each_other(monkeypatch):
  # A late device thread must not abort the run after XLA:CPU's default 40 s.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_collective_call_terminate_timeout_seconds=7")
  monkeypatch.setattr(sharding.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
  assert sharding.split_cpu_into_devices(12) == 2
  flags = sharding.os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=2" in flags
  assert "--xla_cpu_collective_call_terminate_timeout_seconds=7" in flags  # the user's value
  assert "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600" in flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  assert sharding.split_cpu_into_devices(12) == 3
  assert "--xla_cpu_collective_call_terminate_timeout_seconds=3600" in sharding.os.environ["XLA_FLAGS"]
