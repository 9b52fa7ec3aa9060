"""Hugging Face decoder-only folders (GPT-2, Llama, Qwen2) <-> `research.models.gpt.GPT`.

    model = from_pretrained(folder)                   # GPT with the checkpoint's weights
    model = from_pretrained(folder, max_context=256)  # a shorter KV cache for sampling
    tokenizer = hf.load_tokenizer(folder)             # byte-level BPE (tokenizer.json, or
                                                      # GPT-2's vocab.json + merges.txt)
    export(model, "out/", tokenizer)                  # transformers' AutoModelForCausalLM loads it

The folder is found as `research.pretrained.hf.resolve` finds it (a folder, or a Hub id when
online) and read by the same functions: `config.json`, `model.safetensors` (or a sharded
index), with the memory estimate before anything is allocated. `config.json`'s `model_type`
picks the family:
- `gpt2` (`GPT2LMHeadModel`): learned positions, LayerNorm with bias, tanh GELU, biases on
  every projection. Its Conv1D layers store weights [in, out], as Flax's kernels are, so
  they copy as they are; the fused `c_attn` is the GPT's fused `qkv`.
- `llama` (`LlamaForCausalLM`) and `qwen2`: RoPE with the checkpoint's theta (half-split
  pairs, as this GPT rotates them) and Llama 3.1's scaling (`rope_type: llama3`), RMSNorm,
  SwiGLU, grouped-query attention, tied or untied head; q, k and v concatenate into `qkv`;
  Qwen2's q/k/v biases are `GPTConfig.qkv_bias`.
Fields the GPT cannot represent (other RoPE scaling types, a head size other than hidden /
heads, sliding windows, exact-erf GELU, ...) are refused by name; every parameter must be
found with its shape and every tensor read (GPT-2's causal-mask buffers and a tied
`lm_head.weight` aside). Every failure is a one-line `ConfigError`.

`export` writes the inverse: a GPT with learned positions, LayerNorm and GELU as a GPT-2
folder (zero biases where the GPT has none: the same function), one with RoPE, RMSNorm and
SwiGLU as a Llama (or Qwen2, with q/k/v biases alone) folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from research.config import ConfigError
from research.models.gpt import GPT, GPTConfig
from research.pretrained import hf
from research.pretrained import tensors as tensors_lib

FAMILIES = ("gpt2", "llama", "qwen2")  # config.json model_type values this import reads
# GPT-2's activation_function values that are the tanh approximation this GPT's "gelu" is.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Tensors that are not parameters: GPT-2's causal-mask buffers, RoPE's cached frequencies.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model."}


def _rope(hf_cfg: dict, head_dim: int, bad: list[str]) -> tuple[float, tuple]:
  """RoPE's theta and `GPTConfig.rope_scaling`: Llama 3.1's scaling, linear scaling (every
  frequency divided by `factor`), or none; other scaling types are refused."""
  params = hf_cfg.get("rope_parameters") or {}  # transformers >= 5; older files: rope_*
  old_style = hf_cfg.get("rope_scaling") or {}
  scaling = ()
  for field, value in (("rope_parameters", params), ("rope_scaling", old_style)):
    kind = value.get("rope_type", value.get("type", "default"))
    keys = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"), "linear": ("factor",)}.get(kind)
    if keys is None:
      if kind not in ("default", None):
        bad.append(f"{field}.rope_type={kind!r} (supported: 'default', 'llama3', 'linear')")
      continue
    missing = [k for k in keys if value.get(k) is None]
    if missing:
      bad.append(f"{field} of rope_type {kind!r} without {', '.join(missing)}")
    elif kind == "llama3":
      scaling = ("llama3", *(float(value[k]) for k in keys))
    else:
      scaling = ("divisors",) + (float(value["factor"]),) * (head_dim // 2)
  partial = hf_cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    bad.append(f"partial_rotary_factor={partial!r} (supported: 1.0)")
  return float(params.get("rope_theta", hf_cfg.get("rope_theta", 10_000.0))), scaling


def gpt_config(hf_cfg: dict, **overrides) -> GPTConfig:
  """The GPTConfig of a GPT-2, Llama or Qwen2 config.json's content; what the GPT cannot hold
  is a ConfigError naming the fields. `overrides` set what config.json does not describe
  (attention, dtype, dropout for fine-tuning, a shorter block_size)."""
  family = hf_cfg.get("model_type")
  if family not in FAMILIES:
    raise ConfigError(f"config.json says model_type={family!r}: not a decoder-only language "
                      f"model this import reads ({', '.join(FAMILIES)})"
                      + ("; BERT folders load with research.pretrained.hf.from_pretrained"
                         if family == "bert" else ""))
  bad = []
  if family == "gpt2":
    bad += hf.unsupported_values(hf_cfg, {"activation_function": TANH_GELUS,
                                          "scale_attn_weights": (True,),
                                          "scale_attn_by_inverse_layer_idx": (False,),
                                          "add_cross_attention": (False,)})
    get = hf_cfg.get
    values = dict(
        vocab_size=get("vocab_size"), block_size=get("n_positions"), num_layers=get("n_layer"),
        num_heads=get("n_head"), embed_dim=get("n_embd"),
        mlp_dim=get("n_inner") or 4 * (get("n_embd") or 0), mlp_activation="gelu",
        use_bias=True, position="learned", norm="layernorm",
        norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(get("tie_word_embeddings", True)))
  else:
    hidden, heads = hf_cfg.get("hidden_size"), hf_cfg.get("num_attention_heads")
    bad += hf.unsupported_values(hf_cfg, {"hidden_act": ("silu",), "pretraining_tp": (1,),
                                          "use_sliding_window": (False,)})
    if hf_cfg.get("head_dim") not in (None, (hidden or 0) // (heads or 1)):
      bad.append(f"head_dim={hf_cfg['head_dim']!r} (supported: hidden_size / "
                 f"num_attention_heads = {(hidden or 0) // (heads or 1)})")
    theta, rope_scaling = _rope(hf_cfg, (hidden or 0) // (heads or 1), bad)
    if family == "llama":
      # The GPT's use_bias puts biases on all projections: q/k/v/o and the MLP together.
      attention_bias, mlp_bias = (bool(hf_cfg.get(k, False)) for k in ("attention_bias",
                                                                       "mlp_bias"))
      if attention_bias != mlp_bias:
        bad.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (supported: "
                   f"both or neither)")
      use_bias, qkv_bias = attention_bias, False
    else:  # Qwen2: q/k/v biases alone, always
      use_bias, qkv_bias = False, True
    values = dict(
        vocab_size=hf_cfg.get("vocab_size"), block_size=hf_cfg.get("max_position_embeddings"),
        num_layers=hf_cfg.get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf_cfg.get("num_key_value_heads") or heads, embed_dim=hidden,
        mlp_dim=hf_cfg.get("intermediate_size"), mlp_activation="swiglu", use_bias=use_bias,
        qkv_bias=qkv_bias, position="rope", rope_theta=theta, rope_scaling=rope_scaling,
        norm="rmsnorm", norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)))
  if bad:
    raise ConfigError(f"{family} config fields this GPT cannot represent: {'; '.join(bad)}")
  missing = [k for k, v in values.items() if v is None]
  if missing:
    raise ConfigError(f"{family} config.json lacks the fields for {', '.join(missing)}")
  values.update(overrides)
  try:
    cfg = GPTConfig(**values)
    nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # the GPT's own checks (divisibility)
    return cfg
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{family} config: {e}") from None


# --- the name map: (hf names without the family's prefix, our path, how) ---

def _name_map(family: str, cfg: GPTConfig) -> list[tensors_lib.Entry]:
  """`copy`: as is; `linear`: [out, in] -> kernel [in, out]; `qkv`: q, k, v weights -> the
  fused kernel; `cat`: their biases concatenated; `pos`: the first block_size positions."""
  entries = []
  if family == "gpt2":
    entries += [(("wte.weight",), ("embed", "embedding"), "copy"),
                (("wpe.weight",), ("pos_embed", "embedding"), "pos"),
                (("ln_f.weight",), ("norm", "scale"), "copy"),
                (("ln_f.bias",), ("norm", "bias"), "copy")]
    for i in range(cfg.num_layers):
      p, b = f"h.{i}.", ("blocks", i)
      for theirs, ours in (("ln_1", ("norm1",)), ("ln_2", ("norm2",))):
        entries += [((p + theirs + ".weight",), b + ours + ("scale",), "copy"),
                    ((p + theirs + ".bias",), b + ours + ("bias",), "copy")]
      # Conv1D weights are [in, out] already.
      for theirs, ours in (("attn.c_attn", ("attn", "qkv")), ("attn.c_proj", ("attn", "out")),
                           ("mlp.c_fc", ("mlp", "up")), ("mlp.c_proj", ("mlp", "down"))):
        entries += [((p + theirs + ".weight",), b + ours + ("kernel",), "copy"),
                    ((p + theirs + ".bias",), b + ours + ("bias",), "copy")]
  else:
    entries += [(("embed_tokens.weight",), ("embed", "embedding"), "copy"),
                (("norm.weight",), ("norm", "scale"), "copy")]
    for i in range(cfg.num_layers):
      p, b = f"layers.{i}.", ("blocks", i)
      qkv = tuple(f"{p}self_attn.{n}_proj" for n in "qkv")
      entries += [
          ((p + "input_layernorm.weight",), b + ("norm1", "scale"), "copy"),
          ((p + "post_attention_layernorm.weight",), b + ("norm2", "scale"), "copy"),
          (tuple(n + ".weight" for n in qkv), b + ("attn", "qkv", "kernel"), "qkv")]
      if cfg.use_bias or cfg.qkv_bias:
        entries.append((tuple(n + ".bias" for n in qkv), b + ("attn", "qkv", "bias"), "cat"))
      for theirs, ours in (("self_attn.o_proj", ("attn", "out")),
                           ("mlp.gate_proj", ("mlp", "gate")), ("mlp.up_proj", ("mlp", "up")),
                           ("mlp.down_proj", ("mlp", "down"))):
        entries.append(((p + theirs + ".weight",), b + ours + ("kernel",), "linear"))
        if cfg.use_bias:
          entries.append(((p + theirs + ".bias",), b + ours + ("bias",), "copy"))
  if not cfg.tie_embeddings:
    entries.append((("lm_head.weight",), ("head", "kernel"), "linear"))
  return entries


def _strip_prefix(family: str, tensors: dict) -> dict:
  """The names without `transformer.` / `model.` (a GPT2Model / LlamaModel folder has none)."""
  prefix = PREFIX[family]
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def gpt_params(tensors: dict[str, np.ndarray], family: str, cfg: GPTConfig,
               where: str = "checkpoint") -> dict:
  """The pure parameter dict of `GPT(cfg)` from a `family` folder's tensors, shapes checked."""
  def convert(how, arrays):
    if how == "qkv":
      return np.concatenate([a.T for a in arrays], axis=1) if all(
          a.ndim == 2 and a.shape[1] == arrays[0].shape[1] for a in arrays) else None
    if how == "cat":
      return np.concatenate(arrays)
    if how == "pos":  # a shorter context keeps the first positions
      return arrays[0][:cfg.block_size]
    return arrays[0].T if how == "linear" else arrays[0]

  return tensors_lib.assemble(
      _strip_prefix(family, tensors), _name_map(family, cfg), tensors_lib.param_shapes(GPT, cfg),
      convert, where=where,
      needed_by=f"a {family} with {cfg.num_layers} layers", reader=f"{family} import",
      source="config.json", unread_hint=f"is it a {family} variant?",
      ignore=lambda k: k.endswith(BUFFER_SUFFIXES) or (k == "lm_head.weight"
                                                       and cfg.tie_embeddings))


