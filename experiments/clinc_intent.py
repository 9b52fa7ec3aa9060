"""Intent recognition with out-of-scope detection on CLINC150: a Transformer encoder vs an MLP on bag-of-words.

Command:  make experiment NAME=clinc_intent                          (`transformer`, oos as a class)
          make experiment NAME=clinc_intent:transformer_threshold    (oos by a softmax threshold)
          make experiment NAME=clinc_intent:transformer_pretrained   (MLM phase, then oos as a class)
          make experiment NAME=clinc_intent:mlp                      (baseline, oos as a class)
          make experiment NAME=clinc_intent:mlp_threshold            (baseline, threshold)
          make experiment NAME=clinc_intent:tiny                     (seconds; for tests)
Expected: Larson et al. 2019 study two ways to handle out-of-scope queries: `oos-train` (an
          extra class trained on the 100 oos training queries; `data.oos=train`) and
          `oos-threshold` (train on in-scope queries only, predict oos when the top softmax
          probability is below a threshold chosen on validation; `data.oos=threshold`). Test
          metrics: in_scope_accuracy (the 4,500 in-scope queries; predicting oos counts as
          wrong), oos_recall and oos_precision (the 1,000 oos queries), plus accuracy and
          macro F1/precision/recall over all 151 classes. Models trained from scratch here reach
          in-scope accuracy of about 0.88-0.92 (0.91 and oos recall 0.26 for the encoder after
          MLM pretraining on the training queries); the paper's BERT-large (pretrained on books
          and Wikipedia) is far above that. See the README's results table for measured numbers.
Runtime:  about 2 (mlp) to 10 (transformer) minutes on a 2-core CPU; 15 with pretraining.
Data:     tfds `clinc_oos` (../shared/data/clinc_oos/clinc_oos.zip offline): train 15,000 +
          100 oos, validation 3,000 + 100 oos (`val`), test 4,500 + 1,000 oos (`test`). Subword
          vocabulary trained on the training queries, saved in the run folder; the MLP reads
          bag-of-words counts of those subwords.
"""

from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from research import config as config_lib
from research.data.subword import SubwordTokenizer
from research.data.subword import PAD
from research.data.text_classification import (LengthBucketedBatches, bag_of_words, load_clinc_oos,
                                                 trim_padding)
from research.models.encoder import EncoderClassifier, EncoderConfig
from research.models.mlp import MLP, MLPConfig
from research.tasks.classification import classification_task
from research.tasks.masked_lm import pretrain_encoder

VARIANTS = ("transformer", "transformer_threshold", "transformer_pretrained", "mlp",
            "mlp_threshold", "tiny")
MODELS = ("transformer", "mlp")
OOS_MODES = ("train", "threshold")
TRIM = 8


def get_config(variant: str = "transformer") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(manual_dir="", vocab_size=4000, max_len=40, oos="train", train_examples=0)
  # `kind` picks the model; config.model.<kind> holds its config's fields (the vocabulary,
  # max_len and the number of classes come from the data).
  c.model = dict(
      kind="transformer",
      transformer=config_lib.model_config(
          EncoderConfig, exclude=("vocab_size", "max_len", "num_classes"), num_layers=4,
          num_heads=4, embed_dim=128, mlp_ratio=4, dropout=0.1, attention="xla"),
      mlp=config_lib.model_config(MLPConfig, exclude=("in_features", "out_features"),
                                  hidden_sizes=(512,), dropout=0.5))
  # MLM phase before fine-tuning (transformer only; config.optimizer); steps=0: none.
  c.pretrain = dict(steps=0, batch_size=128, learning_rate=1e-3, min_learning_rate=1e-4,
                    warmup_steps=200, eval_every=1000, checkpoint_every=1000, mask_rate=0.15)
  c.eval_batch_size = 128
  c.update(steps=4000, batch_size=64, learning_rate=5e-4, min_learning_rate=1e-5,
           warmup_steps=200, eval_every=1000, checkpoint_every=1000)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=0.01)
  kind, _, suffix = variant.partition("_")
  if kind == "mlp":
    c.model.kind = "mlp"
    c.update(steps=3000, learning_rate=1e-3)
    c.optimizer.weight_decay = 0.0
  if suffix == "threshold":
    c.data.oos = "threshold"
  elif suffix == "pretrained":
    c.pretrain.steps = 3000
  if variant == "tiny":
    c.data.update(vocab_size=300, max_len=16, train_examples=1000)
    c.model.transformer.update(num_layers=1, num_heads=2, embed_dim=16)
    c.eval_batch_size = 256
    c.update(steps=8, batch_size=16, warmup_steps=2, eval_every=4, log_every=2, checkpoint_every=4)
  elif variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}")
  return c


