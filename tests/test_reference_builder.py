"""`--protocol reference` rebuilds the reference code's dataset exactly.

The reference builder (../shared/reference/tlsan_tf/build_dataset.py, the authors' split code
ported to read our CSVs) runs in a subprocess on Clothing_Shoes_and_Jewelry; its training rows
and test examples (users, histories, sessions, targets, fixed negatives, user categories) must
equal ours, as multisets. Its output is its own pickle in a temporary directory, read here and
nowhere else: the project never reads pickles from users.
"""

from __future__ import annotations

import collections
import pickle
import subprocess
import sys
from pathlib import Path

import polars as pl

from tests.fixtures_data import SHARED_DATA, amazon_paths
from tests.test_leakage import _prepare

BUILDER = SHARED_DATA.parent / "reference" / "tlsan_tf" / "build_dataset.py"
NAME = "Clothing_Shoes_and_Jewelry"
MAX_LONG = 50  # our examples keep the most recent 50 long-term events (the model reads 10)


def _reference_output(tmp_path: Path) -> tuple[list, list]:
    interactions, items = amazon_paths(NAME)
    out = tmp_path / "dataset.pkl"
    done = subprocess.run(
        [sys.executable, str(BUILDER), "--interactions", str(interactions)]
        + ["--items", str(items), "--out", str(out)],
        cwd=BUILDER.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with out.open("rb") as handle:  # the reference's own file, written just now
        train = pickle.load(handle)
        test = pickle.load(handle)
    return train, test


def test_reference_protocol_equals_the_reference_builders_dataset(tmp_path: Path) -> None:
    ref_train, ref_test = _reference_output(tmp_path)
    ours = _prepare(NAME, tmp_path / "ours", protocol="reference")
    categories = dict(pl.read_parquet(ours / "vocab/categories.parquet").iter_rows())

    def raw(items: list[int]) -> tuple[int, ...]:  # our indices are the raw ids + 1
        return tuple(i - 1 for i in items)

    expected_test = collections.Counter(
        (u, tuple(long[-MAX_LONG:]), tuple(short), pair[0], pair[1], cat)
        for u, long, short, _, pair, cat in ref_test
    )
    got_test = collections.Counter(
        (
            r["user"] - 1,
            raw(r["long_items"]),
            raw(r["short_items"]),
            r["target"] - 1,
            r["negative"] - 1,
            int(categories[r["user_category"]]),
        )
        for r in pl.read_parquet(ours / "examples/test.parquet").iter_rows(named=True)
    )
    assert got_test == expected_test
    expected_train = collections.Counter(
        (u, tuple(long[-MAX_LONG:]), tuple(short), item, label, cat)
        for u, long, short, _, item, label, cat in ref_train
    )
    got_train: collections.Counter = collections.Counter()
    for r in pl.read_parquet(ours / "examples/train.parquet").iter_rows(named=True):
        base = (r["user"] - 1, raw(r["long_items"]), raw(r["short_items"]))
        category = int(categories[r["user_category"]])
        got_train[(*base, r["target"] - 1, 1, category)] += 1
        got_train[(*base, r["negative"] - 1, 0, category)] += 1
    assert got_train == expected_train
    # the time features too, for every test example
    taus = {u: tau for u, _, _, tau, _, _ in ref_test}
    for r in pl.read_parquet(ours / "examples/test.parquet").iter_rows(named=True):
        expected = taus[r["user"] - 1][-MAX_LONG:]
        assert all(abs(a - b) < 1e-6 for a, b in zip(r["long_tau"], expected, strict=True))
