"""The popularity baseline in TLSAN's harness: same data, same interface, same evaluator
(the self-attentive baselines, SASRec and TiSASRec, live in tlsan/sasrec.py).

- `Pop`: recent popularity. Each training interaction counts with weight
  `0.5 ** (age / half_life)`, age measured from the latest training interaction; only events
  that training examples cover (histories, sessions and targets of the train split) count, so
  validation and test targets never leak into the scores. The default half-life (3650 days)
  validated best on the Amazon logs, whose reviews span 15 years (30 days: NDCG@10 0.002,
  365: 0.010, 3650: 0.015 on Digital_Music's validation split); set it shorter for logs of
  recent activity.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from tlsan.config import ModelConfig
from tlsan.data import Batch, Dataset, VocabSizes
from tlsan.scoring import VectorModel

SECONDS_PER_DAY = 86_400


class Pop(VectorModel):
    """Score of item i = its recency-weighted popularity; no user state (D = 0)."""

    trainable = False

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        super().__init__(0, sizes.items, item_category)
        self.config = config
        self.b.requires_grad_(False)  # the scores live in the bias column

    @torch.no_grad()
    def fit(self, dataset: Dataset) -> Pop:
        """Set the scores from the training split's events (vectorised, one pass)."""
        self.b.copy_(torch.from_numpy(popularity_scores(dataset, self.config.pop_half_life_days)))
        return self

    def user_state(self, batch: Batch) -> Tensor:
        return torch.zeros(len(batch), 0, dtype=self.b.dtype)  # (B, 0)

    def item_embed(self, items: Tensor) -> Tensor:
        return torch.zeros(*items.shape, 0, dtype=self.b.dtype)  # (..., 0)

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        return torch.zeros(())  # nothing to train


def popularity_scores(dataset: Dataset, half_life_days: float) -> np.ndarray:
    """(N,) float32 recency-weighted counts over the events training examples cover."""
    train = dataset.train.arrays
    assert train.target_pos is not None
    covered = (train.target_pos + 1).numpy()  # events up to and incl. the target
    cutoff = (
        pl.DataFrame({"user": train.user.numpy().astype(np.int32), "cutoff": covered})
        .group_by("user")
        .agg(pl.col("cutoff").max())
    )
    events = (
        dataset.events()
        .lazy()
        .join(cutoff.lazy(), on="user", how="inner")
        .filter(pl.col("pos") < pl.col("cutoff"))
        .select("item", "timestamp")
        .collect()
    )
    scores = np.zeros(dataset.sizes.items, dtype=np.float64)
    if events.height:
        ts = events.get_column("timestamp").to_numpy().astype(np.float64)
        age_days = (ts.max() - ts) / SECONDS_PER_DAY
        weights = np.exp2(-age_days / half_life_days)
        np.add.at(scores, events.get_column("item").to_numpy(), weights)
    scores[0] = 0.0
    return scores.astype(np.float32)