def from_pretrained(name_or_path: str | os.PathLike, *, max_context: int | None = None,
                    **overrides) -> GPT:
  """A `GPT` holding a GPT-2, Llama or Qwen2 folder's weights (float32). `max_context` bounds
  block_size (the KV cache's length; GPT-2 keeps its first positions); `overrides` replace
  config fields (`dtype`, `attention`, `dropout`, ...)."""
  folder = hf.resolve(name_or_path)
  hf_cfg = hf.read_config(folder)
  cfg = gpt_config(hf_cfg, **overrides)
  if max_context is not None and max_context < cfg.block_size:
    cfg = dataclasses.replace(cfg, block_size=max_context)
  return tensors_lib.build(GPT, cfg, gpt_params(hf.read_tensors(folder), hf_cfg["model_type"],
                                                cfg, where=str(folder)))


# --- export ---

def family_of(cfg: GPTConfig) -> str:
  """The Hugging Face family that computes what `GPT(cfg)` computes, or a ConfigError naming
  the fields that neither GPT-2 nor Llama has."""
  gpt2 = dict(position="learned", norm="layernorm", mlp_activation="gelu")
  llama = dict(position="rope", norm="rmsnorm", mlp_activation="swiglu")
  common = [f"{k}={getattr(cfg, k)!r} (supported: {v!r})" for k, v in
            (("qk_norm", False), ("logit_softcap", 0.0)) if getattr(cfg, k) != v]
  if not cfg.mlp_dim and not cfg.mlp_ratio:
    common.append("mlp_ratio=0 (supported: an MLP in every block)")
  for family, want in (("gpt2", gpt2), ("llama", llama)):
    if cfg.position == want["position"]:
      bad = common + [f"{k}={getattr(cfg, k)!r} (supported with position={want['position']!r}: "
                      f"{v!r})" for k, v in want.items() if getattr(cfg, k) != v]
      if family == "gpt2" and cfg.num_kv_heads not in (0, cfg.num_heads):
        bad.append(f"num_kv_heads={cfg.num_kv_heads} (supported in GPT-2: one per query head)")
      if bad:
        raise ConfigError(f"this GPT has no Hugging Face {family} equivalent: {'; '.join(bad)}")
      return "qwen2" if family == "llama" and cfg.qkv_bias and not cfg.use_bias else family
  raise ConfigError(f"this GPT has no Hugging Face equivalent: position={cfg.position!r}")


