"""CSV, Parquet and NDJSON inputs, string or integer ids, seconds, milliseconds or ISO-8601
timestamps and mapped column names all give the very same dataset."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from tlsan.cli import main

DAY = 86_400
T0 = 1_500_000_000


def _log() -> pl.DataFrame:
    rows = []
    for u in range(6):
        for k in range(9):
            rows.append((100 + u, (u * 3 + k * 5) % 11 + 1, T0 + ((u + k * 2) % 13) * DAY + k * 60))
    return pl.DataFrame(
        rows, schema=["user_id", "item_id", "timestamp"], orient="row"
    ).with_columns((pl.col("item_id") % 4).cast(pl.String).alias("category"))


def _prepare(path: Path, out: Path, *extra: str) -> dict[str, pl.DataFrame]:
    args = ["prepare", "--interactions", str(path), "--out", str(out), "--quiet"]
    assert main([*args, "--split", "leave-one-out", *extra]) == 0
    frames = {s: pl.read_parquet(out / f"examples/{s}.parquet") for s in ("train", "valid", "test")}
    frames["users"] = pl.read_parquet(out / "vocab/users.parquet")
    frames["items"] = pl.read_parquet(out / "vocab/items.parquet")
    return frames


def test_all_formats_and_encodings_agree(tmp_path: Path) -> None:
    log = _log()
    log.write_csv(tmp_path / "a.csv")
    reference = _prepare(tmp_path / "a.csv", tmp_path / "out_csv")
    assert reference["train"].height > 0

    renamed = log.select(
        pl.col("user_id").alias("customer"),
        pl.col("item_id").cast(pl.String).alias("sku"),
        (pl.col("timestamp") * 1000).alias("ts_ms"),
        pl.col("category").alias("cat"),
    )
    renamed.write_parquet(tmp_path / "b.parquet")
    mapped = _prepare(
        tmp_path / "b.parquet",
        tmp_path / "out_parquet",
        "--user-col",
        "customer",
        "--item-col",
        "sku",
        "--time-col",
        "ts_ms",
        "--category-col",
        "cat",
        "--time-unit",
        "ms",
    )

    iso = log.with_columns(
        pl.col("timestamp").map_elements(
            lambda t: datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z"),
            return_dtype=pl.String,
        )
    )
    iso.write_ndjson(tmp_path / "c.jsonl")
    from_json = _prepare(tmp_path / "c.jsonl", tmp_path / "out_json")

    for other in (mapped, from_json):
        for key in reference:
            assert reference[key].equals(other[key]), key


def test_format_flag_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    _log().write_csv(path)
    frames = _prepare(path, tmp_path / "out", "--format", "csv")
    assert frames["test"].height == 6
