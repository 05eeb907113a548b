"""Training: learning, determinism, resume, early stopping, pruning, run dir, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.errors import DataValidationError
from tests.tiny_data import synthetic_dataset
from tlsan.config import preset
from tlsan.data import Dataset, concat_splits, load_dataset
from tlsan.errors import ConfigError, RunError
from tlsan.evaluate import evaluate_model
from tlsan.metrics import metric_names
from tlsan.run_dir import load_run
from tlsan.train import evaluate_split, fit, make_optimizer, new_model, train_epoch

FAST = {"batch_size": 128, "negatives": 4, "eval_batch_size": 512}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(synthetic_dataset(tmp_path_factory.mktemp("synthetic")))


def small(kind: str = "tlsan", **values: object):
    base = preset("default", kind).override(d_item=16, d_cat=16, heads=4, **FAST)
    return base.override(**values)


def test_loading_builds_seen_sets_and_negatives_stay_outside_them(synthetic: Dataset) -> None:
    train = synthetic.train
    assert train.arrays.long_items.shape[1] == 20  # max_long of the prepared dataset
    rows = torch.arange(len(train))
    negatives = train.sample_negatives(rows, 6, torch.Generator().manual_seed(0))
    assert not bool(train.seen_mask(rows, negatives).any())
    assert not bool((negatives == train.arrays.target.unsqueeze(1)).any())
    assert int(negatives.min()) >= 1 and int(negatives.max()) < synthetic.sizes.items
    # every long-term and short-term item of an example is in its seen set
    inputs = torch.cat([train.arrays.long_items, train.arrays.short_items], 1)
    present = inputs > 0
    assert bool(train.seen_mask(rows, inputs)[present].all())
    both = concat_splits("both", [train, synthetic.valid])
    assert len(both) == len(train) + len(synthetic.valid)
    last = torch.tensor([len(both) - 1])
    valid_last = torch.tensor([len(synthetic.valid) - 1])
    items = torch.arange(1, synthetic.sizes.items).unsqueeze(0)
    assert torch.equal(both.seen_mask(last, items), synthetic.valid.seen_mask(valid_last, items))


def test_not_a_prepared_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no manifest.json"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataValidationError, match="not valid JSON"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_sizes": {"users": 3}}))
    with pytest.raises(DataValidationError, match="format_version None, expected 2"):
        load_dataset(tmp_path)
    manifest = {"format_version": 2, "vocab_sizes": {"users": 3}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataValidationError, match="vocab_sizes"):
        load_dataset(tmp_path)


def test_a_short_run_beats_random_clearly(synthetic: Dataset, tmp_path: Path) -> None:
    # a random ranking: a popularity model whose scores are noise
    shuffled = new_model(small("pop"), synthetic)
    shuffled.b.data = torch.rand(synthetic.sizes.items, generator=torch.Generator().manual_seed(0))
    chance = evaluate_split(shuffled, synthetic, "test").metrics
    untrained = fit(small(epochs=0), synthetic, tmp_path / "init", mlflow=False, progress=False)
    trained = fit(small(epochs=6), synthetic, tmp_path / "run", mlflow=False, progress=False)
    assert trained.test is not None and untrained.test is not None
    assert abs(chance["auc"] - 0.5) < 0.05
    assert trained.test["auc"] > 0.8 and trained.test["auc"] > untrained.test["auc"] + 0.05
    assert trained.test["ndcg@10"] > 3 * chance["ndcg@10"]
    assert trained.test["ndcg@10"] > untrained.test["ndcg@10"]
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]
    # the run dir: weights, resolved config, metrics with exactly the documented keys
    run = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "metrics.json", "history.json", "curves.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["vocab_sizes"] == synthetic.sizes.to_dict()
    assert config["dataset_hash"] == synthetic.dataset_hash and config["model_kind"] == "tlsan"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    assert list(metrics["test"]) == metric_names((5, 10, 20, 50))
    assert metrics["valid"]["ndcg@10"] == max(h["ndcg@10"] for h in trained.history)
    loaded = load_run(run, synthetic)
    assert evaluate_split(loaded.model, synthetic, "test").metrics == trained.test


def test_seeded_runs_are_identical(synthetic: Dataset, tmp_path: Path) -> None:
    a = fit(small(epochs=2, seed=3), synthetic, tmp_path / "a", mlflow=False, progress=False)
    b = fit(small(epochs=2, seed=3), synthetic, tmp_path / "b", mlflow=False, progress=False)
    c = fit(small(epochs=2, seed=4), synthetic, tmp_path / "c", mlflow=False, progress=False)
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    assert a.test == b.test and [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.history[0]["loss"] != c.history[0]["loss"]


def test_resume_continues_exactly(synthetic: Dataset, tmp_path: Path) -> None:
    config = small(epochs=3, seed=5, dropout=0.1)
    straight = fit(config, synthetic, tmp_path / "straight", mlflow=False, progress=False)
    fit(config.override(epochs=2), synthetic, tmp_path / "resumed", mlflow=False, progress=False)
    with pytest.raises(RunError, match="already exists"):
        fit(config, synthetic, tmp_path / "resumed", mlflow=False, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        fit(config.override(lr=0.1), synthetic, tmp_path / "resumed", resume=True, mlflow=False)
    resumed = fit(
        config, synthetic, tmp_path / "resumed", resume=True, mlflow=False, progress=False
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.test == straight.test and resumed.best_epoch == straight.best_epoch


def test_early_stopping_and_pruning(synthetic: Dataset, tmp_path: Path) -> None:
    import optuna

    # lr so small nothing improves after the first epoch: patience 1 stops at epoch 2
    stalled = small(epochs=6, patience=1, lr=1e-9, select_metric="auc")
    result = fit(stalled, synthetic, tmp_path / "stop", mlflow=False, progress=False)
    assert result.stopped_early and len(result.history) <= 3 and result.best_epoch >= 1
    seen: list[tuple[int, float]] = []

    def prune(epoch: int, metrics: dict[str, float]) -> None:
        seen.append((epoch, metrics["ndcg@10"]))
        if epoch == 2:
            raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        fit(
            small(epochs=5),
            synthetic,
            tmp_path / "pruned",
            on_epoch=prune,
            mlflow=False,
            progress=False,
        )
    assert [epoch for epoch, _ in seen] == [1, 2]
    for name in ("model.safetensors", "metrics.json", "config.json"):
        assert not (tmp_path / "pruned" / name).exists()


def test_baselines_train_in_the_same_harness(synthetic: Dataset, tmp_path: Path) -> None:
    pop = fit(small("pop"), synthetic, tmp_path / "pop", mlflow=False, progress=False)
    assert pop.best_epoch == 0 and pop.test is not None and pop.test["auc"] > 0.7
    sasrec = fit(
        small("sasrec", epochs=2, heads=2, max_len=10),
        synthetic,
        tmp_path / "sasrec",
        mlflow=False,
        progress=False,
    )
    # seeded, so the same on every run: far above chance (0.5) and above popularity
    assert sasrec.test is not None and sasrec.test["auc"] > 0.85
    assert sasrec.test["ndcg@10"] > 1.2 * pop.test["ndcg@10"]
    assert load_run(tmp_path / "pop", synthetic).model.b.sum().item() > 0


def test_pop_chooses_its_half_life_on_validation_unless_given_one(synthetic: Dataset) -> None:
    from dataclasses import replace

    from tlsan.popularity import HALF_LIFE_GRID, half_life_label

    chosen = new_model(small("pop", select_metric="mrr"), synthetic)
    assert list(chosen.selection) == [half_life_label(h) for h in HALF_LIFE_GRID]
    best = max(chosen.selection, key=chosen.selection.__getitem__)  # the first of equals
    assert half_life_label(chosen.half_life_days) == best
    # the candidates' scores are the evaluator's validation mrr of pop at each half-life
    fixed = new_model(small("pop", pop_half_life_days=30.0), synthetic)
    assert fixed.selection == {} and fixed.half_life_days == 30.0
    valid = evaluate_model(fixed, synthetic.valid).metrics["mrr"]
    assert chosen.selection["30 days"] == pytest.approx(valid)
    assert fixed.popularity_summary() == {
        "half_life_days": 30.0, "chosen_on_validation": False, "validation": {}
    }  # fmt: skip
    # no validation split to choose on: a clear error naming the field
    without_valid = replace(synthetic, splits={"train": synthetic.train})
    with pytest.raises(ConfigError, match="pop_half_life_days"):
        new_model(small("pop"), without_valid)


def test_train_epoch_on_a_subset_of_rows(synthetic: Dataset) -> None:
    config = small()
    model = new_model(config, synthetic)
    optimizer = make_optimizer(model, config)
    assert optimizer is not None
    rows = torch.arange(0, len(synthetic.train), 7)
    stats = train_epoch(model, optimizer, synthetic.train, config, torch.Generator(), rows=rows)
    assert stats.examples == rows.numel() and stats.steps == -(-rows.numel() // config.batch_size)
    sub = synthetic.subset("train", rows[:5])
    assert len(sub) == 5 and torch.equal(sub.arrays.target, synthetic.train.arrays.target[rows[:5]])


@pytest.mark.slow
def test_mlflow_run_and_registered_version(synthetic: Dataset, tmp_path: Path, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = fit(small(epochs=2), synthetic, tmp_path / "run", progress=False)
    assert result.mlflow_run_id is not None and result.model_version == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["dataset_hash"] == synthetic.dataset_hash
    assert run.data.params["lr"] == str(result.config.lr) and run.data.params["model"] == "tlsan"
    assert run.data.metrics["test/ndcg_at_10"] == pytest.approx(result.test["ndcg@10"])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "ndcg_at_10")]
    assert steps == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/model.safetensors", "run/config.json", "run/metrics.json"} <= artifacts
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    version = client.get_model_version("tlsan", "1")
    assert version.run_id == run.info.run_id
    # nested under an active parent run (how a tuning study calls fit)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(run_name="study") as parent:
        child = fit(small(epochs=1), synthetic, tmp_path / "child", progress=False)
    child_run = client.get_run(child.mlflow_run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.model_version == "2"


def test_session_fold_moves_the_session_into_long_term_history() -> None:
    from tlsan.data import Batch, fold_sessions

    batch = Batch(
        user=torch.tensor([1, 2]),
        long_items=torch.tensor([[0, 5, 6], [0, 0, 7]]),
        long_tau=torch.tensor([[0.0, 0.25, 0.5], [0.0, 0.0, 0.5]]),
        short_items=torch.tensor([[0, 8], [3, 4]]),
        user_category=torch.tensor([1, 1]),
        target=torch.tensor([9, 9]),
    )
    folded = fold_sessions(batch, torch.tensor([False, True]))
    assert folded.long_items.tolist() == [[0, 5, 6], [7, 3, 4]]  # last L of [long ; session]
    assert folded.long_tau.tolist() == [[0.0, 0.25, 0.5], [0.5, 1.0, 1.0]]
    assert folded.short_items.tolist() == [[0, 8], [0, 0]]
    assert fold_sessions(batch, torch.tensor([False, False])) is batch
