"""Sentence classification data: GLUE SST-2 (sentiment) and CLINC150 (intents + out-of-scope).

SST-2: tfds' `glue/sst2` wants `SST-2.zip` in its manual folder; the shared data holds the
tsv files inside it, so this module reads the tsv files itself, from the manual folder
(`train.tsv`, `dev.tsv`, `test.tsv`, or `SST-2.zip`) or, online, from GLUE's zip downloaded
into the tfds download cache. Splits use tfds' names: train / validation / test (the test
labels are hidden: -1).

CLINC150: tfds `clinc_oos` (raw `clinc_oos.zip`), whose in-scope splits (train 15,000 /
validation 3,000 / test 4,500, intents 0..149) and out-of-scope splits (`*_oos`: 100 / 100 /
1,000, intent 150 = "oos") are merged here into train / validation / test.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from research.data import sources
from research.data.subword import PAD

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
CLINC_OOS = "oos"


@dataclasses.dataclass
class TextClassification:
  """Texts and integer labels of each split (-1 where labels are hidden)."""

  name: str
  splits: dict[str, tuple[list[str], np.ndarray]]
  class_names: list[str]

  def split(self, name: str) -> tuple[list[str], np.ndarray]:
    if name not in self.splits:
      raise sources.DataError(f"{self.name} has no split {name!r}; splits: {', '.join(self.splits)}")
    return self.splits[name]


def _parse_sst2_tsv(text: str, where: str) -> tuple[list[str], np.ndarray]:
  lines = text.splitlines()
  header = lines[0].split("\t") if lines else []
  if header not in (["sentence", "label"], ["index", "sentence"]):
    raise sources.DataError(f"{where}: expected a GLUE SST-2 tsv (header 'sentence<TAB>label' or "
                            f"'index<TAB>sentence'), got {lines[0][:80] if lines else 'an empty file'!r}")
  labelled = header[1] == "label"
  texts, labels = [], []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    if len(fields) != 2 or (labelled and fields[1] not in ("0", "1")):
      raise sources.DataError(f"{where}: line {number} is not 'sentence<TAB>0|1' / "
                              f"'index<TAB>sentence': {line[:80]!r}")
    texts.append((fields[0] if labelled else fields[1]).strip())
    labels.append(int(fields[1]) if labelled else -1)
  return texts, np.asarray(labels, np.int32)


def _tfds_downloads() -> Path:
  return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser() / "downloads"


def load_sst2(manual_dir: str = "") -> TextClassification:
  folder = sources.manual_dir("sst2", manual_dir)
  archive = None
  if folder is None:
    archive = sources.download(
        SST2_URL, _tfds_downloads() / Path(SST2_URL).name,
        f"put train.tsv, dev.tsv and test.tsv (the files inside it) in a folder and pass "
        f"--config.data.manual_dir=FOLDER (or set ${sources.DATA_ENV})")
  elif (folder / "SST-2.zip").is_file():
    archive = folder / "SST-2.zip"
  else:
    sources.require_files(folder, list(SST2_FILES.values()), "sst2")
  splits = {}
  for split, name in SST2_FILES.items():
    if archive is None:
      text, where = (folder / name).read_text(encoding="utf-8"), str(folder / name)
    else:
      try:
        with zipfile.ZipFile(archive) as z:
          text = z.read(f"SST-2/{name}").decode("utf-8")
      except (zipfile.BadZipFile, KeyError) as e:
        raise sources.DataError(f"{archive} is not GLUE's SST-2.zip ({e}); delete it and retry") from None
      where = f"{archive}:SST-2/{name}"
    splits[split] = _parse_sst2_tsv(text, where)
  return TextClassification("sst2", splits, ["negative", "positive"])


def load_clinc_oos(manual_dir: str = "") -> TextClassification:
  """150 intents + "oos" (the last class); each split holds its in-scope then its oos queries."""
  ds = sources.tfds_source("clinc_oos", sources.manual_dir("clinc_oos", manual_dir),
                           ["clinc_oos.zip"])
  rows = {split: ds[split].__getitems__(list(range(len(ds[split])))) for split in ds}
  names = {int(r["intent"]): r["intent_name"].decode() for split in rows for r in rows[split]}
  if sorted(names) != list(range(len(names))) or names[len(names) - 1] != CLINC_OOS:
    raise sources.DataError("clinc_oos: expected intents 0..N with the last one 'oos'")
  splits = {}
  for split in ("train", "validation", "test"):
    examples = rows[split] + rows[f"{split}_oos"]
    splits[split] = ([r["text"].decode() for r in examples],
                     np.asarray([r["intent"] for r in examples], np.int32))
  return TextClassification("clinc_oos", splits, [names[i] for i in range(len(names))])


@dataclasses.dataclass
class LengthBucketedBatches:
  """Shuffled passes over `arrays` (like `EpochBatches`) whose batches hold sentences of
  similar length, so trimmed batches carry little padding: each pass is shuffled, cut into
  windows of `window` batches, each window sorted by length and cut into batches, and the
  batches of the pass shuffled. Batch `step` is a pure function of (seed, step)."""

  arrays: dict[str, np.ndarray]
  lengths: np.ndarray
  batch_size: int
  seed: int
  window: int = 50

  def __post_init__(self):
    self.size = len(self.lengths)
    if self.size < self.batch_size:
      raise ValueError(f"{self.size} examples are fewer than one batch of {self.batch_size}")
    self.steps_per_epoch = self.size // self.batch_size
    self._epoch, self._batches = -1, None

  def _plan(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(self.size)[:self.steps_per_epoch * self.batch_size]
    chunk = self.window * self.batch_size
    for start in range(0, len(order), chunk):
      rows = order[start:start + chunk]
      order[start:start + chunk] = rows[np.argsort(self.lengths[rows], kind="stable")]
    return order.reshape(self.steps_per_epoch, self.batch_size)[rng.permutation(self.steps_per_epoch)]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._batches = epoch, self._plan(epoch)
    rows = self._batches[i]
    return {k: v[rows] for k, v in self.arrays.items()}


def trim_padding(tokens_BxT: np.ndarray, multiple: int) -> np.ndarray:
  """Drops trailing all-PAD columns, keeping a multiple of `multiple` (few distinct shapes to
  compile); models that mask padding give the same outputs on the trimmed batch."""
  length = int((tokens_BxT != PAD).sum(axis=1).max(initial=1))
  keep = min(tokens_BxT.shape[1], -(-length // multiple) * multiple)
  return tokens_BxT[:, :keep]


def bag_of_words(tokens_BxT: np.ndarray, vocab_size: int) -> np.ndarray:
  """[B, V] float32 counts of each token id (PAD not counted)."""
  counts_BxV = np.zeros((len(tokens_BxT), vocab_size), np.float32)
  rows_BxT = np.broadcast_to(np.arange(len(tokens_BxT))[:, None], tokens_BxT.shape)
  np.add.at(counts_BxV, (rows_BxT, tokens_BxT), 1.0)
  counts_BxV[:, PAD] = 0.0
  return counts_BxV
