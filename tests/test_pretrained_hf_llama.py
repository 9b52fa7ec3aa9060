"""Llama-family Hugging Face safetensors folders (research.pretrained.hf_gpt: `llama`, `qwen2`)
in this codebase's GPT, against `transformers` loading the same folder.

Tiny random `LlamaForCausalLM` / `Qwen2ForCausalLM` folders are made here with `transformers`
and `save_pretrained` (GQA, RoPE theta 50k, tied or untied head, biases), with the tiny
byte-level BPE of tests/pretrained_helpers.py. `transformers` and `torch` (CPU) are
test-only dependencies.
"""

import dataclasses
import json
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
    copy_folder, decode_stepwise, edit_tensors, make_tiny_lm, one_line_error, ref_greedy,
    ref_logits, reference, until_eos)
from research.models.gpt import GPT, GPTConfig  # noqa: E402
from research.models.sampling import generate  # noqa: E402
from research.pretrained import hf, hf_gpt  # noqa: E402
from research.pretrained import tensors as tensors_lib  # noqa: E402

CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
MODELS = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}
# Llama 3.1's RoPE scaling, its bands placed so that the head size of 8 has frequencies in
# all three: wavelengths 6.3 (< 200/25: kept), 94 (between: blended), 1.4k and 20k (> 200/1:
# slowed down 8 times).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 25.0,
               "original_max_position_embeddings": 200}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 50_000.0, "factor": 4.0}


def make_tiny(folder: Path, family: str = "llama", *, seed: int = 0, tokenizer: bool = True,
              **overrides) -> Path:
  """A random Llama (or Qwen2) folder with grouped-query attention (4 query heads, 2 kv
  heads; `pretrained_helpers.make_tiny_lm`)."""
  return make_tiny_lm(folder, MODELS[family], CONFIGS[family], {
      "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
      "rope_theta": 50_000.0, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0,
      "tie_word_embeddings": False, **overrides}, seed=seed, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"rope_parameters": LINEAR_ROPE}),
    ("qwen2", {}),
])
def test_tiny_folder_matches_transformers_and_its_kv_cache(tmp_path, family, overrides):
  folder = make_tiny(tmp_path / family, family, tokenizer=False, seed=len(overrides), **overrides)
  model = hf_gpt.from_pretrained(folder)
  cfg = model.cfg
  assert (cfg.position, cfg.norm, cfg.mlp_activation, cfg.rope_theta, cfg.num_kv_heads,
          cfg.norm_eps) == ("rope", "rmsnorm", "swiglu", 50_000.0, 2, 1e-5)
  assert cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
  assert (cfg.use_bias, cfg.qkv_bias) == (bool(overrides.get("mlp_bias")), family == "qwen2")
  assert cfg.rope_scaling == {
      "llama3": ("llama3", 8.0, 1.0, 25.0, 200.0), "linear": ("divisors", 4.0, 4.0, 4.0, 4.0),
      None: ()}[overrides.get("rope_parameters", {}).get("rope_type")]
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
  ours = np.asarray(model(jnp.asarray(ids)))
  expected = ref_logits(reference(folder), ids)
  assert np.abs(expected).max() > 2
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(decode_stepwise(model, ids, 10), ours, atol=1e-5, rtol=0)


def test_bfloat16_sharded_folder_reads_as_float32(tmp_path):
  """Real Llama checkpoints are bfloat16 and often sharded (model.safetensors.index.json)."""
  folder = make_tiny(tmp_path / "src", tokenizer=False, seed=3)
  transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(
      tmp_path / "bf16", max_shard_size="20KB")
  assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
  model = hf_gpt.from_pretrained(tmp_path / "bf16")
  assert model.embed.embedding.value.dtype == jnp.float32
  ids = np.random.default_rng(4).integers(0, model.cfg.vocab_size, (1, 12))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))),
                             ref_logits(reference(tmp_path / "bf16"), ids), atol=1e-5, rtol=0)


def test_tokenizer_pads_with_the_end_of_text_when_config_names_no_pad(tiny, tmp_path):
  folder = copy_folder(tiny, tmp_path / "eos", pad_token_id=None, eos_token_id=[7, 0])
  assert hf.load_tokenizer(folder).pad_id == 7  # HFTokenizer.decode drops the pad id


def test_greedy_ids_equal_transformers_generate(tiny):
  prompt = [5, 17, 42, 99, 7]
  expected = ref_greedy(reference(tiny), prompt, 20)
  model = hf_gpt.from_pretrained(tiny, max_context=len(prompt) + 20)
  assert model.cfg.block_size == 25
  out = generate(model, jnp.asarray([prompt]), 20, key=jax.random.key(0), temperature=0.0)
  assert until_eos([int(i) for i in out[0, len(prompt):]]) == expected
  assert len(expected) > 5


def test_export_loads_in_transformers_with_the_same_logits(tiny, tmp_path):
  model = hf_gpt.from_pretrained(tiny)
  out = hf_gpt.export(model, tmp_path / "export", hf.load_tokenizer(tiny))
  exported = reference(out)
  assert type(exported).__name__ == "LlamaForCausalLM"
  ids = np.random.default_rng(2).integers(0, model.cfg.vocab_size, (2, 16))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref_logits(exported, ids),
                             atol=1e-5, rtol=0)
  again = hf_gpt.from_pretrained(out)
  for name, value in hf_gpt.hf_tensors(again).items():
    np.testing.assert_array_equal(value, hf_gpt.hf_tensors(model)[name])
  text = "Café -- the thin man's 東京 😀\n\n  x"
  assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == hf.load_tokenizer(
      tiny).encode(text)


