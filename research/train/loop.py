"""The training loop shared by every experiment.

One compiled step per batch, no host sync between logging points; evaluation, checkpoints,
metrics and plots at their intervals; resume from the newest checkpoint in the workdir;
SIGTERM/SIGINT save a checkpoint and stop.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from research import config as config_lib
from research import flops, sharding
from research.evaluate.plots import plot_metrics
from research.evaluate.writer import MetricWriter, read_metrics
from research.load import load_model, write_run_description
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


_MISSING = object()


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}: config differences named by their full key."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _prepare_workdir(workdir: Path, config, experiment: str) -> None:
  """Checks that `workdir` is writable and holds no run of another config; writes config.json."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise config_lib.ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None
  # Through JSON, as config.json holds it (tuples become lists), so that only values differ.
  resolved = json.loads(json.dumps({"experiment": experiment, **config.to_dict()}))
  path = workdir / "config.json"
  if path.exists() and (workdir / "checkpoints").exists():
    saved = json.loads(path.read_text())
    flat_saved, flat_resolved = _flatten(saved), _flatten(resolved)
    changed = sorted(k for k in set(flat_saved) | set(flat_resolved)
                     if k.split(".")[0] not in RESUMABLE_CHANGES
                     and flat_saved.get(k, _MISSING) != flat_resolved.get(k, _MISSING))
    decay = lambda c: c.get("decay_steps") or c.get("steps")
    if decay(saved) != decay(resolved):
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run whose learning rate decays over {decay(saved)} steps; "
          f"to train it longer keep that schedule with --config.decay_steps={decay(saved)}")
    added = [k for k in changed if k not in flat_saved]
    if added:
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run written before the config fields "
          f"{', '.join(added[:4])}{' ...' if len(added) > 4 else ''} existed; use a new workdir")
    if changed:
      diffs = ", ".join(f"{k}: {flat_saved.get(k, '(none)')!r} -> {flat_resolved.get(k, '(none)')!r}"
                        for k in changed[:4])
      raise config_lib.ConfigError(f"workdir {workdir} holds a run with a different config "
                                   f"({diffs}); use a new workdir")
  if jax.process_index() == 0:
    path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def _check_free_space(workdir: Path, state_bytes: int) -> None:
  free = shutil.disk_usage(workdir).free
  # Two checkpoints may exist while a third is written.
  if free < 3 * state_bytes:
    raise config_lib.ConfigError(f"workdir {workdir} has {free / 2**20:.0f} MiB free; a checkpoint "
                                 f"needs {state_bytes / 2**20:.0f} MiB (x3 while rotating)")


def _has_checkpoint(workdir: Path) -> bool:
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def run_phases(task: Task, workdir: Path, experiment: str) -> None:
  """Trains each of `task.phases` (resuming it) in `<workdir>/<name>` and hands its model over
  to the task's; nothing to do once the task's own run has a checkpoint, which holds the
  handed-over weights already."""
  if not task.phases or _has_checkpoint(workdir):
    return
  for phase in task.phases:
    results = train(phase.task, phase.config, experiment=f"{experiment}/{phase.name}")
    shown = ", ".join(f"{k}={v:.4f}" for k, v in results.get("val", {}).items()
                      if isinstance(v, float) and k != "step")
    print(f"{phase.name} ({phase.config.workdir}): {shown}", file=sys.stderr)
    trained, _, _ = load_model(phase.config.workdir)
    phase.hand_over(trained)


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
  results = {}
  for split, batches in task.eval_data.items():
    outputs = [_gather(eval_step(state.params, state.rest, sharding.global_batch(b, mesh)))
               for b in batches()]
    stacked = {k: (np.stack([o[k] for o in outputs]) if np.ndim(outputs[0][k]) == 0
                   else np.concatenate([o[k] for o in outputs])) for k in outputs[0]}
    results[split] = (task.summarize(split, stacked) if task.summarize
                      else {k: float(np.mean(v)) for k, v in stacked.items()})
  if task.evaluate is not None:
    for split, metrics in task.evaluate(nnx.merge(graphdef, state.params, state.rest)).items():
      results.setdefault(split, {}).update(metrics)
  return results


