"""GPT character-level language model on Tiny Shakespeare (nanoGPT's shakespeare_char).

Command:  make experiment NAME=gpt_shakespeare            (variant `baby`, the default)
          make experiment NAME=gpt_shakespeare:gpu        (nanoGPT's GPU config)
          make experiment NAME=gpt_shakespeare:speedrun   (nanoGPT's quality in under half its time)
          make experiment NAME=gpt_shakespeare:tiny       (seconds; for tests)
Expected: `baby` (4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps, 0.80M
          parameters) logs val loss 1.898 on its 20 validation batches; that estimate has a
          standard deviation of 0.014. Over five seeds the loss on every validation window is
          1.905 +- 0.006, as for nanoGPT's model and step in PyTorch on the same batches
          (1.904; benchmarks/val_loss_noise.py). nanoGPT's own run logged 1.8857. `gpu`
          (6 layers, width 384, context 256, batch 64, 5000 steps) targets nanoGPT's 1.4697 on
          one A100 (not run here: no GPU).
          `speedrun` (`SPEEDRUN_CHANGES` below) reaches nanoGPT's own all-window val loss in
          0.39x its wall time (median of 3 seeds, 0.37-0.40x; ends at 1.871-1.889), `make
          speedrun`.
Runtime:  `baby` about 2 minutes on a 2-core CPU (see the README's results table); `speedrun`
          about 25 s of training.
Data:     tfds `tiny_shakespeare`, or any UTF-8 file with --config.data.text_file=PATH.
"""

import ml_collections
from flax import nnx

from research import config as config_lib
from research.models.gpt import GPT, GPTConfig
from research.tasks.language_model import Sampling, char_lm_task, load_char_data

VARIANTS = ("baby", "gpu", "speedrun", "tiny")

# `speedrun` is `baby` with these changes, in the order `make speedrun ARGS=--ablation` adds
# them one at a time (benchmarks/speedrun.py; the README's speedrun section has the table).
SPEEDRUN_CHANGES = (
    ("batch 32, 225 steps, learning rate 8e-3",
     ["--config.batch_size=32", "--config.steps=225", "--config.learning_rate=8e-3",
      "--config.min_learning_rate=8e-4", "--config.warmup_steps=20"]),
    ("Muon for the weight matrices", ["--config.optimizer.name=muon"]),
    ("ReLU² MLP", ["--config.model.mlp_activation=relu2"]),
    ("QK-norm", ["--config.model.qk_norm=true"]),
    ("untied output head", ["--config.model.tie_embeddings=false"]),
    ("zero-initialized output projections", ["--config.model.zero_init_projections=true"]),
)


def get_config(variant: str = "baby") -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data = dict(dataset="tiny_shakespeare", manual_dir="", text_file="")
  # GPTConfig's fields; vocab_size comes from the data, dtype from config.compute_dtype.
  c.model = config_lib.model_config(
      GPTConfig, exclude=("vocab_size",), num_layers=4, num_heads=4, embed_dim=128,
      block_size=64, dropout=0.0, use_bias=False, position="learned", attention="xla",
      remat=False)
  c.sample = dict(prompt="\n", num_tokens=500, count=3, temperature=0.8, top_k=200)
  c.eval_batches = 20
  # nanoGPT's config/train_shakespeare_char.py, with its CPU ("baby") overrides.
  c.update(steps=2000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
           warmup_steps=100, grad_clip=1.0, eval_every=250, log_every=10, checkpoint_every=500)
  c.optimizer.update(name="adamw", b1=0.9, b2=0.99, weight_decay=0.1)
  if variant == "gpu":
    c.model.update(num_layers=6, num_heads=6, embed_dim=384, block_size=256, dropout=0.2)
    c.update(steps=5000, batch_size=64, eval_every=250, checkpoint_every=1000)
    c.eval_batches = 200
  elif variant == "speedrun":
    c = config_lib.apply_overrides(c, [arg for _, args in SPEEDRUN_CHANGES for arg in args])
    c.update(eval_every=75, checkpoint_every=225)
  elif variant == "tiny":
    c.model.update(num_layers=2, num_heads=2, embed_dim=32, block_size=16)
    c.update(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2, eval_every=10,
             log_every=5, checkpoint_every=10)
    c.eval_batches = 2
    c.sample.update(num_tokens=8, count=1)
  elif variant != "baby":
    raise ValueError(f"unknown variant {variant!r}")
  return c


def build(config):
  tokenizer, tokens = load_char_data(config)
  model = GPT(GPTConfig(**config.model, vocab_size=tokenizer.vocab_size,
                        dtype=config.compute_dtype), rngs=nnx.Rngs(config.seed))
  return char_lm_task(config, model, tokenizer, tokens, context=config.model.block_size,
                      eval_batches=config.eval_batches, sample=Sampling(**config.sample))
