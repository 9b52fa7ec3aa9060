"""MovieLens 100K as per-user item sequences in time order, split leave-one-out.

Offline it reads `u.data` and `u.item` from the dataset's local folder (see
`sources.manual_dir`); online it downloads GroupLens' `ml-100k.zip` once into
`~/.cache/research/` and reads the same two files from it. (tfds' `movielens/100k-ratings`
wants the zip itself, which the offline machines don't have.)

Items are renumbered 1..num_items in the order of their MovieLens ids (0 is padding; for
ML-100K the ids are already 1..1682), users 0..num_users-1 in the order of theirs. A user's
ratings are ordered by timestamp; ratings with the same timestamp (three in four ratings
share one with another of the user's) by item id, so the order never depends on file order.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np

from research.data import sources

DATASET = "movielens_100k"
FILES = ["u.data", "u.item"]
URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
CACHE = Path("~/.cache/research").expanduser() / "ml-100k.zip"


@dataclasses.dataclass
class MovieLens:
  sequences: list[np.ndarray]  # per user: item ids (1..num_items) in time order
  user_ids: np.ndarray  # [U] the MovieLens id of each user
  titles: list[str]  # titles[item]; titles[0] is padding
  num_ratings: int

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  @property
  def num_items(self) -> int:
    return len(self.titles) - 1

  def user_index(self, movielens_id: int) -> int:
    found = np.flatnonzero(self.user_ids == movielens_id)
    if not len(found):
      raise sources.DataError(f"no user with MovieLens id {movielens_id} (ids run from "
                              f"{self.user_ids.min()} to {self.user_ids.max()})")
    return int(found[0])


@dataclasses.dataclass
class LeaveOneOut:
  """Each user's last item is the test target, the one before it validation, the rest train."""
  train: list[np.ndarray]
  val: np.ndarray  # [U]
  test: np.ndarray  # [U]


def parse(ratings: bytes, items: bytes) -> MovieLens:
  """`u.data` (user, item, rating, timestamp; tab-separated) and `u.item` (latin-1, `|`)."""
  table = np.loadtxt(io.BytesIO(ratings), dtype=np.int64, ndmin=2)
  if table.shape[1] != 4:
    raise sources.DataError(f"u.data has {table.shape[1]} columns, expected 4 "
                            f"(user, item, rating, timestamp)")
  fields = [line.split("|") for line in items.decode("latin-1").splitlines() if line.strip()]
  item_ids = np.array([int(f[0]) for f in fields])
  order = np.argsort(item_ids)
  item_ids = item_ids[order]
  titles = ["<pad>"] + [fields[i][1] for i in order]
  user, raw_item, _, time = table.T
  item = np.searchsorted(item_ids, raw_item) + 1
  unknown = (item > len(item_ids)) | (item_ids[np.minimum(item, len(item_ids)) - 1] != raw_item)
  if unknown.any():
    raise sources.DataError(f"u.data rates item {raw_item[unknown][0]}, which u.item does not list")
  user_ids, user = np.unique(user, return_inverse=True)
  rows = np.lexsort((item, time, user))  # by user, then time, then item id
  starts = np.searchsorted(user[rows], np.arange(len(user_ids) + 1))
  sequences = [item[rows[a:b]] for a, b in zip(starts[:-1], starts[1:])]
  return MovieLens(sequences, user_ids, titles, len(table))


def load(manual_dir: str = "") -> MovieLens:
  folder = sources.manual_dir(DATASET, manual_dir)
  if folder is not None:
    sources.require_files(folder, FILES, DATASET)
    return parse((folder / "u.data").read_bytes(), (folder / "u.item").read_bytes())
  archive_path = sources.download(URL, CACHE, f"put {', '.join(FILES)} from it in a folder and "
                                  f"pass --config.data.manual_dir=FOLDER (or set ${sources.DATA_ENV})")
  with zipfile.ZipFile(archive_path) as archive:
    return parse(archive.read("ml-100k/u.data"), archive.read("ml-100k/u.item"))


def leave_one_out(sequences: list[np.ndarray]) -> LeaveOneOut:
  short = [i for i, s in enumerate(sequences) if len(s) < 3]
  if short:
    raise sources.DataError(f"{len(short)} users have fewer than 3 ratings (e.g. user index "
                            f"{short[0]}); leave-one-out needs a train, a val and a test item")
  return LeaveOneOut(train=[s[:-2] for s in sequences],
                     val=np.array([s[-2] for s in sequences]),
                     test=np.array([s[-1] for s in sequences]))


def left_pad(sequences: list[np.ndarray], length: int) -> np.ndarray:
  """[U, length] int32: the last `length` items of each sequence, zeros on the left."""
  out = np.zeros((len(sequences), length), np.int32)
  for row, s in zip(out, sequences):
    s = s[-length:]
    if len(s):
      row[-len(s):] = s
  return out


def seen_mask(sequences: list[np.ndarray], num_items: int) -> np.ndarray:
  """[U, num_items + 1] bool: True where the user's sequence holds the item."""
  seen = np.zeros((len(sequences), num_items + 1), bool)
  for row, s in zip(seen, sequences):
    row[s] = True
  return seen
