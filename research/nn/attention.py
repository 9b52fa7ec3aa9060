"""The one attention function every model calls; `implementation` picks the kernel.

- `xla`: `jax.nn.dot_product_attention` lowered by XLA (any device; the default).
- `cudnn`: the same function through cuDNN's fused kernel (NVIDIA GPUs).
- `pallas`: this project's flash attention (`kernels.flash_attention`); interpreted on CPU.
- `auto`: the Pallas kernel where the device and shapes support it, else XLA.
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


def check_supported(implementation: str) -> None:
  """Fails early, with a readable message, for a choice this machine cannot run."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"choose one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU; "
                     f"this run's backend is {jax.default_backend()!r}")


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                          causal: bool, implementation: str = "xla",
                          mask_BxHxTxS: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention; K (kv heads) divides H (query heads) for GQA/MQA.

  `mask_BxHxTxS` (True = attend; any broadcastable shape, e.g. [B, 1, 1, S] for padding)
  applies on top of `causal`. Masked calls (padding, KV-cache decoding) run on XLA.
  """
  check_supported(implementation)
  if mask_BxHxTxS is not None or implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(
        q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask_BxHxTxS, is_causal=causal,
        implementation="cudnn" if implementation == "cudnn" else "xla")
  import kernels  # Deferred: the kernels package is only needed for these two choices.
  return kernels.flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal,
                                 implementation=implementation)
