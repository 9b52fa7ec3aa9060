"""Model FLOPs per token and device peak FLOP/s, for model FLOPs utilization (MFU).

A model that reports MFU defines `flops_per_token(context)` from the formulas here
(`research.models.gpt.GPT`, `research.models.lstm.LSTMLM`).
"""

from __future__ import annotations

import jax
from flax import nnx

# Dense peak FLOP/s per chip by (device-kind substring, compute dtype). float32 matmuls
# run on TF32 tensor cores on NVIDIA GPUs under JAX's default precision, so their peak is
# the TF32 one. Longer substrings are matched first ("H100" before "H10").
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 494e12,
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 494e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
    ("L4", "bfloat16"): 121e12, ("L4", "float32"): 60e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12, ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12, ("TPU v6e", "bfloat16"): 918e12,
}


def device_peak_flops(device, dtype: str = "bfloat16") -> float | None:
  """Peak dense FLOP/s of one `device` for `dtype`; None where unknown (CPUs)."""
  kind = device.device_kind
  for (name, peak_dtype), peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0][0])):
    if name in kind and peak_dtype == dtype:
      return peak
  return None


def transformer_flops_per_token(*, matmul_params: int, num_layers: int, context: int,
                                embed_dim: int, causal: bool = True) -> float:
  """Training FLOPs per token: 6 per matmul parameter (forward 2 + backward 4) plus attention.

  Attention scores and the weighted sum are 2 matmuls of T x D per token per layer: 4·T·D
  forward, 12·T·D with the backward. A causal mask halves the useful part.
  """
  attention = 12 * num_layers * context * embed_dim
  return 6 * matmul_params + (attention / 2 if causal else attention)


def matmul_params(model: nnx.Module) -> int:
  """Parameters that multiply activations: matrices, minus lookup-only position tables."""
  params = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)
  pos = getattr(model, "pos_embed", None)
  return total - (pos.embedding.value.size if pos is not None else 0)
