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

EXAMPLE_KEYS = ("user", "offset", "history_end", "short_start", "short_end", "skip_pos")


_TAU_DAYS = 1 << 13  # deltas from here on all have 12 buckets
_TAU_TABLE = (
    1.0
    / np.clip(np.frexp(np.maximum(np.arange(_TAU_DAYS + 1), 1).astype(np.float64))[1] - 1, 1, 12)
).astype(np.float32)  # tau by delta in days: #{g : delta >= g} = floor(log2(delta)), exactly


def tau_array(ref_day: np.ndarray, event_day: np.ndarray) -> np.ndarray:
    """The paper's time feature on integer day arrays: 1 / #{g in 2, 4, ..., 4096 : delta >=
    g}, at least 1/1, with `delta = ref_day - event_day + 1` (an event on the reference day
    has delta 1); a table lookup of the clipped delta."""
    return _TAU_TABLE[np.clip(ref_day - event_day + 1, 1, _TAU_DAYS)]


def _ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the concatenated ranges [start, end) and the list offsets (n + 1,)."""
    lengths = np.maximum(end - start, 0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(start - offsets[:-1], lengths)
    return idx, offsets


def _lists(offsets: np.ndarray, values: np.ndarray, name: str) -> pl.Series:
    """A list column from Arrow-style offsets and flat values (no explode, no group_by)."""
    import pyarrow as pa

    array = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pl.Series(name, array)


def _keep(offsets: np.ndarray, keep: np.ndarray, tail: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Offsets after dropping flat elements where `keep` is False (and, with `tail`, all but
    the last `tail` of each list); returns (new offsets, mask over the flat elements)."""
    n = len(offsets) - 1
    owner = np.repeat(np.arange(n), np.diff(offsets))
    counts = np.bincount(owner[keep], minlength=n)
    if tail:
        kept_before = np.cumsum(keep) - keep
        ends = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=ends[1:])
        after = ends[owner + 1] - kept_before - 1  # kept elements after this one in its list
        keep = keep & (after < tail)
        counts = np.bincount(owner[keep], minlength=n)
    new = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=new[1:])
    return new, keep


FEATURE_CHUNK = 1 << 14  # examples per chunk: temporaries of a few MB stay in cache and get reused


def attach_features(
    examples: pl.DataFrame, table: pl.DataFrame, *, max_long: int, max_short: int
) -> pl.DataFrame:
    """Add long_items, long_tau, short_items and user_category to position-described examples.

    `examples` needs the EXAMPLE_KEYS columns plus ref_time (one row per example); `table`
    is the collected event table. `max_short` 0 keeps whole sessions. The lists are assembled
    from row ranges of `table` with array offsets: every example's long-term history is one
    contiguous range of its user's events, so no explode or group_by is needed. Chunks of
    FEATURE_CHUNK examples keep the temporaries small (and in cache).
    """
    columns = {name: table[name].to_numpy() for name in ("item", "day", "pos", "mode_category")}
    parts = [
        _features(examples.slice(start, FEATURE_CHUNK), columns, max_long, max_short)
        for start in range(0, max(examples.height, 1), FEATURE_CHUNK)
    ]
    features = pl.concat(parts, rechunk=False) if len(parts) > 1 else parts[0]
    return pl.concat([examples, features], how="horizontal")


def _features(
    examples: pl.DataFrame, table: dict[str, np.ndarray], max_long: int, max_short: int
) -> pl.DataFrame:
    """The feature columns of one chunk of examples (see `attach_features`)."""
    off = examples["offset"].to_numpy().astype(np.int64)
    h = examples["history_end"].to_numpy().astype(np.int64)
    item = table["item"]

    idx, long_offsets = _ranges(off + np.maximum(h - max_long, 0), off + h)
    ref_day = examples["ref_time"].to_numpy() // SECONDS_PER_DAY
    long_tau = tau_array(np.repeat(ref_day, np.diff(long_offsets)), table["day"][idx])
    long_items = item[idx]

    s_start = examples["short_start"].to_numpy().astype(np.int64)
    s_end = examples["short_end"].to_numpy().astype(np.int64)
    if max_short:
        s_start = np.maximum(s_start, s_end - max_short - 1)
    idx, short_offsets = _ranges(off + s_start, off + s_end)
    skip = np.repeat(examples["skip_pos"].to_numpy().astype(np.int64), np.diff(short_offsets))
    short_offsets, keep = _keep(short_offsets, table["pos"][idx] != skip, max_short)
    short_items = item[idx[keep]]

    mode = table["mode_category"]
    category = np.where(h > 0, mode[np.maximum(off + h - 1, 0)], 0).astype(np.int32)
    return pl.DataFrame(
        [
            pl.Series("user_category", category),
            _lists(long_offsets, long_items.astype(np.int32, copy=False), "long_items"),
            _lists(long_offsets, long_tau, "long_tau"),
            _lists(short_offsets, short_items.astype(np.int32, copy=False), "short_items"),
        ]
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
    examples = target_examples(table.lazy(), pl.col("sentinel")).collect()
    return attach_features(examples, table, max_long=max_long, max_short=max_short).select(
        "long_items", "long_tau", "short_items", "user_category", "ref_time", "history_end"
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
