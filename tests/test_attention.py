"""One attention path: the function's contract, the module's options, and every Transformer
training the same with the Pallas kernel (interpreted on CPU) as with XLA, through the sharded
train step and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import __main__ as cli
from kernels.flash_attention import reference
from research import sharding
from research.models.encoder import Encoder, EncoderClassifier, EncoderConfig
from research.models.gpt import GPT, GPTConfig
from research.models.sasrec import SASRec, SASRecConfig
from research.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from research.models.vit import ViT, ViTConfig
from research.nn.attention import MultiHeadAttention, dot_product_attention, padding_segments
from research.train.step import init_state, make_train_step


def _qkv(B=2, T=12, S=12, H=4, K=2, D=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (B, T, H, D)), jax.random.normal(keys[1], (B, S, K, D)),
          jax.random.normal(keys[2], (B, S, K, D)))


def _right_padded(B, T, low, high, seed=0, min_len=1):
  """[B, T] ids in [low, high) followed by zeros; every row has padding and a real token."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, T - 1, B)
  ids = rng.integers(low, high, (B, T))
  return np.where(np.arange(T)[None] < lengths[:, None], ids, 0).astype(np.int32)


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_matches_xla_with_padding_segments(causal):
  q, k, v = _qkv()
  segments = padding_segments(jnp.asarray(_right_padded(2, 12, 1, 2)) > 0)
  run = lambda impl: lambda q, k, v: dot_product_attention(
      q, k, v, causal=causal, segment_ids=segments, implementation=impl)
  out, vjp = jax.vjp(run("pallas"), q, k, v)
  expected, ref_vjp = jax.vjp(run("xla"), q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  for grad, ref_grad in zip(vjp(jnp.cos(out)), ref_vjp(jnp.cos(out))):
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)


def test_impossible_requests_fail_with_a_clear_error():
  q, k, v = _qkv()
  for kernel in ("pallas", "mosaic"):
    with pytest.raises(ValueError, match="not a dense mask"):
      dot_product_attention(q, k, v, mask_BxHxTxS=jnp.ones((1, 1, 12, 12), bool),
                            implementation=kernel)
  with pytest.raises(ValueError, match="return_weights takes causal and segment-id masks"):
    dot_product_attention(q, k, v, mask_BxHxTxS=jnp.ones((1, 1, 12, 12), bool),
                          return_weights=True)
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="choose one of xla, cudnn, pallas, mosaic, auto"):
    dot_product_attention(q, k, v, implementation="flash")


def test_returned_weights_are_the_attention_that_produced_the_output():
  q, k, v = _qkv(T=6, S=9)
  segments = (jnp.ones((2, 6), jnp.int32), jnp.asarray(_right_padded(2, 9, 1, 2) > 0, jnp.int32))
  out, weights_BxHxTxS = dot_product_attention(q, k, v, segment_ids=segments,
                                               return_weights=True)
  np.testing.assert_allclose(weights_BxHxTxS.sum(-1), 1, atol=1e-6)
  assert float(jnp.where(segments[1][:, None, None, :] == 0, weights_BxHxTxS, 0).max()) == 0
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, segment_ids=segments),
                             atol=1e-5)
  np.testing.assert_allclose(
      out, reference.attention(q, k, v, segment_ids=segments)[0], atol=1e-5)


def test_grouped_query_attention_is_attention_with_kv_heads_shared():
  rngs = nnx.Rngs(0)
  gqa = MultiHeadAttention(32, 4, num_kv_heads=2, rngs=rngs)
  mha = MultiHeadAttention(32, 4, rngs=rngs)
  mha.query.kernel[...], mha.out.kernel[...] = gqa.query.kernel[...], gqa.out.kernel[...]
  mha.query.bias[...], mha.out.bias[...] = gqa.query.bias[...], gqa.out.bias[...]
  # [D, (k|v), kv head, head dim] -> each kv head repeated for its two query heads.
  tile = lambda w: jnp.repeat(w.reshape(*w.shape[:-1], 2, 2, 8), 2, axis=-2).reshape(
      *w.shape[:-1], 64)
  mha.key_value.kernel[...] = tile(gqa.key_value.kernel[...])
  mha.key_value.bias[...] = tile(gqa.key_value.bias[...])
  x_BxTxD = jax.random.normal(jax.random.key(1), (2, 7, 32))
  np.testing.assert_allclose(gqa(x_BxTxD, causal=True)[0], mha(x_BxTxD, causal=True)[0],
                             atol=1e-5)
  assert gqa.init_cache(2, 7)["k"].shape == (2, 7, 2, 8)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
  attn = MultiHeadAttention(16, 2, qk_norm=True, use_bias=False, rngs=nnx.Rngs(0))
  x_BxTxD = jax.random.normal(jax.random.key(1), (2, 5, 16))
  before = attn(x_BxTxD, causal=True)[0]
  attn.query.kernel[...] = attn.query.kernel[...] * 10
  k_half = attn.key_value.kernel[...].shape[1] // 2
  attn.key_value.kernel[..., :k_half] = attn.key_value.kernel[..., :k_half] * 10
  np.testing.assert_allclose(attn(x_BxTxD, causal=True)[0], before, atol=1e-4)


