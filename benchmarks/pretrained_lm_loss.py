"""A pretrained language model's loss on held-out text: nats per token and bits per character.

The README's SmolLM2 figure: the last `--chars` characters of Tiny Shakespeare's validation
text (the end of the file), its first `--tokens` tokens, scored in one forward pass by the
project's GPT with the GGUF checkpoint's weights. Bits per character are the predictions'
summed nats over the characters those tokens spell, divided by ln 2.

  python -m benchmarks.pretrained_lm_loss [--model SmolLM2-135M-Instruct] [--chars 20000]
"""

from __future__ import annotations

import argparse
import math

import jax.numpy as jnp
import numpy as np
import optax


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="GGUF file or known name")
  parser.add_argument("--chars", type=int, default=20_000)
  parser.add_argument("--tokens", type=int, default=1024)
  args = parser.parse_args(argv)

  from research.data.text import load_text_splits
  from research.pretrained import gguf

  text = load_text_splits("tiny_shakespeare")["val"][-args.chars:]
  tokenizer = gguf.load_tokenizer(args.model)
  ids = tokenizer.encode(text, special_tokens=False)[:args.tokens]
  model = gguf.from_gguf(args.model, max_context=len(ids))
  logits_TxV = model(jnp.asarray([ids]))[0]
  nats = optax.softmax_cross_entropy_with_integer_labels(logits_TxV[:-1], jnp.asarray(ids[1:]))
  total = float(np.asarray(nats, np.float64).sum())
  chars = len(tokenizer.decode(ids))
  print(f"{args.model}: {total / (len(ids) - 1):.4f} nats per token over {len(ids) - 1} "
        f"predictions; {total / chars / math.log(2):.4f} bits per character ({chars} characters)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