def hf_config(cfg: GPTConfig, tokenizer=None) -> dict:
  """config.json for `cfg`: a model `transformers` builds identically (dropout off)."""
  family = family_of(cfg)
  mlp_dim = cfg.mlp_dim or cfg.mlp_ratio * cfg.embed_dim
  special = {}
  if tokenizer is not None:
    side = json.loads(tokenizer.side_files.get("tokenizer_config.json", "{}"))
    for key in ("bos", "eos", "pad"):
      token = side.get(f"{key}_token")
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None and tokenizer.token_to_id(token) is not None:
        special[f"{key}_token_id"] = tokenizer.token_to_id(token)
  if family == "gpt2":
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
            "n_embd": cfg.embed_dim, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": mlp_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None,
            "eos_token_id": None, **special}
  out = {"architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
         "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
         "intermediate_size": mlp_dim, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
         "head_dim": cfg.embed_dim // cfg.num_heads, "hidden_act": "silu",
         "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "rope_parameters": _rope_parameters(cfg),
         "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
         "bos_token_id": None, "eos_token_id": None, **special}
  if family == "llama":
    out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def _rope_parameters(cfg: GPTConfig) -> dict:
  if not cfg.rope_scaling:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}
  kind, *values = cfg.rope_scaling
  if kind == "llama3":
    factor, low, high, context = values
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": int(context)}
  if len(set(values)) == 1:  # every frequency divided alike: linear position scaling
    return {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": values[0]}
  raise ConfigError("a Hugging Face config cannot express this GPT's RoPE frequency divisors "
                    "(a GGUF rope_freqs tensor that is not one factor for all)")


def hf_tensors(model: GPT) -> dict[str, np.ndarray]:
  """The folder's float32 tensors for `model` (the inverse of `gpt_params`); a GPT-2 export
  of a GPT without biases writes zero biases."""
  family, cfg = family_of(model.cfg), model.cfg
  params = nnx.state(model, nnx.Param).to_pure_dict()
  if family == "gpt2" and not cfg.use_bias:
    full = dataclasses.replace(cfg, use_bias=True)
    want = tensors_lib.param_shapes(GPT, full)
    filled = {}
    for _, path, _ in _name_map(family, full):
      try:
        value = tensors_lib.get_path(params, path)
      except KeyError:
        value = np.zeros(tensors_lib.get_path(want, path).shape, np.float32)
      tensors_lib.set_path(filled, path, value)
    params, cfg = filled, full
  q = cfg.embed_dim
  kv = (cfg.num_kv_heads or cfg.num_heads) * (cfg.embed_dim // cfg.num_heads)
  out = {}
  for names, path, how in _name_map(family, cfg):
    value = np.asarray(tensors_lib.get_path(params, path), np.float32)
    if how == "linear":
      parts = [value.T]
    elif how == "qkv":
      parts = [p.T for p in np.split(value, [q, q + kv], axis=1)]
    elif how == "cat":
      parts = np.split(value, [q, q + kv])
    else:
      parts = [value]
    for name, part in zip(names, parts):
      full_name = name if name.startswith("lm_head.") else PREFIX[family] + name
      out[full_name] = np.ascontiguousarray(part)
  return out


def export(model: GPT, folder: str | Path, tokenizer=None) -> Path:
  """Writes `model` as a Hugging Face GPT-2 / Llama / Qwen2 folder: config.json,
  model.safetensors, and the tokenizer's files if given (`research.data.hf_tokenizer`)."""
  from safetensors.numpy import save_file

  config = hf_config(model.cfg, tokenizer)  # refuses a GPT no family computes, before writing
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  save_file(hf_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.export(folder)
    if "tokenizer_config.json" not in tokenizer.side_files:  # else transformers picks the
      # family's own tokenizer class, which may rebuild the pre-tokenizer its own way
      (folder / "tokenizer_config.json").write_text(json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
  return folder


__all__ = ["FAMILIES", "export", "family_of", "from_pretrained", "gpt_config", "gpt_params",
           "hf_config", "hf_tensors"]
