"""`tlsan compare RUN_A RUN_B --data DIR`: paired bootstrap of a metric's difference."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="paired difference of two runs on the same split, with a bootstrap CI",
        description="Evaluate both runs on the same examples and resample examples with "
        "replacement to get a confidence interval of mean(A - B).",
    )
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset of both runs")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--metric", default="ndcg@10", help="per-example metric to compare")
    p.add_argument("--include-history", action="store_true")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result as JSON to FILE")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tlsan.config import METRIC_PATTERN
    from tlsan.data import load_dataset
    from tlsan.errors import TlsanError
    from tlsan.evaluate import evaluate_model
    from tlsan.metrics import DEFAULT_KS, paired_bootstrap
    from tlsan.run_dir import load_run, write_json
    from tlsan.train import set_threads

    if not METRIC_PATTERN.match(args.metric):
        raise TlsanError(
            f"--metric: expected hr@K, ndcg@K, mrr, auc or paper_auc, got {args.metric!r}"
        )
    if args.resamples < 1 or not 0 < args.confidence < 1:
        raise TlsanError("--resamples must be >= 1 and --confidence in (0, 1)")
    ks = DEFAULT_KS
    if "@" in args.metric:
        ks = tuple(sorted(set(ks) | {int(args.metric.split("@")[1])}))
    set_threads(args.threads)
    dataset = load_dataset(args.data, splits=(args.split,))
    split = dataset.split(args.split)
    values = []
    kinds = []
    for run_dir in (args.run_a, args.run_b):
        loaded = load_run(run_dir, dataset)
        kinds.append(loaded.config.model.kind)
        result = evaluate_model(loaded.model, split, ks=ks, include_history=args.include_history)
        values.append(result.per_example[args.metric])
    boot = paired_bootstrap(
        values[0],
        values[1],
        metric=args.metric,
        resamples=args.resamples,
        confidence=args.confidence,
        seed=args.seed,
    )
    table = Table(title=f"{args.metric} on {args.split}: A - B ({boot.n} paired examples)")
    for column in ("A", "B", "A - B", f"{boot.confidence:.0%} CI", "p"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{boot.mean_a:.4f}",
        f"{boot.mean_b:.4f}",
        f"{boot.diff:+.4f}",
        f"[{boot.low:+.4f}, {boot.high:+.4f}]",
        f"{boot.p_value:.3f}",
    )
    console = Console()
    console.print(table)
    console.print(f"A = {args.run_a} ({kinds[0]}), B = {args.run_b} ({kinds[1]})")
    if args.json:
        write_json(
            args.json, {**boot.to_dict(), "run_a": str(args.run_a), "run_b": str(args.run_b)}
        )
    return 0
