"""The GPT's speedrun knobs (ReLU², untied head, zero-initialised projections, logit
soft-capping, QK-norm): each does what it says, trains, and an unknown name is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from experiments.__main__ import main
from research import config as config_lib
from research.evaluate.writer import read_metrics
from research.models.gpt import GPT, MLP_ACTIVATIONS, GPTConfig
from research.train import loop

V, T = 11, 12


def gpt(**kw):
  cfg = dict(vocab_size=V, block_size=T, num_layers=2, num_heads=2, embed_dim=16)
  return GPT(GPTConfig(**{**cfg, **kw}), rngs=nnx.Rngs(0))


def tokens(B=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize("knob", ["--config.model.mlp_activation=relu2",
                                  "--config.model.tie_embeddings=false",
                                  "--config.model.zero_init_projections=true",
                                  "--config.model.logit_softcap=3.0",
                                  "--config.model.qk_norm=true"])
def test_each_knob_trains_a_tiny_run(tmp_path, knob):
  config = config_lib.apply_overrides(experiments.get_config("gpt_shakespeare:tiny"), [
      f"--config.workdir={tmp_path}", "--config.progress_bar=false", "--config.steps=12",
      "--config.log_every=1", "--config.eval_every=12", "--config.checkpoint_every=12", knob])
  task = experiments.load("gpt_shakespeare").build(config)
  task.finish = None
  loop.train(task, config, experiment="gpt_shakespeare:tiny")
  losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert losses[-1] < losses[0] - 0.15, losses


def test_relu2_mlp_squares_the_relu():
  mlp, x_NxD = gpt(mlp_activation="relu2").blocks[0].mlp, jax.random.normal(jax.random.key(1), (5, 16))
  expected = mlp.down(jnp.square(jnp.maximum(mlp.up(x_NxD), 0)))
  np.testing.assert_allclose(mlp(x_NxD[None])[0], expected, rtol=1e-6)
  gelu = gpt().blocks[0].mlp  # same weights (same seed), GPT-2's tanh GELU
  np.testing.assert_allclose(gelu(x_NxD[None])[0],
                             gelu.down(jax.nn.gelu(gelu.up(x_NxD), approximate=True)), rtol=1e-6)


def test_softcap_bounds_logits():
  big = lambda model: with_scaled_embedding(model, 100.0)  # raw logits far beyond the cap
  raw, capped = big(gpt())(tokens()), big(gpt(logit_softcap=2.0))(tokens())
  assert float(jnp.abs(raw).max()) > 10
  assert float(jnp.abs(capped).max()) <= 2.0
  np.testing.assert_allclose(capped, 2.0 * jnp.tanh(raw / 2.0), rtol=1e-5, atol=1e-6)


def with_scaled_embedding(model, factor):
  model.embed.embedding.value = model.embed.embedding.value * factor
  return model


def test_zero_init_makes_the_initial_residual_branches_zero():
  model, x = gpt(zero_init_projections=True), tokens()
  h_BxTxD = model._embed(x, 0)
  for block in model.blocks:
    attn_BxTxD, _ = block.attn(block.norm1(h_BxTxD), causal=True)
    np.testing.assert_array_equal(attn_BxTxD, 0.0)
    np.testing.assert_array_equal(block.mlp(block.norm2(h_BxTxD)), 0.0)
  # So every block starts as the identity: logits straight from the embeddings.
  np.testing.assert_allclose(model(x), model._logits(h_BxTxD), rtol=1e-6)
  # Only those projections are zero; without the knob they are not.
  default = gpt()
  assert np.any(default.blocks[0].attn.out.kernel.value != 0)
  assert np.any(default.blocks[0].mlp.down.kernel.value != 0)
  assert np.any(model.blocks[0].mlp.up.kernel.value != 0)
  assert np.any(model.blocks[0].attn.qkv.kernel.value != 0)


def test_untied_head_has_separate_parameters():
  tied, untied = gpt(), gpt(tie_embeddings=False)
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(untied) == count(tied) + 16 * V
  assert "head" not in nnx.state(tied, nnx.Param)
  assert untied.head.kernel.value.shape == (16, V)
  # The logits are linear in the head (and no longer in the input embedding).
  x = tokens()
  before = untied(x)
  untied.head.kernel.value = untied.head.kernel.value * 2
  np.testing.assert_allclose(untied(x), 2 * before, rtol=1e-5, atol=1e-6)
  # Gradients reach both tables separately.
  graphdef, params = nnx.split(untied, nnx.Param)
  grads = jax.grad(lambda p: nnx.merge(graphdef, p)(x).sum())(params)
  assert np.any(grads["head"]["kernel"].value != 0)
  assert np.any(grads["embed"]["embedding"].value != 0)
  # The head is the same matmul the tied table was: the same FLOPs per token.
  assert untied.flops_per_token() == tied.flops_per_token()


def test_unknown_activation_is_a_one_line_error_listing_the_valid_names(monkeypatch, capsys,
                                                                         tmp_path):
  monkeypatch.setattr(experiments.load("gpt_shakespeare"), "build",
                      lambda config: pytest.fail("build() was reached"))
  assert main(["gpt_shakespeare:tiny", f"--config.workdir={tmp_path}",
               "--config.model.mlp_activation=swish"]) == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
  assert errors == ["error: unknown config.model.mlp_activation 'swish'; valid names: "
                    + ", ".join(MLP_ACTIVATIONS)]
  with pytest.raises(ValueError, match="unknown mlp_activation 'swish'; valid names: gelu, relu2"):
    gpt(mlp_activation="swish")
  with pytest.raises(ValueError, match="logit_softcap must be >= 0"):
    gpt(logit_softcap=-1.0)
