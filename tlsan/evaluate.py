"""One evaluator for every model: full ranking over the whole catalog (see tlsan/metrics.py).

Scores come from `user_vectors(batch) @ item_vectors().T`, exactly what serving retrieves with,
so offline numbers describe the served ranking. Item vectors are computed once per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from tlsan.data import Split
from tlsan.errors import TlsanError
from tlsan.metrics import DEFAULT_KS, metric_names, pairwise_auc, rank_stats, ranking_metrics

MAX_SCORE_CELLS = 1 << 23  # rows per batch are capped so one (B, N) score block stays ~32 MB


@dataclass
class EvalResult:
    """Mean metrics (keys `hr@K`, `ndcg@K`, `mrr`, `auc`, `paper_auc`) and per-example rows."""

    metrics: dict[str, float]
    per_example: dict[str, np.ndarray] = field(default_factory=dict)

    def frame(self) -> pl.DataFrame:
        """Per-example rows: user, target, rank, every metric (and `top_items`, a list)."""
        columns = {k: v for k, v in self.per_example.items() if k != "top_items"}
        frame = pl.DataFrame(columns)
        if "top_items" in self.per_example:
            top = self.per_example["top_items"]
            frame = frame.with_columns(pl.Series("top_items", top.tolist(), pl.List(pl.Int64)))
        return frame


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    split: Split,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    include_history: bool = False,
    batch_size: int = 1024,
    paper_seed: int = 0,
    top_k: int = 0,
) -> EvalResult:
    """Rank the whole catalog for every example of `split`.

    History items (the example's earlier events and session items) are excluded unless
    `include_history`; `paper_auc` uses one negative per example drawn with `paper_seed`
    outside the history, the same for every model evaluated on the same split.

    With `top_k`, per-example rows also hold `top_items`: the example's `top_k` best items
    (ties by item index), what serving shows for the same history and reference time. Unlike
    the ranking behind the metrics, a target seen before is excluded there too, as serving
    excludes everything seen.
    """
    if len(split) == 0:
        raise TlsanError(f"split {split.name!r} has no examples to evaluate")
    was_training = model.training
    model.eval()
    try:
        items = model.item_vectors()  # (N, D+1)
        n_items = items.shape[0]
        if n_items != split.n_items:
            raise TlsanError(
                f"the model scores {n_items} items but split {split.name!r} has a catalog of "
                f"{split.n_items}; was it trained on another dataset?"
            )
        step = max(1, min(batch_size, MAX_SCORE_CELLS // n_items))
        negatives = split.paper_negatives(paper_seed)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(split), step):
            stop = min(len(split), start + step)
            rows = torch.arange(start, stop)
            batch = split.arrays.batch(rows)
            scores = model.user_vectors(batch) @ items.T  # (B, N)
            target = batch.target
            paper = pairwise_auc(
                scores.gather(1, target.unsqueeze(1)).squeeze(1),
                scores.gather(1, negatives[rows].unsqueeze(1)).squeeze(1),
            )
            scores[:, 0] = float("-inf")  # padding is never ranked
            n_excluded = torch.ones(stop - start, dtype=torch.int64)
            seen_target = (torch.zeros(0, dtype=torch.int64),) * 2
            if not include_history:
                r, item = split.seen_pairs(start, stop)
                keep = item != target[r]  # the target itself is always ranked
                seen_target = r[~keep], item[~keep]
                r, item = r[keep], item[keep]
                scores[r, item] = float("-inf")
                n_excluded += torch.bincount(r, minlength=stop - start)
            stats = rank_stats(scores, target, n_excluded)
            row = ranking_metrics(stats, ks)
            row["paper_auc"] = paper
            row["rank"] = stats.rank
            if top_k:
                row["top_items"] = top_items(scores, top_k, exclude=seen_target)
            for name, values in row.items():
                parts.setdefault(name, []).append(values)
    finally:
        model.train(was_training)
    per_example = {name: torch.cat(values).numpy() for name, values in parts.items()}
    metrics = {name: float(per_example[name].mean()) for name in metric_names(ks)}
    per_example = {
        "user": split.arrays.user.numpy(),
        "target": split.arrays.target.numpy(),
        "rank": per_example.pop("rank"),
        **{name: per_example[name] for name in metric_names(ks)},
        **({"top_items": per_example["top_items"]} if top_k else {}),
    }
    return EvalResult(metrics=metrics, per_example=per_example)


def top_items(
    scores: torch.Tensor, k: int, exclude: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """(B, min(k, N)) best items of each row of `scores` (B, N), ties by item index, after
    setting the `exclude` (row, item) cells to -inf; -inf cells never come back (index 0,
    padding, fills a row that has fewer eligible items than k)."""
    rows, items = exclude
    if rows.numel():
        scores = scores.clone()
        scores[rows, items] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.where(scores.gather(1, order) > float("-inf"), order, 0)


def write_per_example(result: EvalResult, path: Path) -> Path:
    """Per-example rows to Parquet or CSV (by extension), written via a temp file + rename."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise TlsanError(f"{path}: --per-user expects a .parquet or .csv file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame = result.frame()
    if suffix == ".parquet":
        frame.write_parquet(tmp)
    else:  # CSV has no list type: top items as one space-separated field
        if "top_items" in frame.columns:
            frame = frame.with_columns(pl.col("top_items").cast(pl.List(pl.String)).list.join(" "))
        frame.write_csv(tmp)
    tmp.replace(path)
    return path
