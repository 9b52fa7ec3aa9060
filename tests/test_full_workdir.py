"""A workdir without room for the checkpoints is refused before any compute."""

import collections

import pytest

import experiments
from research import config as config_lib
from research.train import loop


def test_full_workdir_is_refused_before_training(tmp_path, monkeypatch):
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false"])
  task = experiments.load("gpt_shakespeare").build(config)
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**10, 2**10))
  with pytest.raises(config_lib.ConfigError, match=r"has 0 MiB free; a checkpoint needs"):
    loop.train(task, config, experiment="gpt_shakespeare:tiny")
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
