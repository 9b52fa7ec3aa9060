"""A pretrained checkpoint's own tokenizer, run by Hugging Face's `tokenizers` library.

`HFTokenizer` wraps a `tokenizer.json` (WordPiece for BERT; the same class reads byte-level
BPE files): it adds the checkpoint's special tokens ([CLS] ... [SEP] for BERT) through the
file's post-processor, truncates the way `transformers` does (the text is cut, the special
tokens stay) and right-pads with the checkpoint's padding id. Whatever padding and truncation
the file itself configures (all-MiniLM-L6-v2's pads everything to 128) is switched off: the
caller says the length.

Saved in a run folder's `tokenizer/` as `tokenizer.json` = {"kind": "hf_tokenizers", ...} (the
name `research.load.load_tokenizer` reads) beside the library's own file, `hf_tokenizer.json`,
and the checkpoint's tokenizer_config.json / special_tokens_map.json when it had them (so an
export writes a folder `transformers` loads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KIND = "hf_tokenizers"
FILE = "hf_tokenizer.json"
# Files beside tokenizer.json in a Hugging Face folder that describe the tokenizer to
# `transformers`; kept so that an exported folder loads there too.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
  """A tokenizer folder that cannot be read; a one-line message."""


class HFTokenizer:

  def __init__(self, tokenizer_json: str, *, pad_id: int | None = None,
               side_files: dict[str, str] | None = None):
    from tokenizers import Tokenizer

    self._json = tokenizer_json
    self._tok = Tokenizer.from_str(tokenizer_json)
    self._tok.no_padding()
    self._tok.no_truncation()
    self._truncating = {}  # max_len -> a copy that truncates to it
    self.side_files = dict(side_files or {})
    if pad_id is None:
      padding = json.loads(tokenizer_json).get("padding") or {}
      pad_id = padding.get("pad_id")
      if pad_id is None:
        pad_id = next((self._tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>")
                       if self._tok.token_to_id(t) is not None), 0)
    self.pad_id = int(pad_id)

  @classmethod
  def from_folder(cls, folder: str | Path, *, pad_id: int | None = None) -> "HFTokenizer":
    """From a Hugging Face model folder's `tokenizer.json` (and its side files)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
      raise TokenizerError(f"{folder} has no tokenizer.json (a `tokenizers` file); "
                           f"only fast-tokenizer folders are supported")
    text = path.read_text(encoding="utf-8")
    try:
      return cls(text, pad_id=pad_id, side_files={
          name: (folder / name).read_text(encoding="utf-8")
          for name in SIDE_FILES if (folder / name).is_file()})
    except Exception as e:  # the library's parse errors are long; say which file
      raise TokenizerError(f"{path} is not a tokenizers file: {str(e).splitlines()[0]}") from None

  # --- run-folder files (research.load.load_tokenizer) ---

  def save(self, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FILE).write_text(self._json, encoding="utf-8")
    for name, text in self.side_files.items():
      (directory / name).write_text(text, encoding="utf-8")
    (directory / "tokenizer.json").write_text(json.dumps(
        {"kind": KIND, "file": FILE, "pad_id": self.pad_id, "side_files": sorted(self.side_files)}))

  @classmethod
  def load(cls, directory: Path) -> "HFTokenizer":
    directory = Path(directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    return cls((directory / spec["file"]).read_text(encoding="utf-8"), pad_id=spec["pad_id"],
               side_files={name: (directory / name).read_text(encoding="utf-8")
                           for name in spec.get("side_files", ())})

  def export(self, folder: Path) -> None:
    """Writes a Hugging Face folder's tokenizer files (tokenizer.json and side files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
    for name, text in self.side_files.items():
      (folder / name).write_text(text, encoding="utf-8")

  # --- encoding ---

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
    """Ids of `text`, with the checkpoint's special tokens ([CLS] ... [SEP]); no truncation."""
    return self._tok.encode(text, add_special_tokens=special_tokens).ids

  def _truncating_to(self, max_len: int):
    if max_len not in self._truncating:
      from tokenizers import Tokenizer

      tok = Tokenizer.from_str(self._json)
      tok.no_padding()
      tok.enable_truncation(max_len)
      self._truncating[max_len] = tok
    return self._truncating[max_len]

  def encode_batch(self, texts: list[str], max_len: int) -> np.ndarray:
    """[N, max_len] int32 ids with special tokens, truncated as `transformers` does
    (`truncation=True, max_length=max_len`) and right-padded with `pad_id`."""
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, encoding in enumerate(self._truncating_to(max_len).encode_batch(list(texts))):
      out[i, :len(encoding.ids)] = encoding.ids
    return out

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids if int(i) != self.pad_id]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
