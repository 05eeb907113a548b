"""MLflow tracking for training runs (imported lazily: `--no-mlflow` never pays for MLflow).

- Tracking URI: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlruns/mlflow.db` relative to the
  working directory (mlruns/ is created).
- A new experiment keeps its artifacts beside a SQLite store (`<db dir>/artifacts`, so
  `mlruns/artifacts` by default) instead of MLflow's default of ./mlruns or ./mlartifacts.
- One run per training: params (the flat config, vocabulary sizes), per-epoch metrics
  (step = epoch), final `valid/...` and `test/...` metrics, the run dir's files as artifacts
  under `run/`, tag `dataset_hash`, and a registered model version whose source is that
  artifact folder (a plain directory: no MLmodel flavour, no pickle).
- Nested runs: when a run is already active (a tuning study's parent run) or a `parent_run_id`
  is given (a worker process), the training run is created as its child.
- MLflow metric names cannot contain '@': `hr@10` is logged as `hr_at_10`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "tlsan"
DEFAULT_MODEL_NAME = "tlsan"
ARTIFACT_PATH = "run"


def tracking_uri() -> str:
    """The tracking URI in effect; creates the directory of a local SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative to the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_location(uri: str) -> str | None:
    """Where a new experiment stores artifacts: beside a SQLite store, else MLflow's choice."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "artifacts").as_uri()


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (`ndcg@10` -> `ndcg_at_10`)."""
    return name.replace("@", "_at_")


@dataclass
class TrackingOptions:
    """How `fit` talks to MLflow."""

    enabled: bool = True
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    registered_model_name: str | None = DEFAULT_MODEL_NAME  # None: do not register
    parent_run_id: str | None = None
    tags: dict[str, str] | None = None


class Tracker:
    """One MLflow run for one training; every method is a no-op when disabled."""

    def __init__(self, options: TrackingOptions) -> None:
        self.options = options
        self.run_id: str | None = None
        self.model_version: str | None = None
        self._mlflow: Any = None
        self._started_here = False

    @property
    def enabled(self) -> bool:
        return self.options.enabled

    def start(
        self, params: dict[str, Any], tags: dict[str, str], resume_run_id: str | None
    ) -> str | None:
        """Start (or, on resume, reopen) the run; returns its id."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow import MlflowClient

        self._mlflow = mlflow
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        parent = mlflow.active_run()
        parent_id = parent.info.run_id if parent is not None else self.options.parent_run_id
        if parent_id is not None:
            experiment_id = client.get_run(parent_id).info.experiment_id
        else:
            experiment = client.get_experiment_by_name(self.options.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    self.options.experiment, artifact_location=artifact_location(uri)
                )
            )
        if resume_run_id is not None:
            try:
                client.get_run(resume_run_id)
            except Exception:  # the run is gone (another tracking store): start afresh
                resume_run_id = None
        run = mlflow.start_run(
            run_id=resume_run_id,
            experiment_id=None if resume_run_id else experiment_id,
            run_name=None if resume_run_id else self.options.run_name,
            nested=parent is not None,
            parent_run_id=None if parent is not None or resume_run_id else parent_id,
            tags={**tags, **(self.options.tags or {})},
        )
        self._started_here = True
        self.run_id = run.info.run_id
        if resume_run_id is None:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        return self.run_id

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        if self.enabled and self.run_id is not None:
            self._mlflow.log_metrics(
                {metric_key(k): float(v) for k, v in values.items()}, step=epoch
            )

    def finish(
        self,
        valid: dict[str, float],
        test: dict[str, float] | None,
        run_dir: Path,
        files: list[str],
    ) -> str | None:
        """Final metrics, the run dir's files as artifacts, a registered model version."""
        if not self.enabled or self.run_id is None:
            return None
        mlflow = self._mlflow
        final = {f"valid/{metric_key(k)}": v for k, v in valid.items()}
        if test is not None:
            final.update({f"test/{metric_key(k)}": v for k, v in test.items()})
        mlflow.log_metrics(final)
        for name in files:
            mlflow.log_artifact(str(Path(run_dir) / name), artifact_path=ARTIFACT_PATH)
        name = self.options.registered_model_name
        if name:
            self.model_version = register_run(self.run_id, name)
        self.end("FINISHED")
        return self.model_version

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (FAILED / KILLED when training did not finish)."""
        if self.enabled and self._started_here:
            self._mlflow.end_run(status=status)
            self._started_here = False


def register_run(run_id: str, name: str) -> str:
    """Register the run's `run/` artifact folder as a new version of model `name`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags={"kind": "run"}
    )
    return str(version.version)
