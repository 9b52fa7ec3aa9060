"""Interpretability tools for trained GPT runs: attention maps, per-head induction /
prefix-matching / previous-token scores, and the Fourier analysis of embeddings.

Command line (any run folder of a GPT experiment):
  python -m research.interpret attention --workdir RUN --text "To be, or not"   (char models)
  python -m research.interpret attention --workdir RUN --tokens "3 14 15 92"    (token ids)
  python -m research.interpret heads --workdir RUN      (scores on repeated random tokens)
  python -m research.interpret fourier --workdir RUN    (embedding norm per frequency of Z_p)
  python -m research.interpret heads --init_from SmolLM2-135M-Instruct   (a GGUF checkpoint)
Each writes PNGs (and JSON for the numbers) into RUN/interpret/ (runs/interpret/NAME for
--init_from) unless --out says elsewhere; `heads` prints the strongest heads of each score.
"""

from research.interpret.attention import attention_maps, plot_attention
from research.interpret.fourier import frequency_norms, key_frequencies, top_k_fraction
from research.interpret.scores import (attention_to, induction_keys, prefix_matching_keys,
                                       previous_token_keys, repeated_random_tokens, score)

__all__ = ["attention_maps", "plot_attention", "frequency_norms", "key_frequencies",
           "top_k_fraction", "attention_to", "induction_keys", "prefix_matching_keys",
           "previous_token_keys", "repeated_random_tokens", "score"]
