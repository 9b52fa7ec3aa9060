"""Intent recognition with out-of-scope detection on CLINC150: a Transformer encoder vs an MLP on bag-of-words.

Command:  make experiment NAME=clinc_intent                          (`transformer`, oos as a class)
          make experiment NAME=clinc_intent:transformer_threshold    (oos by a softmax threshold)
          make experiment NAME=clinc_intent:transformer_pretrained   (MLM phase, then oos as a class)
          make experiment NAME=clinc_intent:mlp                      (baseline, oos as a class)
          make experiment NAME=clinc_intent:mlp_threshold            (baseline, threshold)
          make experiment NAME=clinc_intent:minilm                   (fine-tunes all-MiniLM-L6-v2)
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
          and Wikipedia) is far above that, and so is `minilm` (pretrained all-MiniLM-L6-v2
          fine-tuned for 2000 steps: in-scope 0.958, oos recall 0.33). See the README's
          results table for measured numbers.
Runtime:  about 2 (mlp) to 10 (transformer) minutes on a 2-core CPU; 15 with pretraining;
          12 for minilm.
Data:     tfds `clinc_oos` (../shared/data/clinc_oos/clinc_oos.zip offline): train 15,000 +
          100 oos, validation 3,000 + 100 oos (`val`), test 4,500 + 1,000 oos (`test`). Subword
          vocabulary trained on the training queries, saved in the run folder; the MLP reads
          bag-of-words counts of those subwords.
"""

import ml_collections
import numpy as np

from research import config as config_lib
from research.data.text_classification import load_clinc_oos
from research.models.encoder import EncoderConfig
from research.models.mlp import MLPConfig
from research.tasks.text_classification import text_classification_task

VARIANTS = ("transformer", "transformer_threshold", "transformer_pretrained", "mlp",
            "mlp_threshold", "minilm", "tiny")
OOS_MODES = ("train", "threshold")


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
                                  hidden_sizes=(512,), dropout=0.5),
      # kind=bert: the BERT of config.init_from + a linear head on this pooling (mean|cls|pooler).
      bert=dict(pooling="mean", dropout=0.1, attention="xla"))
  # A pretrained BERT to fine-tune (a Hugging Face folder, or a name research.pretrained.hf
  # knows, e.g. all-MiniLM-L6-v2); its tokenizer replaces the SentencePiece one. "": none.
  # Setting it alone is enough: model.kind=transformer then means the pretrained BERT.
  c.init_from = ""
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
  if variant == "minilm":  # BERT's fine-tuning recipe on all-MiniLM-L6-v2, oos as a class
    c.model.kind, c.init_from = "bert", "all-MiniLM-L6-v2"
    c.update(steps=2000, batch_size=32, learning_rate=1e-4, min_learning_rate=0.0,
             warmup_steps=200, eval_every=500, checkpoint_every=500)
    c.optimizer.update(b2=0.999, weight_decay=0.01)
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
  d = config.data
  if d.oos not in OOS_MODES:
    raise config_lib.ConfigError(f"unknown config.data.oos {d.oos!r}; choose one of {', '.join(OOS_MODES)}")
  data = load_clinc_oos(d.manual_dir)
  oos = len(data.class_names) - 1
  texts, labels = data.split("train")
  if d.train_examples:  # a spread-out subset (the split is ordered in-scope then oos)
    rows = np.linspace(0, len(texts) - 1, d.train_examples).astype(int)
    texts, labels = [texts[i] for i in rows], labels[rows]
  if d.oos == "threshold":  # in-scope queries only; the model has no oos output
    keep = np.flatnonzero(labels != oos)
    texts, labels = [texts[i] for i in keep], labels[keep]
    decide = ThresholdRule(oos)
  else:
    decide = lambda split, logits, labels: (
        logits.argmax(1), oos_metrics(labels, logits.argmax(1), oos))
  # `val` first: it sets the threshold.
  evals = {"val": data.split("validation"), "test": data.split("test")}
  return text_classification_task(config, (texts, labels), evals, data.class_names,
                                  num_outputs=oos if d.oos == "threshold" else oos + 1,
                                  decide=decide, trim=8)
