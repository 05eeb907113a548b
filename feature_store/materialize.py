"""Load a prepared dataset's cleaned log into an online store, with raw ids.

After `tlsan prepare` and before serving: the store then holds every user's history exactly
as training saw it, so online requests for known users start from the offline state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from feature_store.base import OnlineStore
from pipelines.errors import DataValidationError

EVENTS = "events.parquet"
USERS = "vocab/users.parquet"
ITEMS = "vocab/items.parquet"
_COLUMNS = {EVENTS: ("user", "item", "timestamp"), USERS: ("index", "user_id"), ITEMS: ("index", "item_id")}  # fmt: skip
_EXPECTED = "expected a dataset directory written by `tlsan prepare` (docs/dataset-format.md)"


@dataclass(frozen=True)
class MaterializeResult:
    """What a materialization did, for the CLI summary."""

    users: int
    events: int
    new_events: int
    seconds: float


def _scan(data_dir: Path, name: str) -> pl.LazyFrame:
    """Scan one file of the dataset, checking that it exists, is Parquet and has its columns."""
    path = data_dir / name
    try:
        frame = pl.scan_parquet(path)
        schema = frame.collect_schema()
    except Exception as exc:  # polars raises several types for unreadable files
        raise DataValidationError(
            f"{path}: cannot read it as Parquet ({exc}); {_EXPECTED}"
        ) from exc
    missing = [c for c in _COLUMNS[name] if c not in schema]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; expected {list(_COLUMNS[name])} ({_EXPECTED})"
        )
    for column in _COLUMNS[name]:
        if column not in ("user_id", "item_id") and not schema[column].is_integer():
            raise DataValidationError(
                f"{path}: column {column!r} has type {schema[column]}, expected an integer type"
            )
    return frame.select(_COLUMNS[name])


def read_dataset_events(data_dir: str | Path) -> pl.DataFrame:
    """`user_id, item_id` (raw string ids) and `timestamp` of every event, in file order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataValidationError(f"{data_dir}: not a directory; {_EXPECTED}")
    absent = [name for name in _COLUMNS if not (data_dir / name).is_file()]
    if absent:
        raise DataValidationError(
            f"{data_dir}: not a prepared dataset, missing {', '.join(absent)}; {_EXPECTED}"
        )
    users = _scan(data_dir, USERS).select(
        pl.col("index").cast(pl.Int64), pl.col("user_id").cast(pl.String)
    )
    items = _scan(data_dir, ITEMS).select(
        pl.col("index").cast(pl.Int64), pl.col("item_id").cast(pl.String)
    )
    events = (
        _scan(data_dir, EVENTS)
        .select(pl.col("user", "item").cast(pl.Int64), pl.col("timestamp").cast(pl.Int64))
        .join(users, left_on="user", right_on="index", how="left", maintain_order="left")
        .join(items, left_on="item", right_on="index", how="left", maintain_order="left")
        .collect()
    )
    for column, index, vocab in (("user_id", "user", USERS), ("item_id", "item", ITEMS)):
        unknown = events.filter(pl.col(column).is_null())
        if unknown.height:
            raise DataValidationError(
                f"{data_dir / EVENTS}: {unknown.height} row(s) have a {index} index missing from "
                f"{vocab} (first: {unknown[index][0]}); expected every index in the vocabulary"
            )
    if events["timestamp"].null_count():
        raise DataValidationError(f"{data_dir / EVENTS}: null timestamps; expected unix seconds")
    return events.select("user_id", "item_id", "timestamp")


def materialize(
    data_dir: str | Path,
    store: OnlineStore,
    *,
    batch_size: int = 100_000,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> MaterializeResult:
    """Bulk-load every event of the dataset at `data_dir` into `store` (idempotent).

    `on_start` receives the number of events before loading (to size a progress bar),
    `progress` the rows done after each batch.
    """
    start = time.perf_counter()
    events = read_dataset_events(data_dir)
    if on_start is not None:
        on_start(events.height)
    added = store.bulk_load(
        events["user_id"], events["item_id"], events["timestamp"],
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return MaterializeResult(
        users=events["user_id"].n_unique(),
        events=events.height,
        new_events=added,
        seconds=time.perf_counter() - start,
    )
