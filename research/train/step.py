"""The train state and the compiled train step.

The step is a pure function of (state, batch): data come from the step number, dropout keys
from `fold_in(seed, step)`, so a run resumed from a checkpoint repeats the uninterrupted
run exactly. An update whose loss or gradient norm is not finite is dropped on device (no
host sync); the state counts it, and the loop decides at its next sync whether to stop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from research import sharding

# (model, batch, rngs or None) -> (scalar loss, {"loss": ..., other scalar metrics}).
LossFn = Callable[[nnx.Module, dict, nnx.Rngs | None], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # updates attempted so far
  params: Any  # pure dict of nnx.Param values
  rest: Any  # other model variables (e.g. batch statistics)
  opt_state: Any
  skipped: jax.Array  # updates dropped because the loss or gradient was not finite
  first_nonfinite: jax.Array  # step of the first dropped update; -1 if none


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = params.to_pure_dict(), rest.to_pure_dict()
  state = TrainState(step=jnp.int32(0), params=params, rest=rest, opt_state=tx.init(params),
                     skipped=jnp.int32(0), first_nonfinite=jnp.int32(-1))
  return graphdef, state


def _grads(graphdef, loss_fn: LossFn, params, rest, batch, key, accum_steps: int):
  """Mean gradients, metrics and updated model variables over `accum_steps` micro-batches."""

  def micro_step(rest, micro_batch, key):
    def loss_of(params):
      model = nnx.merge(graphdef, params, rest)
      loss, metrics = loss_fn(model, micro_batch, nnx.Rngs(dropout=key))
      return loss, (metrics, nnx.split(model, nnx.Param, ...)[2].to_pure_dict())
    (_, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return grads, metrics, rest

  if accum_steps == 1:
    return micro_step(rest, batch, key)

  micro_batches = jax.tree.map(
      lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, xs):
    grad_sum, rest = carry
    micro_batch, key = xs
    grads, metrics, rest = micro_step(rest, micro_batch, key)
    return (jax.tree.map(jnp.add, grad_sum, grads), rest), metrics

  init = (jax.tree.map(jnp.zeros_like, params), rest)
  (grad_sum, rest), metrics_A = jax.lax.scan(
      body, init, (micro_batches, jax.random.split(key, accum_steps)))
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  return grads, jax.tree.map(lambda m: m.mean(axis=0), metrics_A), rest


def _update(state: TrainState, grads, metrics, rest, tx) -> tuple[TrainState, dict]:
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_new = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  state = TrainState(
      step=state.step + 1,
      params=keep_new(params, state.params),
      rest=keep_new(rest, state.rest),
      opt_state=keep_new(opt_state, state.opt_state),
      skipped=state.skipped + (~finite).astype(jnp.int32),
      first_nonfinite=jnp.where(~finite & (state.first_nonfinite < 0), state.step + 1,
                                state.first_nonfinite))
  return state, {**metrics, "grad_norm": grad_norm}


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh,
                    state_sharding, parallelism: str, seed: int, accum_steps: int = 1,
                    trainable=None):
  """Returns `train_step(state, batch) -> (state, metrics)`, jit-compiled and sharded.
  `trainable` (bools like the params; `research.train.optim.trainable_mask`): gradients of the
  others are zeros, so the compiler drops their computation (the optimizer freezes them)."""

  def train_step(state: TrainState, batch, axis: str | None):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    params, rest = state.params, state.rest
    if axis is not None:
      # Each device draws its own dropout masks, and differentiates its own copy of the
      # parameters: its local gradient, which pmean then averages (the pmap pattern).
      key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      params, rest = jax.lax.pcast((params, rest), axis, to="varying")
    grads, metrics, rest = _grads(graphdef, loss_fn, params, rest, batch, key, accum_steps)
    if trainable is not None:
      grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    if axis is not None:
      grads, metrics, rest = jax.lax.pmean((grads, metrics, rest), axis)
    return _update(state, grads, metrics, rest, tx)

  if parallelism == "dp":
    fn = jax.shard_map(functools.partial(train_step, axis=sharding.DATA), mesh=mesh,
                       in_specs=(P(), P(sharding.DATA)), out_specs=(P(), P()))
  else:
    fn = functools.partial(train_step, axis=None)
  return jax.jit(fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, eval_fn, *, mesh, state_sharding):
  """Returns `eval_step(state, batch) -> eval_fn(model, batch)`, jit-compiled."""

  def eval_step(params, rest, batch):
    return eval_fn(nnx.merge(graphdef, params, rest), batch)

  return jax.jit(eval_step, in_shardings=(state_sharding.params, state_sharding.rest,
                                     sharding.batch_sharding(mesh)))
