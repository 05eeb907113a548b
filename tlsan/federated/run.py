"""`federate`: one federated run from a prepared dataset to a normal run dir.

1. Load the dataset; start from a central run (`--run`) or a freshly initialised TLSAN.
2. Cut the users with training examples into clients (one user or cohorts of N) and write
   each client's device dir (its own data only), provisioned with its starting personal rows:
   the central run's rows, or neutral rows (the mean user embedding and mean P) from scratch.
3. Flower simulation (Ray backend): the ServerApp runs the strategy over the *global*
   parameters (and, with `--optimizer-state` shared, their Adam moments) for R rounds (C
   clients each, E local epochs, per-round federated validation on
   the validation examples as given and folded like test examples; `select` says which picks
   the round), then sends that round's global parameters to every client to fine-tune its
   personal rows.
4. Gather: global parameters from the server, each device's fine-tuned personal rows from its
   dir (users that were no client's keep their starting rows) into one model; evaluate valid
   and test centrally (like `tlsan evaluate`), also with neutral personal parameters; write
   the run dir atomically: model.safetensors, config.json, metrics.json, history.json and
   federated.json (rounds, traffic, settings, the neutral-parameter metrics).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlsan.config import TrainConfig, default_config
from tlsan.errors import ConfigError, RunError
from tlsan.federated import optimizer_state
from tlsan.federated.partition import assign_clients, parse_client_unit, write_devices
from tlsan.federated.server import RoundStats, ServerPlan, StrategySpec, WireLog

FEDERATED_FILE = "federated.json"
# --select: which validation examples pick the round and each device's fine-tuning epoch
SELECT: dict[str, str] = {"valid": "valid", "folded": "valid-folded"}
EXPERIMENT = "tlsan-federated"


@dataclass(frozen=True)
class FederateOptions:
    """Everything `tlsan federate` can set (see `tlsan federate --help`)."""

    data: Path
    out: Path
    rounds: int
    clients_per_round: int
    run: Path | None = None
    config: TrainConfig | None = None  # None: the --run's config, else the default preset
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_momentum: float = 0.9  # fedavgm only
    server_lr: float = 1.0  # fedavgm only
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_mode: str = "local"
    client_unit: str = "user"
    patience: int = 0  # rounds without validation improvement before stopping, 0 = never
    min_rounds: int = 0  # no early stop before this round
    lr_decay: float = 1.0  # clients' lr multiplier after each round without improvement
    select: str = "valid"  # valid | folded: validation examples that pick rounds and epochs
    # personal rows' lr multiplier during the rounds (0 = frozen): they train in every round
    # a device joins, far more epochs than central training gives them
    personal_lr_scale: float = 0.25
    optimizer_state: str = "auto"  # auto | shared | local: Adam's moments travel and average
    personal_epochs: int = 10
    personal_lr: float | None = None  # None: the training lr
    eval_fraction: float = 1.0
    seed: int | None = None  # None: the config's seed
    mlflow: bool = True
    overwrite: bool = False
    work_dir: Path | None = None  # keeps the device dirs there; None: a temp dir, removed
    progress: bool = True
    num_cpus: int = 0  # Ray CPUs, 0 = all cores
    client_cpus: float = 1.0  # Ray CPUs per client: num_cpus / client_cpus clients in parallel

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round", "local_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}"
                )
        if self.personal_lr_scale < 0:
            raise ConfigError(f"--personal-lr-scale: expected >= 0, got {self.personal_lr_scale}")
        if self.patience < 0:
            raise ConfigError(f"--patience: expected >= 0, got {self.patience}")
        if self.min_rounds < 0:
            raise ConfigError(f"--min-rounds: expected >= 0, got {self.min_rounds}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"--lr-decay: expected a factor in (0, 1], got {self.lr_decay}")
        if self.personal_epochs < 0:
            raise ConfigError(f"--personal-epochs: expected >= 0, got {self.personal_epochs}")
        if self.personal_lr is not None and self.personal_lr <= 0:
            raise ConfigError(f"--personal-lr: expected > 0, got {self.personal_lr}")
        if self.client_cpus <= 0 or self.num_cpus < 0:
            raise ConfigError("--client-cpus must be > 0 and --num-cpus >= 0")
        optimizer_state.check_mode(self.optimizer_state)
        if self.select not in SELECT:
            raise ConfigError(f"--select: expected one of {', '.join(SELECT)}, got {self.select!r}")
        parse_client_unit(self.client_unit)


@dataclass
class FederateResult:
    """What a federated run produced."""

    run_dir: Path
    valid: dict[str, float]
    test: dict[str, float]
    neutral_valid: dict[str, float]
    neutral_test: dict[str, float]
    rounds: list[RoundStats]  # training rounds 1.. (round 0 only evaluates the start)
    best_round: int
    personalization: dict[str, float]
    clients: int
    wall_s: float
    mlflow_run_id: str | None
    wire: WireLog = field(repr=False, default_factory=WireLog)


def _start_model(options: FederateOptions, dataset: Any) -> tuple[TrainConfig, Any, str]:
    """(config, model, origin): the central run's model, or a fresh seeded one whose users all
    start from the neutral personal rows (the mean of the initial rows)."""
    import torch

    from tlsan.run_dir import load_run
    from tlsan.train import new_model

    if options.run is not None:
        loaded = load_run(options.run, dataset)
        config = options.config or loaded.config
        if config.model != loaded.config.model:
            raise ConfigError(
                f"--run {options.run}: its model config {loaded.config.model} differs from the "
                f"requested {config.model}; federated training continues the run's model"
            )
        model, origin = loaded.model, f"run:{Path(options.run).resolve()}"
    else:
        config = options.config or default_config("tlsan")
        model, origin = None, "scratch"
    if options.seed is not None:
        config = config.override(seed=options.seed)
    if config.model.kind != "tlsan":
        raise ConfigError(
            f"model.kind: federated fine-tuning needs TLSAN's personal parameters, got "
            f"{config.model.kind!r}"
        )
    if model is None:
        model = new_model(config, dataset)
        neutral = model.neutral_personal()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in model.personal_parameter_names():
                params[name][1:] = neutral[name]
    return config, model.train(), origin


def _neutral_copy(model: Any) -> Any:
    """The model with every user's personal rows replaced by the neutral (mean) rows."""
    import copy

    import torch

    neutral = copy.deepcopy(model)
    means = neutral.neutral_personal()
    rows = dict(neutral.named_parameters())[neutral.personal_parameter_names()[0]].shape[0]
    users = torch.arange(1, rows)
    neutral.set_personal(users, {k: v.expand(users.numel(), *v.shape) for k, v in means.items()})
    return neutral.eval()


