"""The default online store: one SQLite file shared by every serving worker process.

Durability: WAL journal with `synchronous=FULL` by default. In WAL mode a commit is written to
the `-wal` file before `append` returns, so an acknowledged append survives the writer being
killed with either setting (the data sits in the OS page cache); FULL additionally fsyncs the
WAL on every commit so it also survives a power cut or kernel crash. That costs one fsync per
`append` (bulk loads commit per batch, so they barely notice); `?synchronous=normal` trades the
power-cut guarantee for cheaper single appends.

Concurrency: WAL lets readers run beside one writer; writers take the lock up front
(`BEGIN IMMEDIATE`) and wait up to `timeout` seconds (`busy_timeout`) instead of failing, so
several worker processes can append to one file. Each thread of each process gets its own
connection, opened lazily; a connection is never used across a fork.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from feature_store.base import (
    DEFAULT_MAX_EVENTS_PER_USER,
    Event,
    OnlineStore,
    check_cap,
    check_columns,
    check_events,
    check_id,
    check_n,
)
from feature_store.errors import StoreError

SCHEMA_VERSION = 1
Row = tuple[str, str, int]
SYNCHRONOUS_MODES = ("full", "normal", "extra")

# `seq` is the rowid: it grows with every insert, so it records arrival order for ties.
# `evicted` holds the events the cap dropped whose timestamp ties the user's oldest kept
# event: sent again they would count as newer than their tie-mates and push one out, so they
# are refused instead (older dropped events are harmless: sent again, they are dropped again).
_SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_unique ON events (user_id, item_id, timestamp);
CREATE INDEX events_user_time ON events (user_id, timestamp, seq);
CREATE TABLE evicted (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (user_id, item_id, timestamp)
) WITHOUT ROWID;
"""
# Per-connection scratch tables of one write: touched users, those over the cap, the rows the
# cap drops, and each trimmed user's oldest kept timestamp.
_SCRATCH = """
CREATE TEMP TABLE IF NOT EXISTS fs_touched (user_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS fs_over (user_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS fs_gone (seq INTEGER, user_id TEXT, item_id TEXT, timestamp INTEGER);
CREATE TEMP TABLE IF NOT EXISTS fs_bound (user_id TEXT PRIMARY KEY, oldest INTEGER);
"""

_INSERT = "INSERT OR IGNORE INTO events (user_id, item_id, timestamp) VALUES (?, ?, ?)"
_DROP_RESENT = """
DELETE FROM events WHERE seq IN (
    SELECT e.seq FROM fs_touched AS t
    JOIN evicted AS v ON v.user_id = t.user_id
    JOIN events AS e
        ON e.user_id = v.user_id AND e.item_id = v.item_id AND e.timestamp = v.timestamp
    WHERE e.seq > ?1
)
"""
_FIND_OVER = """
INSERT INTO fs_over SELECT t.user_id FROM fs_touched AS t
WHERE (SELECT COUNT(*) FROM events AS e WHERE e.user_id = t.user_id) > ?1
"""
_FIND_GONE = """
INSERT INTO fs_gone SELECT seq, user_id, item_id, timestamp FROM (
    SELECT e.seq, e.user_id, e.item_id, e.timestamp, ROW_NUMBER() OVER (
        PARTITION BY e.user_id ORDER BY e.timestamp DESC, e.seq DESC
    ) AS rank
    FROM events AS e JOIN fs_over AS o ON e.user_id = o.user_id
) WHERE rank > ?1
"""
_FIND_BOUND = """
INSERT INTO fs_bound SELECT o.user_id,
    (SELECT MIN(e.timestamp) FROM events AS e WHERE e.user_id = o.user_id)
FROM fs_over AS o
"""
_REMEMBER_TIES = """
INSERT OR IGNORE INTO evicted SELECT g.user_id, g.item_id, g.timestamp
FROM fs_gone AS g JOIN fs_bound AS b ON g.user_id = b.user_id WHERE g.timestamp >= b.oldest
"""
_FORGET_OLD_TIES = """
DELETE FROM evicted WHERE user_id IN (SELECT user_id FROM fs_bound)
AND timestamp < (SELECT b.oldest FROM fs_bound AS b WHERE b.user_id = evicted.user_id)
"""
_RECENT_ALL = "SELECT item_id, timestamp FROM events WHERE user_id = ? ORDER BY timestamp, seq"
_RECENT_N = """
SELECT item_id, timestamp FROM (
    SELECT item_id, timestamp, seq FROM events WHERE user_id = ?1
    ORDER BY timestamp DESC, seq DESC LIMIT ?2
) ORDER BY timestamp, seq
"""


