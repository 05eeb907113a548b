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
from typing import NoReturn

COMMANDS: tuple[str, ...] = (
    "prepare",
    "generate",
    "materialize",
    "export",
    "serve",
    "keys",
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


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are user errors too: one line naming the flag, exit status 2 (argparse's
    default prints the whole usage block first). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command's module is imported (fast start-up:
    `tlsan prepare` never pays for importing torch or MLflow)."""
    parser = OneLineParser(
        prog="tlsan", description="Time-aware sequential recommendation with TLSAN."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"tlsan.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status = args.func(args)
    except (*user_error_types(), OSError) as exc:  # OSError: unwritable --out, full disk, ...
        print(f"tlsan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlsan {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
