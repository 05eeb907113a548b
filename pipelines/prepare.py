"""`prepare_dataset`: raw log → validated, cleaned, sessionised, split TLSAN dataset directory.

The steps run in a fixed order (read, categories, clean, index, sessions, examples, write);
the layout of the result is documented in docs/dataset-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.atomic import atomic_directory, check_output
from pipelines.cleaning import StepCount, clean, sort_events
from pipelines.config import PrepareConfig
from pipelines.errors import DataValidationError
from pipelines.features import attach_features
from pipelines.progress import Steps
from pipelines.reading import item_categories, read_catalog, read_interactions
from pipelines.sessions import event_table
from pipelines.splits import leave_one_out_examples, paper_examples, time_examples
from pipelines.vocab import Codebook, Vocabularies, index_events

FORMAT_VERSION = 2  # 2: examples gained long_time, short_time and target_pos
EXAMPLE_COLUMNS = (
    "user",
    "long_items",
    "long_tau",
    "long_time",
    "short_items",
    "short_time",
    "target",
    "target_pos",
    "user_category",
    "ref_time",
    "history_end",
)
SPLITS = ("train", "valid", "test")
EVENT_COLUMNS = ("user", "item", "category", "timestamp", "session", "pos")


@dataclass(frozen=True)
class PreparedDataset:
    """What `prepare_dataset` wrote: where, and its manifest."""

    path: Path
    manifest: dict[str, Any]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_examples(table: pl.DataFrame, config: PrepareConfig) -> dict[str, pl.DataFrame]:
    """Examples of each split (positions from one lazy plan, then features per split)."""
    events = table.lazy()
    if config.split == "last-session":
        examples = paper_examples(table, cap=config.max_events_per_user, seed=config.seed)
    elif config.split == "leave-one-out":
        examples = leave_one_out_examples(events)
    else:
        assert config.valid_from is not None and config.test_from is not None
        examples = time_examples(events, valid_from=config.valid_from, test_from=config.test_from)
    positions = with_target_pos(examples.collect(), table)
    split = positions["split"]
    return {
        name: attach_features(
            positions.filter(split == name),
            table,
            max_long=config.max_long,
            max_short=config.max_short,
        ).select(*EXAMPLE_COLUMNS)
        for name in SPLITS
    }


def with_target_pos(positions: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """`positions` plus `target_pos`, the target event's `pos`: the skipped event of a held-out
    session (`skip_pos`), else the end of the short-term range (every split builder's
    convention, checked here against the table, so a builder that breaks it fails loudly)."""
    target_pos = (
        pl.when(pl.col("skip_pos") >= 0).then(pl.col("skip_pos")).otherwise(pl.col("short_end"))
    )
    positions = positions.with_columns(target_pos.cast(pl.Int32).alias("target_pos"))
    at = positions["offset"].to_numpy() + positions["target_pos"].to_numpy()
    items = table["item"].to_numpy()
    found = items[np.clip(at, 0, max(items.size - 1, 0))] if items.size else at
    if positions.height and not np.array_equal(found, positions["target"].to_numpy()):
        raise RuntimeError("split builder: a target is not the event at its target_pos")
    return positions


CHUNK_EVENTS = 1 << 20  # events per block of whole users (bounded, reused temporaries)


def user_blocks(events: pl.DataFrame, size: int | None = None) -> list[pl.DataFrame]:
    """Consecutive slices of `events` (sorted by user), about `size` rows each, never
    splitting a user: sessions, examples and features are per user, so blocks are built
    independently and their peak memory stays small."""
    size = size or CHUNK_EVENTS
    users = events["user"].to_numpy()
    n = len(users)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    cuts = np.unique(starts[np.searchsorted(starts, np.arange(size, n, size))]) if n else []
    bounds = [0, *[int(c) for c in cuts if 0 < c < n], n]
    return [events.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def build_split_examples(
    events: pl.DataFrame, config: PrepareConfig
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """The event table (the columns events.parquet keeps) and the examples of each split,
    built block by block of whole users."""
    tables: list[pl.DataFrame] = []
    parts: dict[str, list[pl.DataFrame]] = {name: [] for name in SPLITS}
    for block in user_blocks(events):
        table = event_table(block, config.session)
        for name, examples in build_examples(table, config).items():
            parts[name].append(examples)
        tables.append(table.select(*EVENT_COLUMNS))
    return (
        pl.concat(tables, rechunk=False),
        {name: pl.concat(frames, rechunk=False) for name, frames in parts.items()},
    )


def _truncate(events: pl.DataFrame, config: PrepareConfig) -> pl.DataFrame:
    """Outside the paper's split, `max_events_per_user` keeps each user's first N events."""
    if config.split == "last-session" or not config.max_events_per_user:
        return events
    return events.filter(pl.int_range(pl.len()).over("user") < config.max_events_per_user)


def _stats(events: pl.DataFrame, vocab: Vocabularies, examples: int) -> dict[str, Any]:
    """The paper's dataset statistics table, for the cleaned log."""
    users, items, cats = vocab.users.height, vocab.items.height, vocab.categories.height
    return {
        "users": users,
        "items": items,
        "categories": cats,
        "interactions": events.height,
        "samples": examples,
        "avg_items_per_category": round(items / cats, 4),
        "avg_behaviours_per_item": round(events.height / items, 4),
        "avg_behaviours_per_user": round(events.height / users, 4),
    }


