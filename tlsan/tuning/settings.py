"""What one `tlsan tune` invocation was asked to do, and what follows from it.

`TuneSettings` holds the resolved flags; the functions derive the base config every trial
starts from, the torch threads per worker, the epoch budget, and the study identity (what
must match for a resume or another worker to join the study).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsan.config import TrainConfig, load_config_file, preset
from tlsan.errors import ConfigError
from tlsan.tuning.space import SearchSpace
from tlsan.tuning.storage import DEFAULT_STORAGE
from tlsan.tuning.study import PRUNERS

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from tlsan.train import FitResult

BEST_CONFIG_FILE = "best_config.yaml"
PLOTS_DIR = "plots"
TRIALS_DIR = "trials"
RETRAIN_DIR = "best_trial_{number:04d}"  # one retrain per best trial
WORKER_LOG_DIR = "workers"
DEFAULT_HEARTBEAT_S = 30.0
POLL_S = 1.0


@dataclass
class TuneSettings:
    """Everything `tlsan tune` was asked to do (flags, resolved)."""

    data: Path
    study: str
    trials: int
    storage: str = DEFAULT_STORAGE
    space: Path | None = None
    metric: str = "ndcg@10"
    timeout: float | None = None
    jobs: int = 1
    pruner: str = "percentile"
    seed: int = 0
    retrain: bool = False
    out: Path | None = None
    epochs: int | None = None
    preset: str = "default"
    config: Path | None = None
    mlflow: bool = True
    heartbeat: float = DEFAULT_HEARTBEAT_S
    worker_index: int = 0
    worker: bool = False  # internal: a process started by --jobs (no progress bar, no finalising)
    progress: bool = True

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / "tune" / self.study

    def check(self) -> None:
        """Flag values that make no sense, named, before anything is opened."""
        if self.trials < 1:
            raise ConfigError(f"--trials: expected a count >= 1, got {self.trials}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs: expected a count >= 1, got {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout: expected seconds > 0, got {self.timeout}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs: expected a count >= 1, got {self.epochs}")
        if self.heartbeat <= 0:
            raise ConfigError(f"--heartbeat: expected seconds > 0, got {self.heartbeat}")
        if self.pruner not in PRUNERS:
            raise ConfigError(
                f"--pruner: expected one of {', '.join(PRUNERS)}, got {self.pruner!r}"
            )
        if self.seed < 0 or self.worker_index < 0:
            raise ConfigError("--seed and --worker-index: expected integers >= 0")
        if not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: not a directory (expected a prepared dataset)")


@dataclass
class SweepOutcome:
    """How the sweep ended and what it produced."""

    status: str  # done | interrupted | timeout
    counted: int
    trials: int
    best: FrozenTrial | None = None
    best_config_path: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)
    skipped_plots: dict[str, str] = field(default_factory=dict)
    retrain: FitResult | None = None
    parent_run_id: str | None = None
    ran_here: list[int] = field(default_factory=list)


def base_config(settings: TuneSettings) -> TrainConfig:
    """The config every trial starts from: preset or file, selecting on the sweep's metric,
    training with the sweep's seed (so trials differ only in their sampled parameters)."""
    base = preset(settings.preset)
    if settings.config is not None:
        base = load_config_file(settings.config, base=base)
    try:
        base = base.override(select_metric=settings.metric)
    except ConfigError as exc:
        raise ConfigError(f"--metric: {exc}") from exc
    return base.override(seed=settings.seed)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(settings: TuneSettings, base: TrainConfig) -> int:
    """Torch threads per trial: the base's when alone, else an equal share of the cores."""
    if settings.jobs > 1 or settings.worker:
        share = max(1, cores() // max(settings.jobs, 1))
        return share if base.threads == 0 else min(base.threads, share)
    return base.threads


def epoch_budget(settings: TuneSettings, base: TrainConfig, space: SearchSpace) -> int | None:
    """Most epochs a trial may train (Hyperband's max resource); None when it is searched."""
    if settings.epochs:
        return settings.epochs
    if "epochs" in space.names:
        return None
    return int(space.fixed.get("epochs", base.epochs))


def identity(settings: TuneSettings, base: TrainConfig, space: SearchSpace, data_hash: str) -> dict:
    """What makes the trials of one study comparable (checked on every resume)."""
    flat = base.flat()
    flat.pop("threads", None)
    return {
        "metric": settings.metric,
        "dataset_hash": data_hash,
        "base_config": flat,
        "epochs": settings.epochs or base.epochs,
        "space": space.to_dict(),
    }


def sweep_params(settings: TuneSettings) -> dict[str, Any]:
    return {
        "data": str(settings.data),
        "trials": settings.trials,
        "metric": settings.metric,
        "pruner": settings.pruner,
        "seed": settings.seed,
        "epochs": settings.epochs or "",
        "preset": settings.preset,
        "config": str(settings.config or ""),
        "space": str(settings.space or "default"),
    }
