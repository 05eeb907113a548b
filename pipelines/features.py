"""Long-term history, short-term session and time features of examples: offline and online.

An example is described by positions into its user's event table (`pipelines.sessions`):
`history_end` (events before it are the long-term history), `[short_start, short_end)` minus
`skip_pos` (the short-term session) and `ref_time`. `attach_features` turns those positions into
item lists, time features and the user category with one lazy Polars plan. `user_features`
runs the very same code for one user's stored events at a serving-time `now`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from pipelines.config import SECONDS_PER_DAY, SessionRule
from pipelines.sessions import event_table

EXAMPLE_KEYS = ("ex", "user", "offset", "history_end", "short_start", "short_end", "skip_pos")


def tau(ref_day: pl.Expr, event_day: pl.Expr) -> pl.Expr:
    """The paper's time feature: 1 / #{g in 2, 4, ..., 4096 : delta >= g}, at least 1/1.

    `delta = ref_day - event_day + 1` in days, so an event on the reference day has delta 1.
    """
    delta = (ref_day - event_day + 1).clip(lower_bound=1)
    buckets = delta.cast(pl.Float64).log(2).floor().clip(1, 12)
    return (1.0 / buckets).cast(pl.Float32)


def _gather(
    examples: pl.LazyFrame, table: pl.LazyFrame, start: pl.Expr, end: pl.Expr
) -> pl.LazyFrame:
    """One row per (example, event in [start, end) of its user), in example then time order."""
    return (
        examples.with_columns(pl.int_ranges(start, end, dtype=pl.Int64).alias("gidx"))
        .explode("gidx", empty_as_null=True)
        .join(
            table.select("gidx", "item", "day", "pos"),
            on="gidx",
            how="left",
            maintain_order="left",
        )
    )


def attach_features(
    examples: pl.LazyFrame, table: pl.LazyFrame, *, max_long: int, max_short: int
) -> pl.LazyFrame:
    """Add long_items, long_tau, short_items and user_category to position-described examples.

    `examples` needs the EXAMPLE_KEYS columns plus ref_time; `max_short` 0 keeps whole sessions.
    """
    off = pl.col("offset")
    h = pl.col("history_end").cast(pl.Int64)
    ref_day = pl.col("ref_time") // SECONDS_PER_DAY
    long = (
        _gather(
            examples.select("ex", "offset", "history_end", "ref_time"),
            table,
            off + (h - max_long).clip(lower_bound=0),
            off + h,
        )
        .group_by("ex", maintain_order=True)
        .agg(
            pl.col("item").drop_nulls().alias("long_items"),
            tau(ref_day.first(), pl.col("day")).drop_nulls().alias("long_tau"),
        )
    )
    s_start = pl.col("short_start").cast(pl.Int64)
    s_end = pl.col("short_end").cast(pl.Int64)
    if max_short:
        s_start = pl.max_horizontal(s_start, s_end - max_short - 1)
    short = _gather(
        examples.select("ex", "offset", "short_start", "short_end", "skip_pos"),
        table,
        off + s_start,
        off + s_end,
    )
    short = short.group_by("ex", maintain_order=True).agg(
        pl.col("item")
        .filter(pl.col("pos").is_not_null() & (pl.col("pos") != pl.col("skip_pos")))
        .alias("short_items")
    )
    if max_short:
        short = short.with_columns(pl.col("short_items").list.tail(max_short))
    category = examples.select(
        "ex", (off + h - 1).alias("gidx"), (h > 0).alias("has_history")
    ).join(table.select("gidx", "mode_category"), on="gidx", how="left", maintain_order="left")
    category = category.select(
        "ex",
        pl.when(pl.col("has_history"))
        .then(pl.col("mode_category"))
        .otherwise(0)
        .cast(pl.Int32)
        .alias("user_category"),
    )
    return (
        examples.join(long, on="ex", how="left", maintain_order="left")
        .join(short, on="ex", how="left", maintain_order="left")
        .join(category, on="ex", how="left", maintain_order="left")
        .with_columns(
            pl.col("long_items").cast(pl.List(pl.Int32)),
            pl.col("long_tau").cast(pl.List(pl.Float32)),
            pl.col("short_items").cast(pl.List(pl.Int32)),
        )
    )


def target_examples(
    table: pl.LazyFrame, is_target: pl.Expr, carry: Sequence[str] = ()
) -> pl.LazyFrame:
    """One example per target event: the semantics of serving and of leave-one-out/time splits.

    Short-term = the earlier events of the target's own session, long-term = all events of
    earlier sessions, reference time = the session's first timestamp. `carry` names extra
    table columns to keep.
    """
    return table.filter(is_target).select(
        "user",
        "offset",
        pl.col("session_start").alias("history_end"),
        pl.col("session_start").alias("short_start"),
        pl.col("pos").alias("short_end"),
        pl.lit(-1, dtype=pl.Int32).alias("skip_pos"),
        pl.col("item").alias("target"),
        pl.col("session_time").alias("ref_time"),
        pl.col("timestamp").alias("target_time"),
        *carry,
    )


@dataclass(frozen=True)
class UserFeatures:
    """The model input for one user at one moment, exactly as an offline example holds it."""

    long_items: list[int]
    long_tau: list[float]
    short_items: list[int]
    user_category: int
    ref_time: int
    history_end: int


def user_features(
    items: Sequence[int],
    categories: Sequence[int],
    timestamps: Sequence[int],
    now: int,
    *,
    session: SessionRule,
    max_long: int,
    max_short: int,
) -> UserFeatures:
    """Features of one user's next event at time `now`, from their events (item/category indices).

    Events after `now` are ignored. A sentinel event at `now` is appended (after every event
    with the same timestamp) and the offline per-target construction is run on it, so the
    current session, long-term history and time features are those training would compute.
    """
    n = len(items)
    if not (len(categories) == len(timestamps) == n):
        raise ValueError("items, categories and timestamps must have the same length")
    events = pl.LazyFrame(
        {
            "user": pl.Series([1] * (n + 1), dtype=pl.Int32),
            "item": pl.Series([*items, 0], dtype=pl.Int32),
            "category": pl.Series([*categories, 0], dtype=pl.Int32),
            "timestamp": pl.Series([*timestamps, now], dtype=pl.Int64),
            "sentinel": pl.Series([False] * n + [True], dtype=pl.Boolean),
        }
    )
    events = events.filter(pl.col("timestamp") <= now).sort(
        "timestamp", "sentinel", maintain_order=True
    )
    table = event_table(events, session)
    examples = target_examples(table, pl.col("sentinel")).with_columns(
        pl.lit(0, dtype=pl.Int64).alias("ex")
    )
    row = (
        attach_features(examples, table, max_long=max_long, max_short=max_short)
        .collect()
        .row(0, named=True)
    )
    return UserFeatures(
        long_items=list(row["long_items"]),
        long_tau=list(row["long_tau"]),
        short_items=list(row["short_items"]),
        user_category=int(row["user_category"]),
        ref_time=int(row["ref_time"]),
        history_end=int(row["history_end"]),
    )
