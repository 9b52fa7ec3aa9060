"""Every experiment has a `tiny` variant, and some test of the suite runs it end to end."""

import ast
from pathlib import Path

import pytest

import experiments

TESTS = Path(__file__).parent

# Experiment -> (test file, the test or fixture that trains its tiny variant end to end).
# A new experiment fails `test_every_experiment_has_a_tiny_variant_run_by_a_test` until its
# tiny run is added to a test and listed here.
TINY_RUNS = {
    "audio_visual_digits": ("test_audio_visual_digits.py", "test_tiny_run_resumes_exactly_and_is_summarized"),
    "clinc_intent": ("test_text_classification.py", "test_clinc_tiny_end_to_end"),
    "connected_digits": ("test_connected_digits.py", "test_tiny_run_resumes_exactly_and_transcribes"),
    "fashion_mnist_vision": ("test_fashion_mnist.py", "test_tiny_variant_trains_and_writes_its_report"),
    "gpt_shakespeare": ("test_training.py", "test_tiny_language_models_learn_and_fill_the_run_folder"),
    "grokking": ("test_grokking.py", "test_tiny_variant_trains_and_writes_curves_and_the_fourier_picture"),
    "induction_heads": ("test_induction_heads.py", "test_tiny_variant_logs_region_losses_and_head_scores"),
    "lstm_shakespeare": ("test_training.py", "test_tiny_language_models_learn_and_fill_the_run_folder"),
    "movielens_sasrec": ("test_recommendation.py", "tiny_runs"),
    "multi30k_translation": ("test_multi30k.py", "test_tiny_lstm_with_separate_vocabularies_trains"),
    "scaling_laws": ("test_scaling_laws.py", "test_tiny_sweep_fits_and_a_rerun_skips_finished_sizes"),
    "smollm_shakespeare": ("test_lm_finetune.py", "lora_run"),
    "sst2_sentiment": ("test_text_classification.py", "test_sst2_tiny_end_to_end"),
    "spoken_digits": ("test_speech.py", "test_tiny_variant_runs_resumes_exactly_and_predicts"),
    "spoken_digits_speakers": ("test_speech.py",
                               "test_leave_one_speaker_out_reports_each_speaker_and_skips_finished_ones"),
    "transformer_vs_lstm": ("test_transformer_vs_lstm.py", "test_tiny_race_trains_both_models_and_reports_bits_per_char"),
}
# What starts a run in a test: the loop, a multi-run experiment's `run`, or the CLI.
RUNNERS = ("loop.train(", ".run(", "run(spec, ", "_run_tiny(", "cli.main(", "main([")


def _function_source(path: Path, name: str) -> str:
  """The source of top-level function `name` in `path`, decorators included."""
  text = path.read_text()
  for node in ast.parse(text).body:
    if isinstance(node, ast.FunctionDef) and node.name == name:
      parts = [ast.get_source_segment(text, d) for d in node.decorator_list]
      return "\n".join(parts + [ast.get_source_segment(text, node)])
  raise AssertionError(f"{path.name} has no function {name}")


@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_every_experiment_has_a_tiny_variant_run_by_a_test(name):
  assert "tiny" in experiments.load(name).VARIANTS, f"{name} has no tiny variant"
  experiments.get_config(f"{name}:tiny")  # builds
  assert name in TINY_RUNS, f"no test runs {name}:tiny end to end; add one to TINY_RUNS"
  file, function = TINY_RUNS[name]
  source = _function_source(TESTS / file, function)
  assert f'"{name}:tiny"' in source or f'{name}.get_config("tiny")' in source, (
      f"{file}::{function} does not name {name}:tiny")
  assert any(runner in source for runner in RUNNERS), f"{file}::{function} runs nothing"


def test_the_list_names_only_experiments_that_exist():
  assert set(TINY_RUNS) == set(experiments.EXPERIMENTS)
