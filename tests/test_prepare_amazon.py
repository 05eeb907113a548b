"""`--preset paper` on the shared Amazon logs reproduces the published example counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from tests.fixtures_data import AMAZON_NAMES, amazon_paths
from tlsan.cli import main

# ../shared/data/README.md: positive training examples and test examples (one per user).
PUBLISHED = {
    "Digital_Music": (18_985, 1_659, 1_583, 53, 28_852),
    "Office_Products": (20_414, 1_720, 901, 170, 29_387),
    "Clothing_Shoes_and_Jewelry": (4_944, 2_010, 1_723, 226, 13_157),
}


@pytest.mark.parametrize("name", AMAZON_NAMES)
def test_paper_preset_reproduces_published_counts(
    prepared_amazon: Callable[[str], Path], name: str
) -> None:
    out = prepared_amazon(name)
    manifest = json.loads((out / "manifest.json").read_text())
    train_total, users, items, categories, interactions = PUBLISHED[name]
    counts = manifest["counts"]
    assert counts["paper_train_examples"] == train_total
    assert counts["test"] == users
    assert counts["valid"] == users  # every user's session before the test session
    # the transitions into the validation and test sessions are not trained on
    assert counts["train"] == train_total - counts["excluded_transitions"]
    assert users < counts["excluded_transitions"] <= 2 * users
    stats = manifest["stats"]
    assert (stats["users"], stats["items"], stats["categories"]) == (users, items, categories)
    assert stats["interactions"] == interactions
    assert manifest["vocab_sizes"] == {
        "users": users + 1,
        "items": items + 1,
        "categories": categories + 1,
    }
    for split, expected in (("train", counts["train"]), ("valid", users), ("test", users)):
        frame = pl.read_parquet(out / "examples" / f"{split}.parquet")
        assert frame.height == expected
        assert frame["user"].min() >= 1 and frame["target"].min() >= 1
        assert (frame["long_items"].list.len() >= 1).all(), "the first session seeds history"
        assert (frame["long_items"].list.len() == frame["long_tau"].list.len()).all()
    test = pl.read_parquet(out / "examples/test.parquet")
    assert test["user"].n_unique() == users


def test_cli_prepare_writes_the_documented_layout(tmp_path: Path, capsys) -> None:
    interactions, items = amazon_paths("Clothing_Shoes_and_Jewelry")
    out = tmp_path / "csj"
    status = main(
        [
            "prepare",
            "--interactions",
            str(interactions),
            "--items",
            str(items),
            "--out",
            str(out),
            "--preset",
            "paper",
        ]
    )
    assert status == 0
    shown = capsys.readouterr()
    assert "paper_train_examples" in shown.out and "4,944" in shown.out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "events.parquet",
        "examples/test.parquet",
        "examples/train.parquet",
        "examples/valid.parquet",
        "manifest.json",
        "vocab/categories.parquet",
        "vocab/items.parquet",
        "vocab/users.parquet",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["config"]["max_events_per_user"] == 90
    assert manifest["config"]["session"] == "day"
    assert manifest["inputs"]["interactions"]["sha256"]
    assert [s["step"] for s in manifest["steps"]] == ["read", "drop_duplicates", "events"]
    schema = pl.read_parquet_schema(out / "examples/train.parquet")
    assert schema == {
        "user": pl.Int32,
        "long_items": pl.List(pl.Int32),
        "long_tau": pl.List(pl.Float32),
        "long_time": pl.List(pl.Int64),
        "short_items": pl.List(pl.Int32),
        "short_time": pl.List(pl.Int64),
        "target": pl.Int32,
        "target_pos": pl.Int32,
        "user_category": pl.Int32,
        "ref_time": pl.Int64,
        "history_end": pl.Int32,
    }
    vocab = pl.read_parquet(out / "vocab/items.parquet")
    assert vocab["index"].to_list() == list(range(1, vocab.height + 1))
    raw = vocab["item_id"].cast(pl.Int64)
    assert raw.is_sorted(), "indices follow the numeric order of integer raw ids"
