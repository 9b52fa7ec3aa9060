"""Grokking: a + b mod p is memorized early and generalized much later (Power et al. 2022).

Command:  make experiment NAME=grokking                   (variant `fast`, the default)
          make experiment NAME=grokking:paper             (Nanda et al. 2023's configuration)
          make experiment NAME=grokking:tiny              (seconds; for tests)
Expected: train accuracy reaches 100% within about 100 steps while val accuracy stays near
          chance (1/p) for several hundred more, then jumps to >= 99% (`fast`: around step
          900; the README's results table has the measured steps). After
          the jump the embedding is sparse in the Fourier basis of Z_p: a handful of key
          frequencies hold most of its norm (Nanda et al.: 5 key frequencies for p = 113).
          `fourier.png` shows the norm per frequency, `accuracy.png` and `loss.png` the curves
          (log step axis); `grokking.json` the steps of both transitions and the key frequencies.
Runtime:  `fast` (p = 97, 40% of the unordered pairs, lr 3e-3, 1500 steps) about 6 minutes
          on a 2-core CPU; `paper` (p = 113, 30%, lr 1e-3, 20k steps) takes hours there.
Data:     generated: every pair (a, b) as the tokens [a, b, =], its label (a + b) mod p; a seeded
          shuffle puts `train_fraction` of the pairs in train and the rest in val. Training is
          full batch: config.batch_size must cover all training pairs (padding is masked out).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from research import config as config_lib
from research.data.batching import padded_batches
from research.evaluate.writer import read_metrics
from research.interpret import fourier
from research.models.gpt import GPT, GPTConfig
from research.train.task import Task

VARIANTS = ("fast", "paper", "tiny")


def _full_batch(data, multiple: int = 8) -> int:
  """The training set size rounded up to `multiple` rows (a device count that divides it)."""
  split = modular_addition(data.p, data.train_fraction, data.seed, data.commutative_split)
  n = len(split["train"]["labels"])
  return -(-n // multiple) * multiple


def get_config(variant: str = "fast") -> ml_collections.ConfigDict:
  c = config_lib.base()
  # commutative_split: (a, b) and (b, a) fall in the same split, so val accuracy cannot come
  # from commutativity alone (with ordered pairs, it rises to about train_fraction early).
  c.data = dict(p=97, train_fraction=0.4, seed=0, commutative_split=True)
  # Nanda et al.: one layer, width 128, 4 heads, MLP 512. (Ours keeps GPT's LayerNorms and
  # tied embeddings.) GPTConfig's fields; the data set vocab_size and block_size.
  c.model = config_lib.model_config(GPTConfig, exclude=("vocab_size", "block_size"),
                                    num_layers=1, num_heads=4, embed_dim=128, mlp_ratio=4,
                                    attention="xla")
  # init_scale multiplies GPT's initial weight matrices (std 0.02): 4.4 gives Nanda et al.'s
  # std 1/sqrt(width). A larger initial norm means a longer memorizing phase (Liu et al. 2023).
  c.init_scale = 4.4
  c.fourier_top_k = 5
  # AdamW(weight decay 1.0, betas (0.9, 0.98)), 10 warmup steps, then constant; no clipping;
  # full batch. Weight decay shrinks the weights at a rate set by lr * wd, so `fast`'s lr of
  # 3e-3 groks in under a third of the steps lr 1e-3 needs (val 1.9% at step 3000 with 1e-3).
  c.update(steps=1500, learning_rate=3e-3, min_learning_rate=3e-3, warmup_steps=10,
           grad_clip=0.0, eval_every=50, log_every=10, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=1.0)
  if variant == "paper":
    c.data.update(p=113, train_fraction=0.3, commutative_split=False)
    c.update(steps=20_000, learning_rate=1e-3, min_learning_rate=1e-3, eval_every=100,
             checkpoint_every=2000)
  elif variant == "tiny":
    c.data.update(p=11, train_fraction=0.5)
    c.model.update(num_heads=2, embed_dim=16)
    c.update(steps=20, eval_every=10, log_every=5, checkpoint_every=10)
  elif variant != "fast":
    raise ValueError(f"unknown variant {variant!r}")
  c.batch_size = _full_batch(c.data)
  return c


def modular_addition(p: int, train_fraction: float, seed: int,
                     commutative_split: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """{"train": ..., "val": ...}, each {"inputs": [N, 3] tokens a, b, =; "labels": [N]}.

  A seeded shuffle puts `train_fraction` of the pairs (unordered ones if `commutative_split`)
  in train and the rest in val.
  """
  a, b = (x.ravel() for x in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
  inputs = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
  labels = ((a + b) % p).astype(np.int32)
  key = np.minimum(a, b) * p + np.maximum(a, b) if commutative_split else a * p + b
  keys = np.unique(key)
  chosen = np.random.default_rng(seed).permutation(keys)[:int(train_fraction * len(keys))]
  train = np.isin(key, chosen)
  return {split: {"inputs": inputs[rows], "labels": labels[rows]}
          for split, rows in (("train", train), ("val", ~train))}


def build(config):
  d = config.data
  if d.p < 2 or not 0 < d.train_fraction < 1:
    raise config_lib.ConfigError(f"need p >= 2 and 0 < train_fraction < 1, got p={d.p}, "
                                 f"train_fraction={d.train_fraction}")
  data = modular_addition(d.p, d.train_fraction, d.seed, d.commutative_split)
  n = len(data["train"]["labels"])
  if config.batch_size < n:
    raise config_lib.ConfigError(
        f"grokking trains full batch: config.batch_size={config.batch_size} is smaller than the "
        f"{n} training pairs; use --config.batch_size={_full_batch(d)}")
  # Pad the one batch to batch_size rows. Each row's weight makes the weighted mean over any
  # slice of rows, averaged over equal slices (the devices' pmean), the mean over real pairs.
  pad = config.batch_size - n
  batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
           for k, v in data["train"].items()}
  batch["weight"] = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32) * config.batch_size / n

  def train_data(step):
    del step
    return batch

  model = GPT(GPTConfig(**config.model, vocab_size=d.p + 1, block_size=3,
                        dtype=config.compute_dtype), rngs=nnx.Rngs(config.seed))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * config.init_scale if x.ndim >= 2 else x, params))

  def per_example(model, batch):
    # The answer is read at the "=" position, over the p residues only.
    logits_BxP = model(batch["inputs"])[:, -1, :d.p]
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxP, batch["labels"])
    return loss_B, (jnp.argmax(logits_BxP, -1) == batch["labels"]).astype(jnp.float32)

  def loss_fn(model, batch, rngs=None):
    del rngs  # no dropout
    loss_B, correct_B = per_example(model, batch)
    loss = jnp.mean(batch["weight"] * loss_B)
    return loss, {"loss": loss, "accuracy": jnp.mean(batch["weight"] * correct_B)}

  def eval_fn(model, batch):
    loss_B, correct_B = per_example(model, batch)
    return {"loss": loss_B, "accuracy": correct_B, "mask": batch["mask"]}

  def summarize(split, outputs):
    mask = outputs["mask"]
    return {k: float(np.sum(v * mask) / np.sum(mask)) for k, v in outputs.items() if k != "mask"}

  def fourier_norms(model):
    return fourier.frequency_norms(model.embed.embedding[...][:d.p])

  def evaluate(model):
    fraction = fourier.top_k_fraction(fourier_norms(model), config.fourier_top_k)
    return {"val": {f"fourier_top{config.fourier_top_k}_fraction": float(fraction)}}

  def finish(model, workdir):
    import json
    k = config.fourier_top_k
    norms = np.asarray(fourier_norms(model))
    keys = fourier.key_frequencies(norms, k)
    fourier.plot_frequency_norms(norms, workdir / "fourier.png", highlight=keys,
                                 title=f"embedding of Z_{d.p} in the Fourier basis "
                                       f"(top {k}: {float(fourier.top_k_fraction(norms, k)):.0%})")
    rows = read_metrics(workdir / "metrics.jsonl")
    first = lambda split, ok: next((r["step"] for r in rows if r["split"] == split and ok(r)), None)
    summary = {
        # A float32 mean of thousands of ones lands a few ulps under 1.
        "train_accuracy_100_step": first("train", lambda r: r.get("accuracy", 0) > 1 - 1e-5),
        "val_accuracy_99_step": first("val", lambda r: r.get("accuracy", 0) >= 0.99),
        "final_val_accuracy": next(r["accuracy"] for r in reversed(rows) if r["split"] == "val"),
        "key_frequencies": keys,
        f"top{k}_fraction": float(fourier.top_k_fraction(norms, k)),
        "frequency_norms": [round(float(x), 5) for x in norms],
    }
    (workdir / "grokking.json").write_text(json.dumps(summary, indent=2) + "\n")

  val = data["val"]
  return Task(model=model, loss_fn=loss_fn, train_data=train_data,
              eval_data={"val": lambda: padded_batches(val, config.batch_size)},
              eval_fn=eval_fn, summarize=summarize, evaluate=evaluate, finish=finish, log_x=True)
