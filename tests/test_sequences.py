"""(Ti)SASRec trained as the field trains them: sequence windows, all-position losses, time
intervals, the new losses, and the config errors around them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from pipelines.config import PrepareConfig, SessionRule
from pipelines.errors import DataValidationError
from pipelines.prepare import prepare_dataset
from pipelines.synthetic import generate_log
from tests.tiny_data import synthetic_dataset
from tlsan.cli import main
from tlsan.config import ModelConfig, TrainConfig, preset
from tlsan.data import Batch, Dataset, Split, VocabSizes, load_dataset
from tlsan.models import build_model
from tlsan.sequences import sequence_windows, training_batches, window_batch
from tlsan.train import evaluate_split, fit, new_model

SMALL = {"d_item": 16, "d_cat": 16, "heads": 2, "max_len": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def loo(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(synthetic_dataset(tmp_path_factory.mktemp("loo")))


@pytest.fixture(scope="module")
def last_session(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("last-session")
    generate_log(root / "log", users=120, items=60, events=3000, seed=2, fmt="parquet")
    config = PrepareConfig(
        interactions=root / "log" / "interactions.parquet",
        items=root / "log" / "items.parquet",
        split="last-session",
        session=SessionRule.parse("gap:30m"),
        max_long=20,
        max_short=0,
    )
    return load_dataset(prepare_dataset(config, root / "prepared", progress=False).path)


def _train_targets(split: Split) -> list[tuple[int, int]]:
    assert split.arrays.target_pos is not None
    return sorted(zip(split.arrays.user.tolist(), split.arrays.target_pos.tolist(), strict=True))


def _labelled(split: Split, batches: list[Batch]) -> list[tuple[int, int]]:
    """(user, pos) of the event every labelled position predicts, found by locating each
    window's inputs (items and timestamps) in the user's events: the label must be the event
    right after the position's input."""
    history = split.history
    assert history is not None and history.times is not None
    found = []
    for batch in batches:
        assert batch.next_items is not None and batch.long_time is not None
        for b in range(len(batch)):
            user = int(batch.user[b])
            lo, hi = int(history.user_start[user]), int(history.user_start[user + 1])
            events = list(
                zip(history.items[lo:hi].tolist(), history.times[lo:hi].tolist(), strict=True)
            )
            valid = batch.long_items[b] > 0
            window = list(
                zip(
                    batch.long_items[b][valid].tolist(),
                    batch.long_time[b][valid].tolist(),
                    strict=True,
                )
            )
            starts = [o for o in range(len(events)) if events[o : o + len(window)] == window]
            assert len(starts) == 1, (user, window)
            pad = int((~valid).sum())
            for j in (batch.next_items[b] > 0).nonzero().flatten().tolist():
                pos = starts[0] + j - pad + 1
                assert events[pos][0] == int(batch.next_items[b, j])
                found.append((user, pos))
    return found


def _epoch(model_kind: str, dataset: Dataset, **values: object) -> list[Batch]:
    config = preset("default", model_kind).override(**SMALL, batch_size=16, **values)
    model = new_model(config, dataset)
    steps, batches = training_batches(
        model, dataset.train, config, torch.Generator().manual_seed(0)
    )
    out = list(batches)
    assert len(out) == steps
    return out


def test_leave_one_out_windows_train_every_position_and_every_target_once(loo: Dataset) -> None:
    batches = _epoch("sasrec", loo, loss="ce")
    positions = sum(int((b.long_items > 0).sum()) for b in batches)
    labelled = sum(int((b.next_items > 0).sum()) for b in batches if b.next_items is not None)
    # leave-one-out: every event after a user's first, up to the last training target, is a
    # training target, so every non-padding position has a label, and there are as many
    # labels in an epoch as training examples
    assert labelled == positions == len(loo.train)
    for batch in batches:
        assert batch.next_items is not None
        assert torch.equal(batch.next_items > 0, batch.long_items > 0)
        assert batch.long_items.shape[1] <= SMALL["max_len"]
    assert sorted(_labelled(loo.train, batches)) == _train_targets(loo.train)
    windows = sequence_windows(loo.train, SMALL["max_len"])
    assert windows.labels == len(loo.train)
    assert len(windows) > loo.train.arrays.user.unique().numel()  # long users give chunks
    # a subset of rows (a federated client, a distributed shard) labels exactly its targets
    rows = torch.arange(0, len(loo.train), 3)
    subset = sequence_windows(loo.train, SMALL["max_len"], rows)
    batch = window_batch(loo.train, subset, torch.arange(len(subset)), kind="ce", negatives=0)
    expected = sorted(
        zip(
            loo.train.arrays.user[rows].tolist(),
            loo.train.arrays.target_pos[rows].tolist(),
            strict=True,
        )
    )
    assert sorted(_labelled(loo.train, [batch])) == expected


