"""Subword tokenization with SentencePiece, trained on a task's training split.

Training is deterministic (one thread) and happens in memory; the training loop saves the
task's tokenizer in the run folder's `tokenizer/`, which a resumed run reads back
(`research.load.saved_tokenizer`), so it tokenizes exactly as before.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SubwordTokenizer:

  def __init__(self, model_bytes: bytes):
    self.model_bytes = model_bytes
    self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "unigram",
            character_coverage: float = 1.0) -> "SubwordTokenizer":
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)  # one thread: the same corpus gives the same model
    return cls(model.getvalue())

  def save(self, directory: Path) -> None:
    """`directory/tokenizer.json` and the SentencePiece model (`research.load.load_tokenizer`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spm.model").write_bytes(self.model_bytes)
    (directory / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece",
                                                         "model": "spm.model"}))

  @classmethod
  def load(cls, directory: Path) -> "SubwordTokenizer":
    directory = Path(directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    return cls((directory / spec["model"]).read_bytes())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    return [BOS] * bos + self._sp.encode(text) + [EOS] * eos

  def encode_batch(self, texts: list[str], max_len: int, *, bos: bool = False,
                   eos: bool = False) -> np.ndarray:
    """[N, max_len] int32 ids, right-padded with PAD and truncated (keeping EOS if asked)."""
    out = np.full((len(texts), max_len), PAD, np.int32)
    for i, text in enumerate(texts):
      ids = self.encode(text, bos=bos, eos=False)[:max_len - eos] + [EOS] * eos
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, skipping PAD and BOS."""
    ids = [int(i) for i in ids]
    if EOS in ids:
      ids = ids[:ids.index(EOS)]
    return self._sp.decode([i for i in ids if i not in (PAD, BOS)])


class TokenizerPair:
  """A source and a target tokenizer (translation); the same object twice for a shared
  vocabulary, saved once."""

  def __init__(self, source: SubwordTokenizer, target: SubwordTokenizer):
    self.source, self.target = source, target

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    self.source.save(directory / "source")
    shared = self.target.model_bytes == self.source.model_bytes
    if not shared:
      self.target.save(directory / "target")
    (directory / "tokenizer.json").write_text(json.dumps({"kind": "pair", "shared": shared}))

  @classmethod
  def load(cls, directory: Path) -> "TokenizerPair":
    directory = Path(directory)
    shared = json.loads((directory / "tokenizer.json").read_text())["shared"]
    source = SubwordTokenizer.load(directory / "source")
    return cls(source, source if shared else SubwordTokenizer.load(directory / "target"))
