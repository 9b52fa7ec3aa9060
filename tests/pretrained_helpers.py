"""What tests/test_pretrained_*.py share: tokenizer-parity texts, one-line-error checks, copies
of a checkpoint folder with its config or tensors edited, step-by-step KV-cache decoding, and
tiny random `transformers` causal LMs beside a byte-level BPE trained here (no GPT-2 or Llama
vocabulary or weights exist offline). Imported after the test file's
`pytest.importorskip("torch")` and `("transformers")`.
"""

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = "<|endoftext|>"
# Texts whose token ids must equal `transformers`' tokenizer's; each file adds one with its
# checkpoint's special tokens, which must stay whole.
TOKENIZER_TEXTS = [
    # ASCII
    "Hello, world! It's 3:45pm -- isn't it?", "don't STOP (believing) #1 @home $5.00 a+b=c",
    "Numbers 12345 and 3.14159", "def f(x):\n    return x**2  # comment",
    # Unicode: accents, CJK, emoji, other scripts, NFD input
    "Café naïve résumé Ångström façade", "東京は日本の首都です。",
    "e\u0301te\u0301 (NFD)", "emoji 😀👍🏽 and ☃ snow", "Ελληνικά, русский, עברית, العربية",
    # whitespace-heavy
    "  leading and trailing  ", "tabs\tand\t\tnewlines\n\nand\r\nCRLF", "\u00a0nbsp\u2003em\u200b",
    "", "   ",
]
CORPUS = ["the quick brown fox jumps over the lazy dog; the end.",
          "It's the thin man in an inn -- don't stop 12345!",
          "Café naïve résumé 東京 😀", "    indented\n\tcode = x**2  # comment\n"]


def one_line_error(pattern, fn, *args, **kwargs):
  """`fn(*args, **kwargs)` raises a ConfigError of one line that `pattern` matches (re.search)."""
  with pytest.raises(ConfigError) as e:
    fn(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message and re.search(pattern, message), message


def copy_folder(folder: Path, dest: Path, **config_changes) -> Path:
  """A copy of the checkpoint `folder` at `dest`, its config.json updated by `config_changes`."""
  dest = Path(shutil.copytree(folder, dest))
  if config_changes:
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
  return dest


def edit_tensors(folder: Path, *, drop=(), add=None) -> Path:
  """`folder` with tensors of its model.safetensors dropped (names) or added ({name: array})."""
  from safetensors.numpy import load_file, save_file

  path = folder / "model.safetensors"
  tensors = {k: v for k, v in load_file(path).items() if k not in drop}
  save_file({**tensors, **(add or {})}, str(path))
  return folder


def decode_stepwise(model, ids_BxT: np.ndarray, prefill: int) -> np.ndarray:
  """The logits of `ids_BxT` through the model's KV cache: a prefill of `prefill` tokens, then
  one token per step."""
  cache = model.init_cache(ids_BxT.shape[0])
  logits, cache = model.decode(jnp.asarray(ids_BxT[:, :prefill]), cache, 0)
  steps = [np.asarray(logits)]
  for t in range(prefill, ids_BxT.shape[1]):
    logits, cache = model.decode(jnp.asarray(ids_BxT[:, t:t + 1]), cache, t)
    steps.append(np.asarray(logits))
  return np.concatenate(steps, axis=1)


def ref_logits(model, ids) -> np.ndarray:
  """A `transformers` causal LM's logits for the token ids `ids` [B, T]."""
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


# --- tiny random Hugging Face folders ---

def write_tiny_bpe(folder: Path, vocab_size: int = 300) -> int:
  """A GPT-2-style byte-level BPE trained here: tokenizer.json + tokenizer_config.json (as
  `transformers` saves a fast tokenizer) and GPT-2's vocab.json + merges.txt. Returns the
  vocabulary size; `<|endoftext|>` is id 0."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                 unk_token=EOS).save_pretrained(folder)
  tok.model.save(str(folder))  # vocab.json, merges.txt
  return tok.get_vocab_size()


def make_tiny_lm(folder: Path, model_cls, config_cls, fields: dict, *, seed: int,
                 tokenizer: bool) -> Path:
  """A random `model_cls(config_cls(**fields))` folder, with the tiny BPE's files when
  `tokenizer` (its size the vocabulary's; else 300 tokens). Every weight is perturbed, so norm
  scales and biases are not 1 and 0, the logits spread over several units and greedy answers
  do not just repeat one token."""
  folder.mkdir(parents=True, exist_ok=True)
  vocab = write_tiny_bpe(folder) if tokenizer else 300
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{"vocab_size": vocab, **fields})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(folder)
  return folder


def reference(folder):
  """`transformers`' model of the folder, float32."""
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ref_greedy(model, ids, n):
  """transformers' greedy continuation, stopping after the end-of-text token as it does."""
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  return out[0, len(ids):].tolist()


def until_eos(ids, eos=0):
  return ids[:ids.index(eos) + 1] if eos in ids else ids
