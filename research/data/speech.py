"""Spoken words as waveforms: wav files, the Free Spoken Digit Dataset, and a user's own folder.

`read_wav` reads PCM wav files with the standard `wave` module (8-, 16-, 24- or 32-bit), mixes
stereo down to mono, scales to [-1, 1] and resamples to the model's rate (polyphase, scipy).
An empty, unreadable or non-audio file is a `DataError` naming it, in one line.

FSDD (Jakobovski et al., v1.0.10): 3,000 mono 8 kHz recordings `{digit}_{speaker}_{index}.wav`,
6 speakers x 10 digits x 50. Offline it reads `recordings/` from the dataset's local folder
(`sources.manual_dir("spoken_digit")`); online it downloads the tag's GitHub archive once
into `~/.cache/research/` and reads the same files from it. Protocols: `official` (test =
indices 0-4 of every speaker and digit, train = 5-49) and `speaker` (leave one speaker out:
the test split is every recording of `test_speaker`, train the other five speakers').

`load_folder(DIR)` reads a user's recordings labelled by sub-folder (`DIR/yes/*.wav`) or, in a
flat folder, by the file-name prefix before the first `_` (`yes_001.wav`), and holds out a
fraction of each class as the test split.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import wave
import zipfile
from pathlib import Path

import numpy as np

from research.data import sources

DATASET = "spoken_digit"
VERSION = "1.0.10"
URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v{VERSION}.zip"
CACHE = Path("~/.cache/research").expanduser() / f"free-spoken-digit-dataset-{VERSION}.zip"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
DIGITS = tuple(str(d) for d in range(10))
PROTOCOLS = ("official", "speaker")
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
  """`x` sampled at `rate` Hz, resampled to `target` Hz (polyphase FIR, scipy's Kaiser window)."""
  if rate == target:
    return x.astype(np.float32)
  from scipy.signal import resample_poly

  g = math.gcd(int(rate), int(target))
  return resample_poly(x.astype(np.float64), target // g, rate // g).astype(np.float32)


def decode_wav(data: bytes, name: str, target_rate: int | None = None) -> np.ndarray:
  """Mono float32 samples in [-1, 1] of a PCM wav file's bytes, at `target_rate` if given.
  `name` is what an error calls the file."""
  if not data:
    raise sources.DataError(f"{name}: empty file (0 bytes), not a wav recording")
  try:
    with wave.open(io.BytesIO(data)) as w:
      channels, width, rate, count = (w.getnchannels(), w.getsampwidth(), w.getframerate(),
                                      w.getnframes())
      raw = w.readframes(count)
  except (wave.Error, EOFError, ValueError) as e:
    raise sources.DataError(f"{name}: not a readable PCM wav file ({e})") from None
  if count == 0 or not raw:
    raise sources.DataError(f"{name}: a wav file with no samples")
  if width not in (1, 2, 3, 4) or channels < 1 or rate <= 0:
    raise sources.DataError(f"{name}: unsupported wav format ({width * 8}-bit, {channels} "
                            f"channels, {rate} Hz); use 8/16/24/32-bit PCM")
  frames = len(raw) // (width * channels)
  raw = raw[:frames * width * channels]
  if width == 1:  # unsigned 8-bit
    x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
  elif width == 3:  # little-endian 24-bit: widen to 32
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
    x = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8)
         | (b[:, 2].astype(np.int8).astype(np.int32) << 16)).astype(np.float32) / 2 ** 23
  else:
    dtype = np.int16 if width == 2 else np.int32
    x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / np.iinfo(dtype).max
  x = x.reshape(frames, channels).mean(axis=1)
  return resample(x, rate, target_rate) if target_rate else x


def read_wav(path: str | Path, target_rate: int | None = None) -> np.ndarray:
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise sources.DataError(f"{path}: cannot be read ({e.strerror or e})") from None
  return decode_wav(data, str(path), target_rate)


def fit(x: np.ndarray, length: int) -> np.ndarray:
  """The clip cut to `length` samples around its middle if longer (left-aligned otherwise;
  see `place`)."""
  if len(x) <= length:
    return x
  start = (len(x) - length) // 2
  return x[start:start + length]


