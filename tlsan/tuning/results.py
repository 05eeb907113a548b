"""What a sweep leaves behind: the best config file, study plots, the MLflow parent's
summary, and (on request) the retrained best config with its test metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tlsan.config import TrainConfig, load_config_file
from tlsan.errors import RunError
from tlsan.tuning.objective import best_config
from tlsan.tuning.settings import (
    BEST_CONFIG_FILE,
    PLOTS_DIR,
    RETRAIN_DIR,
    SweepOutcome,
    TuneSettings,
)
from tlsan.tuning.space import SearchSpace

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from tlsan.train import FitResult


def finalize(
    settings: TuneSettings,
    study: optuna.Study,
    base: TrainConfig,
    space: SearchSpace,
    outcome: SweepOutcome,
) -> None:
    """Best config file, plots, and the parent MLflow run's summary."""
    from optuna.trial import TrialState

    from tlsan.tuning.plots import write_plots

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    outcome.best = max(complete, key=lambda t: t.value) if complete else None
    if outcome.best is not None:
        config = best_config(
            base, space, outcome.best.params, epochs=settings.epochs, threads=base.threads
        )
        outcome.best_config_path = write_best_config(
            out / BEST_CONFIG_FILE, config, study.study_name, outcome.best, settings.metric
        )
    outcome.plots, outcome.skipped_plots = write_plots(
        study, out / PLOTS_DIR, metric=settings.metric
    )
    if outcome.parent_run_id is not None:
        from tlsan.tuning.mlflow_study import finish_parent

        artifacts = list(outcome.plots.values())
        if outcome.best_config_path is not None:
            artifacts.append(outcome.best_config_path)
        status = {"done": "FINISHED", "timeout": "FINISHED"}.get(outcome.status, "KILLED")
        finish_parent(
            outcome.parent_run_id, study, outcome.best, settings.metric, artifacts, status=status
        )


def write_best_config(
    path: Path, config: TrainConfig, study: str, best: FrozenTrial, metric: str
) -> Path:
    """The best trial's full config as YAML (what `tlsan train --config FILE` reads)."""
    import yaml

    header = (
        f"# Best trial of study {study!r}: trial {best.number}, "
        f"valid {metric} = {best.value:.6f}\n"
        f"# Written by tlsan tune on {datetime.now(UTC).isoformat(timespec='seconds')}.\n"
        f"# Train it: tlsan train --data DIR --out RUN_DIR --config {path.name}\n"
        f"# Sampled parameters: {json.dumps(best.params, sort_keys=True)}\n"
    )
    body = yaml.safe_dump(config.to_dict(), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + body, encoding="utf-8")
    tmp.replace(path)
    return path


def retrain(settings: TuneSettings, outcome: SweepOutcome, parent: str | None) -> FitResult:
    """Train the best config on the full dataset, test split evaluated once at the end."""
    from tlsan.tracking import TrackingOptions
    from tlsan.train import fit

    assert outcome.best_config_path is not None and outcome.best is not None
    config = load_config_file(outcome.best_config_path)
    run_dir = settings.out_dir / RETRAIN_DIR.format(number=outcome.best.number)
    if run_dir.exists():
        raise RunError(
            f"{run_dir}: the best trial was already retrained (its test metrics are in "
            f"{run_dir / 'metrics.json'}); remove the folder to retrain it again"
        )
    tracking = TrackingOptions(
        enabled=settings.mlflow,
        run_name=f"retrain best (trial {outcome.best.number})",
        parent_run_id=parent,
        tags={"optuna.study": settings.study, "optuna.best_trial": str(outcome.best.number)},
    )
    return fit(
        config,
        Path(settings.data),
        run_dir,
        mlflow=settings.mlflow,
        progress=settings.progress,
        evaluate_test=True,
        tracking=tracking,
    )
