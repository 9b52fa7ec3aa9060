"""Connected digits: the utterance builder, the CTC loss, greedy and prefix beam-search decoding,
the digit error rate, and the experiment end to end (resume, transcribe)."""

import itertools
import math
import re
import wave

import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import connected_digits
from experiments.__main__ import main
from research import config as config_lib
from research import ctc, sharding
from research.data import connected_digits as cd
from research.data import speech
from research.evaluate.writer import read_metrics

B = 10  # the blank of ten digit classes


@pytest.fixture(scope="module")
def fsdd():
  return speech.load_fsdd()


# --- the utterance builder ---------------------------------------------------------------------

def test_utterances_are_their_recordings_in_order_from_one_split_and_fixed_by_the_seed(fsdd):
  quiet = cd.UtteranceConfig(gain_db=(0.0, 0.0), snr_db=(300.0, 300.0))
  pool = cd.Pool(fsdd["test"], quiet)
  words = dict(zip(pool.names, pool.words))
  utts = cd.utterances(pool, 12, quiet, seed=7)
  for wave_S, length, labels, names in zip(utts.waves, utts.lengths, utts.labels, utts.sources):
    digits = [int(d) for d in labels if d != cd.PAD_LABEL]
    assert 1 <= len(digits) <= 7 and len(names) == len(digits)
    # The labels are the digits of the recordings, all one speaker's, all official test takes.
    assert [int(n.split("_")[0]) for n in names] == digits
    assert len({n.split("_")[1] for n in names}) == 1
    assert all(int(n.split("_")[2][:-4]) <= 4 for n in names)
    assert not wave_S[length:].any()
    # With no noise and unit gain, the waveform is each recording (at the target level) in
    # order, separated by silence.
    start = 0
    x = wave_S[:length]
    for name in names:
      w = words[name] * quiet.target_rms
      hits = [s for s in range(start, length - len(w) + 1)
              if abs(x[s] - w[0]) < 1e-4 and np.allclose(x[s:s + len(w)], w, atol=1e-4)]
      assert hits, f"{name} not found after sample {start}"
      start = hits[0] + len(w)
  # Deterministic: the same seed gives the same utterances, another seed others.
  again = cd.utterances(pool, 12, quiet, seed=7)
  np.testing.assert_array_equal(again.waves, utts.waves)
  assert again.sources == utts.sources
  assert cd.utterances(pool, 12, quiet, seed=8).sources != utts.sources
  # The experiment's test set holds only test recordings; its training batches only training ones.
  config = connected_digits.get_config("tiny")
  _, _, train_pool, test, _ = connected_digits.data(config)
  tested = {n for names in test.sources for n in names}
  assert tested and tested <= set(fsdd["test"].names)
  assert set(train_pool.names) <= set(fsdd["train"].names)
  task = connected_digits.build(config)
  batch = task.train_data(3)
  np.testing.assert_array_equal(batch["inputs"], task.train_data(3)["inputs"])
  assert not np.array_equal(batch["inputs"], task.train_data(4)["inputs"])


def test_noise_is_at_the_drawn_level_and_everywhere(fsdd):
  cfg = cd.UtteranceConfig(snr_db=(10.0, 10.0), gain_db=(0.0, 0.0))
  pool = cd.Pool(fsdd["train"], cfg)
  clean = cd.utterances(pool, 4, cd.UtteranceConfig(snr_db=(300.0, 300.0), gain_db=(0.0, 0.0)), 1)
  noisy = cd.utterances(pool, 4, cfg, 1)
  for c, n, length in zip(clean.waves, noisy.waves, noisy.lengths):
    speech_power = (c[:length][np.abs(c[:length]) > 1e-9] ** 2).mean()
    noise = n[:length] - c[:length]
    assert (noise != 0).all()  # in the gaps too
    assert abs(10 * np.log10(speech_power / (noise ** 2).mean()) - 10) < 1.0


# --- the CTC loss ------------------------------------------------------------------------------

def _collapse(path, blank):
  out, previous = [], None
  for c in path:
    if c != previous and c != blank:
      out.append(c)
    previous = c
  return tuple(out)


def _brute_force_nll(logits_TxC, labels, blank):
  """-log of the summed probability of every alignment that collapses to `labels`."""
  logp = ctc.log_softmax(logits_TxC)
  T, C = logp.shape
  total = sum(math.exp(sum(logp[t, c] for t, c in enumerate(path)))
              for path in itertools.product(range(C), repeat=T)
              if _collapse(path, blank) == tuple(labels))
  return -math.log(total)


