"""The ServerApp: a Flower strategy (FedAvg or FedProx, optionally with DP) over the global
parameters, a meter on everything that crosses the wire, and the final personalization round.

The server only ever holds global parameters (never `E_u` or `P`), the ConfigRecord it sends,
and the clients' aggregate metrics. `MeteredStrategy` wraps the chosen strategy and sees every
message before Flower's aggregation does: it counts bytes per round and direction, rejects
replies that carry anything but the expected global arrays, and (with `WireLog(keep=True)`)
keeps copies of what arrived so a test can audit them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tlsan.errors import ConfigError, RunError
from tlsan.federated import optimizer_state
from tlsan.federated.client import VALID_KEYS

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm")
DP_MODES: tuple[str, ...] = ("local", "central")
WEIGHT_KEY = "num-examples"
PERSONALIZE = "train.personalize"
# What a client may report besides its arrays; anything else is refused at the server.
TRAIN_METRIC_KEYS = frozenset({WEIGHT_KEY, "train-loss"})
EVAL_METRIC_KEYS = frozenset({WEIGHT_KEY, *VALID_KEYS})
PERSONAL_METRIC_KEYS = frozenset(
    {WEIGHT_KEY, "personal-loss", "personal-epoch", "valid-ndcg@10-before", "valid-ndcg@10-after"}
)


@dataclass
class RoundStats:
    """One round as the server saw it (MLflow logs these with step = round)."""

    round: int
    clients: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    train_loss: float = float("nan")
    valid: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    eval_seconds: float = 0.0  # of `seconds`: sending the model to the panel and its replies
    eval_clients: int = 0  # clients on the validation panel
    lr_scale: float = 1.0  # the clients' learning rate that round, relative to the config's

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the round; round 0 (the starting parameters) has only
        validation metrics."""
        valid = {f"valid_{k}": v for k, v in self.valid.items()}
        if self.round == 0:
            return valid
        out = {
            "clients": float(self.clients),
            "bytes_sent": float(self.bytes_sent),
            "bytes_received": float(self.bytes_received),
            "train_loss": self.train_loss,
            "round_seconds": self.seconds,
            "eval_seconds": self.eval_seconds,
            "lr_scale": self.lr_scale,
        }
        out.update(valid)
        return out


@dataclass
class Received:
    """A copy of one reply's content as it reached the server (for audits)."""

    round: int
    kind: str  # message type: train, evaluate, train.personalize
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    configs: dict[str, Any]
    record_names: list[str]
    node: int = 0  # the node that sent it


@dataclass
class WireLog:
    """Traffic per round; with `keep`, copies of every reply the server received and of the
    arrays it sent (once per round and message type: every client gets the same)."""

    keep: bool = False
    rounds: dict[int, RoundStats] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    sent_names: set[str] = field(default_factory=set)
    sent_arrays: dict[tuple[int, str], dict[str, np.ndarray]] = field(default_factory=dict)

    def stats(self, server_round: int) -> RoundStats:
        return self.rounds.setdefault(server_round, RoundStats(server_round))

    def record_sent(self, server_round: int, messages: list[Message]) -> None:
        stats = self.stats(server_round)
        for msg in messages:
            stats.bytes_sent += message_bytes(msg)
            for record in msg.content.array_records.values():
                self.sent_names.update(record.keys())
                key = (server_round, msg.metadata.message_type)
                if self.keep and key not in self.sent_arrays:
                    self.sent_arrays[key] = {k: a.numpy().copy() for k, a in record.items()}

    def record_received(self, server_round: int, replies: list[Message]) -> None:
        stats = self.stats(server_round)
        for msg in replies:
            if msg.has_error():
                continue
            stats.bytes_received += message_bytes(msg)
            if self.keep:
                content = msg.content
                arrays = {
                    f"{rec}/{name}": array.numpy().copy()
                    for rec, record in content.array_records.items()
                    for name, array in record.items()
                }
                metrics = {
                    f"{rec}/{name}": value
                    for rec, record in content.metric_records.items()
                    for name, value in record.items()
                }
                configs = {
                    f"{rec}/{name}": value
                    for rec, record in content.config_records.items()
                    for name, value in record.items()
                }
                self.received.append(
                    Received(
                        server_round,
                        msg.metadata.message_type,
                        arrays,
                        metrics,
                        configs,
                        list(content.keys()),
                        int(msg.metadata.src_node_id),
                    )
                )


