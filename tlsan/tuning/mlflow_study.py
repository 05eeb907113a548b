"""MLflow layout of a sweep: one parent run per study, one nested run per trial.

The parent run's id is stored in the study (a user attribute), so every worker process, on
any machine, and every resume nests its trial runs under the same parent. Trial runs are the
training runs `fit` logs itself (params, per-epoch curve, final valid metrics, run dir), created
with `parent_run_id`; this module adds the Optuna tags (trial number, state, objective value)
and, at the end, the study's plots, best parameters and best config to the parent.
Explicit `MlflowClient` calls by run id are used throughout, never the fluent "active run",
so nothing here depends on which process started what.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsan.tracking import (
    DEFAULT_EXPERIMENT,
    artifact_location,
    metric_key,
    tracking_uri,
)
from tlsan.tuning.study import MLFLOW_PARENT_ATTR

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import FrozenTrial

STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
PARENT_WAIT_S = 60.0  # how long a worker waits for the study's creator to name the parent


def client() -> MlflowClient:
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: MlflowClient, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it with artifacts beside a SQLite store."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=artifact_location(tracking_uri())
        )
    except MlflowException:  # another worker created it in the meantime
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def parent_run(
    study: optuna.Study,
    params: dict[str, Any],
    storage_url: str,
    *,
    created: bool = True,
    wait_s: float = PARENT_WAIT_S,
) -> str:
    """The study's parent run: reopened when the study names one, created otherwise.

    Workers started together on a new study must all nest under one parent. The worker that
    created the study (`created`, see `tlsan.tuning.study.create_or_open_study`) creates the
    parent; the others wait up to `wait_s` for the study to name it. Past that (a study
    created by an older version, or whose creator died first) a worker creates one itself,
    then keeps whichever parent the study names once it has written its own, deleting its
    run if another worker's won."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    run_id = study.user_attrs.get(MLFLOW_PARENT_ATTR)
    if run_id is None and not created:
        run_id = _wait_for_parent(study, wait_s)
    if isinstance(run_id, str) and run_id:  # "": created without MLflow, no parent yet
        try:
            run = mlflow_client.get_run(run_id)
        except MlflowException:
            run = None  # the study moved to another tracking store: start a new parent
        if run is not None:
            if run.info.status != "RUNNING":
                mlflow_client.update_run(run_id, status="RUNNING")
            return run_id
    run = mlflow_client.create_run(
        experiment_id(mlflow_client),
        run_name=f"tune {study.study_name}",
        tags={STUDY_TAG: study.study_name, "optuna.storage": storage_url, "kind": "tuning"},
    )
    run_id = run.info.run_id
    for key, value in params.items():
        mlflow_client.log_param(run_id, key, str(value))
    study.set_user_attr(MLFLOW_PARENT_ATTR, run_id)
    if created:
        return run_id
    named = _named_parent(study)
    if named is not None and named != run_id:  # another late joiner's parent won
        mlflow_client.delete_run(run_id)
        return named
    return run_id


def _named_parent(study: optuna.Study) -> str | None:
    """The parent run the storage names now (a fresh read, not the study's cached attrs)."""
    import optuna

    fresh = optuna.load_study(study_name=study.study_name, storage=study._storage)
    value = fresh.user_attrs.get(MLFLOW_PARENT_ATTR)
    return value if isinstance(value, str) else None


def _wait_for_parent(study: optuna.Study, wait_s: float, poll_s: float = 0.5) -> str | None:
    """The parent the study's creator is about to name, or None after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        named = _named_parent(study)
        if named is not None:
            return named
        time.sleep(poll_s)
    return None


def tag_trial(run_id: str, state: str, value: float | None, metric: str) -> None:
    """Mark a finished trial run COMPLETE / PRUNED / FAIL with its objective value."""
    mlflow_client = client()
    mlflow_client.set_tag(run_id, STATE_TAG, state)
    if value is not None:
        mlflow_client.log_metric(run_id, f"objective/{metric_key(metric)}", float(value))


def finish_parent(
    run_id: str,
    study: optuna.Study,
    best: FrozenTrial | None,
    metric: str,
    artifacts: list[Path],
    *,
    status: str,
) -> None:
    """Best value and parameters, trial counts, plots and best config on the parent run."""
    from optuna.trial import TrialState

    mlflow_client = client()
    counts: dict[str, float] = {}
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        counts[f"trials_{state.name.lower()}"] = float(
            len(study.get_trials(deepcopy=False, states=(state,)))
        )
    for key, value in counts.items():
        mlflow_client.log_metric(run_id, key, value)
    if best is not None:
        mlflow_client.log_metric(run_id, f"best/{metric_key(metric)}", float(best.value))
        mlflow_client.set_tag(run_id, "best_trial", str(best.number))
        mlflow_client.set_tag(run_id, "best_params", json.dumps(best.params, sort_keys=True))
    for path in artifacts:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="study")
    mlflow_client.set_terminated(run_id, status=status)
