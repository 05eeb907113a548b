"""Sessions and per-event history columns: the one implementation used offline and online.

`event_columns` turns event arrays sorted by (user, timestamp, input order) into the columns
every example construction reads from, with array operations only. Offline, `event_table`
runs it on blocks of up to a million events; serving runs it on the few events of a batch of
requests (see `pipelines.features.online_features`), so offline and online sessions cannot
drift apart, and a request pays no dataframe-engine overhead.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipelines.config import SECONDS_PER_DAY, SessionRule

# The columns `event_columns` adds, with the dtypes every consumer (events.parquet) expects.
EVENT_TABLE_DTYPES: dict[str, type[pl.DataType]] = {
    "gidx": pl.Int64,
    "offset": pl.Int64,
    "pos": pl.Int32,
    "day": pl.Int64,
    "mode_category": pl.Int32,
    "session": pl.Int32,
    "session_start": pl.Int32,
    "session_time": pl.Int64,
}


def _forward_fill_index(flags: np.ndarray) -> np.ndarray:
    """For each row, the index of the last row at or before it where `flags` holds (row 0
    must hold)."""
    return np.maximum.accumulate(np.where(flags, np.arange(flags.size, dtype=np.int64), 0))


def new_session(rule: SessionRule, timestamp: np.ndarray, first_of_user: np.ndarray) -> np.ndarray:
    """True where an event opens a new session of its user (events sorted by user, time)."""
    boundary = np.ones(timestamp.size, dtype=bool)
    if rule.kind == "day":
        day = timestamp // SECONDS_PER_DAY
        np.not_equal(day[1:], day[:-1], out=boundary[1:])
    else:
        np.greater(timestamp[1:] - timestamp[:-1], rule.gap_seconds, out=boundary[1:])
    return boundary | first_of_user


def _count_and_first(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: 1, 2, 3, ... over the rows of its key (in row order), and the row index of the
    key's first row; one stable sort by key and a scatter back."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    n = len(order)
    starts = np.ones(n, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    rank = np.arange(n, dtype=np.int64)
    group_start = np.maximum.accumulate(np.where(starts, rank, 0))
    count = np.empty(n, dtype=np.int64)
    count[order] = rank - group_start + 1
    first_row = np.empty(n, dtype=np.int64)
    first_row[order] = order[group_start]
    return count, first_row


def _running_mode(category: np.ndarray, key: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The running mode of `category` per user (rows sorted by user; `key` identifies
    (user, category)), ties to the category whose first event came first. Each event scores
    its category `count * (n + 1) - first_pos` (n = the user's event count): a category's
    latest score is its current rank key, so the running maximum of the scores per user
    (users kept apart by cumulative offsets) sits on an event of the current mode."""
    count, first_row = _count_and_first(key)
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, key.size)).astype(np.int64)
    span = (sizes + 1) ** 2  # every score of a user lies in [0, span)
    base = np.repeat(np.cumsum(span) - span, sizes)
    first_pos = first_row - np.repeat(starts, sizes)
    score = base + count * np.repeat(sizes + 1, sizes) - first_pos
    best = np.maximum.accumulate(score)
    return category[_forward_fill_index(score == best)]


def event_columns(
    user: np.ndarray, category: np.ndarray, timestamp: np.ndarray, rule: SessionRule
) -> dict[str, np.ndarray]:
    """The per-event columns of events sorted by user, time and input order.

    gidx (row number), offset (gidx of the user's first event), pos (position within the
    user), day (UTC day number), session (0-based within the user), session_start (pos of the
    session's first event), session_time (its timestamp) and mode_category (the most frequent
    category among the user's events so far, ties to the category that appeared first: the
    reference code's `pd.value_counts(categories).index[0]`).

    Rows are sorted by user, so per-user quantities come from flags at user and session
    starts, cumulative sums and forward fills, and the running count per (user, category)
    from one stable sort: no per-group hashing, no Python loop over users.
    """
    user = np.asarray(user, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    category = np.asarray(category, dtype=np.int64)
    n = user.size
    gidx = np.arange(n, dtype=np.int64)
    first = np.ones(n, dtype=bool)
    np.not_equal(user[1:], user[:-1], out=first[1:])
    offset = _forward_fill_index(first)
    pos = gidx - offset
    mode_category = _running_mode(category, user * (1 << 32) + category, first)
    new = new_session(rule, timestamp, first)
    global_session = np.cumsum(new, dtype=np.int64)
    start = _forward_fill_index(new)
    return {
        "gidx": gidx,
        "offset": offset,
        "pos": pos.astype(np.int32),
        "day": timestamp // SECONDS_PER_DAY,
        "mode_category": mode_category.astype(np.int32),
        "session": (global_session - global_session[offset]).astype(np.int32),
        "session_start": pos[start].astype(np.int32),
        "session_time": timestamp[start],
    }


def event_table(events: pl.DataFrame, rule: SessionRule) -> pl.DataFrame:
    """`events` (user, item, category int32, timestamp int64 seconds; sorted by user, time,
    input order) with the columns of `event_columns` added."""
    columns = event_columns(
        events["user"].to_numpy(),
        events["category"].to_numpy(),
        events["timestamp"].to_numpy(),
        rule,
    )
    return events.with_columns(
        pl.Series(name, columns[name], dtype=dtype) for name, dtype in EVENT_TABLE_DTYPES.items()
    )
