"""The training loop shared by every experiment.

One compiled step per batch, no host sync between logging points; evaluation, checkpoints,
metrics and plots at their intervals; resume from the newest checkpoint in the workdir;
SIGTERM/SIGINT save a checkpoint and stop.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from research import config as config_lib
from research import flops, sharding
from research.evaluate.plots import plot_metrics
from research.evaluate.writer import MetricWriter, read_metrics
from research.load import write_run_description
from research.train import optim
from research.train.checkpoint import Checkpoints
from research.train.step import TrainState, init_state, make_eval_step, make_train_step
from research.train.task import Task

# Fields that may change when a run is resumed; any other difference is a different run.
RESUMABLE_CHANGES = {"steps", "decay_steps", "eval_every", "log_every", "checkpoint_every",
                     "keep_checkpoints", "progress_bar", "workdir", "sample",
                     "coordinator_address", "num_processes", "process_id"}


class Diverged(RuntimeError):
  """The loss or gradient stopped being finite (policy `stop`)."""


class Preempted(Exception):
  """A SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved; "
                     f"run the same command to resume")
    self.signum = signum


class _StopSignals:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    # A second signal of the same kind acts at once, the usual way.
    signal.signal(signum, self._previous[signum])
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
          f"(send it again to quit without saving)", file=sys.stderr)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _prepare_workdir(workdir: Path, config, experiment: str, state_bytes: int) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise config_lib.ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None
  free = shutil.disk_usage(workdir).free
  # Two checkpoints may exist while a third is written.
  if free < 3 * state_bytes:
    raise config_lib.ConfigError(f"workdir {workdir} has {free / 2**20:.0f} MiB free; a checkpoint "
                                 f"needs {state_bytes / 2**20:.0f} MiB (x3 while rotating)")
  resolved = {"experiment": experiment, **config.to_dict()}
  path = workdir / "config.json"
  if path.exists() and (workdir / "checkpoints").exists():
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(saved) | set(resolved)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != resolved.get(k))
    decay = lambda c: c.get("decay_steps") or c.get("steps")
    if decay(saved) != decay(resolved):
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run whose learning rate decays over {decay(saved)} steps; "
          f"to train it longer keep that schedule with --config.decay_steps={decay(saved)}")
    if changed:
      diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {resolved.get(k)!r}" for k in changed[:4])
      raise config_lib.ConfigError(f"workdir {workdir} holds a run with a different config "
                                   f"({diffs}); use a new workdir")
  if jax.process_index() == 0:
    path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def _place(state: TrainState, shardings) -> TrainState:
  """Puts host values onto the mesh; every process holds the same values (same seed)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      state, shardings)


def _gather(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate(task: Task, eval_step, state: TrainState, graphdef, mesh) -> dict[str, dict]:
  """Metrics of every eval split (and of the task's own `evaluate`) for the current state."""
  shard = (jax.process_index(), jax.process_count())
  results = {}
  for split, batches in task.eval_data.items():
    outputs = [_gather(eval_step(state.params, state.rest, sharding.global_batch(b, mesh)))
               for b in batches(shard)]
    stacked = {k: (np.stack([o[k] for o in outputs]) if np.ndim(outputs[0][k]) == 0
                   else np.concatenate([o[k] for o in outputs])) for k in outputs[0]}
    results[split] = (task.summarize(split, stacked) if task.summarize
                      else {k: float(np.mean(v)) for k, v in stacked.items()})
  if task.evaluate is not None:
    for split, metrics in task.evaluate(nnx.merge(graphdef, state.params, state.rest)).items():
      results.setdefault(split, {}).update(metrics)
  return results


def train(task: Task, config, *, experiment: str) -> dict[str, dict]:
  """Trains `task` to `config.steps`, resuming from `config.workdir`; returns the last eval."""
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.size)
  started = time.perf_counter()
  workdir = Path(config.workdir)
  is_main = jax.process_index() == 0
  tx = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config)
  graphdef, host_state = init_state(task.model, tx)
  state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state))
  _prepare_workdir(workdir, config, experiment, state_bytes)
  if is_main:  # model.json and tokenizer/: what research.load.load_model rebuilds it from
    write_run_description(workdir, task.model, task.tokenizer)

  shardings = sharding.state_shardings(host_state, mesh, config.parallelism)
  state = _place(host_state, shardings)
  del host_state
  checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state = restored
  start = int(state.step)
  writer = MetricWriter(workdir, enabled=is_main)
  writer.truncate_after(start)

  train_step = make_train_step(graphdef, task.loss_fn, tx, mesh=mesh, state_sharding=shardings,
                               parallelism=config.parallelism, seed=config.seed,
                               accum_steps=config.grad_accum_steps)
  eval_fn = task.eval_fn or (lambda model, batch: task.loss_fn(model, batch, None)[1])
  eval_step = make_eval_step(graphdef, eval_fn, mesh=mesh, state_sharding=shardings)
  peak = flops.device_peak_flops(jax.devices()[0], config.compute_dtype)
  shard = (jax.process_index(), jax.process_count())
  last_eval: dict[str, dict] = {}

  def check_finite():
    if config.nonfinite == "stop" and int(state.first_nonfinite) >= 0:
      raise Diverged(f"non-finite loss or gradient at step {int(state.first_nonfinite)}; stopped "
                     f"without saving (policy nonfinite=stop); last good checkpoint: step "
                     f"{checkpoints.latest_step()} in {checkpoints.directory}")

  last_log = {"step": start, "skipped": int(state.skipped)}

  def check_progress(step, skipped):
    """Under nonfinite=skip, a window of only skipped updates means the run cannot recover."""
    if config.nonfinite == "skip" and step - last_log["step"] > 1 and (
        skipped - last_log["skipped"] == step - last_log["step"]):
      raise Diverged(f"every update from step {last_log['step'] + 1} to {step} had a non-finite "
                     f"loss or gradient (policy nonfinite=skip); stopped; last checkpoint: step "
                     f"{checkpoints.latest_step()} in {checkpoints.directory}")
    last_log.update(step=step, skipped=skipped)

  def run_eval(step):
    nonlocal last_eval
    last_eval = evaluate(task, eval_step, state, graphdef, mesh)
    for split, metrics in last_eval.items():
      writer.write(step, split, metrics)

  if start >= config.steps:
    print(f"{workdir}: already trained to step {start}")
  try:
    with _StopSignals() as signals, tqdm(total=config.steps, initial=start, dynamic_ncols=True,
                                         disable=not (config.progress_bar and is_main)) as bar:
      window_start, window_steps = None, 0
      for step in range(start + 1, config.steps + 1):
        state, metrics = train_step(state, sharding.global_batch(task.train_data(step - 1, shard), mesh))
        bar.update(1)
        if window_start is None:  # Time from the end of the first (compiling) step.
          jax.block_until_ready(state.step)
          window_start, window_steps = time.perf_counter(), 0
        else:
          window_steps += 1
        if step % config.log_every == 0 or step == config.steps:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          check_finite()
          line = {k: float(v) for k, v in metrics.items()}
          line["learning_rate"] = float(schedule(step - 1))
          # Since this process started the run: compilation and evaluation included.
          line["wall_s"] = time.perf_counter() - started
          if config.nonfinite == "skip":
            line["skipped"] = int(state.skipped)
            check_progress(step, line["skipped"])
          if window_steps:
            seconds = elapsed / window_steps
            line["step_time_ms"] = 1000 * seconds
            if task.tokens_per_batch:
              line["tokens_per_second"] = task.tokens_per_batch / seconds
              if task.flops_per_token and peak:
                line["mfu"] = task.flops_per_token * line["tokens_per_second"] / (peak * mesh.size)
          writer.write(step, "train", line)
          bar.set_postfix(loss=f"{line['loss']:.4f}")
          window_start, window_steps = time.perf_counter(), 0
        paused = False
        if step % config.eval_every == 0 or step == config.steps:
          check_finite()
          run_eval(step)
          paused = True
        if step % config.checkpoint_every == 0 or step == config.steps:
          check_finite()
          checkpoints.save(state)
          paused = True
        if signals.received is not None:
          check_finite()
          checkpoints.save(state)
          checkpoints.wait()
          raise Preempted(signals.received, step)
        if paused:
          window_start, window_steps = time.perf_counter(), 0
    if not last_eval:
      last_eval = {r["split"]: r for r in read_metrics(writer.path) if r["split"] != "train"}
    checkpoints.wait()
    # `finish` runs on process 0 alone, so it gets a local copy of the (maybe sharded) model.
    params, rest = _gather((state.params, state.rest))
    if is_main:
      plot_metrics(workdir, log_x=task.log_x)
      if task.finish is not None:
        task.finish(nnx.merge(graphdef, params, rest), workdir)
  finally:
    checkpoints.close()
    writer.close()
  return last_eval
