"""The optimizer, chosen by `config.optimizer`, with its learning-rate schedule and clipping.

`config.optimizer` is `name` (a key of `OPTIMIZERS`) plus that optimizer's own fields: the
fields of its dataclass below, e.g. `--config.optimizer.name=lion
--config.optimizer.weight_decay=1.0`. The learning rate and its schedule (`schedule`,
`learning_rate`, `min_learning_rate`, `warmup_steps`, `decay_steps`, and for `wsd`
`decay_fraction` and `decay_shape`) and `grad_clip` are top-level fields that every optimizer
shares. AdamW with a cosine schedule is the default (the nanoGPT recipe). Weight decay applies
to matrices and embeddings only, never to biases or norm scales. `config.train.trainable` (a
regex on parameter names, where an experiment has it) trains the matching parameters alone,
through `optax.multi_transform`: e.g. `lora_` for low-rank adapters (`research.nn.lora`).

Schedule-free AdamW trains one sequence of parameters and is evaluated at another (an average
kept in its state): whoever evaluates or saves the model asks `eval_params(config)` for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research.sharding import DATA

SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


def _decay_length(config) -> int:
  """Steps from the start to the end of the decay: `decay_steps`, or the whole run."""
  return max(config.decay_steps or config.steps, config.warmup_steps + 1)


def warmup_stable_decay(peak: float, end: float, *, warmup_steps: int, total_steps: int,
                        decay_fraction: float, shape: str = "linear") -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup_steps`, `peak` until the last `decay_fraction`
  of `total_steps`, then down to `end` at `total_steps` (linearly, or as 1 - sqrt of the decay's
  progress; Hägele et al. 2024), and `end` after. `decay_fraction=0`: never decays."""
  if shape not in DECAY_SHAPES:
    raise ValueError(f"unknown decay shape {shape!r}; valid names: {', '.join(DECAY_SHAPES)}")
  decay_start = max(warmup_steps, total_steps - decay_fraction * total_steps)
  decay_steps = total_steps - decay_start

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else jnp.ones_like(step)
    if not decay_steps:  # decay_fraction 0: stays at the peak
      return peak * warmup
    progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
    remaining = 1.0 - (jnp.sqrt(progress) if shape == "1-sqrt" else progress)
    return jnp.where(step < decay_start, peak * warmup, end + (peak - end) * remaining)

  return schedule


def learning_rate_schedule(config) -> optax.Schedule:
  """`config.schedule`: `cosine` (linear warmup, cosine decay to `min_learning_rate` at
  `decay_steps` or `steps`) or `wsd` (warmup, stable, decay over the last `decay_fraction`)."""
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=_decay_length(config), end_value=config.min_learning_rate)
  if config.schedule == "wsd":
    return warmup_stable_decay(
        config.learning_rate, config.min_learning_rate, warmup_steps=config.warmup_steps,
        total_steps=_decay_length(config), decay_fraction=config.decay_fraction,
        shape=config.decay_shape)
  raise ValueError(f"unknown schedule {config.schedule!r}; valid names: {', '.join(SCHEDULES)}")


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


