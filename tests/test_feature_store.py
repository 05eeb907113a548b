"""The online feature store against real backends: a SQLite file and a real redis-server."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from feature_store import Event, OnlineStore, StoreError, open_store
from feature_store.materialize import read_dataset_events
from pipelines.errors import DataValidationError
from tests.servers import free_port
from tlsan.cli import main as tlsan_main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

StoreFactory = Callable[..., OnlineStore]


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL of each backend (the Redis server starts only when needed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def make_store(store_url: str) -> Iterator[StoreFactory]:
    """Open independent stores of the parametrized backend (separate file / key prefix)."""
    opened: list[OnlineStore] = []

    def make(name: str = "main", max_events_per_user: int = 1000) -> OnlineStore:
        if store_url.startswith("sqlite"):
            url = store_url.replace("store.db", f"{name}.db")
        else:
            url = f"{store_url}?prefix={name}:"
        store = open_store(url, max_events_per_user=max_events_per_user)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def amazon_rows(n_rows: int) -> pl.DataFrame:
    return pl.read_csv(
        DATA / "amazon" / "Digital_Music.interactions.csv",
        n_rows=n_rows,
        schema_overrides={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64},
    )


# ---- the contract, on both backends ----


def test_append_is_idempotent(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.append("u1", [("i1", 100), Event("i2", 200), ("i1", 100)]) == 2
    assert store.append("u1", [{"item_id": "i2", "timestamp": 200}, ("i1", 100)]) == 0
    assert store.append("u1", [("i1", 300)]) == 1  # same item, other time: a new event
    assert store.append("u2", [("i1", 100)]) == 1  # same item and time, other user
    assert store.count("u1") == 3
    assert store.recent("u1") == [Event("i1", 100), Event("i2", 200), Event("i1", 300)]


def test_ordering_by_time_with_ties_in_arrival_order(make_store: StoreFactory) -> None:
    store = make_store()
    # Names run against the arrival order, so sorting by item id would be caught.
    store.append("u", [("z", 10), ("y", 5), ("x", 10)])
    store.append("u", [("w", 10), ("v", 5), ("zz", 1)])
    store.append("u", [(7, 10)])  # integer ids (JSON numbers) are stored as strings
    expected = [("zz", 1), ("y", 5), ("v", 5), ("z", 10), ("x", 10), ("w", 10), ("7", 10)]
    assert store.recent("u") == [Event(i, t) for i, t in expected]


def test_recent_n(make_store: StoreFactory) -> None:
    store = make_store()
    store.append("u", [(f"i{k}", 1000 - k) for k in range(10)])  # arrives newest first
    chronological = [Event(f"i{k}", 1000 - k) for k in reversed(range(10))]
    assert store.recent("u") == chronological
    assert store.recent("u", None) == chronological
    assert store.recent("u", 3) == chronological[-3:]
    assert store.recent("u", 1) == [Event("i0", 1000)]
    assert store.recent("u", 0) == []
    assert store.recent("u", 50) == chronological
    assert store.recent("nobody") == [] and store.count("nobody") == 0
    store.append("v", [("a", 1)])
    batch = store.recent_many(["u", "v", "nobody"], 2)
    assert batch == {"u": chronological[-2:], "v": [Event("a", 1)], "nobody": []}
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(StoreError, match="n: expected None or an integer"):
            store.recent("u", bad)


def test_retention_cap_keeps_newest(make_store: StoreFactory) -> None:
    store = make_store(max_events_per_user=5)
    assert store.max_events_per_user == 5
    assert store.append("u", [(f"i{k}", k) for k in range(8)]) == 5  # three dropped at once
    assert store.recent("u") == [Event(f"i{k}", k) for k in range(3, 8)]
    assert store.count("u") == 5
    # Older than everything kept: dropped by the cap at once, so not counted as stored.
    assert store.append("u", [("old", 0)]) == 0
    assert store.append("u", [("old", 0), ("i2", 2), ("i3", 3)]) == 0
    assert store.recent("u") == [Event(f"i{k}", k) for k in range(3, 8)]
    # A tie with the newest event is newer by arrival; the oldest kept event goes.
    assert store.append("u", [("tie", 7), ("i7", 7)]) == 1
    assert store.recent("u") == [Event(f"i{k}", k) for k in range(4, 8)] + [Event("tie", 7)]
    store.append("other", [("a", 1)])
    assert store.count("other") == 1
    assert store.append("u", [(f"i{k}", k) for k in range(8)]) == 0  # all known or too old
    assert store.count("u") == 5


def test_dropped_events_sent_again_change_nothing(make_store: StoreFactory) -> None:
    """Day-resolution logs tie a lot: an event the cap dropped at the oldest kept timestamp
    must not come back as 'newer' than its tie-mates when a client retries or a load reruns."""
    store = make_store(max_events_per_user=3)
    store.append("u", [("a", 100), ("b", 100), ("c", 100), ("d", 200)])  # "a" dropped
    kept = [Event("b", 100), Event("c", 100), Event("d", 200)]
    assert store.recent("u") == kept
    assert store.append("u", [("a", 100)]) == 0
    assert store.recent("u") == kept
    # A genuinely new event at the tied time is newer by arrival: it pushes "b" out.
    assert store.append("u", [("e", 100)]) == 1
    assert store.recent("u") == [Event("c", 100), Event("e", 100), Event("d", 200)]
    assert store.append("u", [("a", 100), ("b", 100)]) == 0
    # Once the oldest kept time moves on, old drops are simply too old when sent again.
    store.append("u", [("f", 300), ("g", 300)])
    assert store.recent("u") == [Event("d", 200), Event("f", 300), Event("g", 300)]
    assert store.append("u", [("a", 100), ("c", 100), ("e", 100)]) == 0
    assert store.recent("u") == [Event("d", 200), Event("f", 300), Event("g", 300)]
    assert store.delete_user("u") == 3
    assert store.append("u", [("a", 100)]) == 1  # erased users start from scratch


def test_remembered_ties_stay_bounded(store_url: str) -> None:
    """The refused-again memory only holds drops tied with the oldest kept event."""

    with open_store(store_url, max_events_per_user=2) as store:
        store.append("u", [("a", 1), ("b", 1), ("c", 1)])  # "a" dropped, tied with "b"
        assert remembered(store_url) == 1
        for t in range(2, 50):
            store.append("u", [(f"x{t}", t)])
        assert remembered(store_url) == 0 and store.count("u") == 2


def remembered(store_url: str) -> int:
    """How many dropped events the backend remembers, read from its storage directly."""
    import redis

    if store_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as conn:
            return conn.execute("SELECT COUNT(*) FROM evicted").fetchone()[0]
    with redis.Redis.from_url(store_url, decode_responses=True) as client:
        ties = client.scard("tlsan:fs:ties:u")
        fields = [f for f in client.hkeys("tlsan:fs:seen:u") if f != "#seq"]
        assert len(fields) == ties + client.zcard("tlsan:fs:ev:u")
        return ties


def test_bulk_load_equals_per_event_append(make_store: StoreFactory) -> None:
    rows = amazon_rows(3000)
    cap = 30  # below the longest histories, so bulk trimming is exercised too
    one_by_one, bulk, many = (make_store(name, max_events_per_user=cap) for name in "abc")
    triples = list(rows.select("user_id", "item_id", "timestamp").iter_rows())
    for user, item, ts in triples:
        assert one_by_one.append(user, [(item, ts)]) == 1  # each is the newest when it arrives
    # Batches of 700 split users across transactions; NumPy and Polars columns are accepted.
    bulk.bulk_load(rows["user_id"], rows["item_id"].to_numpy(), rows["timestamp"], batch_size=700)
    # One batch: the count is exactly what the cap kept.
    assert many.append_many(triples) == many.n_events()
    users = sorted(set(rows["user_id"]))
    assert sorted(one_by_one.users()) == sorted(bulk.users()) == sorted(many.users()) == users
    assert one_by_one.n_users() == bulk.n_users() == len(users)
    expected = one_by_one.recent_many(users)
    assert bulk.recent_many(users) == expected == many.recent_many(users)
    assert max(len(v) for v in expected.values()) == cap
    assert bulk.n_events() == one_by_one.n_events() == sum(len(v) for v in expected.values())
    # Sending the same rows again stores nothing, whichever way.
    assert bulk.bulk_load(rows["user_id"], rows["item_id"], rows["timestamp"]) == 0
    assert sum(one_by_one.append(u, [(i, t)]) for u, i, t in triples[:500]) == 0
    assert bulk.recent_many(users) == expected == one_by_one.recent_many(users)


def test_bulk_load_progress_and_duplicates(make_store: StoreFactory) -> None:
    store = make_store()
    done: list[int] = []
    users, items, ts = ["a", "b", "a", "a", "b"], ["x", "y", "x", "z", "y"], [1, 2, 1, 1, 2]
    assert store.bulk_load(users, items, ts, batch_size=2, progress=done.append) == 3
    assert done == [2, 2, 1]
    assert store.recent("a") == [Event("x", 1), Event("z", 1)]
    with pytest.raises(StoreError, match="same length"):
        store.bulk_load(["a"], ["x", "y"], [1, 2])
    with pytest.raises(StoreError, match=r"timestamps\[1\]: expected integer unix seconds"):
        store.bulk_load(["a", "a"], ["x", "y"], [1, 2.5])
    with pytest.raises(StoreError, match=r"users\[0\]: expected a non-empty string"):
        store.bulk_load([""], ["x"], [1])
    assert store.n_events() == 3


def test_delete_user(make_store: StoreFactory) -> None:
    store = make_store()
    store.append("gone", [("a", 1), ("b", 2)])
    store.append("kept", [("a", 1)])
    assert store.delete_user("gone") == 2
    assert store.count("gone") == 0 and store.recent("gone") == []
    assert sorted(store.users()) == ["kept"] and store.n_users() == 1
    assert store.recent("kept") == [Event("a", 1)]
    assert store.delete_user("gone") == 0
    # A returning user starts from scratch, and old events are storable again.
    assert store.append("gone", [("a", 1)]) == 1
    assert store.recent("gone") == [Event("a", 1)]


def test_invalid_events_store_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    cases = [
        ([("a", 1), ("b", 1.5)], r"events\[1\]\.timestamp: expected integer unix seconds"),
        ([("", 1)], r"events\[0\]\.item_id: expected a non-empty string"),
        ([("a", "2024-01-01")], r"events\[0\]\.timestamp"),
        ([("a", True)], r"events\[0\]\.timestamp"),
        ([("a", 2**60)], r"\|t\| < 2\*\*53"),
        ([{"item_id": "a"}], r"events\[0\]: missing field\(s\) \['timestamp'\]"),
        (["abc"], r"events\[0\]: expected an Event"),
        ("abc", "events: expected a sequence of events"),
    ]
    for events, message in cases:
        with pytest.raises(StoreError, match=message):
            store.append("u", events)
    with pytest.raises(StoreError, match="user_id: expected a non-empty string"):
        store.append(None, [("a", 1)])  # type: ignore[arg-type]
    assert store.count("u") == 0 and store.n_users() == 0


def test_reopen_sees_the_same_events(store_url: str) -> None:
    with open_store(store_url) as store:
        store.append("u", [("a", 2), ("b", 1)])
    with open_store(store_url) as store:
        assert store.recent("u") == [Event("b", 1), Event("a", 2)]
    with pytest.raises(StoreError, match="closed"):
        store.recent("u")


def _append_worker(url: str, worker: int, n: int, start: Any) -> None:
    """Child process: `n` single-event appends to a shared user and to its own user."""
    with open_store(url) as store:
        start.wait(30)
        for k in range(n):
            store.append("shared", [(f"w{worker}-{k}", k)])
            store.append(f"own{worker}", [(f"i{k}", k)])


def test_two_processes_append_concurrently(store_url: str) -> None:
    n = 150
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_worker, args=(store_url, w, n, start)) for w in (0, 1)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    with open_store(store_url) as store:
        shared = store.recent("shared")
        assert len(shared) == 2 * n
        assert {e.item_id for e in shared} == {f"w{w}-{k}" for w in (0, 1) for k in range(n)}
        assert [e.timestamp for e in shared] == sorted(e.timestamp for e in shared)
        for w in (0, 1):
            assert store.recent(f"own{w}") == [Event(f"i{k}", k) for k in range(n)]


def test_threads_share_one_store_object(store_url: str) -> None:
    """Serving calls one store object from several threads; each gets its own connection."""
    with open_store(store_url) as store:
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for k in range(50):
                    store.append("u", [(f"t{t}-{k}", k)])
                    store.recent("u", 5)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert store.count("u") == 200


# ---- SQLite specifics ----

_KILLED_WRITER = """
import sys
from feature_store import open_store
store = open_store(sys.argv[1])
k = 0
while True:
    store.append("victim", [(f"i{k}", k)])
    print(k, flush=True)  # acknowledged: append() has returned
    k += 1
