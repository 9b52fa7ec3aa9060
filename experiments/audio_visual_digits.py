"""Audio-visual digits (after AV-MNIST): does fusing a noisy spoken digit with an occluded, noisy image beat either alone?

Command:  make experiment NAME=audio_visual_digits          (variant `late`, the default)
          make experiment NAME=audio_visual_digits:early    (or :attention, :audio, :image; :tiny for tests)
          ... ARGS=--config.seed=1                          (another model seed; same data)
          python -m experiments audio_visual_digits summarize RUN [RUN ...]
                                              (mean and spread per model over seeds, fusion gain;
                                              runs of one setting, as long as each other)
Expected: test accuracy over model seeds 0-2 (mean ± std; 1000 steps; the data fixed): `audio`
          89.2% ± 0.4, `image` 73.2% ± 1.8, `late` 94.3% ± 1.0, `early` 93.1% ± 1.3,
          `attention` 73.3% ± 2.1: late fusion beats the best single modality (the audio) by
          +5.1 ± 1.3 points, paired by seed. With one input missing, `late` keeps 71.2% (no
          audio) and 85.7% (no image); `attention` leans on the audio (30.0% without it). At
          500 steps (--config.steps=500 --config.eval_every=250): audio 52.6%, image 69.6%,
          late 73.6% (+4.0 ± 2.4 over the image), early 71.3%, attention 54.4%; without the
          auxiliary per-modality losses (--config.aux_weight=0; seed 0, 500 steps) fusion
          loses to the image alone: late 68.3%, early 64.0%, attention 58.3%.
Runtime:  on the shared 2-core CPU, 1000 steps: 2-7.5 minutes a run (eight at a time; the
          attention model 3.6 minutes, three at a time); `tiny` seconds.
Data:     each example pairs an FSDD clip (official split: test = recordings 0-4, 300 clips;
          train 2,700) with a scikit-learn `load_digits` 8x8 image of the same digit (the
          1,797 images split 70/30 into disjoint train and test images, stratified; pairs and
          split fixed by config.data.data_seed, not by the model seed). Degradation
          (config.data.degrade): white noise over the whole 1 s window at 0..6 dB SNR per
          clip, a blanked 3x3 square and Gaussian pixel noise of std 0.4 (pixels in [0, 1]). Training batches draw fresh noise; the test pairs are
          degraded once (research/data/audio_visual.py).
Models:   research/models/fusion.py: `audio` / `image` a small ResNet (widths 16, 32, 64) on the 61x40
          log-mels / the image; `late` both, averaging their log-probabilities; `early` both as
          64-d encoders, concatenated into an MLP; `attention` a cross-attention Transformer
          (audio tokens = 4x8 log-mel patches, image tokens = 2x2 pixel patches; each layer's
          audio tokens attend to themselves and to the image tokens and vice versa).
          Fusion models add each modality's own classifier's loss (config.aux_weight) and
          train with modality dropout (config.modality_dropout: an example loses
          its audio or its image, zeroed, with that probability) and replace a missing input by
          a learned embedding (late fusion: the other's log-probabilities alone). Every run
          reports `test`, `test_no_audio` and `test_no_image` accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from research import config as config_lib
from research.audio import AugmentConfig, LogMelConfig
from research.config import ConfigError
from research.data import audio_visual as av
from research.data import speech
from research.evaluate.writer import read_metrics
from research.models.cnn import CNNConfig
from research.models.fusion import FUSIONS, KINDS, CrossTransformerConfig, FusionClassifier, FusionConfig
from research.models.mlp import MLPConfig
from research.tasks.audio_visual import MISSING, audio_visual_task

VARIANTS = ("late", "early", "attention", "audio", "image", "tiny")


def get_config(variant: str = "late") -> ml_collections.ConfigDict:
  c = config_lib.base()
  # data_seed fixes the image split, the pairs and the test set's degradation; max_per_class
  # > 0 keeps that many clips of each digit per split (quick runs).
  c.data = dict(manual_dir="", data_seed=0, image_test_fraction=0.3, max_per_class=0,
                time_shift=True,
                degrade=config_lib.model_config(av.Degrade))
  c.features = config_lib.model_config(LogMelConfig, exclude=("mean", "std"))
  c.augment = config_lib.model_config(AugmentConfig, time_masks=1, time_mask_width=6,
                                      freq_masks=1, freq_mask_width=5)
  # Probability that a training example of a fusion model loses one input (unused by the
  # single-modality models).
  c.modality_dropout = 0.3
  # Fusion models: weight of each modality's own classifier's loss beside the fused one's
  # (0: no auxiliary classifiers). See research.tasks.audio_visual.fusion_loss.
  c.aux_weight = 1.0
  # `kind` picks the model, config.model.<kind> its own fields; the late and early fusions
  # also use the `audio` and `image` sections' CNNs as their two branches.
  cnn = dict(exclude=("channels", "num_classes"), widths=(16, 32, 64), dropout=0.1)
  c.model = dict(
      kind=variant if variant in KINDS else "attention",  # tiny: the Transformer
      audio=config_lib.model_config(CNNConfig, **cnn),
      image=config_lib.model_config(CNNConfig, **cnn),
      late=dict(),
      # embed_dim: each branch's features; the MLP classifies their concatenation.
      early=dict(embed_dim=64, hidden_sizes=(64,), dropout=0.2),
      attention=config_lib.model_config(CrossTransformerConfig))
  c.eval_batch_size = 100
  c.update(steps=1000, batch_size=64, learning_rate=2e-3, min_learning_rate=1e-5,
           warmup_steps=50, grad_clip=1.0, eval_every=500, log_every=50, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.05)
  if variant == "attention":
    c.update(learning_rate=1e-3)
  elif variant == "tiny":
    c.model.audio.widths = (4, 8)
    c.model.image.widths = (4, 8)
    c.model.early.update(embed_dim=8, hidden_sizes=(8,))
    c.model.attention.update(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32)
    c.data.max_per_class = 4
    c.eval_batch_size = 40
    c.update(steps=8, batch_size=16, warmup_steps=2, eval_every=4, log_every=2,
             checkpoint_every=4)
  elif variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}")
  return c


def model_config(config, frontend: LogMelConfig) -> FusionConfig:
  m, classes = config.model, len(speech.DIGITS)
  if m.kind not in KINDS:
    raise ConfigError(f"unknown config.model.kind {m.kind!r}; valid names: {', '.join(KINDS)}")
  try:
    early = m.early
    return FusionConfig(
        frontend=frontend, augment=AugmentConfig(**config.augment), kind=m.kind,
        num_classes=classes, image_side=av.IMAGE_SIDE,
        audio_cnn=CNNConfig(**m.audio), image_cnn=CNNConfig(**m.image),
        embed_dim=early.embed_dim,
        head=MLPConfig(in_features=2 * early.embed_dim, out_features=classes,
                       hidden_sizes=tuple(early.hidden_sizes), dropout=early.dropout),
        transformer=CrossTransformerConfig(**m.attention), dtype=config.compute_dtype,
        labels=speech.DIGITS, aux_heads=m.kind in FUSIONS and config.aux_weight > 0)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None


def build(config):
  d = config.data
  try:
    frontend = LogMelConfig(**config.features)
    frontend.check()
    degrade = av.Degrade(**d.degrade)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.features / config.data.degrade: {e}") from None
  if config.aux_weight < 0:
    raise ConfigError(f"config.aux_weight={config.aux_weight} is negative")
  if not 0 <= config.modality_dropout <= 1:
    raise ConfigError(f"config.modality_dropout={config.modality_dropout} is not a probability")
  pairs = av.load(d.manual_dir, sample_rate=frontend.sample_rate,
                  clip_samples=frontend.clip_samples, data_seed=d.data_seed,
                  test_fraction=d.image_test_fraction, max_per_class=d.max_per_class)
  if len(pairs["train"]) < config.batch_size:
    raise ConfigError(f"{len(pairs['train'])} training pairs are fewer than one batch of "
                      f"{config.batch_size}; lower --config.batch_size")

  def make_model(normalized: LogMelConfig):
    try:
      model = FusionClassifier(model_config(config, normalized), rngs=nnx.Rngs(config.seed))
    except ValueError as e:
      raise ConfigError(f"config.model: {e}") from None
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"audio_visual_digits: {config.model.kind}, {params:,} parameters, "
          f"{len(pairs['train'])} train / {len(pairs['test'])} test pairs", file=sys.stderr)
    return model

  fusion = config.model.kind in FUSIONS
  return audio_visual_task(config, make_model, pairs, speech.DIGITS, frontend=frontend,
                           degrade=degrade, data_seed=d.data_seed,
                           modality_dropout=config.modality_dropout if fusion else 0.0,
                           eval_batch_size=config.eval_batch_size, time_shift=d.time_shift,
                           aux_weight=config.aux_weight if fusion else 0.0)


def summarize(argv: list[str]) -> int:
  """Prints, per model kind, the mean and standard deviation over the given runs (seeds) of the
  final test accuracies, and the best fusion model's gain over the best single modality."""
  parser = argparse.ArgumentParser(prog="python -m experiments audio_visual_digits summarize")
  parser.add_argument("runs", nargs="+", help="run folders of this experiment")
  parser.add_argument("--json", default="", help="also write the table to this file")
  args = parser.parse_args(argv)
  from research.train.loop import RESUMABLE_CHANGES

  # Config fields that may differ between the runs averaged: the seed, the variant's name, and
  # what a run may change on resuming except its length.
  free = {"seed", "experiment"} | (RESUMABLE_CHANGES - {"steps", "decay_steps"})
  per_kind: dict[str, list[dict]] = {}
  first: dict[str, tuple[str, dict]] = {}  # "all" and each kind: its first run and setting
  for run in args.runs:
    config_path = Path(run) / "config.json"
    if not config_path.exists():
      raise ConfigError(f"{run} is not a run folder (no config.json)")
    config = json.loads(config_path.read_text())
    kind = config["model"]["kind"]
    # Averaged together: runs of one kind alike but for the seed (and how they were logged);
    # compared: runs as long as each other, on the same data.
    setting = {k: v for k, v in config.items() if k not in free
               and not (kind not in FUSIONS and k in ("aux_weight", "modality_dropout"))}
    for group, keys in (("all", ("steps", "batch_size", "data", "features")), (kind, ())):
      other, theirs = first.setdefault(group, (run, setting))
      differ = [k for k in keys or sorted(set(setting) | set(theirs))
                if setting.get(k) != theirs.get(k)]
      if differ:
        raise ConfigError(f"{run} and {other} differ in {', '.join(differ)}: summarize runs "
                          f"of one setting together")
    rows = [r for r in read_metrics(Path(run) / "metrics.jsonl") if r["step"] == config["steps"]]
    final = {r["split"]: r["accuracy"] for r in rows if r["split"] in MISSING}
    if set(final) != set(MISSING):
      raise ConfigError(f"{run} has not been evaluated at its last step ({config['steps']})")
    per_kind.setdefault(kind, []).append({"seed": config["seed"], **final})
  table = {}
  for kind in KINDS:
    if kind not in per_kind:
      continue
    runs = per_kind[kind]
    table[kind] = {"seeds": sorted(r["seed"] for r in runs)}
    for split in MISSING:
      values = np.array([r[split] for r in runs])
      table[kind][split] = {"mean": float(values.mean()), "std": float(values.std())}
  singles = [k for k in ("audio", "image") if k in table]
  fusions = [k for k in FUSIONS if k in table]
  print("| model | seeds | test accuracy | audio missing | image missing |")
  print("|---|---|---|---|---|")
  for kind, t in table.items():
    cells = [f"{100 * t[s]['mean']:.2f} ± {100 * t[s]['std']:.2f}" for s in MISSING]
    print(f"| {kind} | {len(t['seeds'])} | {' | '.join(cells)} |")
  if singles and fusions:
    best_single = max(singles, key=lambda k: table[k]["test"]["mean"])
    best_fusion = max(fusions, key=lambda k: table[k]["test"]["mean"])
    by_seed = {k: {r["seed"]: r["test"] for r in per_kind[k]} for k in (best_single, best_fusion)}
    seeds = sorted(set(by_seed[best_single]) & set(by_seed[best_fusion]))
    gains = np.array([by_seed[best_fusion][s] - by_seed[best_single][s] for s in seeds])
    table["fusion_gain"] = {"fusion": best_fusion, "single": best_single, "seeds": seeds,
                            "mean": float(gains.mean()) if seeds else float("nan"),
                            "std": float(gains.std()) if seeds else float("nan")}
    print(f"fusion gain ({best_fusion} over {best_single}, paired by seed over {len(seeds)}): "
          f"{100 * gains.mean():+.2f} ± {100 * gains.std():.2f} points")
  if args.json:
    Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
  return 0


COMMANDS = {"summarize": summarize}
