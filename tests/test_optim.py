"""The optimizer registry and the schedules: each optimizer, chosen by config, trains a tiny
experiment; WSD at hand-computed points; schedule-free AdamW's evaluation parameters; Muon's
orthogonal update; bad names refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import experiments
from research import config as config_lib
from research import sharding
from research.evaluate.writer import read_metrics
from research.models.gpt import GPT, GPTConfig
from research.train import loop, optim
from research.train.step import init_state

# A learning rate each optimizer trains the tiny GPT with in a dozen steps.
LEARNING_RATES = {"adamw": 3e-3, "lion": 1e-3, "sgd": 0.3, "muon": 3e-3,
                  "schedule_free_adamw": 3e-3}


def test_every_registered_optimizer_has_a_learning_rate_here():
  assert set(LEARNING_RATES) == set(optim.OPTIMIZERS)


def test_the_optimizer_is_the_one_named():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "embed": {"embedding": jnp.ones((5, 4))}}
  states = {}
  for name in optim.OPTIMIZERS:
    config = config_lib.apply_overrides(config_lib.base(), [f"--config.optimizer.name={name}"])
    states[name] = str(jax.tree.structure(optim.make_optimizer(config).init(params)))
  assert len(set(states.values())) == len(states)  # a different state for each optimizer


@pytest.mark.parametrize("name, parallelism", [
    *((name, "dp") for name in LEARNING_RATES), ("muon", "fsdp")])
def test_each_optimizer_lowers_the_loss_of_a_tiny_experiment(tmp_path, name, parallelism):
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false",
      f"--config.optimizer.name={name}", f"--config.learning_rate={LEARNING_RATES[name]}",
      f"--config.parallelism={parallelism}", "--config.steps=12", "--config.log_every=1",
      "--config.eval_every=12", "--config.checkpoint_every=12"])
  assert config.optimizer.name == name
  task = experiments.load("gpt_shakespeare").build(config)
  task.finish = None
  loop.train(task, config, experiment="gpt_shakespeare:tiny")
  losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert len(losses) == 12
  assert losses[-1] < losses[0] - 0.15, losses


def tiny_run(tmp_path, *overrides):
  """Train losses of a 12-step `gpt_shakespeare:tiny` run, and its train log lines."""
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false", "--config.steps=12",
      "--config.log_every=1", "--config.eval_every=12", "--config.checkpoint_every=12",
      *overrides])
  task = experiments.load("gpt_shakespeare").build(config)
  task.finish = None
  loop.train(task, config, experiment="gpt_shakespeare:tiny")
  lines = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  return [r["loss"] for r in lines], lines


def schedule(**fields):
  config = config_lib.base()
  config.update(learning_rate=1.0, min_learning_rate=0.1, warmup_steps=10, steps=100, **fields)
  config_lib.validate(config, num_devices=1)
  return optim.learning_rate_schedule(config)


def test_wsd_schedule_at_hand_computed_points():
  # Warmup over steps 0-10, 1.0 until step 80, then down to 0.1 at step 100 (the last 20%).
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 85: 0.775, 90: 0.55, 100: 0.1, 150: 0.1}
  linear = schedule(schedule="wsd", decay_fraction=0.2)
  for step, lr in expected.items():
    np.testing.assert_allclose(float(linear(step)), lr, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
  # 1-sqrt: 0.1 + 0.9 * (1 - sqrt(progress)).
  sqrt = schedule(schedule="wsd", decay_fraction=0.2, decay_shape="1-sqrt")
  expected.update({85: 0.1 + 0.9 * (1 - 0.5), 90: 0.1 + 0.9 * (1 - np.sqrt(0.5))})
  for step, lr in expected.items():
    np.testing.assert_allclose(float(sqrt(step)), lr, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
  # decay_steps ends the decay early; a decay_fraction of 0 never decays.
  early = schedule(schedule="wsd", decay_fraction=0.5, decay_steps=40)
  assert [round(float(early(s)), 6) for s in (20, 30, 40, 99)] == [1.0, 0.55, 0.1, 0.1]
  flat = schedule(schedule="wsd", decay_fraction=0.0)
  assert [float(flat(s)) for s in (5, 10, 99, 1000)] == [0.5, 1.0, 1.0, 1.0]


def test_cosine_stays_the_default_schedule():
  assert config_lib.base().schedule == "cosine"
  reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.1)
  for step in (0, 5, 10, 50, 99, 150):
    assert float(schedule()(step)) == float(reference(step))


def test_a_wsd_run_trains_and_logs_its_schedule(tmp_path):
  losses, lines = tiny_run(tmp_path, "--config.schedule=wsd", "--config.decay_fraction=0.5",
                           "--config.warmup_steps=2", "--config.min_learning_rate=0.0")
  assert losses[-1] < losses[0] - 0.15, losses
  # Logged at step s is the rate of update s - 1: warmup 0, 1.5e-3; stable to update 6; decay.
  rates = [r["learning_rate"] for r in lines]
  np.testing.assert_allclose(rates, [0, 1.5e-3] + [3e-3] * 5 + [3e-3 * (1 - k / 6) for k in
                                                                range(1, 6)], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("overrides, error", [
    (["--config.schedule=linear"], "error: unknown config.schedule 'linear'; valid names: "
                                   + ", ".join(optim.SCHEDULES)),
    (["--config.schedule=wsd", "--config.decay_shape=sqrt"],
     "error: unknown config.decay_shape 'sqrt'; valid names: " + ", ".join(optim.DECAY_SHAPES)),
    (["--config.decay_fraction=1.5"], "error: config.decay_fraction must be between 0 and 1, got 1.5"),
])
def test_a_bad_schedule_is_refused_in_one_line(monkeypatch, capsys, tmp_path, overrides, error):
  from experiments.__main__ import main
  monkeypatch.setattr(experiments.load("gpt_shakespeare"), "build",
                      lambda config: pytest.fail("build() was reached"))
  assert main(["gpt_shakespeare:tiny", f"--config.workdir={tmp_path}", *overrides]) == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
  assert errors == [error]


def sf_config(**optimizer):
  config = config_lib.apply_overrides(config_lib.base(), [
      "--config.optimizer.name=schedule_free_adamw", "--config.warmup_steps=3",
      "--config.learning_rate=0.1", "--config.schedule=wsd", "--config.decay_fraction=0"])
  config.optimizer.update(optimizer)
  return config


def test_schedule_free_adamw_is_optaxs():
  # Without weight decay (the one thing masked here) the updates are optax's, step for step.
  config = sf_config(weight_decay=0.0)
  config.grad_clip = 0.0
  ours = optim.make_optimizer(config)
  theirs = optax.contrib.schedule_free_adamw(
      optim.learning_rate_schedule(config), b1=0.9, b2=0.99, eps=1e-8, weight_lr_power=2.0)
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
  p1 = p2 = params
  s1, s2 = ours.init(params), theirs.init(params)
  for step in range(5):
    grads = jax.tree.map(lambda p: jnp.sin(p + step), p1)
    u1, s1 = ours.update(grads, s1, p1)
    u2, s2 = theirs.update(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_eval_params_are_the_schedule_free_average():
  model = GPT(GPTConfig(vocab_size=5, block_size=4, num_layers=1, num_heads=1, embed_dim=4),
              rngs=nnx.Rngs(0))
  config = sf_config()  # grad_clip 1.0: the schedule-free state sits inside a chain
  tx = optim.make_optimizer(config)
  _, state = init_state(model, tx)
  params, opt_state = state.params, state.opt_state

  @jax.jit
  def step(params, opt_state, t):
    grads = jax.tree.map(lambda p: jnp.cos(p + t), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t in range(3):
    params, opt_state = step(params, opt_state, t)
  x = optim.eval_params(config)(params, opt_state)
  sf_state = opt_state[1]
  assert isinstance(sf_state, optax.contrib.ScheduleFreeState)
  # x = (y - (1 - b1) z) / b1: the average the training parameters y are interpolated from.
  expected = jax.tree.map(lambda y, z: (y - 0.1 * z) / 0.9, params, sf_state.z)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), x, expected)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: np.allclose(a, b), x, params)))
  # Every other optimizer evaluates the parameters it trains.
  adamw = config_lib.base()
  assert optim.eval_params(adamw)(params, opt_state) is params


def test_muon_update_is_orthogonal():
  """Newton-Schulz leaves every singular value of the momentum near 1 (times Muon's scale)."""
  g = jax.random.normal(jax.random.key(0), (64, 32))
  tx = optim.Muon(weight_decay=0.0).make(optax.constant_schedule(1.0))
  params = {"w": jnp.zeros((64, 32))}
  updates, _ = tx.update({"w": g}, tx.init(params), params)
  scale = 0.2 * np.sqrt(64)  # consistent_rms * sqrt(max(fan_in, fan_out))
  singular = np.linalg.svd(-np.asarray(updates["w"]) / scale, compute_uv=False)
  assert np.all((singular > 0.6) & (singular < 1.25)), singular
  raw = np.linalg.svd(np.asarray(g), compute_uv=False)
  assert raw.max() / raw.min() > 4  # the gradient itself is far from orthogonal


def _muon_params():
  k = jax.random.split(jax.random.key(0), 5)
  return {"embed": {"embedding": jax.random.normal(k[0], (11, 16))}, "b": jnp.zeros(16),
          "wide": [jax.random.normal(k[1], (16, 48)), jax.random.normal(k[2], (16, 48))],
          "tall": jax.random.normal(k[3], (48, 16)), "head": jax.random.normal(k[4], (16, 11))}


def _three_updates(tx, params, wrap=lambda f: f):
  state, updates = tx.init(params), []
  for i in range(3):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    u, state = jax.jit(wrap(tx.update))(grads, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates


def test_muon_is_optax_contrib_muon():
  """Our batched Muon computes optax.contrib.muon's updates (same labels and fields)."""
  m = optim.Muon()
  reference = optax.contrib.muon(
      0.01, ns_steps=m.ns_steps, beta=m.beta, nesterov=m.nesterov, weight_decay=m.weight_decay,
      consistent_rms=m.consistent_rms, adam_b1=m.adam_b1, adam_b2=m.adam_b2,
      muon_weight_dimension_numbers=lambda p: jax.tree.map(
          lambda label: optax.contrib.MuonDimensionNumbers() if label == "muon" else None,
          optim._muon_labels(p)))
  params = _muon_params()
  ours = _three_updates(m.make(optax.constant_schedule(0.01)), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               ours, _three_updates(reference, params))


def test_muon_splits_its_work_over_the_data_parallel_devices():
  """Inside the data-parallel shard_map each device orthogonalizes a share of the matrices (2 wide
  ones and 1 tall one over 8 devices: padded), and the psum gives every device all the updates."""
  mesh = jax.make_mesh((jax.device_count(),), (sharding.DATA,))
  tx, params = optim.Muon().make(optax.constant_schedule(0.01)), _muon_params()
  in_dp = lambda f: jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               _three_updates(tx, params, in_dp), _three_updates(tx, params))
  state, grads = tx.init(params), jax.tree.map(jnp.ones_like, params)

  def flops(f):
    return jax.jit(f).lower(grads, state, params).compile().cost_analysis()["flops"]

  assert flops(in_dp(tx.update)) < 0.5 * flops(tx.update)  # per device


def test_muon_trains_alike_with_and_without_the_split(tmp_path):
  """Through the real sharded step: data parallel (the split) and FSDP (no split) log the same
  losses."""
  args = ["--config.optimizer.name=muon", "--config.learning_rate=3e-3"]
  dp, _ = tiny_run(tmp_path / "dp", *args, "--config.parallelism=dp")
  fsdp, _ = tiny_run(tmp_path / "fsdp", *args, "--config.parallelism=fsdp")
  np.testing.assert_allclose(dp, fsdp, rtol=1e-4)


def test_schedule_free_wsd_and_every_knob_resume_exactly(tmp_path):
  """The schedule-free state survives a checkpoint: a run stopped and resumed logs what the
  uninterrupted run logs."""
  args = ["--config.optimizer.name=schedule_free_adamw", "--config.schedule=wsd",
          "--config.decay_steps=8", "--config.log_every=1", "--config.checkpoint_every=4",
          "--config.eval_every=4", "--config.model.mlp_activation=relu2",
          "--config.model.tie_embeddings=false", "--config.model.zero_init_projections=true",
          "--config.model.logit_softcap=3.0", "--config.model.qk_norm=true"]
  timing = {"step_time_ms", "tokens_per_second", "mfu", "wall_s"}

  def run(workdir, steps):
    config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
        f"--config.workdir={workdir}", "--config.progress_bar=false", f"--config.steps={steps}",
        *args])
    task = experiments.load("gpt_shakespeare").build(config)
    task.finish = None
    loop.train(task, config, experiment="gpt_shakespeare:tiny")
    return [{k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(workdir / "metrics.jsonl")]

  whole = run(tmp_path / "whole", 8)
  run(tmp_path / "split", 4)
  assert run(tmp_path / "split", 8) == whole


def test_a_schedule_free_run_evaluates_and_loads_its_average(tmp_path):
  """The loop evaluates schedule-free AdamW's average x, and load_model returns x, not the
  trained sequence y that the checkpoint holds as parameters."""
  from research.load import load_model
  from research.train.checkpoint import Checkpoints

  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false", "--config.steps=12",
      "--config.optimizer.name=schedule_free_adamw", "--config.learning_rate=3e-3",
      "--config.eval_every=12", "--config.checkpoint_every=12"])
  task = experiments.load("gpt_shakespeare").build(config)
  task.finish = None
  logged = loop.train(task, config, experiment="gpt_shakespeare:tiny")["val"]["loss"]
  model, _, _ = load_model(tmp_path)
  losses = [task.loss_fn(model, batch, None)[1]["loss"] for batch in task.eval_data["val"]()]
  assert float(np.mean(losses)) == pytest.approx(logged, rel=1e-4)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  checkpoints = Checkpoints(tmp_path / "checkpoints", keep=1, read_only=True)
  trained = checkpoints.restore_model(params.to_pure_dict(), {})["params"]
  checkpoints.close()
  differ = jax.tree.map(lambda a, b: not np.allclose(a, b), trained, params.to_pure_dict())
  assert all(jax.tree.leaves(differ))
