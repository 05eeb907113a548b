"""The random draws of the paper's reference code, replayed for `--protocol reference`.

The reference builder (TsingZ0/TLSAN `build_dataset.py`) seeds Python's `random` with 1234,
then walks the users in id order: for every event of a user it draws one negative (`randint`
until the item is not among the user's items), then, if the user's test session holds several
items, it picks the test target with `random.choice`. Replaying the same calls on a
`random.Random(1234 + seed)` in the same order gives the very same negatives and test targets
as the reference on the same log (when the log's ids are the dense integers the reference
uses; otherwise draws of the same law), so `--protocol reference` differs from the reference
code in nothing but the model's implementation. One sequential pass over the events: meant
for the paper's logs, not for scale.
"""

from __future__ import annotations

import random

import numpy as np
import polars as pl

from pipelines.config import SECONDS_PER_DAY
from pipelines.errors import DataValidationError

REFERENCE_SEED = 1234


def with_reference_draws(events: pl.DataFrame, n_items: int, cap: int, seed: int) -> pl.DataFrame:
    """`events` (user, item, timestamp; sorted by user, time, input order) with two columns:
    `negative` (the item index drawn for each event) and `test_draw` (per user, the position
    of the test target within its test session, the same on every row of the user)."""
    rng = random.Random(REFERENCE_SEED + seed)
    users = events["user"].to_numpy()
    items = (events["item"].to_numpy() - 1).tolist()  # the reference's 0-based item ids
    days = (events["timestamp"].to_numpy() // SECONDS_PER_DAY).tolist()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]).tolist()
    bounds = [*starts, len(users)]
    negatives = np.zeros(len(users), dtype=np.int32)
    draws = np.zeros(len(users), dtype=np.int32)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        pos_list = items[a:b]
        seen = set(pos_list)
        if len(seen) >= n_items:  # the reference would loop forever
            raise DataValidationError(
                f"--protocol reference: user index {users[a]} interacted with all {n_items} "
                "items, so no negative can be drawn outside them as the reference code does"
            )
        for k in range(b - a):  # gen_neg() for every event, in order
            neg = pos_list[0]
            while neg in seen:
                neg = rng.randint(0, n_items - 1)
            negatives[a + k] = neg + 1
        draws[a:b] = _test_draw(days[a:b], cap, rng)
    return events.with_columns(
        pl.Series("negative", negatives, pl.Int32), pl.Series("test_draw", draws, pl.Int32)
    )


def _test_draw(days: list[int], cap: int, rng: random.Random) -> int:
    """The reference's walk over one user's day sessions: at the test session, a choice among
    its items when it holds several (0 otherwise, and when there is no test session)."""
    limit = min(len(days), cap) if cap else len(days)
    i = 0
    first = True
    while i < len(days):
        count = days.count(days[i])  # events of this day (they are consecutive)
        if not first and i + count >= limit - 1:
            return rng.choice(range(count)) if count > 1 else 0
        first = False
        i += count
    return 0


def first_positions(table: pl.DataFrame, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The position of each (user, item)'s first event in the table (the pair must exist):
    the reference pairs the test target with the negative of that position."""
    n = int(max(int(table["item"].max() or 0), int(items.max(initial=0)))) + 1
    keys = table["user"].to_numpy().astype(np.int64) * n + table["item"].to_numpy()
    unique, first = np.unique(keys, return_index=True)  # rows sorted by user, pos: first event
    at = np.searchsorted(unique, users.astype(np.int64) * n + items)
    return table["pos"].to_numpy()[first[at]]
