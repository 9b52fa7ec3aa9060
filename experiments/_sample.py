"""python -m experiments sample --init_from=NAME_OR_FILE_OR_RUN --prompt=TEXT [options]

Samples a continuation of `--prompt` from a language model: a pretrained GGUF checkpoint (a
file, or a known name such as `SmolLM2-135M-Instruct`, imported by `research.pretrained.gguf`
into this codebase's GPT), a Hugging Face GPT-2 / Llama / Qwen2 folder (config.json +
safetensors + tokenizer files; `research.pretrained.hf_gpt`) or the run folder of a
language-model experiment (`gpt_shakespeare`, `lstm_shakespeare`, ...;
`research.load.load_model`). Greedy at temperature 0 (the default);
the KV cache of `research.models.sampling.generate`. `--chat` wraps the prompt in the
checkpoint's chat template; generation stops at its end-of-sequence token. `--json` prints one
JSON object: the prompt, the token ids (prompt and generated) and the generated text.

    python -m experiments sample --init_from=SmolLM2-135M-Instruct \\
        --prompt="What is the capital of France?" --chat --max_new_tokens=32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.config import ConfigError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments sample",
      description="Samples a continuation of --prompt from a language model (greedy by default).")
  parser.add_argument("--init_from", "--pretrained", required=True,
                      help="a GGUF file, a known checkpoint name (SmolLM2-135M-Instruct), a "
                           "Hugging Face GPT-2/Llama folder or a run folder of a language-model "
                           "experiment")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
  parser.add_argument("--top_k", "--top-k", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true",
                      help="apply the checkpoint's chat template (one user turn)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  return parser


def _load(init_from: str, prompt: str, chat: bool, max_new_tokens: int):
  """(model, tokenizer, prompt ids, end-of-sequence id or None, the prompt as encoded)."""
  from research.load import MODEL_FILE
  from research.pretrained import gguf

  run = Path(init_from).expanduser()
  if run.is_dir() and (run / MODEL_FILE).is_file():
    from research.load import load_model

    if chat:
      raise ConfigError("--chat needs a checkpoint with a chat template; a run folder has none")
    model, tokenizer, _ = load_model(run)
    if tokenizer is None or not hasattr(model, "decode"):
      raise ConfigError(f"{run} is not a language-model run with a tokenizer")
    return model, tokenizer, [int(i) for i in tokenizer.encode(prompt)], None, prompt
  if run.is_dir():
    from research.pretrained import hf, hf_gpt

    config = hf.read_config(run) if (run / "config.json").is_file() else {}
    if "model_type" not in config:  # a Hugging Face folder's config.json names it
      raise ConfigError(f"{run} is not a run folder (no {MODEL_FILE})")
    hf_gpt.gpt_config(config)  # a wrong family is an error before the tokenizer is read
    tokenizer, eos = hf.load_tokenizer(run), hf.eos_token_id(config)
    load = lambda n: hf_gpt.from_pretrained(run, max_context=n)  # noqa: E731
  else:
    tokenizer = gguf.load_tokenizer(init_from)
    config = json.loads(tokenizer.side_files.get("tokenizer_config.json", "{}"))
    eos = tokenizer.token_to_id(config["eos_token"]) if config.get("eos_token") else None
    load = lambda n: gguf.from_gguf(init_from, max_context=n)  # noqa: E731
  text = gguf.chat_prompt(tokenizer, prompt) if chat else prompt
  ids = [int(i) for i in tokenizer.encode(text)]
  if not ids:
    raise ConfigError("the prompt encodes to no tokens")
  # The KV cache holds just what this prompt and its answer need.
  return load(len(ids) + max_new_tokens), tokenizer, ids, eos, text


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
    raise ConfigError("--temperature must be >= 0 and --top_k >= 1")
  import jax
  import jax.numpy as jnp

  from research.models.sampling import generate

  model, tokenizer, ids, eos, text = _load(args.init_from, args.prompt, args.chat,
                                           args.max_new_tokens)
  out = generate(model, jnp.asarray([ids]), args.max_new_tokens,
                 key=jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k)
  new = [int(i) for i in out[0, len(ids):]]
  if eos is not None and eos in new:
    new = new[:new.index(eos) + 1]
  answer = tokenizer.decode(new)
  if args.json:
    print(json.dumps({"prompt": text, "prompt_ids": ids, "generated_ids": new,
                      "text": answer}, ensure_ascii=False))
  else:
    print(answer)
  return 0
