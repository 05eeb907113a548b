"""Cleaning steps, applied once each in this documented order, every one counted:

1. exact duplicate events (same user, item and timestamp) dropped, the first kept;
2. items with fewer than `min_item_interactions` events dropped;
3. users with fewer than `min_user_interactions` events dropped;
4. users with fewer than `min_sessions` or more than `max_sessions` sessions dropped.

Each filter is a single pass (no iteration to a fixed point), as in the paper's preprocessing;
0 switches a filter off. The events arrive as codes (`pipelines.vocab.Codebook`) sorted by
user, timestamp and input order, so duplicates sit next to each other within a (user,
timestamp) run, and per-user or per-item counts are array bincounts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipelines.config import PrepareConfig
from pipelines.sessions import new_session


@dataclass(frozen=True)
class StepCount:
    """Rows, users and items left after one step (recorded in the manifest)."""

    step: str
    rows: int
    users: int
    items: int

    def to_json(self) -> dict[str, int | str]:
        return {"step": self.step, "rows": self.rows, "users": self.users, "items": self.items}


def _distinct(codes: pl.Series) -> int:
    return int(np.count_nonzero(np.bincount(codes.to_numpy()))) if codes.len() else 0


def count(step: str, frame: pl.DataFrame) -> StepCount:
    return StepCount(step, frame.height, _distinct(frame["user"]), _distinct(frame["item"]))


def sort_events(frame: pl.DataFrame) -> pl.DataFrame:
    """Events by user code, timestamp and input order (a stable sort on one packed key when
    the codes and timestamps fit in 64 bits, as they do for any realistic log)."""
    ts_max = int(frame["timestamp"].max() or 0)
    ts_bits = max(ts_max.bit_length(), 1)
    if int(frame["user"].max() or 0).bit_length() + ts_bits <= 63:
        key = (pl.col("user").cast(pl.Int64) * (1 << ts_bits) + pl.col("timestamp")).alias("_k")
        keyed = frame.with_columns(key)
        if keyed["_k"].is_sorted():  # logs often arrive sorted by user and time
            return frame
        return keyed.sort("_k", maintain_order=True).drop("_k")
    return frame.sort("user", "timestamp", "row")


def drop_duplicates(frame: pl.DataFrame) -> pl.DataFrame:
    """Keep the first of each (user, item, timestamp); only rows sharing their (user,
    timestamp) with a neighbour can be duplicates, so only those are hashed."""
    same_prev = (pl.col("user") == pl.col("user").shift(1)) & (
        pl.col("timestamp") == pl.col("timestamp").shift(1)
    )
    tied = frame.select(
        (same_prev | same_prev.shift(-1)).fill_null(False).alias("tied")
    ).to_series()
    if not tied.any():
        return frame
    rows = frame.with_row_index("_i").filter(tied)
    repeated = rows.filter(~pl.struct("user", "timestamp", "item").is_first_distinct())["_i"]
    if repeated.len() == 0:
        return frame
    keep = np.ones(frame.height, dtype=bool)
    keep[repeated.to_numpy()] = False
    return frame.filter(pl.Series(keep))


def _at_least(codes: pl.Series, minimum: int) -> pl.Series:
    """Per row: does its code occur at least `minimum` times?"""
    values = codes.to_numpy()
    return pl.Series(np.bincount(values)[values] >= minimum)


def clean(frame: pl.DataFrame, config: PrepareConfig) -> tuple[pl.DataFrame, list[StepCount]]:
    """Apply the cleaning steps above to sorted, coded events; returns the kept rows (same
    order) and the counts."""
    read = count("read", frame)
    frame = drop_duplicates(frame)
    # dropping a repeat never removes the last event of a user or item: same users and items
    steps = [read, StepCount("drop_duplicates", frame.height, read.users, read.items)]
    if config.min_item_interactions:
        frame = frame.filter(_at_least(frame["item"], config.min_item_interactions))
        steps.append(count("min_item_interactions", frame))
    if config.min_user_interactions:
        frame = frame.filter(_at_least(frame["user"], config.min_user_interactions))
        steps.append(count("min_user_interactions", frame))
    if (config.min_sessions or config.max_sessions) and frame.height:
        users = frame["user"].to_numpy()
        first = np.ones(users.size, dtype=bool)
        np.not_equal(users[1:], users[:-1], out=first[1:])
        starts = new_session(config.session, frame["timestamp"].to_numpy(), first)
        sessions = np.bincount(users[starts], minlength=int(users.max()) + 1)[users]
        keep = sessions >= config.min_sessions
        if config.max_sessions:
            keep &= sessions <= config.max_sessions
        frame = frame.filter(pl.Series(keep))
        steps.append(count("sessions_filter", frame))
    return frame, steps
