"""Runs survive signals, non-finite numbers, damaged checkpoints and bad workdirs."""

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from benchmarks import fault_trials
from research import config as config_lib
from research.train import loop


@pytest.mark.slow  # subprocesses
def test_killed_three_ways_the_run_resumes_exactly_losing_nothing(tmp_path):
  code, err = fault_trials.finish(fault_trials.start(tmp_path / "reference"))
  assert code == 0, err
  workdir = tmp_path / "run"
  saved = set()
  for name, at_step, expected_code in [("SIGTERM", 57, 0), ("SIGINT", 203, 130), ("SIGKILL", 402, -9)]:
    process = fault_trials.start(workdir)
    assert fault_trials.wait_until(lambda: fault_trials.last_train_step(workdir) >= at_step, process)
    saved_before = fault_trials.complete_checkpoints(workdir)
    process.send_signal(fault_trials.SIGNALS[name])
    code, err = fault_trials.finish(process)
    assert code == expected_code, err
    assert "Traceback" not in err
    # Each restart resumed from the newest checkpoint the previous process left.
    assert resumed_from(err) == max(saved, default=None), err
    saved = fault_trials.complete_checkpoints(workdir)
    assert max(saved) >= max(saved_before, default=0), f"{name} lost a checkpoint"
    if name != "SIGKILL":  # A catchable signal saves the step it stopped at.
      stopped_at = int(err.split(f"stopped by {name} at step ")[1].split(";")[0])
      assert stopped_at >= at_step and stopped_at in saved
  code, err = fault_trials.finish(fault_trials.start(workdir))
  assert code == 0 and resumed_from(err) == max(saved), err
  assert fault_trials.curves(workdir) == fault_trials.curves(tmp_path / "reference")


def resumed_from(stderr: str) -> int | None:
  """The step the loop restored, from its `resumed from step N` line; None for a new run."""
  marker = "resumed from step "
  return int(stderr.split(marker)[1].split()[0]) if marker in stderr else None


def poisoned_task(config, poison_steps):
  """gpt_shakespeare:tiny whose loss is NaN on the batches of `poison_steps` (0-based)."""
  task = experiments.load("gpt_shakespeare").build(config)
  base_loss, base_data = task.loss_fn, task.train_data

  def loss_fn(model, batch, rngs):
    loss, metrics = base_loss(model, {k: v for k, v in batch.items() if k != "poison"}, rngs)
    if "poison" in batch:  # Training batches only.
      loss = loss + jnp.where(batch["poison"].max() > 0, jnp.nan, 0.0)
    return loss, {**metrics, "loss": loss}

  def train_data(step):
    batch = base_data(step)
    return {**batch, "poison": np.full(len(batch["inputs"]), float(step in poison_steps), np.float32)}

  return dataclasses.replace(task, loss_fn=loss_fn, train_data=train_data)


def tiny_config(tmp_path, *overrides):
  return config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false", "--config.steps=20",
      "--config.checkpoint_every=10", "--config.log_every=5", *overrides])


def test_nonfinite_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
  config = tiny_config(tmp_path)
  with pytest.raises(loop.Diverged, match="non-finite loss or gradient at step 13"):
    loop.train(poisoned_task(config, {12}), config, experiment="gpt_shakespeare:tiny")
  assert fault_trials.complete_checkpoints(tmp_path) == {10}


def test_nonfinite_updates_are_skipped_and_counted(tmp_path):
  config = tiny_config(tmp_path, "--config.nonfinite=skip")
  loop.train(poisoned_task(config, {3, 12}), config, experiment="gpt_shakespeare:tiny")
  rows = [r for r in fault_trials.curves(tmp_path) if r["split"] == "train"]
  assert [r["skipped"] for r in rows] == [1, 1, 2, 2]
  assert rows[-1]["loss"] is not None and np.isfinite(rows[-1]["loss"])


def test_a_run_that_only_skips_stops(tmp_path):
  config = tiny_config(tmp_path, "--config.nonfinite=skip")
  with pytest.raises(loop.Diverged, match="every update from step 11 to 15"):
    loop.train(poisoned_task(config, set(range(10, 20))), config, experiment="gpt_shakespeare:tiny")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
  config = tiny_config(tmp_path, "--config.decay_steps=20")
  task = experiments.load("gpt_shakespeare").build(config)
  loop.train(task, config, experiment="gpt_shakespeare:tiny")
  reference = fault_trials.curves(tmp_path)
  for data in (tmp_path / "checkpoints" / "20").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:10])
  config.steps = 20
  task = experiments.load("gpt_shakespeare").build(config)
  asked, train_data = [], task.train_data
  task.train_data = lambda step: asked.append(step) or train_data(step)
  loop.train(task, config, experiment="gpt_shakespeare:tiny")
  err = capfd.readouterr().err
  assert "checkpoint step 20 is unreadable" in err
  assert resumed_from(err) == 10 and asked == list(range(10, 20))  # from the previous checkpoint
  assert (tmp_path / "checkpoints_unreadable" / "20").is_dir()  # set aside, not deleted
  assert fault_trials.curves(tmp_path) == reference


def test_unusable_workdir_is_refused_before_training(tmp_path):
  (tmp_path / "file").write_text("")
  config = tiny_config(tmp_path / "file" / "run")
  with pytest.raises(config_lib.ConfigError, match="is not writable"):
    loop.train(experiments.load("gpt_shakespeare").build(config), config, experiment="x")


def test_batch_not_divisible_by_devices_is_refused():
  # tests run with 8 simulated devices (conftest); the CLI validates before any compute.
  result = subprocess.run([sys.executable, "-m", "experiments", "gpt_shakespeare:tiny",
                           "--config.batch_size=12"], capture_output=True, text=True,
                          cwd=fault_trials.REPO, timeout=300)
  assert result.returncode == 2
  assert "error: config.batch_size=12 (micro-batch 12) is not divisible by the 8 devices" in result.stderr