def test_ctc_loss_is_the_sum_over_alignments_and_optaxs_value_inside_shard_map():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 3)).astype(np.float32)  # classes 0, 1 and the blank 2
  frames = np.array([6, 5, 6, 4])
  labels = np.array([[0, 1, 1], [1, 1, -1], [0, -1, -1], [1, 0, -1]])
  got = np.asarray(ctc.ctc_loss(logits, frames, labels, blank=2))
  for b in range(4):
    want = _brute_force_nll(logits[b, :frames[b]], [l for l in labels[b] if l >= 0], 2)
    assert got[b] == pytest.approx(want, rel=1e-5)
  paddings = (np.arange(6)[None] >= frames[:, None]).astype(np.float32)
  reference = lambda z: optax.ctc_loss(z, paddings, np.maximum(labels, 0),
                                       (labels < 0).astype(np.float32), blank_id=2)
  np.testing.assert_allclose(got, reference(logits), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda z: ctc.ctc_loss(z, frames, labels, 2).sum())(logits),
                             jax.grad(lambda z: reference(z).sum())(logits), atol=1e-5)
  # Its gradient inside the data-parallel step's shard_map (where optax's scan is refused).
  mesh = sharding.make_mesh(jax.devices()[:4])
  per_device = jax.jit(jax.shard_map(
      lambda z, f, l: jax.grad(lambda z: ctc.ctc_loss(z, f, l, 2).sum())(z),
      mesh=mesh, in_specs=(P(sharding.DATA),) * 3, out_specs=P(sharding.DATA)))
  np.testing.assert_allclose(per_device(logits, frames, labels),
                             jax.grad(lambda z: reference(z).sum())(logits), atol=1e-5)


def test_ctc_loss_falls_over_a_few_steps_of_the_tiny_config():
  config = connected_digits.get_config("tiny")
  task = connected_digits.build(config)
  batch = {k: jnp.asarray(v) for k, v in task.train_data(0).items()}
  optimizer = nnx.Optimizer(task.model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    (loss, _), grads = nnx.value_and_grad(task.loss_fn, has_aux=True)(model, batch, None)
    optimizer.update(model, grads)
    return loss

  # The CTC negative log-likelihood per digit, computed apart from the training loss.
  nll = lambda: float(task.eval_fn(task.model, {**batch, "mask": jnp.ones(len(batch["lengths"]))})
                      ["nll_sum"] / (batch["labels"] >= 0).sum())
  before = nll()
  losses = [float(step(task.model, optimizer, batch)) for _ in range(25)]
  assert all(np.isfinite(losses)) and losses[0] == pytest.approx(before, rel=1e-4)
  assert nll() < 0.5 * before, (before, losses)


# --- decoding ----------------------------------------------------------------------------------

def _peaked(path, classes=11):
  """Logits whose best class at frame t is path[t] (probability ~0.99)."""
  z = np.zeros((len(path), classes), np.float32)
  z[np.arange(len(path)), path] = 7.0
  return z


@pytest.mark.parametrize("path, expected", [
    ([1, 1, B, 1, 2, 2, B, B, 3], [1, 1, 2, 3]),  # a blank separates the repeated 1s
    ([4, 4, 4, 4], [4]),  # repeats without a blank are one digit
    ([B, B, B], []),
    ([B, 0, B, 0, B, 0, 0, B], [0, 0, 0]),
    ([7, 3, 7, B, 7], [7, 3, 7, 7]),
])
def test_greedy_and_beam_decoding_of_hand_made_paths(path, expected):
  z = _peaked(path)
  assert ctc.greedy_decode(z, B) == expected
  assert ctc.beam_decode(z, B, beam_size=4) == expected


def test_beam_search_sums_alignments_where_the_best_path_misleads():
  # Two frames of P(blank) = 0.6, P("1") = 0.4: the best path is blank-blank (0.36), but "1"
  # has 0.4*0.6 + 0.6*0.4 + 0.4*0.4 = 0.64 over its three alignments.
  z = np.log(np.array([[0.6 if c == B else (0.4 if c == 1 else 1e-9) for c in range(11)]] * 2))
  assert ctc.greedy_decode(z, B) == []
  best = ctc.prefix_beam_search(z, B, beam_size=4)
  assert best[0][0] == (1,) and math.exp(best[0][1]) == pytest.approx(0.64, rel=1e-6)
  assert best[1][0] == () and math.exp(best[1][1]) == pytest.approx(0.36, rel=1e-6)
  # With a beam wide enough, every labelling's score is its brute-force probability.
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)) * 2
  for labels, logp in ctc.prefix_beam_search(logits, 2, beam_size=100, prune=-math.inf):
    assert -logp == pytest.approx(_brute_force_nll(logits, labels, 2), rel=1e-6)


# --- the digit error rate ----------------------------------------------------------------------

