"""`--protocol reference` in training: refused on leak-free data (and leak-free training on
reference data), evaluates the test split every N steps, keeps the best, and says `leaky`
in metrics.json, the printed table and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_leakage import _prepare
from tlsan.cli import main
from tlsan.config import preset
from tlsan.data import load_dataset
from tlsan.reference_protocol import fit_reference
from tlsan.tracking import TrackingOptions


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("protocols")
    name = "Clothing_Shoes_and_Jewelry"
    return {
        "reference": _prepare(name, root / "reference", protocol="reference"),
        "leak-free": _prepare(name, root / "leak-free"),
    }


def test_each_protocol_trains_only_its_own_data(datasets, tmp_path: Path, capsys) -> None:
    base = ["train", "--preset", "paper", "--epochs", "1", "--no-mlflow", "--quiet"]
    cases = (
        (datasets["reference"], [], "prepared with --protocol reference"),
        (datasets["leak-free"], ["--protocol", "reference"], "needs a dataset written by"),
    )
    for number, (data, extra, message) in enumerate(cases):
        out = tmp_path / f"run{number}"
        assert main([*base, "--data", str(data), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
        assert not out.exists() or not any(out.iterdir())


def test_reference_run_tracks_the_best_test_evaluation(datasets, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dataset = load_dataset(datasets["reference"])
    config = preset("paper").override(protocol="reference", epochs=2)
    run = tmp_path / "run"
    run.mkdir()
    tracking = TrackingOptions(experiment="reference-test", registered_model_name=None)
    result = fit_reference(config, dataset, run, tracking=tracking, progress=False, eval_every=100)
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    steps = [e["step"] for e in history["evaluations"]]
    per_epoch = -(-len(dataset.train) // config.batch_size)
    assert steps == [*range(100, 2 * per_epoch + 1, 100), 2 * per_epoch]
    assert metrics["leaky"] is True and metrics["protocol"] == "reference"
    assert metrics["valid"] is None
    best = max(history["evaluations"], key=lambda e: e["paper_auc"])
    assert metrics["best_step"] == best["step"]
    assert metrics["test"]["paper_auc"] == best["paper_auc"]
    assert metrics["test_final"]["paper_auc"] == history["evaluations"][-1]["paper_auc"]
    assert result.metrics == metrics
    from mlflow import MlflowClient

    client = MlflowClient()
    mlflow_run = client.get_run(result.mlflow_run_id)
    assert mlflow_run.data.tags["leaky"] == "true"
    assert mlflow_run.data.tags["protocol"] == "reference"
    assert mlflow_run.data.metrics["test/best_paper_auc"] == best["paper_auc"]


def test_cli_table_says_leaky(datasets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["train", "--data", str(datasets["reference"]), "--out", str(out), "--no-mlflow"]
    assert main([*argv, "--preset", "paper", "--epochs", "1", "--protocol", "reference"]) == 0
    shown = capsys.readouterr().out
    assert "LEAKY" in shown and "paper_auc" in shown
    assert json.loads((out / "metrics.json").read_text())["leaky"] is True
