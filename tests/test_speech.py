"""Speech: the log-mel front end against TensorFlow, wav reading, resampling, augmentation, FSDD
protocols, the spoken_digits experiment end to end (resume, predict) and on a user's folder."""

import json
import re
import wave

import jax
import numpy as np
import pytest

import experiments
from experiments.__main__ import main
from research import audio
from research.audio import AugmentConfig, LogMelConfig
from research.data import sources, speech
from research.evaluate.writer import read_metrics
from research.load import describe_model, load_model

FSDD = sources.REPO_ROOT.parent / "shared" / "data" / "spoken_digit" / "recordings"


def write_wav(path, samples, rate=8000, channels=1, width=2):
  """float samples in [-1, 1] ([N] or [N, channels]) as a PCM wav file."""
  x = np.asarray(samples, np.float64).reshape(-1, channels)
  if width == 1:
    raw = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
  elif width == 2:
    raw = np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
  else:
    v = np.round(np.clip(x, -1, 1) * (2 ** 23 - 1)).astype("<i4")
    raw = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
  with wave.open(str(path), "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(width)
    w.setframerate(rate)
    w.writeframes(raw)
  return path


def sine(freq, rate, seconds=0.5, amplitude=0.5):
  return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def peak_hz(x, rate):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)]


# --- the front end ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    LogMelConfig(),
    LogMelConfig(sample_rate=16000, clip_samples=4000, frame_length=400, frame_step=160,
                 fft_length=512, n_mels=64, fmin=125.0, fmax=7600.0, power=1.0, log_floor=1e-3),
])
def test_log_mel_matches_tensorflow(cfg):
  tf = pytest.importorskip("tensorflow")
  x = (np.random.default_rng(0).normal(size=(3, cfg.clip_samples)) * 0.3).astype(np.float32)
  bins = cfg.fft_length // 2 + 1
  weights = tf.signal.linear_to_mel_weight_matrix(cfg.n_mels, bins, cfg.sample_rate, cfg.fmin,
                                                  cfg.fmax).numpy()
  np.testing.assert_allclose(audio.mel_matrix(cfg.n_mels, bins, cfg.sample_rate, cfg.fmin, cfg.fmax),
                             weights, atol=1e-5)
  spectrum = tf.abs(tf.signal.stft(x, cfg.frame_length, cfg.frame_step, cfg.fft_length)) ** cfg.power
  expected = np.log(np.maximum(np.asarray(tf.matmul(spectrum, weights)), cfg.log_floor))
  got = np.asarray(audio.log_mel_jit(x, cfg))
  assert got.shape == expected.shape == (3, cfg.num_frames, cfg.n_mels)
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_spec_augment_and_noise_are_keyed_and_shaped():
  spec = jax.random.normal(jax.random.key(0), (4, 61, 40)) + 5
  aug = AugmentConfig(time_masks=2, time_mask_width=6, freq_masks=2, freq_mask_width=5)
  a = np.asarray(audio.spec_augment(jax.random.key(1), spec, aug))
  np.testing.assert_array_equal(a, audio.spec_augment(jax.random.key(1), spec, aug))
  assert not np.array_equal(a, audio.spec_augment(jax.random.key(2), spec, aug))
  masked = a == 0
  # Masks are whole frames or whole bands, at most 2 x 6 frames and 2 x 5 bands per example.
  for m in masked:
    frames, bands = m.all(axis=1), m.all(axis=0)
    assert frames.sum() <= 12 and bands.sum() <= 10
    assert np.array_equal(m, frames[:, None] | bands[None, :])
  # Noise at 10 dB: the added power is a tenth of the clip's (nonzero samples) power.
  x = np.zeros((2, 16000), np.float32)
  x[:, :8000] = sine(440, 8000, 1.0)
  y = np.asarray(audio.add_noise(jax.random.key(3), x, snr_db=10.0, prob=1.0))
  snr = 10 * np.log10((x[:, :8000] ** 2).mean() / ((y - x) ** 2).mean())
  assert abs(snr - 10) < 0.2
  np.testing.assert_array_equal(audio.add_noise(jax.random.key(3), x, 10.0, prob=0.0), x)


# --- wav files -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [16000, 44100, 11025])
def test_resampling_preserves_a_sines_frequency(tmp_path, rate):
  x = sine(440.0, rate)
  y = speech.resample(x, rate, 8000)
  assert abs(len(y) - len(x) * 8000 / rate) <= 1
  assert abs(peak_hz(y, 8000) - 440) < 8000 / len(y) * 1.01
  up = speech.resample(sine(1000.0, 8000), 8000, 22050)
  assert abs(peak_hz(up, 22050) - 1000) < 22050 / len(up) * 1.01
  # Through a stereo file: channels mixed down, then resampled.
  path = write_wav(tmp_path / "s.wav", np.stack([x, x], 1), rate=rate, channels=2)
  read = speech.read_wav(path, 8000)
  assert abs(peak_hz(read, 8000) - 440) < 8000 / len(read) * 1.01
  assert abs(np.abs(read).max() - 0.5) < 0.02


