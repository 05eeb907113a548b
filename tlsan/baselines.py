"""The popularity baseline in TLSAN's harness: same data, same interface, same evaluator
(the self-attentive baselines, SASRec and TiSASRec, live in tlsan/sasrec.py).

- `Pop`: recent popularity (tlsan/popularity.py, the same function the bundle's cold-start
  ranking uses). Only events that training examples cover (histories, sessions and targets of
  the train split) count, so validation and test targets never leak into the scores. The
  half-life (`model.pop_half_life_days`) is chosen on the validation split by default (0):
  the best of `HALF_LIFE_GRID` by the run's select metric (`choose_half_life`); an explicit
  value is used as given. Logs differ a lot here: on the last-session split Digital_Music
  validates best at 3,650-10,000 days, Office_Products at 90-365, Clothing at 365.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from tlsan.config import ModelConfig
from tlsan.data import Batch, Dataset, VocabSizes
from tlsan.errors import ConfigError
from tlsan.metrics import DEFAULT_KS
from tlsan.popularity import (
    CHOOSE,
    HALF_LIFE_GRID,
    half_life_json,
    half_life_label,
    recency_popularity,
)
from tlsan.scoring import VectorModel


class Pop(VectorModel):
    """Score of item i = its recency-weighted popularity; no user state (D = 0)."""

    trainable = False

    def __init__(self, config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> None:
        super().__init__(0, sizes.items, item_category)
        self.config = config
        self.b.requires_grad_(False)  # the scores live in the bias column
        self.half_life_days = config.pop_half_life_days  # CHOOSE until `fit` chose one
        self.selection: dict[str, float] = {}  # validation metric per half-life, when chosen

    @torch.no_grad()
    def fit(
        self, dataset: Dataset, *, select_metric: str = "ndcg@10", include_history: bool = False
    ) -> Pop:
        """Set the scores from the training split's events; with `pop_half_life_days` 0,
        choose the half-life on the validation split first (`choose_half_life`)."""
        items, stamps = training_events(dataset)
        half_life = self.config.pop_half_life_days
        if half_life == CHOOSE:
            half_life, self.selection = choose_half_life(
                self, dataset, items, stamps, select_metric, include_history
            )
        self._set_scores(items, stamps, half_life)
        return self

    def _set_scores(self, items: np.ndarray, stamps: np.ndarray, half_life: float) -> None:
        popularity = recency_popularity(items, stamps, self.b.shape[0], half_life)
        self.b.copy_(torch.from_numpy(popularity.scores.astype(np.float32)))
        self.half_life_days = half_life

    def popularity_summary(self) -> dict[str, Any]:
        """What a run records about its popularity (config.json): the half-life used (null =
        no decay) and, when it was chosen, the validation metric of every candidate."""
        return {
            "half_life_days": half_life_json(self.half_life_days),
            "chosen_on_validation": bool(self.selection),
            "validation": self.selection,
        }

    def user_state(self, batch: Batch) -> Tensor:
        return torch.zeros(len(batch), 0, dtype=self.b.dtype, device=self.b.device)  # (B, 0)

    def item_embed(self, items: Tensor) -> Tensor:
        return torch.zeros(*items.shape, 0, dtype=self.b.dtype, device=self.b.device)

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        return torch.zeros((), device=self.b.device)  # nothing to train


def training_events(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(items, timestamps) of the events training examples cover: per user, the events up
    to and including the user's last training target."""
    train = dataset.train.arrays
    if train.target_pos is None:
        raise ConfigError(f"{dataset.path}: pop needs target_pos (a prepared dataset)")
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
    return events.get_column("item").to_numpy(), events.get_column("timestamp").to_numpy()


def choose_half_life(
    model: Pop,
    dataset: Dataset,
    items: np.ndarray,
    stamps: np.ndarray,
    select_metric: str = "ndcg@10",
    include_history: bool = False,
    grid: tuple[float, ...] = HALF_LIFE_GRID,
) -> tuple[float, dict[str, float]]:
    """The half-life of `grid` whose popularity scores best on the validation split by
    `select_metric` (the first of equals, so the shorter one); never reads test. Returns it
    and the metric per candidate (`half_life_label` keys). Leaves `model` scored with it."""
    from tlsan.evaluate import evaluate_model

    if "valid" not in dataset.splits or len(dataset.valid) == 0:
        raise ConfigError(
            "model.pop_half_life_days: 0 chooses the half-life on the validation split, which "
            f"{dataset.path} does not have (loaded: {', '.join(dataset.splits)}); give a "
            "positive number of days"
        )
    ks = DEFAULT_KS
    if "@" in select_metric:
        ks = tuple(sorted(set(ks) | {int(select_metric.split("@")[1])}))
    best, best_value = grid[0], -math.inf
    selection: dict[str, float] = {}
    for half_life in grid:
        model._set_scores(items, stamps, half_life)
        result = evaluate_model(model, dataset.valid, ks=ks, include_history=include_history)
        value = result.metrics[select_metric]
        selection[half_life_label(half_life)] = value
        if value > best_value:
            best, best_value = half_life, value
    model._set_scores(items, stamps, best)
    return best, selection