def left_aligned(clips: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """([N, length] float32 clips cut to `length`, zero-padded at the end; [N] their lengths)."""
  out = np.zeros((len(clips), length), np.float32)
  lengths = np.zeros(len(clips), np.int32)
  for i, clip in enumerate(clips):
    clip = fit(clip, length)
    out[i, :len(clip)], lengths[i] = clip, len(clip)
  return out, lengths


def place(waves_BxS: np.ndarray, lengths_B: np.ndarray, offsets_B: np.ndarray | None = None
          ) -> np.ndarray:
  """Left-aligned clips moved right by `offsets` samples (default: centred in the window)."""
  S = waves_BxS.shape[1]
  if offsets_B is None:
    offsets_B = (S - lengths_B) // 2
  index = (np.arange(S)[None, :] - offsets_B[:, None]) % S
  return np.take_along_axis(waves_BxS, index, axis=1)


@dataclasses.dataclass
class Recordings:
  """Labelled clips of one split: float32 waveforms at the model's rate."""
  clips: list[np.ndarray]
  labels: np.ndarray  # [N] int
  names: list[str]  # file names, for reports

  def __len__(self):
    return len(self.clips)


def fsdd_files(manual_dir: str = "") -> dict[str, bytes]:
  """File name -> bytes of every FSDD recording, from the local folder or the archive."""
  folder = sources.manual_dir(DATASET, manual_dir)
  if folder is not None:
    recordings = folder / "recordings" if (folder / "recordings").is_dir() else folder
    files = {p.name: p for p in sorted(recordings.glob("*.wav")) if FSDD_NAME.match(p.name)}
    if not files:
      raise sources.DataError(f"{DATASET}: no {{digit}}_{{speaker}}_{{index}}.wav files in "
                              f"{recordings}; put FSDD's recordings/ there (see "
                              f"../shared/data/README.md) or unset the manual folder to download")
    out = {}
    for name, path in files.items():
      try:
        out[name] = path.read_bytes()
      except OSError as e:
        raise sources.DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return out
  archive_path = sources.download(
      URL, CACHE, f"put the dataset's recordings/ folder in a folder and pass "
      f"--config.data.manual_dir=FOLDER (or set ${sources.DATA_ENV})")
  with zipfile.ZipFile(archive_path) as archive:
    return {Path(n).name: archive.read(n) for n in sorted(archive.namelist())
            if "/recordings/" in n and FSDD_NAME.match(Path(n).name)}


def load_fsdd(manual_dir: str = "", *, sample_rate: int = 8000, protocol: str = "official",
              test_speaker: str = "", max_per_class: int = 0) -> dict[str, Recordings]:
  """{"train": ..., "test": ...} of FSDD under `protocol`; `max_per_class` > 0 keeps that many
  recordings of each digit per split (quick runs)."""
  if protocol not in PROTOCOLS:
    raise sources.DataError(f"unknown config.data.protocol {protocol!r}; choose one of "
                            f"{', '.join(PROTOCOLS)}")
  if protocol == "speaker" and test_speaker not in SPEAKERS:
    raise sources.DataError(f"config.data.test_speaker={test_speaker!r} is not an FSDD speaker; "
                            f"choose one of {', '.join(SPEAKERS)}")
  if protocol == "official" and test_speaker:
    raise sources.DataError("config.data.test_speaker needs config.data.protocol=speaker")
  splits = {"train": ([], [], []), "test": ([], [], [])}
  counts: dict[tuple[str, int], int] = {}
  for name, data in fsdd_files(manual_dir).items():
    digit, speaker, index = FSDD_NAME.match(name).groups()
    test = int(index) <= 4 if protocol == "official" else speaker == test_speaker
    split = "test" if test else "train"
    if max_per_class:
      n = counts[split, int(digit)] = counts.get((split, int(digit)), 0) + 1
      if n > max_per_class:
        continue
    clips, labels, names = splits[split]
    clips.append(decode_wav(data, name, sample_rate))
    labels.append(int(digit))
    names.append(name)
  return {split: Recordings(c, np.array(l, np.int32), n) for split, (c, l, n) in splits.items()}


def load_folder(folder: str, *, sample_rate: int, test_fraction: float = 0.2,
                seed: int = 0) -> tuple[dict[str, Recordings], tuple[str, ...]]:
  """({"train", "test"}, class names) of a user's recordings: `DIR/<label>/*.wav`, or
  `DIR/<label>_*.wav`. A fraction of each class (at least one file) is held out as test,
  chosen by `seed`."""
  root = Path(folder).expanduser()
  if not root.is_dir():
    raise sources.DataError(f"config.data.folder={folder!r} is not a directory")
  subdirs = sorted(p for p in root.iterdir() if p.is_dir() and list(p.glob("*.wav")))
  if subdirs:
    labelled = [(p.name, f) for p in subdirs for f in sorted(p.glob("*.wav"))]
  else:
    labelled = [(f.name.split("_", 1)[0], f) for f in sorted(root.glob("*.wav")) if "_" in f.name]
  if not labelled:
    raise sources.DataError(f"{root}: no labelled wav files (put them in one sub-folder per "
                            f"label, or name them <label>_<anything>.wav)")
  classes = tuple(sorted({label for label, _ in labelled}))
  if len(classes) < 2:
    raise sources.DataError(f"{root}: every wav file has the label {classes[0]!r}; a classifier "
                            f"needs at least two labels")
  if not 0 < test_fraction < 1:
    raise sources.DataError(f"config.data.test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  splits = {"train": ([], [], []), "test": ([], [], [])}
  for c, label in enumerate(classes):
    files = [f for lab, f in labelled if lab == label]
    if len(files) < 2:
      raise sources.DataError(f"{root}: label {label!r} has one file; each label needs at least "
                              f"two (one to train on, one to test)")
    order = rng.permutation(len(files))
    n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
    for rank, i in enumerate(order):
      clips, labels, names = splits["test" if rank < n_test else "train"]
      clips.append(read_wav(files[i], sample_rate))
      labels.append(c)
      names.append(str(files[i].relative_to(root)))
  return ({split: Recordings(c, np.array(l, np.int32), n) for split, (c, l, n) in splits.items()},
          classes)
