"""`federate`: one federated run from a prepared dataset to a normal run dir.

1. Setup (`setup_federation`): load the dataset; start from a central run (`--run`) or a
   freshly initialised TLSAN; cut the users with training examples into clients (cohorts of N
   users, or one user each) and write each client's device dir (its own data only),
   provisioned with its starting personal rows (the central run's rows, or neutral rows: the
   mean user embedding and mean P); write the server dir (`tlsan.federated.plan`: the plan and
   the starting global parameters) and the work dir's record (`federation.json`, the starting
   model).
2. Rounds (`run_local`): `flwr run` of the Flower app (`tlsan.federated.app`) against a
   private SuperLink in simulation mode: the ServerApp runs the strategy over the *global*
   parameters (and, with `--optimizer-state` shared, their Adam moments) for R rounds (C
   clients each, E local epochs, validation after every round on a fixed panel of clients,
   whose validation NDCG@10 picks the round), then sends that round's global parameters to every client to fine-tune its
   personal rows. On real devices the same app runs under a SuperLink and SuperNodes instead
   (`tlsan federate --setup-only`, `flwr run`, `tlsan federate --collect`; see README).
3. Collect (`collect_federation`): the chosen global parameters from the server dir, each
   device's fine-tuned personal rows from its dir where the devices are at hand (users that were
   no client's, or whose device is elsewhere, keep their starting rows) into one model;
   evaluate valid and test centrally (like `tlsan evaluate`), also with neutral personal
   parameters; write the run dir atomically: model.safetensors, config.json, metrics.json,
   history.json and federated.json (rounds, traffic, settings, the neutral-parameter metrics).

The work dir (`--work-dir`, a temporary folder by default):

    WORK/federation.json      settings, training config, dataset hash, origin, clients
    WORK/start.safetensors    the starting model (global parameters and every user's rows)
    WORK/devices/NNNNNN/      one device dir per client (`tlsan.federated.partition`)
    WORK/server/              the ServerApp's plan and outcome (`tlsan.federated.plan`)
    WORK/app/pyproject.toml   the Flower app that `flwr run` submits
    WORK/flower/              the local SuperLink's Flower home (connection, app bundle)
    WORK/logs/                the SuperLink's and `flwr run`'s output
"""

from __future__ import annotations

import json
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
from tlsan.errors import ConfigError
from tlsan.federated import optimizer_state
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
from tlsan.federated.partition import assign_clients, parse_client_unit, write_devices
from tlsan.federated.plan import Outcome, follow_rounds, read_outcome, write_plan
from tlsan.federated.server import RoundStats, ServerPlan, StrategySpec, WireLog

FEDERATED_FILE = "federated.json"
WORK_FILE = "federation.json"
START_FILE = "start.safetensors"
DEVICES_DIR = "devices"
SERVER_DIR = "server"
EXPERIMENT = "tlsan-federated"


