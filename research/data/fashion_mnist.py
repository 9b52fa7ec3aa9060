"""Fashion-MNIST (Xiao et al. 2017): tfds `fashion_mnist` as numpy arrays.

28x28 grayscale photos of clothing in 10 classes: 60,000 train and 10,000 test. The last
`val_size` training images are held out for model selection. The images are decoded once
into memory (uint8, 47 MB); batches are cut from them on the host. Offline, tfds prepares
the dataset from its four raw .gz files (`RAW_FILES`) in the local folder.
"""

from __future__ import annotations

import numpy as np

from research.config import ConfigError
from research.data import sources

DATASET = "fashion_mnist"
RAW_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]


def split_rows(num_train: int, num_test: int, val_size: int,
               max_examples: int = 0) -> dict[str, tuple[str, np.ndarray]]:
  """split -> (tfds split, row indices): train = the first rows of tfds train, val = its last
  `val_size`, test = tfds test; `max_examples` > 0 keeps only the first that many of each."""
  if not 0 < val_size < num_train:
    raise ConfigError(f"config.data.val_size={val_size} must be in (0, {num_train})")
  rows = {"train": ("train", np.arange(num_train - val_size)),
          "val": ("train", np.arange(num_train - val_size, num_train)),
          "test": ("test", np.arange(num_test))}
  if max_examples > 0:
    rows = {k: (s, r[:max_examples]) for k, (s, r) in rows.items()}
  return rows


def load(manual_dir: str = "", val_size: int = 5000,
         max_examples: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """split -> {"image": uint8 [N, 28, 28], "label": int32 [N]} for train, val and test."""
  source = sources.tfds_source(DATASET, sources.manual_dir(DATASET, manual_dir), RAW_FILES)
  splits = {}
  for name, (tfds_split, rows) in split_rows(len(source["train"]), len(source["test"]),
                                             val_size, max_examples).items():
    examples = source[tfds_split].__getitems__(rows.tolist())
    splits[name] = {"image": np.stack([e["image"][..., 0] for e in examples]),
                    "label": np.array([e["label"] for e in examples], np.int32)}
  return splits
