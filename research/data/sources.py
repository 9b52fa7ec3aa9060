"""Where datasets come from: tfds online, or the same raw files from a local folder offline.

The local ("manual") folder of a dataset is, in order: the experiment's
`config.data.manual_dir`; `$RESEARCH_DATA_DIR/<dataset>`; `../shared/data/<dataset>` next
to this repository. With none of them, tfds downloads as usual. Prepared tfds datasets go
to `$TFDS_DATA_DIR` (tfds' own default: ~/tensorflow_datasets), as array_record files
read without TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

from research.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "RESEARCH_DATA_DIR"


class DataError(ConfigError):
  """Data that cannot be found or read: one line saying which file to put where."""


def manual_dir(dataset: str, configured: str = "") -> Path | None:
  """The local folder holding `dataset`'s raw files, or None to download."""
  if configured:
    path = Path(configured).expanduser()
    if not path.is_dir():
      raise DataError(f"config.data.manual_dir={configured!r} is not a directory")
    return path
  candidates = [REPO_ROOT.parent / "shared" / "data" / dataset]
  if os.environ.get(DATA_ENV):
    candidates.insert(0, Path(os.environ[DATA_ENV]) / dataset)
  return next((p for p in candidates if p.is_dir()), None)


def download(url: str, path: Path, offline: str, timeout: float = 120) -> Path:
  """`path`, downloaded from `url` on first use (through a `.part` file, so an interrupted
  download is never taken for the file). `offline` finishes the error: where to put the files."""
  path = Path(path)
  if not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
      with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    except OSError as e:
      raise DataError(f"could not download {url} ({e}); offline, {offline}") from None
    partial.rename(path)
  return path


def require_files(folder: Path, names: list[str], dataset: str) -> None:
  missing = [n for n in names if not (folder / n).is_file()]
  if missing:
    raise DataError(f"{dataset}: missing {', '.join(missing)} in {folder}; put the dataset's "
                    f"raw files there (see ../shared/data/README.md) or unset the manual folder "
                    f"to download")


def tfds_source(name: str, manual: Path | None, raw_files: list[str]):
  """Prepares the tfds dataset `name` (from `manual` if given) and returns its data sources."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_datasets as tfds  # Deferred: heavy, and only needed for tfds datasets.

  tfds.disable_progress_bar()

  if manual is not None:
    require_files(manual, raw_files, name)
  builder = tfds.builder(name, file_format="array_record")
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(
        manual_dir=str(manual) if manual else None, try_download_gcs=manual is None)
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as e:  # tfds raises many kinds; all mean the same thing to the user.
      where = f"the files in {manual}" if manual else "the internet"
      raise DataError(f"could not prepare tfds dataset {name!r} from {where}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; offline, "
                      f"put {', '.join(raw_files)} in a folder and pass "
                      f"--config.data.manual_dir=FOLDER (or set ${DATA_ENV})") from e
  return builder.as_data_source()
