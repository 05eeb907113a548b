"""Full-ranking metrics on hand-computed cases: ties, k beyond the catalog, history masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tiny_data import hand_split
from tlsan.baselines import Pop
from tlsan.config import ModelConfig
from tlsan.data import VocabSizes
from tlsan.errors import TlsanError
from tlsan.evaluate import evaluate_model, write_per_example
from tlsan.metrics import paired_bootstrap, pairwise_auc, parse_ks, rank_stats, ranking_metrics


def fixed_scorer(scores: list[float]) -> Pop:
    """A model whose score for item i is scores[i] for every user (Pop with set scores)."""
    n = len(scores)
    model = Pop(ModelConfig(kind="pop"), VocabSizes(5, n, 2), torch.zeros(n, dtype=torch.int64))
    model.b.data = torch.tensor(scores, dtype=torch.float32)
    return model


def test_ties_count_against_the_target() -> None:
    # items:          pad  1    2    3    4    5
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.1, 0.5]])
    scores[:, 0] = float("-inf")
    stats = rank_stats(scores, torch.tensor([2]), torch.tensor([1]))
    assert stats.rank.item() == 3  # item 1 above, items 3 and 5 tied: pessimistic rank 3
    assert (stats.below.item(), stats.tied.item(), stats.others.item()) == (1, 2, 4)
    m = ranking_metrics(stats, (1, 3, 4))
    assert m["hr@3"].item() == 0.0 and m["hr@4"].item() == 1.0
    assert m["ndcg@4"].item() == pytest.approx(1 / math.log2(5))
    assert m["mrr"].item() == pytest.approx(1 / 4)
    assert m["auc"].item() == pytest.approx((1 + 0.5 * 2) / 4)


def test_k_larger_than_catalog_and_padding_never_ranked() -> None:
    model = fixed_scorer([100.0, 0.3, 0.2, 0.1])  # the padding item has the top score
    split = hand_split(targets=[3, 1], histories=[[], []], n_items=4)
    result = evaluate_model(model, split, ks=(2, 50))
    ranks = result.per_example["rank"].tolist()
    assert ranks == [2, 0]  # padding (index 0) never outranks anything
    assert result.metrics["hr@50"] == 1.0  # every eligible item fits in the top 50
    assert result.metrics["ndcg@50"] == pytest.approx((1 / math.log2(4) + 1.0) / 2)
    assert result.metrics["hr@2"] == pytest.approx(0.5)
    assert result.per_example["auc"].tolist() == [0.0, 1.0]


def test_history_items_are_excluded_but_never_the_target() -> None:
    model = fixed_scorer([0.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    # row 0: target 4 with items 1 and 2 seen before -> only item 3 is above it
    # row 1: target 1 was seen before (a repeat) -> it stays ranked, rank 0
    split = hand_split(targets=[4, 1], histories=[[1, 2], [1, 3]], n_items=6)
    excluded = evaluate_model(model, split, ks=(1, 2))
    assert excluded.per_example["rank"].tolist() == [1, 0]
    assert excluded.per_example["auc"].tolist() == pytest.approx([1 / 2, 1.0])  # 5 is below
    included = evaluate_model(model, split, ks=(1, 2), include_history=True)
    assert included.per_example["rank"].tolist() == [3, 0]
    assert included.per_example["auc"][0] == pytest.approx(1 / 4)
    assert excluded.metrics["hr@2"] == 1.0 and included.metrics["hr@2"] == 0.5


def test_paper_auc_negative_is_outside_history_and_ties_give_half() -> None:
    assert pairwise_auc(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.5, 1.0, 2.0])).tolist() == [
        1.0,
        0.5,
        0.0,
    ]
    # every item but the target and one unseen item is history: the negative must be item 5
    split = hand_split(targets=[1] * 20, histories=[[2, 3, 4]] * 20, n_items=6)
    negatives = split.paper_negatives(seed=3)
    assert set(negatives.tolist()) == {5}
    model = fixed_scorer([0.0, 0.5, 0.9, 0.9, 0.9, 0.5])  # target ties with the only negative
    assert evaluate_model(model, split).metrics["paper_auc"] == 0.5


def test_paper_negatives_are_seeded_and_batch_size_independent() -> None:
    split = hand_split(targets=list(range(1, 9)) * 4, histories=[[1]] * 32, n_items=40)
    assert torch.equal(split.paper_negatives(7), split.paper_negatives(7))
    assert not torch.equal(split.paper_negatives(7), split.paper_negatives(8))
    model = fixed_scorer([0.0] + [float(i % 7) for i in range(1, 40)])
    small = evaluate_model(model, split, batch_size=3)
    large = evaluate_model(model, split, batch_size=1000)
    assert small.metrics == large.metrics


def test_per_user_rows_to_parquet_and_csv(tmp_path) -> None:
    import polars as pl

    model = fixed_scorer([0.0, 0.9, 0.8, 0.7])
    split = hand_split(targets=[3, 2], histories=[[1], []], n_items=4, users=[4, 2])
    result = evaluate_model(model, split, ks=(1,))
    for name in ("rows.parquet", "rows.csv"):
        path = write_per_example(result, tmp_path / name)
        frame = pl.read_parquet(path) if name.endswith("parquet") else pl.read_csv(path)
        assert frame.get_column("user").to_list() == [4, 2]
        assert frame.get_column("rank").to_list() == [1, 1]
        assert set(frame.columns) >= {"user", "target", "rank", "hr@1", "ndcg@1", "mrr", "auc"}
    with pytest.raises(TlsanError, match=r"\.parquet or \.csv"):
        write_per_example(result, tmp_path / "rows.txt")


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(500)
    same = paired_bootstrap(b, b, resamples=200)
    assert same.diff == 0.0 and same.low == 0.0 and same.high == 0.0 and same.p_value == 1.0
    better = paired_bootstrap(b + 0.05 + rng.normal(0, 0.01, 500), b, resamples=500, seed=1)
    assert better.low > 0.0 and better.high < 0.1 and better.p_value < 0.01
    again = paired_bootstrap(b[::-1], b, resamples=300, seed=4)
    assert again == paired_bootstrap(b[::-1], b, resamples=300, seed=4)  # seeded
    assert again.low < 0.0 < again.high  # a permutation of the same values: no difference
    with pytest.raises(TlsanError, match="equally long"):
        paired_bootstrap(b, b[:10])


def test_parse_ks() -> None:
    assert parse_ks("20,5,10,5") == (5, 10, 20)
    for bad in ("", "0,5", "a,b"):
        with pytest.raises(TlsanError, match="--ks"):
            parse_ks(bad)
