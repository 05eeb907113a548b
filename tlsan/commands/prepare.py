"""`tlsan prepare`: turn a raw interaction log into a TLSAN-ready dataset directory."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.config import ColumnMap, PrepareConfig, SessionRule, apply_preset
from pipelines.engine import ENGINES, EngineConfig
from pipelines.errors import DataValidationError
from pipelines.prepare import prepare_dataset

# Options a preset may fill in; None as the parser default tells "not given" from "given".
_PRESET_FIELDS = {
    "session": "day",
    "split": "last-session",
    "max_events_per_user": 0,
    "max_short": 50,
}


def parse_time(text: str, flag: str) -> int:
    """Unix seconds from an integer or an ISO-8601 date/time (UTC unless it says otherwise)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DataValidationError(
            f"{flag}: expected unix seconds or an ISO-8601 time such as 2014-01-01, got {text!r}"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="raw interaction log -> TLSAN-ready dataset",
        description="Validate, clean, sessionise and split an interaction log (CSV, Parquet or "
        "NDJSON) into a dataset directory (docs/dataset-format.md).",
    )
    p.add_argument("--interactions", type=Path, required=True, help="the interaction log")
    p.add_argument("--items", type=Path, help="item catalog with item_id and category")
    p.add_argument("--out", type=Path, required=True, help="output dataset directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--format", choices=["csv", "parquet", "ndjson"], help="default: by extension")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--category-col", default="category")
    p.add_argument(
        "--time-unit",
        choices=["s", "ms", "us", "ns"],
        default="s",
        help="unit of integer timestamps (ISO-8601 strings are detected)",
    )
    p.add_argument(
        "--missing-items",
        choices=["error", "unknown"],
        default="error",
        help="items without a category: fail, or give them the 'unknown' category",
    )
    p.add_argument("--preset", choices=["paper"], help="the TLSAN paper's construction")
    p.add_argument("--session", help="day (UTC calendar day) or gap:DURATION, e.g. gap:30m")
    p.add_argument("--split", choices=["last-session", "leave-one-out", "time"])
    p.add_argument("--valid-from", help="time split: first validation time (unix s or ISO)")
    p.add_argument("--test-from", help="time split: first test time (unix s or ISO)")
    for flag in ("min-user-interactions", "min-item-interactions", "min-sessions", "max-sessions"):
        p.add_argument(f"--{flag}", type=int, default=0, metavar="N", help="0 = off")
    p.add_argument(
        "--max-events-per-user",
        type=int,
        metavar="N",
        help="only the first N events of a user count (paper: 90; 0 = off)",
    )
    p.add_argument("--max-long", type=int, default=50, help="long-term events kept per example")
    p.add_argument(
        "--max-short", type=int, metavar="N", help="short-term events kept (0 = whole session)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test target choice")
    p.add_argument(
        "--protocol",
        choices=["leak-free", "reference"],
        default="leak-free",
        help="reference: the paper's published, leaky protocol (reproduction only; "
        "last-session split)",
    )
    p.add_argument(
        "--train-targets",
        choices=["transitions", "events"],
        help="last-session: train on the paper's session transitions, or on every event before "
        "the validation session, each built like a serving request (default: events, "
        "transitions under --preset paper or --protocol reference)",
    )
    p.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="polars",
        help="where sessions, examples and features are built: in this process (polars) or "
        "as Ray tasks over partitions of the users (ray); both write the same dataset",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--engine ray: the cluster to use (HOST:PORT of its head, ray://HOST:PORT or "
        "auto); default: start a local Ray for this run",
    )
    p.add_argument(
        "--ray-partitions",
        type=int,
        default=0,
        metavar="N",
        help="--engine ray: partitions of the users (default 0 = twice the cluster's CPUs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Map the flags onto a PrepareConfig; a preset fills only what was not given."""
    given = {name for name in _PRESET_FIELDS if getattr(args, name) is not None}
    values: dict[str, Any] = {
        name: getattr(args, name) if name in given else default
        for name, default in _PRESET_FIELDS.items()
    }
    config = PrepareConfig(
        interactions=args.interactions,
        items=args.items,
        format=args.format,
        columns=ColumnMap(args.user_col, args.item_col, args.time_col, args.category_col),
        time_unit=args.time_unit,
        missing_items=args.missing_items,
        session=SessionRule.parse(values["session"]),
        split=values["split"],
        valid_from=parse_time(args.valid_from, "--valid-from") if args.valid_from else None,
        test_from=parse_time(args.test_from, "--test-from") if args.test_from else None,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        min_sessions=args.min_sessions,
        max_sessions=args.max_sessions,
        max_events_per_user=values["max_events_per_user"],
        max_long=args.max_long,
        max_short=values["max_short"],
        seed=args.seed,
        protocol=args.protocol,
        train_targets=args.train_targets,
    )
    return apply_preset(config, args.preset, given)


def summary_table(manifest: dict[str, Any]) -> Table:
    table = Table(title="tlsan prepare", show_header=True)
    table.add_column("step")
    for col in ("rows", "users", "items"):
        table.add_column(col, justify="right")
    for step in manifest["steps"]:
        table.add_row(step["step"], *(f"{step[c]:,}" for c in ("rows", "users", "items")))
    table.add_section()
    for name, value in manifest["counts"].items():
        table.add_row(name, f"{value:,}", "", "")
    stats = manifest["stats"]
    table.add_section()
    table.add_row("categories", f"{stats['categories']:,}", "", "")
    table.add_row("avg behaviours/user", f"{stats['avg_behaviours_per_user']:.2f}", "", "")
    table.add_row("avg behaviours/item", f"{stats['avg_behaviours_per_item']:.2f}", "", "")
    return table


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    engine = EngineConfig(args.engine, args.ray_address, args.ray_partitions)
    result = prepare_dataset(
        config, args.out, overwrite=args.overwrite, progress=not args.quiet, engine=engine
    )
    if not args.quiet:
        console = Console()
        console.print(summary_table(result.manifest))
        console.print(f"dataset written to {result.path} (hash {result.manifest['dataset_hash']})")
        if result.manifest.get("leaky"):
            console.print(
                "[bold red]LEAKY[/]: --protocol reference rebuilds the paper's published "
                "protocol (test pairs trained on, targets in test sessions); for reproducing "
                "its figure only"
            )
    return 0
