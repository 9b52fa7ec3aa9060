"""Fine-tuning a pretrained Llama-family GGUF checkpoint (experiments/smollm_shakespeare.py):
LoRA (research.nn.lora, research.models.gpt_lora) and name-pattern freezing through the
optimizer's mask (research.train.optim), through the real CLI, on a tiny random GGUF file
written here; and `research.interpret heads --init_from` on that file."""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")

from experiments import __main__ as cli  # noqa: E402
from research import interpret  # noqa: E402
from research.data.text import LMBatches  # noqa: E402
from research.interpret import __main__ as interpret_cli  # noqa: E402
from research.load import load_model  # noqa: E402
from research.models import gpt_lora  # noqa: E402
from research.models.gpt import GPT, GPTConfig  # noqa: E402
from research.pretrained import gguf as G  # noqa: E402
from research.tasks.language_model import next_token_loss  # noqa: E402

SPEC = "smollm_shakespeare:tiny"


def write_tiny_llama(path, *, arch="llama", layers=2, dim=32, heads=4, kv_heads=2, ffn=48, seed=0):
  """A random Llama GGUF file whose byte-level BPE vocabulary is the 256 bytes and two merges."""
  rng = np.random.default_rng(seed)
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  extra = [b for b in range(256) if b not in printable]
  byte_chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
  tokens = ["<|endoftext|>"] + [byte_chars[b] for b in range(256)] + ["Ġt", "he"]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(layers)
  w.add_context_length(64)
  w.add_embedding_length(dim)
  w.add_feed_forward_length(ffn)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_freq_base(10_000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (len(tokens) - 1))
  w.add_token_merges(["Ġ t", "h e"])
  w.add_eos_token_id(0)
  w.add_pad_token_id(0)

  def tensor(name, *shape):
    a = rng.standard_normal(shape).astype(np.float32) * 0.2
    w.add_tensor(name, 1 + a / 2 if name.endswith("norm.weight") else a)

  tensor("token_embd.weight", len(tokens), dim)
  tensor("output_norm.weight", dim)
  hd = dim // heads
  for i in range(layers):
    p = f"blk.{i}."
    for name, *shape in (("attn_norm.weight", dim), ("attn_q.weight", dim, dim),
                         ("attn_k.weight", kv_heads * hd, dim), ("attn_v.weight", kv_heads * hd, dim),
                         ("attn_output.weight", dim, dim), ("ffn_norm.weight", dim),
                         ("ffn_gate.weight", ffn, dim), ("ffn_up.weight", ffn, dim),
                         ("ffn_down.weight", dim, ffn)):
      tensor(p + name, *shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("finetune")
  rng = np.random.default_rng(0)
  words = ["the", "king", "shall", "speak", "to", "thee", "and", "thou", "art", "here"]
  lines = [" ".join(rng.choice(words, 6)).capitalize() + ".\n" for _ in range(300)]
  (d / "text.txt").write_text("".join(lines))
  return {"gguf": write_tiny_llama(d / "tiny.gguf"), "text": d / "text.txt", "dir": d}


@pytest.fixture(scope="module")
def lora_run(files):
  """A `tiny` LoRA run (6 steps), shared by the tests that only read it."""
  workdir = files["dir"] / "lora_run"
  assert cli.main(["smollm_shakespeare:tiny", *overrides(files, workdir)]) == 0
  return workdir


def overrides(files, workdir):
  return [f"--config.init_from={files['gguf']}", f"--config.data.text_file={files['text']}",
          f"--config.workdir={workdir}", "--config.progress_bar=false"]


def train(files, workdir, *args):
  return cli.main([SPEC, *overrides(files, workdir), *args])


def params_of(model):
  return nnx.state(model, nnx.Param).to_pure_dict()


def flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_finetune_end_to_end_resumes_exactly_and_freezes_the_base(files, lora_run, tmp_path,
                                                                        capsys):
  run = lora_run
  for name in ("config.json", "model.json", "metrics.jsonl", "samples.txt", "checkpoints",
               "tokenizer"):
    assert (run / name).exists(), name
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in rows if r["split"] == "val"]
  assert [r["step"] for r in val] == [0, 3, 6]  # the zero-shot evaluation first
  # Bits per character: the windows' summed nats over the characters they spell (a byte token
  # spells 1, each of the two merges 2), counted here from the same validation windows.
  tokenizer = G.load_tokenizer(files["gguf"])
  text = files["text"].read_text()
  ids = np.asarray(tokenizer.encode(text[int(0.9 * len(text)):], special_tokens=False))
  val_windows = LMBatches(ids, 32, 8, seed=10_000)
  chars = sum(int(np.sum(np.where(val_windows(i)["targets"] >= 257, 2, 1))) for i in range(2))
  for r in val:
    np.testing.assert_allclose(r["bits_per_char"], r["loss"] * 2 * 8 * 32 / chars / np.log(2),
                               rtol=1e-5)
  assert 2 * 8 * 32 < chars < 2 * 2 * 8 * 32  # both kinds of token occur
  assert json.loads((run / "model.json").read_text())["class"] == "research.models.gpt_lora.LoRAGPT"

  # Exact resume: 3 steps, then the same command to 6, equals 6 at once.
  assert train(files, tmp_path / "split", "--config.steps=3", "--config.decay_steps=6") == 0
  capsys.readouterr()
  assert train(files, tmp_path / "split", "--config.decay_steps=6") == 0
  assert "resumed from step 3" in capsys.readouterr().err
  whole, _, _ = load_model(run)
  split, _, _ = load_model(tmp_path / "split")
  a, b = flat(params_of(whole)), flat(params_of(split))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  strip = lambda p: [{k: v for k, v in r.items() if k not in ("wall_s", "step_time_ms",
                                                            "tokens_per_second", "mfu")}
                     for r in map(json.loads, p.read_text().splitlines())]
  assert strip(run / "metrics.jsonl") == strip(tmp_path / "split" / "metrics.jsonl")

  # Frozen: every base weight is the checkpoint's, bit for bit; the adapters moved.
  base = flat(params_of(G.from_gguf(files["gguf"], max_context=32)))
  adapters = [k for k in a if "lora_" in k]
  assert len(adapters) == 2 * 2 * 2  # qkv and out of 2 layers, A and B each
  assert set(a) - set(adapters) == set(base)
  for k in base:
    np.testing.assert_array_equal(a[k], base[k], err_msg=k)
  for k in adapters:
    if k.endswith("lora_b"):
      assert np.abs(a[k]).max() > 0, k  # started at zero


