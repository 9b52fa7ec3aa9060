"""benchmarks/speedrun (`make speedrun`): time to target, the recipe's changes, the command."""

import json

import pytest

import experiments
from benchmarks import speedrun
from experiments.gpt_shakespeare import SPEEDRUN_CHANGES
from research import config as config_lib


def _snapshots(losses):
  return [{"seconds": 10.0 * (i + 1), "step": i, "loss": loss} for i, loss in enumerate(losses)]


def _counting_scorer(calls):
  def score(snapshot):
    calls.append(snapshot["step"])
    return snapshot["loss"]
  return score


@pytest.mark.parametrize("every", [0, 3])
def test_time_to_target_finds_the_first_snapshot_at_or_below_it_scoring_few(every):
  losses = [3.0, 2.6, 2.3, 2.1, 2.0, 1.95, 1.93, 1.91, 1.905, 1.90, 1.899, 1.898, 1.897]
  snaps, calls = _snapshots(losses), []
  seconds, target = speedrun.time_to_target(snaps, _counting_scorer(calls), 1.906, every=every)
  assert (seconds, target) == (90.0, 1.906)  # index 8, loss 1.905
  assert len(calls) == len(set(calls)) < len(losses) // 2 + 2
  assert [p for p, _ in speedrun.curve(snaps)] == sorted(10.0 * (i + 1) for i in calls)


def test_time_to_target_of_a_run_against_its_own_end():
  snaps = _snapshots([2.5, 2.0, 1.9, 1.89, 1.9])  # reaches its final loss before the end
  seconds, target = speedrun.time_to_target(snaps, _counting_scorer([]), every=1)
  assert (seconds, target) == (30.0, 1.9)
  never = _snapshots([2.5, 2.2, 2.0])
  assert speedrun.time_to_target(never, _counting_scorer([]), 1.9)[0] is None


def test_each_speedrun_change_changes_baby_and_all_of_them_make_the_recipe():
  labels = [label for label, _ in SPEEDRUN_CHANGES]
  assert len(set(labels)) == len(labels)
  config = experiments.get_config("gpt_shakespeare:baby")
  for label, overrides in SPEEDRUN_CHANGES:
    changed = config_lib.apply_overrides(config, overrides)
    assert changed.to_dict() != config.to_dict(), f"{label!r} changes nothing"
    config = changed
  recipe = experiments.get_config("gpt_shakespeare:speedrun")
  cadence = ("eval_every", "checkpoint_every")
  assert ({k: v for k, v in config.to_dict().items() if k not in cadence}
          == {k: v for k, v in recipe.to_dict().items() if k not in cadence})


def test_speedrun_command_runs_both_sides_and_writes_the_report(tmp_path):
  out = tmp_path / "results"
  assert speedrun.main(["--tiny", "--seeds", "0", "--stride", "997", "--snapshot-every", "0",
                        "--curve-every", "2", "--out", str(out)]) == 0
  report = json.loads((out / "speedrun.json").read_text())
  rows = {r["run"]: r for r in report["rows"]}
  assert set(rows) == {"pytorch", "speedrun"}
  assert rows["pytorch"]["steps"] == rows["speedrun"]["steps"] == 6
  target = rows["pytorch"]["target"]
  assert rows["pytorch"]["final_val_loss"] == target == rows["speedrun"]["target"]
  for name in ("pytorch/0", "speedrun/0"):
    seconds = [s for s, _ in report["curves"][name]]
    assert len(seconds) >= 2 and seconds == sorted(seconds) and seconds[0] > 0
  if rows["speedrun"]["seconds_to_target"] is not None:
    assert report["ratio"] == pytest.approx(
        rows["speedrun"]["seconds_to_target"] / rows["pytorch"]["seconds_to_target"])
  assert "| 0 | " in (out / "speedrun.md").read_text()
  assert (out / "speedrun.png").stat().st_size > 0


def test_report_has_the_ablation_table_with_medians_over_seeds(tmp_path):
  import argparse
  rows, labels = [], ["baby", "+ Muon for the weight matrices", "speedrun"]
  for seed, (torch_s, baby_s, muon_s, ours_s) in enumerate([(100, None, 80, 40), (110, 120, 70, 50),
                                                             (90, None, 60, 30)]):
    target = 1.9 + seed / 100
    rows.append({"run": "pytorch", "seed": seed, "target": target, "seconds_to_target": torch_s,
                 "final_val_loss": target, "steps": 2000})
    for label, s in zip(labels, (baby_s, muon_s, ours_s)):
      rows.append({"run": label, "seed": seed, "target": target, "seconds_to_target": s,
                   "final_val_loss": 1.8 + seed / 100, "steps": 225,
                   "ratio": None if s is None else s / torch_s})
  args = argparse.Namespace(out=tmp_path, seeds=[0, 1, 2], stride=16)
  speedrun.report(args, rows, {}, labels, 60.0, ["--ablation"])
  table = (tmp_path / "speedrun.md").read_text()
  assert "| nanoGPT (PyTorch) | 2000 | 100.0 s | 1.00x | 1.9100 |" in table
  assert "| baby | 225 | not reached | not reached | 1.8100 |" in table  # 2 of 3 never got there
  assert "| + Muon for the weight matrices | 225 | 70.0 s | 0.67x | 1.8100 |" in table
  last = f"| + {SPEEDRUN_CHANGES[-1][0]} (= speedrun) | 225 | 40.0 s | 0.40x | 1.8100 |"
  assert last in table
  assert json.loads((tmp_path / "speedrun.json").read_text())["ratio"] == pytest.approx(0.4)
