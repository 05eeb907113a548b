"""The ClientApp: what runs on a device, in simulation and on real hardware alike.

A device knows only its own directory (tlsan/federated/partition.py): its users' events and
examples and its personal parameters. Per message it
- `train`: loads the global parameters it was sent and its personal rows, trains both on its
  own examples for `local-epochs` (the personal rows at `personal-lr-scale` times the learning
  rate; FedProx's proximal term on the global ones), saves the personal rows back to disk and
  replies with the global parameters and two numbers (`num-examples`, `train-loss`); with
  `share-optimizer-state` its Adam starts from the averaged moments it was sent and the reply
  also carries the global parameters' moments (`tlsan.federated.optimizer_state`), while the
  personal rows' moments stay on the device from round to round, as their rows do;
- `evaluate`: scores its own validation examples with the global parameters and its personal
  rows (full ranking, history excluded) and replies with metrics only (the validation
  examples are built like the test examples, one session earlier: DESIGN.md, "Validation and
  leakage");
- `train.personalize`: puts back its personal rows as they were after the server's chosen
  round (`best-round`; the device snapshots them after every training round, keeping only
  what that choice can still need), freezes the global parameters, fine-tunes only its
  personal rows for up to `personal-epochs`, keeps the epoch that scores best on its own
  validation examples (on disk) and replies with metrics only.

Which directory: `node_config["device-dir"]` on a real device (`flower-supernode
--node-config "device-dir='...'"`); in simulation the directory of `partition-id` under the
run config's `devices-root`. Optional differential privacy uses Flower's built-in mods on the
`train` function only (`dp_mod`, set by `dp-clip`, `dp-noise`, `dp-mode` in the training
message's config, i.e. by the server's plan):
local DP (`LocalDpMod`: clip the update to `dp-clip`, add Gaussian noise of std
`dp-noise * dp-clip` before it leaves the device) or client-side clipping for central DP
(`fixedclipping_mod`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsan.errors import RunError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from torch import Tensor, nn

    from tlsan.config import TrainConfig
    from tlsan.data import Dataset

DP_DELTA = 1e-5  # delta of the per-round Gaussian mechanism for local DP
VALID_KEYS: tuple[str, ...] = ("valid-ndcg@10", "valid-hr@10", "valid-auc")


@dataclass(frozen=True)
class ClientSettings:
    """What a simulated device needs besides the messages: where devices live."""

    devices_root: str | None = None  # simulation: device dir = root / partition-id
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_mode: str = "local"
    threads: int = 1


def local_dp_epsilon(noise: float, delta: float = DP_DELTA) -> float:
    """Epsilon for `LocalDpMod` so that its noise std equals `noise * clip` (sensitivity =
    clip): std = clip * sqrt(2 ln(1.25 / delta)) / epsilon."""
    if noise <= 0:
        return math.inf
    return math.sqrt(2.0 * math.log(1.25 / delta)) / noise


# -- per-process caches (a Ray actor serves many clients one after another) ---------------------
_DATASETS: dict[str, Dataset] = {}
_MODELS: dict[str, nn.Module] = {}
_MAX_CACHED_DATASETS = 64


def device_path(context: Context, settings: ClientSettings) -> Path:
    """This node's device dir."""
    configured = context.node_config.get("device-dir")
    if configured:
        return Path(str(configured))
    if settings.devices_root is None:
        raise RunError("federate client: neither node_config['device-dir'] nor a devices root")
    from tlsan.federated.partition import device_dir

    return device_dir(Path(settings.devices_root), int(context.node_config["partition-id"]))


def load_device(device: Path) -> Dataset:
    """The device's own train/valid examples (cached per process)."""
    from tlsan.data import load_dataset
    from tlsan.federated.partition import DEVICE_SPLITS

    key = str(device)
    if key not in _DATASETS:
        if len(_DATASETS) >= _MAX_CACHED_DATASETS:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = load_dataset(device, DEVICE_SPLITS)
    return _DATASETS[key]


def device_model(config: TrainConfig, dataset: Dataset) -> nn.Module:
    """A model of the right shape (built once per process and config, weights overwritten by
    every message), with this device's item categories."""
    from tlsan.train import new_model

    key = json.dumps([config.model.__dict__, dataset.sizes.to_dict()], sort_keys=True)
    model = _MODELS.get(key)
    if model is None:
        model = new_model(config, dataset, seed=config.seed)
        _MODELS.clear()
        _MODELS[key] = model
    else:
        model.item_category.copy_(dataset.item_category)
    return model


def global_names(model: nn.Module) -> tuple[str, ...]:
    """Trainable parameters that are not personal: the only arrays that cross the wire."""
    personal = set(model.personal_parameter_names())
    return tuple(name for name, _ in model.named_parameters() if name not in personal)


