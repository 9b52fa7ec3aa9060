"""Sentiment analysis on SST-2: a Transformer encoder, with and without MLM pretraining, vs a BiLSTM.

Command:  make experiment NAME=sst2_sentiment                          (`transformer`, from scratch)
          make experiment NAME=sst2_sentiment:transformer_pretrained   (MLM phase, then fine-tuning)
          make experiment NAME=sst2_sentiment:bilstm                   (the baseline)
          make experiment NAME=sst2_sentiment:minilm                   (fine-tunes all-MiniLM-L6-v2)
          make experiment NAME=sst2_sentiment:tiny                     (seconds; for tests)
Expected: accuracy on the `test` split (= GLUE dev, 872 sentences) of about 0.82 (transformer),
          0.80 (transformer_pretrained), 0.84 (bilstm) and 0.89 (minilm: pretrained weights,
          1500 steps); the Flax SST-2 example's LSTM reaches 0.8521 (10 epochs; 5000 steps here
          overfit). See the README's results table.
Runtime:  about 6-15 minutes per variant on a 2-core CPU; about 20 for minilm.
Data:     GLUE SST-2 (67,349 train phrases / 872 dev sentences / 1,821 unlabelled test sentences):
          ../shared/data/sst2/{train,dev,test}.tsv, or GLUE's SST-2.zip downloaded online.
          GLUE's test labels are hidden, so GLUE dev is this experiment's `test` split and 1% of
          train (held out, fixed) is `val`. Subword vocabulary (SentencePiece) trained on train,
          saved in the run folder. MLM pretraining reads train + the unlabelled GLUE test
          sentences (never GLUE dev). `minilm` (or any --config.init_from=BERT folder) uses the
          checkpoint's WordPiece tokenizer instead (research.pretrained.hf).
"""

import ml_collections
import numpy as np

from research import config as config_lib
from research.data.text_classification import load_sst2
from research.models.bilstm import BiLSTMConfig
from research.models.encoder import EncoderConfig
from research.tasks.text_classification import text_classification_task

VARIANTS = ("transformer", "transformer_pretrained", "bilstm", "minilm", "tiny")


def get_config(variant: str = "transformer") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(manual_dir="", vocab_size=8000, max_len=64, val_fraction=0.01, train_examples=0)
  # `kind` picks the model; config.model.<kind> holds its config's fields (vocab_size,
  # max_len and num_classes come from the data).
  c.model = dict(
      kind="transformer",
      transformer=config_lib.model_config(
          EncoderConfig, exclude=("vocab_size", "max_len", "num_classes"), num_layers=4,
          num_heads=4, embed_dim=128, mlp_ratio=4, dropout=0.1, attention="xla"),
      bilstm=config_lib.model_config(BiLSTMConfig, exclude=("vocab_size", "num_classes"),
                                     embed_dim=256, hidden_dim=256, dropout=0.5),
      # kind=bert: the BERT of config.init_from + a linear head on this pooling (mean|cls|pooler).
      bert=dict(pooling="mean", dropout=0.1, attention="xla"))
  # A pretrained BERT to fine-tune (a Hugging Face folder, or a name research.pretrained.hf
  # knows, e.g. all-MiniLM-L6-v2); its tokenizer replaces the SentencePiece one. "": none.
  # Setting it alone is enough: model.kind=transformer then means the pretrained BERT.
  c.init_from = ""
  # MLM phase before fine-tuning (transformer only; config.optimizer); steps=0: none.
  c.pretrain = dict(steps=0, batch_size=64, learning_rate=1e-3, min_learning_rate=1e-4,
                    warmup_steps=200, eval_every=1000, checkpoint_every=1000, mask_rate=0.15)
  c.eval_batch_size = 128
  c.update(steps=2000, batch_size=64, learning_rate=5e-4, min_learning_rate=1e-5,
           warmup_steps=200, eval_every=500, checkpoint_every=1000)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=0.01)
  if variant == "transformer_pretrained":
    c.pretrain.steps = 3000
  elif variant == "bilstm":
    c.model.kind = "bilstm"
    c.update(learning_rate=2e-3, min_learning_rate=1e-4)
  elif variant == "minilm":  # BERT's fine-tuning recipe on all-MiniLM-L6-v2
    c.model.kind, c.init_from = "bert", "all-MiniLM-L6-v2"
    c.update(steps=1500, batch_size=32, learning_rate=1e-4, min_learning_rate=0.0,
             warmup_steps=150, eval_every=500, checkpoint_every=500)
    c.optimizer.update(b2=0.999, weight_decay=0.01)
  elif variant == "tiny":
    c.data.update(vocab_size=300, max_len=16, train_examples=2000, val_fraction=0.05)
    c.model.transformer.update(num_layers=1, num_heads=2, embed_dim=16)
    c.model.bilstm.update(embed_dim=16, hidden_dim=16)
    c.pretrain.update(steps=4, batch_size=16, warmup_steps=1, eval_every=2, checkpoint_every=4)
    c.eval_batch_size = 64
    c.update(steps=8, batch_size=16, warmup_steps=2, eval_every=4, log_every=2, checkpoint_every=4)
  elif variant != "transformer":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def build(config):
  d = config.data
  if not 0 < d.val_fraction < 1:
    raise config_lib.ConfigError(f"config.data.val_fraction must be in (0, 1), got {d.val_fraction}")
  data = load_sst2(d.manual_dir)
  texts, labels = data.split("train")
  if d.train_examples:
    texts, labels = texts[:d.train_examples], labels[:d.train_examples]
  # A fixed held-out slice of train (the same for every seed and model) for `val`.
  order = np.random.default_rng(0).permutation(len(texts))
  n_val = max(config.eval_batch_size, int(d.val_fraction * len(texts)))
  pick = lambda rows: ([texts[i] for i in rows], labels[rows])
  return text_classification_task(
      config, pick(order[n_val:]), {"val": pick(order[:n_val]), "test": data.split("validation")},
      data.class_names, unlabelled=data.split("test")[0], trim=16)
