"""Long-term history, short-term session and time features of examples: offline and online.

An example is described by positions into its user's event table (`pipelines.sessions`):
`history_end` (events before it are the long-term history), `[short_start, short_end)` minus
`skip_pos` (the short-term session) and `ref_time`. `feature_lists` turns those positions into
item lists, their timestamps, time features and the user category with array operations;
`attach_features` runs it on a split's examples, `online_features` on serving requests at their
`now`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipelines.config import SECONDS_PER_DAY, SessionRule
from pipelines.sessions import event_columns

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
    delta = np.asarray(ref_day - event_day + 1)  # a fresh array: clipped in place
    np.maximum(delta, 1, out=delta)  # two ufuncs: np.clip's wrapper costs more on small arrays
    np.minimum(delta, _TAU_DAYS, out=delta)
    return _TAU_TABLE[delta]


def _lengths(offsets: np.ndarray) -> np.ndarray:
    """List lengths from offsets (np.diff's generic wrapper costs more on small arrays)."""
    return offsets[1:] - offsets[:-1]


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

    array = pa.LargeListArray.from_arrays(_arrow(offsets), _arrow(values))
    return pl.Series(name, array)


def _arrow(values: np.ndarray) -> object:
    """A NumPy array as an Arrow array over the same buffer. (`pa.array` would import pandas
    to look for pandas objects: about a second, paid by every prepare and the first request.)"""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    kind = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _keep(offsets: np.ndarray, keep: np.ndarray, tail: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Offsets after dropping flat elements where `keep` is False (and, with `tail`, all but
    the last `tail` of each list); returns (new offsets, mask over the flat elements)."""
    n = len(offsets) - 1
    owner = np.repeat(np.arange(n), _lengths(offsets))
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
    """Add long_items, long_tau, long_time, short_items, short_time and user_category to
    position-described examples.

    `examples` needs the EXAMPLE_KEYS columns plus ref_time (one row per example); `table`
    is the collected event table. `max_short` 0 keeps whole sessions. The lists are assembled
    from row ranges of `table` with array offsets: every example's long-term history is one
    contiguous range of its user's events, so no explode or group_by is needed. Chunks of
    FEATURE_CHUNK examples keep the temporaries small (and in cache).
    """
    columns = {
        name: table[name].to_numpy()
        for name in ("item", "timestamp", "day", "pos", "mode_category")
    }
    parts = [
        _features(examples.slice(start, FEATURE_CHUNK), columns, max_long, max_short)
        for start in range(0, max(examples.height, 1), FEATURE_CHUNK)
    ]
    features = pl.concat(parts, rechunk=False) if len(parts) > 1 else parts[0]
    return pl.concat([examples, features], how="horizontal")


@dataclass(frozen=True)
class FeatureLists:
    """Feature columns of examples as flat arrays with Arrow-style offsets (n + 1 each)."""

    user_category: np.ndarray  # (n,) int32
    long_items: np.ndarray  # flat int32
    long_tau: np.ndarray  # flat float32, one per long item
    long_offsets: np.ndarray
    short_items: np.ndarray  # flat int32
    short_offsets: np.ndarray
    long_time: np.ndarray  # flat int64 unix seconds, one per long item
    short_time: np.ndarray  # flat int64 unix seconds, one per short item


def feature_lists(
    positions: dict[str, np.ndarray],
    table: dict[str, np.ndarray],
    max_long: int,
    max_short: int,
) -> FeatureLists:
    """The feature lists of position-described examples (EXAMPLE_KEYS minus user, plus
    ref_time) over the event-table columns item, timestamp, day, pos and mode_category: the
    single implementation behind offline examples and online requests."""
    off = positions["offset"].astype(np.int64, copy=False)
    h = positions["history_end"].astype(np.int64, copy=False)
    item = table["item"]

    idx, long_offsets = _ranges(off + np.maximum(h - max_long, 0), off + h)
    ref_day = positions["ref_time"] // SECONDS_PER_DAY
    long_tau = tau_array(np.repeat(ref_day, _lengths(long_offsets)), table["day"][idx])
    long_items = item[idx]
    long_time = table["timestamp"][idx]

    s_start = positions["short_start"].astype(np.int64, copy=False)
    s_end = positions["short_end"].astype(np.int64, copy=False)
    if max_short:
        s_start = np.maximum(s_start, s_end - max_short - 1)
    idx, short_offsets = _ranges(off + s_start, off + s_end)
    skip = np.repeat(positions["skip_pos"].astype(np.int64, copy=False), _lengths(short_offsets))
    short_offsets, keep = _keep(short_offsets, table["pos"][idx] != skip, max_short)
    short_items = item[idx[keep]]
    short_time = table["timestamp"][idx[keep]]

    mode = table["mode_category"]
    category = np.where(h > 0, mode[np.maximum(off + h - 1, 0)], 0).astype(np.int32)
    return FeatureLists(
        user_category=category,
        long_items=long_items.astype(np.int32, copy=False),
        long_tau=long_tau,
        long_offsets=long_offsets,
        short_items=short_items.astype(np.int32, copy=False),
        short_offsets=short_offsets,
        long_time=long_time.astype(np.int64, copy=False),
        short_time=short_time.astype(np.int64, copy=False),
    )


def _features(
    examples: pl.DataFrame, table: dict[str, np.ndarray], max_long: int, max_short: int
) -> pl.DataFrame:
    """The feature columns of one chunk of examples (see `attach_features`)."""
    positions = {
        name: examples[name].to_numpy()
        for name in ("offset", "history_end", "short_start", "short_end", "skip_pos", "ref_time")
    }
    return _feature_frame(feature_lists(positions, table, max_long, max_short))


def _feature_frame(lists: FeatureLists) -> pl.DataFrame:
    """user_category and the feature lists as Polars columns."""
    return pl.DataFrame(
        [
            pl.Series("user_category", lists.user_category),
            _lists(lists.long_offsets, lists.long_items, "long_items"),
            _lists(lists.long_offsets, lists.long_tau, "long_tau"),
            _lists(lists.long_offsets, lists.long_time, "long_time"),
            _lists(lists.short_offsets, lists.short_items, "short_items"),
            _lists(lists.short_offsets, lists.short_time, "short_time"),
        ]
    )


# A target example's positions, by event-table column: short-term = the earlier events of
# the target's own session, long-term = all events of earlier sessions, reference time =
# the session's first timestamp. Offline (`target_examples`) and online read this one map.
TARGET_POSITIONS = {
    "history_end": "session_start",
    "short_start": "session_start",
    "short_end": "pos",
    "ref_time": "session_time",
}
NO_SKIP = -1


def target_examples(
    table: pl.LazyFrame, is_target: pl.Expr, carry: Sequence[str] = ()
) -> pl.LazyFrame:
    """One example per target event: the semantics of serving and of leave-one-out/time splits.

    Positions as TARGET_POSITIONS says; `carry` names extra table columns to keep.
    """
    p = TARGET_POSITIONS
    return table.filter(is_target).select(
        "user",
        "offset",
        pl.col(p["history_end"]).alias("history_end"),
        pl.col(p["short_start"]).alias("short_start"),
        pl.col(p["short_end"]).alias("short_end"),
        pl.lit(NO_SKIP, dtype=pl.Int32).alias("skip_pos"),
        pl.col("item").alias("target"),
        pl.col("pos").alias("target_pos"),
        pl.col(p["ref_time"]).alias("ref_time"),
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
    long_time: list[int]  # unix seconds of each long-term event
    short_time: list[int]  # unix seconds of each short-term event


@dataclass(frozen=True)
class History:
    """One user's stored events as vocabulary indices, in arrival order."""

    items: Sequence[int]
    categories: Sequence[int]
    timestamps: Sequence[int]

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.categories) == len(self.timestamps)):
            raise ValueError("items, categories and timestamps must have the same length")


