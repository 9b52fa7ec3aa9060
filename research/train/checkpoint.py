"""Orbax checkpoints of the train state: atomic saves, resume, shape checks, fallback.

Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact. On resume, the newest checkpoint that
reads back is used: an unreadable one is moved aside with a warning (never deleted); one whose
shapes do not match the configured model is an error naming the parameters. `restore_model`
reads the model's variables alone, without the optimizer state (`research.load.load_model`);
resume and load share one restore path.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from research.config import ConfigError
from research.train.step import TrainState


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used for this run; nothing on disk was changed."""


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "rest": state.rest,
          "opt_state": state.opt_state, "skipped": state.skipped,
          "first_nonfinite": state.first_nonfinite}


def _key_path(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
  return "/".join(parts)


def _shape_mismatches(saved_metadata, target) -> list[str]:
  saved = {_key_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_metadata)
           if hasattr(m, "shape")}
  wanted = {_key_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(target)}
  problems = [f"{k}: checkpoint {saved[k]} vs model {v}" for k, v in wanted.items()
              if k in saved and saved[k] != v]
  problems += [f"{k}: missing in checkpoint" for k in wanted if k not in saved]
  problems += [f"{k}: not in model" for k in saved if k not in wanted]
  # Parameters name the problem best; the optimizer state mirrors them.
  return sorted(problems, key=lambda p: not p.startswith("params/"))


class Checkpoints:

  def __init__(self, directory: Path, keep: int, *, read_only: bool = False):
    """`read_only`: for loading only; touches nothing on disk (no folder created, unfinished
    saves of a run still training left alone)."""
    self.directory = Path(directory).absolute()
    self._keep = keep
    self._read_only = read_only
    self._manager = self._open()
    self._reader = None  # opened on first partial restore

  def _open(self) -> ocp.CheckpointManager:
    # Temporary folders are saves a killed process never finished: never checkpoints.
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=not self._read_only,
                                           cleanup_tmp_directories=not self._read_only)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState) -> None:
    """Starts an asynchronous save of `state` at its step (no-op if that step is saved)."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, target: TrainState) -> TrainState | None:
    """The newest readable checkpoint, placed like `target` (any device count), or None.
    An unreadable one is moved aside and the previous one tried."""
    tree = self._restore_newest(_as_tree(target), partial=False)
    return None if tree is None else TrainState(**tree)

  def restore_model(self, params, rest, opt_state=None) -> dict | None:
    """{"params", "rest", "opt_state", "step"} of the newest readable checkpoint, placed like the
    given (maybe abstract) pure dicts; the optimizer state is read only if `opt_state` is
    given (its structure). None if there is no checkpoint."""
    target = {"params": params}
    if jax.tree.leaves(rest):
      target["rest"] = rest
    if opt_state is not None:
      target["opt_state"] = opt_state
    tree = self._restore_newest(target, partial=True)
    if tree is None:
      return None
    return {"rest": rest, "opt_state": None, **tree}

  def _restore_newest(self, target: dict, *, partial: bool) -> dict | None:
    """The one restore path: newest step first, shapes checked against `target` (a subset of
    the saved tree when `partial`); an unreadable step is moved aside (skipped with a warning
    when read-only) and the previous one tried."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        metadata = self._manager.item_metadata(step)
        if partial:
          metadata = {k: v for k, v in dict(getattr(metadata, "tree", metadata)).items()
                      if k in abstract}
        problems = _shape_mismatches(metadata, abstract)
        if problems:
          raise CheckpointError(
              f"checkpoint {self.directory / str(step)} does not fit the configured model "
              f"({len(problems)} mismatches: {'; '.join(problems[:4])}); "
              + ("its model.json describes another model" if partial else "use another workdir"))
        if partial:
          tree = self._partial_reader().restore(step, args=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True))
          tree["step"] = step
        else:
          tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except CheckpointError:
        raise
      except Exception as e:  # orbax/tensorstore raise many kinds for a damaged folder.
        if self._read_only:
          print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                f"({_first_line(e)}); trying the previous one", file=sys.stderr)
        else:
          self._set_aside(step, e)
        continue
      return tree
    return None

  def _partial_reader(self) -> ocp.CheckpointManager:
    # StandardCheckpointHandler reads whole trees only; the same files read as a PyTree can
    # be restored in part (parameters without the optimizer state).
    if self._reader is None:
      self._reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          create=False), item_handlers=ocp.PyTreeCheckpointHandler())
    return self._reader

  def _set_aside(self, step: int, error: Exception) -> None:
    aside = self.directory.parent / "checkpoints_unreadable" / str(step)
    aside.parent.mkdir(exist_ok=True)
    shutil.move(str(self.directory / str(step)), aside)
    print(f"warning: checkpoint step {step} is unreadable ({_first_line(error)}); moved it to "
          f"{aside} and falling back to the previous one", file=sys.stderr)
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._reader is not None:
      self._reader.close()
      self._reader = None


def _first_line(error: Exception) -> str:
  return str(error).splitlines()[0][:120] if str(error) else type(error).__name__
