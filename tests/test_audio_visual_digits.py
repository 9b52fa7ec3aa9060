"""audio_visual_digits: the pairs (labels agree, images disjoint, fixed by the data seed), the
degradation, modality dropout and the missing-input paths, the cross-attention between the
two streams, and the experiment end to end (resume, summarize)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from experiments import audio_visual_digits as avd
from experiments.__main__ import main
from research.audio import LogMelConfig
from research.data import audio_visual as av
from research.evaluate.writer import read_metrics
from research.load import load_model
from research.models.fusion import FUSIONS, KINDS, FusionClassifier
from research.tasks import audio_visual as task


@pytest.fixture(scope="module")
def pairs():
  return av.load(sample_rate=8000, clip_samples=8000, data_seed=0, max_per_class=6)


def test_pairs_agree_on_the_digit_use_disjoint_images_and_are_fixed_by_the_data_seed(pairs):
  from sklearn.datasets import load_digits

  digits = load_digits()
  for split, p in pairs.items():
    assert len(p) == 60 and p.images.shape == (60, 8, 8)
    # The clip's file name and the image's load_digits target are the same digit.
    assert [int(name[0]) for name in p.audio_names] == p.labels.tolist()
    np.testing.assert_array_equal(digits.target[p.image_ids], p.labels)
    np.testing.assert_array_equal(p.images, digits.images[p.image_ids] / 16.0)
  # Test clips are FSDD's official test recordings (indices 0-4), train clips the others.
  assert all(int(n.split("_")[2][:-4]) <= 4 for n in pairs["test"].audio_names)
  assert all(int(n.split("_")[2][:-4]) >= 5 for n in pairs["train"].audio_names)
  # The image split is disjoint and covers load_digits, each digit about 30% test.
  split = av.digit_images(0.3, seed=0)
  train_ids, test_ids = split["train"][2], split["test"][2]
  assert not set(train_ids) & set(test_ids) and len(train_ids) + len(test_ids) == 1797
  assert set(pairs["train"].image_ids) <= set(train_ids)
  assert set(pairs["test"].image_ids) <= set(test_ids)
  for d in range(10):
    n = (digits.target == d).sum()
    assert (split["test"][1] == d).sum() == round(0.3 * n)
  # Each digit's images are dealt out evenly: 6 clips of a digit get 6 different images.
  for p in pairs.values():
    for d in range(10):
      assert len(set(p.image_ids[p.labels == d])) == 6
  # Fixed by the data seed: the same seed, the same pairs; another, other ones.
  again = av.load(sample_rate=8000, clip_samples=8000, data_seed=0, max_per_class=6)
  other = av.load(sample_rate=8000, clip_samples=8000, data_seed=1, max_per_class=6)
  for s in pairs:
    np.testing.assert_array_equal(again[s].image_ids, pairs[s].image_ids)
    assert not np.array_equal(other[s].image_ids, pairs[s].image_ids)
  test_ids_1 = av.digit_images(0.3, seed=1)["test"][2]
  assert not np.array_equal(test_ids, test_ids_1)


def test_degradation_is_at_the_configured_levels_and_the_test_set_fixed(pairs):
  cfg = av.Degrade(snr_db_min=-3.0, snr_db_max=-3.0, image_noise=0.5, occlusion=4)
  p = pairs["test"]
  a = av.test_set(p, cfg, data_seed=0)
  b = av.test_set(p, cfg, data_seed=0)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(av.test_set(p, cfg, data_seed=1)["audio"], a["audio"])
  # Noise power over signal power (the clip's nonzero samples) is -3 dB, over the whole window.
  clean = av.speech.place(p.waves, p.lengths)
  noise = a["audio"] - clean
  signal = (clean ** 2).sum(1) / (clean != 0).sum(1)
  snr_db = 10 * np.log10(signal / (noise ** 2).mean(1))
  np.testing.assert_allclose(snr_db, -3.0, atol=0.3)
  assert ((noise != 0).mean(1) > 0.99).all()
  # Pixel noise everywhere; without it, only a square of at most 4x4 pixels changes, darker.
  assert (a["image"] != p.images).all()
  # Where the clean pixel is 0 (blanked or not) what is left is the noise alone: N(0, 0.5).
  np.testing.assert_allclose(a["image"][p.images == 0].std(), 0.5, rtol=0.05)
  no_noise = dataclasses.replace(cfg, image_noise=0.0)
  img = av.noisy_images(p.images, np.random.default_rng(0), no_noise)
  changed = img != p.images
  assert ((p.images - img) >= 0).all()  # only blanked, never brightened
  assert (changed.sum((1, 2)) <= 16).all()
  for i in range(len(img)):
    rows, cols = np.nonzero(changed[i])
    if len(rows):
      assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4


def test_modality_dropout_drops_at_most_one_input_and_zeroes_it():
  rng = np.random.default_rng(0)
  batch = {"audio": rng.normal(size=(4000, 16)).astype(np.float32) + 3,
           "image": rng.normal(size=(4000, 8, 8)).astype(np.float32) + 3,
           "labels": np.zeros(4000, np.int32)}
  out = task.drop_modalities(batch, 0.3, np.random.default_rng(1))
  present = out["present"]
  assert (present.sum(1) >= 1).all()
  dropped = present.sum(1) == 1
  assert abs(dropped.mean() - 0.3) < 0.03 and abs((present[:, 0] == 0).mean() - 0.15) < 0.02
  assert (out["audio"][present[:, 0] == 0] == 0).all() and (out["audio"][present[:, 0] == 1] != 0).all()
  assert (out["image"][present[:, 1] == 0] == 0).all() and (out["image"][present[:, 1] == 1] != 0).all()
  for split, flags in task.MISSING.items():
    m = task.with_missing(batch, flags)
    assert (m["present"] == np.array(flags)).all()
    assert (m["audio"] == 0).all() == (flags[0] == 0) and (m["image"] == 0).all() == (flags[1] == 0)


def _model(kind, seed=0):
  config = experiments.get_config("audio_visual_digits:tiny")
  config.model.kind = kind
  frontend = LogMelConfig(clip_samples=2048, mean=-5.0, std=3.0)
  return FusionClassifier(avd.model_config(config, frontend), rngs=nnx.Rngs(seed))


def _inputs(seed, batch=4, present=(1.0, 1.0)):
  rng = np.random.default_rng(seed)
  return {"audio": jnp.asarray(rng.normal(size=(batch, 2048)), jnp.float32) * 0.3,
          "image": jnp.asarray(rng.random((batch, 8, 8)), jnp.float32),
          "present": jnp.tile(jnp.asarray(present, jnp.float32), (batch, 1))}


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_input_is_ignored_and_a_present_one_used(kind):
  model = _model(kind)
  if kind == "attention":  # a zero head would hide every difference
    model.fusion.head.kernel.value = jax.random.normal(jax.random.key(0), model.fusion.head.kernel.shape)
  x, y = _inputs(0), _inputs(1)
  uses_audio, uses_image = kind != "image", kind != "audio"
  swap_audio = {**x, "audio": y["audio"]}
  swap_image = {**x, "image": y["image"]}
  assert (not np.allclose(model(x), model(swap_audio))) == uses_audio
  assert (not np.allclose(model(x), model(swap_image))) == uses_image
  if kind not in FUSIONS:
    return
  # Marked missing, an input no longer matters, whatever it holds.
  for which, swapped in ((0, swap_audio), (1, swap_image)):
    present = jnp.asarray([[0.0, 1.0]] if which == 0 else [[1.0, 0.0]]).repeat(4, 0)
    np.testing.assert_allclose(model({**x, "present": present}),
                               model({**swapped, "present": present}), atol=1e-6)
  if kind == "late":  # one modality missing: the other's log-probabilities alone
    image_only = {**x, "present": jnp.asarray([[0.0, 1.0]]).repeat(4, 0)}
    expected = jax.nn.log_softmax(model.image_net(x["image"][..., None]))
    np.testing.assert_allclose(model(image_only), expected, atol=1e-5)


@pytest.mark.parametrize("kind", FUSIONS)
def test_fusion_loss_adds_each_present_modalitys_own_classifier(kind):
  import optax

  model = _model(kind)
  batch = {"inputs": _inputs(0), "labels": jnp.arange(4)}
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, batch["labels"])
  loss, metrics = task.fusion_loss(0.5)(model, batch)
  logits, aux = model.outputs(batch["inputs"])
  assert set(aux) == {"audio", "image"}
  expected = ce(logits).mean() + 0.5 * (ce(aux["audio"]).mean() + ce(aux["image"]).mean())
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The audio's own loss counts only the examples that have audio.
  present = jnp.asarray([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
  batch["inputs"] = {**batch["inputs"], "present": present}
  _, metrics = task.fusion_loss(0.5)(model, batch)
  _, aux = model.outputs(batch["inputs"])
  np.testing.assert_allclose(metrics["loss_audio"], ce(aux["audio"])[jnp.array([1, 3])].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_image"], ce(aux["image"])[:3].mean(), rtol=1e-5)


def test_cross_attention_connects_the_audio_and_image_tokens():
  model = _model("attention")
  fusion = model.fusion
  x, y = _inputs(0), _inputs(1)
  spec = model.spectrogram(x["audio"])
  audio_a, image_a = fusion.tokens(spec, x["image"], x["present"])
  # Another image changes every audio token's output (they attend to the image tokens) ...
  audio_b, _ = fusion.tokens(spec, y["image"], x["present"])
  assert (np.abs(np.asarray(audio_a - audio_b)).max(-1) > 1e-4).all()
  # ... and other audio every image token's.
  _, image_b = fusion.tokens(model.spectrogram(y["audio"]), x["image"], x["present"])
  assert (np.abs(np.asarray(image_a - image_b)).max(-1) > 1e-4).all()
  # Gradient view: d(audio tokens)/d(image pixels) is nonzero for every image pixel.
  grad = jax.grad(lambda img: fusion.tokens(spec, img, x["present"])[0].sum())(x["image"])
  assert (np.abs(np.asarray(grad)) > 0).mean() > 0.99


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in ("step_time_ms", "wall_s", "tokens_per_second")}
          for r in read_metrics(workdir / "metrics.jsonl")]


def test_tiny_run_resumes_exactly_and_is_summarized(tmp_path, capsys):
  common = ["--config.progress_bar=false", "--config.decay_steps=8"]
  whole, halves = tmp_path / "whole", tmp_path / "halves"
  assert main(["audio_visual_digits:tiny", f"--config.workdir={whole}", *common]) == 0
  for name in ("model.json", "config.json", "metrics.jsonl", "checkpoints", "confusion_test.png",
               "per_class_test_no_audio.json", "per_class_test_no_image.json"):
    assert (whole / name).exists(), name
  rows = _rows(whole)
  for split in task.MISSING:
    assert [r["step"] for r in rows if r["split"] == split] == [4, 8], split
  assert {"accuracy", "f1_macro"} <= set(rows[-1])
  # Stopped at step 4 and resumed: the metrics of an uninterrupted run.
  assert main(["audio_visual_digits:tiny", f"--config.workdir={halves}", "--config.steps=4",
               *common]) == 0
  assert main(["audio_visual_digits:tiny", f"--config.workdir={halves}", *common]) == 0
  assert _rows(halves) == rows
  model, _, config = load_model(whole)
  assert model.cfg.kind == "attention" and config.experiment == "audio_visual_digits:tiny"
  capsys.readouterr()
  table = tmp_path / "table.json"
  assert main(["audio_visual_digits", "summarize", str(whole), str(halves),
               f"--json={table}"]) == 0
  out = capsys.readouterr().out
  assert "| attention | 2 |" in out
  summary = json.loads(table.read_text())
  final = {r["split"]: r["accuracy"] for r in rows if r["step"] == 8}
  assert summary["attention"]["test"]["mean"] == pytest.approx(final["test"])
  assert summary["attention"]["test_no_image"]["std"] == pytest.approx(0.0)
  # A run of another length (evaluated at its own last step) is not averaged in.
  shorter = tmp_path / "shorter"
  shorter.mkdir()
  (shorter / "metrics.jsonl").write_text((whole / "metrics.jsonl").read_text())
  config = json.loads((whole / "config.json").read_text())
  (shorter / "config.json").write_text(json.dumps({**config, "steps": 4}))
  capsys.readouterr()
  assert main(["audio_visual_digits", "summarize", str(whole), str(shorter)]) == 2
  assert "differ in steps" in capsys.readouterr().err


def test_bad_configs_are_one_line_errors(tmp_path, capsys):
  for args, message in [(["--config.model.kind=rnn"], "unknown config.model.kind"),
                        (["--config.modality_dropout=1.5"], "not a probability"),
                        (["--config.model.attention.image_patch=3"], "image_patch")]:
    assert main(["audio_visual_digits:tiny", f"--config.workdir={tmp_path / 'x'}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) <= 2, err
