"""`prepare_dataset`: raw log → validated, cleaned, sessionised, split TLSAN dataset directory.

The steps run in a fixed order (read, categories, clean, index, sessions, examples, write);
the layout of the result is documented in docs/dataset-format.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

FORMAT_VERSION = 1
EXAMPLE_COLUMNS = (
    "user",
    "long_items",
    "long_tau",
    "short_items",
    "target",
    "user_category",
    "ref_time",
    "history_end",
)
SPLITS = ("train", "valid", "test")


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


def build_examples(table: pl.DataFrame, config: PrepareConfig) -> pl.DataFrame:
    """Examples of the configured split (one lazy plan), with features attached."""
    events = table.lazy()
    if config.split == "last-session":
        examples = paper_examples(table, cap=config.max_events_per_user, seed=config.seed)
    elif config.split == "leave-one-out":
        examples = leave_one_out_examples(events)
    else:
        assert config.valid_from is not None and config.test_from is not None
        examples = time_examples(events, valid_from=config.valid_from, test_from=config.test_from)
    featured = attach_features(
        examples.collect(), table, max_long=config.max_long, max_short=config.max_short
    )
    return featured.select(*EXAMPLE_COLUMNS, "split")


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
        coded = raw.select(
            "row",
            users.encode(pl.col("user_id")).alias("user"),
            items.encode(pl.col("item_id")).alias("item"),
            "timestamp",
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
    with steps.step("sessions"):
        table = event_table(events.lazy(), config.session).collect()
    with steps.step("examples and features"):
        examples = build_examples(table, config)
    parts = {name: examples.filter(pl.col("split") == name).drop("split") for name in SPLITS}
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
        vocab.users.write_parquet(tmp / "vocab" / "users.parquet")
        vocab.items.write_parquet(tmp / "vocab" / "items.parquet")
        vocab.categories.write_parquet(tmp / "vocab" / "categories.parquet")
        table.select("user", "item", "category", "timestamp", "session", "pos").write_parquet(
            tmp / "events.parquet"
        )
        for name, frame in parts.items():
            frame.write_parquet(tmp / "examples" / f"{name}.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    steps.finish()
    return PreparedDataset(Path(out), manifest)
