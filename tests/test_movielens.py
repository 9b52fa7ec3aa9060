"""MovieLens 100K: the local files, time order, the leave-one-out split and its batches."""

import io
import urllib.request
import zipfile

import numpy as np
import pytest

from research.data import movielens, sources
from research.tasks.recommendation import eval_arrays, train_batches, windows

FOLDER = sources.REPO_ROOT.parent / "shared" / "data" / "movielens_100k"


@pytest.fixture(scope="module")
def data():
  return movielens.load()


@pytest.fixture(scope="module")
def split(data):
  return movielens.leave_one_out(data.sequences)


def test_local_files_hold_the_whole_dataset(data):
  assert data.num_ratings == 100_000 and data.num_users == 943 and data.num_items == 1682
  assert sum(len(s) for s in data.sequences) == 100_000
  assert data.titles[1] == "Toy Story (1995)"
  assert data.titles[543] == "Misérables, Les (1995)"  # u.item is latin-1
  assert min(len(s) for s in data.sequences) == 20


def test_sequences_follow_time_and_break_ties_by_item_id(data):
  table = np.loadtxt(FOLDER / "u.data", dtype=np.int64)
  user = data.user_index(42)
  rows = table[table[:, 0] == 42]
  time_of = dict(zip(rows[:, 1], rows[:, 3]))
  keys = [(time_of[i], i) for i in data.sequences[user]]
  assert keys == sorted(keys) and len(keys) == len(rows)


def test_order_does_not_depend_on_file_order():
  ratings = b"1\t5\t3\t100\n1\t2\t4\t100\n1\t9\t1\t50\n2\t2\t5\t7\n"
  items = "".join(f"{i}|Movie {i}|x\n" for i in range(1, 10)).encode("latin-1")
  a = movielens.parse(ratings, items)
  b = movielens.parse(b"".join(reversed(ratings.splitlines(keepends=True))), items)
  assert [s.tolist() for s in a.sequences] == [[9, 2, 5], [2]]
  assert [s.tolist() for s in b.sequences] == [[9, 2, 5], [2]]


def test_leave_one_out_never_leaks_val_or_test_into_training(data, split):
  num_items = data.num_items
  for s, train, val, test in zip(data.sequences, split.train, split.val, split.test):
    np.testing.assert_array_equal(np.concatenate([train, [val, test]]), s)
    assert val not in train and test not in train  # MovieLens users rate a movie once
  batches = train_batches(split, num_items, "next_item", max_len=200, batch_size=64, seed=0)
  pairs = train_batches(split, num_items, "bpr", max_len=200, batch_size=64, seed=0)
  for step in range(30):
    for b, keys in ((batches(step), ("inputs", "targets")), (pairs(step), ("item",))):
      for key in keys:
        rows = b[key].reshape(len(b["user"]), -1)
        assert not (rows == split.val[b["user"], None]).any()
        assert not (rows == split.test[b["user"], None]).any()
  val = eval_arrays(split, num_items, "val", max_len=800)
  assert not (val["history"] == split.val[:, None]).any()
  assert not (val["history"] == split.test[:, None]).any()
  test = eval_arrays(split, num_items, "test", max_len=800)
  np.testing.assert_array_equal(test["history"][:, -1], split.val)
  assert not (test["history"] == split.test[:, None]).any()


@pytest.mark.parametrize("n", [2, 5, 6, 7, 23])
def test_windows_hold_every_transition_once(n):
  sequence = np.arange(100, 100 + n)
  chunks = windows(sequence, 5)
  assert all(2 <= len(w) <= 6 for w in chunks)
  transitions = sorted((a, b) for w in chunks for a, b in zip(w[:-1], w[1:]))
  assert transitions == list(zip(sequence[:-1], sequence[1:]))


def test_training_negatives_are_unrated_and_a_function_of_the_step(data, split):
  seen = movielens.seen_mask(split.train, data.num_items)
  batches = train_batches(split, data.num_items, "next_item", max_len=50, batch_size=64, seed=3)
  b = batches(5)
  user_BxT = np.broadcast_to(b["user"][:, None], b["targets"].shape)
  padding = b["targets"] == 0
  assert (b["negatives"][padding] == 0).all()
  assert not seen[user_BxT[~padding], b["negatives"][~padding]].any()
  np.testing.assert_array_equal(batches(5)["negatives"], b["negatives"])
  real = b["targets"][:, :-1] != 0  # position t's target is the input at t + 1
  np.testing.assert_array_equal(b["targets"][:, :-1][real], b["inputs"][:, 1:][real])


def test_sampled_eval_negatives_are_unrated_and_fixed(data, split):
  val = eval_arrays(split, data.num_items, "val", max_len=50)
  rated = movielens.seen_mask(data.sequences, data.num_items)
  assert val["negatives"].shape == (943, 100)
  assert not rated[np.arange(943)[:, None], val["negatives"]].any()
  np.testing.assert_array_equal(eval_arrays(split, data.num_items, "val", 50)["negatives"],
                                val["negatives"])


def test_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(sources.DataError, match="is not a directory"):
    movielens.load(str(tmp_path / "nowhere"))
  with pytest.raises(sources.DataError, match="missing u.data, u.item"):
    movielens.load(str(tmp_path))


def test_online_path_reads_the_grouplens_zip(tmp_path, monkeypatch):
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w") as z:
    for name in movielens.FILES:
      z.writestr(f"ml-100k/{name}", (FOLDER / name).read_bytes())
  monkeypatch.setattr(movielens.sources, "manual_dir", lambda *args: None)
  monkeypatch.setattr(movielens, "CACHE", tmp_path / "ml-100k.zip")
  monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(
      archive.getvalue()))
  data = movielens.load()
  assert data.num_ratings == 100_000 and (tmp_path / "ml-100k.zip").exists()