@dataclass(frozen=True)
class FederateOptions:
    """Everything `tlsan federate` can set (see `tlsan federate --help`)."""

    data: Path
    out: Path
    rounds: int = DEFAULT_ROUNDS
    clients_per_round: int | None = None  # None: train_fraction of the clients
    train_fraction: float = DEFAULT_TRAIN_FRACTION
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
    client_unit: str = DEFAULT_CLIENT_UNIT
    patience: int = DEFAULT_PATIENCE  # rounds without validation improvement, 0 = never stop
    min_rounds: int = DEFAULT_MIN_ROUNDS  # no early stop before this round
    lr_decay: float = 1.0  # clients' lr multiplier after each round without improvement
    min_delta: float = 0.0  # what a round must beat the last improvement by to improve
    # personal rows' lr multiplier during the rounds (0 = frozen until the fine-tuning)
    personal_lr_scale: float = DEFAULT_PERSONAL_LR_SCALE
    optimizer_state: str = "auto"  # auto | shared | local: Adam's moments travel and average
    personal_epochs: int = DEFAULT_PERSONAL_EPOCHS
    personal_lr: float | None = None  # None: the training lr
    eval_fraction: float = DEFAULT_EVAL_FRACTION  # share of clients on the validation panel
    seed: int | None = None  # None: the config's seed
    mlflow: bool = True
    overwrite: bool = False
    work_dir: Path | None = None  # keeps the work dir there; None: a temp dir, removed
    progress: bool = True
    num_cpus: int = 0  # Ray CPUs of the simulation, 0 = all cores
    client_cpus: int = 1  # Ray CPUs per client: num_cpus / client_cpus clients in parallel
    audit: bool = False  # the server keeps copies of everything it sends and receives

    def __post_init__(self) -> None:
        for name in ("rounds", "local_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}"
                )
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ConfigError(f"--clients-per-round: expected >= 1, got {self.clients_per_round}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(
                f"--train-fraction: expected a share of the clients in (0, 1], got "
                f"{self.train_fraction}"
            )
        if self.personal_lr_scale < 0:
            raise ConfigError(f"--personal-lr-scale: expected >= 0, got {self.personal_lr_scale}")
        if self.patience < 0:
            raise ConfigError(f"--patience: expected >= 0, got {self.patience}")
        if self.min_rounds < 0:
            raise ConfigError(f"--min-rounds: expected >= 0, got {self.min_rounds}")
        if self.min_delta < 0:
            raise ConfigError(f"--min-delta: expected >= 0, got {self.min_delta}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"--lr-decay: expected a factor in (0, 1], got {self.lr_decay}")
        if self.personal_epochs < 0:
            raise ConfigError(f"--personal-epochs: expected >= 0, got {self.personal_epochs}")
        if self.personal_lr is not None and self.personal_lr <= 0:
            raise ConfigError(f"--personal-lr: expected > 0, got {self.personal_lr}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ConfigError(
                f"--eval-fraction: expected a share of the clients in [0, 1] (0: no federated "
                f"validation, the last round is kept), got {self.eval_fraction}"
            )
        if self.client_cpus < 1 or self.num_cpus < 0:
            raise ConfigError("--client-cpus must be >= 1 and --num-cpus >= 0")
        optimizer_state.check_mode(self.optimizer_state)
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


@dataclass
class Setup:
    """What `setup_federation` wrote: the work dir and what the later stages need."""

    work: Path
    dataset: Any
    config: TrainConfig
    model: Any  # the starting model
    devices: list[Path]
    settings: dict[str, Any]

    @property
    def server_dir(self) -> Path:
        return self.work / SERVER_DIR

    @property
    def clients(self) -> int:
        return len(self.devices)


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
        config = options.config or federated_config()
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


def federated_config() -> TrainConfig:
    """The training config of a run from scratch without --preset or --config: the default
    preset with the federated batch, learning rate and loss (`tlsan.federated.defaults`)."""
    return default_config("tlsan").override(
        batch_size=FEDERATED_BATCH_SIZE, lr=FEDERATED_LR, loss=FEDERATED_LOSS
    )


def clients_per_round(options: FederateOptions, clients: int) -> int:
    """--clients-per-round, else --train-fraction of the clients (at least one)."""
    if options.clients_per_round is not None:
        return options.clients_per_round
    return min(clients, max(1, round(options.train_fraction * clients)))


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


# -- 1. setup ----------------------------------------------------------------------------------
def setup_federation(options: FederateOptions, work: Path) -> Setup:
    """Write the work dir: devices, server dir, the starting model and its record."""
    import torch

    from tlsan.data import load_dataset
    from tlsan.federated.client import get_global
    from tlsan.federated.personal import provision
    from tlsan.run_dir import write_json, write_tensors
    from tlsan.train import set_threads

    dataset = load_dataset(Path(options.data))
    config, model, origin = _start_model(options, dataset)
    set_threads(config.threads)
    share_state = optimizer_state.resolve(
        options.optimizer_state, config.optimizer, options.dp_clip
    )
    users_per_client = parse_client_unit(options.client_unit)
    partition = assign_clients(dataset.train.arrays.user.numpy(), users_per_client, config.seed)
    per_round = clients_per_round(options, len(partition))
    spec = StrategySpec(
        name=options.strategy,
        clients_per_round=per_round,
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
    work = Path(work)
    devices_root = work / DEVICES_DIR
    if devices_root.exists():
        shutil.rmtree(devices_root)
    dirs = write_devices(Path(options.data), partition, devices_root, progress=options.progress)
    names = model.personal_parameter_names()
    tables = {n: t.detach() for n, t in model.state_dict().items() if n in names}
    provision(dirs, [torch.from_numpy(users) for users in partition.clients], tables)

    settings = {
        "rounds": options.rounds,
        "clients_per_round": per_round,
        "train_fraction": None if options.clients_per_round else options.train_fraction,
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
        "min_delta": options.min_delta,
        "personal_lr_scale": options.personal_lr_scale,
        "optimizer_state": "shared" if share_state else "local",
        "personal_epochs": options.personal_epochs,
        "personal_lr": personal_lr,
        "eval_fraction": options.eval_fraction,
        "eval_clients": _panel_size(options.eval_fraction, len(partition)),
        "origin": origin,
    }
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
            "dp-clip": float(options.dp_clip),
            "dp-noise": float(options.dp_noise),
            "dp-mode": options.dp_mode,
        },
        personal_config={
            "train-config": config_json,
            "personal-epochs": options.personal_epochs,
            "personal-lr": personal_lr,
            "seed": config.seed,
        },
        seed=config.seed,
        personalize=True,
        patience=options.patience,
        min_rounds=options.min_rounds,
        lr_decay=options.lr_decay,
        min_delta=options.min_delta,
        share_optimizer_state=share_state,
    )
    write_plan(work / SERVER_DIR, plan, audit=options.audit)
    write_tensors(work / START_FILE, model.state_dict())
    write_json(
        work / WORK_FILE,
        {
            "settings": settings,
            "config": config.to_dict(),
            "dataset_hash": dataset.dataset_hash,
            "data_dir": str(Path(options.data).resolve()),
        },
    )
    return Setup(work, dataset, config, model, dirs, settings)