def _muon_labels(params):
  """Muon orthogonalizes the updates of 2-D weight matrices (inputs x outputs); embedding
  tables, vectors and convolution kernels go to its AdamW."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: "muon" if p.ndim == 2 and not _is_embedding(path) else "adam", params)


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic, as optax's Muon


def newton_schulz(x_LxMxN: jax.Array, steps: int) -> jax.Array:
  """Each of L matrices (M <= N) made nearly orthogonal: singular values pushed into about
  [0.7, 1.2] by `steps` quintic Newton-Schulz iterations, after scaling to Frobenius norm 1."""
  a, b, c = NS_COEFFS
  x = x_LxMxN / (jnp.linalg.norm(x_LxMxN, axis=(1, 2), keepdims=True) + 1e-8)
  for _ in range(steps):
    g_LxMxM = x @ x.mT
    x = a * x + (b * g_LxMxM + c * g_LxMxM @ g_LxMxM) @ x
  return x


def _shared_over_data_axis(fn: Callable, x_L: jax.Array) -> jax.Array:
  """`fn(x_L)` (independent along L); inside the data-parallel step each device computes its
  share of the L rows and a psum assembles the rest: every device holds the same optimizer
  state there, so the work would otherwise be done once per device (modded-nanogpt splits
  Muon's work over ranks the same way)."""
  try:
    n = jax.lax.axis_size(DATA)
  except NameError:  # not inside the data-parallel shard_map
    n = 1
  if n == 1:
    return fn(x_L)
  share = -(-len(x_L) // n)
  padded = jnp.pad(x_L, [(0, share * n - len(x_L))] + [(0, 0)] * (x_L.ndim - 1))
  start = jax.lax.axis_index(DATA) * share
  mine = fn(jax.lax.dynamic_slice_in_dim(padded, start, share))
  placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(padded), mine, start, 0)
  # A psum rather than an all_gather: its result is the same on every device, as the step's
  # replicated optimizer state must be.
  return jax.lax.psum(placed, DATA)[:len(x_L)]


def orthogonalize(matrices: list[jax.Array], steps: int) -> list[jax.Array]:
  """`newton_schulz` of each matrix, batched: matrices of one shape (up to a transpose) are
  stacked, and each stack's work is split over the data-parallel devices."""
  stacks: dict[tuple, list[tuple[int, bool]]] = {}
  for i, m in enumerate(matrices):
    wide = m.shape[0] <= m.shape[1]
    stacks.setdefault(m.shape if wide else m.shape[::-1], []).append((i, wide))
  out = [None] * len(matrices)
  for members in stacks.values():
    x_LxMxN = jnp.stack([matrices[i] if wide else matrices[i].T for i, wide in members])
    done = _shared_over_data_axis(lambda x: newton_schulz(x, steps), x_LxMxN)
    for (i, wide), o in zip(members, done):
      out[i] = o if wide else o.T
  return out


class MuonState(NamedTuple):
  count: jax.Array
  mu: Any


def scale_by_muon(beta: float, nesterov: bool, ns_steps: int,
                  consistent_rms: float) -> optax.GradientTransformation:
  """optax.contrib.scale_by_muon's update for 2-D weights (bias-corrected momentum,
  orthogonalized; scaled by sqrt(max(fan_in, fan_out)) * consistent_rms as optax's
  scale_by_shape), computed by `orthogonalize`: stacked and split over devices."""

  def init(params):
    return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                            optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
    leaves, treedef = jax.tree.flatten(mu_hat)
    scaled = [o * (max(o.shape) ** 0.5 * consistent_rms)
              for o in orthogonalize(leaves, ns_steps)]
    return treedef.unflatten(scaled), MuonState(count, mu)

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class Muon:
  """Muon (Jordan et al. 2024): momentum orthogonalized by Newton-Schulz iterations, for the 2-D
  weight matrices; AdamW (without weight decay) for everything else: optax.contrib.muon's
  algorithm, with its orthogonalizations batched and, in the data-parallel step, split over
  the devices (`orthogonalize`). `consistent_rms=0.2` scales its updates to AdamW's size (Liu
  et al. 2025), so AdamW's learning rates carry over."""
  beta: float = 0.95
  nesterov: bool = True
  ns_steps: int = 5
  consistent_rms: float = 0.2
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.99

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    muon = optax.chain(
        scale_by_muon(self.beta, self.nesterov, self.ns_steps, self.consistent_rms),
        optax.add_decayed_weights(self.weight_decay),
        optax.scale_by_learning_rate(learning_rate))
    adam = optax.adamw(learning_rate, b1=self.adam_b1, b2=self.adam_b2, weight_decay=0.0,
                       nesterov=self.nesterov)
    return optax.partition({"muon": muon, "adam": adam}, _muon_labels)


@dataclasses.dataclass(frozen=True)
class ScheduleFreeAdamW:
  """Schedule-free AdamW (Defazio et al. 2024): `optax.contrib.schedule_free_adamw`, with weight
  decay masked as for AdamW. It trains parameters y between a fast sequence z and their
  running average x, and the model to evaluate is x: see `eval_params`. Meant for a constant
  learning rate after the warmup (`--config.schedule=wsd --config.decay_fraction=0`); another
  schedule also works."""
  b1: float = 0.9  # interpolation between x and z (the momentum); must be > 0
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  weight_lr_power: float = 2.0  # the average weights step t by learning_rate(t) ** this

  def make(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    # optax.contrib.schedule_free_adamw's own chain, with the decay mask.
    adam = optax.chain(
        optax.scale_by_rms(decay=self.b2, eps=self.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(self.weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate))
    return optax.contrib.schedule_free(adam, learning_rate, b1=self.b1,
                                       weight_lr_power=self.weight_lr_power)


OPTIMIZERS = {"adamw": AdamW, "lion": Lion, "sgd": SGD, "muon": Muon,
              "schedule_free_adamw": ScheduleFreeAdamW}


def optimizer_fields(name: str) -> dict:
  """`config.optimizer` for optimizer `name` with its defaults: {"name": name, field: value}."""
  return {"name": name, **dataclasses.asdict(OPTIMIZERS[name]())}


def param_path(path) -> str:
  """A parameter's name for `config.train.trainable`: its keys joined, "blocks/0/attn/qkv/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_pattern(config) -> str:
  """`config.train.trainable`: a regex (`re.search`) on parameter names; "" (or no such field):
  every parameter trains."""
  return (config.get("train") or {}).get("trainable", "")


def trainable_mask(config, params):
  """A tree of bools like `params`: True where the parameter trains; None when all do.
  ConfigError (one line) for a bad regex or one that matches no parameter."""
  import re

  from research.config import ConfigError

  pattern = trainable_pattern(config)
  if not pattern:
    return None
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.train.trainable={pattern!r} is not a regex: {e}") from None
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(param_path(path))),
                                          params)
  if not any(jax.tree.leaves(mask)):
    names = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ConfigError(f"config.train.trainable={pattern!r} matches no parameter (they are "
                      f"named like {', '.join(names[:4])})")
  return mask


def make_optimizer(config) -> optax.GradientTransformation:
  """`config.optimizer` with the schedule and clipping; with `config.train.trainable` set, it
  updates the matching parameters only (the others get zero updates and no optimizer state)."""
  fields = dict(config.optimizer)
  tx = OPTIMIZERS[fields.pop("name")](**fields).make(learning_rate_schedule(config))
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  if trainable_pattern(config):
    if evaluates_its_average(config):
      from research.config import ConfigError
      raise ConfigError("config.train.trainable does not combine with schedule_free_adamw")
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                         trainable_mask(config, params))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def _is_schedule_free(node) -> bool:
  return isinstance(node, optax.contrib.ScheduleFreeState)


def evaluates_its_average(config) -> bool:
  """Whether the model to evaluate is not the trained parameters but an average kept in the
  optimizer state (see `eval_params`)."""
  return (config.get("optimizer") or {}).get("name") == "schedule_free_adamw"


def eval_params(config) -> Callable[[Any, Any], Any]:
  """`fn(params, opt_state) -> params` to evaluate, sample from or save as the trained model:
  for schedule-free AdamW its averaged parameters x, for every other optimizer `params` as
  they are. `params` and `opt_state` are those of `research.train.step.TrainState` for
  `make_optimizer(config)` (the schedule-free state may sit inside the clipping chain)."""
  if not evaluates_its_average(config):
    return lambda params, opt_state: params

  def schedule_free_eval_params(params, opt_state):
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free)
              if _is_schedule_free(s)]
    if len(states) != 1:
      raise ValueError(f"expected one schedule-free state in the optimizer state, found "
                       f"{len(states)}")
    return optax.contrib.schedule_free_eval_params(states[0], params)

  return schedule_free_eval_params
