"""benchmarks/val_loss_noise: the all-window loss is the expectation of the logged estimate."""

import json

import numpy as np
import pytest
from flax import nnx

import experiments
from benchmarks import val_loss_noise
from research import config as config_lib
from research.data.text import LMBatches
from research.models.gpt import GPT, GPTConfig
from research.tasks.language_model import next_token_loss
from research.train import loop


def test_window_losses_cover_every_start_lmbatches_can_draw():
  tokens = np.arange(50)
  mean_target = lambda inputs_NxT, targets_NxT: targets_NxT.mean(axis=1)
  losses = val_loss_noise.window_losses(mean_target, tokens, context=8, chunk=7)
  assert len(losses) == len(tokens) - 8
  np.testing.assert_allclose(losses, np.arange(len(tokens) - 8) + 4.5)  # targets s+1 .. s+8
  batch = LMBatches(tokens, block_size=8, batch_size=64, seed=0)(0)
  assert batch["inputs"][:, 0].max() < len(losses)
  np.testing.assert_array_equal(
      val_loss_noise.window_losses(mean_target, tokens, context=8, stride=5), losses[::5])


def test_mean_of_window_losses_is_the_training_loss_of_those_windows():
  model = GPT(GPTConfig(vocab_size=11, block_size=6, num_layers=1, num_heads=2, embed_dim=16),
              rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 11, 40)
  per_window = val_loss_noise.window_losses(val_loss_noise.jax_loss_fn(model), tokens, 6)
  starts = np.array([0, 7, 13, 20, 33])
  windows_BxT1 = tokens[starts[:, None] + np.arange(7)]
  batch = {"inputs": windows_BxT1[:, :-1], "targets": windows_BxT1[:, 1:]}
  np.testing.assert_allclose(per_window[starts].mean(), float(next_token_loss(model, batch)[0]),
                             rtol=1e-5)


def test_estimate_spread_matches_the_standard_error():
  per_window = np.random.default_rng(0).normal(2.0, 0.5, 20_000)
  spread = val_loss_noise.estimate_spread(per_window, windows=100, threshold=2.0)
  assert spread["estimate_sd"] == pytest.approx(0.05, rel=0.1)
  assert spread["p_at_or_below_threshold"] == pytest.approx(0.5, abs=0.05)
  assert spread["estimate_p5"] < 2.0 < spread["estimate_p95"]


def test_command_scores_a_finished_run(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "text.txt").write_text(" ".join(rng.choice(["to", "be", "or", "not"], 1500)) + "\n")
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path / 'run'}", "--config.progress_bar=false",
      "--config.steps=10", f"--config.data.text_file={tmp_path / 'text.txt'}"])
  last = loop.train(experiments.load("gpt_shakespeare").build(config), config,
                    experiment="gpt_shakespeare:tiny")
  out = tmp_path / "results"
  assert val_loss_noise.main([str(tmp_path / "run"), "--stride", "3", "--out", str(out)]) == 0
  (row,) = json.loads((out / "val_loss_noise.json").read_text())["rows"]
  assert row["implementation"] == "jax" and row["step"] == 10
  assert row["logged_val_loss"] == pytest.approx(last["val"]["loss"])
  # The logged estimate (2 batches of 8 windows) lies within a few of its sds of the expectation.
  assert abs(row["logged_val_loss"] - row["all_windows_val_loss"]) < 5 * row["estimate_sd"]
  assert "| jax | 0 | 10 |" in (out / "val_loss_noise.md").read_text()


def test_command_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
  assert val_loss_noise.main([str(tmp_path), "--out", str(tmp_path / "results")]) == 2
  assert "not a run folder" in capsys.readouterr().err
