"""Online store throughput: bulk loads (events/s) and `recent()` latency, SQLite and Redis.

Baselines measured in the same run on the same rows:
- `append()` one event per call (the serving write path): how much bulk loading buys;
- SQLite only: a bare `executemany` into an unindexed table with the same pragmas, the ceiling
  for Python's sqlite3 module, so `vs_raw_insert` shows what the indexes and checks cost.

Redis is a throw-away `redis-server` on a free port (tests/servers.py), flushed before each
run; with --redis-url the runs only use fresh key prefixes (`bench<k>:`) and leave them behind.
Prints one JSON document.

    python benchmarks/feature_store.py                   # 500k events, 5k users
    python benchmarks/feature_store.py --events 2000000 --users 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feature_store import open_store  # noqa: E402
from feature_store.base import OnlineStore  # noqa: E402


def make_events(n_events: int, n_users: int, n_items: int, seed: int) -> dict[str, list[Any]]:
    """Synthetic log sorted by user then time (as `events.parquet` is), raw string ids."""
    rng = np.random.default_rng(seed)
    users = np.sort(rng.integers(0, n_users, n_events))
    items = rng.zipf(1.3, n_events) % n_items
    ts = 1_400_000_000 + np.sort(rng.integers(0, 86_400 * 365, n_events))
    order = np.lexsort((ts, users))
    return {
        "users": [f"u{u}" for u in users[order].tolist()],
        "items": [f"i{i}" for i in items[order].tolist()],
        "timestamps": ts[order].tolist(),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_bulk(open_fresh: Any, data: dict[str, list[Any]], repeats: int) -> dict[str, Any]:
    """Median events/s of `bulk_load` into an empty store."""
    rates, stored = [], 0
    for _ in range(repeats):
        with open_fresh() as store:
            start = time.perf_counter()
            store.bulk_load(data["users"], data["items"], data["timestamps"])
            rates.append(len(data["users"]) / (time.perf_counter() - start))
            stored = store.n_events()
    return {"events_per_s": statistics.median(rates), "runs": rates, "stored": stored}


def bench_append(open_fresh: Any, data: dict[str, list[Any]], n: int) -> float:
    """events/s of `append()` with one event per call (the serving write path)."""
    with open_fresh() as store:
        rows = list(zip(data["users"][:n], data["items"][:n], data["timestamps"][:n], strict=True))
        start = time.perf_counter()
        for user, item, ts in rows:
            store.append(user, [(item, ts)])
        return n / (time.perf_counter() - start)


def bench_recent(
    store: OnlineStore, users: list[str], queries: int, n: int, seed: int
) -> dict[str, float]:
    """Latency of single `recent(user, n)` calls and of `recent_many` batches of 64, in µs."""
    rng = np.random.default_rng(seed)
    picks = [users[i] for i in rng.integers(0, len(users), queries).tolist()]
    single = []
    for user in picks:
        start = time.perf_counter_ns()
        store.recent(user, n)
        single.append((time.perf_counter_ns() - start) / 1000)
    batched = []
    for i in range(0, queries, 64):
        start = time.perf_counter_ns()
        store.recent_many(picks[i : i + 64], n)
        batched.append((time.perf_counter_ns() - start) / 1000)
    return {
        "recent_p50_us": percentile(single, 50),
        "recent_p99_us": percentile(single, 99),
        "recent_many64_p50_us": percentile(batched, 50),
        "recent_many64_p99_us": percentile(batched, 99),
    }


def raw_sqlite_insert(path: Path, data: dict[str, list[Any]]) -> float:
    """events/s of a bare executemany into an unindexed table, same pragmas as the store."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (user_id TEXT, item_id TEXT, timestamp INTEGER)")
    start = time.perf_counter()
    rows = zip(data["users"], data["items"], data["timestamps"], strict=True)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    conn.execute("COMMIT")
    rate = len(data["users"]) / (time.perf_counter() - start)
    conn.close()
    return rate


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    from tests.servers import redis_server

    with redis_server() as server:
        yield server.url()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append-events", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--n", type=int, default=50, help="events per recent() call")
    parser.add_argument("--redis-url", help="use this server instead of starting one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = make_events(args.events, args.users, args.items, args.seed)
    users = sorted(set(data["users"]))
    result: dict[str, Any] = {
        "events": args.events,
        "users": len(users),
        "max_events_per_user": 1000,
    }
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def fresh_sqlite(**options: str) -> OnlineStore:
            query = "&".join(f"{k}={v}" for k, v in options.items())
            return open_store(f"sqlite:///{tmp}/store{next(counter)}.db?{query}".rstrip("?"))

        sqlite = bench_bulk(fresh_sqlite, data, args.repeats)
        raw = raw_sqlite_insert(Path(tmp) / "raw.db", data)
        append_full = bench_append(fresh_sqlite, data, args.append_events)
        append_normal = bench_append(
            lambda: fresh_sqlite(synchronous="normal"), data, args.append_events
        )
        with fresh_sqlite() as store:
            store.bulk_load(data["users"], data["items"], data["timestamps"])
            latency = bench_recent(store, users, args.queries, args.n, args.seed)
        result["sqlite"] = {
            "bulk_load": sqlite,
            "raw_insert_events_per_s": raw,
            "bulk_vs_raw_insert": sqlite["events_per_s"] / raw,
            "append_one_per_call_events_per_s": append_full,
            "append_one_per_call_synchronous_normal_events_per_s": append_normal,
            "bulk_vs_append": sqlite["events_per_s"] / append_full,
            **latency,
        }

    with redis_url(args.redis_url) as url:
        prefixes = iter(range(10**6))

        def fresh_redis() -> OnlineStore:
            if args.redis_url is None:  # our own throw-away server: start each run empty
                import redis

                with redis.Redis.from_url(url) as client:
                    client.flushdb()
            return open_store(f"{url}?prefix=bench{next(prefixes)}:")

        redis_bulk = bench_bulk(fresh_redis, data, args.repeats)
        append_redis = bench_append(fresh_redis, data, args.append_events)
        with fresh_redis() as store:
            store.bulk_load(data["users"], data["items"], data["timestamps"])
            latency = bench_recent(store, users, args.queries, args.n, args.seed)
        result["redis"] = {
            "bulk_load": redis_bulk,
            "append_one_per_call_events_per_s": append_redis,
            "bulk_vs_append": redis_bulk["events_per_s"] / append_redis,
            **latency,
        }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
