"""Induction heads: a 2-layer attention-only Transformer learns to copy in context, suddenly.

Olsson et al. 2022, "In-context learning and induction heads", on synthetic sequences.

Command:  make experiment NAME=induction_heads            (variant `default`)
          make experiment NAME=induction_heads:tiny       (seconds; for tests)
Expected: sequences hold a random segment and its repeat. For a while the model only learns
          token frequencies: the loss on the repeat stays at the first occurrence's ln(vocab).
          Then, within a few hundred steps, the loss on the repeat drops to near 0 while the
          loss on the first occurrence does not move, and at the same step a layer-1 head's
          induction and prefix-matching scores jump from chance to near 1 (with a layer-0
          previous-token head). `phase_change.png` shows both curves, `attention_layer*.png`
          the heads' patterns on a repeated sequence, `heads.png` every head's final scores,
          `phase_change.json` the step at which each curve crosses halfway.
Runtime:  `default` about 2 minutes on a 2-core CPU.
Data:     generated. Training sequences: n uniform random tokens (n drawn per sequence from
          [min_segment, context/2], so no fixed offset solves the task), the same n again, then
          random tokens. Validation: n = context/2 ("first half" and "repeated half").
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.interpret import scores
from research.interpret.attention import attention_maps, plot_attention
from research.models.gpt import GPT, GPTConfig
from research.train.task import Task

VARIANTS = ("default", "tiny")
SCORES = ("induction", "prefix_matching", "previous_token")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(vocab_size=64, context=64, min_segment=8)
  # GPTConfig's fields; the data set vocab_size and block_size (= data.context).
  c.model = config_lib.model_config(GPTConfig, exclude=("vocab_size", "block_size"),
                                    num_layers=2, num_heads=4, embed_dim=64, mlp_ratio=0,
                                    position="rope", attention="xla")
  c.eval_batches = 4
  c.update(steps=2000, batch_size=32, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, eval_every=25, log_every=10, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.99, weight_decay=0.1)
  if variant == "tiny":
    c.data.update(vocab_size=16, context=16, min_segment=4)
    c.model.update(num_heads=2, embed_dim=16)
    c.eval_batches = 1
    c.update(steps=20, batch_size=8, warmup_steps=2, eval_every=10, log_every=5,
             checkpoint_every=10)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def repeated_segments(rng: np.random.Generator, batch: int, context: int, vocab: int,
                      n_B: np.ndarray) -> np.ndarray:
  """[batch, context + 1] random tokens whose positions n..2n-1 repeat 0..n-1 (n per row)."""
  tokens_BxT1 = rng.integers(0, vocab, size=(batch, context + 1))
  t_BxT1 = np.broadcast_to(np.arange(context + 1), tokens_BxT1.shape)
  n_Bx1 = n_B[:, None]
  repeat_BxT1 = (t_BxT1 >= n_Bx1) & (t_BxT1 < 2 * n_Bx1)
  source_BxT1 = np.where(repeat_BxT1, t_BxT1 - n_Bx1, t_BxT1)
  return np.take_along_axis(tokens_BxT1, source_BxT1, axis=1).astype(np.int32)


def _with_probes(tokens_BxT1: np.ndarray, n_B: np.ndarray) -> dict[str, np.ndarray]:
  """Inputs, targets, the loss regions and each score's target keys."""
  inputs_BxT = tokens_BxT1[:, :-1]
  t_BxT, n_Bx1 = np.arange(inputs_BxT.shape[1])[None], n_B[:, None]
  batch = {"inputs": inputs_BxT, "targets": tokens_BxT1[:, 1:],
           # Targets inside the first occurrence (unpredictable) / inside the repeat.
           "first": (t_BxT < n_Bx1 - 1).astype(np.float32),
           "repeat": ((t_BxT >= n_Bx1) & (t_BxT < 2 * n_Bx1 - 1)).astype(np.float32)}
  for name, keys in scores.probe_keys(inputs_BxT, n_Bx1).items():
    batch[f"{name}_keys"] = np.ascontiguousarray(keys)
  return batch


