"""LSTM character-level language model on Tiny Shakespeare: the baseline GPT replaced.

Command:  make experiment NAME=lstm_shakespeare           (variant `baby`, the default)
          make experiment NAME=lstm_shakespeare:tiny      (seconds; for tests)
Expected: `baby` matches gpt_shakespeare:baby in parameters (0.80M: 2 layers of 234 units)
          and in data, steps, batch and optimizer, so the two val losses compare directly;
          see the README's results table for both.
Runtime:  a few minutes on a 2-core CPU (the scan over 64 steps is sequential).
"""

import ml_collections
from flax import nnx

from research import config as config_lib
from research.models.lstm import LSTMConfig, LSTMLM
from research.tasks.language_model import Sampling, char_lm_task, load_char_data

VARIANTS = ("baby", "tiny")


def get_config(variant: str = "baby") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(dataset="tiny_shakespeare", manual_dir="", text_file="")
  # LSTMConfig's fields; vocab_size comes from the data, dtype from config.compute_dtype.
  c.model = config_lib.model_config(LSTMConfig, exclude=("vocab_size",), num_layers=2,
                                    embed_dim=128, hidden_dim=234, dropout=0.0)
  c.context = 64  # the length of the windows trained on (the LSTM itself reads any length)
  c.sample = dict(prompt="\n", num_tokens=500, count=3, temperature=0.8, top_k=200)
  c.eval_batches = 20
  c.update(steps=2000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, eval_every=250, log_every=10, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.99, weight_decay=0.1)
  if variant == "tiny":
    c.model.update(num_layers=1, embed_dim=16, hidden_dim=32)
    c.context = 16
    c.update(steps=20, batch_size=8, learning_rate=1e-2, warmup_steps=2, eval_every=10,
             log_every=5, checkpoint_every=10)
    c.eval_batches = 2
    c.sample.update(num_tokens=8, count=1)
  elif variant != "baby":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def build(config):
  tokenizer, tokens = load_char_data(config)
  model = LSTMLM(LSTMConfig(**config.model, vocab_size=tokenizer.vocab_size,
                            dtype=config.compute_dtype), rngs=nnx.Rngs(config.seed))
  return char_lm_task(config, model, tokenizer, tokens, context=config.context,
                      eval_batches=config.eval_batches, sample=Sampling(**config.sample))
