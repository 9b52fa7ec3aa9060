"""Transformer-vs-LSTM experiment: the tiny race end to end, and its clock."""

import json

import numpy as np
import pytest

from experiments import transformer_vs_lstm
from research import config as config_lib
from research.load import load_model


def test_training_time_adds_up_step_times_of_logged_windows():
  rows = [{"step": 10, "split": "train", "step_time_ms": 100.0},
          {"step": 10, "split": "val", "loss": 1.0},
          {"step": 20, "split": "train", "step_time_ms": 200.0}]
  assert transformer_vs_lstm.training_time(rows) == {10: 1.0, 20: 3.0}


def test_tiny_race_trains_both_models_and_reports_bits_per_char(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text(" ".join(np.random.default_rng(0).choice(["a", "bc", "def\n"], 3000)))
  config = config_lib.apply_overrides(transformer_vs_lstm.get_config("tiny"), [
      f"--config.workdir={tmp_path / 'run'}", "--config.progress_bar=false",
      f"--config.data.text_file={text}"])
  results = transformer_vs_lstm.run(config, experiment="transformer_vs_lstm:tiny")
  report = json.loads((tmp_path / "run" / "comparison.json").read_text())
  for name in ("gpt", "lstm"):
    assert 0 < report[name]["val_bits_per_char"] < 8
    assert 0 < report[name]["val_bits_per_char_at_common_seconds"] < 8
    assert results[name]["steps"] == report[name]["steps"] <= config.steps
    # Each model is an ordinary run of its single-run experiment.
    _, _, sub = load_model(tmp_path / "run" / name)
    assert sub.experiment == transformer_vs_lstm.MODELS[name]
  with pytest.raises(config_lib.ConfigError, match=r"subfolders \(gpt, lstm\); load one"):
    load_model(tmp_path / "run")
  assert (tmp_path / "run" / "comparison.png").exists()
  assert not (tmp_path / "run" / "calibrate_gpt").exists()