def message_bytes(msg: Message) -> int:
    """Payload bytes of a message: its records as Flower counts them (arrays' serialized
    bytes plus keys, 8 bytes per scalar); transport framing is not included."""
    return int(sum(record.count_bytes() for record in msg.content.values()))


def _raise_errors(kind: str, replies: list[Message]) -> None:
    """A failing client stops the run with its reason instead of silently shrinking rounds."""
    errors = [msg for msg in replies if msg.has_error()]
    if errors:
        first = errors[0]
        raise RunError(
            f"federate: {len(errors)} client(s) failed in {kind} (first, node "
            f"{first.metadata.src_node_id}: {first.error.reason})"
        )


def check_reply(
    msg: Message, expected: dict[str, tuple[int, ...]], metric_keys: frozenset[str]
) -> None:
    """Refuse a reply that carries anything but float32 arrays with exactly the names and
    shapes of the global parameters (plus, when shared, their Adam moments: see
    `tlsan.federated.optimizer_state`), and the allowed scalar metrics."""
    content = msg.content
    for rec, record in content.array_records.items():
        names = set(record.keys())
        if names != set(expected):
            extra = sorted(names - set(expected)) or sorted(names)
            raise RunError(
                f"federate: client reply {rec!r} carries arrays {extra}; expected exactly the "
                "global parameters (and, when shared, their optimizer state)"
            )
        for name, array in record.items():
            shape = tuple(array.shape)
            if array.dtype != "float32" or (shape != expected[name] and math.prod(shape) != 1):
                raise RunError(
                    f"federate: client array {name!r} is {array.dtype} {shape}; expected "
                    f"float32 {expected[name]}"
                )
    for record in content.metric_records.values():
        extra = sorted(set(record.keys()) - metric_keys)
        if extra:
            raise RunError(f"federate: client reply carries unexpected metrics {extra}")
    if content.config_records:
        raise RunError("federate: client replies must not carry ConfigRecords")


