"""Connected digits (speech recognition with CTC): a Transformer encoder vs a BiLSTM on FSDD digit strings.

Command:  make experiment NAME=connected_digits                 (variant `transformer`, the default)
          make experiment NAME=connected_digits:bilstm          (the BiLSTM-CTC baseline; :tiny for tests)
          python -m experiments connected_digits transcribe --workdir RUN FILE.wav [FILE.wav ...]
Expected: on 500 test utterances (1-7 digits, 2,063 digits, built only from FSDD's official
          test recordings) after 1500 steps, digit error rate / utterance accuracy, greedy and
          beam search (8): `bilstm` 0.34% / 98.6% both, 780K parameters; `transformer` 1.89% /
          92.6% greedy, 1.70% / 93.4% beam, 1.13M, still improving. Issue 18's target: <= 5%.
Runtime:  on one core shared with other work: `transformer` 44 min wall (13.9 min of CPU time),
          `bilstm` 37 min (10.6 min CPU); `tiny` seconds.
Data:     utterances built on the fly (`research.data.connected_digits`): one speaker's FSDD
          recordings of 1-7 random digits, trimmed, at random levels, with 50-300 ms gaps and
          edges, white or pink background noise at 5-30 dB SNR, in a 6 s window. Training
          draws a fresh batch for every step from the 2,700 training recordings (seeded by the
          step); the test set is fixed by data.test_seed, from the 300 test recordings.
Model:    waveform -> 40 log-mels (16 ms hop) on device -> two stride-2 3x3 convolutions (64 ms
          per frame) -> encoder (`transformer`: 4 pre-LN blocks, d 144; `bilstm`: 2 layers of
          128 per direction) -> 11 logits per frame (10 digits + the CTC blank), trained with
          optax.ctc_loss. Decoding: greedy, and CTC prefix beam search (decode.beam_size).
"""

import argparse
import sys

import jax
import ml_collections
from flax import nnx

from research import config as config_lib
from research.audio import AugmentConfig, LogMelConfig
from research.config import ConfigError
from research.data import connected_digits as cd
from research.data import sources, speech
from research.load import load_model
from research.models.speech_ctc import (CTCBiLSTMConfig, CTCRecognizer, CTCRecognizerConfig,
                                        CTCTransformerConfig)
from research.tasks.speech_recognition import speech_recognition_task, transcribe as decode

VARIANTS = ("transformer", "bilstm", "tiny")
MODELS = ("transformer", "bilstm")
_TEST_STREAM = 1


def get_config(variant: str = "transformer") -> ml_collections.ConfigDict:
  c = config_lib.base()
  # The utterances' fields (research.data.connected_digits.UtteranceConfig), plus where FSDD
  # is, how many test utterances and their seed (fixed: every run is tested on the same ones).
  c.data = config_lib.model_config(cd.UtteranceConfig, exclude=("sample_rate",))
  c.data.update(dict(manual_dir="", test_utterances=500, test_seed=0, max_per_class=0))
  c.features = config_lib.model_config(LogMelConfig, exclude=("mean", "std", "clip_samples"))
  c.augment = config_lib.model_config(AugmentConfig, time_masks=2, time_mask_width=10,
                                      freq_masks=2, freq_mask_width=5)
  c.model = dict(
      kind="transformer", subsample_channels=64,
      transformer=config_lib.model_config(CTCTransformerConfig),
      bilstm=config_lib.model_config(CTCBiLSTMConfig))
  c.decode = dict(beam_size=8)
  c.eval_batch_size = 100
  c.update(steps=1500, batch_size=32, learning_rate=1e-3, min_learning_rate=1e-5,
           warmup_steps=150, grad_clip=1.0, eval_every=500, log_every=50, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.98, weight_decay=0.01)
  if variant == "bilstm":
    c.model.kind = "bilstm"
    c.update(learning_rate=2e-3)
  elif variant == "tiny":
    c.model.subsample_channels = 4
    c.model.transformer.update(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32)
    c.model.bilstm.update(num_layers=1, hidden_dim=8)
    c.data.update(max_digits=3, max_seconds=2.5, test_utterances=8, max_per_class=5)
    c.decode.beam_size = 4
    c.eval_batch_size = 8
    c.update(steps=8, batch_size=8, warmup_steps=2, eval_every=4, log_every=2,
             checkpoint_every=4, learning_rate=3e-3)
  elif variant != "transformer":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def model_config(config, frontend: LogMelConfig) -> CTCRecognizerConfig:
  m = config.model
  if m.kind not in MODELS:
    raise ConfigError(f"unknown config.model.kind {m.kind!r}; valid names: {', '.join(MODELS)}")
  try:
    encoder = ({"transformer": CTCTransformerConfig(**m.transformer)} if m.kind == "transformer"
               else {"bilstm": CTCBiLSTMConfig(**m.bilstm)})
    augment = AugmentConfig(**config.augment)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model.{m.kind}: {e}") from None
  return CTCRecognizerConfig(frontend=frontend, augment=augment, kind=m.kind,
                             subsample_channels=m.subsample_channels, labels=speech.DIGITS,
                             dtype=config.compute_dtype, **encoder)


