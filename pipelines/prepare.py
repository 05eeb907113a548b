"""`prepare_dataset`: raw log → validated, cleaned, sessionised, split TLSAN dataset directory.

The steps run in a fixed order (read, categories, clean, index, sessions, examples, write);
the layout of the result is documented in docs/dataset-format.md. Sessions, examples and
features are built block by block of whole users by `build_block`, in process (the Polars
engine) or on Ray (`pipelines.ray_engine`), and every block is appended to the files as soon
as it is built (`pipelines.writing`), so memory does not grow with the examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.atomic import atomic_directory, check_output
from pipelines.cleaning import StepCount, clean, sort_events
from pipelines.config import PrepareConfig
from pipelines.engine import EngineConfig
from pipelines.errors import DataValidationError
from pipelines.features import attach_features
from pipelines.progress import Steps
from pipelines.reading import item_categories, read_catalog, read_interactions
from pipelines.reference_draws import first_positions, with_reference_draws
from pipelines.sessions import event_table
from pipelines.splits import (
    EXCLUDED,
    PAPER_TRANSITION,
    leave_one_out_examples,
    paper_examples,
    time_examples,
)
from pipelines.vocab import Codebook, Vocabularies, index_events
from pipelines.writing import Block, WrittenDataset, write_blocks

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
    """Examples of each split (positions from one lazy plan, then features per split), plus
    under EXCLUDED the positions of the paper transitions no split trains on. Under
    `--protocol reference` the table carries the replayed draws (`with_reference_draws`)."""
    events = table.lazy()
    if config.split == "last-session":
        examples = paper_examples(
            table,
            cap=config.max_events_per_user,
            seed=config.seed,
            protocol=config.protocol,
            train_targets=config.resolved_train_targets,
        )
    elif config.split == "leave-one-out":
        examples = leave_one_out_examples(events)
    else:
        assert config.valid_from is not None and config.test_from is not None
        examples = time_examples(events, valid_from=config.valid_from, test_from=config.test_from)
    positions = check_target_pos(examples.collect(), table)
    columns = list(EXAMPLE_COLUMNS)
    if config.protocol == "reference":
        positions = _with_fixed_negatives(positions, table)
        columns.append("negative")
    split = positions["split"]
    parts = {
        name: attach_features(
            positions.filter(split == name),
            table,
            max_long=config.max_long,
            max_short=config.max_short,
        ).select(*columns)
        for name in SPLITS
    }
    for dropped in (EXCLUDED, PAPER_TRANSITION):  # counted by the writer, never written
        parts[dropped] = positions.filter(split == dropped).select("user", "target", "target_pos")
    return parts


def _with_fixed_negatives(positions: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """The reference protocol's `negative` column (from the table's replayed draws): a
    training pair takes its target position's negative, the test pair the negative of its
    target item's first position."""
    negatives = table["negative"].to_numpy()
    users = positions["user"].to_numpy()
    offsets = positions["offset"].to_numpy()
    at = positions["target_pos"].to_numpy().astype(np.int64)
    test = (positions["split"] == "test").to_numpy()
    at[test] = first_positions(table, users[test], positions["target"].to_numpy()[test])
    return positions.with_columns(pl.Series("negative", negatives[offsets + at], pl.Int32))


def check_target_pos(positions: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """`positions` as given, after checking that every split builder's `target_pos` is the
    event of its `target` (a builder that breaks it fails loudly, not with shifted labels)."""
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


def build_block(events: pl.DataFrame, config: PrepareConfig) -> Block:
    """One block of whole users (sorted by user, time): its events.parquet rows and its
    examples of each split. Both engines run exactly this on every block."""
    table = event_table(events, config.session)
    return table.select(*EVENT_COLUMNS), build_examples(table, config)


def example_blocks(
    events: pl.DataFrame, config: PrepareConfig, engine: EngineConfig, info: dict[str, Any]
) -> Iterator[Block]:
    """The blocks of `events` (sorted by user), built by the chosen engine, in user order;
    `info` receives what the manifest records about the run."""
    if engine.name == "ray":
        from pipelines.ray_engine import ray_blocks  # Ray loads only for --engine ray

        return ray_blocks(events, config, engine, info, CHUNK_EVENTS)
    blocks = user_blocks(events)
    info["blocks"] = len(blocks)
    return (build_block(block, config) for block in blocks)


def check_engine(engine: EngineConfig) -> None:
    """Fail before any work when the engine cannot run (a Ray address that does not answer)."""
    if engine.name == "ray" and engine.address is not None:
        from pipelines.ray_engine import check_address

        check_address(engine.address)


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
    config: PrepareConfig,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    engine: EngineConfig | None = None,
) -> PreparedDataset:
    """Run the whole pipeline and write the dataset directory atomically."""
    engine = engine or EngineConfig()
    check_output(Path(out), overwrite=overwrite)
    check_engine(engine)
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
    del cleaned, indexed
    engine_info = engine.to_json()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "vocab").mkdir()
        (tmp / "examples").mkdir()
        vocab.users.write_parquet(tmp / "vocab/users.parquet")
        vocab.items.write_parquet(tmp / "vocab/items.parquet")
        vocab.categories.write_parquet(tmp / "vocab/categories.parquet")
        with steps.step(f"sessions, examples, features and write ({engine.name})"):
            if config.protocol == "reference":  # one sequential pass, before the blocks
                events = with_reference_draws(
                    events, vocab.items.height, config.max_events_per_user, config.seed
                )
            blocks = example_blocks(events, config, engine, engine_info)
            written = write_blocks(tmp, SPLITS, blocks)
        manifest = _manifest(config, engine_info, events, vocab, counts, category_info, written)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    steps.finish()
    return PreparedDataset(Path(out), manifest)


def _manifest(
    config: PrepareConfig,
    engine_info: dict[str, Any],
    events: pl.DataFrame,
    vocab: Vocabularies,
    counts: list[StepCount],
    category_info: dict[str, Any],
    written: WrittenDataset,
) -> dict[str, Any]:
    """manifest.json of the written dataset (fails when a split the model needs is empty)."""
    parts = written.splits
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
    example_users = written.users_with_examples
    excluded = written.dropped.get(EXCLUDED, 0)
    dense = config.resolved_train_targets == "events"
    paper_transitions = (
        written.dropped.get(PAPER_TRANSITION, 0) if dense else parts["train"].height + excluded
    )
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset_hash": dataset_hash(inputs, config),
        "config": config.to_json(),
        "inputs": inputs,
        "categories": category_info,
        "steps": [c.to_json() for c in counts],
        "stats": _stats(events, vocab, written.examples),
        "protocol": config.protocol,
        "leaky": config.protocol == "reference",
        "counts": {
            **(
                {  # the paper's training transitions (the reference count) and those left out
                    "paper_train_examples": paper_transitions,
                    **({} if dense else {"excluded_transitions": excluded}),
                }
                if config.split == "last-session"
                else {}
            ),
            "train": parts["train"].height,
            "valid": parts["valid"].height,
            "test": parts["test"].height,
            "users_with_examples": example_users,
            "users_without_examples": vocab.users.height - example_users,
        },
        "vocab_sizes": vocab.sizes(),
        "max_lengths": {
            "long": written.max_long,
            "short": written.max_short,
        },
        "engine": engine_info,
    }
    return manifest