class _RoundLogger:
    """Per-round MLflow metrics (explicit run id: the ServerApp runs in another thread, where
    MLflow's fluent API has no active run) and a progress bar."""

    def __init__(self, run_id: str | None, rounds: int, progress: bool) -> None:
        from tqdm import tqdm

        self.run_id = run_id
        self.bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not progress)
        self.client: Any = None
        if run_id is not None:
            from mlflow import MlflowClient

            self.client = MlflowClient()

    def __call__(self, stats: RoundStats) -> None:
        values = stats.metrics()
        if self.client is not None:
            from mlflow.entities import Metric

            from tlsan.tracking import metric_key

            now = int(time.time() * 1000)
            metrics = [
                Metric(metric_key(k), float(v), now, stats.round)
                for k, v in values.items()
                if not math.isnan(float(v))
            ]
            self.client.log_batch(self.run_id, metrics=metrics)
        ndcg = stats.valid.get("ndcg@10", float("nan"))
        self.bar.set_postfix(loss=f"{stats.train_loss:.4f}", valid_ndcg10=f"{ndcg:.4f}")
        if stats.round > 0:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def simulate(
    plan: ServerPlan,
    client_settings: Any,
    num_clients: int,
    *,
    num_cpus: int,
    client_cpus: float,
    verbose: bool = False,
) -> None:
    """Run the ServerApp and ClientApp in Flower's simulation engine (Ray backend)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from flwr.simulation import run_simulation

    from tlsan.federated.client import build_client_app
    from tlsan.federated.server import build_server_app

    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=build_server_app(plan),
            client_app=build_client_app(client_settings),
            num_supernodes=num_clients,
            backend_name="ray",
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)
    if plan.result is None:
        raise RunError("federate: the Flower simulation ended without a final global model")


def federate(
    options: FederateOptions,
    *,
    wire_log: WireLog | None = None,
    on_round: Callable[[RoundStats], None] | None = None,
    verbose: bool = False,
) -> FederateResult:
    """One federated run; see the module docstring. `wire_log` (e.g. `WireLog(keep=True)`)
    receives everything the server got from clients."""
    import torch

    from pipelines.atomic import check_output
    from tlsan.data import load_dataset
    from tlsan.federated.client import ClientSettings, get_global, global_names, set_global
    from tlsan.federated.personal import gather_personal, provision
    from tlsan.tracking import Tracker, TrackingOptions
    from tlsan.train import set_threads

    began = time.perf_counter()
    check_output(Path(options.out), overwrite=options.overwrite)
    dataset = load_dataset(Path(options.data))
    config, model, origin = _start_model(options, dataset)
    set_threads(config.threads)
    share_state = optimizer_state.resolve(
        options.optimizer_state, config.optimizer, options.dp_clip
    )
    users_per_client = parse_client_unit(options.client_unit)
    partition = assign_clients(dataset.train.arrays.user.numpy(), users_per_client, config.seed)
    spec = StrategySpec(
        name=options.strategy,
        clients_per_round=options.clients_per_round,
        total_clients=len(partition),
        eval_fraction=options.eval_fraction,
        proximal_mu=options.proximal_mu,
        server_momentum=options.server_momentum,
        server_lr=options.server_lr,
        dp_clip=options.dp_clip,
        dp_noise=options.dp_noise,
        dp_mode=options.dp_mode,
    )
    personal_lr = options.personal_lr or config.lr
    own_work = options.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="tlsan-federate-")) if own_work else Path(options.work_dir)
    log = wire_log or WireLog()
    tracker = Tracker(
        TrackingOptions(
            enabled=options.mlflow,
            experiment=EXPERIMENT,
            registered_model_name=None,
            tags={"federated": "true", "origin": origin},
        )
    )
    try:
        devices = work / "devices"
        if devices.exists():
            shutil.rmtree(devices)
        dirs = write_devices(Path(options.data), partition, devices, progress=options.progress)
        names = model.personal_parameter_names()
        tables = {n: t.detach() for n, t in model.state_dict().items() if n in names}
        client_users = [torch.from_numpy(users) for users in partition.clients]
        provision(dirs, client_users, tables)

        settings = {
            "rounds": options.rounds,
            "clients_per_round": options.clients_per_round,
            "clients": len(partition),
            "client_unit": options.client_unit,
            "local_epochs": options.local_epochs,
            "strategy": options.strategy,
            "proximal_mu": options.proximal_mu if options.strategy == "fedprox" else 0.0,
            "server_momentum": options.server_momentum if options.strategy == "fedavgm" else 0.0,
            "server_lr": options.server_lr if options.strategy == "fedavgm" else 1.0,
            "dp_clip": options.dp_clip,
            "dp_noise": options.dp_noise,
            "dp_mode": options.dp_mode if options.dp_clip > 0 else "off",
            "patience": options.patience,
            "min_rounds": options.min_rounds,
            "lr_decay": options.lr_decay,
            "select": options.select,
            "personal_lr_scale": options.personal_lr_scale,
            "optimizer_state": "shared" if share_state else "local",
            "personal_epochs": options.personal_epochs,
            "personal_lr": personal_lr,
            "eval_fraction": options.eval_fraction,
            "origin": origin,
        }
        params = {**config.flat(), **{f"fed_{k}": v for k, v in settings.items()}}
        tags = {"dataset_hash": dataset.dataset_hash, "model_kind": "tlsan"}
        run_id = tracker.start(params, tags, resume_run_id=None)
        logger = _RoundLogger(run_id, options.rounds, options.progress)

        def round_done(stats: RoundStats) -> None:
            logger(stats)
            if on_round is not None:
                on_round(stats)

        import json

        config_json = json.dumps(config.to_dict())
        plan = ServerPlan(
            initial=get_global(model),
            rounds=options.rounds,
            spec=spec,
            train_config={
                "train-config": config_json,
                "local-epochs": options.local_epochs,
                "personal-lr-scale": options.personal_lr_scale,
                "share-optimizer-state": share_state,
                "seed": config.seed,
            },
            personal_config={
                "train-config": config_json,
                "personal-epochs": options.personal_epochs,
                "personal-lr": personal_lr,
                "select": SELECT[options.select],
                "seed": config.seed,
            },
            seed=config.seed,
            personalize=True,
            patience=options.patience,
            min_rounds=options.min_rounds,
            lr_decay=options.lr_decay,
            select=f"{SELECT[options.select]}-ndcg@10",
            log=log,
            on_round=round_done,
            share_optimizer_state=share_state,
        )
        client_settings = ClientSettings(
            devices_root=str(devices),
            dp_clip=options.dp_clip,
            dp_noise=options.dp_noise,
            dp_mode=options.dp_mode,
            threads=1,
        )
        try:
            simulate(
                plan,
                client_settings,
                len(partition),
                num_cpus=options.num_cpus,
                client_cpus=options.client_cpus,
                verbose=verbose,
            )
        finally:
            logger.close()
        assert plan.result is not None
        set_global(model, {name: plan.result[name] for name in global_names(model)})
        users, rows = gather_personal(dirs, names)
        model.set_personal(users, rows)
        model.eval()
        result = _finish(options, config, dataset, model, plan, settings, tracker, began)
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    result.wire = log
    return result


def _finish(
    options: FederateOptions,
    config: TrainConfig,
    dataset: Any,
    model: Any,
    plan: ServerPlan,
    settings: dict[str, Any],
    tracker: Any,
    began: float,
) -> FederateResult:
    """Evaluate centrally and write the run dir (atomically)."""
    from pipelines.atomic import atomic_directory
    from tlsan.run_dir import (
        CONFIG_FILE,
        HISTORY_FILE,
        METRICS_FILE,
        MODEL_FILE,
        run_config_dict,
        write_json,
        write_tensors,
    )
    from tlsan.train import evaluate_split

    batch = config.eval_batch_size
    valid = evaluate_split(model, dataset, "valid", batch_size=batch).metrics
    test = evaluate_split(model, dataset, "test", batch_size=batch).metrics
    neutral = _neutral_copy(model)
    neutral_valid = evaluate_split(neutral, dataset, "valid", batch_size=batch).metrics
    neutral_test = evaluate_split(neutral, dataset, "test", batch_size=batch).metrics
    logged = [plan.log.rounds[r] for r in sorted(plan.log.rounds) if r <= plan.rounds]
    rounds = [r for r in logged if r.round > 0]
    personal_round = plan.log.rounds.get(plan.rounds + 1)
    wall = time.perf_counter() - began
    federated = {
        "settings": settings,
        "best_round": plan.best_round,
        "rounds_run": plan.rounds_run,
        "rounds": [asdict(r) for r in logged],
        "personalization": {
            **plan.personal_metrics,
            "bytes_sent": personal_round.bytes_sent if personal_round else 0,
            "bytes_received": personal_round.bytes_received if personal_round else 0,
        },
        "global_model_neutral_personal": {"valid": neutral_valid, "test": neutral_test},
        "wall_seconds": wall,
    }
    extra = {
        "federated": {**settings, "best_round": plan.best_round, "rounds_run": plan.rounds_run},
        "select_metric": "ndcg@10",
    }
    files = [MODEL_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, FEDERATED_FILE]
    with atomic_directory(Path(options.out), overwrite=options.overwrite) as tmp:
        write_tensors(tmp / MODEL_FILE, model.state_dict())
        write_json(tmp / CONFIG_FILE, run_config_dict(config, dataset, model, extra))
        write_json(tmp / METRICS_FILE, {"valid": valid, "test": test})
        write_json(
            tmp / HISTORY_FILE,
            {
                "select_metric": "ndcg@10",
                "best_round": plan.best_round,
                "wall_seconds": wall,
                "rounds": federated["rounds"],
            },
        )
        write_json(tmp / FEDERATED_FILE, federated)
    run_dir = Path(options.out)
    if tracker.enabled and tracker.run_id is not None:
        import mlflow

        from tlsan.tracking import metric_key

        mlflow.log_metrics(
            {f"neutral_test/{metric_key(k)}": v for k, v in neutral_test.items()}
            | {f"personalization/{metric_key(k)}": v for k, v in plan.personal_metrics.items()}
        )
    tracker.finish(valid, test, run_dir, files)
    return FederateResult(
        run_dir=run_dir,
        valid=valid,
        test=test,
        neutral_valid=neutral_valid,
        neutral_test=neutral_test,
        rounds=rounds,
        best_round=plan.best_round,
        personalization=plan.personal_metrics,
        clients=settings["clients"],
        wall_s=wall,
        mlflow_run_id=tracker.run_id,
    )
