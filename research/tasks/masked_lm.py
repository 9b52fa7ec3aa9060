"""Masked-language-model pretraining (BERT's recipe) as a phase before fine-tuning.

`mask_tokens` corrupts a batch the BERT way: per sentence, round(15%) of its real tokens
(at least one) are chosen to be predicted; of those, 80% become [MASK], 10% a random token
and 10% stay as they are. Masking happens in the data pipeline, seeded by the step, so
batches stay a pure function of the step (exact resume).

`mlm_phase` is how a task adds pretraining: a `Phase` the training loop runs (or resumes)
as its own run in `<workdir>/pretrain` (same loop: checkpoints, metrics.jsonl, plots) before
fine-tuning starts, then copies the pretrained weights into the classifier's encoder. The
[MASK] id is one past the tokenizer's vocabulary.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import config as config_lib
from research.data.batching import padded_batches
from research.data.subword import EOS, PAD
from research.data.text_classification import LengthBucketedBatches, trim_padding
from research.models.encoder import Encoder, MaskedLM
from research.train.task import Phase, Task

FIRST_REAL_ID = EOS + 1  # random replacements are real subwords, never PAD/UNK/BOS/EOS


def mask_tokens(tokens_BxT: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                vocab_size: int, rate: float = 0.15) -> dict[str, np.ndarray]:
  """{"inputs": corrupted [B, T], "positions"/"targets"/"weights": [B, P]}, P = ceil(rate*T);
  weight 0 marks unused prediction slots."""
  B, T = tokens_BxT.shape
  valid_BxT = tokens_BxT != PAD
  lengths_B = valid_BxT.sum(axis=1)
  P = max(1, math.ceil(rate * T))
  # Random distinct real positions first in each row (padding sorts last).
  positions_BxP = np.argsort(np.where(valid_BxT, rng.random((B, T)), 2.0), axis=1)[:, :P]
  count_B = np.minimum(np.maximum(1, np.rint(rate * lengths_B)), lengths_B)
  weights_BxP = np.arange(P)[None, :] < count_B[:, None]
  targets_BxP = np.take_along_axis(tokens_BxT, positions_BxP, axis=1)
  u_BxP = rng.random((B, P))
  random_BxP = rng.integers(FIRST_REAL_ID, vocab_size, (B, P))
  corrupt_BxP = np.where(u_BxP < 0.8, mask_id, np.where(u_BxP < 0.9, random_BxP, targets_BxP))
  inputs_BxT = tokens_BxT.copy()
  rows_Bx1 = np.arange(B)[:, None]
  inputs_BxT[rows_Bx1, positions_BxP] = np.where(weights_BxP, corrupt_BxP, targets_BxP)
  return {"inputs": inputs_BxT.astype(np.int32), "positions": positions_BxP.astype(np.int32),
          "targets": targets_BxP.astype(np.int32), "weights": weights_BxP.astype(np.float32)}


def mlm_loss(model, batch, rngs=None):
  logits_BxPxV = model(batch["inputs"], batch["positions"], rngs=rngs)
  w_BxP = batch["weights"]
  count = jnp.maximum(w_BxP.sum(), 1.0)
  ce_BxP = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV, batch["targets"])
  loss = (ce_BxP * w_BxP).sum() / count
  accuracy = ((logits_BxPxV.argmax(-1) == batch["targets"]) * w_BxP).sum() / count
  return loss, {"loss": loss, "accuracy": accuracy}


def mlm_task(config, model: MaskedLM, train_NxT: np.ndarray, val_NxT: np.ndarray, *,
             mask_id: int, vocab_size: int, mask_rate: float = 0.15,
             trim_multiple: int = 16) -> Task:
  """MLM on rows of token ids (right-padded); `val` is masked once, with fixed seeds. `config`
  gives batch_size and seed."""
  rate, bs = mask_rate, config.batch_size
  batches = LengthBucketedBatches({"tokens": train_NxT}, (train_NxT != PAD).sum(1), bs, config.seed)

  def corrupt(tokens_BxT, seed):
    return mask_tokens(trim_padding(tokens_BxT, trim_multiple), np.random.default_rng(seed),
                       mask_id=mask_id, vocab_size=vocab_size, rate=rate)

  def train_data(step):
    return corrupt(batches(step)["tokens"], [config.seed, step])

  val_batches = []
  for i, rows in enumerate(padded_batches({"tokens": val_NxT}, bs)):
    batch = corrupt(rows["tokens"], [config.seed, 1 << 30, i])
    batch["weights"] *= rows["mask"][:, None]
    val_batches.append(batch)

  return Task(model=model, loss_fn=mlm_loss, train_data=train_data,
              eval_data={"val": lambda: iter(val_batches)})


def mlm_phase(config, encoder: Encoder, train_NxT: np.ndarray, val_NxT: np.ndarray, *,
              mask_id: int, vocab_size: int, trim_multiple: int = 16) -> Phase:
  """`config.pretrain` (steps, batch_size, learning_rate, ..., mask_rate; the optimizer is
  `config.optimizer`) of MLM on the token rows, as a phase whose trained encoder replaces
  `encoder`'s weights."""
  p = config.pretrain
  sub = config_lib.phase_config(config, "pretrain", p.to_dict())
  model = MaskedLM(encoder.cfg, rngs=nnx.Rngs(config.seed))
  task = mlm_task(sub, model, train_NxT, val_NxT, mask_id=mask_id, vocab_size=vocab_size,
                  mask_rate=p.mask_rate, trim_multiple=trim_multiple)
  return Phase("pretrain", task, sub,
               hand_over=lambda trained: nnx.update(encoder, nnx.state(trained.encoder)))
