"""GPT-2-format Hugging Face folders (research.pretrained.hf_gpt) in this codebase's GPT, against
`transformers` loading the same folder.

No GPT-2 weights or vocabulary exist offline, so tiny random `GPT2LMHeadModel`s are made here
with `transformers` and `save_pretrained`, beside a tiny byte-level BPE that `tokenizers`
trains here (tokenizer.json, and GPT-2's vocab.json + merges.txt; tests/pretrained_helpers.py).
`transformers` and `torch` (CPU) are test-only dependencies.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments import __main__ as cli  # noqa: E402
from pretrained_helpers import (  # noqa: E402
    EOS, TOKENIZER_TEXTS as SHARED_TEXTS, copy_folder, decode_stepwise, edit_tensors,
    make_tiny_lm, one_line_error, ref_greedy, ref_logits, reference, until_eos)
from research.models.gpt import GPT, GPTConfig  # noqa: E402
from research.models.sampling import generate  # noqa: E402
from research.pretrained import hf, hf_gpt  # noqa: E402
from research.pretrained import tensors as tensors_lib  # noqa: E402

TOKENIZER_TEXTS = [*SHARED_TEXTS, f"one{EOS}two {EOS} three"]  # the special token kept whole


def make_tiny_gpt2(folder: Path, *, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
  """A random GPT2LMHeadModel folder (`pretrained_helpers.make_tiny_lm`)."""
  return make_tiny_lm(folder, transformers.GPT2LMHeadModel, transformers.GPT2Config, {
      "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48,
      "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.3, **overrides},
      seed=seed, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gpt2_matches_transformers_and_its_kv_cache(tmp_path, tied):
  folder = make_tiny_gpt2(tmp_path / "gpt2", seed=int(not tied), tokenizer=False,
                          tie_word_embeddings=tied)
  model = hf_gpt.from_pretrained(folder)
  assert isinstance(model, GPT) and model.cfg.tie_embeddings == tied
  assert (model.cfg.position, model.cfg.norm, model.cfg.mlp_activation, model.cfg.use_bias,
          model.cfg.norm_eps, model.cfg.mlp_dim) == ("learned", "layernorm", "gelu", True, 1e-5, 48)
  ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 24))
  ours = np.asarray(model(jnp.asarray(ids)))
  expected = ref_logits(reference(folder), ids)
  assert np.abs(expected).max() > 2  # logits that a layout mistake would move
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(decode_stepwise(model, ids, 10), ours, atol=1e-5, rtol=1e-5)


def test_greedy_ids_equal_transformers_generate(tiny):
  prompt = [5, 17, 42, 99, 7]
  expected = ref_greedy(reference(tiny), prompt, 20)
  for max_context in (None, len(prompt) + 20):  # a shorter context keeps the first positions
    model = hf_gpt.from_pretrained(tiny, max_context=max_context)
    out = generate(model, jnp.asarray([prompt]), 20, key=jax.random.key(0), temperature=0.0)
    assert until_eos([int(i) for i in out[0, len(prompt):]]) == expected
  assert len(expected) > 5  # enough steps before any end-of-text to be a check


def test_gpt2_tokenizer_matches_transformers(tiny, tmp_path):
  ours, reference = hf.load_tokenizer(tiny), transformers.AutoTokenizer.from_pretrained(tiny)
  # GPT-2's slow-tokenizer files alone: vocab.json + merges.txt (+ tokenizer_config.json).
  slow = tmp_path / "slow"
  slow.mkdir()
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "config.json"):
    shutil.copy(tiny / name, slow / name)
  ours_slow = hf.load_tokenizer(slow)
  reference_slow = transformers.GPT2Tokenizer.from_pretrained(slow)
  assert len(reference_slow) == len(reference) == ours_slow.vocab_size
  merged = False
  for text in TOKENIZER_TEXTS:
    ids = ours.encode(text)
    assert ids == reference(text).input_ids, text
    assert ours_slow.encode(text) == ids == reference_slow(text).input_ids, text
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    if EOS not in text:
      assert ours.decode(ids) == text  # byte-level: lossless
    merged |= len(ids) < len(text.encode())
  assert merged and ours.encode(EOS) == [0]


def test_export_loads_in_transformers_with_the_same_logits(tiny, tmp_path):
  model = hf_gpt.from_pretrained(tiny)
  out = hf_gpt.export(model, tmp_path / "export", hf.load_tokenizer(tiny))
  ids = np.random.default_rng(2).integers(0, model.cfg.vocab_size, (2, 16))
  exported = reference(out)
  assert type(exported).__name__ == "GPT2LMHeadModel"
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref_logits(exported, ids),
                             atol=1e-5, rtol=1e-5)
  again = hf_gpt.from_pretrained(out)  # ... and back: the same tensors, bit for bit
  for name, value in hf_gpt.hf_tensors(again).items():
    np.testing.assert_array_equal(value, hf_gpt.hf_tensors(model)[name])
  exported_tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in TOKENIZER_TEXTS:
    assert exported_tok(text).input_ids == hf.load_tokenizer(tiny).encode(text), text


def test_a_gpt_trained_here_exports_as_gpt2(tmp_path):
  """This project's default GPT (learned positions, LayerNorm and Linear layers without
  biases, tied head) is a GPT-2 with zero biases; an untied one keeps its head."""
  for tied in (True, False):
    cfg = GPTConfig(vocab_size=70, block_size=24, num_layers=2, num_heads=2, embed_dim=16,
                    norm_eps=1e-5, tie_embeddings=tied)
    model = GPT(cfg, rngs=nnx.Rngs(3))
    out = hf_gpt.export(model, tmp_path / f"tied{tied}")
    ids = np.random.default_rng(3).integers(0, 70, (2, 24))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))),
                               ref_logits(reference(out), ids), atol=1e-5, rtol=1e-5)


def test_sample_command_on_a_gpt2_folder(tiny, tmp_path, capsys):
  argv = ["sample", f"--init_from={tiny}", "--prompt=the quick", "--max_new_tokens=12", "--json"]
  assert cli.main(argv) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["prompt_ids"] == hf.load_tokenizer(tiny).encode("the quick")
  expected = ref_greedy(reference(tiny), out["prompt_ids"], 12)
  assert out["generated_ids"] == expected
  assert out["text"] == hf.load_tokenizer(tiny).decode(out["generated_ids"])
  # Generation stops after config.json's eos_token_id: here a token the greedy answer reaches.
  stop = next(i for i in range(2, 12) if expected[i] not in expected[:i])
  folder = copy_folder(tiny, tmp_path / "eos", eos_token_id=expected[stop])
  assert cli.main(["sample", f"--init_from={folder}", *argv[2:]]) == 0
  assert json.loads(capsys.readouterr().out)["generated_ids"] == expected[:stop + 1]


def test_bad_folders_are_one_line_errors(tiny, tmp_path, monkeypatch, capsys):
  def copy(name, **config_changes):
    return copy_folder(tiny, tmp_path / name, **config_changes)

  bert = tmp_path / "bert"
  transformers.BertModel(transformers.BertConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=20)).save_pretrained(bert)
  one_line_error("model_type='bert': not a decoder-only language model .* BERT folders load "
                 "with research.pretrained.hf.from_pretrained", hf_gpt.from_pretrained, bert)
  one_line_error("model_type='gpt2': not a BERT checkpoint", hf.from_pretrained, tiny)
  one_line_error("has no config.json", hf_gpt.from_pretrained, tmp_path)
  no_weights = copy("no_weights")
  (no_weights / "model.safetensors").unlink()
  one_line_error("has no model.safetensors", hf_gpt.from_pretrained, no_weights)
  one_line_error(r"h.0.mlp.c_fc.weight \[32, 48\] does not fit blocks/0/mlp/up/kernel "
                 r"\[32, 40\] \(config.json and the weights disagree\)", hf_gpt.from_pretrained,
                 copy("shape", n_inner=40))
  one_line_error("lacks the tensor h.1.ln_2.bias", hf_gpt.from_pretrained,
                 edit_tensors(copy("missing"), drop=["transformer.h.1.ln_2.bias"]))
  one_line_error("lacks the tensor lm_head.weight", hf_gpt.from_pretrained,
                 copy("untied", tie_word_embeddings=False))
  one_line_error(r"gpt2 config fields this GPT cannot represent: activation_function='gelu' "
                 r"\(supported: 'gelu_new', .*; scale_attn_by_inverse_layer_idx=True",
                 hf_gpt.from_pretrained, copy("erf", activation_function="gelu",
                                             scale_attn_by_inverse_layer_idx=True))
  one_line_error("no Hugging Face gpt2 equivalent: qk_norm=True", hf_gpt.export,
                 GPT(GPTConfig(vocab_size=10, block_size=8, num_layers=1, embed_dim=16,
                               qk_norm=True), rngs=nnx.Rngs(0)), tmp_path / "x")
  one_line_error(r"no Hugging Face llama equivalent: norm='layernorm' \(supported with "
                 r"position='rope': 'rmsnorm'\)", hf_gpt.export,
                 GPT(GPTConfig(vocab_size=10, block_size=8, num_layers=1, embed_dim=16,
                               position="rope", mlp_activation="swiglu"),
                     rngs=nnx.Rngs(0)), tmp_path / "y")
  monkeypatch.setattr(tensors_lib, "available_memory", lambda: 1000)
  one_line_error(r"needs about 0\.0 GiB to load as float32", hf_gpt.from_pretrained, tiny)
  capsys.readouterr()
  assert cli.main(["sample", f"--init_from={bert}", "--prompt=x"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1
  assert "model_type='bert'" in err