@dataclass(frozen=True)
class OnlineFeatures:
    """The model inputs of a batch of users at their `now`s, one row per history."""

    lists: FeatureLists
    ref_time: np.ndarray  # (n,) int64
    history_end: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.ref_time.size)

    def frame(self) -> pl.DataFrame:
        """The rows as the columns of an offline example."""
        return pl.concat(
            [
                _feature_frame(self.lists),
                pl.DataFrame({"ref_time": self.ref_time, "history_end": self.history_end}),
            ],
            how="horizontal",
        ).select(*USER_FEATURE_COLUMNS)

    def row(self, n: int) -> UserFeatures:
        """Row `n` as a plain record."""
        lists = self.lists
        long = slice(int(lists.long_offsets[n]), int(lists.long_offsets[n + 1]))
        short = slice(int(lists.short_offsets[n]), int(lists.short_offsets[n + 1]))
        return UserFeatures(
            long_items=lists.long_items[long].tolist(),
            long_tau=lists.long_tau[long].tolist(),
            short_items=lists.short_items[short].tolist(),
            user_category=int(lists.user_category[n]),
            ref_time=int(self.ref_time[n]),
            history_end=int(self.history_end[n]),
            long_time=lists.long_time[long].tolist(),
            short_time=lists.short_time[short].tolist(),
        )


