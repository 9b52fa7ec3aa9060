"""Spoken digits from unseen speakers: leave-one-speaker-out over FSDD's six speakers.

Command:  make experiment NAME=spoken_digits_speakers ARGS=--config.workdir=runs/spoken_digits_speakers
          make experiment NAME=spoken_digits_speakers:transformer   (or :mlp; :tiny for tests)
          ... ARGS="--config.steps=500 --config.speakers=theo,george"   (shorter, fewer folds)
Expected: one spoken_digits run per speaker (`<workdir>/<speaker>`: trained on the other five
          speakers' 2,500 recordings, tested on that speaker's 500), then `speakers.json` and
          `speakers.png` with each speaker's accuracy and macro F1 and their mean and standard
          deviation: what a product meets when a new customer speaks. Accuracy on an unseen
          speaker is far below the official split's (which has every speaker in training):
          `cnn` 76.4% +- 16.3 (42.6% on nicolas to 93.0% on lucas) against 100% there,
          `transformer` 55.6% +- 13.8 against 96.3%, `mlp` 42.2% +- 12.9 against 89.3%.
Runtime:  six times one spoken_digits run of the same variant: `mlp` 4.5 minutes on a 2-core
          CPU; `cnn` 45 and `transformer` 53 minutes, each on one core (one XLA device);
          `tiny` seconds. A rerun skips the speakers already finished.
Data:     as spoken_digits (FSDD v1.0.10).
"""

import json
from pathlib import Path

import ml_collections
import numpy as np

from experiments import _multirun
from research.config import ConfigError
from research.data import speech

VARIANTS = ("cnn", "transformer", "mlp", "tiny")


def get_config(variant: str = "cnn") -> ml_collections.ConfigDict:
  import experiments

  c = experiments.get_config(f"spoken_digits:{variant}")
  c.speakers = ",".join(speech.SPEAKERS)  # the folds to run, comma-separated
  return c


def run(config, *, experiment: str) -> dict[str, dict]:
  import experiments

  _, variant = experiments.parse_name(experiment)
  spec = f"spoken_digits:{variant or VARIANTS[0]}"
  speakers = [s.strip() for s in config.speakers.split(",") if s.strip()]
  unknown = [s for s in speakers if s not in speech.SPEAKERS]
  if unknown or not speakers:
    raise ConfigError(f"config.speakers: {', '.join(unknown) or '(none)'} not FSDD speakers; "
                      f"choose among {', '.join(speech.SPEAKERS)}")
  if config.data.folder or config.data.protocol != "official" or config.data.test_speaker:
    raise ConfigError("spoken_digits_speakers sets the protocol itself: leave config.data.folder, "
                      "protocol and test_speaker at their defaults")
  workdir = Path(config.workdir)
  _multirun.write_config(config, experiment)
  results = {}
  for speaker in speakers:
    data = {**config.data.to_dict(), "protocol": "speaker", "test_speaker": speaker}
    sub = _multirun.derive(config, spec, workdir=str(workdir / speaker), data=data)
    rows = _multirun.train_or_read(spec, sub)
    test = [r for r in rows if r["split"] == "test"][-1]
    results[speaker] = {"accuracy": test["accuracy"], "f1_macro": test["f1_macro"]}
    print(f"spoken_digits_speakers: {speaker}: accuracy {test['accuracy']:.4f}")
  accuracy = np.array([r["accuracy"] for r in results.values()])
  f1 = np.array([r["f1_macro"] for r in results.values()])
  results["mean"] = {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
                     "f1_macro": float(f1.mean()), "f1_macro_std": float(f1.std())}
  (workdir / "speakers.json").write_text(json.dumps(
      {"variant": spec, "steps": config.steps, **results}, indent=2) + "\n")
  _plot(results, speakers, workdir / "speakers.png", spec)
  print(f"speakers.json and speakers.png in {workdir}")
  return results


def _plot(results, speakers, path, spec):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 3.8))
  values = [100 * results[s]["accuracy"] for s in speakers]
  ax.bar(speakers, values, color="tab:blue")
  mean = 100 * results["mean"]["accuracy"]
  ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}%")
  for i, v in enumerate(values):
    ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
  ax.set_ylim(0, 105)
  ax.set_ylabel("test accuracy on the held-out speaker (%)")
  ax.set_title(f"FSDD leave-one-speaker-out ({spec})")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
