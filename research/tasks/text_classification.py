"""Sentence classification from raw texts: what the SST-2 and CLINC150 experiments share.

`text_classification_task` turns labelled texts into a Task: a SentencePiece tokenizer trained
on the training texts (a resumed run reads back the one its folder holds), the model that
`config.model.kind` names, batches of similar lengths trimmed of padding for the sequence
models (bag-of-words counts for the MLP), and, with `config.pretrain.steps > 0`, an MLM phase
that pretrains the Transformer's encoder before fine-tuning. An experiment keeps what is its
own: reading the dataset, choosing the splits, the decision rule.

With `config.init_from` set, the model is that pretrained BERT checkpoint's encoder with a new
classification head (`research.models.bert.BertClassifier`, its fields in `config.model.bert`)
and the texts go through the checkpoint's own tokenizer, not a SentencePiece one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx

from research.config import ConfigError
from research.data.subword import PAD, SubwordTokenizer
from research.data.text_classification import LengthBucketedBatches, bag_of_words, trim_padding
from research.load import saved_tokenizer
from research.models.bilstm import BiLSTMClassifier, BiLSTMConfig
from research.models.encoder import EncoderClassifier, EncoderConfig
from research.models.mlp import MLP, MLPConfig
from research.tasks.classification import Decide, argmax_decide, classification_task
from research.models.bert import BertClassifier
from research.pretrained import hf
from research.tasks.masked_lm import mlm_phase
from research.train.task import Task

Texts = tuple[list[str], np.ndarray]  # sentences and their integer labels


def pretrained_classifier(config, init_from: str, tokenizer, num_outputs: int) -> BertClassifier:
  """`config.init_from`'s BERT (a Hugging Face folder or a name of `research.pretrained.hf`)
  with a fresh linear head over `config.model.bert.pooling` (mean, cls or pooler), its dropout
  `config.model.bert.dropout`."""
  b = config.model.bert
  model = hf.from_pretrained(init_from, cls=BertClassifier, seed=config.seed,
                             num_classes=num_outputs, pooling=b.pooling, dropout=b.dropout,
                             attention=b.attention, dtype=config.compute_dtype)
  if tokenizer.pad_id != PAD or model.cfg.pad_token_id != PAD:
    raise ConfigError(f"{init_from}: padding id {tokenizer.pad_id} (tokenizer) / "
                      f"{model.cfg.pad_token_id} (model); fine-tuning here needs {PAD}")
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ConfigError(f"{init_from}: the tokenizer has {tokenizer.vocab_size} ids, the model's "
                      f"embedding {model.cfg.vocab_size}")
  return model


def text_classification_task(config, train: Texts, evals: dict[str, Texts],
                             class_names: Sequence[str], *, num_outputs: int | None = None,
                             unlabelled: Sequence[str] = (), decide: Decide = argmax_decide,
                             trim: int = 16) -> Task:
  """Trains `config.model.kind` (transformer, bilstm or mlp, or bert: the pretrained
  checkpoint `config.init_from`; its fields in `config.model.<kind>`) on `train`, evaluated on
  each of `evals` in order. `num_outputs` defaults to one per class name; MLM pretraining reads
  the training sentences and the `unlabelled` ones, and is validated on `evals["val"]`;
  sequence batches are cut to a multiple of `trim` tokens."""
  m, d = config.model, config.data
  if config.pretrain.steps and m.kind != "transformer":
    raise ConfigError("config.pretrain.steps > 0 needs config.model.kind=transformer")
  init_from = config.get("init_from", "")
  if m.kind == "bert" and not init_from:
    raise ConfigError("config.model.kind=bert fine-tunes a pretrained checkpoint: set "
                      "config.init_from (a Hugging Face folder, or a name such as all-MiniLM-L6-v2)")
  if init_from and (m.kind not in ("bert", "transformer") or config.pretrain.steps):
    raise ConfigError("config.init_from fine-tunes a pretrained BERT (config.model.kind=bert; "
                      "transformer is taken to mean it): it needs config.pretrain.steps=0")
  tokenizer = saved_tokenizer(config.workdir) or (
      hf.load_tokenizer(init_from) if init_from else SubwordTokenizer.train(train[0], d.vocab_size))
  encode = lambda texts: tokenizer.encode_batch(list(texts), d.max_len)
  train_arrays = {"inputs": encode(train[0]), "labels": train[1]}
  eval_arrays = {name: {"inputs": encode(texts), "labels": labels}
                 for name, (texts, labels) in evals.items()}
  vocab, num_outputs = tokenizer.vocab_size, num_outputs or len(class_names)
  rngs, phases = nnx.Rngs(config.seed), ()
  if init_from:  # the checkpoint's encoder and its tokenizer; a new head (config.model.bert)
    model = pretrained_classifier(config, init_from, tokenizer, num_outputs)
  elif m.kind == "transformer":
    # One id past the tokenizer's is [MASK] (used by MLM pretraining only).
    model = EncoderClassifier(EncoderConfig(
        **m.transformer, vocab_size=vocab + 1, max_len=d.max_len, num_classes=num_outputs,
        dtype=config.compute_dtype), rngs=rngs)
    if config.pretrain.steps:
      corpus = train_arrays["inputs"]
      if len(unlabelled):
        corpus = np.concatenate([corpus, encode(unlabelled)])
      phases = (mlm_phase(config, model.encoder, corpus, eval_arrays["val"]["inputs"],
                          mask_id=vocab, vocab_size=vocab, trim_multiple=trim),)
  elif m.kind == "bilstm":
    model = BiLSTMClassifier(BiLSTMConfig(**m.bilstm, vocab_size=vocab, num_classes=num_outputs,
                                          dtype=config.compute_dtype), rngs=rngs)
  elif m.kind == "mlp":
    model = MLP(MLPConfig(**m.mlp, in_features=vocab, out_features=num_outputs,
                          dtype=config.compute_dtype), rngs=rngs)
  else:
    raise ConfigError(f"unknown config.model.kind {m.kind!r}; valid names: transformer, bilstm, "
                      f"mlp, bert")
  if m.kind == "mlp":
    train_data, transform = train_arrays, (
        lambda batch: {**batch, "inputs": bag_of_words(batch["inputs"], vocab)})
  else:  # batches of similar lengths, trimmed: most carry a fraction of max_len tokens
    train_data = LengthBucketedBatches(train_arrays, (train_arrays["inputs"] != PAD).sum(1),
                                       config.batch_size, config.seed)
    transform = lambda batch: {**batch, "inputs": trim_padding(batch["inputs"], trim)}
  task = classification_task(config, model, train_data, eval_arrays, class_names,
                             transform=transform, decide=decide,
                             eval_batch_size=config.eval_batch_size, tokenizer=tokenizer)
  task.phases = phases
  return task
