"""Cleaning steps, applied once each in this documented order, every one counted:

1. exact duplicate events (same user, item and timestamp) dropped, the first kept;
2. items with fewer than `min_item_interactions` events dropped;
3. users with fewer than `min_user_interactions` events dropped;
4. users with fewer than `min_sessions` or more than `max_sessions` sessions dropped.

Each filter is a single pass (no iteration to a fixed point), as in the paper's preprocessing;
0 switches a filter off.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def count(step: str, frame: pl.DataFrame) -> StepCount:
    return StepCount(step, frame.height, frame["user_id"].n_unique(), frame["item_id"].n_unique())


def clean(frame: pl.DataFrame, config: PrepareConfig) -> tuple[pl.DataFrame, list[StepCount]]:
    """Apply the cleaning steps above; returns the kept rows (input order) and the counts."""
    steps = [count("read", frame)]
    frame = frame.unique(["user_id", "item_id", "timestamp"], keep="first", maintain_order=True)
    steps.append(count("drop_duplicates", frame))
    if config.min_item_interactions:
        frame = frame.filter(pl.len().over("item_id") >= config.min_item_interactions)
        steps.append(count("min_item_interactions", frame))
    if config.min_user_interactions:
        frame = frame.filter(pl.len().over("user_id") >= config.min_user_interactions)
        steps.append(count("min_user_interactions", frame))
    if config.min_sessions or config.max_sessions:
        sessions = (
            frame.select("row", pl.col("user_id").alias("user"), "timestamp")
            .sort("user", "timestamp", "row")
            .with_columns(new_session(config.session).alias("new"))
            .group_by("user")
            .agg(pl.col("new").sum().alias("n_sessions"))
        )
        keep = pl.col("n_sessions") >= config.min_sessions
        if config.max_sessions:
            keep &= pl.col("n_sessions") <= config.max_sessions
        users = sessions.filter(keep).select(pl.col("user").alias("user_id"))
        frame = frame.join(users, on="user_id", how="semi", maintain_order="left")
        steps.append(count("sessions_filter", frame))
    return frame, steps