def oos_metrics(labels_N: np.ndarray, predictions_N: np.ndarray, oos: int) -> dict:
  """Larson et al.'s metrics: accuracy on in-scope queries, recall and precision of oos."""
  in_scope, is_oos, said_oos = labels_N != oos, labels_N == oos, predictions_N == oos
  return {"in_scope_accuracy": float((predictions_N[in_scope] == labels_N[in_scope]).mean()),
          "oos_recall": float(said_oos[is_oos].mean()) if is_oos.any() else float("nan"),
          "oos_precision": float(is_oos[said_oos].mean()) if said_oos.any() else 0.0}


def softmax(logits_NxC: np.ndarray) -> np.ndarray:
  z_NxC = np.exp(logits_NxC - logits_NxC.max(axis=1, keepdims=True))
  return z_NxC / z_NxC.sum(axis=1, keepdims=True)


class ThresholdRule:
  """oos-threshold: oos when the top probability is below a threshold; the threshold is the
  one (of 0, 0.01, ..., 1) with the best accuracy on `val`, then applied to later splits."""

  def __init__(self, oos: int):
    self.oos, self.threshold = oos, None

  def predict(self, logits_NxC, threshold):
    probs_NxC = softmax(logits_NxC)
    return np.where(probs_NxC.max(axis=1) >= threshold, probs_NxC.argmax(axis=1), self.oos)

  def __call__(self, split, logits_NxC, labels_N):
    if split == "val":
      grid = np.linspace(0, 1, 101)
      accuracy = [(self.predict(logits_NxC, t) == labels_N).mean() for t in grid]
      self.threshold = float(grid[int(np.argmax(accuracy))])
    if self.threshold is None:
      raise RuntimeError("the oos threshold is chosen on `val`, which must be evaluated first")
    predictions_N = self.predict(logits_NxC, self.threshold)
    return predictions_N, {**oos_metrics(labels_N, predictions_N, self.oos),
                           "oos_threshold": self.threshold}


def build(config):
  m, d = config.model, config.data
  if m.kind not in MODELS:
    raise config_lib.ConfigError(f"unknown config.model.kind {m.kind!r}; choose one of {', '.join(MODELS)}")
  if d.oos not in OOS_MODES:
    raise config_lib.ConfigError(f"unknown config.data.oos {d.oos!r}; choose one of {', '.join(OOS_MODES)}")
  if config.pretrain.steps and m.kind != "transformer":
    raise config_lib.ConfigError("config.pretrain.steps > 0 needs config.model.kind=transformer")
  data = load_clinc_oos(d.manual_dir)
  oos = len(data.class_names) - 1
  texts, labels = data.split("train")
  if d.train_examples:  # a spread-out subset (the split is ordered in-scope then oos)
    rows = np.linspace(0, len(texts) - 1, d.train_examples).astype(int)
    texts, labels = [texts[i] for i in rows], labels[rows]
  if d.oos == "threshold":  # in-scope queries only; the model has no oos output
    keep = np.flatnonzero(labels != oos)
    texts, labels = [texts[i] for i in keep], labels[keep]
  tokenizer = SubwordTokenizer.train_or_load(Path(config.workdir) / "sentencepiece.model", texts,
                                             d.vocab_size)
  train = {"inputs": tokenizer.encode_batch(texts, d.max_len), "labels": labels}
  evals = {}
  for name, split in (("val", "validation"), ("test", "test")):  # val first: it sets thresholds
    split_texts, split_labels = data.split(split)
    evals[name] = {"inputs": tokenizer.encode_batch(split_texts, d.max_len), "labels": split_labels}

  num_outputs = oos if d.oos == "threshold" else oos + 1
  rngs = nnx.Rngs(config.seed)
  if m.kind == "transformer":
    # One id past the tokenizer's is [MASK] (used by MLM pretraining only).
    model = EncoderClassifier(EncoderConfig(
        **m.transformer, vocab_size=tokenizer.vocab_size + 1, max_len=d.max_len,
        num_classes=num_outputs, dtype=config.compute_dtype), rngs=rngs)
    pretrain_encoder(config, model.encoder, train["inputs"], evals["val"]["inputs"],
                     mask_id=tokenizer.vocab_size, vocab_size=tokenizer.vocab_size,
                     experiment="clinc_intent", trim_multiple=TRIM)
    transform = lambda batch: {**batch, "inputs": trim_padding(batch["inputs"], TRIM)}
    # Batches of similar lengths, trimmed: less padding to compute on.
    train = LengthBucketedBatches(train, (train["inputs"] != PAD).sum(1), config.batch_size,
                                  config.seed)
  else:
    model = MLP(MLPConfig(**m.mlp, in_features=tokenizer.vocab_size, out_features=num_outputs,
                          dtype=config.compute_dtype), rngs=rngs)
    transform = lambda batch: {**batch, "inputs": bag_of_words(batch["inputs"], tokenizer.vocab_size)}
  if d.oos == "threshold":
    decide = ThresholdRule(oos)
  else:
    decide = lambda split, logits, labels: (
        logits.argmax(1), oos_metrics(labels, logits.argmax(1), oos))
  return classification_task(config, model, train, evals, data.class_names, transform=transform,
                             decide=decide, eval_batch_size=config.eval_batch_size,
                             tokenizer=tokenizer)