@dataclasses.dataclass
class Run:
  """What the loop body needs, set up once: the placed (maybe restored) state, the compiled
  steps, checkpoints and the metrics writer."""
  task: Task
  config: Any
  workdir: Path
  mesh: Any
  graphdef: Any
  state: TrainState
  train_step: Callable
  eval_step: Callable
  schedule: Callable[[int], Any]
  # (params, opt_state) -> the parameters to evaluate and hand to `finish` (research.train.optim)
  eval_params: Callable[[Any, Any], Any]
  checkpoints: Checkpoints
  writer: MetricWriter
  start: int  # the step the state was restored at (0 for a new run)

  def evaluated_state(self) -> TrainState:
    """The state with the parameters to evaluate (for most optimizers, the trained ones)."""
    return self.state.replace(params=self.eval_params(self.state.params, self.state.opt_state))

  def evaluate(self) -> dict[str, dict]:
    results = evaluate(self.task, self.eval_step, self.evaluated_state(), self.graphdef,
                       self.mesh)
    for split, metrics in results.items():
      self.writer.write(int(self.state.step), split, metrics)
    return results

  def close(self) -> None:
    self.checkpoints.close()
    self.writer.close()


def setup(task: Task, config, *, experiment: str) -> Run:
  """Validates `config`, prepares the workdir (config.json, model.json, tokenizer/), runs the
  task's phases, then builds the state and restores the newest checkpoint."""
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.size)
  workdir = Path(config.workdir)
  _prepare_workdir(workdir, config, experiment)
  if jax.process_index() == 0:  # what research.load.load_model rebuilds the model from
    write_run_description(workdir, task.model, task.tokenizer)
  run_phases(task, workdir, experiment)

  tx = optim.make_optimizer(config)
  graphdef, host_state = init_state(task.model, tx)
  _check_free_space(workdir, sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state)))
  shardings = sharding.state_shardings(host_state, mesh, config.parallelism)
  state = _place(host_state, shardings)
  del host_state
  checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  state = checkpoints.restore_latest(state) or state
  start = int(state.step)
  if start and jax.process_index() == 0:
    print(f"{workdir}: resumed from step {start}", file=sys.stderr)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.truncate_after(start)
  train_step = make_train_step(graphdef, task.loss_fn, tx, mesh=mesh, state_sharding=shardings,
                               parallelism=config.parallelism, seed=config.seed,
                               accum_steps=config.grad_accum_steps,
                               trainable=optim.trainable_mask(config, state.params))
  eval_fn = task.eval_fn or (lambda model, batch: task.loss_fn(model, batch, None)[1])
  eval_step = make_eval_step(graphdef, eval_fn, mesh=mesh, state_sharding=shardings)
  eval_params = jax.jit(optim.eval_params(config), out_shardings=shardings.params)
  return Run(task=task, config=config, workdir=workdir, mesh=mesh, graphdef=graphdef,
             state=state, train_step=train_step, eval_step=eval_step,
             schedule=optim.learning_rate_schedule(config), eval_params=eval_params,
             checkpoints=checkpoints, writer=writer, start=start)


class StepTimer:
  """Seconds per step over a logging window, leaving out the first (compiling) step and the
  time spent on evaluations and checkpoints."""

  def __init__(self):
    self._start, self._steps = None, 0

  def stepped(self, state: TrainState) -> None:
    if self._start is None:
      jax.block_until_ready(state.step)
      self.restart()
    else:
      self._steps += 1

  def restart(self) -> None:
    self._start, self._steps = time.perf_counter(), 0

  def seconds_per_step(self) -> float | None:
    """Over the window so far (the caller has synced with the device); None before a step."""
    if not self._steps:
      return None
    return (time.perf_counter() - self._start) / self._steps


