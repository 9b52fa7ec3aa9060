"""Grokking experiment: the data, the padded full batch, and the tiny variant end to end."""

import json

import numpy as np
import pytest

from experiments import grokking
from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.train import loop


def test_modular_addition_splits_every_pair_once_with_its_sum():
  data = grokking.modular_addition(p=7, train_fraction=0.3, seed=0)
  pairs = np.concatenate([data["train"]["inputs"], data["val"]["inputs"]])
  labels = np.concatenate([data["train"]["labels"], data["val"]["labels"]])
  assert len(data["train"]["labels"]) == int(0.3 * 49)
  assert len({(a, b) for a, b, _ in pairs}) == 49
  assert (pairs[:, 2] == 7).all()
  np.testing.assert_array_equal(labels, (pairs[:, 0] + pairs[:, 1]) % 7)


def test_commutative_split_keeps_each_pair_and_its_mirror_together():
  data = grokking.modular_addition(p=13, train_fraction=0.4, seed=0, commutative_split=True)
  train = {(a, b) for a, b, _ in data["train"]["inputs"]}
  val = {(a, b) for a, b, _ in data["val"]["inputs"]}
  assert len(train) + len(val) == 169 and not train & val
  assert all((b, a) in train for a, b in train) and all((b, a) in val for a, b in val)


def test_padded_full_batch_gives_the_mean_over_real_pairs_on_any_device_split():
  config = grokking.get_config("tiny")
  config.batch_size = 96  # the real pairs, then rows of padding
  task = grokking.build(config)
  batch = task.train_data(0)
  n = int(np.sum(batch["weight"] > 0))
  assert n < 96
  real = {k: v[:n] for k, v in batch.items()}
  real["weight"] = np.ones(n, np.float32)
  _, expected = task.loss_fn(task.model, real)
  for devices in (1, 8):  # the mean of equal slices' weighted means, as pmean computes it
    parts = [task.loss_fn(task.model, {k: v[i::devices] for k, v in batch.items()})[1]
             for i in range(devices)]
    for key in ("loss", "accuracy"):
      np.testing.assert_allclose(np.mean([p[key] for p in parts]), expected[key], rtol=1e-5)


def test_tiny_variant_trains_and_writes_curves_and_the_fourier_picture(tmp_path):
  config = config_lib.apply_overrides(grokking.get_config("tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false"])
  loop.train(grokking.build(config), config, experiment="grokking:tiny")
  rows = read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train"]
  val = [r for r in rows if r["split"] == "val"]
  assert {"loss", "accuracy"} <= set(train[-1]) and train[-1]["loss"] < train[0]["loss"]
  assert {"loss", "accuracy", "fourier_top5_fraction"} <= set(val[-1])
  summary = json.loads((tmp_path / "grokking.json").read_text())
  assert len(summary["frequency_norms"]) == 11 // 2 + 1 and len(summary["key_frequencies"]) == 5
  for name in ("accuracy.png", "loss.png", "fourier.png"):
    assert (tmp_path / name).exists(), name


def test_a_batch_smaller_than_the_training_set_is_refused():
  config = grokking.get_config("tiny")
  config.batch_size = 8
  with pytest.raises(config_lib.ConfigError, match="--config.batch_size=64"):
    grokking.build(config)
