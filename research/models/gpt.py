"""GPT: a decoder-only Transformer (Radford et al. 2018/2019), the nanoGPT way.

Token + position embeddings (learned, or rotary), pre-LayerNorm blocks of causal
self-attention (`research.nn.attention.MultiHeadAttention`, fused qkv; optionally grouped-query
and QK-normed) and a GELU MLP, a final LayerNorm, and logits through the tied input
embedding. `decode` runs the same blocks against a KV cache, one or more tokens at a time.

Knobs from the modded-nanoGPT speedrun, each off by default (`GPTConfig`): QK-norm, a ReLU²
MLP, an untied output head, zero-initialised residual projections (attention out-projection
and MLP down-projection) and logit soft-capping.

The Llama architecture is this GPT with four more knobs: RMSNorm (`norm="rmsnorm"`, `norm_eps`),
a SwiGLU MLP of its own width (`mlp_activation="swiglu"`, `mlp_dim`), RoPE with the checkpoint's
`rope_theta`, and grouped-query attention (`num_kv_heads`); `research.pretrained.gguf` loads
SmolLM2 into it. Two more, for other checkpoints (`research.pretrained.hf_gpt`): Llama 3.1's
RoPE scaling (`rope_scaling`) and biases on q/k/v alone (`qkv_bias`, Qwen2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from research import flops
from research.nn.attention import MultiHeadAttention


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  block_size: int  # longest context the model is trained on
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # grouped-query attention; 0: one kv head per query head
  embed_dim: int = 128
  mlp_ratio: int = 4  # 0: attention-only blocks (Olsson et al. 2022's induction-head models)
  mlp_dim: int = 0  # the MLP's hidden width; 0: mlp_ratio * embed_dim
  dropout: float = 0.0
  use_bias: bool = False
  qkv_bias: bool = False  # biases on the q/k/v projection alone (Qwen2); use_bias: on all
  position: str = "learned"  # "learned" or "rope"
  rope_theta: float = 10_000.0  # RoPE's base frequency (Llama 3 / SmolLM2: 500k / 100k)
  # RoPE scaling, research.nn.attention.scaled_frequencies: (), ("llama3", factor, low_freq_factor,
  # high_freq_factor, original context) or ("divisors", one per rotated pair)
  rope_scaling: tuple = ()
  norm: str = "layernorm"  # "layernorm" or "rmsnorm" (Zhang & Sennrich 2019; Llama)
  norm_eps: float = 1e-6
  qk_norm: bool = False  # RMS-normalize queries and keys per head (Dehghani et al. 2023)
  mlp_activation: str = "gelu"  # a key of MLP_ACTIVATIONS; "relu2": ReLU² (So et al. 2021)
  # "swiglu": silu(gate(x)) * up(x) (Shazeer 2020; Llama)
  tie_embeddings: bool = True  # False: a separate output head instead of the input embedding
  zero_init_projections: bool = False  # residual branches (attn out, MLP down) start at zero
  logit_softcap: float = 0.0  # > 0: logits = cap·tanh(logits / cap) (Gemma 2); 0: off
  attention: str = "xla"  # see research.nn.attention
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: bool = False  # recompute each block's activations in the backward pass


# The MLP's nonlinearity, by `GPTConfig.mlp_activation`; a gated one (`GATED`) multiplies
# activation(gate(x)) with up(x) before the down-projection.
MLP_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's tanh approximation
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "swiglu": jax.nn.silu,
}
GATED = ("swiglu",)


def _norm(cfg: GPTConfig, *, rngs: nnx.Rngs):
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
  return nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, use_bias=cfg.use_bias,
                       dtype=cfg.dtype, rngs=rngs)


def _mlp_dim(cfg: GPTConfig) -> int:
  return cfg.mlp_dim or cfg.mlp_ratio * cfg.embed_dim


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def _projection_init(cfg: GPTConfig):
  """Init of the projections that end a residual branch: GPT-2's scaled init, where they shrink
  with depth, or zeros (each block then starts as the identity)."""
  if cfg.zero_init_projections:
    return nnx.initializers.zeros_init()
  return _normal(0.02 / math.sqrt(2 * cfg.num_layers))


class MLP(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, h = cfg.embed_dim, _mlp_dim(cfg)
    linear = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.up = nnx.Linear(d, h, kernel_init=_normal(0.02), **linear)
    if cfg.mlp_activation in GATED:
      self.gate = nnx.Linear(d, h, kernel_init=_normal(0.02), **linear)
    self.down = nnx.Linear(h, d, kernel_init=_projection_init(cfg), **linear)
    self.activation = MLP_ACTIVATIONS[cfg.mlp_activation]
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BxTxD, *, rngs=None):
    x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1])  # see `research.nn.transformer.MLP`
    if hasattr(self, "gate"):
      h_NxH = self.activation(self.gate(x_NxD)) * self.up(x_NxD)
    else:
      h_NxH = self.activation(self.up(x_NxD))
    y_NxD = self.down(h_NxH)
    return self.dropout(y_NxD.reshape(x_BxTxD.shape), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, rngs=rngs)
    self.attn = MultiHeadAttention(
        cfg.embed_dim, cfg.num_heads, num_kv_heads=cfg.num_kv_heads, fused_qkv=True,
        use_rope=cfg.position == "rope", rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling, qk_norm=cfg.qk_norm,
        use_bias=cfg.use_bias, qkv_bias=cfg.qkv_bias,
        dropout=cfg.dropout, implementation=cfg.attention, dtype=cfg.dtype,
        kernel_init=_normal(0.02), out_init=_projection_init(cfg),
        rngs=rngs)
    self.norm2 = _norm(cfg, rngs=rngs) if _mlp_dim(cfg) else None
    self.mlp = MLP(cfg, rngs=rngs) if _mlp_dim(cfg) else None

  def __call__(self, x_BxTxD, *, rngs=None, cache=None, pos=0):
    a_BxTxD, cache = self.attn(self.norm1(x_BxTxD), causal=True, rngs=rngs, cache=cache, pos=pos)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.mlp is None:
      return x_BxTxD, cache
    return x_BxTxD + self.mlp(self.norm2(x_BxTxD), rngs=rngs), cache


class GPT(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    if cfg.embed_dim % cfg.num_heads:
      raise ValueError(f"embed_dim={cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}")
    if cfg.position not in ("learned", "rope"):
      raise ValueError(f"unknown position embedding {cfg.position!r}; choose learned or rope")
    if cfg.norm not in ("layernorm", "rmsnorm"):
      raise ValueError(f"unknown norm {cfg.norm!r}; choose layernorm or rmsnorm")
    if cfg.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"unknown mlp_activation {cfg.mlp_activation!r}; valid names: "
                       f"{', '.join(MLP_ACTIVATIONS)}")
    if not cfg.logit_softcap >= 0:
      raise ValueError(f"logit_softcap must be >= 0 (0: off), got {cfg.logit_softcap}")
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=_normal(0.02),
                           dtype=cfg.dtype, rngs=rngs)
    if cfg.position == "learned":
      self.pos_embed = nnx.Embed(cfg.block_size, cfg.embed_dim, embedding_init=_normal(0.02),
                                 dtype=cfg.dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = _norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = nnx.Linear(cfg.embed_dim, cfg.vocab_size, use_bias=False,
                             kernel_init=_normal(0.02), dtype=cfg.dtype, rngs=rngs)

  @property
  def context_length(self) -> int:
    return self.cfg.block_size

  def _embed(self, tokens_BxT, start):
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.position == "learned":
      x_BxTxD = x_BxTxD + self.pos_embed(start + jnp.arange(tokens_BxT.shape[1]))[None]
    return x_BxTxD

  def _logits(self, x_BxTxD):
    # Tied weights: the output layer is the transposed input embedding (unless untied, a
    # head of its own); logits and softmax in float32.
    B, T, D = x_BxTxD.shape
    x_NxD = self.norm(x_BxTxD).reshape(B * T, D)
    logits_NxV = self.embed.attend(x_NxD) if self.cfg.tie_embeddings else self.head(x_NxD)
    logits_BxTxV = logits_NxV.reshape(B, T, -1).astype(jnp.float32)
    if self.cfg.logit_softcap:
      cap = self.cfg.logit_softcap
      logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)  # smoothly bounded to (-cap, cap)
    return logits_BxTxV

  def __call__(self, tokens_BxT: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, T, V] for next-token prediction; `rngs` given = training (dropout on)."""
    x_BxTxD = self.dropout(self._embed(tokens_BxT, 0), deterministic=rngs is None, rngs=rngs)
    for block in self.blocks:
      if self.cfg.remat:
        x_BxTxD = nnx.remat(lambda b, x: b(x, rngs=rngs)[0])(block, x_BxTxD)
      else:
        x_BxTxD, _ = block(x_BxTxD, rngs=rngs)
    return self._logits(x_BxTxD)

  def init_cache(self, batch_size: int) -> list[dict[str, jax.Array]]:
    return [block.attn.init_cache(batch_size, self.cfg.block_size, self.cfg.dtype)
            for block in self.blocks]

  def decode(self, tokens_BxT, cache, pos):
    """Logits for `tokens_BxT` placed at positions pos..pos+T-1, reading and extending `cache`."""
    x_BxTxD = self._embed(tokens_BxT, pos)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_BxTxD, layer_cache = block(x_BxTxD, cache=layer_cache, pos=pos)
      new_cache.append(layer_cache)
    return self._logits(x_BxTxD), new_cache

  def flops_per_token(self, context: int | None = None, *, causal: bool = True) -> float:
    """Training FLOPs per token on windows of `context` tokens (default block_size): 6 per
    matmul parameter plus attention (`research.flops.transformer_flops_per_token`)."""
    matmul_params = flops.matmul_params(self)
    if not self.cfg.tie_embeddings:  # the input embedding is then a lookup; the head multiplies
      matmul_params -= self.embed.embedding.value.size
    return flops.transformer_flops_per_token(
        matmul_params=matmul_params, num_layers=self.cfg.num_layers,
        context=context or self.cfg.block_size, embed_dim=self.cfg.embed_dim, causal=causal)
