"""`tlsan materialize`: load a prepared dataset's event log into the online feature store."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from feature_store import DEFAULT_STORE_URL, open_store
from feature_store.materialize import materialize
from tlsan.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "materialize",
        help="prepared dataset -> online feature store",
        description="Bulk-load every user's events (raw ids) from a prepared dataset into the "
        "online store that serving reads. Idempotent: loading twice stores nothing new.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument(
        "--store",
        default=DEFAULT_STORE_URL,
        help=f"store URL, sqlite:///file.db or redis://host:port/db (default {DEFAULT_STORE_URL})",
    )
    p.add_argument("--batch", type=int, default=100_000, help="events per write batch")
    p.add_argument(
        "--max-events-per-user", type=int, help="retention cap (default: the URL's, else 1000)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise ConfigError(f"--batch: expected an integer >= 1, got {args.batch}")
    with open_store(args.store, max_events_per_user=args.max_events_per_user) as store:
        bars: list[tqdm] = []

        def on_start(total: int) -> None:
            bars.append(tqdm(total=total, unit="ev", unit_scale=True, desc="materialize",
                             disable=args.quiet))  # fmt: skip

        try:
            result = materialize(
                args.data,
                store,
                batch_size=args.batch,
                progress=lambda done: bars[0].update(done),
                on_start=on_start,
            )
        finally:
            for bar in bars:
                bar.close()
        stored_users = store.n_users()
    print(
        f"materialized {result.users} users, {result.events} events "
        f"({result.new_events} new) into {args.store} in {result.seconds:.2f} s; "
        f"the store now holds {stored_users} users"
    )
    return 0
