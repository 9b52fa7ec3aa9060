"""Classification metrics (accuracy, per-class and macro precision/recall/F1) and plots.

Macro averages follow scikit-learn's conventions: over the classes that occur in the labels
or the predictions, with 0 for an undefined ratio (a class never predicted has precision 0).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[true class, predicted class] counts."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
  return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
  tp = np.diag(cm).astype(np.float64)
  predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  return {"precision": precision, "recall": recall, "f1": f1, "support": actual,
          "present": (predicted + actual) > 0}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           num_classes: int) -> dict[str, float]:
  cm = confusion_matrix(labels, predictions, num_classes)
  pc = per_class(cm)
  present = pc["present"]
  return {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
          "precision_macro": float(pc["precision"][present].mean()),
          "recall_macro": float(pc["recall"][present].mean()),
          "f1_macro": float(pc["f1"][present].mean())}


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path,
                          title: str = "confusion matrix") -> None:
  """Row-normalized heatmap (each true class sums to 1); counts annotated when it is small."""
  n = len(class_names)
  rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.35 * n, 24)
  fig, ax = plt.subplots(figsize=(size, size * 0.85))
  image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046)
  if n <= 20:
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
