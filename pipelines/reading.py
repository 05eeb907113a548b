"""Read raw interaction logs and item catalogs (CSV, Parquet, NDJSON) into one normal form.

Every later step sees the same columns whatever the input looked like: `row` (0-based data row
in the file), `user_id` and `item_id` as raw ids in their native type (Int64 for integer ids,
else strings: per-event dedupe, joins and counts then hash integers, and only the distinct ids
become strings, in `pipelines.vocab`), `timestamp` as int64 unix seconds, `category` as a
categorical (or null). Every problem is reported as a `DataValidationError` that names
the file, the column, how many rows are affected and a few example rows.

Text columns (all of CSV, string columns elsewhere) are typed once per column after reading:
ids that are all canonical decimal integers become Int64 (the same vocabulary as their text,
at integer speed), and timestamps get the cheap integer parse first; only the rows where it
fails are stripped and parsed as ISO-8601, so CSV reads as fast as Parquet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.config import UNKNOWN_CATEGORY, ColumnMap, FileFormat, TimeUnit
from pipelines.errors import DataValidationError
from pipelines.vocab import Codebook

_SUFFIXES: dict[str, FileFormat] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}
_UNIT_DIVISOR = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Unix seconds beyond this (year ~5138) almost surely mean milliseconds were given as seconds.
_MAX_PLAUSIBLE_SECONDS = 100_000_000_000
_EXAMPLES = 3


def detect_format(path: Path, given: FileFormat | None) -> FileFormat:
    """The file format from `--format`, else from the file name's extension."""
    if given is not None:
        return given
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise DataValidationError(
        f"{path}: cannot tell the format from the extension {''.join(path.suffixes)!r}: "
        "expected .csv, .parquet or .ndjson/.jsonl, or pass --format csv|parquet|ndjson"
    )


def _scan(path: Path, fmt: FileFormat) -> pl.LazyFrame:
    if not path.exists():
        raise DataValidationError(f"{path}: file not found")
    if not path.is_file():
        raise DataValidationError(f"{path}: not a regular file")
    try:
        if fmt == "csv":
            sep = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
            return pl.scan_csv(path, infer_schema=False, separator=sep)
        if fmt == "parquet":
            return pl.scan_parquet(path)
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataValidationError(f"{path}: cannot read as {fmt}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _schema(path: Path, fmt: FileFormat, lf: pl.LazyFrame) -> pl.Schema:
    try:
        return lf.collect_schema()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataValidationError(f"{path}: cannot read as {fmt}: {_first_line(exc)}") from exc


def _require(path: Path, schema: pl.Schema, wanted: dict[str, str]) -> None:
    missing = [f"{col!r} ({flag})" for col, flag in wanted.items() if col not in schema]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {', '.join(missing)}; found {list(schema.names())}. "
            "Map other names with --user-col/--item-col/--time-col/--category-col"
        )


def _as_id(values: pl.Series) -> pl.Series:
    """Raw ids in their native type: integers (and floats like 3.0) as Int64, else strings.

    Their string form (the vocabularies' raw id) is the decimal form: 3.0 becomes '3'. Text ids
    that are all canonical decimal integers ('7', not '007' or ' 7') become Int64 too: their
    text is exactly the integer's decimal form, so the vocabulary is the same, and joins,
    counts and codes then work on integers.
    """
    dtype = values.dtype
    if dtype.is_integer():
        return values.cast(pl.Int64)
    if dtype.is_float():
        whole = pl.col("v") == pl.col("v").floor()
        return values.to_frame("v").select(pl.when(whole).then(pl.col("v").cast(pl.Int64)))[:, 0]
    text = values.cast(pl.String)
    as_int = text.cast(pl.Int64, strict=False)
    if as_int.null_count() == text.null_count() and _canonical(text, as_int):
        return as_int
    return text


_POWERS_OF_TEN = 10 ** np.arange(1, 19, dtype=np.int64)


def _canonical(text: pl.Series, as_int: pl.Series) -> bool:
    """Is every text exactly its integer's decimal form? Any other form that parses (a sign,
    padding, leading zeros) is longer, so comparing lengths is enough (and far cheaper than
    formatting every integer back to text)."""
    values = as_int.drop_nulls().to_numpy()
    digits = np.searchsorted(_POWERS_OF_TEN, np.abs(values), side="right") + 1 + (values < 0)
    return bool(np.array_equal(digits, text.drop_nulls().str.len_bytes().to_numpy()))


def same_id_type(left: pl.DataFrame, right: pl.DataFrame, column: str) -> tuple[pl.DataFrame, ...]:
    """Both frames with `column` of one type: native when they agree, else both strings."""
    if left.schema[column] == right.schema[column]:
        return left, right
    as_text = pl.col(column).cast(pl.String)
    return left.with_columns(as_text), right.with_columns(as_text)


