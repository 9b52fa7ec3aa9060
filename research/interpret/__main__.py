"""python -m research.interpret {attention,heads,fourier} --workdir RUN [...]; see __init__."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _load_gpt(workdir: str):
  """(experiment spec, config, GPT model, tokenizer or None) of a run folder."""
  from research.config import ConfigError
  from research.load import load_model
  from research.models.gpt import GPT

  model, tokenizer, config = load_model(workdir)
  spec = config.get("experiment", "?")
  if not isinstance(model, GPT):
    raise ConfigError(f"{workdir} is a {spec} run of {type(model).__name__}; these tools "
                      f"read GPT models")
  return spec, config, model, tokenizer


def _encode(args, tokenizer, model) -> tuple[np.ndarray, list[str]]:
  from research.config import ConfigError

  if args.tokens is not None:
    try:
      ids = np.array([int(t) for t in args.tokens.replace(",", " ").split()], np.int32)
    except ValueError:
      raise ConfigError(f"--tokens {args.tokens!r}: expected integers") from None
    labels = [str(i) for i in ids]
  else:
    if tokenizer is None:
      raise ConfigError("this run's model reads token ids, not text: use --tokens")
    try:
      ids = np.asarray(tokenizer.encode(args.text), np.int32)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    labels = [repr(tokenizer.decode([i]))[1:-1] for i in ids]
  if not 0 < len(ids) <= model.cfg.block_size:
    raise ConfigError(f"the input has {len(ids)} tokens; the model reads 1 to "
                      f"{model.cfg.block_size}")
  if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
    raise ConfigError(f"token ids must lie in [0, {model.cfg.vocab_size})")
  return ids, labels


def attention(args) -> list[Path]:
  """One PNG per layer: the attention map of each head on the given input."""
  from research.interpret.attention import attention_maps, plot_attention

  spec, config, model, tokenizer = _load_gpt(args.workdir)
  ids, labels = _encode(args, tokenizer, model)
  maps_LxBxHxTxT = np.asarray(attention_maps(model, ids[None]))
  out = _out_dir(args)
  return [plot_attention(maps_LxBxHxTxT[l, 0], labels, out / f"attention_layer{l}.png",
                         title=f"{spec}: layer {l}") for l in range(len(maps_LxBxHxTxT))]


def heads(args) -> list[Path]:
  """Induction, prefix-matching and previous-token score of every head, on random tokens."""
  from research.interpret import scores
  from research.interpret.attention import attention_maps, plot_attention

  spec, config, model, _ = _load_gpt(args.workdir)
  n = model.cfg.block_size // 2
  tokens_BxT = scores.repeated_random_tokens(np.random.default_rng(args.seed), args.batch, n,
                                             model.cfg.vocab_size)
  maps_LxBxHxTxT = attention_maps(model, tokens_BxT)
  results = {name: scores.score(maps_LxBxHxTxT, keys)
             for name, keys in scores.probe_keys(tokens_BxT, n).items()}
  out = _out_dir(args)
  (out / "heads.json").write_text(json.dumps(
      {name: s.round(4).tolist() for name, s in results.items()}, indent=1) + "\n")
  paths = [scores.plot_head_scores(results, out / "heads.png",
                                   title=f"{spec}: head scores on {n} random tokens, repeated")]
  labels = [str(t) for t in tokens_BxT[0]]
  for l, maps_BxHxTxT in enumerate(np.asarray(maps_LxBxHxTxT)):
    paths.append(plot_attention(maps_BxHxTxT[0], labels, out / f"attention_repeated_layer{l}.png",
                                title=f"{spec}: layer {l} on a repeated random sequence"))
  return paths


def fourier(args) -> list[Path]:
  """Norm of the token embedding per frequency of Z_p (p: the run's data.p, else the vocab)."""
  from research.interpret import fourier as fourier_lib

  spec, config, model, _ = _load_gpt(args.workdir)
  p = config.get("data", {}).get("p", model.cfg.vocab_size)
  norms = np.asarray(fourier_lib.frequency_norms(model.embed.embedding[...][:p]))
  keys = fourier_lib.key_frequencies(norms, args.top_k)
  fraction = float(fourier_lib.top_k_fraction(norms, args.top_k))
  out = _out_dir(args)
  (out / "fourier.json").write_text(json.dumps(
      {"p": p, "key_frequencies": keys, f"top{args.top_k}_fraction": fraction,
       "frequency_norms": norms.round(5).tolist()}, indent=1) + "\n")
  print(f"key frequencies {keys} hold {fraction:.1%} of the embedding's squared norm")
  return [fourier_lib.plot_frequency_norms(norms, out / "fourier.png", highlight=keys,
                                           title=f"{spec}: embedding of Z_{p}, Fourier basis")]


def _out_dir(args) -> Path:
  out = Path(args.out or Path(args.workdir) / "interpret")
  out.mkdir(parents=True, exist_ok=True)
  return out


def main(argv: list[str]) -> int:
  from research.config import ConfigError

  parser = argparse.ArgumentParser(prog="python -m research.interpret", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, fn in (("attention", attention), ("heads", heads), ("fourier", fourier)):
    sub = commands.add_parser(name, help=fn.__doc__.splitlines()[0])
    sub.add_argument("--workdir", required=True, help="a run folder of a GPT experiment")
    sub.add_argument("--out", default="", help="where the PNGs go (default: WORKDIR/interpret)")
    sub.set_defaults(fn=fn)
    if name == "attention":
      given = sub.add_mutually_exclusive_group(required=True)
      given.add_argument("--text", help="input text (character-level runs)")
      given.add_argument("--tokens", help="input token ids, e.g. '3 14 15 92'")
    elif name == "heads":
      sub.add_argument("--batch", type=int, default=64, help="random sequences averaged over")
      sub.add_argument("--seed", type=int, default=0)
    else:
      sub.add_argument("--top-k", type=int, default=5, help="key frequencies reported")
  args = parser.parse_args(argv)
  try:
    for path in args.fn(args):
      print(path)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main(sys.argv[1:]))
