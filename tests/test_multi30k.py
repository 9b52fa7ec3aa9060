"""Multi30k data, subword tokenization, BLEU, and the translation experiment end to end."""

import gzip
import sys
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from experiments import __main__ as cli
from research import config as config_lib
from research.data import multi30k
from research.data.sources import DataError
from research.data.subword import BOS, EOS, PAD, SubwordTokenizer
from research.evaluate.writer import read_metrics
from research.tasks.translation import BucketedBatches, Translator, corpus_scores, encode_pairs
from research.train import loop


@pytest.fixture(scope="module")
def train_pairs():
  return multi30k.load("train")


def test_local_files_hold_the_published_splits(train_pairs):
  assert {lang: len(s) for lang, s in train_pairs.items()} == {"en": 29_000, "de": 29_000}
  assert train_pairs["en"][0] == "Two young, White males are outside near many bushes."
  assert train_pairs["de"][0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
  assert len(multi30k.load("val")["de"]) == 1_014
  assert len(multi30k.load("test_2016_flickr", ("en",))["en"]) == 1_000


def test_bad_splits_and_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="unknown multi30k split 'test'.*test_2016_flickr"):
    multi30k.load("test")
  with pytest.raises(DataError, match="is not a directory"):
    multi30k.load("val", folder=str(tmp_path / "nowhere"))
  with gzip.open(tmp_path / "val.en.gz", "wt") as f:
    f.write("A dog.\n")
  with pytest.raises(DataError, match=r"missing val\.de\.gz in .*raw/val\.de\.gz"):
    multi30k.load("val", folder=str(tmp_path))
  with pytest.raises(DataError, match="has 1 lines, expected 1014"):
    multi30k.load("val", ("en",), folder=str(tmp_path))


def test_download_failure_says_where_to_put_the_files(tmp_path, monkeypatch):
  def offline(url, timeout):
    raise OSError("network is unreachable")
  monkeypatch.setattr(multi30k, "manual_dir", lambda dataset, configured: None)
  monkeypatch.setattr(multi30k, "CACHE", tmp_path)
  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(DataError, match=r"could not download .*raw/val\.en\.gz.*put val\.en\.gz in"):
    multi30k.load("val")


def test_subword_tokenizer_round_trips_and_frames_pairs(train_pairs):
  texts = train_pairs["en"][:2000] + train_pairs["de"][:2000]
  tokenizer = SubwordTokenizer.train(texts, 500)
  for text in texts[::97]:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  arrays = encode_pairs(tokenizer, tokenizer, ["A dog runs."], ["Ein Hund rennt."], max_len=12)
  src, tgt = arrays["src"][0], arrays["tgt"][0]
  assert src.shape == (12,) and tgt.shape == (13,)
  assert tgt[0] == BOS and list(src).index(EOS) == (src != PAD).sum() - 1
  assert tokenizer.decode(tgt) == "Ein Hund rennt." and tokenizer.decode(src) == "A dog runs."


def test_bucketed_batches_are_a_function_of_the_step_and_cover_an_epoch():
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 30, 200)
  src = np.where(np.arange(32)[None] < lengths[:, None], 7, PAD).astype(np.int32)
  tgt = np.where(np.arange(33)[None] < lengths[:, None] + 1, 8, PAD).astype(np.int32)
  src[:, 0] = np.arange(200)  # the row's identity
  batches = BucketedBatches({"src": src, "tgt": tgt}, batch_size=8, seed=0, buckets=(8, 16))
  seen = []
  for step in range(batches.steps_per_epoch):
    b = batches(step)
    L = b["src"].shape[1]
    assert L in (8, 16, 32) and b["tgt"].shape == (8, L + 1)
    assert np.all(lengths[b["src"][:, 0]] <= L)
    seen += list(b["src"][:, 0])
  assert len(seen) == len(set(seen)) > 200 - 3 * 8  # at most one partial batch per bucket dropped
  again = BucketedBatches({"src": src, "tgt": tgt}, batch_size=8, seed=0, buckets=(8, 16))
  np.testing.assert_array_equal(again(5)["src"], batches(5)["src"])


def test_corpus_scores_match_sacrebleus_documented_example():
  # sacrebleu's README: BLEU = 48.53, chrF2 = 59.73 for these three sentences, two references.
  refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
          ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
  hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
  scores = corpus_scores(hyps, refs)
  assert round(scores["bleu"], 2) == 48.53 and round(scores["chrf"], 2) == 59.73