@pytest.mark.parametrize("width", [1, 2, 3])
def test_wav_sample_widths_decode_to_the_same_signal(tmp_path, width):
  x = sine(300.0, 8000, 0.1)
  got = speech.read_wav(write_wav(tmp_path / "w.wav", x, width=width))
  np.testing.assert_allclose(got, x, atol=1.5 / 127 if width == 1 else 1e-4)


def test_bad_wav_files_are_one_line_errors_naming_the_file(tmp_path):
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "text.wav").write_text("hello, not audio\n")
  good = write_wav(tmp_path / "good.wav", sine(440, 8000, 0.1)).read_bytes()
  (tmp_path / "cut.wav").write_bytes(good[:30])
  write_wav(tmp_path / "silent.wav", np.zeros(0))
  for name, why in [("empty.wav", "empty"), ("text.wav", "not a readable"),
                    ("cut.wav", "not a readable"), ("silent.wav", "no samples"),
                    ("missing.wav", "cannot be read")]:
    with pytest.raises(sources.DataError, match=why) as e:
      speech.read_wav(tmp_path / name)
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_clips_are_cut_around_the_middle_and_centred():
  waves, lengths = speech.left_aligned([np.ones(3), np.arange(10.0)], 6)
  np.testing.assert_array_equal(lengths, [3, 6])
  np.testing.assert_array_equal(waves[1], np.arange(2.0, 8.0))
  np.testing.assert_array_equal(speech.place(waves, lengths)[0], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(speech.place(waves, lengths, np.array([3, 0]))[0], [0, 0, 0, 1, 1, 1])


# --- FSDD ------------------------------------------------------------------------------------

def test_fsdd_protocols():
  official = speech.load_fsdd()
  assert (len(official["train"]), len(official["test"])) == (2700, 300)
  assert all(int(n.split("_")[2][:-4]) <= 4 for n in official["test"].names)
  assert np.bincount(official["test"].labels).tolist() == [30] * 10
  held = speech.load_fsdd(protocol="speaker", test_speaker="theo", max_per_class=3)
  assert all("_theo_" in n for n in held["test"].names)
  assert not any("_theo_" in n for n in held["train"].names)
  assert len(held["train"]) == len(held["test"]) == 30
  with pytest.raises(sources.DataError, match="not an FSDD speaker"):
    speech.load_fsdd(protocol="speaker", test_speaker="bob")
  with pytest.raises(sources.DataError, match="unknown config.data.protocol"):
    speech.load_fsdd(protocol="random")


def test_fsdd_missing_folder_is_a_data_error(tmp_path):
  with pytest.raises(sources.DataError, match="no .*wav files"):
    speech.load_fsdd(str(tmp_path))


@pytest.mark.parametrize("kind", ["cnn", "transformer", "mlp"])
def test_every_model_kind_is_described_by_model_json(kind):
  from experiments import spoken_digits
  from flax import nnx
  from research.config import apply_overrides
  from research.models.audio import AudioClassifier

  config = apply_overrides(spoken_digits.get_config("tiny"), [f"--config.model.kind={kind}"])
  cfg = spoken_digits.model_config(config, LogMelConfig(mean=-3.0, std=4.0), speech.DIGITS)
  model = AudioClassifier(cfg, rngs=nnx.Rngs(0))
  spec = describe_model(model)  # rebuilt from its JSON, with the same variables
  assert spec["config"]["frontend"]["mean"] == -3.0 and spec["config"]["kind"] == kind
  waves = np.random.default_rng(0).normal(size=(2, 8000)).astype(np.float32)
  assert model(waves).shape == (2, 10)
  assert model(waves, rngs=nnx.Rngs(dropout=1)).shape == (2, 10)


# --- the experiment end to end ---------------------------------------------------------------

def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in ("step_time_ms", "wall_s", "tokens_per_second")}
          for r in read_metrics(workdir / "metrics.jsonl")]


