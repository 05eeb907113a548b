"""Federated TLSAN (`tlsan federate`): simulation speed, and quality on Digital_Music.

    python benchmarks/federated.py speed     # rounds/s and bytes per round, 100 and 1,000 clients
    python benchmarks/federated.py quality   # test NDCG@10 / AUC: central vs federated (b) and (c)
    python benchmarks/federated.py panel     # --eval-fraction: the round choice's noise vs time
    python benchmarks/federated.py defaults  # a default `tlsan federate` on each shared dataset

`speed` generates a synthetic log (1,000+ users), then runs Flower simulations in which every
client takes part in every round (100 clients = cohorts of users, 1,000 clients = one user
each). Round 1 includes starting Ray's actors and is reported separately; the median of the
later rounds gives rounds/s. Baseline in the same run: the same clients' local work (load the
device, set the global parameters, train one local epoch, save the personal rows) called
in-process, one after another, without Flower or Ray.

`quality` prepares Digital_Music from ../shared/data (preset paper; `--data` takes any prepared
dataset), trains (a) centralized TLSAN with the default preset (`--central DIR` reuses a run
dir of the same data and seed instead, `--keep-central DIR` keeps (a)'s), then federates from
scratch with `tlsan federate`'s defaults (`tlsan.federated.defaults`; every flag of the recipe
can be changed) and evaluates (b) the federated global model with neutral personal parameters
and (c) the same global model with each client's fine-tuned personal parameters. Every choice
is made on validation: the server keeps the round with the best federated validation NDCG@10,
each device its fine-tuning epoch by its own validation examples, and the pass/fail key
(`c_within_3pct_of_a_on_valid`) compares (c) with (a) on validation NDCG@10; test figures are
read once, at the end, and only reported. With `--patience 0` every round runs and the report
adds, for each stopping rule (patience 3/5/10, min rounds 0/10/20), the round it would have
kept and that round's validation NDCG@10 (the rule only decides where the loop stops).
`--session-fold` folds that share of the clients' training sessions. `--from-run` adds a
federated run started from (a)'s run dir (its config, one local epoch per
round). Prints one JSON document each (`--out` also writes it to a file, atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "amazon"

from tlsan.federated.defaults import (  # noqa: E402 (after the path, without torch)
    DEFAULT_CLIENT_UNIT,
    DEFAULT_EVAL_FRACTION,
    DEFAULT_MIN_ROUNDS,
    DEFAULT_PATIENCE,
    DEFAULT_PERSONAL_EPOCHS,
    DEFAULT_PERSONAL_LR_SCALE,
    DEFAULT_ROUNDS,
    DEFAULT_TRAIN_FRACTION,
    FEDERATED_BATCH_SIZE,
    FEDERATED_LR,
)

METRICS = ("ndcg@10", "hr@10", "auc", "paper_auc")


def _synthetic(root: Path, users: int, seed: int) -> Path:
    from pipelines.config import PrepareConfig, SessionRule
    from pipelines.prepare import prepare_dataset
    from pipelines.synthetic import generate_log

    log = generate_log(root / "log", users=users, items=2_000, events=users * 30, seed=seed)
    config = PrepareConfig(
        interactions=log.interactions,
        items=log.items_file,
        split="leave-one-out",
        session=SessionRule.parse("gap:30m"),
    )
    return prepare_dataset(config, root / "data", progress=False).path


def _inprocess_round(devices: list[Path], global_arrays: dict[str, Any], config: Any) -> float:
    """Seconds for the clients' local work of one round, without Flower (the baseline)."""
    import torch

    from tlsan.federated.client import (
        device_model,
        get_global,
        load_device,
        local_epochs,
        set_global,
    )
    from tlsan.federated.partition import device_users
    from tlsan.federated.personal import load_personal, save_personal

    start = time.perf_counter()
    for index, device in enumerate(devices):
        dataset = load_device(device)
        model = device_model(config, dataset)
        set_global(model, global_arrays)
        users = torch.from_numpy(device_users(device))
        names = model.personal_parameter_names()
        stored = load_personal(device, names, users)
        model.set_personal(users, {n: stored[n] for n in names})
        local_epochs(
            model, dataset, config, epochs=1, generator=torch.Generator().manual_seed(index)
        )
        save_personal(device, users, model.get_personal(users))
        get_global(model)
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from tlsan.config import default_config
    from tlsan.data import load_dataset
    from tlsan.federated.partition import device_dir
    from tlsan.federated.run import FederateOptions, federate

    config = default_config("tlsan").override(threads=1, batch_size=64, negatives=4)
    out: dict[str, Any] = {
        "rounds": args.rounds,
        "optimizer_state": args.optimizer_state,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = _synthetic(tmp, args.users, args.seed)
        dataset = load_dataset(data)
        train_users = int(dataset.train.arrays.user.unique().numel())
        out["dataset"] = {"users_with_training_examples": train_users, "train": len(dataset.train)}
        for target in args.clients:
            per_client = max(1, train_users // target)  # at least `target` clients
            unit = "user" if per_client == 1 else f"cohort:{per_client}"
            clients = math.ceil(train_users / per_client)
            work = tmp / f"work-{target}"
            options = FederateOptions(
                data=data,
                out=tmp / f"run-{target}",
                rounds=args.rounds,
                clients_per_round=clients,
                config=config,
                client_unit=unit,
                eval_fraction=0.0,
                personal_epochs=1,
                optimizer_state=args.optimizer_state,
                mlflow=False,
                progress=False,
                work_dir=work,
            )
            began = time.perf_counter()
            result = federate(options)
            wall = time.perf_counter() - began
            later = [r.seconds for r in result.rounds[1:]] or [result.rounds[0].seconds]
            median_round = statistics.median(later)
            devices = [device_dir(work / "devices", c) for c in range(result.clients)]
            global_arrays = _global_arrays(result.run_dir)  # the final global model
            _inprocess_round(devices[:1], global_arrays, config)  # warm-up
            baseline = _inprocess_round(devices, global_arrays, config)
            sent = statistics.median(r.bytes_sent for r in result.rounds)
            received = statistics.median(r.bytes_received for r in result.rounds)
            out["runs"].append(
                {
                    "clients": result.clients,
                    "client_unit": unit,
                    "clients_per_round": clients,
                    "first_round_seconds": result.rounds[0].seconds,
                    "median_round_seconds": median_round,
                    "rounds_per_s": 1.0 / median_round,
                    "bytes_sent_per_round": sent,
                    "bytes_received_per_round": received,
                    "bytes_per_client_per_round": (sent + received) / clients,
                    "inprocess_round_seconds": baseline,
                    "flower_vs_inprocess": median_round / baseline,
                    "wall_seconds": wall,
                }
            )
    return out


def _global_arrays(run_dir: Path) -> dict[str, Any]:
    from tlsan.federated.client import get_global
    from tlsan.run_dir import load_run

    return get_global(load_run(run_dir).model)


def _prepare_digital_music(root: Path) -> Path:
    from pipelines.config import PrepareConfig, apply_preset
    from pipelines.prepare import prepare_dataset

    config = PrepareConfig(
        interactions=SHARED / "Digital_Music.interactions.csv",
        items=SHARED / "Digital_Music.items.csv",
    )
    config = apply_preset(config, "paper", set())
    return prepare_dataset(config, root / "Digital_Music", progress=False).path


def _row(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(metrics[k]), 5) for k in METRICS}


def _central(args: argparse.Namespace, config: Any, data: Path, tmp: Path) -> tuple[Path, dict]:
    """(a): train TLSAN centrally on `data`, or reuse `--central` (a run dir of this mode or of
    `tlsan train` on the same data, e.g. to sweep federated settings against one (a))."""
    from tlsan.data import load_dataset
    from tlsan.run_dir import check_same_dataset, read_metrics, read_run_info
    from tlsan.train import fit

    began = time.perf_counter()
    if args.central is not None:
        info = read_run_info(args.central)
        check_same_dataset(info, load_dataset(data), args.central)
        metrics, run_dir = read_metrics(args.central), Path(args.central)
        valid, test = metrics["valid"], metrics["test"]
    else:
        run_dir = args.keep_central or tmp / "central"
        central = fit(config, data, run_dir, mlflow=False, progress=False)
        assert central.test is not None
        valid, test = central.valid, central.test
    row = {
        **_row(test),
        "valid_ndcg@10": round(float(valid["ndcg@10"]), 5),
        "run_dir": str(run_dir) if args.central or args.keep_central else None,
        "wall_seconds": None if args.central else round(time.perf_counter() - began, 1),
    }
    return run_dir, row


def _stopping_rules(curve: list[float], best_round: int) -> dict[str, Any]:
    """For a run with `--patience 0` (every round run): the round each (patience, min rounds)
    rule would have kept and that round's federated validation NDCG@10 (the rule decides
    only where the loop stops; the rounds before are the same)."""
    rules = {}
    for patience in (3, 5, 10):
        for min_rounds in (0, 10, 20):
            kept, last = _chosen_round(curve, patience, min_rounds)
            rules[f"patience{patience}_min{min_rounds}"] = {
                "kept_round": kept,
                "rounds_run": last,
                "valid_ndcg@10": round(curve[kept], 5),
            }
    rules["all_rounds"] = {"kept_round": best_round, "valid_ndcg@10": round(max(curve), 5)}
    return rules


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from tlsan.config import default_config
    from tlsan.federated.run import FederateOptions, federate

    config = default_config("tlsan").override(threads=1, seed=args.seed)
    fed_config = config.override(
        batch_size=args.batch_size,
        lr=args.lr,
        session_fold=args.session_fold,
        dropout=args.dropout if args.dropout is not None else config.model.dropout,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer or config.optimizer,
    )
    table: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or _prepare_digital_music(tmp)
        central_dir, table["a_central"] = _central(args, config, data, tmp)
        options = FederateOptions(
            data=data,
            out=tmp / "federated",
            rounds=args.rounds,
            clients_per_round=args.clients_per_round,
            train_fraction=args.train_fraction,
            config=fed_config,
            local_epochs=args.local_epochs,
            client_unit=args.client_unit,
            strategy=args.strategy,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            personal_epochs=args.personal_epochs,
            personal_lr=args.personal_lr,
            personal_lr_scale=args.personal_lr_scale,
            optimizer_state=args.optimizer_state,
            patience=args.patience,
            min_rounds=args.min_rounds,
            lr_decay=args.lr_decay,
            eval_fraction=args.eval_fraction,
            mlflow=False,
            progress=not args.quiet,
        )
        runs = [("scratch", options)]
        if args.from_run:
            from tlsan.run_dir import read_run_info

            central_config = read_run_info(central_dir).config
            runs.append(
                (
                    "from_run",
                    replace(
                        options,
                        out=tmp / "federated-from-run",
                        run=central_dir,
                        config=central_config.override(batch_size=args.batch_size),
                        rounds=args.from_run_rounds,
                        local_epochs=1,
                    ),
                )
            )
        for name, opts in runs:
            result = federate(opts)
            table[f"b_federated_neutral_{name}"] = {
                **_row(result.neutral_test),
                "valid_ndcg@10": round(result.neutral_valid["ndcg@10"], 5),
            }
            table[f"c_federated_personal_{name}"] = {
                **_row(result.test),
                "valid_ndcg@10": round(result.valid["ndcg@10"], 5),
                "wall_seconds": round(result.wall_s, 1),
                "rounds": opts.rounds,
            }
            # pass/fail on validation (the central run's and the federated model's valid
            # NDCG@10, both scored centrally on the valid split); test is only reported
            a_valid = table["a_central"]["valid_ndcg@10"]
            b_valid = result.neutral_valid["ndcg@10"]
            c_valid = result.valid["ndcg@10"]
            a, b, c = (
                table["a_central"]["ndcg@10"],
                result.neutral_test["ndcg@10"],
                result.test["ndcg@10"],
            )
            curve = [r.valid.get("ndcg@10", float("nan")) for r in result.rounds]
            start = result.wire.rounds[0].valid.get("ndcg@10", float("nan"))
            table[f"summary_{name}"] = {
                "c_vs_a_valid_ndcg@10_relative": round(c_valid / a_valid - 1.0, 4),
                "c_vs_b_valid_ndcg@10_relative": round(c_valid / b_valid - 1.0, 4),
                "c_within_3pct_of_a_on_valid": c_valid >= 0.97 * a_valid,
                "reported_c_vs_a_test_ndcg@10_relative": round(c / a - 1.0, 4),
                "reported_c_vs_b_test_ndcg@10_relative": round(c / b - 1.0, 4),
                "best_round": result.best_round,
                "rounds_run": len(result.rounds),
                "personalization": {k: round(v, 5) for k, v in result.personalization.items()},
                "valid_ndcg@10_per_round": [round(v, 5) for v in [start, *curve]],
            }
            if opts.patience == 0:
                table[f"summary_{name}"]["stopping_rules"] = _stopping_rules(
                    [start, *curve], result.best_round
                )
    return {
        "dataset": str(args.data or "Digital_Music (preset paper)"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "table": table,
    }


def _chosen_round(curve: list[float], patience: int, min_rounds: int) -> tuple[int, int]:
    """(kept round, last round run) of the server's rule on a validation curve (round 0 = the
    start): the best round so far, stopping `patience` rounds after it, not before
    `min_rounds` (tlsan.federated.server.run_rounds with min_delta 0)."""
    from tlsan.federated.server import stop_early

    best, best_value, bad = 0, curve[0], 0
    last = len(curve) - 1
    for r in range(1, len(curve)):
        if curve[r] > best_value:
            best, best_value, bad = r, curve[r], 0
        else:
            bad += 1
        if stop_early(bad, r, patience, min_rounds):
            return best, r
    return best, last


def panel(args: argparse.Namespace) -> dict[str, Any]:
    """How the share of clients on the validation panel trades the round choice's noise for
    time. One federated run with tlsan federate's defaults but every client on the panel and
    `--patience 0` (all rounds run) records every client's validation NDCG@10 after every round; panels of each share
    are then drawn (seeded) from those records and the server's rule (best round, patience,
    min rounds) applied to each panel's curve. Reported per share: the full-validation
    NDCG@10 of the round the panel keeps, its shortfall against the round the full panel
    keeps (mean and 90th percentile over the draws), how often the two agree, and the
    round's seconds (training measured, evaluation = measured seconds per panel client x
    panel size). Validation only: test is not read."""
    import numpy as np

    from tlsan.federated.run import FederateOptions, federate, federated_config
    from tlsan.federated.server import WEIGHT_KEY, panel_size

    config = federated_config().override(threads=1, seed=args.seed)  # tlsan federate's
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or _prepare_digital_music(tmp)
        options = FederateOptions(
            data=data,
            out=tmp / "run",
            rounds=args.rounds,
            config=config,
            client_unit=args.client_unit,
            eval_fraction=1.0,
            patience=0,
            personal_epochs=1,
            mlflow=False,
            progress=not args.quiet,
            work_dir=tmp / "work",
            audit=True,
        )
        result = federate(options)
    wire = result.wire
    replies = [r for r in wire.received if r.kind == "evaluate"]
    nodes = sorted({r.node for r in replies})
    rounds = sorted({r.round for r in replies})
    values = np.zeros((len(rounds), len(nodes)))
    weights = np.zeros(len(nodes))
    for reply in replies:
        column = nodes.index(reply.node)
        values[rounds.index(reply.round), column] = reply.metrics["metrics/valid-ndcg@10"]
        weights[column] = reply.metrics[f"metrics/{WEIGHT_KEY}"]
    full = values @ weights / weights.sum()
    kept_full, _ = _chosen_round(list(full), args.patience, args.min_rounds)
    stats = [wire.rounds[r] for r in rounds if r > 0]
    train_s = statistics.median(s.seconds - s.eval_seconds for s in stats)
    per_client_s = statistics.median(s.eval_seconds / max(s.eval_clients, 1) for s in stats)
    rng = np.random.default_rng(args.seed)
    shares = []
    for share in args.fractions:
        size = panel_size(share, len(nodes))
        kept_values, agree, rounds_run = [], 0, []
        for _ in range(args.draws):
            members = rng.choice(len(nodes), size=size, replace=False)
            w = weights[members]
            curve = values[:, members] @ w / max(w.sum(), 1e-12)
            kept, last = _chosen_round(list(curve), args.patience, args.min_rounds)
            kept_values.append(full[kept])
            agree += kept == kept_full
            rounds_run.append(last)
        shortfall = full[kept_full] - np.asarray(kept_values)
        shares.append(
            {
                "eval_fraction": share,
                "panel_clients": size,
                "kept_round_valid_ndcg@10_mean": round(float(np.mean(kept_values)), 5),
                "shortfall_mean": round(float(shortfall.mean()), 5),
                "shortfall_p90": round(float(np.quantile(shortfall, 0.9)), 5),
                "same_round_as_full_panel": round(agree / args.draws, 3),
                "rounds_run_mean": round(float(np.mean(rounds_run)), 1),
                "round_seconds_estimate": round(train_s + per_client_s * size, 2),
            }
        )
    return {
        "data": str(args.data or "Digital_Music (preset paper)"),
        "clients": len(nodes),
        "client_unit": args.client_unit,
        "rounds": len(rounds) - 1,
        "full_panel": {
            "kept_round": kept_full,
            "valid_ndcg@10": round(float(full[kept_full]), 5),
            "valid_ndcg@10_per_round": [round(float(v), 5) for v in full],
        },
        "median_train_seconds_per_round": round(train_s, 3),
        "median_eval_seconds_per_panel_client": round(per_client_s, 3),
        "shares": shares,
    }


class TreeCpu:
    """CPU seconds of a process and everything it starts (Flower detaches some of its
    processes into sessions of their own, so they are followed by their FLWR_HOME too):
    sampled every `interval` seconds, each process counted with the last times seen."""

    def __init__(self, root_pid: int, flwr_home_prefix: str, interval: float = 0.5) -> None:
        import threading

        self.root_pid = root_pid
        self.prefix = flwr_home_prefix
        self.interval = interval
        self.seen: dict[tuple[int, float], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _members(self) -> list[Any]:
        import psutil

        members = []
        try:
            root = psutil.Process(self.root_pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        known = {p.pid for p in members}
        for proc in psutil.process_iter():
            if proc.pid in known:
                continue
            try:
                if proc.environ().get("FLWR_HOME", "").startswith(self.prefix):
                    members.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return members

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for proc in self._members():
                try:
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    self.seen[key] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.stop.wait(self.interval)

    def __enter__(self) -> TreeCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return float(sum(self.seen.values()))


def _timed(cmd: list[str], flwr_prefix: str) -> dict[str, float]:
    """Wall and CPU seconds of one command (and its process tree), with the load average."""
    import os
    import subprocess

    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeCpu(proc.pid, flwr_prefix) as cpu:
        _, err = proc.communicate()
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu.seconds, 1),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def defaults(args: argparse.Namespace) -> dict[str, Any]:
    """A default `tlsan federate --data D --out O` on each shared dataset (prepared with the
    paper preset), timed: wall seconds, CPU seconds of the whole process tree (Ray, Flower),
    the load average around it (the machine is shared), and as the baseline, in the same run,
    a default central `tlsan train` on the same dataset. The target is a default federated
    run under 5 minutes of wall time on two cores (`under_5_minutes`); validation NDCG@10
    of both runs is reported (test is not read here)."""
    import sys

    tlsan = str(Path(sys.executable).parent / "tlsan")
    out: dict[str, Any] = {"datasets": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.datasets:
            data = args.prepared / name if args.prepared else _prepare(tmp, name)
            work = tmp / f"work-{name}"
            fed_cmd = [tlsan, "federate", "--data", str(data), "--out", str(tmp / f"fed-{name}"),
                       "--work-dir", str(work), "--no-mlflow", "--no-progress"]  # fmt: skip
            federated = _timed(fed_cmd, str(work))
            record = json.loads((tmp / f"fed-{name}" / "federated.json").read_text())
            valid = json.loads((tmp / f"fed-{name}" / "metrics.json").read_text())["valid"]
            central_cmd = [tlsan, "train", "--data", str(data), "--out", str(tmp / f"c-{name}"),
                           "--no-mlflow", "--quiet"]  # fmt: skip
            central = _timed(central_cmd, str(tmp / "none"))
            central_valid = json.loads((tmp / f"c-{name}" / "metrics.json").read_text())["valid"]
            out["datasets"][name] = {
                "federated": {
                    **federated,
                    "clients": record["settings"]["clients"],
                    "rounds_run": record["rounds_run"],
                    "best_round": record["best_round"],
                    "valid_ndcg@10": round(float(valid["ndcg@10"]), 5),
                    "under_5_minutes": federated["wall_seconds"] < 300,
                },
                "central_train": {
                    **central,
                    "valid_ndcg@10": round(float(central_valid["ndcg@10"]), 5),
                },
                "federated_vs_central_wall": round(
                    federated["wall_seconds"] / central["wall_seconds"], 2
                ),
            }
            shutil.rmtree(work, ignore_errors=True)
    return out


def _prepare(root: Path, name: str) -> Path:
    from pipelines.config import PrepareConfig, apply_preset
    from pipelines.prepare import prepare_dataset

    config = PrepareConfig(
        interactions=SHARED / f"{name}.interactions.csv", items=SHARED / f"{name}.items.csv"
    )
    config = apply_preset(config, "paper", set())
    return prepare_dataset(config, root / name, progress=False).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    s.add_argument("--users", type=int, default=1_000)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("quality")
    q.add_argument("--data", type=Path, help="prepared Digital_Music (default: prepare it)")
    q.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    q.add_argument("--clients-per-round", type=int, help="default: --train-fraction of the clients")
    q.add_argument("--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION)
    q.add_argument("--client-unit", default=DEFAULT_CLIENT_UNIT)
    q.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION)
    q.add_argument("--local-epochs", type=int, default=1)
    q.add_argument("--batch-size", type=int, default=FEDERATED_BATCH_SIZE)
    q.add_argument("--lr", type=float, default=FEDERATED_LR)
    q.add_argument("--personal-epochs", type=int, default=DEFAULT_PERSONAL_EPOCHS)
    q.add_argument("--personal-lr", type=float, help="fine-tuning lr (default: --lr)")
    q.add_argument("--personal-lr-scale", type=float, default=DEFAULT_PERSONAL_LR_SCALE)
    q.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help="rounds without improvement (0: run every round and report what each stopping "
        "rule would have kept)",
    )
    q.add_argument(
        "--min-rounds", type=int, default=DEFAULT_MIN_ROUNDS, help="no early stop before this"
    )
    q.add_argument("--lr-decay", type=float, default=1.0, help="lr factor after a bad round")
    q.add_argument(
        "--session-fold",
        type=float,
        default=0.0,
        help="federated runs: share of training sessions moved to long-term history",
    )
    q.add_argument(
        "--dropout", type=float, help="federated runs: dropout (default: the preset's, 0)"
    )
    q.add_argument("--weight-decay", type=float, default=0.0, help="federated runs")
    q.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="federated runs")
    q.add_argument("--strategy", choices=["fedavg", "fedprox", "fedavgm"], default="fedavg")
    q.add_argument("--server-lr", type=float, default=1.0, help="fedavgm")
    q.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm")
    q.add_argument("--from-run", action="store_true", help="also federate from (a)'s run")
    q.add_argument("--from-run-rounds", type=int, default=10)
    q.add_argument(
        "--central", type=Path, help="reuse this central run dir (same data and seed) as (a)"
    )
    q.add_argument("--keep-central", type=Path, help="write (a)'s run dir here (to reuse)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true")
    pn = sub.add_parser("panel", help="validation panel share: noise of the round choice vs time")
    pn.add_argument("--data", type=Path, help="prepared dataset (default: Digital_Music)")
    pn.add_argument("--rounds", type=int, default=50)
    pn.add_argument("--client-unit", default="cohort:100")
    pn.add_argument("--patience", type=int, default=5)
    pn.add_argument("--min-rounds", type=int, default=20)
    pn.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    pn.add_argument("--draws", type=int, default=500)
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--quiet", action="store_true")
    pn.add_argument("--out", type=Path, help="also write the JSON report here (atomically)")
    d = sub.add_parser("defaults", help="time a default tlsan federate on each shared dataset")
    d.add_argument(
        "--datasets",
        nargs="+",
        default=["Digital_Music", "Office_Products", "Clothing_Shoes_and_Jewelry"],
    )
    d.add_argument("--prepared", type=Path, help="folder of prepared datasets (by name)")
    d.add_argument("--out", type=Path, help="also write the JSON report here (atomically)")
    for mode in (s, q):
        mode.add_argument(
            "--optimizer-state",
            choices=["auto", "shared", "local"],
            default="auto",
            help="federated runs: Adam's moments shared between rounds (auto: yes, for Adam)",
        )
        mode.add_argument("--out", type=Path, help="also write the JSON report here (atomically)")
    args = parser.parse_args()
    modes = {"speed": speed, "quality": quality, "panel": panel, "defaults": defaults}
    result = modes[args.mode](args)
    print(json.dumps(result, indent=2))
    if args.out:
        from tlsan.run_dir import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
