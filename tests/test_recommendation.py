"""SASRec and GRU4Rec see no future and ignore padding; every tiny variant trains end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from research import config as config_lib
from research.models.gru4rec import GRU4Rec, GRU4RecConfig
from research.models.sasrec import SASRec, SASRecConfig
from research.tasks.recommendation import next_item_loss
from research.train import loop

T = 8


def sasrec():
  return SASRec(SASRecConfig(num_items=30, max_len=T, embed_dim=16, num_layers=2, num_heads=2,
                             dropout=0.0), rngs=nnx.Rngs(0))


def gru4rec():
  return GRU4Rec(GRU4RecConfig(num_items=30, max_len=T, embed_dim=16, num_layers=2,
                               dropout=0.0), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make", [sasrec, gru4rec])
def test_position_t_sees_no_later_position(make):
  model = make()
  x_TxD = jax.random.normal(jax.random.key(1), (T, 16))
  valid = jnp.ones((1, T), bool)
  # d(state at t) / d(input at s) for every t, s: [T, D, T, D] -> [T, T] norms.
  jac = nnx.jit(lambda model, x: jax.jacrev(lambda x: model.encode(x[None], valid)[0])(x))(
      model, x_TxD)
  influence_TxT = np.asarray(jnp.abs(jac).sum(axis=(1, 3)))
  assert (influence_TxT[np.triu_indices(T, k=1)] == 0).all()
  assert (influence_TxT[np.tril_indices(T)] > 0).all()


@pytest.mark.parametrize("make", [sasrec, gru4rec])
def test_padding_changes_nothing(make):
  score = nnx.jit(lambda model, history: model.score_items(history, None))
  model = make()
  short = jnp.array([[0, 0, 0, 0, 0, 3, 7, 2]])
  full_padding = score(model, short)
  # Shorter inputs align the last item with the last position, as left padding does.
  np.testing.assert_allclose(score(model, short[:, -4:]), full_padding, atol=1e-5)
  other = score(model, jnp.array([[0, 0, 0, 0, 9, 3, 7, 2]]))
  assert not np.allclose(other, full_padding, atol=1e-3)


def test_next_item_loss_ignores_padded_positions():
  model = sasrec()
  batch = {"inputs": jnp.array([[0, 0, 4, 5, 6, 7, 8, 9]]),
           "targets": jnp.array([[0, 0, 5, 6, 7, 8, 9, 10]]),
           "negatives": jnp.array([[0, 0, 11, 12, 13, 14, 15, 16]])}
  loss_of = nnx.jit(lambda model, batch: next_item_loss(model, batch)[0])
  loss = float(loss_of(model, batch))
  changed = {**batch, "negatives": batch["negatives"].at[0, 1].set(20)}
  assert float(loss_of(model, changed)) == pytest.approx(loss)
  assert float(loss_of(model, {**batch, "negatives": batch["negatives"].at[0, 2].set(20)})) != loss
  assert np.isfinite(loss)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """Runs `tiny` once per model kind; returns {kind: (workdir, final metrics, task)}."""
  runs = {}
  for kind in ("sasrec", "gru4rec", "bpr", "popular"):
    workdir = tmp_path_factory.mktemp(kind)
    overrides = [f"--config.workdir={workdir}", "--config.progress_bar=false",
                 f"--config.model.kind={kind}"]
    config = config_lib.apply_overrides(experiments.get_config("movielens_sasrec:tiny"), overrides)
    task = experiments.load("movielens_sasrec").build(config)
    runs[kind] = workdir, loop.train(task, config, experiment="movielens_sasrec:tiny"), task
  return runs


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec", "bpr", "popular"])
def test_tiny_variant_trains_and_reports_both_protocols(tiny_runs, kind):
  _, results, _ = tiny_runs[kind]
  for split in ("val", "test"):
    metrics = results[split]
    for key in ("hr_at_10", "ndcg_at_10", "hr_at_10_full", "ndcg_at_10_full"):
      assert 0 <= metrics[key] <= 1, (split, key)
    # Ranking among 100 items is easier than among all 1,682.
    assert metrics["hr_at_10"] >= metrics["hr_at_10_full"]


def test_popular_metrics_equal_a_hand_count(tiny_runs):
  """The most-popular scorer's logged metrics, recounted in numpy from its scores and the
  evaluation rows: sampled rank = negatives scoring at least the true item; full rank = all
  items but padding, the true one and the history."""
  _, results, task = tiny_runs["popular"]
  scores_V = np.asarray(task.model.counts[...], np.float64)
  for split in ("val", "test"):
    rows = list(task.eval_data[split]())
    rows = {k: np.concatenate([r[k] for r in rows]) for k in ("target", "negatives", "exclude",
                                                                "mask")}
    real = rows["mask"] > 0
    target_N = scores_V[rows["target"][real]]
    sampled_N = (scores_V[rows["negatives"][real]] >= target_N[:, None]).sum(1)
    competes_NxV = ~rows["exclude"][real]
    competes_NxV[:, 0] = False
    competes_NxV[np.arange(real.sum()), rows["target"][real]] = False
    full_N = ((scores_V[None] >= target_N[:, None]) & competes_NxV).sum(1)
    for rank_N, suffix in ((sampled_N, ""), (full_N, "_full")):
      assert results[split][f"hr_at_10{suffix}"] == pytest.approx(np.mean(rank_N < 10), abs=1e-9)
      ndcg = np.mean(np.where(rank_N < 10, 1 / np.log2(rank_N + 2), 0))
      assert results[split][f"ndcg_at_10{suffix}"] == pytest.approx(ndcg, abs=1e-6)
    assert results[split]["hr_at_10"] > 10 / 101  # better than chance without any training


def test_recommend_prints_ten_unseen_titles(tiny_runs, capsys):
  from research.data import movielens
  workdir, _, _ = tiny_runs["sasrec"]
  module = experiments.load("movielens_sasrec")
  assert module.COMMANDS["recommend"](["--workdir", str(workdir), "--user", "42"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  data = movielens.load()
  seen = {data.titles[i] for i in data.sequences[data.user_index(42)]}
  titles = [line.split(". ", 1)[1] for line in lines[1:]]
  assert len(titles) == 10 and not seen & set(titles)
  with pytest.raises(config_lib.ConfigError, match="no user with MovieLens id 5000"):
    module.COMMANDS["recommend"](["--workdir", str(workdir), "--user", "5000"])