USER_FEATURE_COLUMNS = (
    "long_items",
    "long_tau",
    "long_time",
    "short_items",
    "short_time",
    "user_category",
    "ref_time",
    "history_end",
)


def _flat(values: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """The concatenation of integer sequences as one int64 array."""
    return np.fromiter(itertools.chain.from_iterable(values), dtype=np.int64, count=total)


def online_features(
    histories: Sequence[History],
    nows: Sequence[int],
    *,
    session: SessionRule,
    max_long: int,
    max_short: int,
) -> OnlineFeatures:
    """Features of each user's next event at their `now`, one row per history, in order.

    Events after `now` are ignored. A sentinel event at `now` is appended to each history
    (after every event with the same timestamp) and the offline per-target construction
    (`event_columns`, TARGET_POSITIONS, `feature_lists`) runs on it, so the current session,
    long-term history and time features are exactly those training computes. All array
    work: a request costs well under a millisecond of feature code.
    """
    if len(histories) != len(nows):
        raise ValueError("one `now` per history is needed")
    n = len(histories)
    lengths = np.array([len(h.items) for h in histories], dtype=np.int64)
    total = int(lengths.sum())
    now = np.asarray(nows, dtype=np.int64)
    # stored events first, then the n sentinels (item 0 at `now`); sorted below
    user = np.concatenate([np.repeat(np.arange(n, dtype=np.int64), lengths), np.arange(n)])
    item = np.concatenate([_flat([h.items for h in histories], total), np.zeros(n, np.int64)])
    category = np.concatenate(
        [_flat([h.categories for h in histories], total), np.zeros(n, np.int64)]
    )
    stamp = np.concatenate([_flat([h.timestamps for h in histories], total), now])
    sentinel = np.zeros(total + n, dtype=bool)
    sentinel[total:] = True
    keep = np.flatnonzero(stamp <= now[user])
    order = keep[np.lexsort((sentinel[keep], stamp[keep], user[keep]))]
    user, item, category, stamp = user[order], item[order], category[order], stamp[order]
    columns = event_columns(user, category, stamp, session)
    targets = np.flatnonzero(sentinel[order])  # one per history, in history order
    positions = {key: columns[column][targets] for key, column in TARGET_POSITIONS.items()}
    positions["offset"] = columns["offset"][targets]
    positions["skip_pos"] = np.full(n, NO_SKIP, dtype=np.int64)
    table = {"item": item, "timestamp": stamp, "day": columns["day"], "pos": columns["pos"]}
    table["mode_category"] = columns["mode_category"]
    lists = feature_lists(positions, table, max_long, max_short)
    return OnlineFeatures(
        lists=lists,
        ref_time=positions["ref_time"].astype(np.int64),
        history_end=positions["history_end"].astype(np.int64),
    )


def features_frame(
    histories: Sequence[History],
    nows: Sequence[int],
    *,
    session: SessionRule,
    max_long: int,
    max_short: int,
) -> pl.DataFrame:
    """`online_features` as a frame with the columns of an offline example."""
    return online_features(
        histories, nows, session=session, max_long=max_long, max_short=max_short
    ).frame()


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
    """Features of one user's next event at time `now` (see `online_features`)."""
    features = online_features(
        [History(items, categories, timestamps)],
        [now],
        session=session,
        max_long=max_long,
        max_short=max_short,
    )
    return features.row(0)


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
            long_time=list(r["long_time"]),
            short_time=list(r["short_time"]),
        )
        for r in frame.iter_rows(named=True)
    ]
