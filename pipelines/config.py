"""Resolved options of `tlsan prepare`: one dataclass, presets, and the session rule parser.

Keeping every option in one frozen dataclass lets the manifest record exactly what produced a
dataset and lets serving rebuild the same session and time features from it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipelines.errors import DataValidationError

SplitKind = Literal["last-session", "leave-one-out", "time"]
Protocol = Literal["leak-free", "reference"]
TrainTargets = Literal["transitions", "events"]
TRAIN_TARGETS: tuple[str, ...] = ("transitions", "events")
PROTOCOLS: tuple[str, ...] = ("leak-free", "reference")
FileFormat = Literal["csv", "parquet", "ndjson"]
TimeUnit = Literal["s", "ms", "us", "ns"]
MissingItemPolicy = Literal["error", "unknown"]

SECONDS_PER_DAY = 86_400
UNKNOWN_CATEGORY = "unknown"
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


@dataclass(frozen=True)
class SessionRule:
    """How events become sessions: one UTC calendar day (the paper) or inactivity gaps."""

    kind: Literal["day", "gap"] = "day"
    gap_seconds: int = 0

    @classmethod
    def parse(cls, text: str) -> SessionRule:
        """Parse `day` or `gap:30m` (units s, m, h, d)."""
        if text == "day":
            return cls("day", 0)
        if text.startswith("gap:"):
            match = _DURATION.match(text[4:])
            if match and int(match.group(1)) > 0:
                return cls("gap", int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        raise DataValidationError(
            f"--session: expected 'day' or 'gap:DURATION' such as gap:30m (units s, m, h, d), "
            f"got {text!r}"
        )

    def __str__(self) -> str:
        return "day" if self.kind == "day" else f"gap:{self.gap_seconds}s"


@dataclass(frozen=True)
class ColumnMap:
    """Names of the raw columns in the user's files."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    category: str = "category"


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines a prepared dataset (recorded in manifest.json)."""

    interactions: Path
    items: Path | None = None
    format: FileFormat | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)
    time_unit: TimeUnit = "s"
    missing_items: MissingItemPolicy = "error"
    session: SessionRule = field(default_factory=SessionRule)
    split: SplitKind = "last-session"
    valid_from: int | None = None
    test_from: int | None = None
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    min_sessions: int = 0
    max_sessions: int = 0
    max_events_per_user: int = 0
    max_long: int = 50
    max_short: int = 50
    seed: int = 0
    preset: str | None = None
    protocol: Protocol = "leak-free"  # "reference": the published, leaky protocol (DESIGN.md)
    # last-session: train on the paper's session transitions, or on every event before the
    # validation session (each built like a serving request). None: the split's default, see
    # `resolved_train_targets`.
    train_targets: TrainTargets | None = None

    @property
    def resolved_train_targets(self) -> TrainTargets:
        """`train_targets`, or its default: `events` for the leak-free last-session split
        (validation chose it, docs/experiments/tlsan-levers.md) unless the preset is `paper`
        (the paper's construction), `transitions` otherwise. Resolved when read, so that a
        config derived with another split or preset gets that split's default."""
        if self.train_targets is not None:
            return self.train_targets
        dense = (self.split, self.protocol) == ("last-session", "leak-free")
        return "events" if dense and self.preset != "paper" else "transitions"

    def __post_init__(self) -> None:
        for name in (
            "min_user_interactions",
            "min_item_interactions",
            "min_sessions",
            "max_sessions",
            "max_events_per_user",
            "max_short",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise DataValidationError(
                    f"--{name.replace('_', '-')}: expected an integer >= 0 (0 = off), got {value!r}"
                )
        if not isinstance(self.max_long, int) or self.max_long < 1:
            raise DataValidationError(
                f"--max-long: expected an integer >= 1, got {self.max_long!r}"
            )
        if self.max_sessions and self.min_sessions > self.max_sessions:
            raise DataValidationError(
                f"--min-sessions {self.min_sessions} is greater than --max-sessions "
                f"{self.max_sessions}: expected min <= max"
            )
        if self.protocol not in PROTOCOLS:
            raise DataValidationError(
                f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.protocol == "reference" and self.split != "last-session":
            raise DataValidationError(
                "--protocol reference rebuilds the paper's published (leaky) protocol and needs "
                f"--split last-session, got --split {self.split}"
            )
        if self.train_targets not in (None, *TRAIN_TARGETS):
            raise DataValidationError(
                f"--train-targets: expected one of {', '.join(TRAIN_TARGETS)}, "
                f"got {self.train_targets!r}"
            )
        if self.train_targets == "events" and (
            self.split != "last-session" or self.protocol != "leak-free"
        ):
            raise DataValidationError(
                "--train-targets events applies to the leak-free --split last-session only "
                f"(got --split {self.split}, --protocol {self.protocol})"
            )
        if self.split == "time":
            if self.valid_from is None or self.test_from is None:
                raise DataValidationError(
                    "--split time needs both --valid-from and --test-from (unix seconds or ISO-8601)"
                )
            if self.valid_from > self.test_from:
                raise DataValidationError(
                    f"--valid-from ({self.valid_from}) is after --test-from ({self.test_from}): "
                    "expected valid_from <= test_from"
                )
        elif self.valid_from is not None or self.test_from is not None:
            raise DataValidationError(
                f"--valid-from/--test-from only apply to --split time, not --split {self.split}"
            )

    def to_json(self) -> dict[str, Any]:
        """The resolved configuration, JSON-serialisable, as written into manifest.json."""
        data = asdict(self)
        data["interactions"] = str(self.interactions)
        data["items"] = str(self.items) if self.items else None
        data["session"] = str(self.session)
        data["train_targets"] = self.resolved_train_targets
        return data


def apply_preset(config: PrepareConfig, preset: str | None, given: set[str]) -> PrepareConfig:
    """Apply a preset's values for every option the user did not give explicitly.

    `paper` is the construction of the TLSAN paper: day sessions, a 90-event cap, the
    last-session split (trained on session transitions unless --train-targets says otherwise),
    no short-term cap and no filter unless one is given.
    """
    if preset is None:
        return config
    if preset != "paper":
        raise DataValidationError(f"--preset: expected 'paper', got {preset!r}")
    values: dict[str, Any] = {
        "session": SessionRule("day", 0),
        "split": "last-session",
        "max_events_per_user": 90,
        "max_short": 0,
    }
    changes = {k: v for k, v in values.items() if k not in given}
    if "session" in given and config.session.kind != "day":
        raise DataValidationError("--preset paper uses day sessions; drop --session or the preset")
    if "split" in given and config.split != "last-session":
        raise DataValidationError("--preset paper uses --split last-session; drop one of them")
    return replace(config, preset=preset, **changes)
