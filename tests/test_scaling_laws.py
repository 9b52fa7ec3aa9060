"""Scaling-laws experiment: the power-law fit, and the tiny sweep end to end with resume."""

import json

import numpy as np

from experiments import scaling_laws
from research import config as config_lib


def test_fit_recovers_a_known_power_law():
  n = np.geomspace(1e4, 2e6, 6)
  noise = 1 + 0.002 * np.random.default_rng(0).normal(size=6)
  loss = (1.3 + (3e3 / n) ** 0.35) * noise
  fit = scaling_laws.fit_power_law(n, loss)
  assert abs(fit["alpha"] - 0.35) < 3 * fit["alpha_stderr"] + 0.02
  assert abs(fit["l_inf"] - 1.3) < 0.05
  assert 0 < fit["alpha_stderr"] < 0.1


def test_kaplan_form_recovers_a_pure_power_law():
  n = np.geomspace(1e4, 2e6, 6)
  loss = (8e8 / n) ** 0.076 * (1 + 0.002 * np.random.default_rng(1).normal(size=6))
  fit = scaling_laws.fit_kaplan_form(n, loss)
  assert abs(fit["kaplan_alpha"] - 0.076) < 3 * fit["kaplan_alpha_stderr"] + 0.005
  assert 0 < fit["kaplan_alpha_stderr"] < 0.01
  assert abs(np.log(fit["kaplan_n_c"] / 8e8)) < 1.0


def test_non_embedding_params_are_kaplans_12_layers_width_squared_plus_norms():
  # 12 L d^2 in the matrices, plus the LayerNorm scales (2 per block and 1 final).
  assert scaling_laws.non_embedding_params(2, 64, 16, 128) == 12 * 2 * 64 ** 2 + 5 * 64


def test_tiny_sweep_fits_and_a_rerun_skips_finished_sizes(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text(" ".join(np.random.default_rng(0).choice(["a", "bc", "def\n"], 3000)))
  config = config_lib.apply_overrides(scaling_laws.get_config("tiny"), [
      f"--config.workdir={tmp_path / 'run'}", "--config.progress_bar=false",
      f"--config.data.text_file={text}"])
  scaling_laws.run(config, experiment="scaling_laws:tiny")
  fit = json.loads((tmp_path / "run" / "fit.json").read_text())
  assert [p["run"] for p in fit["points"]] == ["L1_D16", "L1_D32", "L2_D32"]
  assert (tmp_path / "run" / "scaling_law.png").exists()
  metrics = tmp_path / "run" / "L1_D16" / "metrics.jsonl"
  stamp = metrics.stat().st_mtime_ns
  scaling_laws.run(config, experiment="scaling_laws:tiny")
  assert metrics.stat().st_mtime_ns == stamp
  assert json.loads((tmp_path / "run" / "fit.json").read_text())["points"] == fit["points"]
