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

import numpy as np
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
    examples: pl.LazyFrame, table: pl.DataFrame, start: pl.Expr, end: pl.Expr, columns: list[str]
) -> pl.LazyFrame:
    """One row per (example, event in [start, end) of its user), in example then time order.

    Examples with an empty range keep one row of nulls. `gidx` is a row number of `table`,
    so the event columns are gathered by position, not joined.
    """
    gidx = pl.col("gidx")
    return (
        examples.with_columns(pl.int_ranges(start, end, dtype=pl.Int64).alias("gidx"))
        .explode("gidx", empty_as_null=True)
        .with_columns(pl.lit(table[c]).gather(gidx).alias(c) for c in columns)
    )


def attach_features(
    examples: pl.LazyFrame, table: pl.DataFrame, *, max_long: int, max_short: int
) -> pl.LazyFrame:
    """Add long_items, long_tau, short_items and user_category to position-described examples.

    `examples` needs the EXAMPLE_KEYS columns plus ref_time, with `ex` numbering the rows
    0, 1, 2, ... in order; `table` is the collected event table. `max_short` 0 keeps whole
    sessions.
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
            ["item", "day"],
        )
        .group_by("ex", maintain_order=True)
        .agg(
            pl.col("item").drop_nulls().cast(pl.Int32).alias("long_items"),
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
        ["item", "pos"],
    )
    short = short.group_by("ex", maintain_order=True).agg(
        pl.col("item")
        .filter(pl.col("pos").is_not_null() & (pl.col("pos") != pl.col("skip_pos")))
        .cast(pl.Int32)
        .alias("short_items")
    )
    if max_short:
        short = short.with_columns(pl.col("short_items").list.tail(max_short))
    last = (off + h - 1).clip(lower_bound=0)
    category = (
        pl.when(h > 0)
        .then(pl.lit(table["mode_category"]).gather(last))
        .otherwise(0)
        .cast(pl.Int32)
        .alias("user_category")
    )
    return pl.concat(
        [examples.with_columns(category), long.drop("ex"), short.drop("ex")], how="horizontal"
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


@dataclass(frozen=True)
class History:
    """One user's stored events as vocabulary indices, in arrival order."""

    items: Sequence[int]
    categories: Sequence[int]
    timestamps: Sequence[int]

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.categories) == len(self.timestamps)):
            raise ValueError("items, categories and timestamps must have the same length")


def features_frame(
    histories: Sequence[History],
    nows: Sequence[int],
    *,
    session: SessionRule,
    max_long: int,
    max_short: int,
) -> pl.DataFrame:
    """Features of each user's next event at their `now`, one row per history, in order.

    Events after `now` are ignored. A sentinel event at `now` is appended to each history
    (after every event with the same timestamp) and the offline per-target construction runs
    on it, so the current session, long-term history and time features are exactly those
    training computes. Batching many users into one call amortises Polars' per-query cost.
    """
    if len(histories) != len(nows):
        raise ValueError("one `now` per history is needed")
    lengths = np.array([len(h.items) + 1 for h in histories], dtype=np.int64)
    sentinel = np.zeros(int(lengths.sum()), dtype=bool)
    sentinel[np.cumsum(lengths) - 1] = True

    def column(values: list[Sequence[int]], last: Sequence[int], dtype: type) -> np.ndarray:
        out = np.empty(len(sentinel), dtype=dtype)
        out[~sentinel] = np.concatenate([np.asarray(v, dtype=dtype) for v in values] or [[]])
        out[sentinel] = np.asarray(last, dtype=dtype)
        return out

    n = len(histories)
    events = pl.LazyFrame(
        {
            "user": np.repeat(np.arange(1, n + 1, dtype=np.int32), lengths),
            "item": column([h.items for h in histories], [0] * n, np.int32),
            "category": column([h.categories for h in histories], [0] * n, np.int32),
            "timestamp": column([h.timestamps for h in histories], nows, np.int64),
            "now": np.repeat(np.asarray(nows, dtype=np.int64), lengths),
            "sentinel": sentinel,
        }
    )
    events = events.filter(pl.col("timestamp") <= pl.col("now")).sort(
        "user", "timestamp", "sentinel", maintain_order=True
    )
    table = event_table(events, session).collect()
    examples = target_examples(table.lazy(), pl.col("sentinel")).with_columns(
        (pl.col("user") - 1).cast(pl.Int64).alias("ex")
    )
    return (
        attach_features(examples, table, max_long=max_long, max_short=max_short)
        .select("long_items", "long_tau", "short_items", "user_category", "ref_time", "history_end")
        .collect()
    )


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
    """Features of one user's next event at time `now` (see `features_frame`)."""
    frame = features_frame(
        [History(items, categories, timestamps)],
        [now],
        session=session,
        max_long=max_long,
        max_short=max_short,
    )
    return to_user_features(frame)[0]


def to_user_features(frame: pl.DataFrame) -> list[UserFeatures]:
    """Rows of `features_frame` as plain Python records."""
    return [
        UserFeatures(
            long_items=list(r["long_items"]),
            long_tau=list(r["long_tau"]),
            short_items=list(r["short_items"]),
            user_category=int(r["user_category"]),
            ref_time=int(r["ref_time"]),
            history_end=int(r["history_end"]),
        )
        for r in frame.iter_rows(named=True)
    ]
