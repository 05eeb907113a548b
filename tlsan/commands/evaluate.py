"""`tlsan evaluate`: full-ranking metrics of a trained run on one split of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="full-ranking metrics of a run dir on a dataset split",
        description="Rank the whole catalog for every example of the split (history items "
        "excluded unless --include-history) and report hr@K, ndcg@K, mrr, auc and paper_auc.",
    )
    p.add_argument("--run", type=Path, required=True, help="run dir from `tlsan train`")
    p.add_argument(
        "--data", type=Path, required=True, help="the prepared dataset it was trained on"
    )
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--include-history", action="store_true", help="rank history items too")
    p.add_argument("--ks", default="5,10,20,50", help="cut-offs, comma-separated")
    p.add_argument("--per-user", type=Path, help="per-example rows to FILE (.parquet or .csv)")
    p.add_argument(
        "--top",
        type=int,
        default=0,
        metavar="K",
        help="with --per-user: also each example's top K items (what serving would show)",
    )
    p.add_argument("--json", type=Path, help="write the metrics as JSON to FILE")
    p.add_argument("--paper-seed", type=int, default=0, help="seed of paper_auc's negatives")
    p.add_argument("--batch-size", type=int, default=1024, help="examples per batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tlsan.data import load_dataset
    from tlsan.errors import TlsanError
    from tlsan.evaluate import evaluate_model, write_per_example
    from tlsan.metrics import parse_ks
    from tlsan.run_dir import load_run, write_json
    from tlsan.train import set_threads

    ks = parse_ks(args.ks)
    if args.top < 0 or (args.top and not args.per_user):
        raise TlsanError(f"--top: expected K >= 1 together with --per-user, got {args.top}")
    set_threads(args.threads)
    dataset = load_dataset(args.data, splits=(args.split,))
    loaded = load_run(args.run, dataset)
    result = evaluate_model(
        loaded.model,
        dataset.split(args.split),
        ks=ks,
        include_history=args.include_history,
        batch_size=args.batch_size,
        paper_seed=args.paper_seed,
        top_k=args.top,
    )
    table = Table(
        title=f"{loaded.config.model.kind} on {args.split} ({len(dataset.split(args.split))} "
        f"examples, history {'included' if args.include_history else 'excluded'})"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    if args.json:
        write_json(args.json, result.metrics)
    if args.per_user:
        write_per_example(result, args.per_user)
    return 0
