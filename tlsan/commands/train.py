"""`tlsan train`: fit TLSAN or a baseline on a prepared dataset into a run dir.

Config resolution: the preset (`--preset`, default `default`) for the model kind, then the
fields of `--config FILE` (JSON or YAML, flat or nested; a run dir's config.json works too),
then every flag given on the command line.

Under `torchrun --nproc-per-node N -m tlsan train ...` the N processes train one model
data-parallel (see tlsan/distributed.py): `--batch-size` stays the global batch, rank 0 alone
evaluates, writes RUN_DIR and talks to MLflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# flag dest -> (type, help); each maps onto the TrainConfig/ModelConfig field of the same name
HYPER_FLAGS: dict[str, tuple[type, str]] = {
    "d_item": (int, "item/user embedding size (paper 32)"),
    "d_cat": (int, "category embedding size (paper 32)"),
    "heads": (int, "attention heads; must divide d_item + d_cat (paper 8)"),
    "long_window": (int, "Ls: long-term events TLSAN attends to (paper 10)"),
    "dropout": (float, "dropout probability"),
    "blocks": (int, "(Ti)SASRec: self-attention blocks"),
    "max_len": (int, "(Ti)SASRec: most recent items of [long ; short] it reads"),
    "time_span": (int, "TiSASRec: time intervals clip at this many personal units (k)"),
    "pop_half_life_days": (
        float,
        "pop: popularity half-life in days (inf: no decay; 0, the default: chosen on validation)",
    ),
    "optimizer": (str, "sgd | adam | adamw"),
    "lr": (float, "learning rate"),
    "weight_decay": (float, "optimizer weight decay (decoupled for adamw)"),
    "l2": (float, "L2 on embedding tables and P added to the loss (paper 5e-5)"),
    "batch_size": (int, "examples per step ((Ti)SASRec: sequence windows per step)"),
    "negatives": (int, "bce/softmax: negatives per target outside the history; sampled: per batch"),
    "loss": (
        str,
        "bce (the paper) | softmax (sampled, negatives outside the history) | sampled "
        "(shared negatives, history included) | ce (full softmax over the catalog)",
    ),
    "session_fold": (float, "share of training sessions moved to long-term history (0-1)"),
    "clip": (float, "gradient-norm clip, 0 = off"),
    "epochs": (int, "maximum epochs"),
    "patience": (int, "early stopping: epochs without improvement, 0 = off"),
    "select_metric": (str, "validation metric choosing the checkpoint, e.g. ndcg@10, auc"),
    "seed": (int, "seed of initialisation, shuffling and negative sampling"),
    "eval_batch_size": (int, "examples per evaluation batch"),
    "threads": (int, "torch threads (0 = torch default)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train TLSAN (or the pop / sasrec / tisasrec baselines) on a prepared dataset",
        description="Train on DATA's train split, choose the checkpoint on valid, evaluate test "
        "once, and write RUN_DIR (model.safetensors, config.json, metrics.json, curves.png).",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset dir")
    p.add_argument("--out", type=Path, required=True, help="run dir to write")
    p.add_argument("--model", help="tlsan (default) | sasrec | tisasrec | pop")
    p.add_argument("--preset", choices=["paper", "default"], default="default")
    p.add_argument("--config", type=Path, help="JSON/YAML file with config fields")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR's checkpoint")
    p.add_argument("--no-mlflow", action="store_true", help="do not track the run in MLflow")
    p.add_argument("--experiment", default="tlsan", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument(
        "--register-as", default="tlsan", help="MLflow registered model name ('' = do not register)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument(
        "--protocol",
        choices=["leak-free", "reference"],
        help="reference: the paper's published, leaky protocol on a `tlsan prepare --protocol "
        "reference` dataset (test AUC every 1,000 steps, the best reported); reproduction only",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="train on the CPU (gloo under torchrun) or on this process's GPU (cuda:LOCAL_RANK, "
        "NCCL under torchrun); evaluation runs on the CPU",
    )
    hyper = p.add_argument_group("hyper-parameters (override the preset and --config)")
    for name, (kind, text) in HYPER_FLAGS.items():
        hyper.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    hyper.add_argument(
        "--include-history",
        dest="include_history",
        action="store_const",
        const=True,
        help="validation (which picks the checkpoint) and test rank history items too, as "
        "RecBole does (default: history excluded)",
    )
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> Any:
    """Preset -> --config file -> flags, validated (ConfigError names the bad field)."""
    from tlsan.config import TrainConfig, preset, read_config_file

    file_values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    kind = args.model or _kind_of(file_values) or "tlsan"
    config = preset(args.preset, kind, catalog_size(args.data))
    if file_values:
        config = TrainConfig.from_dict(file_values, base=config)
    names = (*HYPER_FLAGS, "include_history")
    flags = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.model:
        flags["model"] = args.model
    if args.protocol:
        flags["protocol"] = args.protocol
    return config.override(**flags)


def recipe_of(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Where the config came from, for config.json (and the bundle, `GET /model`): the preset
    and the fields that differ from it (a --config file or flags), plus the loss."""
    from tlsan.config import preset

    base = preset(args.preset, config.model.kind, catalog_size(args.data)).flat()
    changed = sorted(k for k, v in config.flat().items() if base.get(k) != v)
    return {"preset": args.preset, "changed": changed, "loss": config.loss}


