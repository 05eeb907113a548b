"""Every bad-input case of `tlsan prepare`: exit status 2, one clear stderr line, no output."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tlsan.cli import main

DAY = 86_400
GOOD = {
    "user_id": ["a", "a", "a", "a", "b", "b", "b", "b"],
    "item_id": ["x", "y", "x", "y", "x", "z", "y", "z"],
    "timestamp": [1_600_000_000 + d * DAY for d in (0, 1, 2, 3, 0, 2, 4, 6)],
    "category": ["c1", "c2", "c1", "c2", "c1", "c3", "c2", "c3"],
}


def _csv(tmp_path: Path, data: dict, name: str = "log.csv") -> Path:
    path = tmp_path / name
    pl.DataFrame(data).write_csv(path)
    return path


def _fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], *needles: str
) -> str:
    out = tmp_path / "out"
    status = main(["prepare", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tlsan prepare: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp dir left"
    return lines[0]


def test_missing_file(capsys, tmp_path: Path) -> None:
    _fails(
        capsys, tmp_path, ["--interactions", str(tmp_path / "nope.csv")], "nope.csv", "not found"
    )


def test_unreadable_file(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "log.parquet"
    bad.write_bytes(b"this is not parquet at all")
    _fails(capsys, tmp_path, ["--interactions", str(bad)], "log.parquet", "cannot read as parquet")


def test_unknown_extension(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "log.xlsx"
    bad.write_text("x")
    _fails(capsys, tmp_path, ["--interactions", str(bad)], "log.xlsx", "--format")


def test_missing_columns(capsys, tmp_path: Path) -> None:
    data = {k: v for k, v in GOOD.items() if k != "timestamp"}
    msg = _fails(capsys, tmp_path, ["--interactions", str(_csv(tmp_path, data))], "'timestamp'")
    assert "--time-col" in msg


def test_mapped_column_missing(capsys, tmp_path: Path) -> None:
    path = _csv(tmp_path, GOOD)
    _fails(capsys, tmp_path, ["--interactions", str(path), "--user-col", "customer"], "'customer'")


@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp"])
def test_nulls_in_ids_or_timestamps(capsys, tmp_path: Path, column: str) -> None:
    data = {k: list(v) for k, v in GOOD.items()}
    data[column][2] = None
    msg = _fails(
        capsys,
        tmp_path,
        ["--interactions", str(_csv(tmp_path, data))],
        f"'{column}'",
        "1 of 8 rows",
    )
    assert "row=2" in msg


def test_unparseable_timestamps(capsys, tmp_path: Path) -> None:
    data = {**GOOD, "timestamp": ["2020-01-01", "yesterday", "2020-01-03", "soon"] * 2}
    _fails(
        capsys,
        tmp_path,
        ["--interactions", str(_csv(tmp_path, data))],
        "4 of 8 rows",
        "unparseable",
        "'yesterday'",
    )


def test_negative_timestamps(capsys, tmp_path: Path) -> None:
    data = {**GOOD, "timestamp": [1, -5, 3, 4, 5, 6, 7, 8]}
    _fails(capsys, tmp_path, ["--interactions", str(_csv(tmp_path, data))], "negative", "'-5'")


def test_milliseconds_given_as_seconds(capsys, tmp_path: Path) -> None:
    data = {**GOOD, "timestamp": [t * 1000 for t in GOOD["timestamp"]]}
    _fails(capsys, tmp_path, ["--interactions", str(_csv(tmp_path, data))], "--time-unit ms")


def test_empty_input(capsys, tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,category\n")
    _fails(capsys, tmp_path, ["--interactions", str(path)], "no interactions")


def test_items_missing_from_catalog(capsys, tmp_path: Path) -> None:
    log = _csv(tmp_path, {k: v for k, v in GOOD.items() if k != "category"})
    items = _csv(tmp_path, {"item_id": ["x", "y"], "category": ["c1", "c2"]}, "items.csv")
    msg = _fails(
        capsys,
        tmp_path,
        ["--interactions", str(log), "--items", str(items)],
        "2 rows reference 1 item(s) missing from the catalog",
        "items.csv",
        "--missing-items unknown",
    )
    assert "'z'" in msg


def test_missing_items_policy_unknown_builds_the_dataset(tmp_path: Path) -> None:
    log = _csv(tmp_path, {k: v for k, v in GOOD.items() if k != "category"})
    items = _csv(tmp_path, {"item_id": ["x", "y"], "category": ["c1", "c2"]}, "items.csv")
    out = tmp_path / "out"
    args = ["prepare", "--interactions", str(log), "--items", str(items), "--out", str(out)]
    assert main([*args, "--missing-items", "unknown", "--split", "leave-one-out", "--quiet"]) == 0
    categories = pl.read_parquet(out / "vocab/categories.parquet")["category"].to_list()
    assert "unknown" in categories
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["categories"]["events_missing_from_catalog"] == 2


def test_catalog_with_conflicting_categories(capsys, tmp_path: Path) -> None:
    log = _csv(tmp_path, GOOD)
    items = _csv(tmp_path, {"item_id": ["x", "x"], "category": ["c1", "c2"]}, "items.csv")
    _fails(
        capsys,
        tmp_path,
        ["--interactions", str(log), "--items", str(items)],
        "items.csv",
        "second, different category",
    )


def test_no_category_anywhere(capsys, tmp_path: Path) -> None:
    log = _csv(tmp_path, {k: v for k, v in GOOD.items() if k != "category"})
    _fails(capsys, tmp_path, ["--interactions", str(log)], "no 'category' column")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--session", "gap:soon"], "--session"),
        (["--split", "time", "--valid-from", "2021-01-01"], "--test-from"),
        (["--split", "time", "--valid-from", "2021-01-02", "--test-from", "2021-01-01"], "after"),
        (["--split", "time", "--valid-from", "someday", "--test-from", "1"], "--valid-from"),
        (["--min-sessions", "5", "--max-sessions", "2"], "--min-sessions"),
        (["--max-long", "0"], "--max-long"),
        (["--min-user-interactions", "-1"], "--min-user-interactions"),
    ],
)
def test_bad_options(capsys, tmp_path: Path, flags: list[str], needle: str) -> None:
    _fails(capsys, tmp_path, ["--interactions", str(_csv(tmp_path, GOOD)), *flags], needle)


def test_filters_leave_nothing(capsys, tmp_path: Path) -> None:
    args = ["--interactions", str(_csv(tmp_path, GOOD)), "--min-user-interactions", "50"]
    _fails(capsys, tmp_path, args, "no events left after cleaning", "min_user_interactions")


def test_existing_output_is_not_replaced_without_overwrite(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    log = str(_csv(tmp_path, GOOD))
    args = ["--interactions", log, "--split", "leave-one-out", "--out", str(out), "--quiet"]
    status = main(["prepare", *args])
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--seed", "abc", "argument --seed: invalid int value: 'abc'"),
        ("--min-user-interactions", "2.5", "argument --min-user-interactions"),
        ("--split", "random", "argument --split: invalid choice: 'random'"),
        ("--format", "xlsx", "argument --format: invalid choice: 'xlsx'"),
    ],
)
def test_bad_flag_values_are_one_line(
    capsys, tmp_path: Path, flag: str, value: str, needle: str
) -> None:
    path = _csv(tmp_path, GOOD)
    _fails(capsys, tmp_path, ["--interactions", str(path), flag, value], needle, "--help")


def test_unwritable_out_is_one_line(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    log = str(_csv(tmp_path, GOOD))
    args = ["--interactions", log, "--split", "leave-one-out", "--out", str(out), "--quiet"]
    status = main(["prepare", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "a-file" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"
