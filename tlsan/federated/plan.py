"""The server dir: the ServerApp's inputs and outputs as files.

`flwr run` starts the ServerApp in a process of Flower's own (`flwr-simulation` for a local
simulation, `flwr-serverapp` under a SuperLink), so nothing can be handed over in memory: the
plan goes in as files and the outcome comes back as files. The run config names the folder
(`server-dir`); it holds nothing personal (no user ids, no events, no personal rows):

    SERVER/plan.json             rounds, strategy, sampling, round selection, clients' configs
    SERVER/initial.safetensors   the starting global parameters
    SERVER/rounds.jsonl          one line per finished round, appended as rounds finish
    SERVER/result.safetensors    the global parameters of the chosen round
    SERVER/outcome.json          best round, rounds run, every round's traffic, personalization
    SERVER/error.txt             why the ServerApp failed (written instead of the outcome)
    SERVER/audit/                with `audit`: copies of every array the server sent and of
                                 every reply it received (tests read them with `read_wire`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tlsan.errors import RunError
from tlsan.federated.server import Received, RoundStats, ServerPlan, StrategySpec, WireLog

PLAN_FILE = "plan.json"
INITIAL_FILE = "initial.safetensors"
ROUNDS_FILE = "rounds.jsonl"
RESULT_FILE = "result.safetensors"
OUTCOME_FILE = "outcome.json"
ERROR_FILE = "error.txt"
AUDIT_DIR = "audit"
# Everything a ServerPlan holds that is plain data (the rest: arrays, logs, callbacks, results)
_PLAN_FIELDS = (
    "rounds",
    "train_config",
    "personal_config",
    "seed",
    "personalize",
    "personalize_chunk",
    "select",
    "patience",
    "min_rounds",
    "lr_decay",
    "min_delta",
    "evaluate_start",
    "share_optimizer_state",
)


def _atomic_write(path: Path, write: Any) -> None:
    """`write(tmp_path)`, then rename onto `path` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from exc


# -- the plan (written before the run, read by the ServerApp) ----------------------------------
def write_plan(server_dir: Path, plan: ServerPlan, *, audit: bool = False) -> None:
    """Write `plan` (its data and starting parameters) into a fresh `server_dir`."""
    server_dir = Path(server_dir)
    server_dir.mkdir(parents=True, exist_ok=True)
    for name in (ROUNDS_FILE, RESULT_FILE, OUTCOME_FILE, ERROR_FILE):
        (server_dir / name).unlink(missing_ok=True)
    _write_arrays(server_dir / INITIAL_FILE, plan.initial)
    data = {name: getattr(plan, name) for name in _PLAN_FIELDS}
    data["spec"] = dataclasses.asdict(plan.spec)
    # safetensors sorts names; clients reply in the model's order, which DP mods check
    data["parameter_order"] = list(plan.initial)
    data["audit"] = audit
    _write_json(server_dir / PLAN_FILE, data)


def read_plan(server_dir: Path) -> tuple[ServerPlan, bool]:
    """(the plan, whether to keep an audit) from `server_dir`."""
    server_dir = Path(server_dir)
    data = _read_json(server_dir / PLAN_FILE)
    try:
        spec = StrategySpec(**data["spec"])
        values = {name: data[name] for name in _PLAN_FIELDS}
        audit = bool(data.get("audit", False))
        order = list(data["parameter_order"])
    except (KeyError, TypeError) as exc:
        raise RunError(f"{server_dir / PLAN_FILE}: not a federated plan ({exc})") from exc
    arrays = _read_arrays(server_dir / INITIAL_FILE)
    if set(order) != set(arrays):
        raise RunError(f"{server_dir / INITIAL_FILE}: does not hold the plan's parameters")
    initial = {name: arrays[name] for name in order}
    return ServerPlan(initial=initial, spec=spec, log=WireLog(keep=audit), **values), audit


# -- progress and outcome (written by the ServerApp) -------------------------------------------
def append_round(server_dir: Path, stats: RoundStats) -> None:
    """One finished round, as a JSON line (the caller follows the file for progress)."""
    with (Path(server_dir) / ROUNDS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(stats)) + "\n")
        f.flush()


