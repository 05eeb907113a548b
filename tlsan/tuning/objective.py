"""The objective of a trial: one real training run of a sampled config, validation only.

The dataset is loaded once per worker with the train and valid splits only, and `fit` runs
with `evaluate_test=False`: the test split is never read during a sweep, by construction
(asking for it would raise). Each epoch's validation metric is reported to Optuna, whose
pruner may stop the trial; the trial's value is the best validation metric of the run (the
checkpoint `fit` selects).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsan.config import TrainConfig
from tlsan.tuning.space import SearchSpace

if TYPE_CHECKING:
    import optuna

    from tlsan.data import Dataset

TUNE_SPLITS: tuple[str, ...] = ("train", "valid")
EPOCHS_ATTR = "epochs_trained"
RUN_DIR_ATTR = "run_dir"
EpochProgress = Callable[[int, int, float], None]  # (trial number, epoch, metric value)


def trial_config(base: TrainConfig, values: dict[str, Any], epochs: int | None) -> TrainConfig:
    """The config of one trial: base, then the sampled values, then the epoch cap."""
    config = base.override(**values)
    return config.override(epochs=epochs) if epochs else config


def best_config(
    base: TrainConfig,
    space: SearchSpace,
    params: dict[str, Any],
    *,
    epochs: int | None,
    threads: int,
) -> TrainConfig:
    """What a trial with these sampled `params` trained, with the base's thread count
    (a runtime setting of this machine, not a result of the sweep)."""
    return trial_config(base, {**space.fixed, **params}, epochs).override(threads=threads)


@dataclass
class TrialRunner:
    """Callable objective shared by the trials of one worker process."""

    dataset: Dataset
    base: TrainConfig
    space: SearchSpace
    trials_dir: Path
    epochs: int | None = None
    threads: int = 0
    mlflow_parent: str | None = None
    on_epoch_progress: EpochProgress | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from tlsan.run_dir import CHECKPOINT_DIR
        from tlsan.tracking import TrackingOptions
        from tlsan.train import fit

        values = self.space.sample(trial)
        config = trial_config(self.base, values, self.epochs).override(threads=self.threads)
        metric = config.select_metric
        run_dir = self.trials_dir / f"trial_{trial.number:04d}"
        if run_dir.exists():  # left by a killed worker of an earlier, failed attempt
            shutil.rmtree(run_dir)
        mlflow_run: list[str] = []
        last: list[float] = []  # the latest validation value (a pruned trial's final value)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            value = float(metrics[metric])
            if self.mlflow_parent is not None and not mlflow_run:
                import mlflow

                active = mlflow.active_run()
                if active is not None:
                    mlflow_run.append(active.info.run_id)
            last[:] = [value]
            trial.report(value, epoch)
            trial.set_user_attr(EPOCHS_ATTR, epoch)
            if self.on_epoch_progress is not None:
                self.on_epoch_progress(trial.number, epoch, value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {metric} {value:.5f}")

        tracking = TrackingOptions(
            enabled=self.mlflow_parent is not None,
            run_name=f"trial {trial.number}",
            registered_model_name=None,
            parent_run_id=self.mlflow_parent,
            tags={"optuna.study": trial.study.study_name, "optuna.trial_number": str(trial.number)},
        )
        state, objective = "FAIL", None
        try:
            result = fit(
                config,
                self.dataset,
                run_dir,
                on_epoch=on_epoch,
                mlflow=self.mlflow_parent is not None,
                progress=False,
                evaluate_test=False,
                tracking=tracking,
            )
            objective = float(result.valid[metric])
            state = "COMPLETE"
            # The resume state (optimizer moments, RNG) is of no use once a trial is over.
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            trial.set_user_attr(EPOCHS_ATTR, len([h for h in result.history if h["epoch"]]))
            trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
            return objective
        except optuna.TrialPruned:
            state, objective = "PRUNED", (last[0] if last else None)
            shutil.rmtree(run_dir, ignore_errors=True)  # a partial run dir is of no use
            raise
        finally:
            if mlflow_run:
                from tlsan.tuning.mlflow_study import tag_trial

                tag_trial(mlflow_run[0], state, objective, metric)


def load_tuning_data(path: Path) -> Dataset:
    """Train and valid splits only: the sweep cannot read the test split."""
    from tlsan.data import load_dataset

    return load_dataset(Path(path), splits=TUNE_SPLITS)
