"""Multi-host: two processes of 4 CPU devices each (gloo over loopback) train like one of 8,
with `dp` and `fsdp`, and a two-process run stopped at a checkpoint resumes from it."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import fault_trials
from research.load import load_model

pytestmark = pytest.mark.slow

COMMON = ["gpt_shakespeare:tiny", "--config.progress_bar=false", "--config.decay_steps=10",
          "--config.checkpoint_every=5", "--config.log_every=5", "--config.eval_every=5"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, devices):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_COMPILATION_CACHE_DIR": str(fault_trials.REPO / ".cache" / "jax")}
  return subprocess.Popen([sys.executable, "-m", "experiments", *COMMON, *args],
                          cwd=fault_trials.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _two_hosts(workdir, *args):
  address = f"127.0.0.1:{_free_port()}"
  return [_launch([f"--config.workdir={workdir}", f"--config.coordinator_address={address}",
                   "--config.num_processes=2", f"--config.process_id={i}", *args], 4)
          for i in range(2)]


def _finish(processes):
  for process in processes:
    code, err = fault_trials.finish(process, timeout=600)
    assert code == 0, err


def _params(workdir):
  model, _, _ = load_model(workdir)
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _metrics_lines(workdir, last_step):
  """metrics.jsonl's lines up to `last_step`, as written (timings included)."""
  import json
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [line for line in lines if json.loads(line)["step"] <= last_step]


@pytest.mark.parametrize("parallelism", ["dp", "fsdp"])
def test_two_processes_of_four_devices_train_like_one_of_eight(tmp_path, parallelism):
  """The single run goes straight to step 10; the two-process run stops at step 5 (its
  checkpoint) and a second launch of both processes resumes it to step 10."""
  mode = f"--config.parallelism={parallelism}"
  single = _launch([f"--config.workdir={tmp_path / 'single'}", mode, "--config.steps=10"], 8)
  multi = tmp_path / "multi"
  _finish([single, *_two_hosts(multi, mode, "--config.steps=5")])
  assert fault_trials.complete_checkpoints(multi) == {5}
  first_leg = _metrics_lines(multi, 5)
  _finish(_two_hosts(multi, mode, "--config.steps=10"))

  # Resumed at step 5, not restarted: the first leg's lines, wall times and step times
  # included (which a rerun would not reproduce), are still there byte for byte.
  assert _metrics_lines(multi, 5) == first_leg
  single_rows = fault_trials.curves(tmp_path / "single")
  multi_rows = fault_trials.curves(multi)
  assert [(r["step"], r["split"]) for r in multi_rows] == [(r["step"], r["split"]) for r in single_rows]
  for a, b in zip(single_rows, multi_rows):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  for a, b in zip(_params(tmp_path / "single"), _params(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert fault_trials.complete_checkpoints(multi) == {5, 10}
  assert (multi / "samples.txt").exists()


def test_two_processes_killed_mid_run_resume_from_their_last_checkpoint(tmp_path):
  """Both processes SIGKILLed (a crashed machine: nothing is saved on the way out); a second
  launch restores the newest complete checkpoint and ends where an uninterrupted run does."""
  legs = ["--config.checkpoint_every=20", "--config.log_every=10"]
  single = _launch([f"--config.workdir={tmp_path / 'single'}", "--config.steps=60", *legs], 8)
  multi = tmp_path / "multi"
  processes = _two_hosts(multi, "--config.steps=100000", *legs)
  assert fault_trials.wait_until(lambda: fault_trials.last_train_step(multi) >= 30, processes[0])
  for process in processes:
    process.kill()
  for process in processes:
    assert fault_trials.finish(process)[0] == -9
  saved = fault_trials.complete_checkpoints(multi)
  assert saved and max(saved) >= 20
  relaunched = _two_hosts(multi, "--config.steps=60", *legs)
  errors = [fault_trials.finish(p, timeout=600) for p in relaunched]
  assert all(code == 0 for code, _ in errors), errors
  assert f"resumed from step {max(saved)}" in errors[0][1]
  _finish([single])
  for a, b in zip(_params(tmp_path / "single"), _params(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