def _panel_size(eval_fraction: float, clients: int) -> int:
    from tlsan.federated.server import panel_size

    return panel_size(eval_fraction, clients)


# -- 2. the rounds, on a local simulation ------------------------------------------------------
class RoundFollower:
    """Follows the server dir's `rounds.jsonl` while the run goes on: a progress bar, MLflow
    metrics per round (step = round) and the caller's `on_round`."""

    def __init__(
        self,
        server_dir: Path,
        rounds: int,
        *,
        run_id: str | None,
        progress: bool,
        on_round: Callable[[RoundStats], None] | None = None,
    ) -> None:
        from tqdm import tqdm

        self.server_dir = server_dir
        self.seen = 0
        self.run_id = run_id
        self.on_round = on_round
        self.bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not progress)
        self.client: Any = None
        if run_id is not None:
            from mlflow import MlflowClient

            self.client = MlflowClient()

    def __call__(self) -> None:
        for stats in follow_rounds(self.server_dir, self.seen):
            self.seen += 1
            self.log(stats)

    def log(self, stats: RoundStats) -> None:
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
        if self.on_round is not None:
            self.on_round(stats)

    def close(self) -> None:
        self.bar.close()


def run_local(
    setup: Setup,
    options: FederateOptions,
    follower: Callable[[], None] | None = None,
    *,
    verbose: bool = False,
) -> Outcome:
    """`flwr run` of the Flower app against a private SuperLink in simulation mode (Ray
    backend, one simulated SuperNode per client), stopped with all its processes at the end."""
    from tlsan.federated.flower_runtime import (
        ProcessGroup,
        flwr_run,
        local_superlink,
        write_app_dir,
    )

    work = setup.work.resolve()
    flwr_home = work / "flower"
    run_config: dict[str, bool | int | float | str] = {
        "server-dir": str(work / SERVER_DIR),
        "devices-root": str(work / DEVICES_DIR),
        "client-threads": 1,
    }
    cpus = options.num_cpus or os.cpu_count() or 1
    federation_config: dict[str, bool | int | float | str] = {
        "num-supernodes": setup.clients,
        "backend": "ray",
        "client-resources-num-cpus": options.client_cpus,
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": cpus,
        "init-args-log-to-driver": verbose,
        "verbose": verbose,
    }
    app_dir = write_app_dir(work / "app")
    with ProcessGroup(work / "logs") as group, local_superlink(flwr_home, group, simulation=True):
        flwr_run(
            app_dir,
            flwr_home,
            group,
            run_config=run_config,
            federation_config=federation_config,
            poll=follower,
            echo=verbose,
        )
    return read_outcome(work / SERVER_DIR)


