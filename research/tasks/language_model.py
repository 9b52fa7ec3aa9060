"""Next-token prediction on a character stream, for any model mapping tokens to logits."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import flops
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


def matmul_params(model: nnx.Module) -> int:
  """Parameters that multiply activations: matrices, minus lookup-only position tables."""
  params = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)
  pos = getattr(model, "pos_embed", None)
  return total - (pos.embedding.value.size if pos is not None else 0)


def char_lm_task(config, model: nnx.Module, tokenizer: CharTokenizer,
                 tokens: dict[str, np.ndarray], *, context: int) -> Task:
  """Trains on random windows of `train`, evaluates on fixed windows of `val`, writes samples."""
  train = LMBatches(tokens["train"], context, config.batch_size, config.seed)
  val = LMBatches(tokens["val"], context, config.batch_size, seed=10_000 + config.seed)

  def eval_batches(shard):
    return (val(i, shard) for i in range(config.eval_batches))

  def finish(model, workdir: Path):
    s = config.sample
    prompt_1xP = jnp.asarray(tokenizer.encode(s.prompt))[None]
    keys = jax.random.split(jax.random.key(config.seed), s.count)
    texts = [tokenizer.decode(generate(model, prompt_1xP, s.num_tokens, key=k,
                                       temperature=s.temperature, top_k=s.top_k or None)[0])
             for k in keys]
    (workdir / "samples.txt").write_text(("\n" + "-" * 40 + "\n").join(texts) + "\n")

  return Task(
      model=model, loss_fn=next_token_loss,
      train_data=train,
      eval_data={"val": eval_batches}, finish=finish,
      tokens_per_batch=config.batch_size * context,
      flops_per_token=(flops.transformer_flops_per_token(
          matmul_params=matmul_params(model), num_layers=config.model.num_layers,
          context=context, embed_dim=config.model.embed_dim)
          if hasattr(model, "blocks") else 6 * matmul_params(model)))