def data(config):
  """(utterance config, front end, training recordings' pool, fixed test utterances, FSDD)."""
  d = config.data
  extra = ("manual_dir", "test_utterances", "test_seed", "max_per_class")
  try:
    ucfg = cd.UtteranceConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                 for k, v in d.items() if k not in extra},
                              sample_rate=config.features.sample_rate)
    ucfg.check()
    frontend = LogMelConfig(**config.features, clip_samples=ucfg.max_samples)
    frontend.check()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.data / config.features: {e}") from None
  fsdd = speech.load_fsdd(d.manual_dir, sample_rate=frontend.sample_rate, protocol="official",
                          max_per_class=d.max_per_class)
  try:
    train_pool, test_pool = cd.Pool(fsdd["train"], ucfg), cd.Pool(fsdd["test"], ucfg)
  except ValueError as e:
    raise sources.DataError(f"FSDD: {e}") from None
  test = cd.utterances(test_pool, d.test_utterances, ucfg, [d.test_seed, _TEST_STREAM])
  return ucfg, frontend, train_pool, test, fsdd


def build(config):
  ucfg, frontend, train_pool, test, fsdd = data(config)

  def make_model(normalized: LogMelConfig):
    try:
      model = CTCRecognizer(model_config(config, normalized), rngs=nnx.Rngs(config.seed))
    except ValueError as e:
      raise ConfigError(f"config.model.{config.model.kind}: {e}") from None
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"connected_digits: {config.model.kind}, {params:,} parameters, "
          f"{len(fsdd['train'])} train recordings, {len(test)} test utterances "
          f"({int((test.labels >= 0).sum())} digits)", file=sys.stderr)
    return model

  return speech_recognition_task(config, make_model, train_pool, {"test": test}, ucfg, frontend,
                                 eval_batch_size=config.eval_batch_size,
                                 beam_size=config.decode.beam_size)


def transcribe(argv: list[str]) -> int:
  """Prints the digit string of each wav file, from a trained run (beam search)."""
  parser = argparse.ArgumentParser(prog="python -m experiments connected_digits transcribe")
  parser.add_argument("--workdir", required=True, help="a run folder of this experiment")
  parser.add_argument("--beam-size", type=int, default=8, help="1: greedy decoding")
  parser.add_argument("files", nargs="+", help="wav files")
  args = parser.parse_args(argv)
  model, _, _ = load_model(args.workdir)
  cfg = getattr(model, "cfg", None)
  if not isinstance(cfg, CTCRecognizerConfig):
    raise ConfigError(f"{args.workdir} is not a run of a CTC recognizer")
  f = cfg.frontend
  clips = [speech.read_wav(path, f.sample_rate) for path in args.files]
  # At least the training window; a longer file is read whole (in steps of 1 s, so that a few
  # lengths compile), which the sinusoidal positions allow.
  longest = max(len(c) for c in clips)
  window = max(f.clip_samples, -(-longest // f.sample_rate) * f.sample_rate)
  waves, lengths = speech.left_aligned(clips, window)
  greedy, beam = decode(model, waves, lengths, beam_size=args.beam_size, batch_size=8)
  for path, text in zip(args.files, beam):
    print(f"{path}: {text}")
  return 0


COMMANDS = {"transcribe": transcribe}