@pytest.mark.parametrize("options", [dict(num_kv_heads=1, position="rope", qk_norm=True),
                                     dict(num_kv_heads=2)])
def test_gpt_variants_decode_from_the_cache_as_the_full_pass_does(options):
  model = GPT(GPTConfig(vocab_size=20, block_size=12, num_layers=2, num_heads=4, embed_dim=32,
                        **options), rngs=nnx.Rngs(0))
  tokens_BxT = jax.random.randint(jax.random.key(2), (2, 12), 0, 20)
  full_BxTxV = model(tokens_BxT)
  cache = model.init_cache(2)
  prefill, cache = model.decode(tokens_BxT[:, :5], cache, 0)
  steps = [prefill]
  for t in range(5, 12):
    logits, cache = model.decode(tokens_BxT[:, t:t + 1], cache, t)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, atol=1e-4)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_a_packed_sequence_gets_the_states_it_gets_alone(attention):
  encoder = Encoder(EncoderConfig(vocab_size=30, max_len=16, num_layers=2, num_heads=2,
                                  embed_dim=16, dropout=0.0, attention=attention),
                    rngs=nnx.Rngs(0))
  a, b = np.arange(3, 9), np.arange(10, 15)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
  segments = jnp.asarray(np.repeat([1, 2, 0], [6, 5, 2])[None], jnp.int32)
  states_1xTxD = encoder(packed, segment_ids_BxT=segments)
  np.testing.assert_allclose(states_1xTxD[:, :6], encoder(jnp.asarray(a[None])), atol=1e-5)
  np.testing.assert_allclose(states_1xTxD[:, 6:11], encoder(jnp.asarray(b[None])), atol=1e-5)


# Every Transformer of research/models, a batch for it, and how to call it. Batches have
# padding (or packing) wherever the model takes it, so the kernel gets segment ids.
B = 8


def _gpt(attention):
  return GPT(GPTConfig(vocab_size=16, block_size=12, num_layers=2, num_heads=2, embed_dim=16,
                       num_kv_heads=1, attention=attention), rngs=nnx.Rngs(0))


def _classifier(attention):
  return EncoderClassifier(EncoderConfig(vocab_size=16, max_len=12, num_layers=2, num_heads=2,
                                         embed_dim=16, num_classes=3, attention=attention),
                           rngs=nnx.Rngs(0))


def _packed_encoder(attention):
  return Encoder(EncoderConfig(vocab_size=16, max_len=12, num_layers=2, num_heads=2,
                               embed_dim=16, attention=attention), rngs=nnx.Rngs(0))


def _seq2seq(attention):
  return Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=16, tgt_vocab_size=16, num_heads=2,
                                          num_encoder_layers=1, num_decoder_layers=1,
                                          embed_dim=16, mlp_dim=32, attention=attention),
                            rngs=nnx.Rngs(0))


def _vit(attention):
  return ViT(ViTConfig(image_size=8, patch_size=2, num_classes=3, num_layers=2, num_heads=2,
                       embed_dim=16, mlp_dim=32, dropout=0.1, attention=attention),
             rngs=nnx.Rngs(0))


def _sasrec(attention):
  return SASRec(SASRecConfig(num_items=20, max_len=12, embed_dim=16, num_heads=2,
                             attention=attention), rngs=nnx.Rngs(0))


def _packed_segments():
  segments = np.zeros((B, 12), np.int32)
  for row, lengths in enumerate(np.random.default_rng(3).integers(2, 5, (B, 3))):
    segments[row, :lengths.sum()] = np.repeat([1, 2, 3], lengths)
  return segments