# -- 3. collect --------------------------------------------------------------------------------
def federate(
    options: FederateOptions,
    *,
    on_round: Callable[[RoundStats], None] | None = None,
    verbose: bool = False,
) -> FederateResult:
    """One federated run on a local simulation; see the module docstring."""
    from pipelines.atomic import check_output

    began = time.perf_counter()
    check_output(Path(options.out), overwrite=options.overwrite)
    own_work = options.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="tlsan-federate-")) if own_work else Path(options.work_dir)
    try:
        setup = setup_federation(options, work)
        tracker = _tracker(options, setup)
        try:
            follower = RoundFollower(
                setup.server_dir,
                options.rounds,
                run_id=tracker.run_id,
                progress=options.progress,
                on_round=on_round,
            )
            try:
                outcome = run_local(setup, options, follower, verbose=verbose)
            finally:
                follower.close()
            result = _finish(options, setup, outcome, tracker, began, logged_rounds=True)
        except BaseException:
            tracker.end("FAILED")
            raise
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return result


def setup_only(options: FederateOptions) -> Setup:
    """`--setup-only`: write the work dir for a deployment (devices, server dir) and stop."""
    if options.work_dir is None:
        raise ConfigError("--setup-only: needs --work-dir (where the devices and plan go)")
    return setup_federation(options, Path(options.work_dir))


def collect_only(options: FederateOptions) -> FederateResult:
    """`--collect`: the run dir from a work dir whose rounds ran elsewhere (`flwr run` on a
    SuperLink): its server dir's outcome, and the devices' rows where they are at hand."""
    from pipelines.atomic import check_output
    from tlsan.data import load_dataset
    from tlsan.run_dir import read_json, read_tensors
    from tlsan.train import new_model

    began = time.perf_counter()
    if options.work_dir is None:
        raise ConfigError("--collect: needs --work-dir (the one --setup-only wrote)")
    check_output(Path(options.out), overwrite=options.overwrite)
    work = Path(options.work_dir)
    record = read_json(work / WORK_FILE, "federated work dir record")
    dataset = load_dataset(Path(options.data))
    if record["dataset_hash"] != dataset.dataset_hash:
        raise ConfigError(
            f"--data {options.data}: not the dataset the work dir {work} was set up with "
            f"(dataset hash {dataset.dataset_hash} != {record['dataset_hash']})"
        )
    config = TrainConfig.from_dict(record["config"])
    model = new_model(config, dataset)
    model.load_state_dict(read_tensors(work / START_FILE, "the starting model"))
    devices = sorted(p for p in (work / DEVICES_DIR).glob("[0-9]*") if p.is_dir())
    setup = Setup(work, dataset, config, model.train(), devices, record["settings"])
    outcome = read_outcome(work / SERVER_DIR)
    tracker = _tracker(options, setup)
    try:
        return _finish(options, setup, outcome, tracker, began, logged_rounds=False)
    except BaseException:
        tracker.end("FAILED")
        raise


