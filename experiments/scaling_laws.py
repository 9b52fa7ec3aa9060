"""Scaling laws: GPT val loss vs size fits L(N) = L_inf + (N_c/N)^alpha (Kaplan et al. 2020).

Six character-level GPTs on Tiny Shakespeare, from 12k to 1.8M non-embedding parameters.

Command:  make experiment NAME=scaling_laws ARGS=--config.workdir=runs/scaling_laws
          (rerun the same command to resume: finished sizes are skipped)
          make experiment NAME=scaling_laws:tiny          (seconds; for tests)
Expected: six GPTs from 12k to 1.8M non-embedding parameters (144x), each trained on the same
          8.2M tokens (2000 steps of 32 x 128) with Kaplan et al.'s learning rate for its size,
          give a smooth curve; `fit.json` holds alpha with its standard error, L_inf and the
          points, `scaling_law.png` the log-log plot with the fit and every size's learning
          curve. Kaplan et al. fit alpha_N = 0.076 on WebText2 BPE tokens with models trained to
          convergence; here (characters, a fixed small budget) their form L = (N_c/N)^alpha gave
          alpha = 0.075 +- 0.007, val loss 2.16 (12k) to 1.54 (1.8M); the fit with L_inf is not
          determined by six points (README's results table).
Runtime:  the five smaller sizes took 55 minutes beside other runs, the largest 23 alone
          (2-core CPU).
Data:     tfds `tiny_shakespeare` (or --config.data.text_file=PATH), as gpt_shakespeare.
Design:   each size is a gpt_shakespeare run in `<workdir>/L<layers>_D<width>/` (load it with
          research.load.load_model, inspect it with research.interpret).
"""

import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import _multirun
from research import config as config_lib
from research.models.gpt import GPT, GPTConfig

