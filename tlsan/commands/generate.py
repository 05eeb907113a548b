"""`tlsan generate`: write a synthetic e-commerce interaction log (pipelines/synthetic.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import DataValidationError
from pipelines.synthetic import DEFAULT_CHUNK_EVENTS, DEFAULT_DAYS, DEFAULT_START, generate_log


def _int(flag: str, text: str | None) -> int | None:
    """Integers are parsed here, not by argparse, so a bad value is one clear error line."""
    if text is None:
        return None
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise DataValidationError(f"{flag}: expected an integer, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write a synthetic interaction log and item catalog",
        description="Write DIR/interactions.<fmt> (user_id, item_id, timestamp in unix seconds; "
        "rows unsorted like a real log), DIR/items.<fmt> (item_id, category) and "
        "DIR/generator.json. Popularity skew, drifting category tastes, bursty sessions, "
        "repeats and a sequential signal; the same arguments give identical files.",
    )
    p.add_argument("--users", required=True, metavar="N", help="number of users")
    p.add_argument("--items", required=True, metavar="M", help="number of catalog items")
    p.add_argument("--events", required=True, metavar="E", help="exact number of events")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", default="0", help="random seed (default 0)")
    p.add_argument("--format", choices=["csv", "parquet"], default="parquet")
    p.add_argument(
        "--categories", metavar="K", help="number of categories (default max(5, items / 50))"
    )
    p.add_argument(
        "--start", default=DEFAULT_START, help=f"first day, ISO-8601 (default {DEFAULT_START})"
    )
    p.add_argument("--days", default=str(DEFAULT_DAYS), help="length of the time window in days")
    p.add_argument(
        "--chunk-events",
        default=str(DEFAULT_CHUNK_EVENTS),
        metavar="N",
        help="events generated per chunk of users (bounds memory)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = generate_log(
        args.out,
        users=_int("--users", args.users),
        items=_int("--items", args.items),
        events=_int("--events", args.events),
        seed=_int("--seed", args.seed),
        fmt=args.format,
        categories=_int("--categories", args.categories),
        start=args.start,
        days=_int("--days", args.days),
        chunk_events=_int("--chunk-events", args.chunk_events),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if not args.quiet:
        p = summary.params
        print(
            f"wrote {p.events:,} events ({p.users:,} users, {p.items:,} items, "
            f"{p.categories:,} categories) to {summary.path} in {summary.seconds:.2f} s "
            f"({summary.events_per_second / 1e6:.2f} M events/s)"
        )
    return 0
