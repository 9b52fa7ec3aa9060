"""Induction-heads experiment: the repeated-segment data and the tiny variant end to end."""

import json

import numpy as np
import pytest

from experiments import induction_heads
from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.interpret.attention import attention_maps
from research.load import load_model
from research.train import loop


def test_repeated_segments_repeat_the_first_n_tokens_once():
  n_B = np.array([2, 4, 8])
  tokens_BxT1 = induction_heads.repeated_segments(np.random.default_rng(0), 3, 16, 50, n_B)
  assert tokens_BxT1.shape == (3, 17)
  for row, n in zip(tokens_BxT1, n_B):
    np.testing.assert_array_equal(row[n:2 * n], row[:n])
  batch = induction_heads._with_probes(tokens_BxT1, n_B)
  # Regions: targets inside the first occurrence / inside the repeat (predictable).
  assert batch["first"][1].tolist() == [1, 1, 1] + [0] * 13
  assert batch["repeat"][1].tolist() == [0] * 4 + [1, 1, 1] + [0] * 9
  t = np.arange(16)
  keys = batch["induction_keys"][2]
  np.testing.assert_array_equal(keys[8:16], t[8:16] - 8 + 1)
  # Inside the repeat, the induction target holds the token that comes next.
  np.testing.assert_array_equal(batch["inputs"][2][keys[8:15]], batch["targets"][2][8:15])


def test_tiny_variant_logs_region_losses_and_head_scores(tmp_path):
  config = config_lib.apply_overrides(induction_heads.get_config("tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false"])
  loop.train(induction_heads.build(config), config, experiment="induction_heads:tiny")
  val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "val"]
  for key in ("loss_first_half", "loss_repeated_half", "induction_score",
              "prefix_matching_score", "previous_token_score"):
    assert key in val[-1], key
  # The logged score is the best head's mean attention, over every query of the repeat, to
  # the token after that query's earlier occurrence: recomputed here from the saved model.
  model, _, _ = load_model(tmp_path)
  n = config.data.context // 2  # validation segments fill half the context, then repeat
  t = np.arange(n, 2 * n)
  per_head = []
  for batch in induction_heads.build(config).eval_data["val"]():
    np.testing.assert_array_equal(batch["inputs"][:, t], batch["inputs"][:, t - n])
    maps_LxBxHxTxS = np.asarray(attention_maps(model, batch["inputs"]))
    per_head.append(maps_LxBxHxTxS[:, :, :, t, t - n + 1])  # [L, B, H, n]
  per_head_LxH = np.concatenate(per_head, axis=1).mean(axis=(1, 3))
  assert val[-1]["induction_score"] == pytest.approx(per_head_LxH.max(), rel=1e-5)
  summary = json.loads((tmp_path / "phase_change.json").read_text())
  assert np.shape(summary["per_head"]["induction"]) == (2, 2)
  for name in ("phase_change.png", "heads.png", "attention_layer0.png", "attention_layer1.png"):
    assert (tmp_path / name).exists(), name
