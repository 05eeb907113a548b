"""The online store interface and the event checks every backend shares.

Serving reads a user's raw history from here and maps raw ids to model indices through the
bundle vocabulary itself, so the store keeps raw string ids and accepts items no model knows.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

from feature_store.errors import StoreError

DEFAULT_MAX_EVENTS_PER_USER = 1000
# Redis keeps scores as doubles: integers beyond 2**53 would silently lose precision there.
MAX_ABS_TIMESTAMP = 2**53


class Event(NamedTuple):
    """One interaction of a user: a raw item id and unix seconds."""

    item_id: str
    timestamp: int


def check_id(value: Any, field: str) -> str:
    """A raw id as a non-empty string; integers (ids sent as JSON numbers) become their digits."""
    if isinstance(value, str):
        if value:
            return value
    elif isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    elif type(value).__module__ == "numpy" and hasattr(value, "item"):
        return check_id(value.item(), field)
    raise StoreError(f"{field}: expected a non-empty string (or integer) id, got {value!r}")


def check_timestamp(value: Any, field: str = "timestamp") -> int:
    """Integer unix seconds; floats, bools and strings are refused rather than guessed at."""
    if isinstance(value, bool):
        raise StoreError(f"{field}: expected integer unix seconds, got {value!r}")
    try:
        ts = operator.index(value)
    except TypeError:
        raise StoreError(
            f"{field}: expected integer unix seconds, got {value!r} ({type(value).__name__})"
        ) from None
    if not -MAX_ABS_TIMESTAMP < ts < MAX_ABS_TIMESTAMP:
        raise StoreError(f"{field}: expected unix seconds with |t| < 2**53, got {ts}")
    return ts


def check_event(value: Any, where: str) -> Event:
    """An `Event` from an Event, an `(item_id, timestamp)` pair or a `{item_id, timestamp}` dict."""
    if isinstance(value, Mapping):
        missing = [key for key in ("item_id", "timestamp") if key not in value]
        if missing:
            raise StoreError(f"{where}: missing field(s) {missing}; expected item_id and timestamp")
        item, ts = value["item_id"], value["timestamp"]
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        item, ts = value
    else:
        raise StoreError(
            f"{where}: expected an Event, an (item_id, timestamp) pair or a mapping with "
            f"item_id and timestamp, got {value!r}"
        )
    return Event(check_id(item, f"{where}.item_id"), check_timestamp(ts, f"{where}.timestamp"))


def check_events(events: Iterable[Any]) -> list[Event]:
    """Validate a batch of one user's events, keeping their arrival order."""
    if isinstance(events, str | bytes | Mapping):
        raise StoreError(f"events: expected a sequence of events, got {type(events).__name__}")
    return [check_event(event, f"events[{i}]") for i, event in enumerate(events)]


def check_n(n: int | None) -> int | None:
    """`n` of `recent`: None (all) or a non-negative integer."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StoreError(f"n: expected None or an integer >= 0, got {n!r}")
    return n


def check_cap(value: Any, source: str) -> int:
    """The retention cap, from a constructor argument or a URL query string."""
    try:
        cap = int(value)
    except (TypeError, ValueError):
        cap = 0
    if cap < 1 or isinstance(value, bool) or (isinstance(value, float) and cap != value):
        raise StoreError(f"{source}: max_events_per_user must be an integer >= 1, got {value!r}")
    return cap


def _as_list(column: Any) -> list[Any]:
    """A plain list from a list, tuple, NumPy array, Polars or pandas series."""
    if hasattr(column, "to_list"):  # polars.Series
        return column.to_list()
    if hasattr(column, "tolist"):  # numpy.ndarray, pandas.Series
        return column.tolist()
    return list(column)


def check_columns(
    users: Any, items: Any, timestamps: Any
) -> tuple[list[str], list[str], list[int]]:
    """Validate columnar events quickly: type checks on whole columns, per row only when needed."""
    u, it, ts = _as_list(users), _as_list(items), _as_list(timestamps)
    if not len(u) == len(it) == len(ts):
        raise StoreError(
            f"bulk_load: users, items and timestamps must have the same length, got "
            f"{len(u)}, {len(it)} and {len(ts)}"
        )
    for name, col in (("users", u), ("items", it)):
        if not all(type(x) is str and x for x in col):
            col[:] = [check_id(x, f"{name}[{i}]") for i, x in enumerate(col)]
    if not all(type(t) is int and -MAX_ABS_TIMESTAMP < t < MAX_ABS_TIMESTAMP for t in ts):
        ts = [check_timestamp(t, f"timestamps[{i}]") for i, t in enumerate(ts)]
    return u, it, ts


class OnlineStore(ABC):
    """Per-user raw event histories for serving.

    Contract shared by the backends:
    - an event is `(item_id, timestamp)` of one user; the same `(user, item, timestamp)` is
      stored once however often it is appended;
    - reads are chronological: by timestamp, ties by arrival order;
    - after every append a user keeps only the newest `max_events_per_user` events; an event
      the cap dropped stays dropped when it is sent again (retries and re-loads change
      nothing), while a genuinely new event at the oldest kept timestamp still counts as newer
      than its tie-mates;
    - an append returns how many events it newly stored, i.e. neither duplicates nor events
      the cap dropped at once: sending the same events again returns 0.
    """

    url: str
    max_events_per_user: int

    # ---- writes ----
    @abstractmethod
    def append(self, user_id: str, events: Sequence[Event]) -> int:
        """Store one user's events atomically, then apply the cap; returns how many it stored."""

    @abstractmethod
    def bulk_load(
        self,
        users: Any,
        items: Any,
        timestamps: Any,
        *,
        batch_size: int = 100_000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Store columnar events (lists or arrays of equal length) in batches of `batch_size`.

        Rows keep their relative order per user and the cap is applied at the end of each
        batch, so the stored result equals appending the rows one by one. Returns how many
        rows were newly stored and still kept at the end of their batch; `progress` is called
        with the rows done after each batch.
        """

    def append_many(self, rows: Iterable[tuple[Any, Any, Any]]) -> int:
        """Store `(user_id, item_id, timestamp)` rows of many users; see `bulk_load`."""
        rows = list(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != 3:
                raise StoreError(f"rows[{i}]: expected (user_id, item_id, timestamp), got {row!r}")
        if not rows:
            return 0
        users, items, timestamps = zip(*rows, strict=True)
        return self.bulk_load(users, items, timestamps)

    @abstractmethod
    def delete_user(self, user_id: str) -> int:
        """Forget everything about a user (GDPR erasure); returns how many events were removed."""

    # ---- reads ----
    @abstractmethod
    def recent(self, user_id: str, n: int | None = None) -> list[Event]:
        """The user's last `n` events (all when None), oldest first; [] for unknown users."""

    def recent_many(self, user_ids: Iterable[str], n: int | None = None) -> dict[str, list[Event]]:
        """`recent` for a batch of users in one round trip where the backend allows it."""
        return {check_id(u, "user_id"): self.recent(u, n) for u in user_ids}

    @abstractmethod
    def count(self, user_id: str) -> int:
        """How many events the user has stored."""

    @abstractmethod
    def users(self) -> Iterator[str]:
        """Every user with at least one stored event (order unspecified)."""

    @abstractmethod
    def n_users(self) -> int:
        """How many users have at least one stored event."""

    @abstractmethod
    def n_events(self) -> int:
        """How many events are stored over all users."""

    # ---- lifecycle ----
    @abstractmethod
    def close(self) -> None:
        """Release connections; using the store afterwards raises `StoreError`."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, max_events_per_user={self.max_events_per_user})"
        )
