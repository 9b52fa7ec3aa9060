"""Character-level language-model data: Tiny Shakespeare (tfds) or any local text file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from research.data import sources


class CharTokenizer:
  """Maps each distinct character of a corpus to an id, in sorted order (as nanoGPT does)."""

  def __init__(self, chars: str):
    self.chars = chars
    self._ids = {c: i for i, c in enumerate(chars)}

  @classmethod
  def fit(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.array([self._ids[c] for c in text], dtype=np.int32)
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def save(self, directory: Path) -> None:
    """`directory/tokenizer.json`; `research.load.load_tokenizer` reads it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": self.chars}))

  @classmethod
  def load(cls, directory: Path) -> "CharTokenizer":
    return cls(json.loads((Path(directory) / "tokenizer.json").read_text())["chars"])


def load_text_splits(dataset: str, manual_dir: str = "", text_file: str = "") -> dict[str, str]:
  """{"train": ..., "val": ...} text. `text_file` (any UTF-8 file) holds out its last 10%."""
  if text_file:
    path = Path(text_file).expanduser()
    if not path.is_file():
      raise sources.DataError(f"config.data.text_file={text_file!r} does not exist")
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise sources.DataError(f"{text_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    cut = int(0.9 * len(text))
    return {"train": text[:cut], "val": text[cut:]}
  if dataset != "tiny_shakespeare":
    raise sources.DataError(f"unknown text dataset {dataset!r}; use tiny_shakespeare or "
                            f"--config.data.text_file=PATH")
  ds = sources.tfds_source("tiny_shakespeare", sources.manual_dir(dataset, manual_dir),
                           ["input.txt"])
  text = {split: ds[split][0]["text"].decode("utf-8") for split in ("train", "validation", "test")}
  # validation+test is nanoGPT's val.bin (the last 10%), so the numbers compare.
  return {"train": text["train"], "val": text["validation"] + text["test"]}


@dataclasses.dataclass
class LMBatches:
  """Random windows of a token stream; batch `i` is a pure function of (seed, i)."""

  tokens: np.ndarray
  block_size: int
  batch_size: int
  seed: int

  def __post_init__(self):
    if len(self.tokens) <= self.block_size:
      raise sources.DataError(f"the text has {len(self.tokens)} tokens, fewer than the context "
                              f"of {self.block_size} + 1")

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    starts_B = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
    windows_BxT1 = self.tokens[starts_B[:, None] + np.arange(self.block_size + 1)]
    return {"inputs": windows_BxT1[:, :-1], "targets": windows_BxT1[:, 1:]}