def run(workdir, *overrides):
  spec = "multi30k_translation:tiny"
  config = config_lib.apply_overrides(experiments.get_config(spec),
                                      [f"--config.workdir={workdir}", "--config.progress_bar=false",
                                       *overrides])
  task = experiments.load("multi30k_translation").build(config)
  return loop.train(task, config, experiment=spec)


def test_tiny_translation_trains_evaluates_and_translates(tmp_path, capsys, monkeypatch):
  results = run(tmp_path)
  rows = read_metrics(tmp_path / "metrics.jsonl")
  train = [r for r in rows if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  for split in ("val", "test"):
    assert {"loss", "nll", "bleu", "chrf"} <= set(results[split])
    assert 0 <= results[split]["bleu"] <= 100 and results[split]["chrf"] > 0
  assert len((tmp_path / "translations.test.de").read_text().splitlines()) == 32
  assert (tmp_path / "tokenizer" / "source" / "spm.model").exists()
  assert not (tmp_path / "tokenizer" / "target").exists()  # one shared vocabulary

  capsys.readouterr()
  argv = ["multi30k_translation", "translate", "--workdir", str(tmp_path)]
  assert cli.main(argv + ["--beam_size=1", "A man rides a bike.", "Two dogs play."]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2
  monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("A dog.\n\nA cat.\n"))
  assert cli.main(argv) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2
  assert cli.main(["multi30k_translation", "translate", "--workdir", str(tmp_path / "no"), "x"]) == 2
  assert "not a run folder" in capsys.readouterr().err


def test_tiny_lstm_with_separate_vocabularies_trains(tmp_path):
  config = experiments.get_config("multi30k_translation:tiny")
  config.update(workdir=str(tmp_path), progress_bar=False, steps=10)
  config.data.shared_vocab = False
  config.model.kind = "lstm"  # the tiny variant's LSTM: 16 / 32 wide, one layer each side
  task = experiments.load("multi30k_translation").build(config)
  results = loop.train(task, config, experiment="multi30k_translation:tiny")
  assert sorted(p.parent.name for p in tmp_path.glob("tokenizer/*/spm.model")) == ["source", "target"]
  assert np.isfinite(results["test"]["loss"]) and 0 <= results["test"]["bleu"] <= 100


def test_missing_data_folder_stops_the_experiment_with_one_line(tmp_path, capsys):
  code = cli.main(["multi30k_translation:tiny", f"--config.workdir={tmp_path / 'run'}",
                   f"--config.data.manual_dir={tmp_path / 'nowhere'}"])
  assert code == 2 and "is not a directory" in capsys.readouterr().err


class CopyModel(nnx.Module):
  """A "translator" that writes its source back: target token t is source token t. Its
  translations are its inputs, so order, batching and detokenization are all that can differ."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, src_BxS):
    return src_BxS

  def init_cache(self, src_BxS, max_len):
    return {"src": src_BxS}, jnp.zeros((src_BxS.shape[0], 1))

  def decode(self, tokens_Nx1, context, cache, pos):
    src_NxS = context["src"]
    next_N = src_NxS[:, jnp.minimum(pos, src_NxS.shape[1] - 1)]
    return 10.0 * jax.nn.one_hot(next_N, self.vocab_size)[:, None], cache


@pytest.mark.parametrize("beam_size", [1, 2])
def test_translator_returns_hypotheses_in_input_order(beam_size):
  texts = multi30k.load("val", ("de",))["de"][:40]
  tokenizer = SubwordTokenizer.train(texts, 300)
  # Lengths shuffled, in batches of 3: sorting by length moves almost every sentence.
  texts = [texts[i] for i in np.random.default_rng(0).permutation(11)]
  lengths = [len(tokenizer.encode(t)) for t in texts]
  assert len(set(lengths)) > 6 and lengths != sorted(lengths, reverse=True)
  translator = Translator(tokenizer, tokenizer, max_len=128, beam_size=beam_size, batch_size=3)
  hyps = translator(CopyModel(tokenizer.vocab_size), texts)
  assert hyps == texts
  # A model's own references score 100.
  scores = corpus_scores(hyps, [texts])
  assert scores["bleu"] == pytest.approx(100.0, rel=1e-12) and scores["chrf"] == 100.0
