"""`tlsan federate`: federated training of TLSAN's global parameters with Flower, then per-user
fine-tuning of the personal parameters on each client (needs the `federated` extra)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from tlsan.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedavgm")
DP_MODES = ("local", "central")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="federated training (Flower) + per-user fine-tuning -> run dir",
        description="Simulate federated TLSAN with Flower: each client (one user, or a cohort "
        "of N users) keeps its events and personal parameters (E_u[user], P[user]) on its "
        "device; only the global parameters are aggregated. After the last round every client "
        "fine-tunes its personal parameters locally. Writes a normal run dir that `tlsan "
        "evaluate` and `tlsan export` accept. Needs the `federated` extra (flwr[simulation]).",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset dir")
    p.add_argument("--run", type=Path, help="start from this centrally trained run dir")
    p.add_argument("--out", type=Path, required=True, help="run dir to write")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds R")
    p.add_argument("--clients-per-round", type=int, required=True, help="clients C per round")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    p.add_argument(
        "--optimizer-state",
        choices=("auto", "shared", "local"),
        default="auto",
        help="shared: clients send Adam's moments of the global parameters with them and start "
        "each round from their average (3x the traffic; much better global models on non-IID "
        "clients); local: a fresh optimizer every round; auto (default): shared for Adam/AdamW "
        "without --dp-clip",
    )
    p.add_argument(
        "--proximal-mu", type=float, default=0.01, help="FedProx proximal weight mu (0.01)"
    )
    p.add_argument(
        "--server-momentum", type=float, default=0.9, help="FedAvgM server momentum (0.9)"
    )
    p.add_argument(
        "--server-lr", type=float, default=1.0, help="FedAvgM server learning rate (1.0)"
    )
    p.add_argument(
        "--dp-clip", type=float, default=0.0, help="clip each client's update to this L2 norm"
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="Gaussian noise multiplier sigma (std = sigma * clip); needs --dp-clip",
    )
    p.add_argument(
        "--dp-mode",
        choices=DP_MODES,
        default="local",
        help="local: noise added on the client (LocalDpMod); central: clients clip "
        "(fixedclipping_mod), the server adds noise to the average",
    )
    p.add_argument(
        "--client-unit", default="user", help="'user' or 'cohort:N' (N users per client)"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many rounds without federated validation improvement (0 = never); "
        "the global model of the best round is kept either way (5)",
    )
    p.add_argument(
        "--min-rounds",
        type=int,
        default=20,
        help="no early stop before this round: from scratch the validation score can sit at "
        "the popularity level for several rounds before the model learns the sequences (20)",
    )
    p.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        help="multiply the clients' learning rate by this factor after every round without "
        "federated validation improvement, as ReduceLROnPlateau does centrally (1 = off) (1)",
    )
    p.add_argument(
        "--select",
        choices=("valid", "folded"),
        default="valid",
        help="validation examples that pick the round and each device's fine-tuning epoch: "
        "as given, or folded (the current session moved into the long-term history, as in "
        "most paper-split test examples) (valid)",
    )
    p.add_argument(
        "--personal-lr-scale",
        type=float,
        default=0.25,
        help="learning-rate multiplier of the personal parameters during the rounds: they "
        "train in every round their device joins, many more epochs than central training "
        "gives them (1 = as the global ones; 0 = frozen until the final fine-tuning) (0.25)",
    )
    p.add_argument(
        "--personal-epochs",
        type=int,
        default=10,
        help="final per-client fine-tuning epochs (each device keeps its best by its own "
        "validation examples)",
    )
    p.add_argument("--personal-lr", type=float, help="fine-tuning learning rate (default: --lr)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=1.0,
        help="share of clients that report validation metrics each round (1.0)",
    )
    p.add_argument(
        "--preset", choices=("paper", "default"), help="training preset (default: default)"
    )
    p.add_argument("--config", type=Path, help="JSON/YAML file with training config fields")
    p.add_argument("--lr", type=float, help="local learning rate")
    p.add_argument("--batch-size", type=int, help="local batch size")
    p.add_argument("--negatives", type=int, help="sampled negatives per positive")
    p.add_argument(
        "--session-fold",
        type=float,
        help="share of local training examples whose session moves to long-term history (0-1)",
    )
    p.add_argument("--seed", type=int, help="seed (config, partition, sampling)")
    p.add_argument("--work-dir", type=Path, help="keep the simulated device dirs here")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs for the simulation (0 = all)")
    p.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per simulated client (1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-mlflow", action="store_true", help="do not track with MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    """The training config from --preset/--config/flags; None keeps the --run's config."""
    from tlsan.config import load_config_file, preset

    given = {
        k: v
        for k, v in {
            "lr": args.lr,
            "batch_size": args.batch_size,
            "negatives": args.negatives,
            "session_fold": args.session_fold,
        }.items()
        if v is not None
    }
    if args.preset is None and args.config is None and not given and args.run is not None:
        return None
    base = preset(args.preset or "default", "tlsan")
    if args.run is not None and args.preset is None:
        from tlsan.run_dir import read_run_info

        base = read_run_info(args.run).config
    if args.config is not None:
        base = load_config_file(args.config, base=base)
    return base.override(**given) if given else base


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "tlsan federate needs the federated extra: pip install 'tlsan-rec[federated]'"
        )
    from rich.console import Console
    from rich.table import Table

    from tlsan.federated.run import FederateOptions, federate

    options = FederateOptions(
        data=args.data,
        out=args.out,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        run=args.run,
        config=_config(args),
        local_epochs=args.local_epochs,
        strategy=args.strategy,
        proximal_mu=args.proximal_mu,
        server_momentum=args.server_momentum,
        server_lr=args.server_lr,
        dp_clip=args.dp_clip,
        dp_noise=args.dp_noise,
        dp_mode=args.dp_mode,
        client_unit=args.client_unit,
        patience=args.patience,
        min_rounds=args.min_rounds,
        lr_decay=args.lr_decay,
        select=args.select,
        personal_lr_scale=args.personal_lr_scale,
        optimizer_state=args.optimizer_state,
        personal_epochs=args.personal_epochs,
        personal_lr=args.personal_lr,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        mlflow=not args.no_mlflow,
        overwrite=args.overwrite,
        work_dir=args.work_dir,
        progress=not args.no_progress,
        num_cpus=args.num_cpus,
        client_cpus=args.client_cpus,
    )
    result = federate(options, verbose=args.verbose)
    table = Table(title=f"federated TLSAN: {result.clients} clients, {len(result.rounds)} rounds")
    table.add_column("test")
    for name in ("ndcg@10", "hr@10", "auc", "paper_auc"):
        table.add_column(name, justify="right")
    for label, metrics in (
        ("global model, neutral personal", result.neutral_test),
        ("+ per-user fine-tuning", result.test),
    ):
        table.add_row(
            label, *(f"{metrics[k]:.4f}" for k in ("ndcg@10", "hr@10", "auc", "paper_auc"))
        )
    console = Console()
    console.print(table)
    sent = sum(r.bytes_sent for r in result.rounds)
    received = sum(r.bytes_received for r in result.rounds)
    console.print(
        f"wrote {result.run_dir} in {result.wall_s:.1f} s; wire: {sent:,} bytes sent, "
        f"{received:,} bytes received over {len(result.rounds)} rounds"
    )
    return 0