def build(config):
  d = config.data
  if not 2 <= d.min_segment <= d.context // 2:
    raise config_lib.ConfigError(f"need 2 <= data.min_segment <= data.context / 2, got "
                                 f"{d.min_segment} and {d.context}")
  model = GPT(GPTConfig(**config.model, vocab_size=d.vocab_size, block_size=d.context,
                        dtype=config.compute_dtype), rngs=nnx.Rngs(config.seed))

  def train_data(step):
    rng = np.random.default_rng([config.seed, step])
    n_B = rng.integers(d.min_segment, d.context // 2 + 1, size=config.batch_size)
    tokens_BxT1 = repeated_segments(rng, config.batch_size, d.context, d.vocab_size, n_B)
    return {"inputs": tokens_BxT1[:, :-1], "targets": tokens_BxT1[:, 1:]}

  val_n = d.context // 2
  val_batches = []
  for i in range(config.eval_batches):
    rng = np.random.default_rng([10_000 + config.seed, i])
    n_B = np.full(config.batch_size, val_n)
    val_batches.append(_with_probes(
        repeated_segments(rng, config.batch_size, d.context, d.vocab_size, n_B), n_B))

  def loss_fn(model, batch, rngs=None):
    logits_BxTxV = model(batch["inputs"], rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"]).mean()
    return loss, {"loss": loss}

  def eval_fn(model, batch):
    loss_BxT = optax.softmax_cross_entropy_with_integer_labels(model(batch["inputs"]),
                                                               batch["targets"])
    out = {"loss": loss_BxT.mean(axis=1)}
    for region in ("first", "repeat"):
      out[f"{region}_sum"] = jnp.sum(loss_BxT * batch[region], axis=1)
      out[f"{region}_count"] = jnp.sum(batch[region], axis=1)
    maps_LxBxHxTxT = attention_maps(model, batch["inputs"])
    for name in SCORES:
      out[f"{name}_sum"], out[f"{name}_count"] = scores.attention_to(maps_LxBxHxTxT,
                                                                     batch[f"{name}_keys"])
    return out

  def head_scores(outputs) -> dict[str, np.ndarray]:
    """Each score per head, [L, H], from the per-example sums of all batches."""
    return {name: outputs[f"{name}_sum"].sum(0) / max(outputs[f"{name}_count"].sum(), 1)
            for name in SCORES}

  def summarize(split, outputs):
    mean = lambda region: float(outputs[f"{region}_sum"].sum() / outputs[f"{region}_count"].sum())
    metrics = {"loss": float(outputs["loss"].mean()), "loss_first_half": mean("first"),
               "loss_repeated_half": mean("repeat")}
    # The best head's score: which head becomes the induction head is up to the seed.
    metrics.update({f"{name}_score": float(s.max()) for name, s in head_scores(outputs).items()})
    return metrics

  def finish(model, workdir):
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "val"]
    steps = np.array([r["step"] for r in rows])
    crossing = {}
    for key in ("loss_repeated_half", "induction_score", "prefix_matching_score"):
      v = np.array([r[key] for r in rows])
      half = (v[0] + v[-1]) / 2
      passed = (v <= half) if v[-1] < v[0] else (v >= half)
      crossing[key] = int(steps[np.argmax(passed)]) if passed.any() else None
    _plot_phase_change(rows, crossing, workdir / "phase_change.png")

    batch = val_batches[0]
    outputs = jax.device_get(eval_fn(model, batch))
    per_head = head_scores(outputs)
    scores.plot_head_scores(per_head, workdir / "heads.png", title="head scores, end of training")
    maps_LxBxHxTxT = np.asarray(attention_maps(model, batch["inputs"][:1]))
    labels = [str(t) for t in batch["inputs"][0]]
    for l in range(len(maps_LxBxHxTxT)):
      plot_attention(maps_LxBxHxTxT[l, 0], labels, workdir / f"attention_layer{l}.png",
                     title=f"layer {l}: a random segment of {val_n} tokens, then its repeat")
    summary = {"halfway_step": crossing, "final": {k: rows[-1][k] for k in rows[-1]
                                                   if k not in ("step", "split")},
               "per_head": {k: np.round(v, 4).tolist() for k, v in per_head.items()}}
    (workdir / "phase_change.json").write_text(json.dumps(summary, indent=2) + "\n")

  return Task(model=model, loss_fn=loss_fn, train_data=train_data,
              eval_data={"val": lambda: iter(val_batches)},
              eval_fn=eval_fn, summarize=summarize, finish=finish,
              tokens_per_batch=config.batch_size * d.context)


def _plot_phase_change(rows, crossing, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in rows]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for key, label in (("loss_first_half", "first occurrence"),
                     ("loss_repeated_half", "repeat")):
    top.plot(steps, [r[key] for r in rows], label=f"loss on the {label}")
  top.set_ylabel("val loss (nats)")
  for key in ("induction_score", "prefix_matching_score", "previous_token_score"):
    bottom.plot(steps, [r[key] for r in rows], label=key.replace("_", " ") + " (best head)")
  bottom.set_ylabel("attention score")
  bottom.set_xlabel("step")
  bottom.set_ylim(0, 1.02)
  if crossing.get("loss_repeated_half") is not None:
    for ax in (top, bottom):
      ax.axvline(crossing["loss_repeated_half"], color="gray", ls="--", lw=1)
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  top.set_title("induction heads: the phase change")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