def _levenshtein(a, b):
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    previous, row[0] = row[0], i
    for j, y in enumerate(b, 1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
  return row[-1]


def test_digit_error_rate_matches_hand_counts_and_jiwer():
  refs = ["123", "45", "7", "000", "9"]
  hyps = ["13", "45", "", "0000", "8"]  # a deletion, exact, a deletion, an insertion, a substitution
  rates = ctc.error_rates(refs, hyps)
  assert rates["der"] == pytest.approx(4 / 10)
  assert (rates["deletions"], rates["insertions"], rates["substitutions"]) == pytest.approx(
      (2 / 10, 1 / 10, 1 / 10))
  assert rates["utterance_accuracy"] == pytest.approx(1 / 5)
  assert rates["der"] == pytest.approx(jiwer.wer([" ".join(r) for r in refs],
                                                 [" ".join(h) for h in hyps]))
  rng = np.random.default_rng(0)
  refs = ["".join(rng.choice(list("0123456789"), rng.integers(1, 8))) for _ in range(50)]
  hyps = ["".join(rng.choice(list("0123"), rng.integers(0, 9))) for _ in range(50)]
  expected = sum(_levenshtein(r, h) for r, h in zip(refs, hyps)) / sum(map(len, refs))
  assert ctc.error_rates(refs, hyps)["der"] == pytest.approx(expected)


# --- the experiment end to end -----------------------------------------------------------------

def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in ("step_time_ms", "wall_s")}
          for r in read_metrics(workdir / "metrics.jsonl")]


def _write_wav(path, x, rate=8000):
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
  return path


def test_tiny_run_resumes_exactly_and_transcribes(tmp_path, capsys, fsdd):
  common = ["--config.progress_bar=false", "--config.decay_steps=8"]
  whole, halves = tmp_path / "whole", tmp_path / "halves"
  assert main(["connected_digits:tiny", f"--config.workdir={whole}", *common]) == 0
  for name in ("model.json", "config.json", "transcripts_test.tsv", "checkpoints"):
    assert (whole / name).exists(), name
  rows = _rows(whole)
  tests = [r for r in rows if r["split"] == "test"]
  assert [r["step"] for r in tests] == [4, 8]
  assert {"loss", "der_greedy", "utt_acc_greedy", "der_beam", "utt_acc_beam"} <= set(tests[-1])
  lines = (whole / "transcripts_test.tsv").read_text().splitlines()
  assert lines[0] == "recordings\treference\tgreedy\tbeam" and len(lines) == 1 + 8
  # Stopped at step 4 and resumed: the metrics of an uninterrupted run.
  assert main(["connected_digits:tiny", f"--config.workdir={halves}", "--config.steps=4",
               *common]) == 0
  assert main(["connected_digits:tiny", f"--config.workdir={halves}", *common]) == 0
  assert _rows(halves) == rows
  capsys.readouterr()
  # transcribe: a digit string per file, from the run folder alone; a file longer than the
  # training window is read whole.
  pool = cd.Pool(fsdd["test"], cd.UtteranceConfig())
  utt = cd.utterances(pool, 1, cd.UtteranceConfig(min_digits=3, max_digits=3), seed=0)
  short = _write_wav(tmp_path / "three.wav", utt.waves[0, :utt.lengths[0]])
  long = _write_wav(tmp_path / "long.wav", np.tile(utt.waves[0, :utt.lengths[0]], 3)[:8000 * 4])
  assert main(["connected_digits", "transcribe", "--workdir", str(whole), str(short),
               str(long)]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2
  for line, path in zip(out, (short, long)):
    assert re.fullmatch(rf"{re.escape(str(path))}: [0-9]*", line), line
  assert main(["connected_digits", "transcribe", "--workdir", str(whole), "--beam-size=1",
               str(short)]) == 0
  assert re.fullmatch(r".*: [0-9]*", capsys.readouterr().out.strip())
  # A run of another experiment is refused in one line.
  assert main(["connected_digits", "transcribe", f"--workdir={tmp_path / 'nowhere'}",
               str(short)]) == 2
  assert "not a run folder" in capsys.readouterr().err


def test_bad_configs_are_one_line_errors(tmp_path, capsys):
  for args, message in [(["--config.model.kind=rnn"], "unknown config.model.kind"),
                        (["--config.data.max_seconds=1.0"], "cannot hold 3 words")]:
    assert main(["connected_digits:tiny", f"--config.workdir={tmp_path / 'w'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: "), err


def test_the_model_kinds_are_described_by_model_json():
  from research.audio import LogMelConfig
  from research.load import describe_model
  from research.models.speech_ctc import CTCRecognizer

  for kind in connected_digits.MODELS:
    config = config_lib.apply_overrides(connected_digits.get_config("tiny"),
                                        [f"--config.model.kind={kind}"])
    model = CTCRecognizer(connected_digits.model_config(
        config, LogMelConfig(clip_samples=16000, mean=-3.0, std=4.0)), rngs=nnx.Rngs(0))
    spec = describe_model(model)
    assert spec["config"]["kind"] == kind and spec["config"]["frontend"]["mean"] == -3.0
    waves = np.random.default_rng(0).normal(size=(2, 16000)).astype(np.float32) * 0.1
    logits, frames = model(waves, np.array([16000, 6000]))
    # 124 log-mel frames -> 31 after 4x subsampling; 6000 samples -> 45 frames -> 12.
    assert logits.shape == (2, 31, 11) and frames.tolist() == [31, 12]
