"""`tlsan keys create|list|revoke`: manage the API keys file of `tlsan serve --api-keys`.

    KEY=$(tlsan keys create --file keys.json --name shop --scopes recommend,events)
    tlsan keys list --file keys.json
    tlsan keys revoke --file keys.json --name shop

`create` prints the new key once, alone on the last line of stdout (what it did goes to
stderr): the file keeps only a salted hash. Every change rewrites the file atomically
(`tlsan.api_keys`); running servers pick it up within about a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlsan.api_keys import SCOPES, create_key, read_keys, revoke_key


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create, list and revoke API keys for `tlsan serve --api-keys`",
        description="Manage an API keys file. Scopes: recommend (/recommend, /similar_items), "
        "events (/events), explain (explain: true), admin (/model, /metrics).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="add a key; prints it once, on stdout")
    create.add_argument("--file", type=Path, required=True, help="keys file (created if missing)")
    create.add_argument("--name", required=True, help="who uses the key, e.g. shop-backend")
    create.add_argument(
        "--scopes", required=True, help=f"comma-separated, some of {','.join(SCOPES)}"
    )
    create.add_argument(
        "--rate-limit", type=float, help="requests/s for this key (default: the server's)"
    )
    create.add_argument("--rate-burst", type=float, help="token bucket size for this key")
    create.set_defaults(func=run_create)
    listing = actions.add_parser("list", help="show the keys (never their secrets)")
    listing.add_argument("--file", type=Path, required=True, help="keys file")
    listing.set_defaults(func=run_list)
    revoke = actions.add_parser("revoke", help="revoke a key (kept in the file, refused)")
    revoke.add_argument("--file", type=Path, required=True, help="keys file")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="key_id", help="the key's id (`tlsan keys list`)")
    which.add_argument("--name", help="the active key of this name")
    revoke.set_defaults(func=run_revoke)


def run_create(args: argparse.Namespace) -> int:
    record, token = create_key(
        args.file, args.name, args.scopes, rate_limit=args.rate_limit, rate_burst=args.rate_burst
    )
    print(
        f"created key {record.id} ({record.name}; scopes {','.join(record.scopes)}) in "
        f"{args.file}; it is shown once, below: store it now",
        file=sys.stderr,
    )
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0


def run_list(args: argparse.Namespace) -> int:
    records = read_keys(args.file)
    print(f"{'id':<12}  {'name':<24}  {'scopes':<32}  {'created':<25}  revoked")
    for r in records:
        print(
            f"{r.id:<12}  {r.name:<24}  {','.join(r.scopes):<32}  {r.created_at:<25}  "
            f"{r.revoked_at or '-'}"
        )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    record = revoke_key(args.file, key_id=args.key_id, name=args.name)
    print(f"revoked key {record.id} ({record.name}) at {record.revoked_at}", file=sys.stderr)
    return 0