def test_last_session_windows_label_only_the_splits_training_targets(
    last_session: Dataset,
) -> None:
    batches = _epoch("sasrec", last_session, loss="ce")
    labels = _labelled(last_session.train, batches)
    assert sorted(labels) == _train_targets(last_session.train)  # each exactly once
    positions = sum(int((b.long_items > 0).sum()) for b in batches)
    assert len(labels) < positions  # events inside a session are inputs, not targets
    # no window reaches a held-out target: each ends at a training target
    held_out = set(_train_targets(last_session.valid)) | set(_train_targets(last_session.test))
    assert held_out.isdisjoint(labels)


@pytest.mark.parametrize("kind", ["sasrec", "tisasrec"])
@pytest.mark.parametrize("loss", ["ce", "bce", "sampled", "softmax"])
def test_the_loss_covers_every_labelled_position_exactly(
    loo: Dataset, kind: str, loss: str
) -> None:
    """The all-position loss equals the mean over labelled positions of the same loss of
    each position's prefix scored alone: every position counts once, and no position sees
    the events after it."""
    config = preset("default", kind).override(**SMALL, loss=loss, negatives=5)
    torch.manual_seed(0)
    model = new_model(config, loo).eval()
    windows = sequence_windows(loo.train, SMALL["max_len"])
    batch = window_batch(
        loo.train,
        windows,
        torch.arange(6),
        kind=loss,
        negatives=5,
        generator=torch.Generator().manual_seed(1),
    )
    assert batch.next_items is not None and batch.long_time is not None
    cells = (batch.next_items > 0).nonzero().tolist()
    assert len(cells) == int((batch.long_items > 0).sum())
    per_position = []
    for b, j in cells:
        prefix = Batch(
            user=batch.user[b : b + 1],
            long_items=batch.long_items[b : b + 1, : j + 1],
            long_tau=batch.long_tau[b : b + 1, : j + 1],
            short_items=torch.zeros(1, 0, dtype=torch.int64),
            user_category=torch.zeros(1, dtype=torch.int64),
            target=batch.next_items[b : b + 1, j],
            long_time=batch.long_time[b : b + 1, : j + 1],
            short_time=torch.zeros(1, 0, dtype=torch.int64),
            negatives=None if batch.negatives is None else batch.negatives[b : b + 1, j],
            shared_negatives=batch.shared_negatives,
        )
        per_position.append(model.loss(prefix, loss))
    with torch.no_grad():
        together = model.loss(batch, loss)
        alone = torch.stack(per_position).mean()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_tisasrec_reads_timestamps_and_sasrec_does_not() -> None:
    sizes = VocabSizes(users=4, items=20, categories=3)
    category = torch.tensor([0] + [1 + i % 2 for i in range(19)])
    items = torch.tensor([[3, 7, 11, 5], [3, 7, 11, 5]])
    day = 86_400
    times = torch.tensor([[0, day, 2 * day, 3 * day], [0, day, 30 * day, 31 * day]]) + 10**9
    batch = Batch(
        user=torch.tensor([1, 1]),
        long_items=items,
        long_tau=torch.ones(2, 4),
        short_items=torch.zeros(2, 0, dtype=torch.int64),
        user_category=torch.tensor([1, 1]),
        target=torch.tensor([2, 2]),
        long_time=times,
        short_time=torch.zeros(2, 0, dtype=torch.int64),
    )
    for kind, differ in (("tisasrec", True), ("sasrec", False)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=kind, **SMALL), sizes, category).eval()
        with torch.no_grad():
            vectors = model.user_vectors(batch)
        assert bool((vectors[0] - vectors[1]).abs().max() > 1e-4) == differ, kind
    with pytest.raises(ValueError, match="timestamp"):
        model = build_model(ModelConfig(kind="tisasrec", **SMALL), sizes, category)
        model.user_vectors(replace(batch, long_time=None))


