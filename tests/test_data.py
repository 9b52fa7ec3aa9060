"""The character-level data pipeline on the local Tiny Shakespeare copy."""

import numpy as np
import pytest

from research.config import ConfigError
from research.data import sources
from research.data.batching import EpochBatches, padded_batches
from research.data.text import CharTokenizer, LMBatches, load_text_splits


@pytest.fixture(scope="module")
def shakespeare():
  return load_text_splits("tiny_shakespeare")


def test_tiny_shakespeare_splits_match_nanogpt(shakespeare):
  # tfds train = the first 90%; validation+test = nanoGPT's val.bin (the last 10%).
  assert len(shakespeare["train"]) == 1_003_854 and len(shakespeare["val"]) == 111_540
  assert shakespeare["train"].startswith("First Citizen:")
  tokenizer = CharTokenizer.fit(shakespeare["train"] + shakespeare["val"])
  assert tokenizer.vocab_size == 65


def test_tokenizer_round_trip(tmp_path, shakespeare):
  tokenizer = CharTokenizer.fit(shakespeare["train"])
  text = shakespeare["train"][:500]
  assert tokenizer.decode(tokenizer.encode(text)) == text
  tokenizer.save(tmp_path / "tokenizer")
  assert CharTokenizer.load(tmp_path / "tokenizer").chars == tokenizer.chars
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tokenizer.encode("€")


def test_lm_batches_are_shifted_windows_and_a_function_of_the_step():
  tokens = np.arange(1000, dtype=np.int32)
  batches = LMBatches(tokens, block_size=8, batch_size=4, seed=3)
  b = batches(7)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  np.testing.assert_array_equal(b["inputs"], LMBatches(tokens, 8, 4, seed=3)(7)["inputs"])
  assert not np.array_equal(b["inputs"], batches(8)["inputs"])


def test_epoch_batches_cover_every_example_once_per_epoch():
  data = EpochBatches({"x": np.arange(10)}, batch_size=3, seed=0)
  epoch = np.concatenate([data(i)["x"] for i in range(data.steps_per_epoch)])
  assert len(set(epoch.tolist())) == 9  # 3 batches of 3; one example dropped this epoch
  assert not np.array_equal(epoch, np.concatenate([data(i)["x"] for i in range(3, 6)]))


def test_padded_batches_mask_the_padding():
  batches = list(padded_batches({"x": np.arange(10)}, batch_size=4))
  assert [b["mask"].sum() for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b["x"][b["mask"] > 0] for b in batches]), np.arange(10))


def test_text_file_holds_out_the_last_tenth(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("abcdefghij" * 10, encoding="utf-8")
  splits = load_text_splits("ignored", text_file=str(path))
  assert len(splits["train"]) == 90 and len(splits["val"]) == 10


def test_missing_or_bad_data_says_what_to_do(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_text_splits("tiny_shakespeare", text_file=str(tmp_path / "nope.txt"))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ConfigError, match="not UTF-8"):
    load_text_splits("x", text_file=str(tmp_path / "latin1.txt"))
  with pytest.raises(ConfigError, match="missing input.txt"):
    sources.tfds_source("tiny_shakespeare", tmp_path, ["input.txt"])
  with pytest.raises(ConfigError, match="not a directory"):
    sources.manual_dir("tiny_shakespeare", str(tmp_path / "absent"))
