"""The trial loop every worker process runs: exactly N counted trials per study, shared safely.

Any number of processes, on one machine or many, run `run_worker` on the same study. Three
rules, checked through the study's storage only (no other coordination), keep the total exact:

1. A trial *counts* once it is COMPLETE or PRUNED; FAIL trials never count. `n_trials` is the
   study's total, not this process's share, so resuming a study runs only what is missing.
2. Before asking for a trial a worker checks `counted + running < n_trials`. Two workers can
   pass that check together, so after `ask()` each one ranks its trial among the study's live
   trials (counted, running or waiting) by trial number: a rank above `n_trials` means another
   worker got the slot first, and the surplus trial is closed as FAIL (tagged `surplus`)
   before it trains. Trial numbers are allocated by the storage, so the ranks agree.
3. A worker killed mid-trial leaves a RUNNING trial behind. Running trials carry a heartbeat
   (a trial user attribute refreshed every `heartbeat_s`); any worker finding one silent for
   `STALE_AFTER` heartbeats marks it FAIL and enqueues its parameters again, so the slot is
   retried and nothing completed is lost. (Optuna's own heartbeat only exists for RDB
   storages; this one works for journal files too. Clocks of machines must roughly agree.)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tlsan.errors import RunError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

HEARTBEAT_ATTR = "heartbeat"
WORKER_ATTR = "worker"
RETRY_ATTR = "retry_of"
SURPLUS_ATTR = "surplus"
ERROR_ATTR = "error"
STALE_AFTER = 3.0  # heartbeats missed before a running trial is declared dead
MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep raising stops instead of looping

log = logging.getLogger(__name__)
Objective = Callable[["optuna.Trial"], float]
TrialCallback = Callable[["optuna.Study", "FrozenTrial"], None]


@dataclass
class StopFlag:
    """Set (by a signal handler) to stop after the running trial."""

    requested: bool = False
    reason: str = ""

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = reason


@dataclass(frozen=True)
class Tally:
    """Trials of a study by what they mean for the budget."""

    counted: int  # COMPLETE + PRUNED
    running: int
    waiting: int
    failed: int


@dataclass
class WorkerResult:
    """What one `run_worker` call did and why it stopped."""

    trials: list[int] = field(default_factory=list)  # numbers of the trials it ran
    stopped: str = "done"  # done | interrupted | timeout
    surplus: int = 0
    reaped: list[int] = field(default_factory=list)  # dead workers' trials it failed


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def tally(study: optuna.Study) -> Tally:
    from optuna.trial import TrialState

    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return Tally(
        counted=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED],
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
        failed=counts[TrialState.FAIL],
    )


def slot_rank(study: optuna.Study, number: int) -> int:
    """1-based position of trial `number` among the study's live trials (rule 2)."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=live) if t.number <= number)


def last_sign_of_life(trial: FrozenTrial) -> float:
    """Unix time of the trial's last heartbeat (its start if it never beat)."""
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if isinstance(beat, int | float):
        return float(beat)
    started = trial.datetime_start
    return started.timestamp() if started is not None else time.time()


def reap_stale(study: optuna.Study, heartbeat_s: float) -> list[int]:
    """Fail running trials whose worker died (rule 3) and enqueue their parameters again."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time()
    reaped: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - last_sign_of_life(trial) <= STALE_AFTER * heartbeat_s:
            continue
        storage = study._storage  # no public API fails another process's trial
        try:
            storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, "worker stopped answering")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another worker reaped it first
        study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
        log.warning("trial %d: its worker stopped answering; retrying its parameters", trial.number)
        reaped.append(trial.number)
    return reaped


class Heartbeat:
    """Context manager refreshing a trial's heartbeat attribute from a daemon thread."""

    def __init__(self, trial: optuna.Trial, interval_s: float) -> None:
        self._trial = trial
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tlsan-heartbeat", daemon=True)

    def _beat(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while not self._stop.wait(self._interval):
            try:
                self._trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except UpdateFinishedTrialError:
                return
            except Exception as exc:  # a storage hiccup must not kill the trial
                log.warning("heartbeat failed: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """Evaluate one claimed trial and record its outcome (COMPLETE, PRUNED or FAIL)."""
    import optuna
    from optuna.trial import TrialState

    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except BaseException as exc:
        detail = " ".join(str(exc).split())[:500] or type(exc).__name__
        trial.set_user_attr(ERROR_ATTR, detail)
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)


def run_worker(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    *,
    stop: StopFlag | None = None,
    deadline: float | None = None,
    heartbeat_s: float = 30.0,
    poll_s: float = 1.0,
    on_trial: TrialCallback | None = None,
    on_wait: Callable[[Tally], None] | None = None,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler] | None = None,
) -> WorkerResult:
    """Run trials until the study counts `n_trials`, `stop` is requested or `deadline`
    (a `time.monotonic()` value) passes. The running trial always finishes first.
    `sampler_for(n)` gives the sampler for a trial asked when the study holds n trials."""
    from optuna.trial import TrialState

    stop = stop or StopFlag()
    result = WorkerResult()
    failures = 0
    me = worker_id()
    while True:
        if stop.requested:
            result.stopped = "interrupted"
            return result
        if deadline is not None and time.monotonic() >= deadline:
            result.stopped = "timeout"
            return result
        result.reaped += reap_stale(study, heartbeat_s)
        counts = tally(study)
        if counts.counted >= n_trials:
            return result
        if counts.counted + counts.running >= n_trials:
            # The remaining slots are being run elsewhere: wait, in case one of them fails.
            if on_wait is not None:
                on_wait(counts)
            time.sleep(poll_s)
            continue
        if sampler_for is not None:
            study.sampler = sampler_for(len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        if slot_rank(study, trial.number) > n_trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
            result.surplus += 1
            continue
        trial.set_user_attr(WORKER_ATTR, me)
        result.trials.append(trial.number)
        try:
            with Heartbeat(trial, heartbeat_s):
                run_one(study, trial, objective)
        except Exception as exc:
            failures += 1
            log.warning("trial %d failed: %s", trial.number, exc)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise RunError(
                    f"study {study.study_name!r}: {failures} trials in a row failed; "
                    f"last error (trial {trial.number}): {exc}"
                ) from exc
        else:
            failures = 0
        if on_trial is not None:
            on_trial(study, find_trial(study, trial.number))


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)
