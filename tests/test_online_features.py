"""Online features (serving) equal the offline pipeline's, computed by the same code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipelines.config import SessionRule
from pipelines.features import History, features_frame, to_user_features, user_features
from tlsan.cli import main


def _user_events(events: pl.DataFrame) -> dict[int, pl.DataFrame]:
    return {key[0]: frame for key, frame in events.group_by("user", maintain_order=True)}


def test_every_digital_music_test_user_gets_the_offline_features(
    prepared_amazon: Callable[[str], Path],
) -> None:
    out = prepared_amazon("Digital_Music")
    config = json.loads((out / "manifest.json").read_text())["config"]
    events = _user_events(pl.read_parquet(out / "events.parquet"))
    item_category = dict(
        pl.read_parquet(out / "vocab/items.parquet").select("index", "category").iter_rows()
    )
    test = pl.read_parquet(out / "examples/test.parquet")
    assert test.height == 1_659
    histories, nows = [], []
    for row in test.iter_rows(named=True):
        history = events[row["user"]].filter(pl.col("pos") < row["history_end"])
        # What serving holds at that moment: the long-term history plus the session so far.
        short = row["short_items"]
        histories.append(
            History(
                history["item"].to_list() + short,
                history["category"].to_list() + [item_category[i] for i in short],
                history["timestamp"].to_list() + [row["ref_time"]] * len(short),
            )
        )
        nows.append(row["ref_time"])
    online = features_frame(
        histories,
        nows,
        session=SessionRule.parse(config["session"]),
        max_long=config["max_long"],
        max_short=config["max_short"],
    )
    assert online.height == test.height
    columns = ("long_items", "long_time", "short_items", "short_time", "user_category")
    for column in (*columns, "ref_time", "history_end"):
        assert online[column].to_list() == test[column].to_list(), column
    assert online["long_tau"].explode().to_numpy() == pytest.approx(
        test["long_tau"].explode().to_numpy()
    )
    # The one-user entry point gives the same answer as the batch.
    single = user_features(
        *(histories[7].items, histories[7].categories, histories[7].timestamps),
        now=nows[7],
        session=SessionRule.parse(config["session"]),
        max_long=config["max_long"],
        max_short=config["max_short"],
    )
    assert single == to_user_features(online[7:8])[0]


def test_gap_sessions_online_equal_offline_for_every_held_out_example(tmp_path: Path) -> None:
    rows = []
    for u in range(25):
        t = 1_600_000_000 + u * 977
        for k in range(14):
            t += [40, 300, 1_500, 7_200, 90_000][(u * 7 + k * 3) % 5]
            rows.append((u, (u * 5 + k * 3) % 17, t))
    log = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").with_columns(
        (pl.col("item_id") % 5).alias("category")
    )
    log.write_csv(tmp_path / "log.csv")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare",
                "--interactions",
                str(tmp_path / "log.csv"),
                "--out",
                str(out),
                "--split",
                "leave-one-out",
                "--session",
                "gap:30m",
                "--max-short",
                "3",
                "--max-long",
                "6",
                "--quiet",
            ]
        )
        == 0
    )
    events = _user_events(pl.read_parquet(out / "events.parquet"))
    for split in ("valid", "test"):
        frame = pl.read_parquet(out / f"examples/{split}.parquet")
        assert frame.height == 25
        for row in frame.iter_rows(named=True):
            user = events[row["user"]]
            target_pos = user.height - (1 if split == "test" else 2)
            before = user.filter(pl.col("pos") < target_pos)
            now = user["timestamp"][target_pos]
            online = user_features(
                before["item"].to_list(),
                before["category"].to_list(),
                before["timestamp"].to_list(),
                now,
                session=SessionRule.parse("gap:30m"),
                max_long=6,
                max_short=3,
            )
            assert online.long_items == row["long_items"]
            assert online.long_tau == pytest.approx(row["long_tau"])
            assert online.long_time == row["long_time"]
            assert online.short_items == row["short_items"]
            assert online.short_time == row["short_time"]
            assert online.user_category == row["user_category"]
            assert online.ref_time == row["ref_time"]


def test_time_moves_the_session_boundary_and_time_features() -> None:
    day = 86_400
    t0 = 1_600_000_000 - 1_600_000_000 % day
    items, cats, ts = [1, 2, 3], [1, 1, 2], [t0, t0 + day, t0 + day + 60]
    same_day = user_features(
        items, cats, ts, t0 + day + 120, session=SessionRule(), max_long=50, max_short=0
    )
    assert same_day.short_items == [2, 3] and same_day.long_items == [1]
    later = user_features(
        items, cats, ts, t0 + 40 * day, session=SessionRule(), max_long=50, max_short=0
    )
    assert later.short_items == [] and later.long_items == [1, 2, 3]
    assert later.ref_time == t0 + 40 * day
    assert later.long_tau == pytest.approx([1 / 5, 1 / 5, 1 / 5])  # deltas 41, 40, 40 days
    assert later.user_category == 1
    future = user_features(
        items, cats, ts, t0 + 30, session=SessionRule(), max_long=50, max_short=0
    )
    assert future.short_items == [1] and future.long_items == []  # events after now ignored


def test_tau_table_matches_the_papers_definition() -> None:
    """Every delta up to past the last bucket, powers of two and their neighbours included."""
    from pipelines.features import tau_array
    from tests.reference_construction import DAY, tau

    ref_day = np.full(10_000, 20_000, dtype=np.int64)
    event_day = ref_day - np.arange(-3, 9_997)  # deltas -2 .. 9997 (future events clip to 1)
    expected = [tau(int(r) * DAY, int(e) * DAY) for r, e in zip(ref_day, event_day, strict=True)]
    np.testing.assert_array_equal(tau_array(ref_day, event_day), np.float32(expected))