@pytest.mark.parametrize("qkv_bias, rope_scaling", [
    (False, ("llama3", 8.0, 1.0, 25.0, 200.0)), (False, ("divisors", 3.0, 3.0, 3.0, 3.0)),
    (True, ())])
def test_a_gpt_made_here_exports_as_llama_or_qwen2(tmp_path, qkv_bias, rope_scaling):
  cfg = GPTConfig(vocab_size=70, block_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                  embed_dim=32, mlp_dim=40, position="rope", rope_theta=1000.0, norm="rmsnorm",
                  mlp_activation="swiglu", tie_embeddings=qkv_bias, qkv_bias=qkv_bias,
                  rope_scaling=rope_scaling)
  model = GPT(cfg, rngs=nnx.Rngs(4))
  if qkv_bias:  # random, not the zeros they start at
    for block in model.blocks:
      block.attn.qkv.bias.value = jax.random.normal(jax.random.key(5), block.attn.qkv.bias.shape)
  out = hf_gpt.export(model, tmp_path / "export")
  exported = reference(out)
  assert type(exported).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
  ids = np.random.default_rng(3).integers(0, 70, (2, 24))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref_logits(exported, ids),
                             atol=1e-5, rtol=0)


def test_rope_scaling_transformers_cannot_express_is_refused(tmp_path):
  cfg = GPTConfig(vocab_size=70, block_size=24, num_layers=1, num_heads=4, embed_dim=32,
                  position="rope", norm="rmsnorm", mlp_activation="swiglu",
                  rope_scaling=("divisors", 1.0, 1.5, 3.0, 8.0))
  one_line_error("cannot express this GPT's RoPE frequency divisors", hf_gpt.export,
                 GPT(cfg, rngs=nnx.Rngs(0)), tmp_path / "export")
  with pytest.raises(ValueError, match=r"rope_scaling=\('divisors', 2.0\): expected"):
    GPT(dataclasses.replace(cfg, rope_scaling=("divisors", 2.0)), rngs=nnx.Rngs(0))


def test_sample_command_on_a_llama_folder(tiny, capsys):
  argv = ["sample", f"--init_from={tiny}", "--prompt=the lazy dog", "--max_new_tokens=10",
          "--json"]
  assert cli.main(argv) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["prompt_ids"] == hf.load_tokenizer(tiny).encode("the lazy dog")
  assert out["generated_ids"] == ref_greedy(reference(tiny), out["prompt_ids"], 10)
  assert cli.main(argv + ["--temperature=1.0", "--top_k=5", "--seed=3"]) == 0
  sampled = json.loads(capsys.readouterr().out)
  assert all(0 <= i < hf_gpt.from_pretrained(tiny).cfg.vocab_size
             for i in sampled["generated_ids"])


def test_bad_folders_are_one_line_errors(tiny, tmp_path, monkeypatch, capsys):
  def copy(name, **config_changes):
    return copy_folder(tiny, tmp_path / name, **config_changes)

  one_line_error(r"llama config fields this GPT cannot represent: rope_parameters.rope_type="
                 r"'dynamic' \(supported: 'default', 'llama3', 'linear'\)",
                 hf_gpt.from_pretrained,
                 copy("dynamic", rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5,
                                                  "factor": 8.0}))
  one_line_error(r"rope_parameters of rope_type 'llama3' without low_freq_factor, "
                 r"high_freq_factor, original_max_position_embeddings", hf_gpt.from_pretrained,
                 copy("llama3", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                 "factor": 8.0}))
  one_line_error(r"rope_scaling.rope_type='yarn'", hf_gpt.from_pretrained,
                 copy("yarn", rope_scaling={"type": "yarn", "factor": 4.0}))
  one_line_error(r"cannot represent: hidden_act='gelu' \(supported: 'silu'\); head_dim=16 "
                 r"\(supported: hidden_size / num_attention_heads = 8\); attention_bias=True "
                 r"with mlp_bias=False", hf_gpt.from_pretrained,
                 copy("fields", hidden_act="gelu", head_dim=16, attention_bias=True))
  one_line_error(r"qwen2 config fields .* use_sliding_window=True", hf_gpt.from_pretrained,
                 make_tiny(tmp_path / "qwen", "qwen2", tokenizer=False, use_sliding_window=True))
  one_line_error(r"layers.0.mlp.gate_proj.weight \[48, 32\] does not fit "
                 r"blocks/0/mlp/gate/kernel \[32, 40\]", hf_gpt.from_pretrained,
                 copy("shape", intermediate_size=40))
  one_line_error("lacks the tensor lm_head.weight", hf_gpt.from_pretrained,
                 edit_tensors(copy("untie"), drop=["lm_head.weight"]))
  extra = edit_tensors(copy("extra"), add={
      "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
  one_line_error(r"has tensors this llama import does not read: "
                 r"layers.0.self_attn.q_proj.bias \(1\); is it a llama variant\?",
                 hf_gpt.from_pretrained, extra)
  sharded = copy("sharded")
  (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
  one_line_error("names files that are missing: model-00002-of-00002.safetensors",
                 hf_gpt.from_pretrained, sharded)
  monkeypatch.setattr(tensors_lib, "available_memory", lambda: 1000)
  one_line_error(r"needs about 0\.0 GiB to load as float32", hf_gpt.from_pretrained, tiny)
  capsys.readouterr()
  assert cli.main(["sample", f"--init_from={tmp_path / 'llama3'}", "--prompt=x"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1