def test_tiny_variant_runs_resumes_exactly_and_predicts(tmp_path, capsys):
  common = ["--config.progress_bar=false", "--config.decay_steps=8"]
  whole, halves = tmp_path / "whole", tmp_path / "halves"
  assert main(["spoken_digits:tiny", f"--config.workdir={whole}", *common]) == 0
  for name in ("model.json", "config.json", "confusion_test.png", "per_class_test.json",
               "misclassified_test.png", "checkpoints"):
    assert (whole / name).exists(), name
  rows = _rows(whole)
  assert [r["step"] for r in rows if r["split"] == "test"] == [4, 8]
  assert {"accuracy", "f1_macro"} <= set(rows[-1])
  # The same command again trains nothing and changes no metric.
  assert main(["spoken_digits:tiny", f"--config.workdir={whole}", *common]) == 0
  assert _rows(whole) == rows
  # Stopped at step 4 and resumed: the metrics of an uninterrupted run.
  assert main(["spoken_digits:tiny", f"--config.workdir={halves}", "--config.steps=4", *common]) == 0
  assert main(["spoken_digits:tiny", f"--config.workdir={halves}", *common]) == 0
  assert _rows(halves) == rows
  capsys.readouterr()
  # predict: a label and its probability, from the run folder alone.
  files = [str(FSDD / "3_theo_0.wav"), str(FSDD / "7_george_1.wav")]
  assert main(["spoken_digits", "predict", "--workdir", str(whole), *files]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  for line, path in zip(lines, files):
    m = re.fullmatch(r"(.+): (\S+) \(probability ([0-9.]+)\)", line)
    assert m and m[1] == path and m[2] in speech.DIGITS and 0.1 <= float(m[3]) <= 1, line
  model, _, config = load_model(whole)
  assert model.cfg.labels == speech.DIGITS and config.experiment == "spoken_digits:tiny"


def _folder(root, layout):
  """Two words as tones (a low and a high one), 6 files each, some at 16 kHz in stereo."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  for label, freq in (("no", 300.0), ("yes", 1200.0)):
    for i in range(6):
      x = sine(freq * (1 + 0.05 * rng.normal()), 8000, 0.4) + 0.01 * rng.normal(size=3200)
      if layout == "subfolders":
        path = root / label / f"take{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
      else:
        path = root / f"{label}_{i}.wav"
      if i % 2:
        write_wav(path, np.stack([speech.resample(x, 8000, 16000)] * 2, 1), rate=16000, channels=2)
      else:
        write_wav(path, x)
  return root


@pytest.mark.parametrize("layout", ["prefix", "subfolders"])
def test_own_folder_trains_and_predicts_its_labels(tmp_path, capsys, layout):
  folder = _folder(tmp_path / "data", layout)
  splits, labels = speech.load_folder(str(folder), sample_rate=8000, test_fraction=0.34)
  assert labels == ("no", "yes")
  assert np.bincount(splits["test"].labels).tolist() == [2, 2]
  assert np.bincount(splits["train"].labels).tolist() == [4, 4]
  if layout == "subfolders":
    return  # the same training path as "prefix"
  workdir = tmp_path / "run"
  assert main(["spoken_digits:tiny", f"--config.workdir={workdir}", "--config.progress_bar=false",
               f"--config.data.folder={folder}", "--config.data.test_fraction=0.34",
               "--config.batch_size=8", "--config.eval_batch_size=8"]) == 0
  per_class = json.loads((workdir / "per_class_test.json").read_text())
  assert list(per_class["classes"]) == ["no", "yes"]
  capsys.readouterr()
  assert main(["spoken_digits", "predict", f"--workdir={workdir}", str(folder / "yes_0.wav")]) == 0
  label = capsys.readouterr().out.split(": ", 1)[1].split(" ")[0]
  assert label in ("no", "yes")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
  one = tmp_path / "one"
  one.mkdir()
  for i in range(3):
    write_wav(one / f"yes_{i}.wav", sine(440, 8000, 0.2))
  bad = _folder(tmp_path / "bad", "prefix")
  (bad / "no_9.wav").write_text("not audio")
  cases = [
      ([f"--config.data.folder={one}"], "at least two labels"),
      ([f"--config.data.folder={bad}"], "no_9.wav: not a readable"),
      ([f"--config.data.folder={tmp_path / 'nowhere'}"], "is not a directory"),
      (["--config.data.protocol=speaker", "--config.data.test_speaker=bob"], "not an FSDD speaker"),
      (["--config.model.kind=rnn"], "unknown config.model.kind"),
      (["--config.model.transformer.patch_size=(4, 7)", "--config.model.kind=transformer"],
       "not divisible by patch_size"),
  ]
  for args, message in cases:
    code = main(["spoken_digits:tiny", f"--config.workdir={tmp_path / 'w'}",
                 "--config.batch_size=8", "--config.eval_batch_size=8", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (args, err)
    assert message in err[-1] and err[-1].startswith("error: "), (args, err)
  (tmp_path / "x.wav").write_bytes(b"")
  assert main(["spoken_digits", "predict", f"--workdir={tmp_path}", str(tmp_path / "x.wav")]) == 2
  assert "not a run folder" in capsys.readouterr().err


def test_leave_one_speaker_out_reports_each_speaker_and_skips_finished_ones(tmp_path, capsys):
  args = ["spoken_digits_speakers:tiny", f"--config.workdir={tmp_path}",
          "--config.progress_bar=false", "--config.speakers=theo,george", "--config.steps=4"]
  assert main(args) == 0
  report = json.loads((tmp_path / "speakers.json").read_text())
  assert set(report) >= {"theo", "george", "mean"} and (tmp_path / "speakers.png").exists()
  assert report["mean"]["accuracy"] == pytest.approx(
      (report["theo"]["accuracy"] + report["george"]["accuracy"]) / 2)
  for speaker in ("theo", "george"):
    config = json.loads((tmp_path / speaker / "config.json").read_text())
    assert config["data"]["test_speaker"] == speaker and config["data"]["protocol"] == "speaker"
  capsys.readouterr()
  assert main(args) == 0
  assert capsys.readouterr().out.count("finished earlier; skipped") == 2
  assert main([*args[:-2], "--config.speakers=bob"]) == 2
