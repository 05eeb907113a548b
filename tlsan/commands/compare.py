"""`tlsan compare RUN... --data DIR`: which run validation prefers, and paired bootstraps.

For each run: its model kind, recipe (preset, loss) and validation score, all evaluated here
on the same validation examples with the same metric and protocol; the run validation
prefers is the one to export (the choice never looks at test). Then, on `--split` (test by
default: reported, not used to choose), the paired bootstrap of the preferred run against
every other run: a confidence interval of mean(preferred - other) over the same examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="which run validation prefers, and its paired difference to the others on test",
        description="Evaluate every run on the validation split (the model kind, recipe and "
        "score of each; the best is the one to export), then on --split (test) resample "
        "examples with replacement for a confidence interval of mean(preferred - other).",
    )
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="two or more run dirs")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset of the runs")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--metric", default="ndcg@10", help="per-example metric to compare")
    p.add_argument("--include-history", action="store_true")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result as JSON to FILE")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run)


def _recipe(meta: dict[str, Any], kind: str, loss: str) -> str:
    """`default, loss ce (changed: epochs)` from config.json's recipe (when `tlsan train`
    wrote the run), else just the loss."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    parts = [str(recipe["preset"])] if recipe.get("preset") else []
    if kind != "pop":
        parts.append(f"loss {loss}")
    if recipe.get("changed"):
        parts.append(f"changed: {', '.join(recipe['changed'])}")
    return "; ".join(parts) or "-"


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

    if len(args.runs) < 2:
        raise TlsanError("compare: expected two or more run dirs")
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
    dataset = load_dataset(args.data, splits=tuple(dict.fromkeys(("valid", args.split))))
    validated = len(dataset.valid) > 0
    rows: list[dict[str, Any]] = []
    values = []
    for run_dir in args.runs:
        loaded = load_run(run_dir, dataset)
        config = loaded.config
        row: dict[str, Any] = {
            "run": str(run_dir),
            "kind": config.model.kind,
            "recipe": _recipe(loaded.info.meta, config.model.kind, config.loss),
            "valid": None,
        }
        if validated:
            valid = evaluate_model(
                loaded.model, dataset.valid, ks=ks, include_history=args.include_history
            )
            row["valid"] = valid.metrics[args.metric]
        result = evaluate_model(
            loaded.model, dataset.split(args.split), ks=ks, include_history=args.include_history
        )
        row[args.split] = result.metrics[args.metric]
        values.append(result.per_example[args.metric])
        rows.append(row)
    # the first of equals when validation cannot tell; without a validation split, the first
    best = max(range(len(rows)), key=lambda n: (rows[n]["valid"] or 0.0, -n)) if validated else 0
    comparisons = []
    for n, row in enumerate(rows):
        if n == best:
            continue
        boot = paired_bootstrap(
            values[best],
            values[n],
            metric=args.metric,
            resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
        )
        comparisons.append({**boot.to_dict(), "run_a": rows[best]["run"], "run_b": row["run"]})

    console = Console()
    runs = Table(title=f"{args.metric}: validation chooses, {args.split} is reported")
    for column in ("run", "model", "recipe", "valid", args.split, ""):
        justify = "right" if column in ("valid", args.split) else "left"
        runs.add_column(column, justify=justify, overflow="fold")
    for n, row in enumerate(rows):
        mark = "preferred" if validated and n == best else ""
        valid_text = "-" if row["valid"] is None else f"{row['valid']:.4f}"
        runs.add_row(
            row["run"], row["kind"], row["recipe"], valid_text, f"{row[args.split]:.4f}", mark
        )
    console.print(runs)
    if validated:
        preferred = rows[best]
        console.print(
            f"validation prefers {preferred['run']} ({preferred['kind']}, {args.metric} "
            f"{preferred['valid']:.4f}): the one to export",
            soft_wrap=True,
        )
    else:
        console.print("the dataset has no validation examples: no run is preferred")
    table = Table(
        title=f"{args.metric} on {args.split}: A - B, A = {rows[best]['run']} "
        f"({comparisons[0]['n']} paired examples)"
    )
    for column in ("B", "A mean", "B mean", "A - B", f"{args.confidence:.0%} CI", "p"):
        table.add_column(column, justify="left" if column == "B" else "right", overflow="fold")
    for comparison in comparisons:
        table.add_row(
            comparison["run_b"],
            f"{comparison['mean_a']:.4f}",
            f"{comparison['mean_b']:.4f}",
            f"{comparison['diff']:+.4f}",
            f"[{comparison['low']:+.4f}, {comparison['high']:+.4f}]",
            f"{comparison['p_value']:.3f}",
        )
    console.print(table)
    if args.json:
        write_json(
            args.json,
            {
                "metric": args.metric,
                "split": args.split,
                "include_history": args.include_history,
                "preferred": rows[best]["run"] if validated else None,
                "runs": rows,
                "comparisons": comparisons,
            },
        )
    return 0
