"""Fixed negatives of the paper's published protocol (`--protocol reference`).

The reference code draws one negative per event of a user, once, uniformly among the items the
user never interacted with (in the whole log); a training transition pairs its target with the
negative of the target's position, the test example with the negative of the first position
of its target item. We draw with a counter-based hash of (user, position, attempt, seed), so
the draws do not depend on row order, block sizes or library versions.
"""

from __future__ import annotations

import numpy as np
import polars as pl

MAX_ATTEMPTS = 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def event_negatives(table: pl.DataFrame, n_items: int, seed: int) -> np.ndarray:
    """(n_events,) int32: for every row of the event table (sorted by user, pos), an item
    index in 1..n_items that its user never interacted with (0 if every attempt hit one)."""
    user = table["user"].to_numpy().astype(np.uint64)
    pos = table["pos"].to_numpy().astype(np.uint64)
    items = table["item"].to_numpy().astype(np.int64)
    seen = np.unique(user.astype(np.int64) * (n_items + 1) + items)
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(user * np.uint64(1 << 32) + pos) + np.uint64(seed))
    negatives = np.zeros(user.size, dtype=np.int64)
    todo = np.arange(user.size)
    for attempt in range(MAX_ATTEMPTS):
        if todo.size == 0:
            break
        with np.errstate(over="ignore"):
            draw = _splitmix64(base[todo] + np.uint64(attempt) * _GOLDEN)
        candidate = (draw % np.uint64(n_items)).astype(np.int64) + 1
        keys = user[todo].astype(np.int64) * (n_items + 1) + candidate
        at = np.minimum(np.searchsorted(seen, keys), max(seen.size - 1, 0))
        hit = seen[at] == keys if seen.size else np.zeros(todo.size, dtype=bool)
        negatives[todo[~hit]] = candidate[~hit]
        todo = todo[hit]
    return negatives.astype(np.int32)


def first_positions(table: pl.DataFrame, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The position of each (user, item)'s first event in the table (the pair must exist)."""
    n = int(max(int(table["item"].max() or 0), int(items.max(initial=0)))) + 1
    keys = table["user"].to_numpy().astype(np.int64) * n + table["item"].to_numpy()
    unique, first = np.unique(keys, return_index=True)  # rows sorted by user, pos: first event
    at = np.searchsorted(unique, users.astype(np.int64) * n + items)
    return table["pos"].to_numpy()[first[at]]
