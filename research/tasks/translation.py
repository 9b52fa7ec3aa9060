"""Sentence-pair translation for any encoder-decoder with the `research.models.seq2seq` interface.

Training: teacher forcing with label-smoothed cross-entropy over target tokens, on batches of
sentences of similar length (padded to a few fixed lengths, so only a few shapes compile).
Evaluation: the loss on every eval split, and BLEU and chrF (sacrebleu, on detokenized
output against the raw references) of beam-search translations.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from flax import nnx

from research.config import ConfigError
from research.data.batching import padded_batches
from research.data.subword import BOS, EOS, PAD, SubwordTokenizer, TokenizerPair
from research.models.beam_search import beam_search, greedy_search, repeat_beams
from research.train.task import Task


def train_tokenizers(data, texts: dict[str, list[str]]) -> TokenizerPair:
  """Source and target SentencePiece tokenizers trained on `texts` (lang -> training
  sentences); one model for both when `data.shared_vocab`."""
  src, tgt = data.src_lang, data.tgt_lang
  if data.shared_vocab:
    shared = SubwordTokenizer.train(texts[src] + texts[tgt], data.vocab_size)
    return TokenizerPair(shared, shared)
  return TokenizerPair(SubwordTokenizer.train(texts[src], data.vocab_size),
                       SubwordTokenizer.train(texts[tgt], data.vocab_size))


def encode_pairs(src_tok, tgt_tok, src: list[str], tgt: list[str], max_len: int) -> dict:
  """`src` [N, max_len]: ids then EOS; `tgt` [N, max_len + 1]: BOS, ids, EOS (inputs are
  tgt[:, :-1], labels tgt[:, 1:]); both right-padded with PAD, and truncated."""
  return {"src": src_tok.encode_batch(src, max_len, eos=True),
          "tgt": tgt_tok.encode_batch(tgt, max_len + 1, bos=True, eos=True)}


@dataclasses.dataclass
class BucketedBatches:
  """Shuffled epochs of `batch_size` pairs of similar length: each batch is cut to the
  shortest of `buckets` that holds its longest sentence. A pure function of the step."""

  arrays: dict[str, np.ndarray]  # encode_pairs' output
  batch_size: int
  seed: int
  buckets: tuple[int, ...]

  def __post_init__(self):
    length_N = np.maximum((self.arrays["src"] != PAD).sum(1), (self.arrays["tgt"] != PAD).sum(1) - 1)
    longest = self.arrays["src"].shape[1]
    self.buckets = tuple(sorted({b for b in self.buckets if b < longest} | {longest}))
    self._bucket_N = np.searchsorted(self.buckets, length_N)
    self._members = [np.flatnonzero(self._bucket_N == b) for b in range(len(self.buckets))]
    self.steps_per_epoch = sum(len(m) // self.batch_size for m in self._members)
    if self.steps_per_epoch == 0:
      raise ValueError(f"no bucket holds a full batch of {self.batch_size} pairs")
    self._epoch, self._plan = -1, None

  def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    plan = []
    for b, members in enumerate(self._members):
      rows = rng.permutation(members)
      plan += [(self.buckets[b], rows[i:i + self.batch_size])
               for i in range(0, len(rows) - self.batch_size + 1, self.batch_size)]
    return [plan[i] for i in rng.permutation(len(plan))]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._plan = epoch, self._epoch_plan(epoch)
    length, rows = self._plan[i]
    return {"src": self.arrays["src"][rows, :length], "tgt": self.arrays["tgt"][rows, :length + 1]}


def token_losses(model, batch, rngs, label_smoothing: float):
  """Per-token (smoothed loss, nll) [B, T] and the weights of real target tokens."""
  logits_BxTxV = model(batch["src"], batch["tgt"][:, :-1], rngs=rngs)
  labels_BxT = batch["tgt"][:, 1:]
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, labels_BxT[..., None], axis=-1)[..., 0]
  # Label smoothing (Szegedy et al. 2016): eps of the target mass spread evenly over the vocabulary.
  smooth_BxT = (1 - label_smoothing) * nll_BxT - label_smoothing * logp_BxTxV.mean(-1)
  return smooth_BxT, nll_BxT, (labels_BxT != PAD).astype(jnp.float32)


def make_loss_fn(label_smoothing: float):

  def loss_fn(model, batch, rngs=None):
    smooth_BxT, nll_BxT, w_BxT = token_losses(model, batch, rngs, label_smoothing)
    tokens = jnp.maximum(w_BxT.sum(), 1.0)
    loss = (smooth_BxT * w_BxT).sum() / tokens
    return loss, {"loss": loss, "nll": (nll_BxT * w_BxT).sum() / tokens}

  return loss_fn


def make_eval_fn(label_smoothing: float):

  def eval_fn(model, batch):
    smooth_BxT, nll_BxT, w_BxT = token_losses(model, batch, None, label_smoothing)
    w_BxT = w_BxT * batch["mask"][:, None]  # rows that only pad the last batch weigh nothing
    return {"loss_sum": (smooth_BxT * w_BxT).sum(), "nll_sum": (nll_BxT * w_BxT).sum(),
            "tokens": w_BxT.sum()}

  return eval_fn


def summarize(split: str, outputs: dict[str, np.ndarray]) -> dict:
  del split
  tokens = outputs["tokens"].sum()
  nll = float(outputs["nll_sum"].sum() / tokens)
  return {"loss": float(outputs["loss_sum"].sum() / tokens), "nll": nll, "ppl": float(np.exp(nll))}


def corpus_scores(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
  """sacrebleu's corpus BLEU (13a tokenization, cased) and chrF of detokenized hypotheses;
  `refs` is a list of reference sets, each aligned with `hyps`."""
  return {"bleu": sacrebleu.corpus_bleu(hyps, refs).score,
          "chrf": sacrebleu.corpus_chrf(hyps, refs).score}


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _decode(graphdef, state, src_BxS, beam_size: int, alpha: float, max_len: int):
  """[B, max_len] best translation ids of each source row (greedy when beam_size == 1)."""
  model = nnx.merge(graphdef, state)
  context, cache = model.init_cache(model.encode(src_BxS), max_len)
  if beam_size > 1:
    context = repeat_beams(context, beam_size)

  def step(tokens_N, cache, pos):
    logits_Nx1xV, cache = model.decode(tokens_N[:, None], context, cache, pos)
    return logits_Nx1xV[:, 0], cache

  B = src_BxS.shape[0]
  if beam_size == 1:
    return greedy_search(step, cache, batch_size=B, max_len=max_len, bos=BOS, eos=EOS)
  seqs_BxKxL, _ = beam_search(step, cache, batch_size=B, beam_size=beam_size, max_len=max_len,
                              bos=BOS, eos=EOS, alpha=alpha)
  return seqs_BxKxL[:, 0]


@dataclasses.dataclass
class Translator:
  """Texts in, texts out: tokenizes, decodes in batches of similar length, detokenizes."""

  src_tok: SubwordTokenizer
  tgt_tok: SubwordTokenizer
  max_len: int  # longest source read and longest translation written, in tokens
  beam_size: int = 4
  alpha: float = 0.6
  batch_size: int = 128

  def __call__(self, model: nnx.Module, texts: list[str]) -> list[str]:
    src_NxS = self.src_tok.encode_batch(texts, self.max_len, eos=True)
    lengths_N = (src_NxS != PAD).sum(1)
    # Sorted by length, each batch reads only as far as its longest source, and ends soon
    # after its longest translation does.
    order = np.argsort(-lengths_N, kind="stable")
    graphdef, state = nnx.split(model)
    out = [None] * len(texts)
    for batch in padded_batches({"src": src_NxS[order], "row": order}, self.batch_size):
      # Lengths in steps of 8 keep the compiled shapes few. Up to 16 target tokens more than
      # that hold the reference translations of all but one of Multi30k's 29,000 training pairs.
      longest = lengths_N[batch["row"]][batch["mask"] > 0].max()
      S = min(self.max_len, -(-int(longest) // 8) * 8)
      ids_BxL = np.asarray(_decode(graphdef, state, jnp.asarray(batch["src"][:, :S]),
                                   self.beam_size, self.alpha, min(self.max_len, S + 16)))
      for row, ids, valid in zip(batch["row"], ids_BxL, batch["mask"]):
        if valid:
          out[row] = self.tgt_tok.decode(ids)
    return out


def translation_task(config, model: nnx.Module, translator: Translator,
                     splits: dict[str, dict[str, list[str]]], *, src_lang: str, tgt_lang: str,
                     max_len: int, buckets: tuple[int, ...] = (), eval_batch_size: int,
                     label_smoothing: float = 0.0) -> Task:
  """`splits`: name -> lang -> sentences: `train`, and the splits to evaluate. Pairs are cut
  to `max_len` tokens and batched by length `buckets`. `config` gives batch_size and seed."""
  src, tgt = src_lang, tgt_lang
  encode = lambda s: encode_pairs(translator.src_tok, translator.tgt_tok, s[src], s[tgt],
                                  max_len)
  train = BucketedBatches(encode(splits["train"]), config.batch_size, config.seed, buckets)
  evals = {name: s for name, s in splits.items() if name != "train"}
  if eval_batch_size % jax.device_count():
    raise ConfigError(f"eval batch size {eval_batch_size} is not divisible by the "
                      f"{jax.device_count()} devices")
  eval_arrays = {name: encode(s) for name, s in evals.items()}
  last = {}  # the newest translations, written out by `finish`

  def evaluate(model):
    results = {}
    for name, s in evals.items():
      last[name] = translator(model, s[src])
      results[name] = corpus_scores(last[name], [s[tgt]])
    return results

  def finish(model, workdir: Path):
    for name, s in evals.items():
      hyps = last.get(name) or translator(model, s[src])
      (Path(workdir) / f"translations.{name}.{tgt}").write_text("\n".join(hyps) + "\n")

  # Source and target tokens (not padding; BOS and EOS once) of an average batch.
  real_tokens = sum((a != PAD).mean(0).sum() for a in train.arrays.values()) - 1
  return Task(
      model=model, loss_fn=make_loss_fn(label_smoothing),
      train_data=train,
      eval_data={name: functools.partial(padded_batches, a, eval_batch_size)
                 for name, a in eval_arrays.items()},
      eval_fn=make_eval_fn(label_smoothing), summarize=summarize,
      evaluate=evaluate, finish=finish,
      tokens_per_batch=int(real_tokens * config.batch_size),
      tokenizer=TokenizerPair(translator.src_tok, translator.tgt_tok))
