"""`tlsan train` / `evaluate` / `compare` end to end, and the one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.tiny_data import synthetic_dataset
from tlsan.cli import main
from tlsan.metrics import metric_names

SMALL = ["--d-item", "16", "--d-cat", "16", "--heads", "4", "--batch-size", "128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("cli-data"))


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-runs")
    common = ["--data", str(data), "--no-mlflow", "--quiet"]
    assert main(["train", *common, "--out", str(root / "tlsan"), "--epochs", "3", *SMALL]) == 0
    assert main(["train", *common, "--out", str(root / "pop"), "--model", "pop"]) == 0
    return {"tlsan": root / "tlsan", "pop": root / "pop"}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_train_writes_a_complete_run_dir(runs: dict[str, Path], data: Path) -> None:
    run = runs["tlsan"]
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"]["d_item"] == 16 and config["config"]["batch_size"] == 128
    assert config["config"]["optimizer"] == "adam"  # the default preset fills the rest
    manifest = json.loads((data / "manifest.json").read_text())
    assert config["dataset_hash"] == manifest["dataset_hash"]
    assert config["vocab_sizes"] == manifest["vocab_sizes"]
    history = json.loads((run / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_json_table_and_per_user(
    runs: dict[str, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, rows = tmp_path / "m.json", tmp_path / "rows.csv"
    args = ["evaluate", "--run", str(runs["tlsan"]), "--data", str(data)]
    status, out, _ = run_cli([*args, "--json", str(out_json), "--per-user", str(rows)], capsys)
    assert status == 0 and "ndcg@10" in out and "paper_auc" in out
    metrics = json.loads(out_json.read_text())
    assert list(metrics) == metric_names((5, 10, 20, 50))
    trained = json.loads((runs["tlsan"] / "metrics.json").read_text())["test"]
    assert metrics == pytest.approx(trained)  # the same evaluator as training's test pass
    frame = pl.read_csv(rows)
    assert frame.height == trained_examples(data, "test")
    assert frame.get_column("ndcg@10").mean() == pytest.approx(metrics["ndcg@10"])
    custom = tmp_path / "k.json"
    status, _, _ = run_cli(
        [*args, "--split", "valid", "--ks", "1,3", "--include-history", "--json", str(custom)],
        capsys,
    )
    assert status == 0 and list(json.loads(custom.read_text())) == metric_names((1, 3))


def test_per_user_top_items_are_the_ranking_behind_the_metrics(
    runs: dict[str, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "--run", str(runs["tlsan"]), "--data", str(data), "--top", "10"]
    parquet, csv, everything = (tmp_path / n for n in ("a.parquet", "a.csv", "b.parquet"))
    for extra in (["--per-user", str(parquet)], ["--per-user", str(csv)]):
        assert run_cli([*args, *extra], capsys)[0] == 0
    everything_args = ["--per-user", str(everything), "--include-history"]
    assert run_cli([*args, *everything_args], capsys)[0] == 0

    def top_and_hits(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frame = pl.read_parquet(path)
        top = np.array(frame.get_column("top_items").to_list())
        hit = (top == frame.get_column("target").to_numpy()[:, None]).any(1)
        return top, hit, frame.get_column("rank").to_numpy() < 10

    top, hit, ranked = top_and_hits(everything)
    assert top.shape == (len(hit), 10) and (top > 0).all()
    assert all(len(set(row)) == 10 for row in top.tolist())  # no item twice
    assert (hit == ranked).all() and hit.any()  # the top 10 is the ranking behind hr@10
    top, hit, ranked = top_and_hits(parquet)
    assert (top > 0).all() and hit.any()
    assert not (hit & ~ranked).any()  # a seen target is ranked but never shown
    as_csv = pl.read_csv(csv).get_column("top_items").str.split(" ").cast(pl.List(pl.Int64))
    assert as_csv.to_list() == top.tolist()
    status, _, err = run_cli([*args[:-2], "--top", "5"], capsys)  # --top without --per-user
    assert status == 2 and "--top" in err and "--per-user" in err


def trained_examples(data: Path, split: str) -> int:
    return pl.read_parquet(data / "examples" / f"{split}.parquet").height


def test_compare_marks_the_run_validation_prefers_and_bootstraps_it_against_the_others(
    runs: dict[str, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp.json"
    args = ["compare", str(runs["pop"]), str(runs["tlsan"]), str(runs["pop"]), "--data", str(data)]
    status, text, _ = run_cli([*args, "--json", str(out)], capsys)
    assert status == 0 and "CI" in text and "validation prefers" in text
    result = json.loads(out.read_text())
    metrics = {name: json.loads((runs[name] / "metrics.json").read_text()) for name in runs}
    # each run's kind, recipe and validation score (the same evaluator as training's)
    kinds = [row["kind"] for row in result["runs"]]
    assert kinds == ["pop", "tlsan", "pop"]
    for row in result["runs"]:
        assert row["valid"] == pytest.approx(metrics[row["kind"]]["valid"]["ndcg@10"])
        assert row["test"] == pytest.approx(metrics[row["kind"]]["test"]["ndcg@10"])
    assert result["runs"][1]["recipe"].startswith("default; loss ce; changed:")
    assert result["runs"][0]["recipe"] == "default"
    # the preferred run is the best on validation (the first of equals); test never chooses
    valid = [row["valid"] for row in result["runs"]]
    preferred = valid.index(max(valid))
    assert result["preferred"] == result["runs"][preferred]["run"]
    assert len(result["comparisons"]) == 2
    for comparison in result["comparisons"]:
        assert comparison["run_a"] == result["preferred"]
        a = metrics[result["runs"][preferred]["kind"]]["test"]["ndcg@10"]
        b = next(r for r in result["runs"] if r["run"] == comparison["run_b"])["test"]
        assert comparison["diff"] == pytest.approx(a - b)
        assert comparison["low"] <= comparison["diff"] <= comparison["high"]
        assert comparison["n"] > 0
    status, _, err = run_cli(["compare", str(runs["pop"]), "--data", str(data)], capsys)
    one_line_error(status, err, "two or more run dirs")


def broken_copy(run: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


def one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_run_dirs_give_one_clear_line(
    runs: dict[str, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def evaluate(run: Path, data_dir: Path = data) -> tuple[int, str, str]:
        return run_cli(["evaluate", "--run", str(run), "--data", str(data_dir)], capsys)

    corrupt = broken_copy(runs["tlsan"], tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    one_line_error(*evaluate(corrupt)[::2], "model.safetensors", "corrupt")

    for name, what in (("model.safetensors", "model weights"), ("config.json", "run config")):
        missing = broken_copy(runs["tlsan"], tmp_path, f"missing-{name}")
        (missing / name).unlink()
        one_line_error(*evaluate(missing)[::2], name, f"missing {what}")

    unknown = broken_copy(runs["tlsan"], tmp_path, "unknown-kind")
    config = json.loads((unknown / "config.json").read_text())
    config["config"]["model"]["kind"] = "gru4rec"
    (unknown / "config.json").write_text(json.dumps(config))
    one_line_error(*evaluate(unknown)[::2], "model.kind", "gru4rec")

    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["dataset_hash"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(*evaluate(runs["tlsan"], other)[::2], "trained on dataset", "0123456789abcdef")

    one_line_error(*evaluate(runs["tlsan"], tmp_path)[::2], "manifest.json")
    status, _, err = run_cli(
        ["compare", str(runs["tlsan"]), str(corrupt), "--data", str(data)], capsys
    )
    one_line_error(status, err, "corrupt")


def test_bad_flags_and_config_files(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\n")
    base = ["train", "--data", str(data), "--no-mlflow", "--quiet"]
    one_line_error(
        *run_cli([*base, "--out", str(tmp_path / "r1"), "--config", str(bad)], capsys)[::2],
        "train.lr",
    )
    one_line_error(
        *run_cli([*base, "--out", str(tmp_path / "r2"), "--heads", "5"], capsys)[::2], "model.heads"
    )
    one_line_error(
        *run_cli(["evaluate", "--run", str(tmp_path), "--data", str(data), "--ks", "0"], capsys)[
            ::2
        ],
        "--ks",
    )
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_digital_music_end_to_end(
    prepared_amazon: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = prepared_amazon("Digital_Music")
    run = tmp_path / "paper"
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "paper", "--epochs", "1"]
    assert main([*args, "--no-mlflow", "--quiet"]) == 0
    out = tmp_path / "m.json"
    status, _, _ = run_cli(
        ["evaluate", "--run", str(run), "--data", str(data), "--json", str(out)], capsys
    )
    metrics = json.loads(out.read_text())
    assert status == 0 and 0.6 < metrics["auc"] < 1.0 and 0.6 < metrics["paper_auc"] < 1.0
    history = json.loads((run / "history.json").read_text())
    assert history["epochs"][0]["examples_per_s"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["vocab_sizes"] == {"users": 1660, "items": 1584, "categories": 54}
