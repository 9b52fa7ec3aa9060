"""Sequential recommendation on MovieLens 100K: SASRec vs GRU4Rec, BPR-MF and most-popular.

Command:  make experiment NAME=movielens_sasrec             (variant `sasrec`, the default)
          make experiment NAME=movielens_sasrec:gru4rec     (also :bpr, :popular)
          make experiment NAME=movielens_sasrec:tiny        (seconds; for tests)
          python -m experiments movielens_sasrec recommend --workdir RUN --user 42
Expected: HR@10 / NDCG@10 on the test split, leave-one-out, sampled (100 negatives) and full
          ranking (all items but those the user rated in the history read): see the README's
          results table. Reference (a different, larger dataset): SASRec reports HR@10 0.8245,
          NDCG@10 0.5905 on MovieLens-1M with the sampled protocol (Kang & McAuley 2018, Table 3).
Runtime:  on a 2-core CPU, `sasrec` about 6 minutes, `gru4rec` about 6, `bpr` about 2,
          `popular` seconds.
Data:     MovieLens 100K (`u.data`, `u.item`) from ../shared/data/movielens_100k or
          --config.data.manual_dir; online, GroupLens' ml-100k.zip.
"""

import argparse

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from research import config as config_lib
from research.data import movielens
from research.load import load_model
from research.models.bpr import BPRConfig, BPRMF
from research.models.gru4rec import GRU4Rec, GRU4RecConfig
from research.models.popular import MostPopular, PopularConfig
from research.models.sasrec import SASRec, SASRecConfig
from research.tasks.recommendation import recommendation_task

VARIANTS = ("sasrec", "gru4rec", "bpr", "popular", "tiny")
# model.kind -> training objective (see research.tasks.recommendation)
OBJECTIVES = {"sasrec": "next_item", "gru4rec": "next_item", "bpr": "bpr", "popular": "none"}


def get_config(variant: str = "sasrec") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(manual_dir="")
  # `kind` picks the model; config.model.<kind> holds its config's fields (the numbers of
  # items and users come from the data). max_len, the longest history read, is every model's:
  # it sets the sequence models' max_len and the histories of training and evaluation.
  no_data = ("num_items", "max_len")
  c.model = dict(
      kind="sasrec", max_len=50,
      sasrec=config_lib.model_config(SASRecConfig, exclude=no_data, embed_dim=64, num_layers=2,
                                     num_heads=1, mlp_ratio=1, dropout=0.2, attention="xla"),
      gru4rec=config_lib.model_config(GRU4RecConfig, exclude=no_data, embed_dim=64,
                                      num_layers=1, dropout=0.2),
      bpr=config_lib.model_config(BPRConfig, exclude=("num_users", "num_items"), embed_dim=64),
      popular=config_lib.model_config(PopularConfig, exclude=("num_items",)))
  c.eval_batch_size = 128
  # The paper's Adam (lr 1e-3, b2 0.98) and batch 128, with warmup and cosine decay.
  c.update(steps=3000, batch_size=128, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, eval_every=250, log_every=25, checkpoint_every=1000)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=0.0)
  if variant == "gru4rec":
    c.model.kind = "gru4rec"
  elif variant == "bpr":
    c.model.kind = "bpr"
    c.update(batch_size=1024, learning_rate=5e-3, min_learning_rate=5e-4)
  elif variant == "popular":
    c.model.kind = "popular"
    c.update(steps=1, warmup_steps=0, eval_every=1, checkpoint_every=1)
  elif variant == "tiny":
    c.model.max_len = 16
    c.model.sasrec.update(embed_dim=16, num_layers=1, num_heads=2)
    c.model.gru4rec.update(embed_dim=16, num_layers=1)
    c.model.bpr.update(embed_dim=16)
    c.update(steps=10, batch_size=16, warmup_steps=2, eval_every=10, log_every=5,
             checkpoint_every=10)
    c.eval_batch_size = 512
  elif variant != "sasrec":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def _model(config, data: movielens.MovieLens, split: movielens.LeaveOneOut):
  m = config.model
  rngs = nnx.Rngs(config.seed)
  sequence = dict(num_items=data.num_items, max_len=m.max_len, dtype=config.compute_dtype)
  if m.kind == "sasrec":
    return SASRec(SASRecConfig(**m.sasrec, **sequence), rngs=rngs)
  if m.kind == "gru4rec":
    return GRU4Rec(GRU4RecConfig(**m.gru4rec, **sequence), rngs=rngs)
  if m.kind == "bpr":
    return BPRMF(BPRConfig(**m.bpr, num_users=data.num_users, num_items=data.num_items),
                 rngs=rngs)
  model = MostPopular(PopularConfig(**m.popular, num_items=data.num_items), rngs=rngs)
  model.set_counts(np.bincount(np.concatenate(split.train), minlength=data.num_items + 1))
  return model


def build(config):
  m = config.model
  if m.kind not in OBJECTIVES:
    raise config_lib.ConfigError(f"unknown config.model.kind {m.kind!r}; choose one of "
                                 f"{', '.join(OBJECTIVES)}")
  if m.max_len < 1:
    raise config_lib.ConfigError(f"config.model.max_len must be >= 1, got {m.max_len}")
  fields = m[m.kind]
  for key in ("embed_dim", "num_layers", "num_heads"):
    if key in fields and fields[key] < 1:
      raise config_lib.ConfigError(f"config.model.{m.kind}.{key} must be >= 1, got {fields[key]}")
  if "num_heads" in fields and fields.embed_dim % fields.num_heads:
    raise config_lib.ConfigError(
        f"config.model.{m.kind}.embed_dim={fields.embed_dim} is not divisible by "
        f"config.model.{m.kind}.num_heads={fields.num_heads}")
  data = movielens.load(config.data.manual_dir)
  split = movielens.leave_one_out(data.sequences)
  return recommendation_task(config, _model(config, data, split), split, data.num_items,
                             OBJECTIVES[m.kind], max_len=m.max_len,
                             eval_batch_size=config.eval_batch_size)


def recommend(argv: list[str]) -> int:
  """Prints a user's top items from a trained run, leaving out everything the user rated."""
  parser = argparse.ArgumentParser(prog="python -m experiments movielens_sasrec recommend",
                                   description=recommend.__doc__)
  parser.add_argument("--workdir", required=True, help="a run folder of this experiment")
  parser.add_argument("--user", type=int, required=True, help="MovieLens user id (1..943)")
  parser.add_argument("--top", type=int, default=10)
  args = parser.parse_args(argv)
  model, _, config = load_model(args.workdir)
  data = movielens.load(config.data.manual_dir)  # the user's history and the titles
  user = data.user_index(args.user)
  history = data.sequences[user]  # all of it: train, validation and test items
  scores_V = np.array(model.score_items(
      jnp.asarray(movielens.left_pad([history], config.model.max_len)), jnp.asarray([user]))[0])
  scores_V[0] = scores_V[history] = -np.inf
  top = np.argsort(-scores_V, kind="stable")[:args.top]
  print(f"user {args.user} ({config.model.kind}), {len(history)} ratings; most recent: "
        + "; ".join(data.titles[i] for i in history[-3:][::-1]))
  for rank, item in enumerate(top, 1):
    print(f"{rank:3d}. {data.titles[item]}")
  return 0


COMMANDS = {"recommend": recommend}
