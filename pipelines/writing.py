"""Stream blocks of whole users into events.parquet and examples/{split}.parquet.

Holding every example until the end costs gigabytes on large logs (their list columns are
most of a dataset), so each block is appended to the files as soon as it is built, and only
the counts the manifest needs are kept. A block's files are written side by side on
background threads (Arrow writes without the GIL) while the next block is being built. The
files hold the same rows as one write of everything: one Parquet file per table, a row group
per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

EVENTS_FILE = "events.parquet"


def examples_file(split: str) -> str:
    return f"examples/{split}.parquet"


@dataclass
class SplitCounts:
    """Rows written to one split's file (`height`, as a DataFrame's) and its longest lists."""

    height: int = 0
    max_long: int = 0
    max_short: int = 0


@dataclass
class WrittenDataset:
    """What the manifest needs from the written events and examples."""

    events: int = 0
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    users_with_examples: int = 0
    blocks: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # counted, never written

    @property
    def examples(self) -> int:
        return sum(s.height for s in self.splits.values())

    @property
    def max_long(self) -> int:
        return max((s.max_long for s in self.splits.values()), default=0)

    @property
    def max_short(self) -> int:
        return max((s.max_short for s in self.splits.values()), default=0)


Block = tuple[pl.DataFrame, dict[str, pl.DataFrame]]  # events table, examples by split


class DatasetWriter:
    """Appends blocks to the dataset's Parquet files under `directory`.

    Blocks must hold disjoint users, in ascending user order (events.parquet is sorted by
    user): the distinct users with examples are then the sum over blocks.
    """

    def __init__(self, directory: Path, splits: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.written = WrittenDataset(splits={name: SplitCounts() for name in splits})
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._pool = ThreadPoolExecutor(max_workers=len(splits) + 1)  # one per file
        self._pending: list[Future[None]] = []

    def add(self, block: Block) -> None:
        """Count the block and queue its write (after the previous block's write ends)."""
        table, examples = block
        written = self.written
        written.blocks += 1
        written.events += table.height
        dropped = {name: f for name, f in examples.items() if name not in written.splits}
        for name, frame in dropped.items():  # e.g. paper transitions no split trains on
            written.dropped[name] = written.dropped.get(name, 0) + frame.height
        examples = {name: f for name, f in examples.items() if name in written.splits}
        for name, frame in examples.items():
            counts = written.splits[name]
            counts.height += frame.height
            if frame.height:
                counts.max_long = max(counts.max_long, _longest(frame["long_items"]))
                counts.max_short = max(counts.max_short, _longest(frame["short_items"]))
        users = [frame["user"] for frame in examples.values() if frame.height]
        if users:
            written.users_with_examples += pl.concat(users).n_unique()
        tables = {EVENTS_FILE: table} | {examples_file(n): f for n, f in examples.items()}
        self._wait()
        self._pending = [self._pool.submit(self._write, n, f) for n, f in tables.items()]

    def _write(self, name: str, frame: pl.DataFrame) -> None:
        arrow = frame.to_arrow()
        writer = self._writers.get(name)
        if writer is None:
            writer = pq.ParquetWriter(
                self.directory / name, arrow.schema, compression="zstd", use_dictionary=False
            )
            self._writers[name] = writer
        elif arrow.schema != writer.schema:
            arrow = arrow.cast(writer.schema)
        if arrow.num_rows:
            writer.write_table(arrow, row_group_size=arrow.num_rows)

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> WrittenDataset:
        """Finish every file; returns the counts."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            for writer in self._writers.values():
                writer.close()
        return self.written

    def abort(self) -> None:
        """Stop after a failure (the caller removes the directory)."""
        with contextlib.suppress(Exception):  # the failure being handled matters, not this
            self._wait()
        self._pool.shutdown(wait=True)
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()


def _longest(lists: pl.Series) -> int:
    return int(lists.list.len().max() or 0)


def write_blocks(directory: Path, splits: Sequence[str], blocks: Iterable[Block]) -> WrittenDataset:
    """Write every block; on failure the files are closed and the error propagates."""
    writer = DatasetWriter(directory, splits)
    try:
        for block in blocks:
            writer.add(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
