"""Interpretability tools: attention maps match the model, scores and Fourier analysis recover
known answers, and the command writes its PNGs for a trained run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from research import config as config_lib
from research.interpret import __main__ as cli
from research.interpret import fourier, scores
from research.interpret.attention import attention_maps
from research.models.gpt import GPT, GPTConfig
from research.train import loop


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_attention_maps_reproduce_each_blocks_attention_output(position):
  model = GPT(GPTConfig(vocab_size=13, block_size=10, num_layers=2, num_heads=2, embed_dim=16,
                        position=position), rngs=nnx.Rngs(0))
  for block in model.blocks:  # sharper than at init, so a wrong mask or scale would show
    block.attn.qkv.kernel[...] = block.attn.qkv.kernel[...] * 30
  tokens_BxT = jnp.asarray(np.random.default_rng(0).integers(0, 13, (3, 10)))
  maps_LxBxHxTxT = attention_maps(model, tokens_BxT)
  np.testing.assert_allclose(maps_LxBxHxTxT.sum(-1), 1, atol=1e-5)
  assert float(jnp.triu(maps_LxBxHxTxT, k=1).max()) == 0
  x_BxTxD = model._embed(tokens_BxT, 0)
  for block, maps_BxHxTxT in zip(model.blocks, maps_LxBxHxTxT):
    h_BxTxD = block.norm1(x_BxTxD)
    v_BxTxHxK = jnp.split(block.attn.qkv(h_BxTxD).reshape(3, 10, 6, 8), 3, axis=2)[2]
    y_BxTxD = jnp.einsum("bhts,bshk->bthk", maps_BxHxTxT, v_BxTxHxK).reshape(3, 10, 16)
    np.testing.assert_allclose(block.attn.out(y_BxTxD), block.attn(h_BxTxD, causal=True)[0],
                               atol=1e-5)
    x_BxTxD, _ = block(x_BxTxD)


def test_score_targets_on_a_hand_written_sequence():
  np.testing.assert_array_equal(scores.prefix_matching_keys(np.array([[5, 3, 5, 7, 3, 3]])),
                                [[-1, -1, 1, -1, 2, 2]])
  np.testing.assert_array_equal(scores.induction_keys(6, 3), [[-1, -1, -1, 1, 2, 3]])
  np.testing.assert_array_equal(scores.previous_token_keys(1, 4), [[-1, 0, 1, 2]])


def test_scores_of_hand_built_attention_patterns():
  n, T = 5, 10
  tokens_BxT = scores.repeated_random_tokens(np.random.default_rng(0), 4, n, vocab=50)
  keys = scores.probe_keys(tokens_BxT, n)
  onehot = lambda key_BxT: np.eye(T)[np.where(key_BxT >= 0, key_BxT, np.arange(T))]
  uniform_TxT = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  maps_HxBxTxT = np.stack([onehot(keys["induction"]), onehot(keys["previous_token"]),
                           np.broadcast_to(uniform_TxT, (4, T, T))])
  maps_LxBxHxTxT = jnp.asarray(maps_HxBxTxT.transpose(1, 0, 2, 3)[None])
  induction = scores.score(maps_LxBxHxTxT, keys["induction"])[0]
  previous = scores.score(maps_LxBxHxTxT, keys["previous_token"])[0]
  chance = np.mean(1 / (np.arange(n, 2 * n) + 1))
  np.testing.assert_allclose(induction, [1, 0, chance], atol=1e-6)
  np.testing.assert_allclose(previous, [0, 1, np.mean(1 / (np.arange(1, T) + 1))], atol=1e-6)


def test_fourier_analysis_recovers_the_frequencies_an_embedding_was_built_from():
  p, d, rng = 97, 32, np.random.default_rng(0)
  x = np.arange(p)[:, None]
  w_PxD = sum(np.cos(2 * np.pi * k * x / p + rng.uniform(0, 2 * np.pi, d)) * rng.normal(size=d)
              for k in (3, 17, 40)) + 0.01 * rng.normal(size=(p, d))
  norms = fourier.frequency_norms(w_PxD)
  assert len(norms) == p // 2 + 1
  np.testing.assert_allclose(np.sum(np.asarray(norms) ** 2), np.sum(w_PxD ** 2), rtol=1e-4)
  assert sorted(fourier.key_frequencies(norms, 3)) == [3, 17, 40]
  assert float(fourier.top_k_fraction(norms, 3)) > 0.99
  # Parseval for an even p, whose frequency p/2 has a cos and no sin.
  w = rng.normal(size=(10, 4))
  np.testing.assert_allclose(np.sum(np.asarray(fourier.frequency_norms(w)) ** 2), np.sum(w ** 2),
                             rtol=1e-5)
  random_norms = fourier.frequency_norms(rng.normal(size=(p, d)))
  assert float(fourier.top_k_fraction(random_norms, 3)) < 0.2


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
  """A gpt_shakespeare:tiny run trained on a small local text file."""
  root = tmp_path_factory.mktemp("interpret")
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether"]
  (root / "text.txt").write_text(" ".join(rng.choice(words, 2000)) + "\n")
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={root / 'run'}", "--config.progress_bar=false", "--config.steps=10",
      f"--config.data.text_file={root / 'text.txt'}"])
  loop.train(experiments.load("gpt_shakespeare").build(config), config,
             experiment="gpt_shakespeare:tiny")
  return root / "run"


def test_interpret_command_writes_attention_maps_and_head_scores(char_run, capsys):
  # The run's saved tokenizer reads --text: the corpus it was fit on is not needed.
  (char_run.parent / "text.txt").rename(char_run.parent / "moved.txt")
  assert cli.main(["attention", "--workdir", str(char_run), "--text", "to be or not"]) == 0
  assert cli.main(["heads", "--workdir", str(char_run), "--batch", "8"]) == 0
  out = char_run / "interpret"
  for name in ("attention_layer0.png", "attention_layer1.png", "heads.png",
               "attention_repeated_layer1.png"):
    assert (out / name).stat().st_size > 1000, name
  head_scores = json.loads((out / "heads.json").read_text())
  assert np.shape(head_scores["induction"]) == (2, 2)
  assert cli.main(["attention", "--workdir", str(char_run), "--text", "XYZ"]) == 2
  assert "not in the vocabulary" in capsys.readouterr().err
