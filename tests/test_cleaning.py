"""Cleaning order and counts of `tlsan prepare`: duplicates, then items, then users, then the
session-count filter, each a single pass, each counted in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from tlsan.cli import main

DAY = 86_400
T0 = 1_600_000_000


def _events() -> dict[str, list]:
    rows = [
        # u1: four days, plus one exact duplicate
        *[("u1", item, d) for item, d in (("a", 0), ("b", 1), ("c", 2), ("a", 3))],
        ("u1", "b", 1),
        # u2: three events, one of them the only event of item "rare"
        *[("u2", item, d) for item, d in (("a", 0), ("rare", 1), ("b", 2))],
        # u3: two events
        ("u3", "a", 0),
        ("u3", "b", 1),
        # u4: three events in one session (one day)
        *[("u4", item, 0) for item in "abc"],
        # u5: five sessions
        *[("u5", item, d) for d, item in enumerate("abcab")],
        # u6: three sessions
        *[("u6", item, d) for d, item in enumerate("cba")],
    ]
    return {
        "user_id": [u for u, _, _ in rows],
        "item_id": [i for _, i, _ in rows],
        # u4's three events: seconds apart on the same day
        "timestamp": [T0 + d * DAY + (n if u == "u4" else 0) for n, (u, _, d) in enumerate(rows)],
        "category": ["c-" + i for _, i, _ in rows],
    }


def test_filters_run_once_each_in_the_documented_order(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    pl.DataFrame(_events()).write_csv(log)
    out = tmp_path / "out"
    filters = ["--min-item-interactions", "2", "--min-user-interactions", "3"]
    filters += ["--min-sessions", "2", "--max-sessions", "4"]
    args = ["--interactions", str(log), "--out", str(out), "--split", "leave-one-out"]
    assert main(["prepare", *args, *filters, "--quiet"]) == 0
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    counted = {s["step"]: (s["rows"], s["users"], s["items"]) for s in steps}
    assert [s["step"] for s in steps][:5] == [
        "read",
        "drop_duplicates",
        "min_item_interactions",
        "min_user_interactions",
        "sessions_filter",
    ]
    assert counted["read"] == (21, 6, 4)
    assert counted["drop_duplicates"] == (20, 6, 4)
    assert counted["min_item_interactions"] == (19, 6, 3)  # "rare" goes
    # u2 is left with two events only because the item filter ran first; u3 had two
    assert counted["min_user_interactions"] == (15, 4, 3)
    assert counted["sessions_filter"] == (7, 2, 3)  # u4 (one session) and u5 (five) go
    users = pl.read_parquet(out / "vocab" / "users.parquet").get_column("user_id").to_list()
    assert sorted(users) == ["u1", "u6"]


def test_filters_off_keep_every_deduplicated_event(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    pl.DataFrame(_events()).write_parquet(log)
    out = tmp_path / "out"
    args = ["--interactions", str(log), "--out", str(out), "--split", "leave-one-out"]
    assert main(["prepare", *args, "--min-item-interactions", "0", "--quiet"]) == 0
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["read", "drop_duplicates", "events"]
    assert steps[-1]["rows"] == 20