def _tracker(options: FederateOptions, setup: Setup) -> Any:
    """The run's MLflow run (a no-op object with --no-mlflow), started."""
    from tlsan.tracking import Tracker, TrackingOptions

    origin = setup.settings["origin"]
    tracker = Tracker(
        TrackingOptions(
            enabled=options.mlflow,
            experiment=EXPERIMENT,
            registered_model_name=None,
            tags={"federated": "true", "origin": origin},
        )
    )
    params = {**setup.config.flat(), **{f"fed_{k}": v for k, v in setup.settings.items()}}
    tags = {"dataset_hash": setup.dataset.dataset_hash, "model_kind": "tlsan"}
    tracker.start(params, tags, resume_run_id=None)
    return tracker


def _finish(
    options: FederateOptions,
    setup: Setup,
    outcome: Outcome,
    tracker: Any,
    began: float,
    *,
    logged_rounds: bool,
) -> FederateResult:
    """Put the chosen global parameters and the devices' rows into the model, evaluate
    centrally and write the run dir (atomically)."""
    from pipelines.atomic import atomic_directory
    from tlsan.federated.client import global_names, set_global
    from tlsan.federated.personal import gather_personal
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

    config, dataset, model, settings = setup.config, setup.dataset, setup.model, setup.settings
    set_global(model, {name: outcome.result[name] for name in global_names(model)})
    names = model.personal_parameter_names()
    if setup.devices:
        users, rows = gather_personal(setup.devices, names)
        model.set_personal(users, rows)
    model.eval()
    rounds_planned = int(settings["rounds"])
    wire = outcome.wire
    logged = [wire.rounds[r] for r in sorted(wire.rounds) if r <= rounds_planned]
    if not logged_rounds and tracker.run_id is not None:
        follower = RoundFollower(
            setup.server_dir, rounds_planned, run_id=tracker.run_id, progress=False
        )
        for stats in logged:
            follower.log(stats)
        follower.close()
    batch = config.eval_batch_size
    valid = evaluate_split(model, dataset, "valid", batch_size=batch).metrics
    test = evaluate_split(model, dataset, "test", batch_size=batch).metrics
    neutral = _neutral_copy(model)
    neutral_valid = evaluate_split(neutral, dataset, "valid", batch_size=batch).metrics
    neutral_test = evaluate_split(neutral, dataset, "test", batch_size=batch).metrics
    personal_round = wire.rounds.get(rounds_planned + 1)
    wall = time.perf_counter() - began
    federated = {
        "settings": settings,
        "best_round": outcome.best_round,
        "rounds_run": outcome.rounds_run,
        "rounds": [asdict(r) for r in logged],
        "personalization": {
            **outcome.personal_metrics,
            "bytes_sent": personal_round.bytes_sent if personal_round else 0,
            "bytes_received": personal_round.bytes_received if personal_round else 0,
        },
        "personal_rows": "devices" if setup.devices else "start",
        "global_model_neutral_personal": {"valid": neutral_valid, "test": neutral_test},
        "wall_seconds": wall,
    }
    extra = {
        "federated": {
            **settings,
            "best_round": outcome.best_round,
            "rounds_run": outcome.rounds_run,
        },
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
                "best_round": outcome.best_round,
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
            | {f"personalization/{metric_key(k)}": v for k, v in outcome.personal_metrics.items()}
        )
    tracker.finish(valid, test, run_dir, files)
    return FederateResult(
        run_dir=run_dir,
        valid=valid,
        test=test,
        neutral_valid=neutral_valid,
        neutral_test=neutral_test,
        rounds=[r for r in logged if r.round > 0],
        best_round=outcome.best_round,
        personalization=outcome.personal_metrics,
        clients=int(settings["clients"]),
        wall_s=wall,
        mlflow_run_id=tracker.run_id,
        wire=wire,
    )
