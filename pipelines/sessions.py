"""Sessions and per-event history columns: the one implementation used offline and online.

`event_table` turns events sorted by (user, timestamp, input order) into the table every example
construction reads from. Serving calls the same function on one user's events (see
`pipelines.features.user_features`), so offline and online sessions cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipelines.config import SECONDS_PER_DAY, SessionRule


def new_session(rule: SessionRule, first_of_user: pl.Expr | None = None) -> pl.Expr:
    """True where an event opens a new session of its user (events sorted by user, time).

    `first_of_user` marks each user's first event; by default it is derived from `user`.
    """
    ts = pl.col("timestamp")
    if first_of_user is None:
        first_of_user = pl.col("user") != pl.col("user").shift(1)
    if rule.kind == "day":
        day = ts // SECONDS_PER_DAY
        boundary = day != day.shift(1)
    else:
        boundary = (ts - ts.shift(1)) > rule.gap_seconds
    return (boundary | first_of_user).fill_null(True)


def _per_user_running_max(value: pl.Expr, user: pl.Expr) -> pl.Expr:
    """Running maximum of a value in [0, 2**31) that restarts at each user (rows sorted by
    user): one global cum_max of `user * 2**31 + value`, each user's block above all earlier
    ones."""
    shift = user.cast(pl.Int64) * (1 << 31)
    return ((shift + value.cast(pl.Int64)).cum_max() - shift).cast(pl.Int32)


def _running_count(keys: pl.Series, **_: object) -> pl.Series:  # polars may pass kwargs
    """1, 2, 3, ... over the rows of each key, in row order: one stable sort by key and a
    scatter back (cheaper than hashing every row into a window group)."""
    values = keys.to_numpy()
    order = np.argsort(values, kind="stable")
    sorted_keys = values[order]
    n = len(order)
    starts = np.ones(n, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    rank = np.arange(n, dtype=np.int64)
    group_start = np.maximum.accumulate(np.where(starts, rank, 0))
    counts = np.empty(n, dtype=np.int32)
    counts[order] = rank - group_start + 1
    return pl.Series(keys.name, counts)


def event_table(events: pl.LazyFrame, rule: SessionRule) -> pl.LazyFrame:
    """Add the columns the example builders need to events sorted by user, time, input order.

    Input columns: user, item, category (int32), timestamp (int64 seconds).
    Added: gidx (global row number), pos (position within the user), session (0-based within
    the user), session_start (pos of the session's first event), session_time (its timestamp),
    day (UTC day number), offset (gidx of the user's first event) and mode_category (the most
    frequent category among the user's events so far: a category takes over only when its
    running count exceeds the best count so far, so ties go to the one that got there first).

    The rows are sorted by user, so per-user quantities come from flags at user and session
    starts, global cumulative sums and forward fills, and the running count per (user,
    category) from one stable sort: no per-group hashing.
    """
    gidx = pl.col("gidx")
    first = pl.col("first_of_user")
    new = pl.col("new_session")
    count = pl.col("category_count")
    best_before = (
        _per_user_running_max(count, pl.col("user")).shift(1).fill_null(0).alias("best_before")
    )
    return (
        events.with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("gidx"),
            (pl.col("user") != pl.col("user").shift(1)).fill_null(True).alias("first_of_user"),
            (pl.col("user").cast(pl.Int64) * (1 << 32) + pl.col("category"))
            .map_batches(_running_count, return_dtype=pl.Int32)
            .alias("category_count"),
        )
        .with_columns(
            pl.when(first).then(gidx).forward_fill().alias("offset"),
            new_session(rule, first).alias("new_session"),
            pl.when(first).then(pl.lit(0)).otherwise(best_before).alias("best_before"),
        )
        .with_columns(
            (gidx - pl.col("offset")).cast(pl.Int32).alias("pos"),
            new.cast(pl.Int32).cum_sum().alias("global_session"),
            (pl.col("timestamp") // SECONDS_PER_DAY).alias("day"),
            pl.when(count > pl.col("best_before"))
            .then(pl.col("category"))
            .forward_fill()
            .cast(pl.Int32)
            .alias("mode_category"),
        )
        .with_columns(
            (
                pl.col("global_session")
                - pl.when(first).then(pl.col("global_session")).forward_fill()
            ).alias("session"),
            pl.when(new).then(pl.col("pos")).forward_fill().alias("session_start"),
            pl.when(new).then(pl.col("timestamp")).forward_fill().alias("session_time"),
        )
        .drop("first_of_user", "new_session", "category_count", "best_before", "global_session")
    )