def test_merged_lora_model_computes_the_same_logits(files, lora_run, tmp_path, capsys):
  model, tokenizer, _ = load_model(lora_run)
  plain = gpt_lora.merged(model)
  assert type(plain) is GPT and type(plain.cfg) is GPTConfig
  assert not any("lora_" in k for k in flat(params_of(plain)))
  tokens_BxT = jnp.asarray(np.random.default_rng(1).integers(0, 259, (2, 20)))
  np.testing.assert_allclose(plain(tokens_BxT), model(tokens_BxT), atol=1e-5, rtol=1e-5)
  # The adapters matter: the base alone computes something else.
  base = G.from_gguf(files["gguf"], max_context=32)
  assert np.abs(np.asarray(base(tokens_BxT) - model(tokens_BxT))).max() > 1e-3
  # Fresh adapters (B = 0) leave the checkpoint's function as it was: step 0 is zero-shot.
  fresh = gpt_lora.with_lora(base, rank=4, alpha=8.0, targets="attn|mlp", seed=3)
  np.testing.assert_array_equal(fresh(tokens_BxT), base(tokens_BxT))

  # `merge` writes a plain-GPT run folder; `sample` reads both folders to the same greedy text.
  out = tmp_path / "merged"
  assert cli.main(["smollm_shakespeare", "merge", str(lora_run), str(out)]) == 0
  loaded, _, _ = load_model(out)
  assert type(loaded) is GPT
  np.testing.assert_allclose(loaded(tokens_BxT), model(tokens_BxT), atol=1e-5, rtol=1e-5)
  capsys.readouterr()
  texts = []
  for folder in (lora_run, out):
    assert cli.main(["sample", f"--init_from={folder}", "--prompt=The king", "--max_new_tokens=6",
                     "--json"]) == 0
    texts.append(json.loads(capsys.readouterr().out)["generated_ids"])
  assert texts[0] == texts[1] and len(texts[0]) == 6


def test_name_pattern_trains_only_the_matching_parameters(files, tmp_path, capsys):
  # Full weight decay on: a frozen weight must not even decay.
  assert train(files, tmp_path, "--config.steps=2", "--config.lora.rank=0",
               "--config.train.trainable=norm", "--config.optimizer.weight_decay=0.5") == 0
  model, _, _ = load_model(tmp_path)
  assert type(model) is GPT
  trained = flat(params_of(model))
  base = flat(params_of(G.from_gguf(files["gguf"], max_context=32)))
  moved = {k for k in base if not np.array_equal(trained[k], base[k])}
  assert moved == {k for k in base if "norm" in k}


@pytest.mark.parametrize("args, message", [
    (["--config.init_from=/nonexistent/model.gguf"], r"neither a GGUF file nor a known name"),
    (["--config.init_from=WRONG"], r"general.architecture='bert'"),
    (["--config.init_from=FOLDER"], r"is a folder, not a GGUF file"),
    (["--config.init_from="], r"config.init_from is empty"),
    (["--config.lora.targets=nothing_here"], r"config.lora.targets: .* match no linear layer"),
    (["--config.train.trainable=nothing_here"], r"config.train.trainable='nothing_here' matches "
                                                r"no parameter"),
    (["--config.train.trainable=("], r"is not a regex"),
    (["--config.model.block_size=65"], r"longer than .*context of 64"),
])
def test_bad_checkpoints_and_settings_are_one_line_errors(files, tmp_path, capsys, args, message):
  wrong = files["dir"] / "bert.gguf"
  if not wrong.exists():
    write_tiny_llama(wrong, arch="bert")
  args = [a.replace("WRONG", str(wrong)).replace("FOLDER", str(files["dir"])) for a in args]
  capsys.readouterr()
  assert train(files, tmp_path, *args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if line.startswith("error:")]
  assert len(errors) == 1 and re.search(message, errors[0]), err


