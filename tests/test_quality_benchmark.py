"""benchmarks/quality.py end to end on a tiny synthetic log: one Optuna trial per sequence
model, one epoch, a leave-one-out split and the RecBole-protocol row, as a subprocess.

Checks the report's structure and the invariants the script computes (not training outcomes):
the best baseline is the validation argmax over the baselines, the served model the validation
argmax over all kinds, the bootstrap interval brackets its mean, the ratio is tlsan / baseline,
the pass key is decided on validation, the tuned runs are trials of their own study, and the
JSON written to --out is the one printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("quality")
    subprocess.run(
        [sys.executable, "-m", "tlsan", "generate", "--users", "120", "--items", "100"]
        + ["--events", "3000", "--days", "60", "--out", str(tmp / "src" / "synth"), "--quiet"],
        check=True,
        cwd=ROOT,
    )
    out = tmp / "report.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--source", str(tmp / "src")]
        + ["--datasets", "synth", "--splits", "leave-one-out", "--models", "tlsan,sasrec,pop"]
        + ["--work", str(tmp / "work"), "--trials", "1", "--epochs", "1", "--resamples", "200"]
        + ["--recbole-dataset", "synth", "--recbole-models", "tlsan", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), out.read_text(), tmp


def test_report_structure_and_budget(report: tuple[dict, str, Path]) -> None:
    data, written, _ = report
    assert json.loads(written) == data
    budget = data["budget"]
    assert budget["trials"] == 1 and budget["pruner"] == "percentile"
    assert budget["spaces"]["sasrec"] == "tlsan/sasrec_space.yaml"
    [cell] = data["cells"]
    assert (cell["dataset"], cell["split"], cell["include_history"]) == (
        "synth",
        "leave-one-out",
        False,
    )
    assert set(cell["models"]) == {"tlsan", "sasrec", "pop"}
    for kind, model in cell["models"].items():
        assert set(model["valid"]) == {"ndcg@10", "hr@10"}
        assert set(model["test"]) == {"ndcg@10", "hr@10", "mrr", "auc"}
        assert 0.0 <= model["test"]["ndcg@10"] <= model["test"]["hr@10"] <= 1.0
        assert model["train_wall_seconds"] >= model["train_seconds"] >= 0.0
        assert model["train_seconds_to_best"] <= model["train_seconds"] + 1e-9
        if kind == "pop":  # half-life chosen on validation by pop itself: no study
            assert model["trials"] == 0 and "popularity" in model
        else:
            assert model["trials"] == 1 and model["trials_completed"] == 1
            assert Path(model["run_dir"]).name == model["best_trial"] == "trial_0000"
            assert f"tune-{kind}" in model["run_dir"]
            assert model["tune_wall_seconds"] > 0.0
            assert model["best_epoch"] == model["epochs_trained"] == 1


def test_choices_are_validation_argmaxes(report: tuple[dict, str, Path]) -> None:
    data, _, _ = report
    [cell] = data["cells"]
    models = cell["models"]
    baselines = [k for k in ("sasrec", "tisasrec", "pop") if k in models]
    best_valid = max(models[k]["valid"]["ndcg@10"] for k in baselines)
    assert models[cell["best_baseline"]]["valid"]["ndcg@10"] == best_valid
    assert cell["best_baseline"] in baselines
    served_valid = max(m["valid"]["ndcg@10"] for m in models.values())
    assert models[cell["served"]]["valid"]["ndcg@10"] == served_valid
    tlsan_valid = models["tlsan"]["valid"]["ndcg@10"]
    assert cell["tlsan_valid_at_or_above_best_baseline"] == (tlsan_valid >= best_valid)
    assert data["pass"]["tlsan_valid_at_or_above_best_baseline"] == {
        "synth/leave-one-out": cell["tlsan_valid_at_or_above_best_baseline"]
    }
    assert data["pass"]["decided_on"] == "valid ndcg@10"


def test_bootstrap_and_ratio(report: tuple[dict, str, Path]) -> None:
    data, _, _ = report
    [cell] = data["cells"]
    boot = cell["test_bootstrap_tlsan_minus_best_baseline"]
    tlsan = cell["models"]["tlsan"]["test"]["ndcg@10"]
    base = cell["models"][cell["best_baseline"]]["test"]["ndcg@10"]
    assert boot["n"] == cell["test_users"] and boot["resamples"] == 200
    assert boot["mean_a"] == pytest.approx(tlsan) and boot["mean_b"] == pytest.approx(base)
    assert boot["diff"] == pytest.approx(tlsan - base)
    assert boot["low"] <= boot["diff"] <= boot["high"]
    if base > 0:
        assert cell["test_ratio_tlsan_to_best_baseline"] == pytest.approx(tlsan / base)


def test_recbole_row(report: tuple[dict, str, Path]) -> None:
    data, _, _ = report
    row = data["recbole_protocol"]
    assert row["include_history"] is True and row["split"] == "leave-one-out"
    assert row["target_ndcg@10"] == pytest.approx(1.1 * 0.0719)
    assert row["time_limit_seconds"] == pytest.approx(76.4)
    [(kind, model)] = row["models"].items()
    assert kind == "tlsan" and model["trials"] == 0
    assert model["checkpoint_within_time_limit"] == (model["train_seconds_to_best"] <= 76.4)
    config = json.loads((Path(model["run_dir"]) / "config.json").read_text())
    assert config["config"]["include_history"] is True
    assert data["pass"]["recbole_checkpoint_within_time_limit"] == {
        "tlsan": model["checkpoint_within_time_limit"]
    }


def test_rerun_reuses_finished_runs(report: tuple[dict, str, Path]) -> None:
    """A second invocation on the same --work trains nothing and reports the same figures."""
    data, _, tmp = report
    done = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--source", str(tmp / "src")]
        + ["--datasets", "synth", "--splits", "leave-one-out", "--models", "tlsan,sasrec,pop"]
        + ["--work", str(tmp / "work"), "--trials", "1", "--epochs", "1", "--resamples", "200"]
        + ["--recbole-models", ""],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(done.stdout)
    [cell], [before] = again["cells"], data["cells"]
    assert all(m["reused"] for m in cell["models"].values())
    for kind, model in cell["models"].items():
        assert model["test"] == before["models"][kind]["test"]
    assert "recbole_protocol" not in again