def catalog_size(data: Path) -> int | None:
    """Rows of the item table of the prepared dataset at `data` (None if its manifest cannot
    be read: loading the dataset reports that properly)."""
    import json

    try:
        return int(json.loads((data / "manifest.json").read_text())["vocab_sizes"]["items"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kind_of(values: dict[str, Any]) -> str | None:
    model = values.get("model")
    if isinstance(model, dict):
        return model.get("kind")
    return model if isinstance(model, str) else values.get("kind")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tlsan import distributed
    from tlsan.tracking import TrackingOptions
    from tlsan.train import fit

    config = resolve_config(args)
    recipe = recipe_of(config, args)
    tracking = TrackingOptions(
        enabled=not args.no_mlflow,
        experiment=args.experiment,
        run_name=args.run_name,
        registered_model_name=args.register_as or None,
    )
    with distributed.session(args.device) as context:
        result = fit(
            config,
            args.data,
            args.out,
            mlflow=not args.no_mlflow,
            resume=args.resume,
            progress=not args.quiet,
            tracking=tracking,
            context=context,
            run_meta={"recipe": recipe},
        )
    if not args.quiet and context.is_main and result.leaky:
        _print_leaky(result, config.model.kind)
    elif not args.quiet and context.is_main:
        table = Table(title=f"tlsan train: {config.model.kind} (best epoch {result.best_epoch})")
        table.add_column("metric")
        table.add_column("valid", justify="right")
        table.add_column("test", justify="right")
        for name, value in result.valid.items():
            test = result.test.get(name) if result.test else None
            table.add_row(name, f"{value:.4f}", "" if test is None else f"{test:.4f}")
        console = Console()
        console.print(table)
        extra = f", MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else ""
        if result.model_version:
            extra += f", registered as {args.register_as} v{result.model_version}"
        console.print(f"run dir {result.run_dir} ({result.wall_s:.1f} s{extra})")
    return 0


def _print_leaky(result: Any, kind: str) -> None:
    """The reference protocol's figures, marked LEAKY wherever they are shown."""
    from rich.console import Console
    from rich.table import Table

    from tlsan.reference_protocol import LEAKY_NOTE

    table = Table(title=f"tlsan train: {kind}, --protocol reference (LEAKY)")
    table.add_column("metric")
    table.add_column("test, best evaluation (LEAKY)", justify="right")
    for name, value in (result.test or {}).items():
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"[bold red]{LEAKY_NOTE}[/]")
    console.print(f"run dir {result.run_dir} ({result.wall_s:.1f} s)")