def _as_seconds(raw: pl.Series, unit: TimeUnit) -> pl.Series:
    """Timestamps as int64 unix seconds, or null where the value cannot be parsed.

    Text is parsed as an integer first (a cheap cast); only the rows where that fails are
    stripped and parsed again, as an integer and then as ISO-8601 (which costs ~1000x more per
    row, so it never runs on a column of integers).
    """
    div = _UNIT_DIVISOR[unit]
    dtype = raw.dtype
    if dtype == pl.String:
        seconds = raw.cast(pl.Int64, strict=False) // div
        failed = (seconds.is_null() & raw.is_not_null()).arg_true()
        if failed.len():
            seconds = seconds.scatter(failed, _text_seconds(raw.gather(failed), div))
        return seconds
    if dtype.is_integer():
        return raw.cast(pl.Int64) // div
    if dtype.is_float():
        return (raw / div).floor().cast(pl.Int64, strict=False)
    if isinstance(dtype, pl.Datetime | pl.Date):
        return raw.dt.epoch("s")
    return pl.Series(raw.name, [None] * raw.len(), dtype=pl.Int64)


def _text_seconds(text: pl.Series, div: int) -> pl.Series:
    """Seconds of timestamps the plain integer cast rejected: padded integers or ISO-8601.

    Polars infers one ISO-8601 layout per parse, so the rows a parse leaves unparsed are
    parsed again (dates next to date-times, `Z` next to `+02:00`) until one adds nothing.
    """
    stripped = text.str.strip_chars()
    seconds = stripped.cast(pl.Int64, strict=False) // div
    while True:
        missing = (seconds.is_null() & stripped.is_not_null()).arg_true()
        if missing.len() == 0:
            return seconds
        parsed = (
            stripped.gather(missing)
            .str.to_datetime(time_zone="UTC", strict=False, time_unit="us")
            .dt.epoch("s")
        )
        if parsed.null_count() == parsed.len():
            return seconds
        seconds = seconds.scatter(missing, parsed)


def _examples(frame: pl.DataFrame, mask: pl.Series, columns: list[str]) -> str:
    shown = [pl.col(c).cast(pl.String) if c == "raw_time" else pl.col(c) for c in columns]
    rows = frame.filter(mask).head(_EXAMPLES).select("row", *shown).to_dicts()
    return "; ".join(", ".join(f"{k}={v!r}" for k, v in r.items()) for r in rows)


def _fail(path: Path, frame: pl.DataFrame, mask: pl.Series, what: str, columns: list[str]) -> None:
    count = int(mask.sum())
    if count:
        raise DataValidationError(
            f"{path}: {count:,} of {frame.height:,} rows {what}; e.g. {_examples(frame, mask, columns)}"
        )


def read_interactions(
    path: Path, fmt: FileFormat | None, columns: ColumnMap, unit: TimeUnit
) -> pl.DataFrame:
    """Read and validate an interaction log into the normal form (see module docstring)."""
    fmt = detect_format(path, fmt)
    lf = _scan(path, fmt)
    schema = _schema(path, fmt, lf)
    _require(
        path,
        schema,
        {columns.user: "--user-col", columns.item: "--item-col", columns.time: "--time-col"},
    )
    has_category = columns.category in schema
    lf = lf.with_row_index("row").select(
        "row",
        pl.col(columns.user).alias("user_id"),
        pl.col(columns.item).alias("item_id"),
        pl.col(columns.time).alias("raw_time"),
        (
            pl.col(columns.category).cast(pl.String).cast(pl.Categorical)
            if has_category
            else pl.lit(None, dtype=pl.Categorical)
        ).alias("category"),
    )
    try:
        frame = lf.collect()
        frame = frame.with_columns(
            _as_id(frame["user_id"]).alias("user_id"),
            _as_id(frame["item_id"]).alias("item_id"),
            _as_seconds(frame["raw_time"], unit).alias("timestamp"),
        ).select("row", "user_id", "item_id", "raw_time", "timestamp", "category")
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataValidationError(f"{path}: cannot read as {fmt}: {_first_line(exc)}") from exc
    if frame.height == 0:
        raise DataValidationError(f"{path}: no interactions (the file has a header but no rows)")
    _validate(path, frame, columns, unit)
    return frame.drop("raw_time")


def _validate(path: Path, frame: pl.DataFrame, columns: ColumnMap, unit: TimeUnit) -> None:
    _fail(path, frame, frame["user_id"].is_null(), f"have no {columns.user!r}", ["user_id"])
    _fail(path, frame, frame["item_id"].is_null(), f"have no {columns.item!r}", ["item_id"])
    _fail(path, frame, frame["raw_time"].is_null(), f"have no {columns.time!r}", ["raw_time"])
    _fail(
        path,
        frame,
        frame["timestamp"].is_null(),
        f"have an unparseable {columns.time!r} (expected integer unix {unit} or ISO-8601)",
        ["raw_time"],
    )
    _fail(
        path,
        frame,
        frame["timestamp"] < 0,
        f"have a negative {columns.time!r} (expected unix time >= 0)",
        ["raw_time"],
    )
    if unit == "s":
        _fail(
            path,
            frame,
            frame["timestamp"] > _MAX_PLAUSIBLE_SECONDS,
            f"have a {columns.time!r} after the year 5000 as seconds: "
            "pass --time-unit ms (or us/ns) if the log holds milliseconds",
            ["raw_time"],
        )


