"""A `GPT` with low-rank adapters (`research.nn.lora`) on the linear layers its config names.

`LoRAGPTConfig` is `GPTConfig` plus the adapters' rank, alpha and target regex, so a run folder
describes the adapted model like any other (`research.load.load_model` rebuilds it) and
everything that reads a GPT (`model.cfg.block_size`, sampling, `research.interpret`) reads this
one. `with_lora(gpt, ...)` adapts a GPT holding pretrained weights; `merged(model)` is the plain
`GPT` with every adapter folded into its kernel, for sampling or export.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.gpt import GPT, GPTConfig
from research.nn import lora


@dataclasses.dataclass(frozen=True)
class LoRAGPTConfig(GPTConfig):
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = r"attn/(qkv|out)"  # regex on layer paths, e.g. "blocks/3/mlp/up"


def base_config(cfg: GPTConfig) -> GPTConfig:
  """The GPTConfig of a (maybe LoRA) config: its GPT fields alone."""
  return GPTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)})


class LoRAGPT(GPT):

  def __init__(self, cfg: LoRAGPTConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    lora.add_lora(self, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                  rngs=rngs)


def with_lora(gpt: GPT, *, rank: int, alpha: float, targets: str, seed: int = 0) -> LoRAGPT:
  """A `LoRAGPT` holding `gpt`'s weights and fresh adapters. ValueError if `targets` matches no
  linear layer."""
  cfg = LoRAGPTConfig(**dataclasses.asdict(base_config(gpt.cfg)), lora_rank=rank,
                      lora_alpha=alpha, lora_targets=targets)
  # Built abstractly (no random init of the base weights), then filled with gpt's weights and
  # the adapters' init (A random, B zero).
  abstract = nnx.eval_shape(lambda: LoRAGPT(cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  values = nnx.state(gpt).to_pure_dict()
  adapted = [(p, m) for p, m in nnx.iter_graph(abstract) if isinstance(m, lora.LoRALinear)]
  for key, (path, m) in zip(jax.random.split(jax.random.key(seed), len(adapted)), adapted):
    node = values
    for part in path:
      node = node[part]
    node["lora_a"] = jax.random.normal(key, m.lora_a.shape, m.lora_a.dtype) / rank
    node["lora_b"] = jnp.zeros(m.lora_b.shape, m.lora_b.dtype)
  state.replace_by_pure_dict(values)
  return nnx.merge(graphdef, state)


def merged(model: GPT) -> GPT:
  """The plain GPT that `model` computes: each adapter folded into its kernel."""
  if not isinstance(model, LoRAGPT):
    return model
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)  # a separate module tree (same arrays; not mutated)
  lora.merge_lora(copy)
  plain = nnx.eval_shape(lambda: GPT(base_config(model.cfg), rngs=nnx.Rngs(0)))
  plain_graphdef, _ = nnx.split(plain)
  return nnx.merge(plain_graphdef, nnx.state(copy))