def dataset_hash(inputs: dict[str, Any], config: PrepareConfig) -> str:
    """Identifies the dataset: the input contents and every option that shapes the output."""
    resolved = config.to_json()
    resolved.pop("interactions")
    resolved.pop("items")
    payload = json.dumps(
        {"inputs": [v["sha256"] for v in inputs.values()], "config": resolved, "v": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_dataset(
    config: PrepareConfig, out: Path, *, overwrite: bool = False, progress: bool = True
) -> PreparedDataset:
    """Run the whole pipeline and write the dataset directory atomically."""
    check_output(Path(out), overwrite=overwrite)
    steps = Steps(enabled=progress)
    with steps.step("read interactions"):
        raw = read_interactions(
            config.interactions, config.format, config.columns, config.time_unit
        )
    catalog = None
    if config.items is not None:
        with steps.step("read item catalog"):
            catalog = read_catalog(config.items, None, config.columns)
    with steps.step("encode ids"):
        users = Codebook.of(raw["user_id"], "user_id")
        items = Codebook.of(raw["item_id"], "item_id")
        coded = pl.DataFrame(
            [
                raw["row"],
                users.encode_series(raw["user_id"]).alias("user"),
                items.encode_series(raw["item_id"]).alias("item"),
                raw["timestamp"],
            ]
        )
    with steps.step("attach categories"):
        categories, category_info = item_categories(
            raw,
            items,
            catalog,
            events_path=config.interactions,
            catalog_path=config.items,
            policy=config.missing_items,
            category_col=config.columns.category,
        )
    del raw
    with steps.step("sort and clean"):
        cleaned, counts = clean(sort_events(coded), config)
    del coded
    if cleaned.height == 0:
        raise DataValidationError(
            f"{config.interactions}: no events left after cleaning "
            f"({', '.join(f'{c.step}: {c.rows:,}' for c in counts)}); relax the filters"
        )
    with steps.step("index"):
        vocab, indexed = index_events(cleaned, users, items, categories)
        events = _truncate(indexed, config)
    with steps.step("sessions, examples and features"):
        table, parts = build_split_examples(events, config)
    examples = pl.concat(list(parts.values()), rechunk=False)
    for name in ("train", "test"):
        if parts[name].height == 0:
            raise DataValidationError(
                f"{config.interactions}: the {config.split} split produced no {name} examples "
                f"from {events.height:,} events of {vocab.users.height:,} users; expected users "
                "with at least two sessions (check --session, the filters and the cut-offs)"
            )
    counts.append(StepCount("events", events.height, vocab.users.height, vocab.items.height))
    inputs = {"interactions": {"path": str(config.interactions)}}
    if config.items is not None:
        inputs["items"] = {"path": str(config.items)}
    for entry in inputs.values():
        path = Path(entry["path"])
        entry["sha256"] = file_sha256(path)
        entry["bytes"] = path.stat().st_size
    example_users = examples["user"].n_unique()
    paper_train = parts["train"].height + (
        parts["valid"].height if config.split == "last-session" else 0
    )
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset_hash": dataset_hash(inputs, config),
        "config": config.to_json(),
        "inputs": inputs,
        "categories": category_info,
        "steps": [c.to_json() for c in counts],
        "stats": _stats(events, vocab, examples.height),
        "counts": {
            "paper_train_examples": paper_train,
            "train": parts["train"].height,
            "valid": parts["valid"].height,
            "test": parts["test"].height,
            "users_with_examples": example_users,
            "users_without_examples": vocab.users.height - example_users,
        },
        "vocab_sizes": vocab.sizes(),
        "max_lengths": {
            "long": int(examples["long_items"].list.len().max() or 0),
            "short": int(examples["short_items"].list.len().max() or 0),
        },
    }
    with steps.step("write"), atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "vocab").mkdir()
        (tmp / "examples").mkdir()
        files = {
            "vocab/users.parquet": vocab.users,
            "vocab/items.parquet": vocab.items,
            "vocab/categories.parquet": vocab.categories,
            "events.parquet": table,
            **{f"examples/{name}.parquet": frame for name, frame in parts.items()},
        }
        # Polars writes without the GIL: the large files go out side by side, one per core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda item: item[1].write_parquet(tmp / item[0]), files.items()))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    steps.finish()
    return PreparedDataset(Path(out), manifest)