def read_catalog(path: Path, fmt: FileFormat | None, columns: ColumnMap) -> pl.DataFrame:
    """Read and validate an item catalog into `item_id, category`, one row per item."""
    fmt = detect_format(path, fmt if fmt is not None else None)
    lf = _scan(path, fmt)
    schema = _schema(path, fmt, lf)
    _require(path, schema, {columns.item: "--item-col", columns.category: "--category-col"})
    try:
        frame = (
            lf.with_row_index("row")
            .select(
                "row",
                pl.col(columns.item).alias("item_id"),
                pl.col(columns.category).cast(pl.String).cast(pl.Categorical).alias("category"),
            )
            .collect()
        )
        frame = frame.with_columns(_as_id(frame["item_id"]).alias("item_id"))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataValidationError(f"{path}: cannot read as {fmt}: {_first_line(exc)}") from exc
    if frame.height == 0:
        raise DataValidationError(f"{path}: the item catalog has no rows")
    _fail(path, frame, frame["item_id"].is_null(), f"have no {columns.item!r}", ["item_id"])
    _fail(path, frame, frame["category"].is_null(), f"have no {columns.category!r}", ["item_id"])
    frame = frame.unique(["item_id", "category"], keep="first", maintain_order=True)
    conflicting = frame["item_id"].is_duplicated()
    _fail(
        path,
        frame,
        conflicting,
        "give an item a second, different category (expected one category per item)",
        ["item_id", "category"],
    )
    return frame.select("item_id", "category")


def item_categories(
    events: pl.DataFrame,
    items: Codebook,
    catalog: pl.DataFrame | None,
    *,
    events_path: Path,
    catalog_path: Path | None,
    policy: str,
    category_col: str,
) -> tuple[pl.Series, dict[str, Any]]:
    """The category of every item (a string Series indexed by item code, row 0 unused), from
    the catalog or the log's own column, and what was found on the way.

    With the catalog, items it lacks are an error or get the "unknown" category (`policy`).
    Without one, the log's category column is used; an item's first category in the log wins.
    The work is per distinct item; event rows are only scanned to report a problem.
    """
    info: dict[str, Any] = {"source": "catalog" if catalog is not None else "interactions"}
    book = items.table.select("code", pl.col("key").alias("item_id"))
    if catalog is not None:
        book, catalog = same_id_type(book, catalog, "item_id")
        joined = book.join(catalog, on="item_id", how="left", maintain_order="left")
        missing_items = joined.filter(pl.col("category").is_null())["item_id"]
        n_missing = 0
        if missing_items.len():
            ids = events["item_id"]
            keys = (
                missing_items if ids.dtype == missing_items.dtype else missing_items.cast(ids.dtype)
            )
            rows = ids.is_in(keys.implode())
            n_missing = int(rows.sum())
            if policy == "error":
                raise DataValidationError(
                    f"{events_path}: {n_missing:,} rows reference {missing_items.len():,} item(s) "
                    f"missing from the catalog {catalog_path} (column {category_col!r}); e.g. "
                    f"{_examples(events, rows, ['item_id'])}. "
                    "Add them to the catalog or pass --missing-items unknown"
                )
        info["events_missing_from_catalog"] = n_missing
        categories = joined["category"].cast(pl.String).fill_null(UNKNOWN_CATEGORY)
        return pl.concat([pl.Series([UNKNOWN_CATEGORY]), categories]), info
    if events["category"].null_count() == events.height:
        raise DataValidationError(
            f"{events_path}: no {category_col!r} column and no --items catalog: "
            "expected categories on the events or in an item catalog (item_id, category)"
        )
    missing = events["category"].is_null()
    n_missing = int(missing.sum())
    info["events_without_category"] = n_missing
    if n_missing and policy == "error":
        _fail(
            events_path,
            events,
            missing,
            f"have no {category_col!r} (pass --missing-items unknown to allow it)",
            ["item_id"],
        )
    first = (
        events.lazy()
        .filter(pl.col("category").is_not_null())
        .group_by(items.encode(pl.col("item_id")).alias("code"))
        .agg(pl.col("category").first().alias("item_category"), pl.col("category").n_unique())
        .collect()
    )
    info["items_with_several_categories"] = int((first["category"] > 1).sum())
    categories = (
        book.join(first, on="code", how="left", maintain_order="left")["item_category"]
        .cast(pl.String)
        .fill_null(UNKNOWN_CATEGORY)
    )
    return pl.concat([pl.Series([UNKNOWN_CATEGORY]), categories]), info
