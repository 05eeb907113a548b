"""`tlsan federate`: federated TLSAN with per-user personal parameters, run by `flwr run`.

A tiny synthetic dataset (40 users) and two short simulations (2 rounds, 3 of 8 clients per
round, each `flwr run` against a private SuperLink in simulation mode), each shared by the
tests that inspect it: the default FedAvg run, audited at the server (the ServerApp keeps
copies of everything it sent and received in its server dir), and a FedProx run with
client-side clipping (Flower's LocalDpMod). A deployment test runs the same app on a real
SuperLink and SuperNodes (tests/test_federated_deployment.py). Everything else (partitioning,
device files, personal-parameter files, flag errors) runs without Flower.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.config import PrepareConfig, SessionRule
from pipelines.prepare import prepare_dataset
from pipelines.synthetic import generate_log
from tlsan.cli import main
from tlsan.config import default_config
from tlsan.data import load_dataset
from tlsan.errors import ConfigError, RunError
from tlsan.federated import optimizer_state
from tlsan.federated.client import VALID_KEYS, global_names, local_epochs
from tlsan.federated.optimizer_state import STEP
from tlsan.federated.partition import (
    assign_clients,
    device_dir,
    device_users,
    parse_client_unit,
    write_devices,
)
from tlsan.federated.personal import (
    PERSONAL_FILE,
    PERSONAL_STATE_FILE,
    load_personal,
    prune_snapshots,
    restore_personal,
    save_personal,
    snapshot_personal,
    snapshot_rounds,
)
from tlsan.federated.run import FederateOptions, FederateResult, federate
from tlsan.federated.server import WEIGHT_KEY, StrategySpec, WireLog, make_strategy, stop_early
from tlsan.run_dir import load_run

N_USERS = 40
# the default recipe on a small network, so the tests stay fast whatever the preset's sizes
CONFIG = default_config("tlsan").override(
    d_item=16, d_cat=16, heads=4, batch_size=64, negatives=4, threads=1, seed=5
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 users, 60 items, leave-one-out examples: every user has training examples."""
    root = tmp_path_factory.mktemp("fed-data")
    log = generate_log(root / "log", users=N_USERS, items=60, events=1_200, seed=3, categories=5)
    config = PrepareConfig(
        interactions=log.interactions,
        items=log.items_file,
        split="leave-one-out",
        session=SessionRule.parse("gap:30m"),
    )
    return prepare_dataset(config, root / "data", progress=False).path


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away SQLite MLflow store for this module (never the repo's mlruns/)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@dataclass
class Simulated:
    result: FederateResult
    wire: WireLog
    options: FederateOptions
    work: Path


def _simulate(tmp: Path, data: Path, **overrides: object) -> Simulated:
    values: dict[str, object] = {
        "data": data,
        "out": tmp / "run",
        "rounds": 2,
        "clients_per_round": 3,
        "client_unit": "cohort:5",
        "config": CONFIG,
        "local_epochs": 1,
        "personal_epochs": 5,
        "work_dir": tmp / "work",
        "progress": False,
        "audit": True,
        "eval_fraction": 1.0,  # every client on the validation panel unless a test says
    }
    values.update(overrides)
    options = FederateOptions(**values)  # type: ignore[arg-type]
    result = federate(options)
    return Simulated(result, result.wire, options, tmp / "work")


@pytest.fixture(scope="module")
def fedavg(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tracking_uri: str
) -> Simulated:
    return _simulate(tmp_path_factory.mktemp("fedavg"), tiny_data, mlflow=True)


@pytest.fixture(scope="module")
def fedprox_clipped(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Simulated:
    return _simulate(
        tmp_path_factory.mktemp("fedprox"),
        tiny_data,
        strategy="fedprox",
        proximal_mu=0.1,
        dp_clip=0.05,
        dp_noise=0.0,
        dp_mode="local",
        mlflow=False,
        local_epochs=2,
    )


# -- what the server receives ------------------------------------------------------------------
def _personal_rows(sim: Simulated) -> dict[str, np.ndarray]:
    """Every personal row any user had: as provisioned, as gathered, as on the devices."""
    run = load_run(sim.result.run_dir)
    state = run.model.state_dict()
    rows = {name: [state[name][1:].numpy()] for name in run.model.personal_parameter_names()}
    for device in sorted((sim.work / "devices").iterdir()):
        if device.is_dir():
            stored = load_personal(device, rows)
            for name in rows:
                rows[name].append(stored[name].numpy())
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def _matches_any_row(array: np.ndarray, rows: np.ndarray) -> bool:
    """Does some row of `array` (viewed with the rows' width) equal some personal row?"""
    width = rows.shape[1]
    if array.size == 0 or array.size % width:
        return False
    candidates = array.reshape(-1, width).astype(np.float64)
    diff = np.abs(candidates[:, None, :] - rows[None, :, :].astype(np.float64)).max(-1)
    return bool((diff < 1e-6).any())


def _clients_valid_ndcg(run_dir: Path, data: Path) -> float:
    """NDCG@10 of a run dir's model on the validation examples of the users that are some
    client's (those with training examples), scored centrally."""
    from tlsan.evaluate import evaluate_model

    dataset = load_dataset(data)
    model = load_run(run_dir, dataset).model
    clients = torch.unique(dataset.train.arrays.user)
    rows = torch.nonzero(torch.isin(dataset.valid.arrays.user, clients)).flatten()
    split = dataset.subset("valid", rows)
    return float(evaluate_model(model, split, ks=(10,)).metrics["ndcg@10"])


def _weighted_round_metric(sim: Simulated, server_round: int, key: str) -> float:
    """The example-weighted mean of one metric over a round's evaluation replies."""
    replies = [r for r in sim.wire.received if r.kind == "evaluate" and r.round == server_round]
    weights = [float(r.metrics[f"metrics/{WEIGHT_KEY}"]) for r in replies]
    values = [float(r.metrics[f"metrics/{key}"]) for r in replies]
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


@pytest.mark.slow
def test_server_receives_no_event_no_user_id_and_no_personal_parameter(
    fedavg: Simulated, tiny_data: Path
) -> None:
    dataset = load_dataset(tiny_data)
    run = load_run(fedavg.result.run_dir, dataset)
    model = run.model
    expected_names = set(global_names(model))
    personal_names = set(model.personal_parameter_names())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    personal = _personal_rows(fedavg)
    n_users = dataset.sizes.users

    # Adam's moments of the global parameters travel with them (--optimizer-state auto)
    moments = set(optimizer_state.state_shapes({n: shapes[n] for n in expected_names}))
    record = json.loads((fedavg.result.run_dir / "federated.json").read_text())
    assert record["settings"]["optimizer_state"] == "shared"
    assert all(any(m.endswith("." + n) for n in expected_names) for m in moments - {STEP})
    shapes |= {m: shapes[m.split(".", 2)[2]] for m in moments - {STEP}} | {STEP: (1,)}

    train = [r for r in fedavg.wire.received if r.kind == "train"]
    others = [r for r in fedavg.wire.received if r.kind != "train"]
    assert len(train) == 2 * 3  # 2 rounds x 3 clients, every reply audited
    assert {r.kind for r in others} == {"evaluate", "train.personalize"}
    # nothing personal goes out either (the averaged moments go out from round 2 on, with
    # training messages only)
    assert fedavg.wire.sent_names == expected_names | moments
    for (_, kind), sent in fedavg.wire.sent_arrays.items():
        assert set(sent) == (expected_names | moments if kind == "train" else expected_names) or (
            kind == "train" and set(sent) == expected_names  # round 1: fresh optimizers
        ), kind
    for reply in train:
        names = {key.split("/", 1)[1] for key in reply.arrays}
        assert names == expected_names | moments and not names & personal_names
        assert not {n.split(".", 2)[-1] for n in moments} & personal_names  # no personal moments
        assert reply.record_names == ["arrays", "metrics"] and not reply.configs
        assert set(reply.metrics) == {"metrics/num-examples", "metrics/train-loss"}
        for key, array in reply.arrays.items():
            name = key.split("/", 1)[1]
            assert array.dtype == np.float32, key  # no integer ids, items or timestamps
            assert tuple(array.shape) in (shapes[name], (1,) if shapes[name] == () else None)
            assert array.ndim == 0 or array.shape[0] not in (n_users, n_users - 1), key
            for pname, rows in personal.items():
                assert not _matches_any_row(array, rows), f"{key} contains a user's {pname} row"
    for reply in others:  # evaluation and personalization: a few scalars, no arrays
        assert not reply.arrays and not reply.configs
        assert all(isinstance(v, int | float) for v in reply.metrics.values())
    evaluations = [r for r in others if r.kind == "evaluate"]
    expected = {f"metrics/{key}" for key in (WEIGHT_KEY, *VALID_KEYS)}
    assert evaluations and all(set(r.metrics) == expected for r in evaluations)
    # the audit can fail: the personal tables themselves would be caught by each check
    assert _matches_any_row(model.state_dict()["E_u.weight"][1:].numpy(), personal["E_u.weight"])
    assert model.state_dict()["P"].shape[0] == n_users


@pytest.mark.slow
def test_personal_parameters_stay_on_devices_and_end_up_in_the_run_dir(
    fedavg: Simulated, tiny_data: Path
) -> None:
    run = load_run(fedavg.result.run_dir)
    state = run.model.state_dict()
    devices = sorted(p for p in (fedavg.work / "devices").iterdir() if p.is_dir())
    assert len(devices) == fedavg.result.clients == 8  # 40 users in cohorts of 5
    covered: list[int] = []
    trained_devices = 0
    for device in devices:
        users = torch.from_numpy(device_users(device))
        stored = load_personal(device, ("E_u.weight", "P"), users)
        assert torch.equal(stored["E_u.weight"], state["E_u.weight"][users])
        assert torch.equal(stored["P"], state["P"][users])
        covered += users.tolist()
        # shared optimizer state: the rows' Adam moments stay on the device between rounds
        moments = device / PERSONAL_STATE_FILE
        if moments.exists():  # (a client may sit out both rounds)
            kept = load_personal(
                device,
                [STEP, *optimizer_state.moment_names("E_u.weight")],
                users,
                file=PERSONAL_STATE_FILE,
            )
            assert kept[STEP].min() >= 1 and kept["opt.exp_avg_sq.E_u.weight"].abs().max() > 0
            trained_devices += 1
        events = pl.read_parquet(device / "events.parquet")
        assert set(events["user"].unique().to_list()) <= set(users.tolist())
        assert not (device / "examples" / "test.parquet").exists()
    train_users = sorted(set(load_dataset(tiny_data).train.arrays.user.tolist()))
    assert sorted(covered) == train_users
    assert trained_devices >= 3  # 3 clients per round
    # trained: the clients' rows moved away from the neutral rows every user started from; a
    # user who is no client's (no training example) keeps them
    idle = sorted(set(range(1, N_USERS + 1)) - set(covered))
    assert idle
    start = state["E_u.weight"][idle[0]]
    assert all(torch.equal(state["E_u.weight"][u], start) for u in idle)
    moved = (state["E_u.weight"][covered] - start).abs().amax(1)
    assert float((moved > 1e-3).double().mean()) >= 0.5  # (a client may sit out both rounds)
    assert fedavg.result.personalization["num-examples"] == len(
        load_dataset(tiny_data).valid
    ) - len(idle)


@pytest.mark.slow
def test_run_dir_works_with_tlsan_evaluate_and_export(
    fedavg: Simulated, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--run", str(fedavg.result.run_dir), "--data", str(tiny_data),
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    evaluated = json.loads(out.read_text())
    metrics = json.loads((fedavg.result.run_dir / "metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    assert evaluated["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-9)
    assert evaluated["auc"] == pytest.approx(fedavg.result.test["auc"], abs=1e-9)
    bundle = tmp_path / "bundle"
    code = main(
        ["export", "--run", str(fedavg.result.run_dir), "--data", str(tiny_data),
         "--out", str(bundle)]
    )  # fmt: skip
    assert code == 0
    assert (bundle / "manifest.json").is_file() and (bundle / "index.faiss").is_file()


@pytest.mark.slow
def test_run_dir_holds_the_selected_global_model_and_the_devices_rows(
    fedavg: Simulated, tiny_data: Path
) -> None:
    result = fedavg.result
    federated = json.loads((result.run_dir / "federated.json").read_text())
    best = federated["best_round"]
    assert 0 <= best <= 2 and federated["rounds_run"] == 2
    assert [r["round"] for r in federated["rounds"]] == [0, 1, 2]
    # what the server sent for personalization = the best round's global parameters ...
    chosen = fedavg.wire.sent_arrays[(3, "train.personalize")]
    evaluated = fedavg.wire.sent_arrays[(best, "evaluate")]
    assert chosen.keys() == evaluated.keys()
    assert all(np.array_equal(chosen[k], evaluated[k]) for k in chosen)
    # ... and exactly the global parameters of the run dir
    model = load_run(result.run_dir).model
    params = dict(model.named_parameters())
    for name, array in chosen.items():
        assert np.array_equal(params[name].detach().numpy().reshape(array.shape), array), name
    neutral = federated["global_model_neutral_personal"]
    assert neutral["test"] == result.neutral_test and neutral["valid"] == result.neutral_valid
    # fine-tuning starts from the chosen round's model, as the panel (every client) scored it
    values = {r["round"]: r["valid"]["ndcg@10"] for r in federated["rounds"]}
    personal = result.personalization
    assert personal["valid-ndcg@10-before"] == pytest.approx(values[best], rel=1e-5)
    # the rows the devices kept are the ones that scored "after" on their own validation
    # examples: the run dir's model, scored centrally on the clients' users, agrees
    after = _clients_valid_ndcg(result.run_dir, tiny_data)
    assert personal["valid-ndcg@10-after"] == pytest.approx(after, rel=1e-5)
    assert 0 <= personal["personal-epoch"] <= fedavg.options.personal_epochs


@pytest.mark.slow
def test_patience_stops_after_rounds_without_improvement(tmp_path: Path, tiny_data: Path) -> None:
    """The loop stops `patience` rounds after the best one (or at the last round) and the
    kept global model is the best round's, not the last one's."""
    sim = _simulate(
        tmp_path, tiny_data, rounds=6, patience=1, min_rounds=0, personal_epochs=1, mlflow=False
    )
    federated = json.loads((sim.result.run_dir / "federated.json").read_text())
    best, run = federated["best_round"], federated["rounds_run"]
    assert run == min(6, best + 1)
    assert max(r for r, _ in sim.wire.sent_arrays if r <= 6) == run  # no round after the stop
    values = {r["round"]: r["valid"]["ndcg@10"] for r in federated["rounds"]}
    assert values[best] == max(values.values())
    chosen = sim.wire.sent_arrays[(7, "train.personalize")]
    evaluated = sim.wire.sent_arrays[(best, "evaluate")]
    assert all(np.array_equal(chosen[k], evaluated[k]) for k in chosen)
    # ...and the devices fine-tune the personal rows that scored with it in that round, not
    # the ones the rounds after it trained further
    before = sim.result.personalization["valid-ndcg@10-before"]
    assert before == pytest.approx(values[best], rel=1e-6, abs=1e-9)
    assert not list((sim.work / "devices").glob("*/snapshots"))  # dropped once used


@pytest.mark.slow
def test_lr_decay_scales_the_clients_steps_after_rounds_without_improvement(
    tmp_path: Path, tiny_data: Path
) -> None:
    """`lr_decay` (`--lr-decay`): every round without validation improvement multiplies the
    learning rate of the following rounds, the server sends it as `lr-scale`, and the clients'
    Adam steps shrink with it (Adam's step size is the learning rate). `min_delta` 1 (no
    NDCG@10 can rise by more than 1) makes every round one without improvement, so the run
    has rounds at three rates whatever the training does; the kept round is still the best."""
    decay = 0.01
    sim = _simulate(
        tmp_path,
        tiny_data,
        rounds=3,
        lr_decay=decay,
        min_delta=1.0,
        personal_epochs=1,
        mlflow=False,
    )
    federated = json.loads((sim.result.run_dir / "federated.json").read_text())
    assert federated["settings"]["lr_decay"] == decay
    assert federated["settings"]["min_delta"] == 1.0
    rounds = federated["rounds"]
    assert [r["lr_scale"] for r in rounds[1:]] == pytest.approx([1.0, decay, decay**2])
    sent = [sim.wire.sent_arrays[(r, "train")] for r in (1, 2, 3)]
    assert all(len(s) for s in sent)
    values = {r["round"]: r["valid"]["ndcg@10"] for r in rounds}
    assert values[federated["best_round"]] == max(values.values())

    def step(r: int) -> float:
        """Mean |change| of the global parameters over round r (r + 1's train arrays, or
        the personalization's for the last round)."""
        before = sim.wire.sent_arrays[(r, "train")]
        after = sim.wire.sent_arrays[(r + 1, "train")]
        names = [n for n in before if not n.startswith(optimizer_state.PREFIX)]
        return float(np.mean([np.abs(after[n] - before[n]).mean() for n in names]))

    full, decayed = step(1), step(2)
    assert full > 0
    # Steps vary a few-fold from round to round at one rate; 100x smaller is the decay's
    assert decayed < 0.1 * full


@pytest.mark.slow
def test_cli_flags_reach_the_run(tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG.to_dict()))
    out = tmp_path / "run"
    code = main(
        ["federate", "--data", str(tiny_data), "--out", str(out), "--rounds", "2",
         "--clients-per-round", "2", "--client-unit", "cohort:10", "--config", str(config),
         "--session-fold", "0.25", "--personal-epochs", "1",
         "--optimizer-state", "local", "--min-rounds", "7", "--personal-lr-scale", "0.5",
         "--no-mlflow", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    federated = json.loads((out / "federated.json").read_text())
    assert federated["settings"]["min_rounds"] == 7
    assert federated["settings"]["personal_lr_scale"] == 0.5
    assert federated["settings"]["optimizer_state"] == "local"
    values = {r["round"]: r["valid"]["ndcg@10"] for r in federated["rounds"]}
    assert values[federated["best_round"]] == max(values.values())
    assert json.loads((out / "config.json").read_text())["config"]["session_fold"] == 0.25


@pytest.mark.slow
def test_mlflow_has_one_metric_per_round(fedavg: Simulated, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(fedavg.result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_hash"] and run.data.tags["federated"] == "true"
    for key in ("train_loss", "clients", "bytes_sent", "bytes_received", "valid_ndcg_at_10"):
        history = client.get_metric_history(run.info.run_id, key)
        steps = [0, 1, 2] if key.startswith("valid") else [1, 2]  # 0: the starting model
        assert sorted(m.step for m in history) == steps, key
    clients = client.get_metric_history(run.info.run_id, "clients")
    assert {m.value for m in clients} == {3.0}
    sent = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bytes_sent")}
    assert sent[1] == fedavg.wire.rounds[1].bytes_sent > 0
    assert run.data.metrics["test/ndcg_at_10"] == pytest.approx(fedavg.result.test["ndcg@10"])


@pytest.mark.slow
def test_local_dp_clips_every_update_and_fedprox_runs(
    fedprox_clipped: Simulated, fedavg: Simulated
) -> None:
    clip = fedprox_clipped.options.dp_clip

    def update_norms(sim: Simulated) -> list[float]:
        norms = []
        for reply in (r for r in sim.wire.received if r.kind == "train"):
            sent = sim.wire.sent_arrays[(reply.round, "train")]
            squared = sum(
                float(
                    ((a.astype(np.float64) - sent[k.split("/", 1)[1]].reshape(a.shape)) ** 2).sum()
                )
                for k, a in reply.arrays.items()
                if not k.split("/", 1)[1].startswith(optimizer_state.PREFIX)  # parameters only
            )
            norms.append(squared**0.5)
        return norms

    clipped = update_norms(fedprox_clipped)
    assert len(clipped) == 6 and max(clipped) <= clip * (1 + 1e-4)
    assert min(clipped) > 0.9 * clip  # the clip was binding, so the check above means something
    assert max(update_norms(fedavg)) > clip  # without DP, updates are larger
    settings = json.loads((fedprox_clipped.result.run_dir / "federated.json").read_text())
    assert settings["settings"]["strategy"] == "fedprox"
    assert settings["settings"]["dp_mode"] == "local"


def _train_updates(sim: Simulated, server_round: int) -> list[tuple[dict[str, np.ndarray], float]]:
    """(update = reply - global it was sent, weight) of every train reply of a round."""
    sent = sim.wire.sent_arrays[(server_round, "train")]
    updates = []
    for reply in sim.wire.received:
        if reply.kind != "train" or reply.round != server_round:
            continue
        delta = {
            k.split("/", 1)[1]: a.astype(np.float64) - sent[k.split("/", 1)[1]].reshape(a.shape)
            for k, a in reply.arrays.items()
            if not k.split("/", 1)[1].startswith(optimizer_state.PREFIX)  # parameters only
        }
        weight = next(v for k, v in reply.metrics.items() if k.endswith("num-examples"))
        updates.append((delta, float(weight)))
    return updates


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in sorted(arrays)])


@pytest.mark.slow
def test_local_dp_noise_reaches_the_server_with_the_promised_scale(
    tmp_path: Path, tiny_data: Path
) -> None:
    """LocalDpMod: every update leaves the device clipped to C plus Gaussian noise of std
    noise * C per coordinate, so what the server receives is mostly noise."""
    clip, noise = 0.05, 0.5
    sim = _simulate(tmp_path, tiny_data, dp_clip=clip, dp_noise=noise, dp_mode="local",
                    rounds=1, personal_epochs=1)  # fmt: skip
    updates = _train_updates(sim, 1)
    assert len(updates) == 3
    for delta, _ in updates:
        flat = _flat(delta)
        assert flat.size > 1_000
        # the clipped signal adds at most C / sqrt(size) per coordinate
        assert np.std(flat) == pytest.approx(noise * clip, rel=0.1)
        assert np.linalg.norm(flat) > 10 * clip


@pytest.mark.slow
def test_central_dp_clips_on_clients_and_the_server_adds_the_noise(
    tmp_path: Path, tiny_data: Path
) -> None:
    """Central DP: clients clip with fixedclipping_mod (updates arrive with norm <= C, no
    noise); the next global model is their weighted mean plus Gaussian noise of std
    noise * C / clients, added on the server."""
    clip, noise = 0.05, 2.0
    sim = _simulate(tmp_path, tiny_data, dp_clip=clip, dp_noise=noise, dp_mode="central",
                    rounds=2, personal_epochs=1)  # fmt: skip
    updates = _train_updates(sim, 1)
    assert len(updates) == 3
    norms = [np.linalg.norm(_flat(delta)) for delta, _ in updates]
    assert max(norms) <= clip * (1 + 1e-4) and min(norms) > 0.9 * clip  # clipped, binding
    total = sum(w for _, w in updates)
    mean = sum(_flat(delta) * w for delta, w in updates) / total
    first = sim.wire.sent_arrays[(1, "train")]
    second = sim.wire.sent_arrays[(2, "train")]
    residual = _flat({k: second[k].astype(np.float64) - first[k] for k in first}) - mean
    assert np.std(residual) == pytest.approx(noise * clip / 3, rel=0.1)
    assert abs(np.mean(residual)) < 0.1 * noise * clip / 3


@pytest.mark.slow
def test_the_server_averages_the_clients_adam_moments_into_the_next_round(
    fedavg: Simulated,
) -> None:
    """--optimizer-state shared: round 2 starts every client from the example-weighted mean
    of the moments (and step counts) the clients sent in round 1, as for the parameters."""
    replies = [r for r in fedavg.wire.received if r.kind == "train" and r.round == 1]
    second = fedavg.wire.sent_arrays[(2, "train")]
    weights = [next(v for k, v in r.metrics.items() if k.endswith("num-examples")) for r in replies]
    moment_names = [n for n in second if n.startswith(optimizer_state.PREFIX)]
    assert STEP in moment_names and len(moment_names) > 10
    for name in moment_names:
        arrays = [r.arrays[f"arrays/{name}"].astype(np.float64) for r in replies]
        mean = sum(a * w for a, w in zip(arrays, weights, strict=True)) / sum(weights)
        np.testing.assert_allclose(second[name].reshape(mean.shape), mean, rtol=1e-5, atol=1e-9)
    # the clients took local steps, so the shared step count is theirs
    assert float(second[STEP].ravel()[0]) >= 1.0
    assert any(np.abs(second[n]).max() > 0 for n in moment_names if "exp_avg_sq" in n)


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_personal_rows_learn_at_the_personal_lr_scale(tiny_data: Path, scale: float) -> None:
    """--personal-lr-scale: in one local step (Adam's first step moves each coordinate by
    lr * g / |g|) the personal rows move `scale` times as far as at scale 1 and the global
    parameters exactly as far; at 0 the rows stay put."""
    from tlsan.train import new_model

    dataset = load_dataset(tiny_data, ("train", "valid"))
    config = CONFIG.override(batch_size=len(dataset.train))  # the whole split in one step

    def one_step(personal_lr_scale: float) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        model = new_model(config, dataset, seed=config.seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, seen = local_epochs(
            model,
            dataset,
            config,
            epochs=1,
            generator=torch.Generator().manual_seed(0),
            personal_lr_scale=personal_lr_scale,
        )
        assert seen == len(dataset.train)
        moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        return moved, tuple(model.personal_parameter_names())

    full, personal = one_step(1.0)
    scaled, _ = one_step(scale)
    assert personal and all(full[n].abs().max() > 0 for n in personal)
    for name, step in scaled.items():
        expected = scale * full[name] if name in personal else full[name]
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_fedavgm_runs_with_shared_optimizer_state(tmp_path: Path, tiny_data: Path) -> None:
    """Round 1 already carries (zero) moments, so FedAvgM's server momentum sees the same
    arrays in every round; the moments it sends on are the clients' (not zero)."""
    sim = _simulate(
        tmp_path,
        tiny_data,
        strategy="fedavgm",
        server_momentum=0.5,
        server_lr=1.0,
        personal_epochs=1,
        mlflow=False,
    )
    first, second = sim.wire.sent_arrays[(1, "train")], sim.wire.sent_arrays[(2, "train")]
    assert first.keys() == second.keys() and STEP in first
    assert all(not first[k].any() for k in first if k.startswith(optimizer_state.PREFIX))
    assert float(second[STEP].ravel()[0]) >= 1.0
    assert np.isfinite(sim.result.test["ndcg@10"])


# -- pieces without Flower ---------------------------------------------------------------------
@pytest.mark.parametrize(("text", "users"), [("user", 1), ("cohort:1", 1), ("cohort:25", 25)])
def test_client_unit_parses(text: str, users: int) -> None:
    assert parse_client_unit(text) == users


@pytest.mark.parametrize("text", ["users", "cohort:0", "cohort:", "cohort:-3", "cohort:2.5", ""])
def test_client_unit_rejects_bad_values(text: str) -> None:
    with pytest.raises(ConfigError, match="--client-unit"):
        parse_client_unit(text)


def test_clients_partition_the_users_with_training_examples() -> None:
    users = np.array([5, 3, 3, 9, 1, 7, 7, 7, 2, 0])  # 0 (padding) is never a client's
    partition = assign_clients(users, 2, seed=1)
    assert [len(c) for c in partition.clients] == [2, 2, 2]
    assert sorted(np.concatenate(partition.clients).tolist()) == [1, 2, 3, 5, 7, 9]
    owner = partition.owner(10)
    assert owner[0] == -1 and owner[4] == -1 and set(owner[[1, 2, 3, 5, 7, 9]]) == {0, 1, 2}
    assert [c.tolist() for c in assign_clients(users, 2, seed=1).clients] == [
        c.tolist() for c in partition.clients
    ]
    with pytest.raises(RunError, match="no user has a training example"):
        assign_clients(np.array([0, 0]), 1, seed=0)


def test_each_device_holds_only_its_own_users_data(tiny_data: Path, tmp_path: Path) -> None:
    full = load_dataset(tiny_data)
    partition = assign_clients(full.train.arrays.user.numpy(), 7, seed=0)
    dirs = write_devices(tiny_data, partition, tmp_path / "devices", progress=False)
    assert dirs == [device_dir(tmp_path / "devices", c) for c in range(len(partition))]
    total = {"train": 0, "valid": 0}
    for device, users in zip(dirs, partition.clients, strict=True):
        local = load_dataset(device, ("train", "valid"))
        assert local.sizes == full.sizes and local.dataset_hash == full.dataset_hash
        for split in total:
            assert set(local.split(split).arrays.user.tolist()) <= set(users.tolist())
            total[split] += len(local.split(split))
        vocab = pl.read_parquet(device / "vocab" / "users.parquet")
        assert sorted(vocab["index"].to_list()) == users.tolist()
        assert device_users(device).tolist() == users.tolist()
        # a device's seen-item sets equal the full dataset's for the same examples
        rows = torch.nonzero(torch.isin(full.valid.arrays.user, torch.from_numpy(users))).flatten()
        assert torch.equal(full.subset("valid", rows).seen_keys, local.valid.seen_keys)
    clients = torch.from_numpy(partition.users)
    assert total == {
        "train": len(full.train),  # every training example belongs to some client
        "valid": int(torch.isin(full.valid.arrays.user, clients).sum()),
    }
    assert total["valid"] < len(full.valid)  # a user without training examples is no client


def test_snapshots_give_back_the_rows_of_the_chosen_round(tmp_path: Path) -> None:
    """A device snapshots its personal files after each training round; the rows that go with
    round r are those of its latest snapshot at or before r (it trains only when sampled)."""
    users = torch.tensor([3, 7])

    def save(value: float) -> None:
        save_personal(tmp_path, users, {"P": torch.full((2, 4), value)})

    assert restore_personal(tmp_path, 5) is None  # never trained: the rows stay
    for r in (0, 2, 5, 6):
        save(float(r))
        snapshot_personal(tmp_path, r)
    save(9.0)  # a later round's training, not snapshotted yet
    prune_snapshots(tmp_path, best_round=3)  # round 3's rows are round 2's; earlier ones go
    assert snapshot_rounds(tmp_path) == [2, 5, 6]
    assert restore_personal(tmp_path, 4) == 2
    assert float(load_personal(tmp_path, ["P"], users)["P"].max()) == 2.0
    assert snapshot_rounds(tmp_path) == []  # used once, then dropped


def test_personal_file_round_trip_and_errors(tmp_path: Path) -> None:
    users = torch.tensor([3, 8])
    values = {"E_u.weight": torch.randn(2, 4), "P": torch.full((2, 3), -1.0)}
    save_personal(tmp_path, users, values)
    loaded = load_personal(tmp_path, values, users)
    assert torch.equal(loaded["E_u.weight"], values["E_u.weight"])
    with pytest.raises(RunError, match="expected"):
        load_personal(tmp_path, values, torch.tensor([3, 9]))
    with pytest.raises(RunError, match="rows"):
        save_personal(tmp_path, users, {"P": torch.zeros(3, 3)})
    (tmp_path / PERSONAL_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RunError, match="not a readable safetensors"):
        load_personal(tmp_path, values)
    with pytest.raises(RunError, match="never provisioned"):
        load_personal(tmp_path / "nowhere", values)


def test_strategy_factory() -> None:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        FedAvgM,
        FedProx,
    )

    prox = make_strategy(StrategySpec("fedprox", 4, 10, proximal_mu=0.5))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.5 and prox.min_train_nodes == 4
    central = make_strategy(
        StrategySpec("fedavg", 4, 10, dp_clip=1.0, dp_noise=0.5, dp_mode="central")
    )
    assert isinstance(central, DifferentialPrivacyClientSideFixedClipping)
    assert central.noise_multiplier == 0.5 and central.num_sampled_clients == 4
    momentum = make_strategy(StrategySpec("fedavgm", 2, 10, server_momentum=0.5))
    assert isinstance(momentum, FedAvgM) and momentum.server_momentum == 0.5
    with pytest.raises(ConfigError, match="--server-momentum"):
        StrategySpec("fedavgm", 2, 10, server_momentum=1.0)
    with pytest.raises(ConfigError, match="--clients-per-round"):
        StrategySpec("fedavg", 11, 10)
    with pytest.raises(ConfigError, match="--strategy"):
        StrategySpec("fedsgd", 1, 10)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--client-unit", "team"], "--client-unit"),
        (["--clients-per-round", "99"], "--clients-per-round"),
        (["--dp-noise", "1.0"], "--dp-noise"),
        (["--rounds", "0"], "--rounds"),
        (["--personal-lr", "-1"], "--personal-lr"),
        (["--lr-decay", "0"], "--lr-decay"),
        (["--lr-decay", "1.5"], "--lr-decay"),
        (
            ["--optimizer-state", "shared", "--dp-clip", "0.1", "--dp-noise", "0.1"],
            "--optimizer-state",
        ),
    ],
)
def test_cli_rejects_bad_flags_with_one_line(
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
) -> None:
    base = ["federate", "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--no-mlflow"]
    defaults = {"--rounds": "1", "--clients-per-round": "2", "--client-unit": "cohort:5"}
    for flag, value in defaults.items():
        if flag not in flags:
            base += [flag, value]
    assert main(base + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_a_run_of_another_model_kind(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlsan.train import fit

    pop = fit(default_config("pop"), tiny_data, tmp_path / "pop", mlflow=False, progress=False)
    code = main(
        ["federate", "--data", str(tiny_data), "--run", str(pop.run_dir), "--out",
         str(tmp_path / "o"), "--rounds", "1", "--clients-per-round", "1", "--no-mlflow"]
    )  # fmt: skip
    assert code == 2
    assert "personal parameters" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "server_round", "patience", "min_rounds", "stop"),
    [
        (5, 9, 5, 0, True),  # patience alone ends the plateau of a slow start
        (5, 9, 5, 20, False),  # ...which --min-rounds rides out
        (5, 20, 5, 20, True),
        (4, 30, 5, 20, False),
        (50, 60, 0, 0, False),  # patience 0: never
    ],
)
def test_stop_early_waits_for_patience_and_min_rounds(
    bad: int, server_round: int, patience: int, min_rounds: int, stop: bool
) -> None:
    assert stop_early(bad, server_round, patience, min_rounds) is stop


@pytest.mark.slow
def test_min_rounds_keeps_the_rounds_going_past_patience(tmp_path: Path, tiny_data: Path) -> None:
    """With patience 1 the loop may end one round after any best round, but not before
    `min_rounds`; the setting is recorded with the run."""
    sim = _simulate(
        tmp_path,
        tiny_data,
        rounds=5,
        patience=1,
        min_rounds=4,
        personal_epochs=1,
        mlflow=False,
        eval_fraction=0.5,
    )
    federated = json.loads((sim.result.run_dir / "federated.json").read_text())
    best, run = federated["best_round"], federated["rounds_run"]
    assert run == min(5, max(4, best + 1)) and run >= 4
    assert max(r for r, _ in sim.wire.sent_arrays if r <= 5) == run
    assert federated["settings"]["min_rounds"] == 4
    # --eval-fraction 0.5: the same 4 of the 8 clients validate every round, and each round's
    # figure (which picks the round) is their example-weighted mean
    panels = {
        r: {x.node for x in sim.wire.received if x.kind == "evaluate" and x.round == r}
        for r in range(run + 1)
    }
    assert len(panels[0]) == 4 and all(p == panels[0] for p in panels.values())
    assert federated["settings"]["eval_clients"] == 4
    for r in federated["rounds"]:
        assert r["eval_clients"] == 4
        assert r["valid"]["ndcg@10"] == pytest.approx(
            _weighted_round_metric(sim, r["round"], "valid-ndcg@10"), rel=1e-9
        )
    with pytest.raises(ConfigError, match="--min-rounds"):
        FederateOptions(
            data=tiny_data, out=tmp_path / "x", rounds=2, clients_per_round=1, min_rounds=-1
        )


# -- the same app on a real deployment --------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
RUN_DIR_FILES = {"model.safetensors", "config.json", "metrics.json", "history.json"}


def _flower_processes(root: Path) -> list[str]:
    """Live processes whose Flower home lies under `root` (every Flower process a test starts,
    and everything they start, inherits FLWR_HOME)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            home = proc.environ().get("FLWR_HOME", "")
            if home.startswith(str(root)) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']} {proc.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_no_flower_process_outlives_a_simulated_run(fedavg: Simulated) -> None:
    assert (fedavg.work / "flower").is_dir()
    assert _flower_processes(fedavg.work) == []


def test_pyproject_names_the_flower_app_tlsan_federate_runs(tmp_path: Path) -> None:
    """`flwr run .` from the repository root and `tlsan federate`'s generated app dir submit
    the same ServerApp, ClientApp and run config keys."""
    import tomllib

    from tlsan.federated.flower_runtime import APP_COMPONENTS, APP_CONFIG, write_app_dir

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    generated = tomllib.loads((write_app_dir(tmp_path) / "pyproject.toml").read_text())
    for found in (app, generated["tool"]["flwr"]["app"]):
        assert found["components"] == APP_COMPONENTS
        assert found["config"] == APP_CONFIG
    from tlsan.federated.app import client_app, server_app

    assert type(server_app).__name__ == "ServerApp" and type(client_app).__name__ == "ClientApp"


@pytest.mark.slow
def test_flwr_run_on_a_superlink_and_supernodes_writes_a_run_dir_tlsan_evaluate_accepts(
    tiny_data: Path, fedavg: Simulated, tmp_path: Path
) -> None:
    """Deployment: `tlsan federate --setup-only` writes three device dirs and the server's
    plan; a SuperLink and three SuperNodes run as processes on 127.0.0.1 (Flower's Fleet API,
    insecure here), each SuperNode given its own device dir in its node config; `flwr run`
    submits the app of pyproject.toml from the repository root; `tlsan federate --collect`
    writes the run dir, of the same kind as a simulated run's, and `tlsan evaluate` accepts
    it. Every process is stopped at the end, also when an assertion fails."""
    from tlsan.federated.flower_runtime import (
        Connection,
        executable,
        flower_env,
        flwr_run,
        superlink_command,
        wait_healthy,
    )
    from tlsan.processes import ProcessGroup, free_port

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG.to_dict()))
    work = tmp_path / "work"
    code = main(
        ["federate", "--data", str(tiny_data), "--setup-only", "--work-dir", str(work),
         "--config", str(config), "--client-unit", "cohort:14", "--rounds", "1",
         "--clients-per-round", "2", "--personal-epochs", "1", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    devices = sorted(p for p in (work / "devices").iterdir() if p.is_dir())
    assert len(devices) == 3  # 40 users in cohorts of 14
    assert not (work / "server" / "outcome.json").exists()

    flower = tmp_path / "flower"
    servers = ["superlink", *(f"supernode-{i}" for i in range(len(devices)))]
    try:
        with ProcessGroup(tmp_path / "logs") as group:
            port = free_port()
            superlink = superlink_command(port, simulation=False)
            group.start("superlink", superlink, flower_env(flower / "superlink"))
            wait_healthy(f"127.0.0.1:{port}", group)
            for i, device in enumerate(devices):
                supernode = [
                    executable("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"device-dir='{device}'",
                ]
                group.start(f"supernode-{i}", supernode, flower_env(flower / f"supernode-{i}"))
            user = flower / "user"
            Connection(address=f"127.0.0.1:{port}", insecure=True).write(user)
            flwr_run(
                REPO,
                user,
                group,
                run_config={"server-dir": str(work / "server")},
                poll=lambda: group.check_alive(servers),
                timeout_s=900,
            )
    finally:
        assert _flower_processes(tmp_path) == []

    out = tmp_path / "run"
    code = main(
        ["federate", "--collect", "--work-dir", str(work), "--data", str(tiny_data),
         "--out", str(out), "--no-mlflow", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    # the same kind of run dir as the simulation writes
    simulated = fedavg.result.run_dir
    assert {p.name for p in out.iterdir()} == {p.name for p in simulated.iterdir()}
    assert RUN_DIR_FILES | {"federated.json"} == {p.name for p in out.iterdir()}
    for name in ("config.json", "metrics.json", "history.json", "federated.json"):
        got, want = (json.loads((d / name).read_text()) for d in (out, simulated))
        assert set(got) == set(want), name
    federated = json.loads((out / "federated.json").read_text())
    assert federated["personal_rows"] == "devices" and federated["settings"]["clients"] == 3
    assert [r["round"] for r in federated["rounds"]] == [0, 1]
    assert federated["rounds_run"] == 1 and federated["rounds"][1]["clients"] == 2
    # the chosen global parameters are the server's, the personal rows each device's own
    model = load_run(out).model
    params = dict(model.named_parameters())
    from tlsan.federated.plan import read_outcome

    result = read_outcome(work / "server").result
    for name, array in result.items():
        assert np.array_equal(params[name].detach().numpy().reshape(array.shape), array), name
    for device in devices:
        users = torch.from_numpy(device_users(device))
        stored = load_personal(device, ("E_u.weight", "P"), users)
        assert torch.equal(stored["E_u.weight"], params["E_u.weight"].detach()[users])
    evaluated = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--run", str(out), "--data", str(tiny_data), "--json", str(evaluated)]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(evaluated.read_text())["ndcg@10"] == pytest.approx(
        metrics["test"]["ndcg@10"], abs=1e-9
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--setup-only"], "--setup-only: needs --work-dir"),
        (["--setup-only", "--work-dir", "W", "--out", "O"], "--out"),
        (["--collect", "--out", "O"], "--collect: needs --work-dir"),
        (["--collect", "--work-dir", "W"], "--out"),
        (["--collect", "--work-dir", "W", "--out", "O"], "federation.json"),
        (["--setup-only", "--collect", "--work-dir", "W"], "not allowed with"),
        (["--out", "O", "--eval-fraction", "1.5"], "--eval-fraction"),
        (["--out", "O", "--min-delta", "-1"], "--min-delta"),
    ],
)
def test_cli_deployment_modes_reject_bad_flags_with_one_line(
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
) -> None:
    flags = [str(tmp_path / f) if f in ("W", "O") else f for f in flags]
    assert main(["federate", "--data", str(tiny_data), "--no-mlflow", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "O").exists() and not (tmp_path / "W").exists()


def test_evaluation_panel_is_a_seeded_share_of_the_clients_drawn_once() -> None:
    from tlsan.federated.server import evaluation_panel, panel_size

    nodes = [901, 17, 55, 3, 1000, 42, 7, 8, 9, 10]
    assert [panel_size(f, 10) for f in (0.0, 0.01, 0.25, 0.5, 1.0)] == [0, 1, 2, 5, 10]
    panel = evaluation_panel(nodes, 0.3, seed=4)
    assert len(panel) == 3 and set(panel) <= set(nodes) and panel == sorted(panel)
    assert evaluation_panel(list(reversed(nodes)), 0.3, seed=4) == panel  # order-free
    draws = {tuple(evaluation_panel(nodes, 0.3, seed=s)) for s in range(20)}
    assert len(draws) > 5  # the seed picks the panel
    assert evaluation_panel(nodes, 1.0, seed=0) == sorted(nodes)


def test_defaults_from_scratch_are_the_federated_recipe(tmp_path: Path) -> None:
    """Without --preset/--config the local batch and lr are the federated ones, a third of
    the clients train per round, and explicit flags win."""
    from tlsan.cli import build_parser
    from tlsan.commands.federate import _config
    from tlsan.federated.defaults import FEDERATED_BATCH_SIZE, FEDERATED_LR
    from tlsan.federated.run import clients_per_round

    parser = build_parser("federate")
    base = ["federate", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    config = _config(parser.parse_args(base))
    assert (config.batch_size, config.lr) == (FEDERATED_BATCH_SIZE, FEDERATED_LR)
    assert _config(parser.parse_args([*base, "--batch-size", "32"])).batch_size == 32
    assert _config(parser.parse_args([*base, "--preset", "default"])).batch_size == 512
    options = FederateOptions(data=tmp_path, out=tmp_path / "o")
    assert [clients_per_round(options, n) for n in (1, 2, 13, 17, 18)] == [1, 1, 5, 6, 6]
    fixed = FederateOptions(data=tmp_path, out=tmp_path / "o", clients_per_round=3)
    assert clients_per_round(fixed, 17) == 3
    with pytest.raises(ConfigError, match="--train-fraction"):
        FederateOptions(data=tmp_path, out=tmp_path / "o", train_fraction=0.0)


def test_cli_and_options_share_the_defaults_validation_chose(tmp_path: Path) -> None:
    """`tlsan federate` without flags and `FederateOptions` without arguments run the same
    recipe, the one chosen on the leak-free validation split (docs/experiments/federated.md,
    "Re-measured on the leak-free split"): personal rows at the full lr during the rounds,
    patience 5, no early stop before round 20, every client on the validation panel."""
    from tlsan.cli import build_parser

    args = build_parser("federate").parse_args(
        ["federate", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    options = FederateOptions(data=tmp_path, out=tmp_path / "o")
    chosen = {
        "rounds": 50,
        "client_unit": "cohort:100",
        "train_fraction": 0.35,
        "local_epochs": 1,
        "patience": 5,
        "min_rounds": 20,
        "personal_lr_scale": 1.0,
        "personal_epochs": 10,
        "eval_fraction": 1.0,
        "lr_decay": 1.0,
        "min_delta": 0.0,
        "strategy": "fedavg",
        "optimizer_state": "auto",
    }
    assert {name: getattr(args, name) for name in chosen} == chosen
    assert {name: getattr(options, name) for name in chosen} == chosen
    assert not hasattr(args, "select")  # folded validation is gone with the old split


def test_federated_runs_keep_the_recipe_they_were_measured_with(tmp_path: Path) -> None:
    """From scratch, `tlsan federate` trains the softmax over sampled negatives (its figures),
    not the central preset's full softmax."""
    from tlsan.cli import build_parser
    from tlsan.commands.federate import _config
    from tlsan.federated.run import federated_config

    args = build_parser("federate").parse_args(
        ["federate", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert _config(args).loss == "softmax" == federated_config().loss
    assert default_config("tlsan").loss == "ce"