class SQLiteStore(OnlineStore):
    """Events in one SQLite file (`events` table, schema version in `PRAGMA user_version`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
        synchronous: str = "full",
        timeout: float = 30.0,
        url: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.url = url or f"sqlite:///{self.path}"
        self.max_events_per_user = check_cap(max_events_per_user, self.url)
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise StoreError(
                f"{self.url}: synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}"
            )
        self.synchronous = synchronous.lower()
        if not timeout >= 0:
            raise StoreError(f"{self.url}: timeout must be seconds >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        if self.path.is_dir():
            raise StoreError(f"{self.url}: {self.path} is a directory; expected a database file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot create {self.path.parent}: {exc}") from exc
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._closed = False
        self._conn()  # open now, so a bad file fails here rather than on first use

    # ---- connections and transactions ----
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection in this process, opened (and the schema checked) on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid() and not self._closed:
            return conn
        if self._closed:
            raise StoreError(f"{self.url}: the store is closed")
        with self._sqlite_errors("open"):
            # check_same_thread=False only so close() may close every thread's connection;
            # each connection is still used by the one thread that opened it.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(
                        f"{self.url}: could not switch {self.path} to WAL mode (got {mode!r}); "
                        "expected a local file system that supports shared memory"
                    )
                conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
                conn.execute("PRAGMA temp_store = MEMORY")
                self._ensure_schema(conn)
                conn.executescript(_SCRATCH)
            except BaseException:
                conn.close()
                raise
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._conns.append((os.getpid(), conn))
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create the schema in an empty file; refuse files of other programs or newer versions."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.url}: schema version {version} was written by a newer tlsan-rec; "
                f"this one reads version {SCHEMA_VERSION}"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # another process may have created it while we waited
                tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
                if tables:
                    raise StoreError(
                        f"{self.url}: {self.path} is a SQLite database without a feature-store "
                        f"schema (tables {tables[:5]}); expected a new file or a feature store"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        """Turn sqlite3 errors into `StoreError`s that name the file and the operation."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            hint = (
                f" (another process held the write lock for more than {self.timeout:g} s)"
                if "locked" in str(exc) or "busy" in str(exc)
                else ""
            )
            raise StoreError(f"{self.url}: {action} failed: {exc}{hint}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.url}: {action} failed: {exc}; expected a feature-store SQLite file"
            ) from exc

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the lock is taken first so concurrent writers queue up."""
        conn = self._conn()
        with self._sqlite_errors(action):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- writes ----
    def append(self, user_id: str, events: Sequence[Event]) -> int:
        user = check_id(user_id, "user_id")
        rows = [(user, e.item_id, e.timestamp) for e in check_events(events)]
        if not rows:
            return 0
        with self._write("append") as conn:
            return self._store(conn, {user}, rows)

    def bulk_load(
        self,
        users: Any,
        items: Any,
        timestamps: Any,
        *,
        batch_size: int = 100_000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Insert in transactions of `batch_size` rows, then trim the users past the cap.

        Each batch commits on its own: an interrupted load keeps whole batches only, and
        loading again is harmless because appends are idempotent.
        """
        u, it, ts = check_columns(users, items, timestamps)
        if batch_size < 1:
            raise StoreError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        added = 0
        for start in range(0, len(u), batch_size):
            stop = min(start + batch_size, len(u))
            rows = zip(u[start:stop], it[start:stop], ts[start:stop], strict=True)
            with self._write("bulk_load") as conn:
                added += self._store(conn, set(u[start:stop]), rows)
            if progress is not None:
                progress(stop - start)
        return added

    def _store(self, conn: sqlite3.Connection, users: set[str], rows: Iterable[Row]) -> int:
        """Insert `rows` (of `users`) inside a write transaction, refuse re-sent evicted ties,
        apply the cap; returns how many inserted rows are kept."""
        last = conn.execute("SELECT IFNULL(MAX(seq), 0) FROM events").fetchone()[0]
        # Rows inserted now get seq > last: rowids grow and the write lock is held.
        conn.execute("DELETE FROM fs_touched")
        conn.executemany("INSERT INTO fs_touched VALUES (?)", ((u,) for u in users))
        conn.executemany(_INSERT, rows)
        conn.execute(_DROP_RESENT, (last,))
        self._trim(conn)
        return conn.execute("SELECT COUNT(*) FROM events WHERE seq > ?", (last,)).fetchone()[0]

    def _trim(self, conn: sqlite3.Connection) -> None:
        """Apply the retention cap to the touched users that are over it."""
        cap = self.max_events_per_user
        for table in ("fs_over", "fs_gone", "fs_bound"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute(_FIND_OVER, (cap,))
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM fs_over)").fetchone()[0]:
            return
        conn.execute(_FIND_GONE, (cap,))
        conn.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM fs_gone)")
        conn.execute(_FIND_BOUND)
        conn.execute(_REMEMBER_TIES)
        conn.execute(_FORGET_OLD_TIES)

    def delete_user(self, user_id: str) -> int:
        user = check_id(user_id, "user_id")
        with self._write("delete_user") as conn:
            conn.execute("DELETE FROM evicted WHERE user_id = ?", (user,))
            return conn.execute("DELETE FROM events WHERE user_id = ?", (user,)).rowcount

    # ---- reads ----
    def recent(self, user_id: str, n: int | None = None) -> list[Event]:
        user, n = check_id(user_id, "user_id"), check_n(n)
        conn = self._conn()
        with self._sqlite_errors("recent"):
            return self._recent(conn, user, n)

    @staticmethod
    def _recent(conn: sqlite3.Connection, user: str, n: int | None) -> list[Event]:
        if n == 0:
            return []
        rows = (
            conn.execute(_RECENT_ALL, (user,)) if n is None else conn.execute(_RECENT_N, (user, n))
        )
        return [Event(item, ts) for item, ts in rows]

    def recent_many(self, user_ids: Any, n: int | None = None) -> dict[str, list[Event]]:
        """All users' histories from one consistent snapshot (one read transaction)."""
        users, n = [check_id(u, "user_id") for u in user_ids], check_n(n)
        conn = self._conn()
        with self._sqlite_errors("recent_many"):
            if len(users) == 1:  # one SELECT is its own consistent snapshot
                return {users[0]: self._recent(conn, users[0], n)}
            conn.execute("BEGIN")
            try:
                return {user: self._recent(conn, user, n) for user in users}
            finally:
                conn.execute("COMMIT")

    def count(self, user_id: str) -> int:
        user = check_id(user_id, "user_id")
        with self._sqlite_errors("count"):
            sql = "SELECT COUNT(*) FROM events WHERE user_id = ?"
            return self._conn().execute(sql, (user,)).fetchone()[0]

    def users(self, page_size: int = 10_000) -> Iterator[str]:
        """Users in id order, read in pages so no cursor stays open between yields."""
        last = None
        while True:
            with self._sqlite_errors("users"):
                conn = self._conn()
                if last is None:
                    sql = "SELECT DISTINCT user_id FROM events ORDER BY user_id LIMIT ?"
                    page = [r[0] for r in conn.execute(sql, (page_size,))]
                else:
                    sql = (
                        "SELECT DISTINCT user_id FROM events WHERE user_id > ? "
                        "ORDER BY user_id LIMIT ?"
                    )
                    page = [r[0] for r in conn.execute(sql, (last, page_size))]
            yield from page
            if len(page) < page_size:
                return
            last = page[-1]

    def n_users(self) -> int:
        with self._sqlite_errors("n_users"):
            sql = "SELECT COUNT(DISTINCT user_id) FROM events"
            return self._conn().execute(sql).fetchone()[0]

    def n_events(self) -> int:
        """Events stored over all users."""
        with self._sqlite_errors("n_events"):
            return self._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0]

    # ---- lifecycle ----
    def close(self) -> None:
        """Close this process's connections (never ones inherited through a fork)."""
        with self._lock:
            self._closed = True
            pid = os.getpid()
            for owner, conn in self._conns:
                if owner == pid:
                    conn.close()
            self._conns.clear()
