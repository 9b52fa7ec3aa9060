"""The optimizer registry: each optimizer, chosen by config, trains a tiny experiment."""

import jax
import jax.numpy as jnp
import pytest

import experiments
from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.train import loop, optim

# A learning rate each optimizer trains the tiny GPT with in a dozen steps.
LEARNING_RATES = {"adamw": 3e-3, "lion": 1e-3, "sgd": 0.3, "muon": 3e-3}


def test_every_registered_optimizer_has_a_learning_rate_here():
  assert set(LEARNING_RATES) == set(optim.OPTIMIZERS)


def test_the_optimizer_is_the_one_named():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "embed": {"embedding": jnp.ones((5, 4))}}
  states = {}
  for name in optim.OPTIMIZERS:
    config = config_lib.apply_overrides(config_lib.base(), [f"--config.optimizer.name={name}"])
    states[name] = str(jax.tree.structure(optim.make_optimizer(config).init(params)))
  assert len(set(states.values())) == len(states)  # four different optimizer states


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
