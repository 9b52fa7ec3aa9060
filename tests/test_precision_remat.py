"""`compute_dtype` and `model.remat` reach the compiled step: read from the step's HLO.

Both leave the losses (nearly) unchanged, which `tests/test_sharding.py` checks; here the
step built from the experiment's config must really multiply in bf16 and really recompute.
"""

import re

import jax
import numpy as np
import pytest

import experiments
from research import config as config_lib
from research import sharding
from research.train import optim
from research.train.step import init_state, make_train_step


def lowered_step(*overrides):
  """gpt_shakespeare:tiny's train step, built as the loop builds it, lowered for 8 devices."""
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"),
                                      list(overrides))
  task = experiments.load("gpt_shakespeare").build(config)
  tx = optim.make_optimizer(config)
  graphdef, state = init_state(task.model, tx)
  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(state, mesh, config.parallelism)
  step = make_train_step(graphdef, task.loss_fn, tx, mesh=mesh, state_sharding=shardings,
                         parallelism=config.parallelism, seed=0)
  tokens = np.zeros((config.batch_size, config.model.block_size), np.int32)
  batch = sharding.global_batch({"inputs": tokens, "targets": tokens}, mesh)
  return step.lower(jax.device_put(state, shardings), batch)


def dots(stablehlo: str) -> list[str]:
  return [line for line in stablehlo.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("parallelism", ["dp", "fsdp"])
def test_bfloat16_compute_dtype_makes_every_matmul_bf16(parallelism):
  f32 = dots(lowered_step(f"--config.parallelism={parallelism}").as_text())
  bf16 = dots(lowered_step(f"--config.parallelism={parallelism}",
                           "--config.compute_dtype=bfloat16").as_text())
  assert len(f32) == len(bf16) > 20  # forward and backward of every matmul
  assert not [d for d in f32 if "bf16" in d]
  # Projections, attention, MLP and the tied head alike multiply in bf16: operands in bf16, or
  # (XLA attention's backward, whose float32 softmax gradient meets bf16 values) an algorithm
  # with bf16 operand precision.
  assert all("bf16" in d for d in bf16), [d for d in bf16 if "bf16" not in d]
  assert sum(re.search(r": \((.*)\) ->", d).group(1).count("bf16") == 2 for d in bf16) > 0.8 * len(bf16)


def test_remat_recomputes_the_blocks_forward_matmuls_in_the_compiled_step():
  def compiled_dots(*overrides):
    text = lowered_step(*overrides).compile().as_text()
    return len(re.findall(r" dot\(", text))

  plain, remat = compiled_dots(), compiled_dots("--config.model.remat=true")
  # Each of the 2 blocks runs its forward matmuls again in the backward pass (qkv, q·k,
  # p·v, output projection, MLP up and down, less what XLA fuses), and XLA keeps them:
  # remat's optimization barriers stop it from reusing the first forward.
  assert remat - plain >= 2 * 4, (plain, remat)
