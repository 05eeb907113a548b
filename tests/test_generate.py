"""The synthetic log generator (`pipelines.synthetic`) and `tlsan generate`.

Small logs throughout: the properties checked (exact counts, reproducibility, skew, burstiness,
drift, a sequential signal) show at a few tens of thousands of events.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from pipelines.config import PrepareConfig, SessionRule
from pipelines.errors import DataValidationError
from pipelines.prepare import prepare_dataset
from pipelines.synthetic import Behaviour, GeneratorSummary, generate_log
from tlsan.cli import main

ROOT = Path(__file__).resolve().parents[1]
USERS, ITEMS, EVENTS, CATEGORIES = 1_500, 1_200, 60_000, 24
START = int(datetime(2016, 3, 1, tzinfo=UTC).timestamp())
DAYS = 200


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> GeneratorSummary:
    """One Parquet log in several chunks (so the chunk mixing is exercised)."""
    return generate_log(
        tmp_path_factory.mktemp("gen") / "log",
        users=USERS,
        items=ITEMS,
        events=EVENTS,
        categories=CATEGORIES,
        seed=7,
        start="2016-03-01",
        days=DAYS,
        chunk_events=15_000,
    )


@pytest.fixture(scope="module")
def events(log: GeneratorSummary) -> pl.DataFrame:
    """The log in file order (`row`), joined with the item categories."""
    frame = pl.read_parquet(log.interactions).with_row_index("row")
    return frame.join(pl.read_parquet(log.items_file), on="item_id", how="left")


def _timeline(events: pl.DataFrame) -> pl.DataFrame:
    """Each user's events in time order, with the previous event's item, category and time."""
    return events.sort("user_id", "timestamp", "row").with_columns(
        gap=pl.col("timestamp").diff().over("user_id"),
        prev_item=pl.col("item_id").shift().over("user_id"),
        prev_category=pl.col("category").shift().over("user_id"),
    )


def test_counts_ranges_and_catalog(log: GeneratorSummary, events: pl.DataFrame) -> None:
    assert log.chunks > 1
    assert events.height == EVENTS
    assert events["user_id"].min() >= 1 and events["user_id"].max() <= USERS
    assert events["item_id"].min() >= 1 and events["item_id"].max() <= ITEMS
    per_user = events.group_by("user_id").len()
    assert per_user.height == USERS  # every user appears ...
    assert per_user["len"].min() >= 3  # ... with at least 3 events (EVENTS >= 3 * USERS)
    assert per_user["len"].max() >= 10 * per_user["len"].median()  # heavy-tailed activity
    assert events["timestamp"].min() >= START
    assert events["timestamp"].max() < START + DAYS * 86_400
    items = pl.read_parquet(log.items_file)
    assert items["item_id"].to_list() == list(range(1, ITEMS + 1))
    assert items["category"].null_count() == 0
    assert items["category"].str.contains(r"^c\d+$").all()
    assert items["category"].n_unique() == CATEGORIES
    assert events["category"].null_count() == 0  # every logged item is in the catalog


def test_columns_dtypes_and_generator_json(log: GeneratorSummary) -> None:
    assert pl.read_parquet(log.interactions).schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    )
    assert pl.read_parquet(log.items_file).schema == pl.Schema(
        {"item_id": pl.Int64, "category": pl.String}
    )
    meta = json.loads((log.path / "generator.json").read_text())
    assert (meta["users"], meta["items"], meta["events"]) == (USERS, ITEMS, EVENTS)
    assert (meta["categories"], meta["seed"], meta["format"]) == (CATEGORIES, 7, "parquet")
    assert meta["start"] == START and meta["start_iso"].startswith("2016-03-01")
    assert meta["behaviour"]["favourites"] == Behaviour().favourites
    assert sorted(p.name for p in log.path.iterdir()) == [
        "generator.json",
        "interactions.parquet",
        "items.parquet",
    ]


def test_rows_are_not_sorted(events: pl.DataFrame) -> None:
    assert not events["user_id"].is_sorted()
    assert not events["timestamp"].is_sorted()
    # Not even grouped by user: consecutive rows almost never share a user.
    runs = (events["user_id"].diff().fill_null(1) != 0).sum()
    assert runs > 0.9 * EVENTS


def test_popularity_is_skewed(events: pl.DataFrame) -> None:
    counts = events.group_by("item_id").len().sort("len", descending=True)["len"]
    top_share = counts.head(ITEMS // 10).sum() / EVENTS
    assert top_share > 0.4, top_share  # uniform popularity would give about 0.1


def test_sessions_are_bursty(events: pl.DataFrame) -> None:
    gaps = _timeline(events)["gap"].drop_nulls()
    assert gaps.median() * 50 < gaps.mean()  # minutes inside sessions, days between them
    assert (gaps < 3_600).mean() > 0.4
    assert (gaps > 7 * 86_400).mean() > 0.01  # some absences of weeks
    # Several sessions on one day: same-day gaps of more than an hour exist.
    timeline = _timeline(events).with_columns(day=pl.col("timestamp") // 86_400)
    same_day = timeline.filter(
        (pl.col("gap") > 3_600) & (pl.col("day") == pl.col("day").shift().over("user_id"))
    )
    assert same_day.height > 0.01 * EVENTS


def test_sequence_beats_popularity(events: pl.DataFrame) -> None:
    """Predicting the next item from the previous one (learned on half of the users) hits
    far more often than always predicting the most popular item."""
    pairs = _timeline(events).filter(pl.col("prev_item").is_not_null())
    train, test = pairs.filter(pl.col("user_id") % 2 == 0), pairs.filter(pl.col("user_id") % 2 == 1)
    best_next = (
        train.group_by("prev_item", "item_id")
        .len()
        .sort("len", "item_id", descending=[True, False])
        .group_by("prev_item", maintain_order=True)
        .first()
        .select("prev_item", pred=pl.col("item_id"))
    )
    joined = test.join(best_next, on="prev_item", how="left")
    sequential_hits = (joined["pred"] == joined["item_id"]).sum() / test.height
    top_item = train.group_by("item_id").len().sort("len", descending=True)["item_id"][0]
    popularity_hits = (test["item_id"] == top_item).mean()
    assert sequential_hits > 5 * popularity_hits, (sequential_hits, popularity_hits)
    same_category = (pairs["category"] == pairs["prev_category"]).mean()
    assert same_category > 0.4, same_category  # next item often from the same category
    repeats = (
        events.sort("user_id", "timestamp", "row")
        .select(pl.col("item_id").is_first_distinct().over("user_id").not_().mean())
        .item()
    )
    assert 0.05 < repeats < 0.8, repeats


def _drift(tmp_path: Path, behaviour: Behaviour) -> tuple[float, float]:
    """Mean total-variation distance between a user's category mix in the first and last
    quarter of their events (`far`), and between the two middle quarters (`near`)."""
    log = generate_log(
        tmp_path / f"drift{behaviour.drift_steps}",
        users=800,
        items=1_500,
        events=64_000,
        seed=3,
        behaviour=behaviour,
    )
    frame = pl.read_parquet(log.interactions).with_row_index("row")
    frame = frame.join(pl.read_parquet(log.items_file), on="item_id")
    quarters = (
        frame.sort("user_id", "timestamp", "row")
        .with_columns(
            q=(pl.int_range(pl.len()).over("user_id") * 4 // pl.len().over("user_id")).cast(
                pl.String
            ),
            n=pl.len().over("user_id"),
        )
        .filter(pl.col("n") >= 40)
        .group_by("user_id", "q", "category")
        .len()
        .with_columns(p=pl.col("len") / pl.col("len").sum().over("user_id", "q"))
        .pivot(on="q", index=["user_id", "category"], values="p")
        .fill_null(0.0)
        .group_by("user_id")
        .agg(
            far=(pl.col("0") - pl.col("3")).abs().sum() / 2,
            near=(pl.col("1") - pl.col("2")).abs().sum() / 2,
        )
    )
    return quarters["far"].mean(), quarters["near"].mean()


def test_category_tastes_drift(tmp_path: Path) -> None:
    far, near = _drift(tmp_path, Behaviour())
    assert far > near + 0.1, (far, near)
    still_far, still_near = _drift(tmp_path, Behaviour(drift_steps=0))
    assert abs(still_far - still_near) < 0.1, (still_far, still_near)
    assert far > still_far + 0.15


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, fmt: str) -> None:
    kwargs = {"users": 400, "items": 300, "events": 12_000, "fmt": fmt, "chunk_events": 5_000}
    a = generate_log(tmp_path / "a", seed=11, **kwargs)
    b = generate_log(tmp_path / "b", seed=11, **kwargs)
    c = generate_log(tmp_path / "c", seed=12, **kwargs)
    for name in (f"interactions.{fmt}", f"items.{fmt}", "generator.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    assert (a.path / f"interactions.{fmt}").read_bytes() != (
        c.path / f"interactions.{fmt}"
    ).read_bytes()
    assert (a.path / f"items.{fmt}").read_bytes() != (c.path / f"items.{fmt}").read_bytes()


def test_fewer_events_than_three_per_user(tmp_path: Path) -> None:
    log = generate_log(tmp_path / "thin", users=1_000, items=50, events=1_500, seed=1)
    per_user = pl.read_parquet(log.interactions).group_by("user_id").len()["len"]
    assert per_user.len() == 1_000 and per_user.min() == 1 and per_user.sum() == 1_500


def test_generated_log_prepares(tmp_path: Path, log: GeneratorSummary) -> None:
    """The output is a valid input of `tlsan prepare` (leave-one-out, 30-minute sessions)."""
    config = PrepareConfig(
        interactions=log.interactions,
        items=log.items_file,
        split="leave-one-out",
        session=SessionRule.parse("gap:30m"),
    )
    manifest = prepare_dataset(config, tmp_path / "data", progress=False).manifest
    assert manifest["stats"]["interactions"] <= EVENTS
    assert manifest["vocab_sizes"]["categories"] == CATEGORIES + 1
    assert manifest["counts"]["test"] == USERS


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"users": 0}, "users"),
        ({"items": -3}, "items"),
        ({"events": 10}, "events"),  # fewer events than users
        ({"categories": 500}, "categories"),  # more categories than items
        ({"days": 0}, "days"),
        ({"seed": -1}, "seed"),
        ({"fmt": "xlsx"}, "format"),
        ({"start": "yesterday"}, "start"),
        ({"chunk_events": 0}, "chunk_events"),
        ({"users": 2.5}, "users"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = {"users": 100, "items": 200, "events": 1_000, **kwargs}
    with pytest.raises(DataValidationError, match=rf"^{needle}: expected"):
        generate_log(tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []


def _cli(out: Path) -> list[str]:
    return ["generate", "--users", "200", "--items", "150", "--events", "5000", "--out", str(out)]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_cli_writes_both_formats(tmp_path: Path, capsys, fmt: str) -> None:
    out = tmp_path / "raw"
    status = main([*_cli(out), "--format", fmt, "--categories", "7", "--seed", "3", "--quiet"])
    assert status == 0
    assert capsys.readouterr().err == ""
    read = pl.read_parquet if fmt == "parquet" else pl.read_csv
    log = read(out / f"interactions.{fmt}")
    items = read(out / f"items.{fmt}")
    assert log.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    )
    assert items.schema == pl.Schema({"item_id": pl.Int64, "category": pl.String})
    assert log.height == 5_000 and items.height == 150
    assert items["category"].n_unique() == 7
    assert json.loads((out / "generator.json").read_text())["format"] == fmt


def test_csv_and_parquet_hold_the_same_log(tmp_path: Path) -> None:
    a = generate_log(tmp_path / "p", users=300, items=200, events=6_000, seed=5)
    b = generate_log(tmp_path / "c", users=300, items=200, events=6_000, seed=5, fmt="csv")
    assert pl.read_parquet(a.interactions).equals(pl.read_csv(b.interactions))
    assert pl.read_parquet(a.items_file).equals(pl.read_csv(b.items_file))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("--users", "0"), "users: expected a positive integer, got 0"),
        (("--users", "many"), "--users: expected an integer, got 'many'"),
        (("--events", "100"), "events: expected at least one event per user"),
        (("--categories", "151"), "categories: expected at most one category per item"),
        (("--start", "2015-13-40"), "start: expected an ISO-8601 date"),
        (("--days", "-1"), "days: expected a positive integer"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, capsys, change: tuple[str, str], needle: str) -> None:
    out = tmp_path / "raw"
    args = _cli(out)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tlsan generate: error: ")
    assert needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary directory


def test_cli_refuses_existing_output_unless_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main([*_cli(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlsan generate: error: ") and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*_cli(out), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "generator.json",
        "interactions.parquet",
        "items.parquet",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary directory left


def test_cli_subprocess(tmp_path: Path) -> None:
    tlsan = ROOT / ".venv" / "bin" / "tlsan"
    out = tmp_path / "raw"
    done = subprocess.run(
        [str(tlsan), *_cli(out), "--format", "csv", "--start", "2014-06-01", "--days", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 5,000 events" in done.stdout
    log = pl.read_csv(out / "interactions.csv")
    start = int(datetime(2014, 6, 1, tzinfo=UTC).timestamp())
    assert log.height == 5_000
    assert log["timestamp"].min() >= start and log["timestamp"].max() < start + 30 * 86_400
    bad = subprocess.run(
        [str(tlsan), *_cli(tmp_path / "bad"), "--items", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "tlsan generate: error: items: expected a positive integer, got 0"
    assert not (tmp_path / "bad").exists()


def test_chunks_are_interleaved(log: GeneratorSummary) -> None:
    """Rows are carried over between chunks: some users' rows span more than two chunks."""
    spans = (
        pl.read_parquet(log.interactions)
        .with_row_index("row")
        .group_by("user_id")
        .agg(span=pl.col("row").max() - pl.col("row").min())["span"]
    )
    assert spans.max() > 2 * 15_000  # the fixture's chunk_events
    assert (spans > 15_000).mean() > 0.3  # without mixing, every span would fit one chunk
