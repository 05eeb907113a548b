"""Sessions and per-event history columns: the one implementation used offline and online.

`event_table` turns events sorted by (user, timestamp, input order) into the table every example
construction reads from. Serving calls the same function on one user's events (see
`pipelines.features.user_features`), so offline and online sessions cannot drift apart.
"""

from __future__ import annotations

import polars as pl

from pipelines.config import SECONDS_PER_DAY, SessionRule


def new_session(rule: SessionRule) -> pl.Expr:
    """True where an event opens a new session of its user (events sorted within the user)."""
    ts = pl.col("timestamp")
    if rule.kind == "day":
        day = ts // SECONDS_PER_DAY
        boundary = day != day.shift(1).over("user")
    else:
        boundary = (ts - ts.shift(1).over("user")) > rule.gap_seconds
    return boundary.fill_null(True)


def running_mode_category() -> pl.Expr:
    """The most frequent category among a user's events up to and including each event.

    Ties go to the category that reached the highest count first: a category takes over only
    when its running count exceeds the best count so far. Needs the `category_count` column
    (the running count of the event's category within its user).
    """
    count = pl.col("category_count")
    best_before = count.cum_max().shift(1).over("user").fill_null(0)
    return (
        pl.when(count > best_before)
        .then(pl.col("category"))
        .otherwise(None)
        .forward_fill()
        .over("user")
        .cast(pl.Int32)
    )


def event_table(events: pl.LazyFrame, rule: SessionRule) -> pl.LazyFrame:
    """Add the columns the example builders need to events sorted by user, time, input order.

    Input columns: user, item, category (int32), timestamp (int64 seconds).
    Added: gidx (global row number), pos (position within the user), session (0-based within
    the user), session_start (pos of the session's first event), session_time (its timestamp),
    day (UTC day number) and mode_category (running most frequent category, see above).
    """
    return (
        events.with_columns(
            pl.int_range(1, pl.len() + 1, dtype=pl.Int32)
            .over("user", "category")
            .alias("category_count")
        )
        .with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("gidx"),
            pl.int_range(pl.len(), dtype=pl.Int32).over("user").alias("pos"),
            (new_session(rule).cast(pl.Int32).cum_sum().over("user") - 1).alias("session"),
            (pl.col("timestamp") // SECONDS_PER_DAY).alias("day"),
            running_mode_category().alias("mode_category"),
        )
        .with_columns(
            pl.col("pos").min().over("user", "session").alias("session_start"),
            pl.col("timestamp").min().over("user", "session").alias("session_time"),
        )
        .with_columns((pl.col("gidx") - pl.col("pos").cast(pl.Int64)).alias("offset"))
        .drop("category_count")
    )
