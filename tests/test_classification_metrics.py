"""research.evaluate.classification against scikit-learn on random labels."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from research.evaluate.classification import (classification_metrics, confusion_matrix, per_class,
                                              plot_confusion_matrix)
from research.tasks.classification import write_report


def _random_labels(seed, n, num_classes, absent=()):
  """Labels and predictions over `num_classes`, some classes absent from the labels."""
  rng = np.random.default_rng(seed)
  present = [c for c in range(num_classes) if c not in absent]
  labels = rng.choice(present, n)
  # Mostly right, so per-class scores spread out; some predictions hit absent classes.
  predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, n))
  return labels, predictions


@pytest.mark.parametrize("seed,num_classes,absent", [(0, 2, ()), (1, 7, (3,)), (2, 151, (5, 77))])
def test_metrics_match_sklearn(seed, num_classes, absent):
  labels, predictions = _random_labels(seed, 500, num_classes, absent)
  ours = classification_metrics(labels, predictions, num_classes)
  p, r, f, _ = skm.precision_recall_fscore_support(labels, predictions, average="macro",
                                                   zero_division=0)
  assert ours["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert ours["precision_macro"] == pytest.approx(p)
  assert ours["recall_macro"] == pytest.approx(r)
  assert ours["f1_macro"] == pytest.approx(f)


def test_confusion_matrix_and_per_class_match_sklearn():
  labels, predictions = _random_labels(3, 300, 6, absent=(4,))
  cm = confusion_matrix(labels, predictions, 6)
  np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, predictions, labels=range(6)))
  pc = per_class(cm)
  p, r, f, s = skm.precision_recall_fscore_support(labels, predictions, labels=range(6),
                                                   average=None, zero_division=0)
  np.testing.assert_allclose(pc["precision"], p)
  np.testing.assert_allclose(pc["recall"], r)
  np.testing.assert_allclose(pc["f1"], f)
  np.testing.assert_array_equal(pc["support"], s)


def test_report_files(tmp_path):
  labels, predictions = _random_labels(4, 200, 12)
  names = [f"class_{i}" for i in range(12)]
  metrics = classification_metrics(labels, predictions, 12)
  write_report(tmp_path, "test", labels, predictions, names, metrics)
  report = json.loads((tmp_path / "per_class_test.json").read_text())
  assert report["metrics"] == metrics and list(report["classes"]) == names
  assert report["classes"]["class_3"]["support"] == (labels == 3).sum()
  assert (tmp_path / "confusion_test.png").stat().st_size > 0


def test_plot_handles_many_classes(tmp_path):
  labels, predictions = _random_labels(5, 2000, 151)
  cm = confusion_matrix(labels, predictions, 151)
  plot_confusion_matrix(cm, [str(i) for i in range(151)], tmp_path / "cm.png")
  assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
