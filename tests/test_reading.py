"""How text columns are typed (`pipelines.reading`): integer ids only when the text is the
integer's own decimal form, ISO-8601 parsing only where the integer parse failed."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipelines.config import ColumnMap
from pipelines.reading import read_interactions

T0 = 1_600_000_000


def _read(tmp_path: Path, data: dict) -> pl.DataFrame:
    path = tmp_path / "log.csv"
    pl.DataFrame(data).write_csv(path)
    return read_interactions(path, None, ColumnMap(), "s")


def test_canonical_integer_ids_become_integers(tmp_path: Path) -> None:
    frame = _read(
        tmp_path, {"user_id": ["7", "10", "-3"], "item_id": ["1", "2", "3"], "timestamp": ["1"] * 3}
    )
    assert frame.schema["user_id"] == pl.Int64 and frame["user_id"].to_list() == [7, 10, -3]


def test_ids_that_are_not_their_integers_text_stay_text(tmp_path: Path) -> None:
    for odd in ("007", "+7", "-0", " 7"):
        frame = _read(
            tmp_path, {"user_id": ["7", odd], "item_id": ["1", "2"], "timestamp": ["1", "2"]}
        )
        assert frame.schema["user_id"] == pl.String, odd
        assert frame["user_id"].to_list() == ["7", odd]  # two distinct users, as written


def test_integer_iso_and_padded_timestamps_in_one_column(tmp_path: Path) -> None:
    times = [str(T0), "2020-09-13T12:26:40Z", f" {T0 + 60} ", "2020-09-14"]
    frame = _read(tmp_path, {"user_id": [1, 1, 1, 1], "item_id": [1, 2, 3, 4], "timestamp": times})
    assert frame["timestamp"].to_list() == [T0, T0, T0 + 60, 1_600_041_600]


def test_milliseconds_text_is_divided_before_iso_is_tried(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    data = {"user_id": [1, 1], "item_id": [1, 2], "timestamp": [str(T0 * 1000 + 999), "2020-09-14"]}
    pl.DataFrame(data).write_csv(path)
    frame = read_interactions(path, None, ColumnMap(), "ms")
    assert frame["timestamp"].to_list() == [T0, 1_600_041_600]
