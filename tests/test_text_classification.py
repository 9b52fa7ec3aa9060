"""SST-2 and CLINC150 builders on the local files, batching helpers, OOS rules, tiny runs."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import experiments
from experiments import clinc_intent
from research import config as config_lib
from research.data import sources
from research.data import text_classification as tc
from research.data.subword import PAD
from research.train import loop

SST2 = sources.manual_dir("sst2")
CLINC = sources.manual_dir("clinc_oos")
needs_sst2 = pytest.mark.skipif(SST2 is None, reason="no local SST-2 files")
needs_clinc = pytest.mark.skipif(CLINC is None, reason="no local CLINC150 files")


@needs_sst2
def test_sst2_counts():
  data = tc.load_sst2()
  sizes = {split: len(texts) for split, (texts, _) in data.splits.items()}
  assert sizes == {"train": 67_349, "validation": 872, "test": 1_821}
  assert set(data.split("train")[1]) == {0, 1} and set(data.split("test")[1]) == {-1}
  assert data.split("validation")[0][0] == "it 's a charming and often affecting journey ."


@needs_sst2
def test_sst2_from_glue_zip(tmp_path):
  with zipfile.ZipFile(tmp_path / "SST-2.zip", "w") as z:
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
      z.write(SST2 / name, f"SST-2/{name}")
  from_zip, from_tsv = tc.load_sst2(str(tmp_path)), tc.load_sst2()
  for split in ("train", "validation", "test"):
    assert from_zip.split(split)[0] == from_tsv.split(split)[0]
    np.testing.assert_array_equal(from_zip.split(split)[1], from_tsv.split(split)[1])


@needs_clinc
def test_clinc_counts():
  data = tc.load_clinc_oos()
  assert len(data.class_names) == 151 and data.class_names[-1] == "oos"
  for split, (in_scope, oos) in {"train": (15_000, 100), "validation": (3_000, 100),
                                 "test": (4_500, 1_000)}.items():
    texts, labels = data.split(split)
    assert len(texts) == in_scope + oos and (labels == 150).sum() == oos
    assert np.bincount(labels[labels < 150], minlength=150).min() == in_scope // 150


def test_missing_or_bad_data_is_a_data_error(tmp_path):
  with pytest.raises(sources.DataError, match="not a directory"):
    tc.load_sst2(str(tmp_path / "nowhere"))
  with pytest.raises(sources.DataError, match="missing train.tsv, dev.tsv, test.tsv"):
    tc.load_sst2(str(tmp_path))
  with pytest.raises(sources.DataError, match="missing clinc_oos.zip"):
    tc.load_clinc_oos(str(tmp_path))
  for name, text in (("train.tsv", "sentence\tlabel\ngood\t1\n"),
                     ("dev.tsv", "sentence\tlabel\nbad film\t7\n"),
                     ("test.tsv", "index\tsentence\n0\tfine\n")):
    (tmp_path / name).write_text(text)
  with pytest.raises(sources.DataError, match=r"dev.tsv: line 2"):
    tc.load_sst2(str(tmp_path))
  (tmp_path / "SST-2.zip").write_text("not a zip")
  with pytest.raises(sources.DataError, match="is not GLUE's SST-2.zip"):
    tc.load_sst2(str(tmp_path))


def test_unknown_split_is_a_data_error():
  data = tc.TextClassification("toy", {"train": (["a"], np.zeros(1, np.int32))}, ["x"])
  with pytest.raises(sources.DataError, match="no split 'dev'; splits: train"):
    data.split("dev")


def test_trim_padding_and_bag_of_words():
  tokens = np.array([[5, 6, 0, 0, 0, 0, 0, 0, 0, 0], [7, 8, 9, 0, 0, 0, 0, 0, 0, 0]])
  assert tc.trim_padding(tokens, 2).shape == (2, 4)
  assert tc.trim_padding(tokens, 8).shape == (2, 8)
  assert tc.trim_padding(tokens, 16).shape == (2, 10)  # never wider than the input
  counts = tc.bag_of_words(np.array([[5, 5, 7, PAD]]), 10)
  np.testing.assert_array_equal(counts, [[0, 0, 0, 0, 0, 2, 0, 1, 0, 0]])


def test_length_bucketed_batches():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 40, 1000)
  batches = tc.LengthBucketedBatches({"id": np.arange(1000)}, lengths, 20, seed=3, window=10)
  epoch = np.concatenate([batches(step)["id"] for step in range(50)])
  assert sorted(epoch) == list(range(1000))  # every example once per pass
  np.testing.assert_array_equal(batches(7)["id"], tc.LengthBucketedBatches(
      {"id": np.arange(1000)}, lengths, 20, seed=3, window=10)(7)["id"])  # a function of the step
  assert not np.array_equal(batches(50)["id"], batches(0)["id"])  # passes differ
  spread = np.mean([np.ptp(lengths[batches(step)["id"]]) for step in range(50)])
  assert spread < 10  # random batches of 20 would span about 35


def test_oos_metrics_and_threshold_rule():
  oos = 3
  labels = np.array([0, 1, 2, 3, 3])
  predictions = np.array([0, 2, 3, 3, 1])
  m = clinc_intent.oos_metrics(labels, predictions, oos)
  assert m == {"in_scope_accuracy": 1 / 3, "oos_recall": 0.5, "oos_precision": 0.5}
  # Confident in-scope queries, unsure oos queries: the val-chosen threshold separates them.
  logits = np.log(np.array([[.9, .05, .05], [.05, .9, .05], [.4, .3, .3], [.35, .35, .3]]))
  rule = clinc_intent.ThresholdRule(oos)
  predictions, metrics = rule("val", logits, np.array([0, 1, oos, oos]))
  np.testing.assert_array_equal(predictions, [0, 1, oos, oos])
  assert 0.4 < metrics["oos_threshold"] <= 0.9
  predictions, _ = rule("test", np.log(np.array([[.2, .7, .1], [.34, .33, .33]])), np.array([1, oos]))
  np.testing.assert_array_equal(predictions, [1, oos])


def _run_tiny(spec, tmp_path, *overrides):
  name, _ = experiments.parse_name(spec)
  config = config_lib.apply_overrides(experiments.get_config(spec), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false", *overrides])
  return loop.train(experiments.load(name).build(config), config, experiment=spec)


def _check_run(results, workdir: Path, splits, extra=()):
  for split in splits:
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss", *extra):
      assert np.isfinite(results[split][key]), (split, key)
    assert (workdir / f"confusion_{split}.png").exists()
    report = json.loads((workdir / f"per_class_{split}.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(results[split]["accuracy"])


@needs_sst2
def test_sst2_tiny_end_to_end(tmp_path):
  """MLM phase (its own run folder) then fine-tuning; resuming repeats neither."""
  results = _run_tiny("sst2_sentiment:tiny", tmp_path)
  _check_run(results, tmp_path, ("val", "test"))
  assert (tmp_path / "pretrain" / "checkpoints").is_dir()
  assert (tmp_path / "tokenizer" / "spm.model").exists()
  lines = (tmp_path / "metrics.jsonl").read_text()
  again = _run_tiny("sst2_sentiment:tiny", tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == lines
  assert again["test"]["accuracy"] == results["test"]["accuracy"]


@needs_sst2
def test_build_writes_nothing_and_the_pretraining_phase_resumes(tmp_path):
  """`build` trains and writes nothing; the loop runs the declared MLM phase, which resumes
  from its own checkpoint like any run (here, one stopped after 2 of its 4 steps)."""
  spec = "sst2_sentiment:tiny"
  config = config_lib.apply_overrides(experiments.get_config(spec), [
      f"--config.workdir={tmp_path / 'run'}", "--config.progress_bar=false",
      "--config.pretrain.checkpoint_every=2"])
  task = experiments.load("sst2_sentiment").build(config)
  assert not (tmp_path / "run").exists()
  (phase,) = task.phases
  assert phase.name == "pretrain" and phase.config.steps == 4
  stopped = config_lib.apply_overrides(phase.config, ["--config.steps=2", "--config.decay_steps=4"])
  loop.train(phase.task, stopped, experiment=f"{spec}/pretrain")
  asked = []
  train_data = phase.task.train_data
  phase.task.train_data = lambda step: asked.append(step) or train_data(step)
  loop.train(task, config, experiment=spec)
  assert asked == [2, 3]  # resumed at the checkpoint of step 2, not restarted
  rows = [json.loads(l) for l in (tmp_path / "run" / "pretrain" / "metrics.jsonl").open()]
  assert [r["step"] for r in rows if r["split"] == "val"] == [2, 4]
  assert (tmp_path / "run" / "checkpoints").is_dir()


@needs_sst2
def test_sst2_tiny_bilstm(tmp_path):
  results = _run_tiny("sst2_sentiment:tiny", tmp_path, "--config.model.kind=bilstm",
                      "--config.pretrain.steps=0")
  _check_run(results, tmp_path, ("val", "test"))


@needs_clinc
def test_clinc_tiny_end_to_end(tmp_path):
  results = _run_tiny("clinc_intent:tiny", tmp_path / "train")
  _check_run(results, tmp_path / "train", ("val", "test"),
             ("in_scope_accuracy", "oos_recall", "oos_precision"))
  results = _run_tiny("clinc_intent:tiny", tmp_path / "mlp", "--config.model.kind=mlp",
                      "--config.data.oos=threshold")
  _check_run(results, tmp_path / "mlp", ("val", "test"), ("oos_threshold",))


def test_bad_config_is_a_config_error(tmp_path):
  config = config_lib.apply_overrides(experiments.get_config("clinc_intent:tiny"), [
      f"--config.workdir={tmp_path}", "--config.data.oos=sometimes"])
  with pytest.raises(config_lib.ConfigError, match="unknown config.data.oos"):
    experiments.load("clinc_intent").build(config)
