"""`tlsan federate`: federated training of TLSAN's global parameters with Flower, then per-user
fine-tuning of the personal parameters on each client (needs the `federated` extra).

Three ways to run it: a local simulation from start to end (the default: `flwr run` against a
private SuperLink in simulation mode), or, for real devices, `--setup-only` (devices and the
server's plan), then `flwr run` on your SuperLink and SuperNodes, then `--collect` (the run
dir)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from tlsan.errors import ConfigError
from tlsan.federated.defaults import (
    DEFAULT_CLIENT_UNIT,
    DEFAULT_EVAL_FRACTION,
    DEFAULT_MIN_ROUNDS,
    DEFAULT_PATIENCE,
    DEFAULT_PERSONAL_EPOCHS,
    DEFAULT_PERSONAL_LR_SCALE,
    DEFAULT_ROUNDS,
    DEFAULT_TRAIN_FRACTION,
    FEDERATED_BATCH_SIZE,
    FEDERATED_LOSS,
    FEDERATED_LR,
)

STRATEGIES = ("fedavg", "fedprox", "fedavgm")
DP_MODES = ("local", "central")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="federated training (Flower) + per-user fine-tuning -> run dir",
        description="Federated TLSAN with Flower: each client (a cohort of N users, or one "
        "user) keeps its events and personal parameters (E_u[user], P[user]) on its device; "
        "only the global parameters are aggregated. After the last round every client "
        "fine-tunes its personal parameters locally. By default the whole run is a local "
        "simulation (`flwr run` against a private SuperLink); for real devices run "
        "--setup-only, then `flwr run` on your federation, then --collect. Writes a normal run "
        "dir that `tlsan evaluate` and `tlsan export` accept. Needs the `federated` extra "
        "(flwr[simulation]).",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset dir")
    p.add_argument("--run", type=Path, help="start from this centrally trained run dir")
    p.add_argument("--out", type=Path, help="run dir to write (not with --setup-only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--setup-only",
        action="store_true",
        help="write --work-dir (one device dir per client, the server's plan) for a "
        "deployment and stop; then start SuperNodes with --node-config \"device-dir='...'\" "
        "and `flwr run . FEDERATION --run-config \"server-dir='WORK/server'\"`",
    )
    mode.add_argument(
        "--collect",
        action="store_true",
        help="write the run dir --out from a --work-dir whose rounds ran with `flwr run` "
        "(the devices' personal rows where WORK/devices holds them)",
    )
    p.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"federated rounds R ({DEFAULT_ROUNDS})"
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        help="clients C per training round (default: --train-fraction of the clients)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=DEFAULT_TRAIN_FRACTION,
        help="share of the clients sampled for training in each round, unless "
        f"--clients-per-round ({DEFAULT_TRAIN_FRACTION})",
    )
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
        "--client-unit",
        default=DEFAULT_CLIENT_UNIT,
        help=f"'user' or 'cohort:N' (N users per client) ({DEFAULT_CLIENT_UNIT})",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help="stop after this many rounds without federated validation improvement (0 = never); "
        f"the global model of the best round is kept either way ({DEFAULT_PATIENCE})",
    )
    p.add_argument(
        "--min-rounds",
        type=int,
        default=DEFAULT_MIN_ROUNDS,
        help="no early stop before this round: from scratch the validation score sits at the "
        "popularity level for several rounds before the model learns the sequences "
        f"({DEFAULT_MIN_ROUNDS})",
    )
    p.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        help="multiply the clients' learning rate by this factor after every round without "
        "federated validation improvement, as ReduceLROnPlateau does centrally (1 = off) (1)",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=0.0,
        help="a round counts as an improvement (resetting --patience and --lr-decay) only "
        "if its validation NDCG@10 beats the last improving round's by more than this; the "
        "kept round is the best one either way (0)",
    )
    p.add_argument(
        "--personal-lr-scale",
        type=float,
        default=DEFAULT_PERSONAL_LR_SCALE,
        help="learning-rate multiplier of the personal parameters during the rounds (1 = as "
        f"the global ones; 0 = frozen until the final fine-tuning) ({DEFAULT_PERSONAL_LR_SCALE:g})",
    )
    p.add_argument(
        "--personal-epochs",
        type=int,
        default=DEFAULT_PERSONAL_EPOCHS,
        help="final per-client fine-tuning epochs (each device keeps its best by its own "
        f"validation examples) ({DEFAULT_PERSONAL_EPOCHS})",
    )
    p.add_argument("--personal-lr", type=float, help="fine-tuning learning rate (default: --lr)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=DEFAULT_EVAL_FRACTION,
        help="share of the clients on the validation panel: a seeded sample, drawn once, that "
        "reports validation metrics after every round (fewer: faster rounds, a noisier round "
        f"choice; 0: no federated validation, the last round is kept) ({DEFAULT_EVAL_FRACTION})",
    )
    p.add_argument(
        "--preset",
        choices=("paper", "default"),
        help="training preset (default: the default preset with local batch "
        f"{FEDERATED_BATCH_SIZE}, lr {FEDERATED_LR:g} and the {FEDERATED_LOSS} loss; a --run's "
        "own config with --run)",
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
    p.add_argument(
        "--work-dir",
        type=Path,
        help="keep the device dirs, the server's plan and outcome and Flower's logs here "
        "(default: a temporary folder, removed)",
    )
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs for the simulation (0 = all)")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated client (1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-mlflow", action="store_true", help="do not track with MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--audit", action="store_true", help=argparse.SUPPRESS)
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
    elif args.preset is None and args.config is None:  # from scratch: the federated recipe
        base = base.override(batch_size=FEDERATED_BATCH_SIZE, lr=FEDERATED_LR, loss=FEDERATED_LOSS)
    if args.config is not None:
        base = load_config_file(args.config, base=base)
    return base.override(**given) if given else base


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(
            "tlsan federate needs the federated extra: pip install 'tlsan-rec[federated]'"
        )
    if args.out is None and not args.setup_only:
        raise ConfigError("--out: required (the run dir to write), except with --setup-only")
    if args.out is not None and args.setup_only:
        raise ConfigError("--out: --setup-only writes no run dir (use --collect afterwards)")
    if (args.setup_only or args.collect) and args.work_dir is None:
        flag = "--setup-only" if args.setup_only else "--collect"
        raise ConfigError(f"{flag}: needs --work-dir")
    from tlsan.federated.run import FederateOptions, collect_only, federate, setup_only

    options = FederateOptions(
        data=args.data,
        out=args.out or args.work_dir,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        train_fraction=args.train_fraction,
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
        min_delta=args.min_delta,
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
        audit=args.audit,
    )
    if args.setup_only:
        setup = setup_only(options)
        _print_deployment(setup)
        return 0
    result = collect_only(options) if args.collect else federate(options, verbose=args.verbose)
    _print_result(result)
    return 0


def _print_deployment(setup: Any) -> None:
    """What to run next on the SuperLink, the devices and the workstation."""
    from rich.console import Console

    work = setup.work.resolve()
    devices = work / "devices"
    console = Console()
    console.print(
        f"wrote {work}: {setup.clients} device dirs in {devices}, the server's plan in "
        f"{setup.server_dir.resolve()}\n"
        "Start one SuperNode per device dir (each on its device), e.g.\n"
        f"  flower-supernode --superlink SUPERLINK:PORT --root-certificates ca.crt "
        f"--node-config \"device-dir='{devices / '000000'}'\"\n"
        "then, from the repository root (or any Flower app dir naming tlsan.federated.app):\n"
        f"  flwr run . FEDERATION --stream --run-config \"server-dir='{setup.server_dir.resolve()}'\"\n"
        "and finally\n"
        f"  tlsan federate --collect --work-dir {work} --data DATA --out RUN_DIR",
        highlight=False,
        soft_wrap=True,
    )


def _print_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

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
        f"wrote {result.run_dir} in {result.wall_s:.1f} s (best round {result.best_round} on "
        f"validation); wire: {sent:,} bytes sent, {received:,} bytes received over "
        f"{len(result.rounds)} rounds"
    )