def test_interpret_heads_reads_a_gguf_checkpoint(files, tmp_path, capsys):
  # Scored in chunks of 2 sequences (SmolLM2's maps of 64 at once would take GBs).
  assert interpret_cli.main(["heads", "--init_from", str(files["gguf"]), "--out", str(tmp_path),
                             "--batch", "4", "--length", "12", "--chunk", "2"]) == 0
  got = json.loads((tmp_path / "heads.json").read_text())
  printed = capsys.readouterr().out
  assert re.search(r"induction heads \(layer, head, score\): L\dH\d 0\.\d{3}", printed), printed
  assert (tmp_path / "heads.png").exists()
  for name in ("induction", "prefix_matching", "previous_token"):
    assert np.shape(got[name]) == (2, 4)
  # The same scores as scoring all four sequences at once with the library.
  from research.interpret import scores
  model = G.from_gguf(files["gguf"], max_context=24)
  tokens_BxT = scores.repeated_random_tokens(np.random.default_rng(0), 4, 12, model.cfg.vocab_size)
  want = interpret.score(interpret.attention_maps(model, tokens_BxT),
                         scores.probe_keys(tokens_BxT, 12)["induction"])
  np.testing.assert_allclose(got["induction"], want, atol=2e-4)
  assert interpret_cli.main(["heads", "--init_from", str(files["gguf"]), "--out", str(tmp_path),
                             "--length", "40"]) == 2
  assert "longer than the model's context of" in capsys.readouterr().err


def test_frozen_parameters_gradients_are_not_computed():
  """The step zeroes the frozen parameters' gradients before anything reads them, so XLA drops
  their computation: a LoRA step compiles to fewer FLOPs than a full one."""
  from research import sharding
  from research.train import optim
  from research.train.step import init_state, make_train_step

  cfg = GPTConfig(vocab_size=256, block_size=32, num_layers=2, num_heads=4, embed_dim=128,
                  mlp_dim=256, mlp_activation="swiglu", position="rope", norm="rmsnorm")
  model = gpt_lora.with_lora(GPT(cfg, rngs=nnx.Rngs(0)), rank=4, alpha=8.0, targets="attn")
  config = ml_collections.ConfigDict(dict(
      optimizer=optim.optimizer_fields("adamw"), learning_rate=1e-3, min_learning_rate=0.0,
      warmup_steps=0, decay_steps=0, steps=10, schedule="cosine", grad_clip=1.0,
      train=dict(trainable="lora_")))
  tx = optim.make_optimizer(config)
  graphdef, state = init_state(model, tx)
  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(state, mesh, "dp")
  batch = {"inputs": np.zeros((8, 32), np.int32), "targets": np.zeros((8, 32), np.int32)}
  flops = {}
  for name, trainable in (("masked", optim.trainable_mask(config, state.params)), ("all", None)):
    step = make_train_step(graphdef, next_token_loss, tx, mesh=mesh, state_sharding=shardings,
                           parallelism="dp", seed=0, trainable=trainable)
    cost = step.lower(state, sharding.global_batch(batch, mesh)).compile().cost_analysis()
    flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert flops["masked"] < 0.8 * flops["all"], flops


def test_merged_lora_model_exports_to_transformers(files, tmp_path):
  """Merged, a LoRA model is a plain Llama: `hf_gpt.export` writes it and `transformers`
  computes the adapted model's logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from research.pretrained import hf_gpt

  model = gpt_lora.with_lora(G.from_gguf(files["gguf"], max_context=32), rank=4, alpha=8.0,
                             targets="attn|mlp", seed=1)
  params = params_of(model)
  for layer in params["blocks"].values():  # adapters as if trained
    for name in ("qkv", "out"):
      b = layer["attn"][name]["lora_b"]
      layer["attn"][name]["lora_b"] = 0.1 * jax.random.normal(jax.random.key(b.shape[1]), b.shape)
  nnx.update(model, nnx.State(params))
  hf_gpt.export(gpt_lora.merged(model), tmp_path, G.load_tokenizer(files["gguf"]))
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  ids = np.random.default_rng(0).integers(0, 259, (2, 20))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=5e-5)
  assert np.abs(want - np.asarray(G.from_gguf(files["gguf"], max_context=32)(ids))).max() > 1e-3
