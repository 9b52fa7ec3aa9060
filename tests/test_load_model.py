"""load_model rebuilds an experiment's model from a finished tiny run with no dataset reachable.

Each experiment with a `tiny` variant and a single model (a `build`) is trained through the
real CLI, with fewer steps than its tiny variant (three are left out by default: see
COVERED_ELSEWHERE). The multi-run experiments (`run` instead of
`build`: transformer_vs_lstm, scaling_laws) are made of gpt_shakespeare and lstm_shakespeare
runs, which are tested here; their top folder's refusal is tested below and in
test_transformer_vs_lstm.py. The reference is the trained model restored the loop's way (the
experiment's `build` with its data, the whole train state from the checkpoint); both are
evaluated with the task's own `eval_fn` on a batch of its eval data.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import experiments
from experiments import __main__ as cli
from research import config as config_lib
from research.data import (fashion_mnist, movielens, multi30k, sources, speech, text,
                           text_classification)
from research.data.subword import SubwordTokenizer
from research.load import config_from_dict, load_model
from research.train import optim
from research.train.checkpoint import Checkpoints
from research.train.step import init_state

SHORT = ["--config.steps=2", "--config.eval_every=2", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.warmup_steps=1", "--config.progress_bar=false"]
# Per experiment: extra overrides that keep its tiny run short.
SPECS = {
    "gpt_shakespeare:tiny": [],
    "lstm_shakespeare:tiny": [],
    "grokking:tiny": [],
    "induction_heads:tiny": [],
    "sst2_sentiment:tiny": ["--config.pretrain.steps=2", "--config.pretrain.eval_every=2",
                            "--config.pretrain.checkpoint_every=2"],
    "clinc_intent:tiny": [],
    "fashion_mnist_vision:tiny": [],
    "movielens_sasrec:tiny": [],
    "multi30k_translation:tiny": [],
    "spoken_digits:tiny": [],
    "connected_digits:tiny": [],
    "audio_visual_digits:tiny": [],
    "smollm_shakespeare:tiny": [],
}
# Runs of a model class and tokenizer kind already covered (GPT: gpt_shakespeare; encoder
# classifier with SentencePiece: sst2_sentiment), left out to keep this file near 2 minutes
# on 2 cores; RESEARCH_TEST_ALL_LOADS=1 runs them too.
COVERED_ELSEWHERE = {"grokking:tiny", "induction_heads:tiny", "clinc_intent:tiny"}
TESTED = [s for s in SPECS
          if os.environ.get("RESEARCH_TEST_ALL_LOADS") or s not in COVERED_ELSEWHERE]
DATA_LOADERS = [sources.manual_dir, sources.tfds_source, text.load_text_splits, multi30k.load,
                movielens.load, fashion_mnist.load, text_classification.load_sst2,
                text_classification.load_clinc_oos, speech.load_fsdd, speech.load_folder,
                speech.fsdd_files, SubwordTokenizer.train.__func__]


@dataclasses.dataclass(frozen=True)
class _Inner:
  sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass(frozen=True)
class _Outer:
  widths: tuple[int, ...] = (32, 64)
  inner: _Inner = _Inner()
  name: str = "x"


def test_model_configs_survive_json_with_their_tuples_and_nested_configs():
  cfg = _Outer(widths=(3, 5, 7), inner=_Inner((4,)))
  back = config_from_dict(_Outer, json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert back == cfg and isinstance(back.widths, tuple) and isinstance(back.inner.sizes, tuple)
  hash(back)  # frozen configs stay hashable (no lists inside)
  with pytest.raises(config_lib.ConfigError, match="has no fields bogus"):
    config_from_dict(_Outer, {"bogus": 1})


def test_every_single_model_experiment_with_a_tiny_variant_is_covered():
  for name in experiments.EXPERIMENTS:
    module = experiments.load(name)
    if "tiny" in module.VARIANTS and hasattr(module, "build"):
      assert f"{name}:tiny" in SPECS, f"add {name}:tiny to SPECS"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """spec -> a finished run folder (trained on first use, shared by the tests of this file)."""
  runs = {}

  def get(spec):
    if spec not in runs:
      workdir = tmp_path_factory.mktemp(spec.replace(":", "_"))
      assert cli.main([spec, f"--config.workdir={workdir}", *SHORT, *SPECS[spec]]) == 0
      runs[spec] = workdir
    return runs[spec]

  return get


def _restored_the_loops_way(workdir: Path):
  """(task, model): the experiment's build, with the checkpoint's whole train state."""
  saved = json.loads((workdir / "config.json").read_text())
  spec = saved.pop("experiment")
  config = config_lib.apply_overrides(experiments.get_config(spec), [])
  config.update(saved)
  task = experiments.load(experiments.parse_name(spec)[0]).build(config)
  graphdef, state = init_state(task.model, optim.make_optimizer(config))
  checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  restored = checkpoints.restore_latest(state)
  checkpoints.close()
  return task, nnx.merge(graphdef, restored.params, restored.rest)


def _unreachable_data(monkeypatch, tmp_path):
  """Every dataset loader raises, wherever it was imported; data folders point nowhere."""
  monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "no_data"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
  monkeypatch.setattr(sources, "REPO_ROOT", tmp_path / "no_repo")

  def refuse(*args, **kwargs):
    raise AssertionError("load_model read a dataset")

  for fn in DATA_LOADERS:
    for module in list(sys.modules.values()):
      for name, value in list(getattr(module, "__dict__", {}).items()):
        if value is fn:
          monkeypatch.setattr(module, name, refuse)
  monkeypatch.setattr(SubwordTokenizer, "train", classmethod(refuse))


def _saved_bytes(tokenizer, directory: Path) -> dict[str, bytes]:
  tokenizer.save(directory)
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
          if p.is_file()}


@pytest.mark.parametrize("spec", TESTED)
def test_load_model_rebuilds_the_trained_model_without_data(spec, trained, monkeypatch, tmp_path):
  workdir = trained(spec)
  task, reference = _restored_the_loops_way(workdir)
  split, batches = next(iter(task.eval_data.items()))
  batch = jax.tree.map(np.asarray, next(iter(batches())))
  eval_fn = task.eval_fn or (lambda model, batch: task.loss_fn(model, batch, None)[1])
  expected = jax.device_get(eval_fn(reference, batch))

  _unreachable_data(monkeypatch, tmp_path)
  model, tokenizer, config = load_model(workdir)

  assert type(model) is type(reference) and model.cfg == reference.cfg
  assert config.experiment == spec and config.steps == 2
  got = jax.device_get(eval_fn(model, batch))
  assert set(got) == set(expected)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)
  if task.tokenizer is None:
    assert tokenizer is None
  else:
    assert type(tokenizer) is type(task.tokenizer)
    assert (_saved_bytes(tokenizer, tmp_path / "loaded")
            == _saved_bytes(task.tokenizer, tmp_path / "trained"))


def test_a_folder_without_its_description_is_refused_in_one_line(trained, tmp_path):
  run = tmp_path / "old_run"
  shutil.copytree(trained("gpt_shakespeare:tiny"), run)
  (run / "model.json").unlink()
  with pytest.raises(config_lib.ConfigError, match=r"has no model\.json") as error:
    load_model(run)
  assert "\n" not in str(error.value)

  # A multi-run experiment's folder: its sub-runs are the runs.
  top = tmp_path / "race"
  top.mkdir()
  (top / "config.json").write_text(json.dumps({"experiment": "transformer_vs_lstm:tiny"}))
  shutil.copytree(trained("gpt_shakespeare:tiny"), top / "gpt")
  with pytest.raises(config_lib.ConfigError, match=r"subfolders \(gpt\); load one of those"):
    load_model(top)

  with pytest.raises(config_lib.ConfigError, match="not a run folder"):
    load_model(tmp_path / "nowhere")
  shutil.rmtree(run / "checkpoints")
  (run / "model.json").write_text((top / "gpt" / "model.json").read_text())
  with pytest.raises(config_lib.ConfigError, match="no checkpoint"):
    load_model(run)