MODELS = {
    "gpt": (_gpt, lambda m, b, r: m(b["x"], rngs=r),
            lambda: {"x": np.random.default_rng(0).integers(0, 16, (B, 12), np.int32)}),
    "encoder_padded": (_classifier, lambda m, b, r: m(b["x"], rngs=r),
                       lambda: {"x": _right_padded(B, 12, 1, 16)}),
    "encoder_packed": (_packed_encoder,
                       lambda m, b, r: m(b["x"], segment_ids_BxT=b["segments"], rngs=r),
                       lambda: {"x": np.where(_packed_segments() > 0, 5, 0).astype(np.int32),
                                "segments": _packed_segments()}),
    "seq2seq": (_seq2seq, lambda m, b, r: m(b["src"], b["tgt"], rngs=r),
                lambda: {"src": _right_padded(B, 10, 3, 16), "tgt": _right_padded(B, 7, 3, 16, 1)}),
    "vit": (_vit, lambda m, b, r: m(b["x"], rngs=r),
            lambda: {"x": np.random.default_rng(0).normal(size=(B, 8, 8, 1)).astype(np.float32)}),
    "sasrec": (_sasrec, lambda m, b, r: m(b["x"], rngs=r),
               lambda: {"x": _right_padded(B, 12, 1, 21)[:, ::-1].copy()}),  # left-padded
}


def _train(name, attention, parallelism, devices, steps=2):
  make, call, batch = MODELS[name]

  def loss_fn(model, batch, rngs):
    out = call(model, batch, rngs).astype(jnp.float32)
    loss = jnp.mean(jnp.sin(3 * out))  # any smooth function of every output
    return loss, {"loss": loss}

  # SGD: Adam would turn rounding noise in gradients that are zero in exact arithmetic (the
  # key bias's) into whole steps.
  tx = optax.sgd(0.5)
  graphdef, state = init_state(make(attention), tx)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  shardings = sharding.state_shardings(state, mesh, parallelism)
  state = jax.device_put(state, shardings)
  step = make_train_step(graphdef, loss_fn, tx, mesh=mesh, state_sharding=shardings,
                         parallelism=parallelism, seed=0)
  batch = sharding.global_batch(batch(), mesh)
  jaxpr = str(step.trace(state, batch).jaxpr)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), jaxpr


SETUPS = [(name, "dp", 8) for name in MODELS] + [(name, "fsdp", 8) for name in MODELS] + [
    ("gpt", "dp", 1), ("encoder_padded", "fsdp", 1)]


@pytest.mark.parametrize("name,parallelism,devices", SETUPS)
def test_every_transformer_trains_the_same_with_pallas_in_the_sharded_step(
    name, parallelism, devices):
  xla_losses, xla_params, xla_jaxpr = _train(name, "xla", parallelism, devices)
  pallas_losses, pallas_params, pallas_jaxpr = _train(name, "pallas", parallelism, devices)
  assert "pallas_call" in pallas_jaxpr and "pallas_call" not in xla_jaxpr
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), pallas_params,
               xla_params)


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"] + [
      r["loss"] for r in rows if r["split"] == "val"]


@pytest.mark.parametrize("parallelism", ["dp", "fsdp"])
def test_the_cli_trains_a_gpt_with_the_pallas_kernel(tmp_path, parallelism, capsys):
  common = ["--config.steps=4", "--config.log_every=1", "--config.eval_every=4",
            "--config.progress_bar=false", f"--config.parallelism={parallelism}"]
  for attention in ("xla", "pallas"):
    argv = ["gpt_shakespeare:tiny", f"--config.model.attention={attention}",
            f"--config.workdir={tmp_path / attention}", *common]
    assert cli.main(argv) == 0, capsys.readouterr().err
  np.testing.assert_allclose(_losses(tmp_path / "pallas"), _losses(tmp_path / "xla"), rtol=1e-5)


def test_the_cli_refuses_cudnn_on_cpu(tmp_path, capsys):
  argv = ["gpt_shakespeare:tiny", "--config.model.attention=cudnn",
          f"--config.workdir={tmp_path}"]
  assert cli.main(argv) == 2
  assert "needs an NVIDIA GPU" in capsys.readouterr().err
