"""The search space of a sweep: a YAML file validated up front, then sampled per trial.

A bad space must fail before any trial trains (and before a study is created), with a message
that names the file, the parameter and what was expected; so every bound and choice is checked
here against the training config's own validation (`TrainConfig.override`).

File format (see `tlsan/default_space.yaml`)::

    params:                 # searched; names are TrainConfig / ModelConfig fields
      lr: {distribution: float, low: 3.0e-4, high: 1.0e-2, log: true}
      long_window: {distribution: int, low: 5, high: 40, step: 5}
      optimizer: {distribution: categorical, choices: [adam, adamw]}
    fixed:                  # optional: the same value in every trial
      epochs: 15
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsan.config import MODEL_FIELDS, TRAIN_FIELDS, TrainConfig
from tlsan.errors import ConfigError

if TYPE_CHECKING:
    import optuna

DISTRIBUTIONS: tuple[str, ...] = ("float", "int", "categorical")
DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "default_space.yaml"
# Fields a sweep may not search: they are not hyper-parameters but the run's identity/plumbing.
NOT_SEARCHABLE: frozenset[str] = frozenset(
    {"kind", "select_metric", "seed", "threads", "eval_batch_size"}
)
SEARCHABLE: frozenset[str] = frozenset((MODEL_FIELDS | TRAIN_FIELDS) - NOT_SEARCHABLE)
_KEYS: dict[str, frozenset[str]] = {
    "float": frozenset({"distribution", "low", "high", "log", "step"}),
    "int": frozenset({"distribution", "low", "high", "log", "step"}),
    "categorical": frozenset({"distribution", "choices"}),
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: a float/int range or a list of categorical choices."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter for one trial."""
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def corners(self) -> tuple[Any, ...]:
        """Values that stand for the whole range when checking it against the config."""
        if self.distribution == "categorical":
            return self.choices
        return (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        if self.distribution == "categorical":
            return {"distribution": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"distribution": self.distribution, "low": self.low}
        out["high"] = self.high
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    """Validated parameters to search plus values fixed for every trial."""

    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """The flat `{field: value}` overrides of one trial (fixed values included)."""
        values = dict(self.fixed)
        values.update({p.name: p.suggest(trial) for p in self.params})
        return values

    def to_dict(self) -> dict[str, Any]:
        """Canonical form, stored with the study so a resume with another space is refused."""
        return {
            "params": {p.name: p.to_dict() for p in self.params},
            "fixed": dict(sorted(self.fixed.items())),
        }

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _number(where: str, key: str, value: Any, kind: str) -> float | int:
    """A bound: ints for int ranges; for floats also strings such as '1e-4', which YAML 1.1
    (PyYAML) reads as text when they lack a decimal point."""
    if isinstance(value, bool):
        raise _fail(where, f"'{key}' expected a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise _fail(where, f"'{key}' expected an integer, got {value!r}")
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _fail(where, f"'{key}' expected a number, got {value!r}")


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One `params:` entry → Param, checking keys, types and ranges (not yet the config)."""
    where = f"{where}: parameter '{name}'"
    if name not in SEARCHABLE:
        hint = (
            "it is set by tlsan tune itself"
            if name in NOT_SEARCHABLE
            else f"expected one of {', '.join(sorted(SEARCHABLE))}"
        )
        raise _fail(where, f"unknown or unsearchable parameter ({hint})")
    if not isinstance(spec, dict):
        raise _fail(where, f"expected a mapping with 'distribution', got {spec!r}")
    kind = spec.get("distribution")
    if kind not in DISTRIBUTIONS:
        raise _fail(
            where, f"unknown distribution {kind!r} (expected one of {', '.join(DISTRIBUTIONS)})"
        )
    extra = sorted(set(spec) - _KEYS[kind])
    if extra:
        raise _fail(
            where,
            f"unknown key '{extra[0]}' for a {kind} distribution "
            f"(expected {', '.join(sorted(_KEYS[kind]))})",
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(where, f"'choices' expected a non-empty list, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise _fail(where, f"'choices' has duplicates: {choices!r}")
        bad = [c for c in choices if not isinstance(c, str | int | float | bool) or c is None]
        if bad:
            raise _fail(where, f"'choices' expected numbers or strings, got {bad[0]!r}")
        return Param(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if key not in spec:
            raise _fail(where, f"missing '{key}' (a {kind} range needs low and high)")
    low = _number(where, "low", spec["low"], kind)
    high = _number(where, "high", spec["high"], kind)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(where, f"'log' expected true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(where, "step", step, kind)
        if step <= 0:
            raise _fail(where, f"'step' expected a value > 0, got {step!r}")
        if log:
            raise _fail(where, "'step' and 'log: true' cannot be combined")
    if low > high:
        raise _fail(where, f"inverted range: low {low!r} > high {high!r}")
    if low == high:
        raise _fail(where, f"empty range: low == high == {low!r} (put it under 'fixed:')")
    if log and low <= 0:
        raise _fail(where, f"'log: true' needs low > 0, got {low!r}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_against_config(space: SearchSpace, base: TrainConfig, where: str) -> None:
    """Every choice and bound must make a valid TrainConfig (wrong type, out of range,
    unknown optimizer...), and so must every combination of the vector sizes and heads."""
    try:
        fixed_base = base.override(**space.fixed)
    except ConfigError as exc:
        raise _fail(f"{where}: fixed", str(exc)) from exc
    for param in space.params:
        for value in param.corners():
            try:
                fixed_base.override(**{param.name: value})
            except ConfigError as exc:
                raise _fail(
                    f"{where}: parameter '{param.name}'", f"value {value!r}: {exc}"
                ) from exc
    shape = {"d_item", "d_cat", "heads"}
    searched = {p.name: p for p in space.params if p.name in shape}
    if searched and all(p.distribution == "categorical" for p in searched.values()):
        names = sorted(searched)
        for combo in itertools.product(*(searched[n].choices for n in names)):
            values = dict(zip(names, combo, strict=True))
            try:
                fixed_base.override(**values)
            except ConfigError as exc:
                raise _fail(
                    where, f"the combination {values} is not a valid model ({exc})"
                ) from exc


def space_from_dict(data: Any, base: TrainConfig, where: str = "space") -> SearchSpace:
    """Validate a parsed space document against `base` (the config every trial starts from)."""
    if not isinstance(data, dict):
        raise _fail(where, f"expected a mapping with 'params', got {type(data).__name__}")
    extra = sorted(set(data) - {"params", "fixed"})
    if extra:
        raise _fail(where, f"unknown top-level key '{extra[0]}' (expected 'params' and 'fixed')")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(where, "'params' expected a non-empty mapping of parameter: distribution")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(where, f"'fixed' expected a mapping of field: value, got {fixed!r}")
    for name in fixed:
        if name not in SEARCHABLE:
            raise _fail(
                f"{where}: fixed '{name}'",
                f"unknown or unsearchable field (expected one of {', '.join(sorted(SEARCHABLE))})",
            )
        if name in params:
            raise _fail(f"{where}: fixed '{name}'", "also listed under 'params'")
    parsed = tuple(parse_param(str(name), spec, where) for name, spec in params.items())
    space = SearchSpace(parsed, dict(fixed), source=where)
    _check_against_config(space, base, where)
    return space


def load_space(path: Path | None, base: TrainConfig) -> SearchSpace:
    """Read and validate a YAML (or JSON) space file; None means the shipped default."""
    path = Path(path) if path is not None else DEFAULT_SPACE
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML ({detail})") from exc
    return space_from_dict(data, base, where=str(path))
