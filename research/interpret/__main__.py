"""python -m research.interpret {attention,heads,fourier} (--workdir RUN | --init_from CKPT) [...];
see __init__. `--init_from` reads a pretrained GGUF checkpoint (a file or a name such as
SmolLM2-135M-Instruct; research.pretrained.gguf) instead of a run folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _load_gpt(args, context: int | None = None):
  """(experiment spec or checkpoint name, config, GPT model, tokenizer or None) of the run
  folder `args.workdir`, or of the checkpoint `args.init_from` (its context cut to `context`)."""
  from research.config import ConfigError
  from research.load import load_model
  from research.models.gpt import GPT

  if args.init_from:
    from research.pretrained import gguf

    return (Path(str(args.init_from)).stem, {}, gguf.from_gguf(args.init_from, max_context=context),
            gguf.load_tokenizer(args.init_from))
  workdir = args.workdir
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
      # A pretrained model's input as its tokenizer cuts it (no special tokens), one label each.
      ids = np.asarray(tokenizer.encode(args.text, special_tokens=False) if args.init_from
                       else tokenizer.encode(args.text), np.int32)
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

  spec, config, model, tokenizer = _load_gpt(args, context=1024)
  ids, labels = _encode(args, tokenizer, model)
  maps_LxBxHxTxT = np.asarray(attention_maps(model, ids[None]))
  out = _out_dir(args)
  return [plot_attention(maps_LxBxHxTxT[l, 0], labels, out / f"attention_layer{l}.png",
                         title=f"{spec}: layer {l}") for l in range(len(maps_LxBxHxTxT))]


def heads(args) -> list[Path]:
  """Induction, prefix-matching and previous-token score of every head, on random tokens."""
  from research.config import ConfigError
  from research.interpret import scores
  from research.interpret.attention import attention_maps, plot_attention

  if args.length is not None and args.length < 2:
    raise ConfigError(f"--length must be >= 2, got {args.length}")
  if args.batch < 1 or args.chunk < 1:
    raise ConfigError(f"--batch and --chunk must be >= 1, got {args.batch} and {args.chunk}")
  # A checkpoint's context (SmolLM2: 8192) is cut to the probe's, for the KV-free forward pass.
  spec, config, model, _ = _load_gpt(
      args, context=2 * (args.length or 128) if args.init_from else None)
  n = args.length or model.cfg.block_size // 2
  if 2 * n > model.cfg.block_size:
    raise ConfigError(f"--length {n}: the repeated sequence (2 x {n}) is longer than the "
                      f"model's context of {model.cfg.block_size}")
  tokens_BxT = scores.repeated_random_tokens(np.random.default_rng(args.seed), args.batch, n,
                                             model.cfg.vocab_size)
  keys = scores.probe_keys(tokens_BxT, n)
  # In chunks of sequences: all maps at once are L x B x H x T x T floats (GBs for SmolLM2).
  sums, counts, first_maps = {}, {}, None
  for start in range(0, args.batch, args.chunk):
    rows = slice(start, start + args.chunk)
    maps_LxBxHxTxT = attention_maps(model, tokens_BxT[rows])
    if first_maps is None:
      first_maps = np.asarray(maps_LxBxHxTxT[:, 0])
    for name, key_BxT in keys.items():
      sums_BxLxH, count_B = scores.attention_to(maps_LxBxHxTxT, key_BxT[rows])
      sums[name] = sums.get(name, 0) + np.asarray(sums_BxLxH, np.float64).sum(0)
      counts[name] = counts.get(name, 0) + int(np.asarray(count_B).sum())
  results = {name: (sums[name] / max(counts[name], 1)).astype(np.float32) for name in keys}
  out = _out_dir(args)
  (out / "heads.json").write_text(json.dumps(
      {name: s.round(4).tolist() for name, s in results.items()}, indent=1) + "\n")
  for name in ("induction", "previous_token"):
    top = np.argsort(results[name], axis=None)[::-1][:args.top]
    shown = ", ".join(f"L{l}H{h} {results[name][l, h]:.3f}"
                      for l, h in zip(*np.unravel_index(top, results[name].shape)))
    print(f"{name} heads (layer, head, score): {shown}")
  paths = [scores.plot_head_scores(results, out / "heads.png",
                                   title=f"{spec}: head scores on {n} random tokens, repeated")]
  labels = [str(t) for t in tokens_BxT[0]]
  # Every layer's map for a small model; the layers of the strongest induction heads for a big one.
  layers = range(len(first_maps))
  if len(first_maps) > 8:
    top = np.argsort(results["induction"], axis=None)[::-1][:args.top]
    layers = sorted(set(np.unravel_index(top, results["induction"].shape)[0].tolist()))
  for l in layers:
    paths.append(plot_attention(first_maps[l], labels, out / f"attention_repeated_layer{l}.png",
                                title=f"{spec}: layer {l} on a repeated random sequence"))
  return paths


def fourier(args) -> list[Path]:
  """Norm of the token embedding per frequency of Z_p (p: the run's data.p, else the vocab)."""
  from research.interpret import fourier as fourier_lib

  spec, config, model, _ = _load_gpt(args, context=1)
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
  default = (Path("runs") / "interpret" / Path(str(args.init_from)).stem if args.init_from
             else Path(args.workdir) / "interpret")
  out = Path(args.out or default)
  out.mkdir(parents=True, exist_ok=True)
  return out


def main(argv: list[str]) -> int:
  from research.config import ConfigError

  parser = argparse.ArgumentParser(prog="python -m research.interpret", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, fn in (("attention", attention), ("heads", heads), ("fourier", fourier)):
    sub = commands.add_parser(name, help=fn.__doc__.splitlines()[0])
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run folder of a GPT experiment")
    source.add_argument("--init_from", "--init-from",
                        help="a pretrained GGUF checkpoint: a file or a known name "
                             "(SmolLM2-135M-Instruct)")
    sub.add_argument("--out", default="", help="where the PNGs go (default: WORKDIR/interpret, "
                                               "or runs/interpret/NAME for --init_from)")
    sub.set_defaults(fn=fn)
    if name == "attention":
      given = sub.add_mutually_exclusive_group(required=True)
      given.add_argument("--text", help="input text (character-level runs)")
      given.add_argument("--tokens", help="input token ids, e.g. '3 14 15 92'")
    elif name == "heads":
      sub.add_argument("--batch", type=int, default=64, help="random sequences averaged over")
      sub.add_argument("--chunk", type=int, default=8, help="sequences per forward pass")
      sub.add_argument("--length", type=int, default=None,
                       help="random tokens before the repeat (default: half the run's context; "
                            "128 for --init_from)")
      sub.add_argument("--top", type=int, default=5, help="strongest heads printed per score")
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
