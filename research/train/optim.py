"""AdamW with linear warmup, cosine decay and global-norm clipping (the nanoGPT recipe)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.decay_steps or config.steps, config.warmup_steps + 1),
      end_value=config.min_learning_rate)


def make_optimizer(config) -> optax.GradientTransformation:
  # Weight decay on matrices and embeddings only, never on biases or norm scales.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
