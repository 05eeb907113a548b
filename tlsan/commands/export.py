"""`tlsan export`: a trained run dir -> a serving bundle (optionally registered in MLflow/BentoML)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlsan.errors import ConfigError

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="trained run -> serving bundle",
        description="Write a serving bundle: weights, resolved config, item vectors [x_i ; b_i], "
        "a FAISS index, the vocabularies with raw ids, recent popularity and a manifest. "
        "Optionally register it in MLflow (models:/NAME@ALIAS) and the BentoML model store.",
    )
    p.add_argument("--run", type=Path, required=True, help="run dir written by `tlsan train`")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset it trained on")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default="auto",
        help="FAISS index: exact flat below 200k items, HNSW above (auto), or forced",
    )
    p.add_argument(
        "--flat-threshold",
        type=int,
        default=200_000,
        metavar="N",
        help="--index auto: exact flat index below N items, HNSW from N on (default 200000)",
    )
    p.add_argument("--version", help="model version string (default: model kind + weights hash)")
    p.add_argument(
        "--popularity-half-life-days",
        type=float,
        default=None,
        metavar="N",
        help="cold-start popularity (over every event of --data): an event's weight halves "
        "every N days before the log's end (inf: no decay). Default: a pop run's own "
        "half-life; for other runs, the half-life pop validates best with on --data's "
        "validation split (the run's select metric)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--no-onnx",
        action="store_true",
        help="leave out the ONNX graph of the user vectors (the service then runs small "
        "batches on PyTorch too, at about 0.1-0.2 ms more per request)",
    )
    p.add_argument(
        "--register",
        metavar="NAME",
        nargs="?",
        const="tlsan",
        help="also register the bundle in MLflow as a version of model NAME (default tlsan)",
    )
    p.add_argument(
        "--alias",
        default="champion",
        help="MLflow alias to point at the new version (default champion; '' for none)",
    )
    p.add_argument(
        "--bentoml",
        metavar="NAME",
        nargs="?",
        const="tlsan",
        help="also save the bundle to the BentoML model store as NAME (default tlsan)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tlsan.bundle import register_mlflow, save_to_bentoml, write_bundle

    half_life = args.popularity_half_life_days
    if half_life is not None and not half_life > 0:
        raise ConfigError(
            f"--popularity-half-life-days: expected a positive number of days (inf: no "
            f"decay), got {half_life}"
        )
    if args.flat_threshold < 1:
        raise ConfigError(f"--flat-threshold: expected an integer >= 1, got {args.flat_threshold}")
    console = Console(stderr=True, quiet=args.quiet)
    out = write_bundle(
        args.run,
        args.data,
        args.out,
        index_kind=args.index,
        flat_threshold=args.flat_threshold,
        model_version=args.version,
        half_life_days=half_life,
        overwrite=args.overwrite,
        onnx=not args.no_onnx,
        progress=lambda message: console.print(f"[green]•[/] {message}"),
    )
    print(f"bundle written to {out}")
    if args.register:
        version = register_mlflow(out, name=args.register, alias=args.alias or None)
        alias = f" (alias @{args.alias})" if args.alias else ""
        print(f"registered in MLflow as models:/{args.register}/{version}{alias}")
    if args.bentoml:
        tag = save_to_bentoml(out, name=args.bentoml)
        print(f"saved to the BentoML model store as {tag} (serve with --bundle bentoml:{tag})")
    return 0
