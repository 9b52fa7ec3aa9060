"""benchmarks/profile_step: both modes time and trace, and the trace names XLA's ops."""

import jax
import pytest

from benchmarks import profile_step


@pytest.mark.parametrize("mode", [[], ["--train-step"]])
def test_profile_step_times_and_traces_ops(mode, capsys):
  assert profile_step.main(["--variant", "tiny", "--calls", "2", "--top", "5"] + mode) == 0
  out = capsys.readouterr().out
  if mode:
    assert "train step" in out and f"on {jax.device_count()} device(s)" in out
    assert "all-reduce" in out or jax.device_count() == 1  # the pmean of the gradients
  else:
    assert "forward + backward" in out
  assert "by kind:" in out and "largest ops:" in out
