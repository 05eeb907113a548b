"""Full-ranking metrics from a score matrix, and the paired bootstrap for comparing runs.

Conventions (the numbers data scientists read, so they are spelled out):
- Items excluded from a row (padding index 0, and the user's history unless `include_history`)
  are set to -inf before ranking; they never count as above, tied or below. The target itself
  is never excluded, even when the user had seen it before (a repeat purchase).
- Ties are pessimistic: every other eligible item whose score equals the target's counts as
  ranked above it. `rank` is 0-based: rank 0 = the target is strictly the top item.
- hr@k = [rank < k]; ndcg@k = [rank < k] / log2(rank + 2) (one relevant item, so IDCG = 1);
  mrr = 1 / (rank + 1). With k >= the number of eligible items, hr@k is 1.
- auc = (#others below + 0.5 * #others tied) / #others, over the eligible items of the row.
- paper_auc = 1 if the target outscores one seeded negative drawn outside the user's history,
  0.5 on a tie, 0 otherwise (the paper's protocol; its code counted ties as 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tlsan.errors import TlsanError

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


@dataclass
class RankStats:
    """Per-row counts of the eligible non-target items relative to the target."""

    rank: Tensor  # (B,) int64: others scored >= target (pessimistic 0-based rank)
    below: Tensor  # (B,) int64
    tied: Tensor  # (B,) int64
    others: Tensor  # (B,) int64: eligible items besides the target


def rank_stats(scores: Tensor, target: Tensor, n_excluded: Tensor) -> RankStats:
    """Counts from `scores` (B, N) in which every excluded item already holds -inf.

    `n_excluded` (B,) is how many columns of each row were set to -inf (never the target).
    """
    t = scores.gather(1, target.unsqueeze(1))  # (B, 1)
    if not bool(torch.isfinite(t).all()):
        raise TlsanError("the model produced non-finite scores for target items; cannot rank")
    ge = (scores >= t).sum(1) - 1  # others above or tied
    tied = (scores == t).sum(1) - 1
    others = scores.shape[1] - 1 - n_excluded
    return RankStats(rank=ge, below=others - ge, tied=tied, others=others)


def ranking_metrics(stats: RankStats, ks: tuple[int, ...]) -> dict[str, Tensor]:
    """Per-row hr@k, ndcg@k, rr and auc (float64 tensors of shape (B,))."""
    rank = stats.rank.to(torch.float64)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2.0), 0.0)
    out["mrr"] = 1.0 / (rank + 1.0)
    others = stats.others.to(torch.float64)
    auc = (stats.below.to(torch.float64) + 0.5 * stats.tied.to(torch.float64)) / others.clamp(
        min=1.0
    )
    out["auc"] = torch.where(others > 0, auc, 0.5)
    return out


def pairwise_auc(target_scores: Tensor, negative_scores: Tensor) -> Tensor:
    """(B,) 1 where the target wins, 0.5 on a tie, 0 otherwise."""
    win = (target_scores > negative_scores).to(torch.float64)
    return win + 0.5 * (target_scores == negative_scores).to(torch.float64)


def metric_names(ks: tuple[int, ...]) -> list[str]:
    """Keys of an evaluation, in display order."""
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr", "auc", "paper_auc"]


@dataclass(frozen=True)
class BootstrapResult:
    """Paired difference mean(a - b) with a percentile confidence interval."""

    metric: str
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    confidence: float
    p_value: float  # two-sided: share of resampled differences on the other side of 0, x2
    n: int
    resamples: int

    def to_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    metric: str = "ndcg@10",
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Resample examples with replacement (the same rows for both runs) and report the
    percentile interval of the mean difference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise TlsanError(
            f"paired bootstrap: expected two equally long non-empty per-example arrays, got "
            f"{a.shape} and {b.shape}"
        )
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // diff.size)  # bound memory: about 4M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    observed = float(diff.mean())
    other_side = np.mean(means <= 0.0) if observed > 0 else np.mean(means >= 0.0)
    return BootstrapResult(
        metric=metric,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=observed,
        low=float(low),
        high=float(high),
        confidence=confidence,
        p_value=float(min(1.0, 2.0 * other_side)) if observed != 0 else 1.0,
        n=int(diff.size),
        resamples=resamples,
    )


def parse_ks(text: str) -> tuple[int, ...]:
    """`"5,10,20"` -> (5, 10, 20); positive, unique, sorted."""
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise TlsanError(f"--ks: expected comma-separated positive integers, got {text!r}") from exc
    if not ks or ks[0] < 1:
        raise TlsanError(f"--ks: expected comma-separated positive integers, got {text!r}")
    return ks