def set_global(model: nn.Module, arrays: dict[str, Any]) -> None:
    """Copy the received global arrays into the model (names and shapes must match)."""
    import torch

    params = dict(model.named_parameters())
    expected = global_names(model)
    if set(arrays) != set(expected):
        raise RunError(
            f"federate client: received arrays {sorted(arrays)}, expected the global "
            f"parameters {sorted(expected)}"
        )
    with torch.no_grad():
        for name, value in arrays.items():
            tensor = torch.as_tensor(value)
            if params[name].dim() == 0 and tensor.numel() == 1:
                tensor = tensor.reshape(())  # Flower ships 0-d arrays as shape (1,)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise RunError(
                    f"federate client: array {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def get_global(model: nn.Module) -> dict[str, Any]:
    """The global parameters as float32 numpy arrays (copies)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().numpy().copy() for name in global_names(model)}


@contextmanager
def proximal_term(model: nn.Module, names: tuple[str, ...], mu: float) -> Iterator[None]:
    """FedProx: add the gradient of `mu / 2 * ||w - w_global||^2` to every global parameter
    (gradient hooks, so `tlsan.train.train_epoch` runs unchanged; clipping sees the sum)."""
    handles = []
    if mu > 0:
        named = dict(model.named_parameters())
        for name in names:
            param = named[name]
            anchor = param.detach().clone()
            handles.append(
                param.register_hook(lambda grad, p=param, a=anchor: grad + mu * (p.detach() - a))
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def local_epochs(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    epochs: int,
    generator: torch.Generator,
    after_epoch: Callable[[int], None] | None = None,
    personal_lr_scale: float = 1.0,
    optimizer_state: Mapping[str, np.ndarray] | None = None,
    state_out: dict[str, np.ndarray] | None = None,
    users: Tensor | None = None,
    personal_state: Mapping[str, Tensor] | None = None,
    personal_state_out: dict[str, Tensor] | None = None,
) -> tuple[float, int]:
    """`epochs` passes of `tlsan.train.train_epoch` over the device's training examples,
    updating the parameters that require grad (one optimizer throughout; `after_epoch(e)` runs
    after pass e); returns (mean loss, examples seen). The personal parameters learn at
    `personal_lr_scale` times the learning rate (their own param group). The optimizer
    starts from `optimizer_state` (the global parameters' averaged Adam moments) when given,
    and `state_out` receives the moments after training (`tlsan.federated.optimizer_state`);
    likewise `personal_state` / `personal_state_out` for the personal rows of `users`, which
    the device keeps between rounds."""
    from tlsan.federated import optimizer_state as shared_state
    from tlsan.train import make_optimizer, train_epoch

    split = dataset.train
    if len(split) == 0 or epochs == 0:
        return float("nan"), 0
    optimizer = make_optimizer(model, config)
    if optimizer is None:
        raise RunError(f"federate: model kind {config.model.kind!r} has nothing to train")
    if personal_lr_scale != 1.0:
        named = dict(model.named_parameters())
        personal = [named[n] for n in model.personal_parameter_names() if named[n].requires_grad]
        ids = {id(p) for p in personal}
        group = optimizer.param_groups[0]
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        if personal and personal_lr_scale > 0:
            optimizer.add_param_group({"params": personal, "lr": group["lr"] * personal_lr_scale})
    if optimizer_state:
        shared_state.load(optimizer, model, global_names(model), optimizer_state)
    personal_names = model.personal_parameter_names()
    if personal_state and users is not None:
        shared_state.load_rows(optimizer, model, personal_names, users, personal_state)
    total, seen = 0.0, 0
    for epoch in range(1, epochs + 1):
        stats = train_epoch(model, optimizer, split, config, generator)
        total += stats.loss * stats.examples
        seen += stats.examples
        if after_epoch is not None:
            after_epoch(epoch)
    if state_out is not None:
        state_out.update(shared_state.export(optimizer, model, global_names(model)))
    if personal_state_out is not None and users is not None:
        personal_state_out.update(shared_state.export_rows(optimizer, model, personal_names, users))
    return total / max(seen, 1), seen


def evaluate_device(model: nn.Module, dataset: Dataset, config: TrainConfig) -> dict[str, float]:
    """`valid-ndcg@10`, `valid-hr@10` and `valid-auc` on the device's validation examples
    (mean over them; zeros for a device without any)."""
    from tlsan.evaluate import evaluate_model

    if len(dataset.valid) == 0:
        return dict.fromkeys(VALID_KEYS, 0.0)
    result = evaluate_model(
        model, dataset.valid, ks=(10,), batch_size=config.eval_batch_size, paper_seed=config.seed
    )
    return {f"valid-{metric}": result.metrics[metric] for metric in ("ndcg@10", "hr@10", "auc")}


# -- one message ---------------------------------------------------------------------------
@dataclass
class DeviceState:
    """A device with the received global parameters and its own personal rows loaded."""

    device: Path
    dataset: Dataset
    model: nn.Module
    config: TrainConfig
    users: Tensor
    round: int
    seed: int
    optimizer_state: dict[str, np.ndarray]  # received Adam moments (empty: start fresh)


def _open(msg: Message, context: Context, settings: ClientSettings) -> DeviceState:
    import torch

    from tlsan.config import TrainConfig
    from tlsan.federated.partition import device_users
    from tlsan.federated.personal import load_personal

    torch.set_num_threads(max(1, settings.threads))
    config_record = msg.content["config"]
    config = TrainConfig.from_dict(json.loads(str(config_record["train-config"])))
    device = device_path(context, settings)
    dataset = load_device(device)
    model = device_model(config, dataset)
    from tlsan.federated import optimizer_state

    received = msg.content["arrays"]
    params, opt_state = optimizer_state.split({name: received[name].numpy() for name in received})
    set_global(model, params)
    users = torch.from_numpy(device_users(device))
    names = model.personal_parameter_names()
    stored = load_personal(device, names, users)
    with torch.no_grad():  # other users' rows: zeros, whichever device this process ran before
        for name, param in model.named_parameters():
            if name in names:
                param.zero_()
    model.set_personal(users, {name: stored[name] for name in names})
    return DeviceState(
        device,
        dataset,
        model,
        config,
        users,
        int(config_record.get("server-round", 0)),
        int(config_record.get("seed", config.seed)),
        opt_state,
    )


def _generator(state: DeviceState, context: Context, salt: int) -> torch.Generator:
    """Per device, round and task: reproducible negatives and shuffles."""
    import torch

    from tlsan.federated.partition import device_client

    client = device_client(state.device)
    seed = (state.seed * 1_000_003 + client * 7_919 + state.round * 101 + salt) % (2**63)
    torch.manual_seed(seed)  # dropout, if the config has any
    return torch.Generator().manual_seed(seed)


def _save_personal(state: DeviceState) -> None:
    from tlsan.federated.personal import save_personal

    save_personal(state.device, state.users, state.model.get_personal(state.users))


def _personal_moments(state: DeviceState) -> dict[str, Tensor]:
    """The personal rows' Adam moments this device kept from its last round (none before its
    first)."""
    from tlsan.federated import optimizer_state
    from tlsan.federated.personal import PERSONAL_STATE_FILE, USERS_KEY, load_personal

    if not (state.device / PERSONAL_STATE_FILE).is_file():
        return {}
    names = [
        state_name
        for name in state.model.personal_parameter_names()
        for state_name in optimizer_state.moment_names(name)
    ]
    stored = load_personal(
        state.device, [*names, optimizer_state.STEP], state.users, file=PERSONAL_STATE_FILE
    )
    stored.pop(USERS_KEY)
    return stored


def handle_train(msg: Message, context: Context, settings: ClientSettings) -> Message:
    """Local training of global + personal parameters; only the global ones are returned."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from tlsan.federated.personal import prune_snapshots, snapshot_personal, snapshot_rounds

    state = _open(msg, context, settings)
    config_record = msg.content["config"]
    if not snapshot_rounds(state.device):  # the rows before this device's first training
        snapshot_personal(state.device, 0)
    epochs = int(config_record.get("local-epochs", 1))
    mu = float(config_record.get("proximal-mu", 0.0))
    scale = float(config_record.get("personal-lr-scale", 1.0))
    share = bool(config_record.get("share-optimizer-state", False))
    lr_scale = float(config_record.get("lr-scale", 1.0))
    model = state.model
    moments: dict[str, np.ndarray] = {}
    kept = _personal_moments(state) if share else {}
    personal_moments: dict[str, Tensor] = {}
    with proximal_term(model, global_names(model), mu):
        loss, seen = local_epochs(
            model,
            state.dataset,
            state.config.override(lr=state.config.lr * lr_scale),
            epochs=epochs,
            generator=_generator(state, context, 1),
            personal_lr_scale=scale,
            optimizer_state=state.optimizer_state if share else None,
            state_out=moments if share else None,
            users=state.users,
            personal_state=kept,
            personal_state_out=personal_moments if share else None,
        )
    _save_personal(state)
    if personal_moments:
        from tlsan.federated.personal import PERSONAL_STATE_FILE, save_personal

        save_personal(state.device, state.users, personal_moments, file=PERSONAL_STATE_FILE)
    snapshot_personal(state.device, state.round)
    prune_snapshots(state.device, int(config_record.get("best-round", 0)))
    reply = {**get_global(model), **moments}  # moments: empty unless shared
    arrays = ArrayRecord({k: Array(v) for k, v in reply.items()})
    metrics = MetricRecord(
        {"num-examples": len(state.dataset.train), "train-loss": 0.0 if seen == 0 else loss}
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, settings: ClientSettings) -> Message:
    """Validation metrics of the global model with this device's personal rows."""
    from flwr.app import Message, MetricRecord, RecordDict

    state = _open(msg, context, settings)
    metrics: dict[str, Any] = {"num-examples": len(state.dataset.valid)}
    metrics.update(evaluate_device(state.model, state.dataset, state.config))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_personalize(msg: Message, context: Context, settings: ClientSettings) -> Message:
    """Fine-tune only the personal rows against the final global parameters and keep the
    epoch (0 = no fine-tuning) that scores best on the device's own validation examples
    (ndcg@10, ties broken by auc): the device's own checkpoint selection. `valid-ndcg@10-before/after` report that score."""
    from flwr.app import Message, MetricRecord, RecordDict

    from tlsan.federated.personal import restore_personal

    config_record = msg.content["config"]
    if "best-round" in config_record:  # the rows that go with the chosen global model
        restore_personal(device_path(context, settings), int(config_record["best-round"]))
    state = _open(msg, context, settings)
    epochs = int(config_record.get("personal-epochs", 10))
    lr = float(config_record.get("personal-lr", state.config.lr))
    model = state.model
    personal = set(model.personal_parameter_names())

    def score() -> tuple[float, float]:
        metrics = evaluate_device(model, state.dataset, state.config)
        return metrics["valid-ndcg@10"], metrics["valid-auc"]

    before = score()
    best = {"score": before, "epoch": 0, "rows": model.get_personal(state.users)}

    def keep_best(epoch: int) -> None:
        current = score()
        if current > best["score"]:
            best.update(score=current, epoch=epoch, rows=model.get_personal(state.users))

    for name, param in model.named_parameters():
        param.requires_grad_(name in personal)  # the optimizer only sees personal rows
    try:
        loss, seen = local_epochs(
            model,
            state.dataset,
            state.config.override(lr=lr),
            epochs=epochs,
            generator=_generator(state, context, 2),
            after_epoch=keep_best if len(state.dataset.valid) else None,
            users=state.users,
            personal_state=_personal_moments(state),  # Adam continues, as in the rounds
        )
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
    if len(state.dataset.valid):
        model.set_personal(state.users, best["rows"])
    _save_personal(state)
    metrics = {
        "num-examples": len(state.dataset.valid),
        "personal-loss": 0.0 if seen == 0 else loss,
        "personal-epoch": best["epoch"] if len(state.dataset.valid) else epochs,
        "valid-ndcg@10-before": before[0],
        "valid-ndcg@10-after": best["score"][0] if len(state.dataset.valid) else before[0],
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def settings_from(context: Context, msg: Message | None = None) -> ClientSettings:
    """The device's settings: where simulated devices live and its torch threads from the run
    config (`[tool.flwr.app.config]`, overridden by `flwr run --run-config`), the DP settings
    from the training message's config (the server's plan, so that they match its strategy)."""
    config = context.run_config
    root = str(config.get("devices-root", "") or "")
    sent: Any = {}
    if msg is not None and "config" in msg.content.config_records:
        sent = msg.content.config_records["config"]
    return ClientSettings(
        devices_root=root or None,
        dp_clip=float(sent.get("dp-clip", 0.0)),
        dp_noise=float(sent.get("dp-noise", 0.0)),
        dp_mode=str(sent.get("dp-mode", "local")),
        threads=int(config.get("client-threads", 1)),
    )


def dp_mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower's DP mods as the plan asks (`dp-clip`, `dp-noise`, `dp-mode` in the training
    message's config), on `train` messages only: local DP (`LocalDpMod`: clip the update to
    `dp-clip`, add noise of std `dp-noise * dp-clip`) or the client-side clipping of central
    DP (`fixedclipping_mod`); without `dp-clip`, nothing."""
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

    settings = settings_from(context, msg)
    if settings.dp_clip <= 0:
        return call_next(msg, context)
    if settings.dp_mode == "central":
        return fixedclipping_mod(msg, context, call_next)
    local = LocalDpMod(
        clipping_norm=settings.dp_clip,
        sensitivity=settings.dp_clip,
        epsilon=local_dp_epsilon(settings.dp_noise),
        delta=DP_DELTA,
    )
    return local(msg, context, call_next)


def build_client_app() -> ClientApp:
    """The ClientApp: the three handlers, with `dp_mod` on `train`."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train(mods=[dp_mod])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings_from(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, settings_from(context))

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        return handle_personalize(msg, context, settings_from(context))

    return app
