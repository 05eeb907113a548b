"""One `tlsan tune` invocation: open the study, run trials, then report and retrain the best.

Trials run here (one worker) or, with `--jobs J`, in J worker processes (`processes.py`).
Processes started independently (other terminals, other machines) on the same storage URL and
study name join the same study the same way; `workers.py` keeps the total exact.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tlsan.config import TrainConfig
from tlsan.tuning.objective import TrialRunner, load_tuning_data
from tlsan.tuning.processes import run_processes
from tlsan.tuning.progress import TrialBar
from tlsan.tuning.results import finalize, retrain
from tlsan.tuning.settings import (
    POLL_S,
    TRIALS_DIR,
    SweepOutcome,
    TuneSettings,
    base_config,
    epoch_budget,
    identity,
    sweep_params,
    worker_threads,
)
from tlsan.tuning.space import SearchSpace, load_space
from tlsan.tuning.storage import open_storage
from tlsan.tuning.study import (
    MLFLOW_PARENT_ATTR,
    create_or_open_study,
    make_pruner,
    make_sampler,
)
from tlsan.tuning.workers import StopFlag, run_worker, tally

if TYPE_CHECKING:
    import optuna

__all__ = ["SweepOutcome", "TuneSettings", "run_sweep"]


def run_sweep(settings: TuneSettings, stop: StopFlag | None = None) -> SweepOutcome:
    """Open (or resume) the study, run trials until it counts `settings.trials`, finalise."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stop = stop or StopFlag()
    settings.check()
    base = base_config(settings)
    space = load_space(settings.space, base)
    dataset = load_tuning_data(settings.data)
    max_epochs = epoch_budget(settings, base, space)
    study, created = create_or_open_study(
        open_storage(settings.storage),
        settings.storage,
        settings.study,
        identity=identity(settings, base, space, dataset.dataset_hash),
        sampler=make_sampler(settings.seed, settings.worker_index),
        pruner=make_pruner(settings.pruner, max_epochs),
    )
    parent = None
    if created and not settings.mlflow:  # no parent to wait for when MLflow joins later
        study.set_user_attr(MLFLOW_PARENT_ATTR, "")
    if settings.mlflow:
        from tlsan.tuning.mlflow_study import parent_run

        parent = parent_run(study, sweep_params(settings), settings.storage, created=created)
    deadline = time.monotonic() + settings.timeout if settings.timeout else None
    if settings.jobs > 1 and not settings.worker:
        status, ran = run_processes(settings, study, stop, deadline), []
    else:
        status, ran = _run_here(settings, study, stop, deadline, base, space, dataset, parent)
    counts = tally(study)
    outcome = SweepOutcome(status, counts.counted, settings.trials, parent_run_id=parent)
    outcome.ran_here = ran
    if settings.worker:
        return outcome
    finalize(settings, study, base, space, outcome)
    if settings.retrain and status in ("done", "timeout") and outcome.best_config_path is not None:
        outcome.retrain = retrain(settings, outcome, parent)
    return outcome


def _run_here(
    settings: TuneSettings,
    study: optuna.Study,
    stop: StopFlag,
    deadline: float | None,
    base: TrainConfig,
    space: SearchSpace,
    dataset: Any,
    parent: str | None,
) -> tuple[str, list[int]]:
    """Run trials in this process (one worker)."""
    bar = TrialBar(settings, study)
    runner = TrialRunner(
        dataset=dataset,
        base=base,
        space=space,
        trials_dir=settings.out_dir / TRIALS_DIR,
        epochs=settings.epochs,
        threads=worker_threads(settings, base),
        mlflow_parent=parent,
        on_epoch_progress=lambda n, e, v: bar.refresh(f"trial {n} epoch {e}: {v:.5f}"),
    )
    try:
        result = run_worker(
            study,
            runner,
            settings.trials,
            stop=stop,
            deadline=deadline,
            heartbeat_s=settings.heartbeat,
            poll_s=POLL_S,
            on_trial=bar.trial_done,
            on_wait=lambda c: bar.refresh(f"waiting for {c.running} running trial(s)"),
            sampler_for=lambda n: make_sampler(settings.seed, settings.worker_index, n),
        )
    finally:
        bar.close()
    return result.stopped, result.trials