def follow_rounds(server_dir: Path, seen: int) -> list[RoundStats]:
    """Complete lines of `rounds.jsonl` after the first `seen`."""
    path = Path(server_dir) / ROUNDS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the last piece is empty or a line still being written
    return [RoundStats(**json.loads(line)) for line in complete[seen:] if line]


def write_outcome(server_dir: Path, plan: ServerPlan) -> None:
    """The chosen global parameters and the run's record; with an audit, the wire copies."""
    server_dir = Path(server_dir)
    if plan.result is None:
        raise RunError("federate: the ServerApp ended without a final global model")
    log = plan.log
    if log.keep:
        _write_audit(server_dir / AUDIT_DIR, log)
    _write_arrays(server_dir / RESULT_FILE, plan.result)
    _write_json(
        server_dir / OUTCOME_FILE,
        {
            "best_round": plan.best_round,
            "rounds_run": plan.rounds_run,
            "personal_metrics": plan.personal_metrics,
            "rounds": [dataclasses.asdict(log.rounds[r]) for r in sorted(log.rounds)],
            "sent_names": sorted(log.sent_names),
        },
    )


def write_error(server_dir: Path, message: str) -> None:
    _atomic_write(
        Path(server_dir) / ERROR_FILE, lambda tmp: tmp.write_text(message, encoding="utf-8")
    )


@dataclasses.dataclass
class Outcome:
    """What the ServerApp left in the server dir."""

    result: dict[str, np.ndarray]
    best_round: int
    rounds_run: int
    personal_metrics: dict[str, float]
    wire: WireLog


def read_outcome(server_dir: Path) -> Outcome:
    """The ServerApp's outcome, or a RunError with its reason when it failed."""
    server_dir = Path(server_dir)
    if not (server_dir / OUTCOME_FILE).is_file():
        error = server_dir / ERROR_FILE
        reason = error.read_text(encoding="utf-8").strip() if error.is_file() else "no reason"
        raise RunError(f"federate: the ServerApp left no outcome in {server_dir}: {reason}")
    data = _read_json(server_dir / OUTCOME_FILE)
    audit = server_dir / AUDIT_DIR
    wire = _read_audit(audit) if audit.is_dir() else WireLog()
    wire.rounds = {int(r["round"]): RoundStats(**r) for r in data["rounds"]}
    wire.sent_names = set(data["sent_names"])
    return Outcome(
        result=_read_arrays(server_dir / RESULT_FILE),
        best_round=int(data["best_round"]),
        rounds_run=int(data["rounds_run"]),
        personal_metrics={k: float(v) for k, v in data["personal_metrics"].items()},
        wire=wire,
    )


# -- the audit copies --------------------------------------------------------------------------
def _write_audit(folder: Path, log: WireLog) -> None:
    sent = {
        f"{server_round}|{kind}|{name}": array
        for (server_round, kind), arrays in log.sent_arrays.items()
        for name, array in arrays.items()
    }
    _write_arrays(folder / "sent.safetensors", sent)
    received: dict[str, np.ndarray] = {}
    index: list[dict[str, Any]] = []
    for i, reply in enumerate(log.received):
        for key, array in reply.arrays.items():
            received[f"{i}|{key}"] = array
        index.append(
            {
                "round": reply.round,
                "kind": reply.kind,
                "arrays": list(reply.arrays),
                "metrics": reply.metrics,
                "configs": reply.configs,
                "record_names": reply.record_names,
                "node": reply.node,
            }
        )
    _write_arrays(folder / "received.safetensors", received)
    _write_json(folder / "received.json", index)


def _read_audit(folder: Path) -> WireLog:
    """The copies `_write_audit` kept, as the WireLog the ServerApp held."""
    log = WireLog(keep=True)
    for key, array in _read_arrays(folder / "sent.safetensors").items():
        server_round, kind, name = key.split("|", 2)
        log.sent_arrays.setdefault((int(server_round), kind), {})[name] = array
    arrays = _read_arrays(folder / "received.safetensors")
    for i, entry in enumerate(_read_json(folder / "received.json")):
        log.received.append(
            Received(
                round=int(entry["round"]),
                kind=str(entry["kind"]),
                arrays={key: arrays[f"{i}|{key}"] for key in entry["arrays"]},
                metrics=entry["metrics"],
                configs=entry["configs"],
                record_names=list(entry["record_names"]),
                node=int(entry["node"]),
            )
        )
    return log
