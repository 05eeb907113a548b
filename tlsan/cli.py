"""The `tlsan` command line: each subcommand lives in `tlsan/commands/<name>.py`.

A command module exposes `register(subparsers)`, which adds its parser and sets `func`
to a callable taking the parsed namespace and returning an exit status. Errors that users
can fix (bad data, bad flags, bad run dirs) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = (
    "prepare",
    "generate",
    "materialize",
    "export",
    "serve",
    "train",
    "evaluate",
    "compare",
    "federate",
    "tune",
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (no traceback)."""
    from pipelines.errors import DataValidationError
    from tlsan.errors import TlsanError

    types: list[type[BaseException]] = [DataValidationError, TlsanError]
    try:
        from feature_store.errors import StoreError

        types.append(StoreError)
    except ImportError:  # feature store not present in a minimal install
        pass
    return tuple(types)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command's module is imported (fast start-up:
    `tlsan prepare` never pays for importing torch or MLflow)."""
    parser = argparse.ArgumentParser(
        prog="tlsan", description="Time-aware sequential recommendation with TLSAN."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"tlsan.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except user_error_types() as exc:
        print(f"tlsan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlsan {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
