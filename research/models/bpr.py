"""Matrix factorization trained with BPR (Rendle et al. 2009): the classic non-sequential baseline.

score(user, item) = <user vector, item vector> + item bias. Training pushes each rated item
above an item the user did not rate (`research.tasks.recommendation.bpr_loss`). The model
ignores the order of a user's ratings and never sees the validation item.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx


@dataclasses.dataclass(frozen=True)
class BPRConfig:
  num_users: int
  num_items: int  # items are 1..num_items; 0 is padding
  embed_dim: int = 64


class BPRMF(nnx.Module):

  def __init__(self, cfg: BPRConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(stddev=1 / math.sqrt(cfg.embed_dim))
    self.user_embed = nnx.Embed(cfg.num_users, cfg.embed_dim, embedding_init=init, rngs=rngs)
    self.item_embed = nnx.Embed(cfg.num_items + 1, cfg.embed_dim, embedding_init=init, rngs=rngs)
    self.item_bias = nnx.Embed(cfg.num_items + 1, 1, embedding_init=nnx.initializers.zeros,
                               rngs=rngs)

  def score_pairs(self, user_B, items_BxK):
    """[B, K] scores of `items` for each user."""
    u_Bx1xD = self.user_embed(user_B)[:, None]
    return (u_Bx1xD * self.item_embed(items_BxK)).sum(-1) + self.item_bias(items_BxK)[..., 0]

  def score_items(self, history_BxT, user_B):
    """[B, num_items + 1] scores of every item for each user."""
    del history_BxT  # Order-free: the user's vector holds what was learned from the history.
    return self.item_embed.attend(self.user_embed(user_B)) + self.item_bias.embedding[...][:, 0]