class MeteredStrategy:
    """Wraps a Flower strategy: meters traffic, checks replies, reports each finished round.

    It subclasses `flwr.serverapp.strategy.Strategy` at runtime (see `metered`), so
    `Strategy.start` or `run_rounds` can drive it; the wrapped strategy samples the training
    clients and aggregates. Evaluation goes to a fixed panel (`evaluation_panel`): the same
    clients every round, so that rounds are compared on the same validation examples.
    `expected` maps each global parameter name to its shape.
    """

    def __init__(
        self,
        inner: Strategy,
        log: WireLog,
        expected: dict[str, tuple[int, ...]],
        on_round: Callable[[RoundStats], None] | None = None,
        eval_fraction: float = 1.0,
        seed: int = 0,
        clients: int = 1,
    ) -> None:
        self.inner = inner
        self.clients = clients  # how many nodes to wait for before drawing the panel
        self.log = log
        self.expected = expected
        self.on_round = on_round
        self.eval_fraction = eval_fraction
        self.seed = seed
        self.panel: list[int] | None = None
        self._round_start = time.perf_counter()
        self._eval_start = time.perf_counter()

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.log.record_sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        _raise_errors("training", replies)
        for msg in replies:
            check_reply(msg, self.expected, TRAIN_METRIC_KEYS)
        self.log.record_received(server_round, replies)
        stats = self.log.stats(server_round)
        stats.clients = len(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if metrics is not None and "train-loss" in metrics:
            stats.train_loss = float(metrics["train-loss"])
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        from flwr.app import Message, MessageType, RecordDict

        if server_round == 0:  # the starting parameters: an evaluation-only round
            self._round_start = time.perf_counter()
        if self.panel is None:
            nodes = wait_for_nodes(grid, self.clients)
            self.panel = evaluation_panel(nodes, self.eval_fraction, self.seed)
        self._eval_start = time.perf_counter()
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        messages = [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
            for node in self.panel
        ]
        self.log.record_sent(server_round, messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        _raise_errors("evaluation", replies)
        for msg in replies:
            if msg.content.array_records:
                raise RunError("federate: evaluation replies must not carry arrays")
            check_reply(msg, self.expected, EVAL_METRIC_KEYS)
        self.log.record_received(server_round, replies)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        stats = self.log.stats(server_round)
        if metrics is not None:
            stats.valid = {
                k.removeprefix("valid-"): float(v) for k, v in metrics.items() if k != WEIGHT_KEY
            }
        now = time.perf_counter()
        stats.seconds = now - self._round_start
        stats.eval_seconds = now - self._eval_start
        stats.eval_clients = len(replies)
        if self.on_round is not None:
            self.on_round(stats)
        return metrics


def metered(
    inner: Strategy,
    log: WireLog,
    expected: dict[str, tuple[int, ...]],
    on_round: Callable[[RoundStats], None] | None = None,
    eval_fraction: float = 1.0,
    seed: int = 0,
    clients: int = 1,
) -> Strategy:
    """`MeteredStrategy` as a real `Strategy` subclass (Flower is imported lazily)."""
    from flwr.serverapp.strategy import Strategy

    cls = type("MeteredFlowerStrategy", (MeteredStrategy, Strategy), {})
    return cls(inner, log, expected, on_round, eval_fraction, seed, clients)


def wait_for_nodes(grid: Grid, count: int, poll_s: float = 0.5) -> list[int]:
    """The connected node ids, once at least `count` are connected (SuperNodes and simulated
    nodes register asynchronously)."""
    while len(nodes := sorted(grid.get_node_ids())) < count:
        time.sleep(poll_s)
    return nodes


def panel_size(eval_fraction: float, clients: int) -> int:
    """How many clients evaluate each round: the fraction of them, rounded, at least one
    (none only for a fraction of 0)."""
    if eval_fraction <= 0 or clients == 0:
        return 0
    return min(clients, max(1, round(eval_fraction * clients)))


def evaluation_panel(nodes: list[int], eval_fraction: float, seed: int) -> list[int]:
    """The clients that report validation metrics in every round: a seeded sample of
    `eval_fraction` of them, drawn once. One panel for all rounds compares each round with
    the others on the same examples (the difference between two rounds is measured on the
    same users), which a fresh sample per round would not; the price is that the panel's
    level is not the whole population's, which the choice of a round does not need."""
    size = panel_size(eval_fraction, len(nodes))
    return sorted(random.Random(seed).sample(sorted(nodes), size))


def weighted_mean(records: list[Any], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric (zero total weight -> NaN, not a crash)."""
    from flwr.app import MetricRecord

    totals: dict[str, float] = {}
    weight_sum = 0.0
    for content in records:
        record = next(iter(content.metric_records.values()))
        weight = float(record[weight_key])
        weight_sum += weight
        for key, value in record.items():
            if key != weight_key:
                totals[key] = totals.get(key, 0.0) + weight * float(value)
    out = {k: (v / weight_sum if weight_sum > 0 else float("nan")) for k, v in totals.items()}
    out[weight_key] = int(weight_sum)
    return MetricRecord(out)


@dataclass(frozen=True)
class StrategySpec:
    """How the server aggregates: strategy, sampling and differential privacy."""

    name: str = "fedavg"
    clients_per_round: int = 10
    total_clients: int = 10
    eval_fraction: float = 1.0
    proximal_mu: float = 0.01
    server_momentum: float = 0.9  # fedavgm
    server_lr: float = 1.0  # fedavgm
    dp_clip: float = 0.0  # 0 = no DP
    dp_noise: float = 0.0
    dp_mode: str = "local"

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(
                f"--strategy: expected one of {', '.join(STRATEGIES)}, got {self.name!r}"
            )
        if self.dp_mode not in DP_MODES:
            raise ConfigError(
                f"--dp-mode: expected one of {', '.join(DP_MODES)}, got {self.dp_mode!r}"
            )
        if self.clients_per_round < 1:
            raise ConfigError(f"--clients-per-round: expected >= 1, got {self.clients_per_round}")
        if self.clients_per_round > self.total_clients:
            raise ConfigError(
                f"--clients-per-round: expected at most the number of clients "
                f"({self.total_clients}), got {self.clients_per_round}"
            )
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ConfigError(
                f"--eval-fraction: expected a value in [0, 1], got {self.eval_fraction}"
            )
        if not 0.0 <= self.server_momentum < 1.0 or self.server_lr <= 0:
            raise ConfigError(
                f"--server-momentum/--server-lr: expected a momentum in [0, 1) and a positive "
                f"rate, got {self.server_momentum}/{self.server_lr}"
            )
        if self.proximal_mu < 0:
            raise ConfigError(f"--proximal-mu: expected >= 0, got {self.proximal_mu}")
        if self.dp_clip < 0 or self.dp_noise < 0:
            raise ConfigError(
                f"--dp-clip/--dp-noise: expected values >= 0, got {self.dp_clip}/{self.dp_noise}"
            )
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise ConfigError("--dp-noise: needs --dp-clip > 0 (noise is scaled by the clip norm)")

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0


def make_strategy(spec: StrategySpec) -> Strategy:
    """FedAvg, FedProx or FedAvgM (server momentum) sampling exactly `clients_per_round`
    clients per round, wrapped in Flower's central-DP wrapper when `dp_mode == "central"`
    (clients clip with `fixedclipping_mod`; the server adds noise of std
    `dp_noise * dp_clip / clients`)."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        FedAvg,
        FedAvgM,
        FedProx,
    )

    n_eval = panel_size(spec.eval_fraction, spec.total_clients)  # (MeteredStrategy's panel)
    common: dict[str, Any] = {
        # fraction * total rounds down; the minimum then fixes the sample at exactly C
        "fraction_train": 1e-9,
        "min_train_nodes": spec.clients_per_round,
        "fraction_evaluate": 1e-9 if n_eval > 0 else 0.0,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": spec.total_clients,
        "weighted_by_key": WEIGHT_KEY,
        "train_metrics_aggr_fn": weighted_mean,
        "evaluate_metrics_aggr_fn": weighted_mean,
    }
    strategy: Strategy
    if spec.name == "fedprox":
        strategy = FedProx(proximal_mu=spec.proximal_mu, **common)
    elif spec.name == "fedavgm":
        strategy = FedAvgM(
            server_learning_rate=spec.server_lr, server_momentum=spec.server_momentum, **common
        )
    else:
        strategy = FedAvg(**common)
    if spec.dp and spec.dp_mode == "central":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=spec.dp_noise,
            clipping_norm=spec.dp_clip,
            num_sampled_clients=spec.clients_per_round,
        )
    return strategy


@dataclass
class ServerPlan:
    """Everything the ServerApp needs; `result` is filled in when it finishes."""

    initial: dict[str, np.ndarray]  # global parameter name -> array
    rounds: int
    spec: StrategySpec
    train_config: dict[str, Any]  # sent to clients in every training round
    personal_config: dict[str, Any]  # sent with the final personalization round
    seed: int = 0
    personalize: bool = True
    personalize_chunk: int = 256
    log: WireLog = field(default_factory=WireLog)
    on_round: Callable[[RoundStats], None] | None = None
    result: dict[str, np.ndarray] | None = None
    personal_metrics: dict[str, float] = field(default_factory=dict)
    select: str = "valid-ndcg@10"  # federated validation metric that picks the round
    patience: int = 0  # stop after this many rounds without improvement, 0 = never
    min_rounds: int = 0  # ...but never before this round (the early plateau)
    # after a round without improvement the clients' learning rate is multiplied by this
    lr_decay: float = 1.0
    # a round improves (resetting patience and lr decay) only if it beats the best by more
    min_delta: float = 0.0
    evaluate_start: bool = True  # also evaluate the starting parameters (round 0)
    # clients also send (and get back, averaged) Adam's moments of the global parameters
    share_optimizer_state: bool = False
    best_round: int = 0
    rounds_run: int = 0


def _config_record(values: dict[str, Any]) -> ConfigRecord:
    from flwr.app import ConfigRecord

    return ConfigRecord(dict(values))


def run_personalization(grid: Grid, arrays: ArrayRecord, plan: ServerPlan) -> dict[str, float]:
    """Send the final global parameters to every client with `train.personalize`: each
    fine-tunes its personal parameters locally and replies with metrics only."""
    from flwr.app import Message, RecordDict

    nodes = sorted(grid.get_node_ids())
    config = _config_record({**plan.personal_config, "best-round": plan.best_round})
    content = RecordDict({"arrays": arrays, "config": config})
    step = plan.rounds + 1
    replies: list[Message] = []
    for start in range(0, len(nodes), plan.personalize_chunk):
        messages = [
            Message(content=content, dst_node_id=node, message_type=PERSONALIZE)
            for node in nodes[start : start + plan.personalize_chunk]
        ]
        plan.log.record_sent(step, messages)
        got = list(grid.send_and_receive(messages))
        _raise_errors("personalization", got)
        for msg in got:
            if msg.content.array_records:
                raise RunError("federate: personalization replies must not carry arrays")
            check_reply(msg, {}, PERSONAL_METRIC_KEYS)
        plan.log.record_received(step, got)
        replies.extend(got)
    if len(replies) != len(nodes):
        raise RunError(f"federate: {len(nodes) - len(replies)} client(s) never personalized")
    aggregated = weighted_mean([msg.content for msg in replies], WEIGHT_KEY)
    return {k: float(v) for k, v in aggregated.items()}


def run_server(grid: Grid, plan: ServerPlan) -> None:
    """The ServerApp's work for one federated run: the rounds, then personalization; fills in
    `plan.result`, `plan.best_round`, `plan.rounds_run` and `plan.personal_metrics`."""
    from flwr.app import Array, ArrayRecord

    random.seed(plan.seed)  # Flower's node sampling uses the global `random`
    names = tuple(plan.initial)
    shapes = {name: tuple(np.shape(value)) for name, value in plan.initial.items()}
    if plan.share_optimizer_state:
        shapes.update(optimizer_state.state_shapes(shapes))
    strategy = metered(
        make_strategy(plan.spec),
        plan.log,
        shapes,
        plan.on_round,
        eval_fraction=plan.spec.eval_fraction,
        seed=plan.seed,
        clients=plan.spec.total_clients,
    )
    strategy.summary()
    start = dict(plan.initial)
    if plan.share_optimizer_state:
        start.update(optimizer_state.fresh(plan.initial))
    initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in start.items()})
    arrays = run_rounds(grid, strategy, initial, plan)
    if plan.personalize:
        plan.personal_metrics = run_personalization(grid, parameters_only(arrays), plan)
    plan.result = {name: arrays[name].numpy() for name in names}


