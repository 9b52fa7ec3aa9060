"""Orbax checkpoints of the train state: atomic saves, resume, shape checks, fallback.

Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact. On resume, the newest checkpoint that
reads back is used: an unreadable one is moved aside with a warning (never deleted); one whose
shapes do not match the configured model is an error naming the parameters.
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

  def __init__(self, directory: Path, keep: int):
    self.directory = Path(directory).absolute()
    self._keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # Temporary folders are saves a killed process never finished: never checkpoints.
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, cleanup_tmp_directories=True)
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
    """The newest readable checkpoint, placed like `target` (any device count), or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(target))
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        metadata = self._manager.item_metadata(step)
        problems = _shape_mismatches(metadata, abstract)
        if problems:
          raise CheckpointError(
              f"checkpoint {self.directory / str(step)} does not fit the configured model "
              f"({len(problems)} mismatches: {'; '.join(problems[:4])}); use another workdir")
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except CheckpointError:
        raise
      except Exception as e:  # orbax/tensorstore raise many kinds for a damaged folder.
        self._set_aside(step, e)
        continue
      return TrainState(**tree)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    aside = self.directory.parent / "checkpoints_unreadable" / str(step)
    aside.parent.mkdir(exist_ok=True)
    shutil.move(str(self.directory / str(step)), aside)
    detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    print(f"warning: checkpoint step {step} is unreadable ({detail}); moved it to {aside} and "
          f"falling back to the previous one", file=sys.stderr)
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