"""


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_acknowledged_append_survives_sigkill(tmp_path: Path, synchronous: str) -> None:
    url = f"sqlite:///{tmp_path}/store.db?synchronous={synchronous}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) == 300:
                os.kill(proc.pid, signal.SIGKILL)
                break
        acked += [int(line) for line in proc.stdout]  # acks already in the pipe
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 300
    with open_store(url) as store:
        stored = store.recent("victim")
        assert [e.timestamp for e in stored][: len(acked)] == acked
        assert len(stored) in (len(acked), len(acked) + 1)  # at most one unacknowledged
        assert store.append("victim", [("after", 10**6)]) == 1
    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sqlite_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "store.db"  # parent dirs are created
    with open_store(f"sqlite:///{path}") as store:
        store.append("u", [("a", 1)])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        indexes = {
            name: (unique, [r[2] for r in conn.execute(f"PRAGMA index_info({name})")])
            for _, name, unique, *_ in conn.execute("PRAGMA index_list(events)")
        }
    assert indexes["events_unique"] == (1, ["user_id", "item_id", "timestamp"])
    assert indexes["events_user_time"] == (0, ["user_id", "timestamp", "seq"])


def test_default_url_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store() as store:
        assert store.max_events_per_user == 1000
        store.append("u", [("a", 1)])
    assert (tmp_path / "mlruns" / "feature_store.db").is_file()
    with open_store("sqlite:///rel/x.db?max_events_per_user=2&synchronous=normal") as store:
        assert store.max_events_per_user == 2
    assert (tmp_path / "rel" / "x.db").is_file()


def test_sqlite_refuses_files_it_cannot_use(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("not a database, just text that is long enough to have a header " * 20)
    with pytest.raises(StoreError, match=r"notes\.db.*expected a feature-store SQLite file"):
        open_store(f"sqlite:///{text}")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match=r"without a feature-store schema \(tables \['orders'\]"):
        open_store(f"sqlite:///{foreign}")
    newer = tmp_path / "newer.db"
    with open_store(f"sqlite:///{newer}"):
        pass
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(StoreError, match="schema version 7 was written by a newer"):
        open_store(f"sqlite:///{newer}")
    with pytest.raises(StoreError, match="is a directory"):
        open_store(f"sqlite:///{tmp_path}")


# ---- URLs ----


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://db/x", "unknown scheme 'postgres'"),
        ("feature_store.db", "expected sqlite:///path/to/file.db or redis://host:port/db"),
        ("sqlite://host/x.db", "expected sqlite:///relative/path.db"),
        ("sqlite:///", "expected sqlite:///relative/path.db"),
        ("sqlite:///:memory:", "in-memory databases cannot be shared"),
        ("sqlite:///x.db?max_events_per_user=0", "max_events_per_user must be an integer >= 1"),
        ("sqlite:///x.db?max_events_per_user=ten", "max_events_per_user must be an integer >= 1"),
        ("sqlite:///x.db?cap=5", r"unknown option\(s\) \['cap'\]"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous must be one of"),
        ("sqlite:///x.db?timeout=soon", "timeout must be seconds"),
        ("redis://127.0.0.1:1/0?max_events_per_user=-3", "max_events_per_user must be"),
    ],
)
def test_bad_urls(url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=message) as info:
        open_store(url)
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing created for a refused URL


def test_unreachable_redis() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match="cannot reach the Redis server") as info:
        open_store(url)
    assert url in str(info.value)
    secret = f"redis://app:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match=r"redis://app:\*\*\*@127\.0\.0\.1") as info:
        open_store(secret)
    assert "hunter2" not in str(info.value)


def test_redis_prefixes_and_keys_are_isolated(redis_url: str) -> None:
    import redis

    with (
        open_store(f"{redis_url}?prefix=a:") as a,
        open_store(f"{redis_url}?prefix=b:&max_events_per_user=3") as b,
    ):
        a.append("u", [("x", 1)])
        b.append("u", [("y:with:colons", 2), ("z", 3), ("w", 4), ("v", 5)])
        assert a.recent("u") == [Event("x", 1)]
        assert b.recent("u") == [Event("z", 3), Event("w", 4), Event("v", 5)]
        assert b.max_events_per_user == 3
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert sorted(client.keys("b:*")) == ["b:ev:u", "b:seen:u", "b:users"]
        # The evicted event left the idempotency hash too: nothing grows without bound.
        assert sorted(client.hkeys("b:seen:u")) == ["#seq", "3:z", "4:w", "5:v"]


# ---- tlsan materialize ----


def write_dataset(root: Path) -> Path:
    """A tiny prepared dataset by hand, following docs/dataset-format.md."""
    (root / "vocab").mkdir(parents=True)
    pl.DataFrame(
        {"index": [1, 2], "user_id": ["alice", "1007"]},
        schema={"index": pl.Int32, "user_id": pl.String},
    ).write_parquet(root / "vocab" / "users.parquet")
    pl.DataFrame(
        {"index": [1, 2, 3], "item_id": ["B00X", "42", "Z"], "category": [1, 1, 2]},
        schema={"index": pl.Int32, "item_id": pl.String, "category": pl.Int32},
    ).write_parquet(root / "vocab" / "items.parquet")
    pl.DataFrame(
        {"index": [1, 2], "category": ["Rock", "Jazz"]},
        schema={"index": pl.Int32, "category": pl.String},
    ).write_parquet(root / "vocab" / "categories.parquet")
    pl.DataFrame(
        {
            "user": [1, 1, 1, 2, 2],
            "item": [3, 1, 2, 2, 3],
            "category": [2, 1, 1, 1, 2],
            "timestamp": [86_400, 86_400, 2 * 86_400, 5, 9],
            "session": [0, 0, 1, 0, 0],
            "pos": [0, 1, 2, 0, 1],
        },
        schema={
            "user": pl.Int32, "item": pl.Int32, "category": pl.Int32,
            "timestamp": pl.Int64, "session": pl.Int32, "pos": pl.Int32,
        },
    ).write_parquet(root / "events.parquet")  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"vocab_sizes": {"users": 3, "items": 4}}))
    return root


def test_materialize_cli_end_to_end(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path / "dataset")
    argv = ["materialize", "--data", str(data), "--store", store_url, "--batch", "2"]
    assert tlsan_main(argv) == 0
    out = capsys.readouterr().out
    assert "materialized 2 users, 5 events (5 new)" in out
    with open_store(store_url) as store:
        # Raw ids, ties (alice's first day) in file order.
        assert store.recent("alice") == [Event("Z", 86_400), Event("B00X", 86_400), Event("42", 172_800)]  # fmt: skip
        assert store.recent("1007") == [Event("42", 5), Event("Z", 9)]
        assert sorted(store.users()) == ["1007", "alice"]
    assert tlsan_main([*argv, "--quiet"]) == 0
    assert "(0 new)" in capsys.readouterr().out
    assert tlsan_main([*argv, "--quiet", "--max-events-per-user", "1"]) == 0
    capsys.readouterr()
    with open_store(store_url) as store:
        assert store.recent("alice") == [Event("42", 172_800)]


def _broken_datasets(root: Path) -> Iterator[tuple[Path, str]]:
    empty = root / "empty"
    empty.mkdir(parents=True)
    yield empty, r"not a prepared dataset, missing events\.parquet, vocab/users\.parquet"
    yield root / "absent", "not a directory"
    no_items = write_dataset(root / "no_items")
    (no_items / "vocab" / "items.parquet").unlink()
    yield no_items, r"missing vocab/items\.parquet"
    bad_column = write_dataset(root / "bad_column")
    pl.DataFrame({"index": [1, 2], "name": ["a", "b"]}).write_parquet(
        bad_column / "vocab" / "users.parquet"
    )
    yield bad_column, r"users\.parquet: missing column\(s\) \['user_id'\]"
    corrupt = write_dataset(root / "corrupt")
    (corrupt / "events.parquet").write_text("user,item\n1,2\n")
    yield corrupt, r"events\.parquet: cannot read it as Parquet"
    dangling = write_dataset(root / "dangling")
    pl.DataFrame(
        {"user": [1, 9], "item": [1, 1], "timestamp": [1, 2]},
        schema={"user": pl.Int32, "item": pl.Int32, "timestamp": pl.Int64},
    ).write_parquet(dangling / "events.parquet")
    yield dangling, r"1 row\(s\) have a user index missing from vocab/users\.parquet \(first: 9\)"


def test_materialize_rejects_non_datasets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    for path, message in _broken_datasets(tmp_path / "data"):
        with pytest.raises(DataValidationError, match=message):
            read_dataset_events(path)
        assert tlsan_main(["materialize", "--data", str(path), "--store", url, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tlsan materialize: error: ") and "\n" not in err
        assert str(path) in err
    with open_store(url) as store:
        assert store.n_users() == 0


def test_materialize_exit_status_from_a_shell(tmp_path: Path) -> None:
    """The installed entry point: a non-dataset dir and an unreachable store both exit 2."""
    data = write_dataset(tmp_path / "dataset")
    cases = [
        (["--data", str(tmp_path), "--store", f"sqlite:///{tmp_path}/s.db"], "not a prepared"),
        (["--data", str(data), "--store", f"redis://127.0.0.1:{free_port()}/0"], "cannot reach"),
        (["--data", str(data), "--store", f"sqlite:///{tmp_path}/s.db", "--batch", "0"], "--batch"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "tlsan", "materialize", "--quiet", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and result.stderr.count("\n") == 1
