"""End to end: tiny experiments train, checkpoint, resume exactly, and refuse bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import experiments
from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.load import load_model
from research.train import loop
from research.train.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TIMING = {"step_time_ms", "tokens_per_second", "mfu", "wall_s"}


def run(spec, workdir, *overrides, asked: list | None = None):
  """Trains `spec` in `workdir`; `asked` collects the steps whose batches the loop asked for."""
  config = config_lib.apply_overrides(experiments.get_config(spec),
                                      [f"--config.workdir={workdir}", "--config.progress_bar=false",
                                       *overrides])
  task = experiments.load(experiments.parse_name(spec)[0]).build(config)
  if asked is not None:
    train_data = task.train_data
    task.train_data = lambda step: asked.append(step) or train_data(step)
  return loop.train(task, config, experiment=spec)


def curves(workdir):
  return [{k: v for k, v in row.items() if k not in TIMING}
          for row in read_metrics(Path(workdir) / "metrics.jsonl")]


@pytest.mark.parametrize("spec", ["gpt_shakespeare:tiny", "lstm_shakespeare:tiny"])
def test_tiny_language_models_learn_and_fill_the_run_folder(tmp_path, spec):
  run(spec, tmp_path, "--config.steps=30")
  rows = read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train"]
  val = [r for r in rows if r["split"] == "val"]
  assert train[-1]["loss"] < train[0]["loss"] - 0.1
  assert val[-1]["loss"] < val[0]["loss"]
  assert all(r["tokens_per_second"] > 0 for r in train[1:])
  for name in ("config.json", "samples.txt", "loss.png"):
    assert (tmp_path / name).exists(), name
  assert json.loads((tmp_path / "config.json").read_text())["experiment"] == spec
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]
  assert list((tmp_path / "tensorboard").iterdir())


def test_resume_continues_exactly_as_if_never_stopped(tmp_path):
  args = ["--config.model.dropout=0.1", "--config.checkpoint_every=10", "--config.decay_steps=20"]
  run("gpt_shakespeare:tiny", tmp_path / "whole", "--config.steps=20", *args)
  run("gpt_shakespeare:tiny", tmp_path / "split", "--config.steps=10", *args)
  first = (tmp_path / "split" / "metrics.jsonl").read_text()
  asked = []
  run("gpt_shakespeare:tiny", tmp_path / "split", "--config.steps=20", *args, asked=asked)
  assert asked == list(range(10, 20))  # resumed at step 10, not restarted
  assert (tmp_path / "split" / "metrics.jsonl").read_text().startswith(first)  # rows kept as written
  assert curves(tmp_path / "split") == curves(tmp_path / "whole")
  whole, _, _ = load_model(tmp_path / "whole")
  split, _, _ = load_model(tmp_path / "split")
  from flax import nnx
  for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(split))):
    np.testing.assert_array_equal(a, b)


def test_training_longer_must_keep_the_schedule(tmp_path):
  run("gpt_shakespeare:tiny", tmp_path, "--config.steps=5")
  with pytest.raises(config_lib.ConfigError, match="--config.decay_steps=5"):
    run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10")
  run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10", "--config.decay_steps=5")


def test_same_seed_same_run_and_another_seed_another(tmp_path):
  run("gpt_shakespeare:tiny", tmp_path / "a", "--config.steps=5")
  run("gpt_shakespeare:tiny", tmp_path / "b", "--config.steps=5")
  run("gpt_shakespeare:tiny", tmp_path / "c", "--config.steps=5", "--config.seed=1")
  assert curves(tmp_path / "a") == curves(tmp_path / "b")
  assert curves(tmp_path / "a") != curves(tmp_path / "c")


def test_checkpoint_of_another_model_is_refused_untouched(tmp_path):
  run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10")
  before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "checkpoints").rglob("*"))
  with pytest.raises(config_lib.ConfigError, match=r"different config \(model.embed_dim: 32 -> 64\)"):
    run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10", "--config.model.embed_dim=64")
  # A run written before a config field existed is named as such.
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["qk_norm"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match="written before the config fields model.qk_norm"):
    run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10")
  (tmp_path / "config.json").unlink()  # Even without the config guard, shapes are checked.
  with pytest.raises(CheckpointError, match=r"params/blocks/0/attn/out/kernel: checkpoint \(32, 32\) vs model \(64, 64\)"):
    run("gpt_shakespeare:tiny", tmp_path, "--config.steps=10", "--config.model.embed_dim=64")
  after = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "checkpoints").rglob("*"))
  assert before == after


def test_every_experiment_config_parses_and_validates():
  for name in experiments.EXPERIMENTS:
    module = experiments.load(name)
    assert module.__doc__ and "Command" in module.__doc__, f"{name} docstring lacks its command"
    for variant in module.VARIANTS:
      config = experiments.get_config(f"{name}:{variant}")
      config_lib.validate(config, num_devices=1)
      same = config_lib.apply_overrides(config, [f"--config.seed={config.seed + 1}"])
      assert same.seed == config.seed + 1


def cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "XLA_FLAGS": "", **(env or {})}, timeout=300)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown experiment 'nope'; valid names: "),
    (["gpt_shakespeare:huge"], "unknown variant 'huge'"),
    (["gpt_shakespeare", "--config.nope=1"], "unknown config key 'nope'"),
    (["gpt_shakespeare", "--config.learning_rate=fast"], "expected a float"),
    (["gpt_shakespeare", "--config.steps=-5"], "config.steps must be a positive integer"),
    (["gpt_shakespeare", "--config.learning_rate=nan"], "learning_rate must be a finite"),
    (["gpt_shakespeare", "--config.model.attention=flash"], "unknown attention implementation"),
    (["gpt_shakespeare", "--config.model.attention=cudnn"], "needs an NVIDIA GPU"),
    (["gpt_shakespeare", "--config.parallelism=tp"], "unknown config.parallelism"),
    (["gpt_shakespeare:tiny", "--config.data.manual_dir=/nonexistent"], "is not a directory"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
  result = cli(*args)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_list_names_every_experiment():
  result = cli("--list")
  assert result.returncode == 0
  assert [l.split()[0] for l in result.stdout.splitlines()] == experiments.EXPERIMENTS