def parameters_only(arrays: ArrayRecord) -> ArrayRecord:
    """`arrays` without the optimizer state (evaluation and personalization need none)."""
    from flwr.app import ArrayRecord

    keep = {k: v for k, v in arrays.items() if not k.startswith(optimizer_state.PREFIX)}
    return arrays if len(keep) == len(arrays) else ArrayRecord(keep)


def stop_early(bad: int, server_round: int, patience: int, min_rounds: int) -> bool:
    """Whether `bad` rounds without improvement end the loop after `server_round`: never with
    patience 0, never before `min_rounds`. From scratch the federated validation score climbs
    to the popularity level in a few rounds and can sit there for five or more before the
    global model learns the sequences, so patience alone may stop on that plateau."""
    return patience > 0 and bad >= patience and server_round >= min_rounds


def run_rounds(
    grid: Grid, strategy: Strategy, initial: ArrayRecord, plan: ServerPlan
) -> ArrayRecord:
    """Flower's round loop (as in `Strategy.start`: configure, send, aggregate; train, then
    evaluate), plus checkpoint selection: the global parameters of the round with the best
    federated validation `plan.select` (round 0 = the starting parameters) win, and with
    `plan.patience` the loop stops after that many rounds without improvement. Every round
    without improvement also multiplies the clients' learning rate by `plan.lr_decay` (sent
    as `lr-scale`), as a central `ReduceLROnPlateau` with patience 1 would. A round improves
    when it beats the value of the last improving round by more than `plan.min_delta` (as
    early stopping's `min_delta`: noise smaller than that does not reset the patience);
    the kept round is the best one whatever `min_delta`."""
    eval_config = _config_record(plan.train_config)

    def evaluate(server_round: int, arrays: ArrayRecord) -> float | None:
        params = parameters_only(arrays)  # evaluation needs no optimizer state
        messages = strategy.configure_evaluate(server_round, params, eval_config, grid)
        metrics = strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))
        if metrics is None or plan.select not in metrics:
            return None
        value = float(metrics[plan.select])
        return None if math.isnan(value) else value

    arrays = initial
    best, best_value, plan.best_round = initial, None, 0
    if plan.evaluate_start:
        best_value = evaluate(0, initial)
    reference, bad, lr_scale = best_value, 0, 1.0  # reference: the last improvement's value
    for server_round in range(1, plan.rounds + 1):
        plan.log.stats(server_round).lr_scale = lr_scale
        train_config = _config_record(
            {**plan.train_config, "lr-scale": lr_scale, "best-round": plan.best_round}
        )
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        aggregated, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        if aggregated is not None:
            arrays = aggregated
        value = evaluate(server_round, arrays)
        if value is None or best_value is None or value > best_value:
            best, best_value, plan.best_round = arrays, value, server_round
        if value is None or reference is None or value > reference + plan.min_delta:
            reference, bad = value, 0
        else:
            bad += 1
            lr_scale *= plan.lr_decay
        if stop_early(bad, server_round, plan.patience, plan.min_rounds):
            break
    plan.rounds_run = server_round
    return best
