"""Next-token prediction on a character stream, for any model mapping tokens to logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.data.text import CharTokenizer, LMBatches, load_text_splits
from research.models.sampling import generate
from research.train.task import Task


def next_token_loss(model, batch, rngs=None):
  logits_BxTxV = model(batch["inputs"], rngs=rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), batch["targets"]).mean()
  return loss, {"loss": loss}


def load_char_data(config) -> tuple[CharTokenizer, dict[str, np.ndarray]]:
  """The tokenizer (fit on the whole corpus, as nanoGPT does) and the token ids per split."""
  text = load_text_splits(config.data.dataset, config.data.manual_dir, config.data.text_file)
  tokenizer = CharTokenizer.fit(text["train"] + text["val"])
  return tokenizer, {split: tokenizer.encode(t) for split, t in text.items()}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """What `finish` writes to samples.txt: `count` continuations of `prompt`."""
  prompt: str = "\n"
  num_tokens: int = 500
  count: int = 3
  temperature: float = 0.8
  top_k: int = 200  # 0: no top-k cut


def char_lm_task(config, model: nnx.Module, tokenizer: CharTokenizer,
                 tokens: dict[str, np.ndarray], *, context: int, eval_batches: int,
                 sample: Sampling | None = None) -> Task:
  """Trains on random windows of `train`, evaluates on `eval_batches` fixed windows of `val`,
  writes samples (none if `sample` is None). `config` gives batch_size and seed; the model's
  `flops_per_token(context)`, if it has one, gives MFU."""
  train = LMBatches(tokens["train"], context, config.batch_size, config.seed)
  val = LMBatches(tokens["val"], context, config.batch_size, seed=10_000 + config.seed)

  def eval_data():
    return (val(i) for i in range(eval_batches))

  def finish(model, workdir: Path):
    s = sample
    prompt_1xP = jnp.asarray(tokenizer.encode(s.prompt))[None]
    keys = jax.random.split(jax.random.key(config.seed), s.count)
    texts = [tokenizer.decode(generate(model, prompt_1xP, s.num_tokens, key=k,
                                       temperature=s.temperature, top_k=s.top_k or None)[0])
             for k in keys]
    (workdir / "samples.txt").write_text(("\n" + "-" * 40 + "\n").join(texts) + "\n")

  return Task(
      model=model, loss_fn=next_token_loss,
      train_data=train,
      eval_data={"val": eval_data}, finish=finish if sample else None, tokenizer=tokenizer,
      tokens_per_batch=config.batch_size * context,
      flops_per_token=(model.flops_per_token(context) if hasattr(model, "flops_per_token")
                       else None))