VARIANTS = ("default", "tiny")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(dataset="tiny_shakespeare", manual_dir="", text_file="")
  # The GPTConfig fields every size shares: gpt_shakespeare's config.model, less what
  # `sizes` sets per size (num_layers, embed_dim, num_heads) and vocab_size (from the data).
  c.model = config_lib.model_config(
      GPTConfig, exclude=("vocab_size", "num_layers", "num_heads", "embed_dim"), block_size=128,
      dropout=0.0, position="learned", attention="xla")
  # (layers, width) per size; heads = width / head_dim.
  c.sizes = ((1, 32), (3, 32), (2, 64), (3, 80), (4, 112), (4, 192))
  c.head_dim = 16
  # Kaplan et al.'s fit of the best learning rate per size (their eq. D.1):
  # 0.003239 - 0.0001395 ln(N). False: config.learning_rate for every size.
  c.kaplan_learning_rate = True
  c.eval_batches = 20
  c.update(steps=2000, batch_size=32, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, eval_every=250, log_every=50, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.99, weight_decay=0.1)
  if variant == "tiny":
    c.model.block_size = 16
    c.sizes = ((1, 16), (1, 32), (2, 32))
    c.eval_batches = 2
    c.update(steps=10, batch_size=8, warmup_steps=2, eval_every=5, log_every=5,
             checkpoint_every=10)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def non_embedding_params(layers: int, width: int, head_dim: int, block_size: int) -> int:
  """Kaplan et al.'s N: every parameter but the token and position embeddings."""
  cfg = GPTConfig(vocab_size=1, block_size=block_size, num_layers=layers,
                  num_heads=width // head_dim, embed_dim=width)
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return total - (cfg.vocab_size + block_size) * width  # the token and position tables


def kaplan_learning_rate(n: int) -> float:
  return 0.003239 - 0.0001395 * math.log(n)


def fit_power_law(n, loss) -> dict:
  """Least-squares fit of L(N) = L_inf + (N_c / N)^alpha; standard errors from the covariance."""
  from scipy.optimize import curve_fit

  log_n, loss = np.log(np.asarray(n, float)), np.asarray(loss, float)

  def model(log_n, l_inf, alpha, log_nc):
    return l_inf + np.exp(alpha * (log_nc - log_n))

  # Start from a straight line through log(L - L_inf) with L_inf just below the best loss.
  l0 = 0.9 * loss.min()
  slope, intercept = np.polyfit(log_n, np.log(loss - l0), 1)
  alpha0 = max(-slope, 1e-3)
  try:
    (l_inf, alpha, log_nc), cov = curve_fit(
        model, log_n, loss, p0=(l0, alpha0, intercept / alpha0), maxfev=20_000,
        bounds=([0.0, 0.0, -100.0], [loss.min(), 10.0, 100.0]))
  except (RuntimeError, ValueError) as e:  # too few or too noisy points (e.g. the tiny variant)
    return {"alpha": None, "alpha_stderr": None, "l_inf": None, "error": str(e),
            **fit_kaplan_form(n, loss)}
  # No error estimate without more points than parameters.
  err = [float(e) if np.isfinite(e) else None for e in np.sqrt(np.diag(cov))]
  return {"alpha": float(alpha), "alpha_stderr": err[1], "l_inf": float(l_inf),
          "l_inf_stderr": err[0], "n_c": float(np.exp(log_nc)), **fit_kaplan_form(n, loss)}


def fit_kaplan_form(n, loss) -> dict:
  """Kaplan et al.'s own form L(N) = (N_c / N)^alpha, no irreducible term: a straight line in
  log-log. Few points cannot separate L_inf from alpha; this slope needs no L_inf."""
  log_n, log_loss = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
  if len(log_n) > 3:  # np.polyfit's covariance needs more points than parameters + 1
    (slope, intercept), cov = np.polyfit(log_n, log_loss, 1, cov=True)
    stderr = float(np.sqrt(cov[0, 0]))
  else:
    slope, intercept = np.polyfit(log_n, log_loss, 1)
    stderr = None
  alpha = -float(slope)
  return {"kaplan_alpha": alpha, "kaplan_alpha_stderr": stderr,
          "kaplan_n_c": float(np.exp(intercept / alpha)) if alpha > 0 else None}


def run(config, *, experiment: str) -> dict[str, dict]:
  """Trains every size in turn (skipping finished ones), then fits and plots L(N)."""
  workdir = Path(config.workdir)
  _multirun.write_config(config, experiment)
  if any(w % config.head_dim for _, w in config.sizes):
    raise config_lib.ConfigError(f"every width in config.sizes must be a multiple of "
                                 f"config.head_dim={config.head_dim}")
  points, curves = [], {}
  for layers, width in config.sizes:
    n = non_embedding_params(layers, width, config.head_dim, config.model.block_size)
    name = f"L{layers}_D{width}"
    lr = kaplan_learning_rate(n) if config.kaplan_learning_rate else config.learning_rate
    sub = _multirun.derive(
        config, "gpt_shakespeare:baby", workdir=str(workdir / name), learning_rate=lr,
        model=dict(num_layers=layers, embed_dim=width, num_heads=width // config.head_dim))
    sub.min_learning_rate = min(sub.min_learning_rate, sub.learning_rate)
    print(f"scaling_laws: {name} ({n:,} non-embedding parameters, lr {sub.learning_rate:.2e})")
    rows = _multirun.train_or_read("gpt_shakespeare:baby", sub, finish=False)
    val = [r for r in rows if r["split"] == "val"]
    curves[name] = (n, [(r["step"], r["loss"]) for r in val])
    points.append({"run": name, "layers": layers, "width": width, "non_embedding_params": n,
                   "learning_rate": sub.learning_rate, "val_loss": val[-1]["loss"]})
  fit = fit_power_law([p["non_embedding_params"] for p in points],
                      [p["val_loss"] for p in points])
  tokens = config.steps * config.batch_size * config.model.block_size
  (workdir / "fit.json").write_text(json.dumps({**fit, "tokens_per_size": tokens,
                                                "points": points}, indent=2) + "\n")
  _plot(points, fit, curves, config.batch_size * config.model.block_size,
        workdir / "scaling_law.png")
  print(f"fit.json and scaling_law.png in {workdir}")
  return {"fit": {k: v for k, v in fit.items() if isinstance(v, float)}}


def _plot(points, fit, curves, tokens_per_step, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  n = np.array([p["non_embedding_params"] for p in points])
  loss = np.array([p["val_loss"] for p in points])
  left.plot(n, loss, "o", color="tab:blue", label="final val loss")
  grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
  if fit["alpha"] is not None:
    stderr = fit["alpha_stderr"] or float("nan")
    left.plot(grid, fit["l_inf"] + (fit["n_c"] / grid) ** fit["alpha"], color="tab:red",
              label=f"$L_\\infty + (N_c/N)^{{\\alpha}}$, $\\alpha$ = {fit['alpha']:.3f} "
                    f"± {stderr:.3f}, $L_\\infty$ = {fit['l_inf']:.2f}")
  if fit["kaplan_n_c"] is not None:
    stderr = fit["kaplan_alpha_stderr"] or float("nan")
    left.plot(grid, (fit["kaplan_n_c"] / grid) ** fit["kaplan_alpha"], color="tab:gray",
              linestyle="--", label=f"$(N_c/N)^{{\\alpha}}$ (Kaplan's form), "
                                    f"$\\alpha$ = {fit['kaplan_alpha']:.3f} ± {stderr:.3f}")
  left.set_xscale("log")
  left.set_yscale("log")
  left.set_xlabel("non-embedding parameters N")
  left.set_ylabel("val loss (nats / char)")
  left.legend(fontsize=8)
  left.grid(alpha=0.3, which="both")
  cmap = plt.get_cmap("viridis")
  for i, (name, (count, curve)) in enumerate(curves.items()):
    steps, values = zip(*curve)
    right.plot(np.array(steps) * tokens_per_step, values, color=cmap(i / max(len(curves) - 1, 1)),
               label=f"{name} ({count / 1e3:,.0f}k)")
  right.set_xscale("log")
  right.set_yscale("log")
  right.set_xlabel("tokens")
  right.set_ylabel("val loss")
  right.legend(fontsize=7)
  right.grid(alpha=0.3, which="both")
  fig.suptitle("Tiny Shakespeare, char-level GPT: loss vs size")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
