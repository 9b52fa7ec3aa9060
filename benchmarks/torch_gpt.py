"""The PyTorch peer of `make bench`: the GPT a user would otherwise take, as nanoGPT writes it.

Pre-LayerNorm blocks without biases (LayerNorm eps 1e-5), `F.scaled_dot_product_attention
(is_causal=True)`, exact (erf) GELU, tied input/output embeddings, GPT-2 initialization (0.02,
residual projections scaled by 1/sqrt(2·layers)), AdamW with weight decay on matrices only,
global-norm clipping, and nanoGPT's `get_lr`: warmup lr·(i+1)/(warmup+1), then cosine.
This project's JAX model differs only in tanh GELU, LayerNorm eps 1e-6 and a warmup from 0
(optax's), chosen for speed or by the library; `python -m benchmarks.val_loss_noise` shows
that the two train to the same loss. For benchmarking only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):

  def __init__(self, dim: int, heads: int, layers: int):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(dim, bias=False)
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.out = nn.Linear(dim, dim, bias=False)
    self.norm2 = nn.LayerNorm(dim, bias=False)
    self.up = nn.Linear(dim, 4 * dim, bias=False)
    self.down = nn.Linear(4 * dim, dim, bias=False)
    for proj in (self.out, self.down):
      proj.residual_scale = 1 / math.sqrt(2 * layers)

  def forward(self, x):
    B, T, D = x.shape
    q, k, v = self.qkv(self.norm1(x)).split(D, dim=2)
    q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
    return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):

  def __init__(self, vocab_size: int, block_size: int, layers: int, heads: int, dim: int):
    super().__init__()
    self.embed = nn.Embedding(vocab_size, dim)
    self.pos_embed = nn.Embedding(block_size, dim)
    self.blocks = nn.ModuleList(Block(dim, heads, layers) for _ in range(layers))
    self.norm = nn.LayerNorm(dim, bias=False)
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02 * getattr(module, "residual_scale", 1.0))

  def forward(self, idx):
    x = self.embed(idx) + self.pos_embed(torch.arange(idx.shape[1], device=idx.device))
    for block in self.blocks:
      x = block(x)
    return self.norm(x) @ self.embed.weight.T  # tied output layer


def make_optimizer(model: nn.Module, config) -> tuple[torch.optim.Optimizer, callable]:
  """AdamW (decay on matrices only) and the learning rate of step i, as nanoGPT's get_lr."""
  params = [p for p in model.parameters() if p.requires_grad]
  opt = config.optimizer
  if opt.name != "adamw":
    raise ValueError(f"the PyTorch peer trains with AdamW only, not {opt.name}")
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(opt.b1, opt.b2))
  decay = config.decay_steps or config.steps

  def lr_at(step: int) -> float:
    if step < config.warmup_steps:
      return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    progress = min(1.0, (step - config.warmup_steps) / max(1, decay - config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine

  return optimizer, lr_at


def train_step(model, optimizer, lr: float, inputs, targets, clip: float) -> float:
  for group in optimizer.param_groups:
    group["lr"] = lr
  logits = model(inputs)
  loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
  optimizer.step()
  return loss.item()


@torch.no_grad()
def eval_loss(model, batches) -> float:
  model.eval()
  losses = [F.cross_entropy(model(torch.from_numpy(b["inputs"]).long()).flatten(0, 1),
                            torch.from_numpy(b["targets"]).long().flatten()).item() for b in batches]
  model.train()
  return sum(losses) / len(losses)
