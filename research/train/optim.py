"""The optimizer, chosen by `config.optimizer`, with linear warmup, cosine decay and clipping.

`config.optimizer` is `name` (a key of `OPTIMIZERS`) plus that optimizer's own fields: the
fields of its dataclass below, e.g. `--config.optimizer.name=lion
--config.optimizer.weight_decay=1.0`. The learning rate and its schedule (`learning_rate`,
`min_learning_rate`, `warmup_steps`, `decay_steps`) and `grad_clip` are top-level fields that
every optimizer shares. AdamW is the default (the nanoGPT recipe). Weight decay applies to
matrices and embeddings only, never to biases or norm scales.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.decay_steps or config.steps, config.warmup_steps + 1),
      end_value=config.min_learning_rate)


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class AdamW:
  """AdamW (Loshchilov & Hutter 2019)."""
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.1

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                       mask=decay_mask)


@dataclasses.dataclass(frozen=True)
class Lion:
  """Lion (Chen et al. 2023): the sign of interpolated momenta. Its paper uses a learning rate
  3-10x smaller and a weight decay 3-10x larger than AdamW's."""
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 1.0

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    return optax.lion(learning_rate, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                      mask=decay_mask)


@dataclasses.dataclass(frozen=True)
class SGD:
  """SGD with (heavy-ball or Nesterov) momentum; weight decay added to the gradient (L2)."""
  momentum: float = 0.9  # 0: plain SGD
  nesterov: bool = False
  weight_decay: float = 0.0

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(self.weight_decay, decay_mask),
                       optax.sgd(learning_rate, momentum=self.momentum or None,
                                 nesterov=self.nesterov))


def _is_embedding(path) -> bool:
  return any(getattr(key, "key", None) == "embedding" for key in path)


def _muon_weights(params):
  """Muon orthogonalizes the updates of 2-D weight matrices (inputs x outputs); embedding
  tables, vectors and convolution kernels go to its AdamW."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (optax.contrib.MuonDimensionNumbers()
                       if p.ndim == 2 and not _is_embedding(path) else None), params)


@dataclasses.dataclass(frozen=True)
class Muon:
  """Muon (Jordan et al. 2024): momentum orthogonalized by Newton-Schulz iterations, for the 2-D
  weight matrices; AdamW (without weight decay) for everything else. `consistent_rms=0.2`
  scales its updates to AdamW's size (Liu et al. 2025), so AdamW's learning rates carry over."""
  beta: float = 0.95
  nesterov: bool = True
  ns_steps: int = 5
  consistent_rms: float = 0.2
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.99

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    return optax.contrib.muon(
        learning_rate, ns_steps=self.ns_steps, beta=self.beta, nesterov=self.nesterov,
        weight_decay=self.weight_decay, consistent_rms=self.consistent_rms,
        adam_b1=self.adam_b1, adam_b2=self.adam_b2,
        muon_weight_dimension_numbers=_muon_weights)


OPTIMIZERS = {"adamw": AdamW, "lion": Lion, "sgd": SGD, "muon": Muon}


def optimizer_fields(name: str) -> dict:
  """`config.optimizer` for optimizer `name` with its defaults: {"name": name, field: value}."""
  return {"name": name, **dataclasses.asdict(OPTIMIZERS[name]())}


def make_optimizer(config) -> optax.GradientTransformation:
  fields = dict(config.optimizer)
  tx = OPTIMIZERS[fields.pop("name")](**fields).make(learning_rate_schedule(config))
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx
