"""Fashion-MNIST: the local files, splits, preprocessing, and the tiny experiment end to end."""

import numpy as np
import pytest

import experiments
from research import config as config_lib
from research.data import fashion_mnist, sources
from research.evaluate.writer import read_metrics
from research.tasks.image_classification import augment, normalization, normalize
from research.train import loop


def test_local_files_give_the_published_counts():
  source = sources.tfds_source("fashion_mnist", sources.manual_dir("fashion_mnist"),
                               fashion_mnist.RAW_FILES)
  assert len(source["train"]) == 60_000 and len(source["test"]) == 10_000
  splits = fashion_mnist.load(max_examples=50)
  for split in ("train", "val", "test"):
    images, labels = splits[split]["image"], splits[split]["label"]
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (50,) and 0 <= labels.min() and labels.max() < 10


def test_validation_is_held_out_from_the_end_of_train():
  rows = fashion_mnist.split_rows(60_000, 10_000, val_size=5_000)
  assert [(s, len(r)) for s, r in rows.values()] == [("train", 55_000), ("train", 5_000),
                                                     ("test", 10_000)]
  assert not set(rows["train"][1]) & set(rows["val"][1])
  with pytest.raises(config_lib.ConfigError, match="val_size"):
    fashion_mnist.split_rows(60_000, 10_000, val_size=60_000)


def test_missing_or_empty_data_folder_is_a_clear_data_error(tmp_path):
  with pytest.raises(sources.DataError, match="not a directory"):
    fashion_mnist.load(manual_dir=str(tmp_path / "nowhere"))
  with pytest.raises(sources.DataError, match="train-images-idx3-ubyte.gz"):
    fashion_mnist.load(manual_dir=str(tmp_path))


def test_normalization_uses_training_statistics():
  images = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
  mean, std = normalization(images)
  x = normalize(images, mean, std)
  assert x.shape == (64, 28, 28, 1) and x.dtype == np.float32
  assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4


def test_augmentation_is_a_crop_or_mirrored_crop_and_a_function_of_the_seed():
  images = np.random.default_rng(0).integers(1, 256, (16, 28, 28), dtype=np.uint8)
  a = augment(images, np.random.default_rng([0, 7]))
  assert a.shape == images.shape and a.dtype == images.dtype
  np.testing.assert_array_equal(a, augment(images, np.random.default_rng([0, 7])))
  assert not np.array_equal(a, augment(images, np.random.default_rng([0, 8])))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4)))
  for image, out in zip(padded, a):
    crops = [c for dy in range(9) for dx in range(9)
             for c in (image[dy:dy + 28, dx:dx + 28], image[dy:dy + 28, dx:dx + 28][:, ::-1])]
    assert any(np.array_equal(out, c) for c in crops)
  # Without padding the only freedom left is the flip.
  b = augment(images, np.random.default_rng(1), pad=0)
  assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]) for o, i in zip(b, images))


@pytest.mark.parametrize("model", ["cnn", "vit"])  # BatchNorm state; attention
def test_tiny_variant_trains_and_writes_its_report(tmp_path, model):
  spec = "fashion_mnist_vision:tiny"
  config = config_lib.apply_overrides(experiments.get_config(spec), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false",
      f"--config.model.kind={model}"])
  task = experiments.load("fashion_mnist_vision").build(config)
  # A batch is a pure function of the step: the same augmented images on every call.
  np.testing.assert_array_equal(task.train_data(3)["inputs"], task.train_data(3)["inputs"])
  results = loop.train(task, config, experiment=spec)
  rows = read_metrics(tmp_path / "metrics.jsonl")
  for split in ("val", "test"):
    assert {"accuracy", "f1_macro", "precision_macro", "recall_macro"} <= set(results[split])
    assert [r["step"] for r in rows if r["split"] == split] == [4, 8]
  for name in ("confusion_test.png", "misclassified_test.png", "per_class_test.json"):
    assert (tmp_path / name).exists(), name
