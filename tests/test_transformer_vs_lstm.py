"""Transformer-vs-LSTM experiment: the tiny race end to end, and its clock."""

import json
import math

import numpy as np
import pytest

from experiments import transformer_vs_lstm
from research import config as config_lib
from research.evaluate.writer import read_metrics
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
    # Bits are the sub-run's logged val loss (nats per character) over ln 2.
    val = [r for r in read_metrics(tmp_path / "run" / name / "metrics.jsonl") if r["split"] == "val"]
    assert report[name]["val_bits_per_char"] == pytest.approx(val[-1]["loss"] / math.log(2), rel=1e-12)
    assert report[name]["val_bits_per_char_at_common_seconds"] in [
        pytest.approx(r["loss"] / math.log(2), rel=1e-12) for r in val]
    assert results[name]["steps"] == report[name]["steps"] <= config.steps
    # Each model is an ordinary run of its single-run experiment.
    _, _, sub = load_model(tmp_path / "run" / name)
    assert sub.experiment == transformer_vs_lstm.MODELS[name]
  with pytest.raises(config_lib.ConfigError, match=r"subfolders \(gpt, lstm\); load one"):
    load_model(tmp_path / "run")
  assert (tmp_path / "run" / "comparison.png").exists()
  assert not (tmp_path / "run" / "calibrate_gpt").exists()


def test_bits_per_char_of_a_known_distribution(tmp_path, monkeypatch):
  """A model uniform over 4 characters loses ln 4 nats per character: exactly 2 bits."""
  def train_or_read(spec, config, finish=True):
    rows = [{"step": s, "split": "train", "step_time_ms": 100.0} for s in (10, 20)]
    return rows + [{"step": 10, "split": "val", "loss": math.log(8)},
                   {"step": 20, "split": "val", "loss": math.log(4)}]

  monkeypatch.setattr(transformer_vs_lstm, "_calibrate", lambda config, name, workdir: (0.1, 1000))
  monkeypatch.setattr(transformer_vs_lstm._multirun, "train_or_read", train_or_read)
  config = config_lib.apply_overrides(transformer_vs_lstm.get_config("tiny"),
                                      [f"--config.workdir={tmp_path}"])
  results = transformer_vs_lstm.run(config, experiment="transformer_vs_lstm:tiny")
  for name in ("gpt", "lstm"):
    assert results[name]["val_bits_per_char"] == pytest.approx(2.0, rel=1e-12)
    assert results[name]["train_seconds"] == pytest.approx(2.0)  # 20 steps of 100 ms
    assert results[name]["val_bits_per_char_at_common_seconds"] == pytest.approx(2.0, rel=1e-12)