class NonFinitePolicy:
  """`config.nonfinite`. The step drops every update whose loss or gradient is not finite; under
  `stop` the first one ends the run (unsaved) at the next host sync; under `skip` training goes
  on, unless a whole logging window was dropped, which a run does not recover from."""

  def __init__(self, policy: str, checkpoints: Checkpoints, state: TrainState):
    self.policy, self.checkpoints = policy, checkpoints
    self._window = (int(state.step), int(state.skipped))

  def _stop(self, what: str) -> None:
    raise Diverged(f"{what}; stopped without saving (policy nonfinite={self.policy}); last good "
                   f"checkpoint: step {self.checkpoints.latest_step()} in "
                   f"{self.checkpoints.directory}")

  def check(self, state: TrainState) -> None:
    """Before anything is evaluated or saved."""
    if self.policy == "stop" and int(state.first_nonfinite) >= 0:
      self._stop(f"non-finite loss or gradient at step {int(state.first_nonfinite)}")

  def check_window(self, state: TrainState) -> None:
    """At each logging point."""
    self.check(state)
    step, skipped = int(state.step), int(state.skipped)
    first, skipped_before = self._window
    if self.policy == "skip" and step - first > 1 and skipped - skipped_before == step - first:
      self._stop(f"every update from step {first + 1} to {step} had a non-finite loss or gradient")
    self._window = (step, skipped)


def _train_line(run: Run, metrics, seconds_per_step: float | None, peak: float | None,
                started: float) -> dict:
  line = {k: float(v) for k, v in metrics.items()}
  step = int(run.state.step)
  line["learning_rate"] = float(run.schedule(step - 1))
  # Since this process started the run: compilation and evaluation included.
  line["wall_s"] = time.perf_counter() - started
  if run.config.nonfinite == "skip":
    line["skipped"] = int(run.state.skipped)
  if seconds_per_step:
    line["step_time_ms"] = 1000 * seconds_per_step
    if run.task.tokens_per_batch:
      line["tokens_per_second"] = run.task.tokens_per_batch / seconds_per_step
      if run.task.flops_per_token and peak:
        line["mfu"] = (run.task.flops_per_token * line["tokens_per_second"]
                       / (peak * run.mesh.size))
  return line


def train(task: Task, config, *, experiment: str) -> dict[str, dict]:
  """Trains `task` to `config.steps`, resuming from `config.workdir`; returns the last eval."""
  started = time.perf_counter()
  run = setup(task, config, experiment=experiment)
  is_main = jax.process_index() == 0
  nonfinite = NonFinitePolicy(config.nonfinite, run.checkpoints, run.state)
  timer = StepTimer()
  peak = flops.device_peak_flops(jax.devices()[0], config.compute_dtype)
  last_eval: dict[str, dict] = {}
  if run.start >= config.steps:
    print(f"{run.workdir}: already trained to step {run.start}")
  try:
    if run.start == 0 and config.get("eval_at_start", False):  # e.g. a pretrained model's zero-shot
      last_eval = run.evaluate()
    with _StopSignals() as signals, tqdm(total=config.steps, initial=run.start, dynamic_ncols=True,
                                         disable=not (config.progress_bar and is_main)) as bar:
      for step in range(run.start + 1, config.steps + 1):
        batch = sharding.global_batch(task.train_data(step - 1), run.mesh)
        run.state, metrics = run.train_step(run.state, batch)
        bar.update(1)
        timer.stepped(run.state)
        last = step == config.steps
        if step % config.log_every == 0 or last:
          metrics = jax.device_get(metrics)
          seconds = timer.seconds_per_step()
          nonfinite.check_window(run.state)
          line = _train_line(run, metrics, seconds, peak, started)
          run.writer.write(step, "train", line)
          bar.set_postfix(loss=f"{line['loss']:.4f}")
          timer.restart()
        evaluate_now = step % config.eval_every == 0 or last
        save_now = step % config.checkpoint_every == 0 or last or signals.received is not None
        if evaluate_now or save_now:
          nonfinite.check(run.state)
        if evaluate_now:
          last_eval = run.evaluate()
        if save_now:
          run.checkpoints.save(run.state)
        if signals.received is not None:
          run.checkpoints.wait()
          raise Preempted(signals.received, step)
        if evaluate_now or save_now:
          timer.restart()
    if not last_eval:
      last_eval = {r["split"]: r for r in read_metrics(run.writer.path) if r["split"] != "train"}
    run.checkpoints.wait()
    # `finish` runs on process 0 alone, so it gets a local copy of the (maybe sharded) model.
    evaluated = run.evaluated_state()
    params, rest = _gather((evaluated.params, evaluated.rest))
    if is_main:
      plot_metrics(run.workdir, log_x=task.log_x)
      if task.finish is not None:
        task.finish(nnx.merge(run.graphdef, params, rest), run.workdir)
  finally:
    run.close()
  return last_eval
