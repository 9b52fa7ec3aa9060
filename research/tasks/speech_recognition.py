"""Speech recognition with CTC for any model mapping (waveforms, lengths) to (logits, frames).

Training batches are fresh synthetic utterances (`research.data.connected_digits`) drawn from
a generator seeded by (seed, step), so a batch is a pure function of the step and a resumed
run sees the same data; the loss is the CTC loss (`research.ctc.ctc_loss`) summed over the batch
and divided by its number of reference labels. Evaluation on each fixed split: that loss (per label), and, from
the task's `evaluate`, transcripts decoded greedily and by CTC prefix beam search, scored by
digit error rate (`der_*`, with jiwer) and utterance accuracy (`utt_acc_*`). After training
the run folder gets `transcripts_<split>.tsv`: each utterance's recordings, reference and
both decodings.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import audio, ctc
from research.audio import LogMelConfig
from research.config import ConfigError
from research.data import connected_digits as cd
from research.data.batching import padded_batches
from research.train.task import Task

_TRAIN_STREAM = 3  # keeps the training utterances' generator apart from other streams
_NORM_STREAM = 4


def normalization(utts: cd.Utterances, cfg: LogMelConfig) -> tuple[float, float]:
  """Mean and standard deviation of the log-mels of the utterances' frames (not the padding)."""
  spec = np.asarray(audio.log_mel_jit(utts.waves, dataclasses.replace(cfg, mean=0.0, std=1.0)),
                    np.float64)
  frames = np.asarray(cfg.frames(utts.lengths))
  valid = spec[np.arange(spec.shape[1])[None, :] < frames[:, None]]
  return float(valid.mean()), float(max(valid.std(), 1e-6))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, waves_BxS, lengths_B):
  return nnx.merge(graphdef, state)(waves_BxS, lengths_B)


def logits_of(model: nnx.Module, waves_NxS: np.ndarray, lengths_N: np.ndarray,
              batch_size: int = 64) -> list[np.ndarray]:
  """Each utterance's logits [T'_n, C] (its valid frames only), in evaluation mode."""
  graphdef, state = nnx.split(model)
  out = []
  for b in padded_batches({"inputs": waves_NxS, "lengths": lengths_N}, batch_size):
    logits, frames = jax.device_get(_logits(graphdef, state, b["inputs"], b["lengths"]))
    out += [z[:n] for z, n, valid in zip(logits, frames, b["mask"]) if valid]
  return out


def transcribe(model: nnx.Module, waves_NxS: np.ndarray, lengths_N: np.ndarray, *,
               beam_size: int, batch_size: int = 64) -> tuple[list[str], list[str]]:
  """(greedy, beam-search) transcripts of the utterances, as label strings."""
  labels, blank = model.cfg.labels, model.cfg.blank
  text = lambda ids: "".join(labels[i] for i in ids)
  greedy, beam = [], []
  for z in logits_of(model, waves_NxS, lengths_N, batch_size):
    greedy.append(text(ctc.greedy_decode(z, blank)))
    beam.append(text(ctc.beam_decode(z, blank, beam_size)) if beam_size > 1 else greedy[-1])
  return greedy, beam


def make_loss_fn(blank: int):

  def loss_fn(model, batch, rngs=None):
    logits, frames = model(batch["inputs"], batch["lengths"], rngs=rngs)
    nll_B = ctc.ctc_loss(logits, frames, batch["labels"], blank)
    loss = nll_B.sum() / jnp.maximum((batch["labels"] >= 0).sum(), 1)
    return loss, {"loss": loss, "nll_per_utterance": nll_B.mean()}

  def eval_fn(model, batch):
    logits, frames = model(batch["inputs"], batch["lengths"])
    nll_B = ctc.ctc_loss(logits, frames, batch["labels"], blank) * batch["mask"]
    return {"nll_sum": nll_B.sum(),
            "labels": ((batch["labels"] >= 0).sum(1) * batch["mask"]).sum()}

  return loss_fn, eval_fn


def summarize(split: str, outputs: dict[str, np.ndarray]) -> dict:
  del split
  return {"loss": float(outputs["nll_sum"].sum() / max(outputs["labels"].sum(), 1))}


def speech_recognition_task(config, make_model: Callable[[LogMelConfig], nnx.Module],
                            train_pool: cd.Pool, evals: dict[str, cd.Utterances],
                            utterance_cfg: cd.UtteranceConfig, frontend: LogMelConfig, *,
                            eval_batch_size: int, beam_size: int,
                            normalization_utterances: int = 256) -> Task:
  """Trains `make_model(frontend with the training utterances' normalization)` on utterances
  drawn from `train_pool` and evaluates it on `evals`. `config` gives batch_size and seed."""
  if eval_batch_size % jax.device_count():
    raise ConfigError(f"eval batch size {eval_batch_size} is not divisible by the "
                      f"{jax.device_count()} devices")
  sample = cd.utterances(train_pool, normalization_utterances, utterance_cfg,
                         [config.seed, _NORM_STREAM])
  mean, std = normalization(sample, frontend)
  frontend = dataclasses.replace(frontend, mean=mean, std=std)
  model = make_model(frontend)
  loss_fn, eval_fn = make_loss_fn(model.cfg.blank)

  def train_data(step):
    return cd.utterances(train_pool, config.batch_size, utterance_cfg,
                         [config.seed, _TRAIN_STREAM, step]).arrays()

  last: dict[str, tuple[list[str], list[str]]] = {}

  def evaluate(model):
    results = {}
    for name, utts in evals.items():
      greedy, beam = last[name] = transcribe(model, utts.waves, utts.lengths,
                                             beam_size=beam_size, batch_size=eval_batch_size)
      refs = [cd.transcript(l) for l in utts.labels]
      g, b = ctc.error_rates(refs, greedy), ctc.error_rates(refs, beam)
      results[name] = {"der_greedy": g["der"], "utt_acc_greedy": g["utterance_accuracy"],
                       "der_beam": b["der"], "utt_acc_beam": b["utterance_accuracy"],
                       "substitutions_beam": b["substitutions"], "deletions_beam": b["deletions"],
                       "insertions_beam": b["insertions"]}
    return results

  def finish(model, workdir: Path):
    for name, utts in evals.items():
      greedy, beam = last.get(name) or transcribe(model, utts.waves, utts.lengths,
                                                  beam_size=beam_size, batch_size=eval_batch_size)
      lines = ["recordings\treference\tgreedy\tbeam"]
      for sources, labels, g, b in zip(utts.sources, utts.labels, greedy, beam):
        lines.append(f"{' '.join(sources)}\t{cd.transcript(labels)}\t{g}\t{b}")
      (Path(workdir) / f"transcripts_{name}.tsv").write_text("\n".join(lines) + "\n")

  return Task(model=model, loss_fn=loss_fn, train_data=train_data,
              eval_data={name: functools.partial(padded_batches, u.arrays(), eval_batch_size)
                         for name, u in evals.items()},
              eval_fn=eval_fn, summarize=summarize, evaluate=evaluate, finish=finish)
