"""Typed configs: config.model from the model's dataclass, config.optimizer from the registry,
and every mistake in either refused by the CLI before any compute, with the valid names."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import experiments
from experiments.__main__ import main
from research import config as config_lib
from research.models.bilstm import BiLSTMClassifier, BiLSTMConfig
from research.models.bpr import BPRConfig, BPRMF
from research.models.cnn import CNN, CNNConfig
from research.models.gpt import GPTConfig
from research.models.gru4rec import GRU4Rec, GRU4RecConfig
from research.models.lstm import LSTMConfig, LSTMLM
from research.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig
from research.models.mlp import MLP, MLPConfig
from research.models.popular import MostPopular, PopularConfig
from research.train import optim


@pytest.fixture
def no_build(monkeypatch):
  """Fails the test if an experiment gets as far as building its task (data, model)."""
  for name in experiments.EXPERIMENTS:
    module = experiments.load(name)
    if hasattr(module, "build"):
      monkeypatch.setattr(module, "build", lambda config: pytest.fail("build() was reached"))


def refused(capsys, *argv) -> str:
  """The one `error:` line of a CLI call that must exit 2."""
  assert main(list(argv)) == 2
  lines = capsys.readouterr().err.splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, lines
  return errors[0]


def test_unknown_model_field_is_refused_with_the_valid_names(no_build, capsys, tmp_path):
  error = refused(capsys, "gpt_shakespeare:tiny", f"--config.workdir={tmp_path}",
                  "--config.model.num_layer=3")
  assert "unknown config key 'model.num_layer'" in error
  fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "dtype"}
  assert all(f"model.{name}" in error for name in fields), error
  assert "model.vocab_size" not in error and "optimizer." not in error  # only the section's keys
  # A model kind's section lists its own fields.
  error = refused(capsys, "sst2_sentiment:tiny", f"--config.workdir={tmp_path}",
                  "--config.model.bilstm.num_layers=2")
  assert "unknown config key 'model.bilstm.num_layers'; valid keys: " in error
  assert {"model.bilstm.embed_dim", "model.bilstm.hidden_dim", "model.bilstm.dropout"} <= set(
      error.split("valid keys: ")[1].split(", "))
  error = refused(capsys, "sst2_sentiment:tiny", f"--config.workdir={tmp_path}",
                  "--config.model.kind=cnn")
  assert "unknown config.model.kind 'cnn'; valid names: " in error
  assert set(error.split("valid names: ")[1].split(", ")) == {"transformer", "bilstm", "bert"}


def test_unknown_optimizer_is_refused_with_the_valid_names(no_build, capsys, tmp_path):
  error = refused(capsys, "gpt_shakespeare:tiny", f"--config.workdir={tmp_path}",
                  "--config.optimizer.name=adam")
  assert error == ("error: unknown config.optimizer.name 'adam'; valid names: "
                   + ", ".join(optim.OPTIMIZERS))
  # A field of another optimizer than the chosen one.
  error = refused(capsys, "gpt_shakespeare:tiny", f"--config.workdir={tmp_path}",
                  "--config.optimizer.momentum=0.5")
  assert "unknown config key 'optimizer.momentum'; valid keys: " in error
  assert set(error.split("valid keys: ")[1].split(", ")) == {
      "optimizer.name", "optimizer.b1", "optimizer.b2", "optimizer.weight_decay"}


def test_another_optimizer_name_brings_its_own_fields():
  config = experiments.get_config("sst2_sentiment")
  assert dict(config.optimizer) == dict(name="adamw", b1=0.9, b2=0.98, weight_decay=0.01)
  # The name applies first, whatever the order of the arguments.
  sgd = config_lib.apply_overrides(config, ["--config.optimizer.momentum=0.5",
                                            "--config.optimizer.name=sgd"])
  assert dict(sgd.optimizer) == dict(name="sgd", momentum=0.5, nesterov=False, weight_decay=0.0)
  config_lib.validate(sgd, num_devices=1)
  # The same name keeps the experiment's values.
  same = config_lib.apply_overrides(config, ["--config.optimizer.name=adamw"])
  assert dict(same.optimizer) == dict(config.optimizer)
  # A config whose optimizer section does not match its name (e.g. edited by hand) is refused.
  sgd.optimizer.name = "lion"
  with pytest.raises(config_lib.ConfigError, match="does not match optimizer 'lion'"):
    config_lib.validate(sgd, num_devices=1)


def test_model_config_is_the_dataclass_fields_less_data_and_dtype():
  section = config_lib.model_config(GPTConfig, exclude=("vocab_size",), block_size=8,
                                    dropout=0)
  names = {f.name for f in dataclasses.fields(GPTConfig)}
  assert set(section) == names - {"vocab_size", "dtype"}
  assert section.block_size == 8 and section.num_layers == GPTConfig.num_layers
  assert isinstance(section.dropout, float)  # so that --config.model.dropout=0.1 parses
  cfg = GPTConfig(**section, vocab_size=10, dtype="bfloat16")
  assert cfg.block_size == 8 and cfg.dtype == "bfloat16"
  with pytest.raises(ValueError, match="block_size has no default"):
    config_lib.model_config(GPTConfig, exclude=("vocab_size",))
  with pytest.raises(ValueError, match="no fields"):
    config_lib.model_config(GPTConfig, exclude=("vocab_size",), block_size=8, width=3)


def test_the_kind_each_variant_picks_has_its_section():
  """config.model.kind names one of config.model's sections, which model_section returns."""
  for name in experiments.EXPERIMENTS:
    for variant in experiments.load(name).VARIANTS:
      config = experiments.get_config(f"{name}:{variant}")
      if "kind" in config.get("model", {}):
        assert config.model.kind in config.model, (name, variant)
        assert config_lib.model_section(config) is not config.model


@pytest.mark.parametrize("cls, cfg", [
    (BiLSTMClassifier, BiLSTMConfig(vocab_size=11, num_classes=3, embed_dim=4, hidden_dim=6)),
    (MLP, MLPConfig(in_features=5, out_features=3, hidden_sizes=[7, 2], activation="gelu")),
    (CNN, CNNConfig(num_classes=4, widths=[4, 8])),
    (MostPopular, PopularConfig(num_items=9)),
    (LSTMLM, LSTMConfig(vocab_size=11, embed_dim=4, hidden_dim=6, num_layers=1)),
    (LSTMSeq2Seq, LSTMSeq2SeqConfig(src_vocab_size=11, tgt_vocab_size=11, embed_dim=4,
                                    hidden_dim=6)),
    (GRU4Rec, GRU4RecConfig(num_items=9, embed_dim=4)),
    (BPRMF, BPRConfig(num_users=5, num_items=9, embed_dim=4)),
])
def test_baseline_models_rebuild_from_their_config_alone(cls, cfg):
  model = cls(cfg, rngs=nnx.Rngs(0))
  assert model.cfg is cfg
  hash(cfg)  # lists became tuples: the config is a static, hashable part of the graph
  rebuilt = cls(type(cfg)(**dataclasses.asdict(cfg)), rngs=nnx.Rngs(1))
  shapes = lambda m: jax.tree.map(np.shape, nnx.state(m).to_pure_dict())
  assert shapes(rebuilt) == shapes(model)
