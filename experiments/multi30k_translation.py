"""English->German translation on Multi30k: encoder-decoder Transformer vs an LSTM with attention.

Command:  make experiment NAME=multi30k_translation               (variant `transformer`)
          make experiment NAME=multi30k_translation:lstm          (the recurrent baseline)
          make experiment NAME=multi30k_translation:tiny          (seconds; for tests)
          python -m experiments multi30k_translation translate --workdir RUN "A man rides a bike."
Expected: sacreBLEU (cased, 13a, on raw references) on test_2016_flickr with beam 4 and
          alpha 0.6: see the README's results table. Public PyTorch Transformers report about
          31-33 BLEU on this test set (usually on lowercased, pre-tokenized text).
Runtime:  `transformer` and `lstm` about 30 minutes each on a 2-core CPU.
Data:     Multi30k task 1 raw files (train 29,000 / val 1,014 / test_2016_flickr 1,000 pairs)
          from ../shared/data/multi30k/ or --config.data.manual_dir=FOLDER; else downloaded
          from github.com/multi30k/dataset.
"""

from __future__ import annotations

import argparse
import sys

import ml_collections
from flax import nnx

from research import config as config_lib
from research.config import ConfigError
from research.data import multi30k
from research.data.subword import TokenizerPair
from research.load import load_model, saved_tokenizer
from research.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig
from research.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from research.tasks.translation import Translator, train_tokenizers, translation_task

VARIANTS = ("transformer", "lstm", "tiny")


def get_config(variant: str = "transformer") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(manual_dir="", src_lang="en", tgt_lang="de", vocab_size=8000, shared_vocab=True,
                max_len=64, buckets=(16, 24, 32, 48))
  # `kind` picks the model; config.model.<kind> holds its config's fields (the vocabulary
  # sizes and shared_vocab come from the data).
  no_data = ("src_vocab_size", "tgt_vocab_size", "shared_vocab")
  c.model = dict(
      kind="transformer",
      transformer=config_lib.model_config(
          Seq2SeqConfig, exclude=no_data, num_encoder_layers=3, num_decoder_layers=3,
          num_heads=4, embed_dim=256, mlp_dim=1024, dropout=0.1, attention="xla"),
      lstm=config_lib.model_config(
          LSTMSeq2SeqConfig, exclude=no_data, embed_dim=256, hidden_dim=512,
          num_encoder_layers=1, num_decoder_layers=2, dropout=0.2))
  c.label_smoothing = 0.1
  c.decode = dict(beam_size=4, alpha=0.6, batch_size=128)
  c.eval_batch_size = 128
  c.update(steps=1400, batch_size=64, learning_rate=1e-3, min_learning_rate=1e-5,
           warmup_steps=200, grad_clip=1.0, eval_every=700, log_every=50, checkpoint_every=700)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=0.01)
  if variant == "lstm":
    c.model.kind = "lstm"
  elif variant == "tiny":
    c.data.update(vocab_size=200, max_len=24, buckets=())
    c.model.transformer.update(num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
                               embed_dim=32, mlp_dim=64, dropout=0.0)
    c.model.lstm.update(embed_dim=16, hidden_dim=32, num_decoder_layers=1, dropout=0.1)
    c.decode.update(beam_size=2, batch_size=16)
    c.eval_batch_size = 16
    c.train_size = 512  # the first pairs of each split only
    c.eval_size = 32
    c.update(steps=20, batch_size=16, learning_rate=1e-2, warmup_steps=2, eval_every=10,
             log_every=5, checkpoint_every=10)
  elif variant != "transformer":
    raise ValueError(f"unknown variant {variant!r}")
  return c


# Our split names (in metrics.jsonl and file names) -> Multi30k's.
SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


def _splits(config) -> dict[str, dict[str, list[str]]]:
  langs = (config.data.src_lang, config.data.tgt_lang)
  sizes = {"train": config.get("train_size"), "val": config.get("eval_size"),
           "test": config.get("eval_size")}
  return {name: {lang: sentences[:sizes[name]] for lang, sentences in
                 multi30k.load(split, langs, config.data.manual_dir).items()}
          for name, split in SPLITS.items()}


def _translator(config, tokenizers: TokenizerPair) -> Translator:
  d = config.decode
  return Translator(tokenizers.source, tokenizers.target, max_len=config.data.max_len, beam_size=d.beam_size, alpha=d.alpha,
                    batch_size=d.batch_size)


def _model(config, src_vocab: int, tgt_vocab: int) -> nnx.Module:
  m = config.model
  common = dict(src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab,
                shared_vocab=config.data.shared_vocab, dtype=config.compute_dtype)
  rngs = nnx.Rngs(config.seed)
  if m.kind == "transformer":
    return Seq2SeqTransformer(Seq2SeqConfig(**m.transformer, **common), rngs=rngs)
  if m.kind == "lstm":
    return LSTMSeq2Seq(LSTMSeq2SeqConfig(**m.lstm, **common), rngs=rngs)
  raise ConfigError(f"unknown config.model.kind {m.kind!r}; valid names: transformer, lstm")


def build(config):
  splits = _splits(config)
  # Trained on first use; a resumed run reads back the one its folder holds.
  pair = saved_tokenizer(config.workdir) or train_tokenizers(config.data, splits["train"])
  model = _model(config, pair.source.vocab_size, pair.target.vocab_size)
  d = config.data
  return translation_task(config, model, _translator(config, pair), splits,
                          src_lang=d.src_lang, tgt_lang=d.tgt_lang, max_len=d.max_len,
                          buckets=tuple(d.buckets), eval_batch_size=config.eval_batch_size,
                          label_smoothing=config.label_smoothing)


def translate(argv: list[str]) -> int:
  """Prints the translation of each sentence given (or of each line of stdin) by a trained run."""
  parser = argparse.ArgumentParser(prog="python -m experiments multi30k_translation translate")
  parser.add_argument("--workdir", required=True, help="a run folder of this experiment")
  parser.add_argument("--beam_size", type=int, help="default: the run's config.decode.beam_size")
  parser.add_argument("sentences", nargs="*", help="default: one per line on stdin")
  args = parser.parse_args(argv)
  model, tokenizers, config = load_model(args.workdir)
  if tokenizers is None:  # a run written before runs saved their tokenizer in tokenizer/
    raise ConfigError(f"{args.workdir} has no tokenizer/ folder")
  translator = _translator(config, tokenizers)
  if args.beam_size is not None:
    if args.beam_size < 1:
      raise ConfigError(f"--beam_size must be >= 1, got {args.beam_size}")
    translator.beam_size = args.beam_size
  sentences = args.sentences or [line.strip() for line in sys.stdin if line.strip()]
  for line in translator(model, sentences):
    print(line)
  return 0


COMMANDS = {"translate": translate}
