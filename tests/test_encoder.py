"""Encoder, BiLSTM and MLP classifiers; MLM masking and pretraining; the subword tokenizer."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.data.subword import EOS, PAD, SubwordTokenizer
from research.load import load_tokenizer
from research.models.bilstm import BiLSTMClassifier, BiLSTMConfig, reverse_within_length
from research.models.encoder import Encoder, EncoderClassifier, EncoderConfig, MaskedLM
from research.models.mlp import MLP, MLPConfig
from research.tasks.masked_lm import FIRST_REAL_ID, mask_tokens, mlm_phase
from research.train import loop
from research.train.task import Task

V = 50


def _tokens(seed=0, B=4, T=12):
  """Right-padded random rows of lengths 1..T-3 (every row has trailing padding)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(FIRST_REAL_ID, V, (B, T))
  lengths = rng.integers(1, T - 2, B)
  return jnp.asarray(np.where(np.arange(T)[None] < lengths[:, None], tokens, PAD))


def _encoder_classifier():
  cfg = EncoderConfig(vocab_size=V, max_len=24, num_layers=2, num_heads=2, embed_dim=16)
  return EncoderClassifier(dataclasses.replace(cfg, num_classes=3), rngs=nnx.Rngs(0))


def _bilstm():
  return BiLSTMClassifier(BiLSTMConfig(vocab_size=V, num_classes=3, embed_dim=8, hidden_dim=8),
                          rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.mark.parametrize("make", [_encoder_classifier, _bilstm])
def test_padding_never_changes_a_prediction(make):
  model = make()
  tokens = _tokens()
  logits = forward(model, tokens)
  # More padding at the end.
  longer = jnp.concatenate([tokens, jnp.zeros((4, 6), tokens.dtype)], axis=1)
  np.testing.assert_allclose(forward(model, longer), logits, atol=1e-5)
  # A row alone, cut to its own length (no neighbours, no padding at all).
  row = np.asarray(tokens[1])
  np.testing.assert_allclose(forward(model, jnp.asarray(row[row != PAD])[None])[0], logits[1],
                             atol=1e-5)
  # Whatever the PAD embedding holds.
  embed = model.encoder.embed if hasattr(model, "encoder") else model.embed
  embed.embedding.value = embed.embedding.value.at[PAD].set(100.0)
  np.testing.assert_allclose(forward(model, tokens), logits, atol=1e-5)


def test_encoder_is_bidirectional():
  """The first position's state depends on the last token (a causal model's would not)."""
  cfg = EncoderConfig(vocab_size=V, max_len=16, num_layers=1, num_heads=2, embed_dim=16)
  encoder = Encoder(cfg, rngs=nnx.Rngs(0))
  first = forward(encoder, jnp.asarray([[5, 6, 7, 8], [5, 6, 7, 9]]))[:, 0]
  assert not np.allclose(first[0], first[1])


def test_reverse_within_length():
  x = jnp.asarray([[1, 2, 3, 0], [4, 5, 0, 0]])
  out = reverse_within_length(x, jnp.asarray([3, 2]))
  np.testing.assert_array_equal(out, [[3, 2, 1, 0], [5, 4, 0, 0]])
  np.testing.assert_array_equal(reverse_within_length(out, jnp.asarray([3, 2])), x)


def test_dropout_only_in_training():
  model = EncoderClassifier(EncoderConfig(vocab_size=V, max_len=24, num_layers=1, num_heads=2,
                                          embed_dim=16, dropout=0.5, num_classes=3),
                            rngs=nnx.Rngs(0))
  tokens = _tokens()
  train = nnx.jit(lambda model, tokens, rngs: model(tokens, rngs=rngs))
  np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
  assert not np.allclose(train(model, tokens, nnx.Rngs(dropout=1)), forward(model, tokens))


def test_mlp_shapes_and_flattening():
  mlp = MLP(MLPConfig(in_features=12, hidden_sizes=[8, 8], out_features=5, dropout=0.1),
            rngs=nnx.Rngs(0))
  x = jnp.ones((3, 2, 6))
  assert mlp(x).shape == (3, 5)
  np.testing.assert_allclose(mlp(x), mlp(x.reshape(3, 12)))
  linear = MLP(MLPConfig(in_features=4, hidden_sizes=(), out_features=2), rngs=nnx.Rngs(0))
  assert linear(jnp.ones((1, 4))).shape == (1, 2)


def test_mask_tokens_follows_the_bert_recipe():
  rng = np.random.default_rng(0)
  tokens = np.asarray(_tokens(seed=1, B=4000, T=40))
  mask_id = V
  batch = mask_tokens(tokens, rng, mask_id=mask_id, vocab_size=V, rate=0.15)
  lengths = (tokens != PAD).sum(1)
  w = batch["weights"].astype(bool)
  rows = np.arange(len(tokens))[:, None]
  # round(15%) of each row's real tokens (at least one), distinct, never padding.
  np.testing.assert_array_equal(w.sum(1), np.maximum(1, np.rint(0.15 * lengths)))
  picked = np.where(w, batch["positions"], -1 - np.arange(w.shape[1]))
  assert all(len(set(r)) == len(r) for r in picked)
  assert (tokens[rows, batch["positions"]][w] != PAD).all()
  np.testing.assert_array_equal(batch["targets"][w], tokens[rows, batch["positions"]][w])
  # Of the chosen: ~80% [MASK], ~10% random real token, ~10% unchanged.
  seen = batch["inputs"][rows, batch["positions"]][w]
  target = batch["targets"][w]
  assert np.mean(seen == mask_id) == pytest.approx(0.8, abs=0.02)
  assert np.mean(seen == target) == pytest.approx(0.1 + 0.1 / (V - FIRST_REAL_ID), abs=0.02)
  assert ((seen >= FIRST_REAL_ID) & (seen < V) | (seen == mask_id)).all()
  # Nothing else changed.
  changed = batch["inputs"] != tokens
  changed[rows, batch["positions"]] &= ~w
  assert not changed.any()


def test_masked_lm_logits_at_positions():
  cfg = EncoderConfig(vocab_size=V + 1, max_len=16, num_layers=1, num_heads=2, embed_dim=16)
  mlm = MaskedLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(T=10)
  positions = jnp.asarray([[0, 1], [0, 0], [7, 3], [9, 2]])
  logits = nnx.jit(lambda model, t, p: model(t, p))(mlm, tokens, positions)
  assert logits.shape == (4, 2, V + 1)
  # The same as every position's logits, picked at `positions`, row by row.
  every = mlm(tokens, jnp.broadcast_to(jnp.arange(10), (4, 10)))
  np.testing.assert_allclose(logits, np.take_along_axis(np.asarray(every),
                                                        np.asarray(positions)[..., None], axis=1),
                             rtol=1e-5, atol=1e-5)


def test_mlm_phase_trains_in_its_folder_and_hands_its_encoder_over(tmp_path):
  """The MLM phase runs in <workdir>/pretrain and its encoder becomes the classifier's."""
  c = config_lib.base()
  c.update(workdir=str(tmp_path), batch_size=16, progress_bar=False, log_every=1, eval_every=2)
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=2, batch_size=16, learning_rate=1e-2, warmup_steps=0, eval_every=2, checkpoint_every=2,
      mask_rate=0.15))
  cfg = EncoderConfig(vocab_size=V + 1, max_len=16, num_layers=1, num_heads=2, embed_dim=16,
                      num_classes=3)
  classifier = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.array, nnx.state(classifier.encoder, nnx.Param).to_pure_dict())
  tokens = np.asarray(_tokens(seed=2, B=64, T=16))
  phase = mlm_phase(c, classifier.encoder, tokens, tokens[:16], mask_id=V, vocab_size=V)
  assert phase.config.workdir == str(tmp_path / "pretrain")
  loop.run_phases(Task(model=classifier, loss_fn=None, train_data=None, phases=(phase,)),
                  tmp_path, "test")
  after = nnx.state(classifier.encoder, nnx.Param).to_pure_dict()
  assert (tmp_path / "pretrain" / "metrics.jsonl").exists()
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert all(changed)  # every encoder parameter was trained (and loaded back)


@pytest.fixture(scope="module")
def tokenizer():
  texts = ["the movie was great", "a charming and often affecting journey", "unflinchingly bleak",
           "what is my account balance", "set an alarm for 7 am please"] * 20
  return SubwordTokenizer.train(texts, vocab_size=60)


def test_tokenizer_round_trip(tokenizer, tmp_path):
  for text in ["the movie was great", "set an alarm please", "bleak journey"]:
    ids = tokenizer.encode(text)
    assert PAD not in ids and tokenizer.decode(ids) == text
  batch = tokenizer.encode_batch(["the movie was great", "a"], max_len=4, eos=True)
  assert batch.shape == (2, 4) and batch[0, -1] == EOS  # truncated, EOS kept
  assert tokenizer.decode(batch[1]) == "a" and (batch[1, np.argmax(batch[1] == EOS) + 1:] == PAD).all()
  tokenizer.save(tmp_path / "tokenizer")
  loaded = load_tokenizer(tmp_path / "tokenizer")
  assert loaded.model_bytes == tokenizer.model_bytes
  assert loaded.encode("the movie") == tokenizer.encode("the movie")
