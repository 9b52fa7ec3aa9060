"""The MFU numerator: the FLOPs-per-token formula against XLA's count of the compiled step."""

import json
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import flops, sharding
from research.data.text import LMBatches
from research.flops import matmul_params
from research.models.gpt import GPT, GPTConfig
from research.models.lstm import LSTMConfig, LSTMLM
from research.tasks.language_model import next_token_loss
from research.train import optim
from research.train.step import init_state, make_train_step


def _dot_flops(stablehlo: str) -> int:
  """FLOPs of every dot_general in a lowered program: 2 x output elements x contracted size."""
  total = 0
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    contracting = re.search(r"contracting_dims = \[([\d, ]*)\] x", line).group(1)
    lhs, out = re.search(r": \(tensor<([\dx]+)x[a-z]\w*>, .*\) -> tensor<([\dx]*)[a-z]+\d*>",
                         line).groups()
    lhs = [int(n) for n in lhs.split("x")]
    out_size = math.prod(int(n) for n in out.split("x") if n)
    total += 2 * out_size * math.prod(lhs[int(d)] for d in contracting.split(","))
  return total


# (batch, context T, embed_dim D, layers L, vocab V, heads): V·D is 14% and 6% of the
# matrix parameters, so a tied head dropped or counted twice moves the count well past 2%.
SHAPES = [(4, 256, 256, 2, 512, 4), (8, 128, 256, 1, 256, 2)]


@pytest.mark.parametrize("B, T, D, L, V, H", SHAPES)
def test_formula_is_exact_and_matches_xla_cost_analysis_of_the_train_step(B, T, D, L, V, H):
  model = GPT(GPTConfig(vocab_size=V, block_size=T, num_layers=L, num_heads=H, embed_dim=D),
              rngs=nnx.Rngs(0))
  # By hand. Per layer: qkv D×3D, output D×D, MLP D×4D and 4D×D = 12·D² matrix parameters;
  # the tied head E (V×D) multiplies once (the input side is a lookup), the position table
  # never. Training costs 6 FLOPs per matrix parameter per token (forward 2, backward 4).
  # Attention: q·kᵀ and p·v, 2·T·D each forward per token per layer, ×3 with the backward
  # = 12·L·T·D; causal masking leaves half of it useful.
  matrix_flops = 6 * (12 * L * D * D + V * D)
  full = matrix_flops + 12 * L * T * D
  causal = matrix_flops + 6 * L * T * D
  assert model.flops_per_token(T) == causal
  assert model.flops_per_token(T, causal=False) == full

  config = config_lib.base()
  tx = optim.make_optimizer(config)
  graphdef, state = init_state(model, tx)
  mesh = sharding.make_mesh(jax.devices()[:1])
  shardings = sharding.state_shardings(state, mesh, "dp")
  step = make_train_step(graphdef, next_token_loss, tx, mesh=mesh, state_sharding=shardings,
                         parallelism="fsdp", seed=0)
  batch = LMBatches(np.zeros(1000, np.int32), T, B, 0)(0)
  lowered = step.lower(jax.device_put(state, shardings), batch)
  # The step's own matmuls, read from its program, are exactly the full count: XLA computes
  # every score of the causal attention, masked ones included.
  assert _dot_flops(lowered.as_text()) == full * B * T
  # XLA's count of the compiled step adds what is not a matmul (layer norms, GELU, softmaxes,
  # the loss, the optimizer): 1.4% here, and never less than the matmuls.
  xla_flops = lowered.compile().cost_analysis()["flops"]
  assert full * B * T <= xla_flops <= 1.02 * full * B * T


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_gpt_flops_per_token_is_the_transformer_formula(position):
  """The model's method gives the numbers the training loop and benchmarks logged before it
  existed: 6 per matrix parameter (position table left out) plus causal attention."""
  L, D, T = 3, 48, 40
  model = GPT(GPTConfig(vocab_size=70, block_size=T, num_layers=L, num_heads=4, embed_dim=D,
                        position=position), rngs=nnx.Rngs(0))
  matrices = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
  n = matrices - (T * D if position == "learned" else 0)
  assert model.flops_per_token(T) == 6 * n + 12 * L * T * D / 2
  assert model.flops_per_token() == model.flops_per_token(T)  # default: block_size
  assert model.flops_per_token(16) == 6 * n + 12 * L * 16 * D / 2
  assert model.flops_per_token(T, causal=False) == 6 * n + 12 * L * T * D


def test_lstm_flops_per_token_is_six_per_matrix_parameter():
  model = LSTMLM(LSTMConfig(vocab_size=70, embed_dim=16, hidden_dim=24, num_layers=2),
                 rngs=nnx.Rngs(0))
  matrices = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
  assert model.flops_per_token(64) == model.flops_per_token(8) == 6 * matrices


def test_device_peaks_come_from_a_table_by_kind():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind
  assert flops.device_peak_flops(Device("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
  assert flops.device_peak_flops(Device("NVIDIA A100-SXM4-40GB"), "bfloat16") == 312e12
  assert flops.device_peak_flops(Device("TPU v5 lite"), "bfloat16") == 197e12
  assert flops.device_peak_flops(Device("cpu"), "float32") is None


def test_mfu_benchmark_runs_sharded_and_writes_its_report(tmp_path, monkeypatch):
  from benchmarks import mfu

  args = ["--size", "tiny", "--batch", "8", "--steps", "2", "--dtype", "float32"]
  assert mfu.main(args + ["--out", str(tmp_path / "cpu")]) == 0
  (report,) = (tmp_path / "cpu").glob("mfu_tiny_*.json")
  result = json.loads(report.read_text())
  assert result["devices"] == jax.device_count() and result["tokens_per_second"] > 0
  assert np.isfinite(result["final_loss"])
  assert result["mfu"] is None  # CPUs have no peak in the table
  # With a known peak: MFU = FLOPs/token x tokens/s / (peak x devices).
  monkeypatch.setattr(mfu.flops, "device_peak_flops", lambda device, dtype: 1e9)
  assert mfu.main(args + ["--out", str(tmp_path / "peak")]) == 0
  (report,) = (tmp_path / "peak").glob("mfu_tiny_*.json")
  result = json.loads(report.read_text())
  assert result["mfu"] == pytest.approx(
      result["flops_per_token"] * result["tokens_per_second"] / (1e9 * jax.device_count()))
  assert mfu.main(["--size", "tiny", "--batch", "3", "--out", str(tmp_path)]) == 2
