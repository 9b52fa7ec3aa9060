"""Multi30k task 1 (Elliott et al. 2016): Flickr30k image captions with their translations.

Splits `train` (29,000 pairs), `val` (1,014) and `test_2016_flickr` (1,000), read from the
gzipped raw text files the dataset is published as (`{split}.{lang}.gz`, one sentence a
line, untokenized). Offline they come from the local folder of
`research.data.sources.manual_dir("multi30k", ...)`; online they are downloaded once from
the multi30k/dataset GitHub repository into ~/.cache/research/multi30k.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from research.data.sources import DataError, download, manual_dir

SPLITS = {"train": 29_000, "val": 1_014, "test_2016_flickr": 1_000}
URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}"
CACHE = Path("~/.cache/research/multi30k").expanduser()


def file_name(split: str, lang: str) -> str:
  return f"{split}.{lang}.gz"


def load(split: str, langs: tuple[str, ...] = ("en", "de"), folder: str = "") -> dict[str, list[str]]:
  """lang -> the split's sentences, aligned across languages; `folder` as `data.manual_dir`."""
  if split not in SPLITS:
    raise DataError(f"unknown multi30k split {split!r}; choose one of {', '.join(SPLITS)}")
  local = manual_dir("multi30k", folder)
  paths = {}
  for lang in langs:
    name = file_name(split, lang)
    if local is None:
      paths[lang] = download(URL.format(name=name), CACHE / name,
                             f"put {name} in ../shared/data/multi30k/ or pass "
                             f"--config.data.manual_dir=FOLDER", timeout=60)
    elif (local / name).is_file():
      paths[lang] = local / name
    else:
      raise DataError(f"multi30k: missing {name} in {local}; put the file from "
                      f"{URL.format(name=name)} there")
  out = {}
  for lang, path in paths.items():
    url = URL.format(name=path.name)
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        out[lang] = [line.strip() for line in f]
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise DataError(f"multi30k: cannot read {path} ({e}); replace it with the file from {url}") from None
    if len(out[lang]) != SPLITS[split]:
      raise DataError(f"multi30k: {path} has {len(out[lang])} lines, expected {SPLITS[split]}; "
                      f"replace it with the file from {url}")
  return out