def test_tlsan_new_losses_train_and_sampled_masks_the_target(loo: Dataset) -> None:
    config = preset("default", "tlsan").override(d_item=16, d_cat=16, heads=4, batch_size=32)
    torch.manual_seed(0)
    model = new_model(config, loo)
    batch = loo.train.arrays.batch(torch.arange(32))
    shared = torch.cat([batch.target[:3], torch.arange(1, 9)])  # three are some rows' targets
    loss = model.loss(replace(batch, shared_negatives=shared), "sampled")
    u = model.user_state(batch)
    logits = u @ model.item_embed(torch.arange(loo.sizes.items)).T + model.b
    columns = torch.cat([batch.target.unsqueeze(1), shared.expand(32, -1)], 1)
    chosen = logits.gather(1, columns)
    chosen[:, 1:] = chosen[:, 1:].masked_fill(shared == batch.target.unsqueeze(1), -torch.inf)
    torch.testing.assert_close(loss, F.cross_entropy(chosen, torch.zeros(32, dtype=torch.long)))
    logits[:, 0] = -torch.inf
    torch.testing.assert_close(model.loss(batch, "ce"), F.cross_entropy(logits, batch.target))
    loss.backward()
    assert model.E_i.weight.grad is not None and bool(model.E_i.weight.grad.abs().sum() > 0)


def _cycle_dataset(root: Path) -> Dataset:
    """A strong, deterministic signal: item i is always followed by item i + 1 (mod 120)."""
    rows = []
    for user in range(160):
        start = (user * 37) % 120
        for step in range(12):
            rows.append((user, (start + step) % 120 + 1, 1_600_000_000 + step * 86_400 + user))
    log = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    log = log.with_columns((pl.col("item_id") % 4).alias("category"))
    log.write_csv(root / "log.csv")
    config = PrepareConfig(interactions=root / "log.csv", split="leave-one-out")
    return load_dataset(prepare_dataset(config, root / "prepared", progress=False).path)


@pytest.fixture(scope="module")
def cycle(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return _cycle_dataset(tmp_path_factory.mktemp("cycle"))


@pytest.mark.parametrize(
    ("kind", "loss"),
    [("sasrec", "ce"), ("sasrec", "sampled"), ("sasrec", "bce"), ("tisasrec", "ce")],
)
def test_a_tiny_run_beats_random_clearly(
    cycle: Dataset, kind: str, loss: str, tmp_path: Path
) -> None:
    negatives = {"ce": 1, "sampled": 64, "bce": 1}[loss]
    config = preset("default", kind).override(
        **SMALL, lr=5e-3, batch_size=32, epochs=10, patience=0, loss=loss, negatives=negatives
    )
    result = fit(config, cycle, tmp_path / "run", mlflow=False, progress=False)
    chance = new_model(preset("default", "pop"), cycle)
    chance.b.data = torch.rand(cycle.sizes.items, generator=torch.Generator().manual_seed(0))
    random = evaluate_split(chance, cycle, "valid").metrics["hr@10"]
    assert random < 0.15
    assert result.valid["hr@10"] > 0.6, result.valid  # the next item is fully determined


def test_bad_loss_or_model_kind_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = (
        (["--loss", "focal"], "train.loss", "focal"),
        (["--model", "gru4rec"], "model", "gru4rec"),
        (["--model", "sasrec", "--time-span", "0"], "model.time_span", ">= 1"),
    )
    for flags, *fragments in cases:
        argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(f in err[0] for f in fragments), err
    with pytest.raises(Exception, match="train.loss"):
        TrainConfig.from_dict({"loss": "focal"})


def test_default_loss_follows_the_catalog_size() -> None:
    from tlsan.config import CE_MAX_ITEMS

    assert preset("default", "sasrec", CE_MAX_ITEMS).loss == "ce"
    large = preset("default", "tisasrec", CE_MAX_ITEMS + 1)
    assert (large.loss, large.negatives) == ("sampled", 256)
    assert preset("paper", "sasrec").loss == "bce" and preset("paper").loss == "bce"
    assert preset("default", "tlsan", CE_MAX_ITEMS).loss == "ce"
    large_tlsan = preset("default", "tlsan", CE_MAX_ITEMS + 1)
    assert (large_tlsan.loss, large_tlsan.negatives) == ("softmax", 32)


def test_old_datasets_are_refused_clearly(loo: Dataset, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(loo.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataValidationError, match="format_version 1, expected 2.*tlsan prepare"):
        load_dataset(old)
