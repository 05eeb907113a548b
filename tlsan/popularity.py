"""Recency-weighted popularity: the one implementation behind the `pop` baseline's scores
(tlsan/baselines.py, training events) and the bundle's cold-start ranking (tlsan/bundle.py,
every event known at export).

An event of age `a` days counts `0.5 ** (a / half_life_days)`, age measured from the latest of
the events counted (`reference_time`); an infinite half-life counts every event once (no
decay). Which half-life suits a log depends on how fast its catalogue turns over (measured on
the leak-free last-session split's validation NDCG@10: Digital_Music prefers 3,650-10,000
days, Office_Products 90-365, Clothing 365), so by default it is chosen on the validation
split from `HALF_LIFE_GRID` (`tlsan.baselines.choose_half_life`); `CHOOSE` (0) asks for that.

NumPy only (no torch): the bundle reads it without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SECONDS_PER_DAY = 86_400
CHOOSE = 0.0  # `pop_half_life_days` / `--popularity-half-life-days`: choose on validation
NO_DECAY = math.inf
HALF_LIFE_GRID: tuple[float, ...] = (7.0, 30.0, 90.0, 365.0, 1000.0, 3650.0, 10000.0, NO_DECAY)


def check_half_life(value: float, name: str) -> float:
    """A positive number of days (`inf`: no decay); anything else raises ValueError naming
    `name` (callers turn it into their ConfigError/BundleError)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"{name}: expected a positive number of days (inf: no decay), got {value!r}"
        )
    return float(value)


def half_life_json(value: float) -> float | None:
    """The half-life as JSON: a number of days, or null for no decay (strict JSON has no inf)."""
    return None if math.isinf(value) else float(value)


def half_life_from_json(value: float | None) -> float:
    """Inverse of `half_life_json`."""
    return NO_DECAY if value is None else float(value)


def half_life_label(value: float) -> str:
    """`3650 days` or `no decay`: how tables and explanations name a half-life."""
    return "no decay" if math.isinf(value) else f"{value:g} days"


@dataclass(frozen=True)
class Popularity:
    """Per item index (row 0 = padding, always 0): decayed score and plain event count."""

    scores: np.ndarray  # (N,) float64
    counts: np.ndarray  # (N,) int64
    half_life_days: float
    reference_time: int | None  # the latest event counted (None: no events)


def recency_popularity(
    items: np.ndarray,
    timestamps: np.ndarray,
    n_items: int,
    half_life_days: float,
    *,
    reference_time: int | None = None,
) -> Popularity:
    """Popularity of the events `(items[e], timestamps[e])` over a catalog of `n_items` rows.

    `reference_time` defaults to the latest timestamp given: popularity "as of" the log's end.
    """
    half_life = check_half_life(half_life_days, "half_life_days")
    items = np.asarray(items, dtype=np.int64)
    stamps = np.asarray(timestamps, dtype=np.float64)
    if items.shape != stamps.shape:
        raise ValueError(f"items and timestamps differ in length: {items.shape} vs {stamps.shape}")
    scores = np.zeros(n_items, dtype=np.float64)
    counts = np.zeros(n_items, dtype=np.int64)
    reference = reference_time
    if items.size:
        if reference is None:
            reference = int(stamps.max())
        if math.isinf(half_life):
            weights = np.ones_like(stamps)
        else:
            weights = np.exp2(-(reference - stamps) / (half_life * SECONDS_PER_DAY))
        np.add.at(scores, items, weights)
        counts = np.bincount(items, minlength=n_items).astype(np.int64)
    scores[0], counts[0] = 0.0, 0
    return Popularity(scores, counts, half_life, reference)
