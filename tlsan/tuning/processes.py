"""`--jobs J`: J worker processes sharing the study, watched by the process that started them.

Processes, not threads: training holds the GIL and torch's own threads. Each worker is
`tlsan tune ... --worker` with its own worker index (sampler seed) and `cores // J` torch
threads. Workers run in their own process group, so a terminal's Ctrl-C reaches only this
process, which forwards it exactly once (stop after the running trial); a second Ctrl-C
aborts the running trials.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tlsan.errors import RunError
from tlsan.tuning.progress import TrialBar
from tlsan.tuning.settings import POLL_S, WORKER_LOG_DIR, TuneSettings
from tlsan.tuning.workers import StopFlag, tally

if TYPE_CHECKING:
    import optuna


def worker_command(settings: TuneSettings, index: int, deadline: float | None) -> list[str]:
    """The command line of worker process `index` (same study, its own sampler seed)."""
    cmd = [sys.executable, "-m", "tlsan", "tune", "--worker"]
    cmd += ["--data", str(settings.data), "--study", settings.study]
    cmd += ["--trials", str(settings.trials), "--storage", settings.storage]
    cmd += ["--metric", settings.metric, "--pruner", settings.pruner]
    cmd += ["--seed", str(settings.seed), "--worker-index", str(settings.worker_index + index)]
    cmd += ["--jobs", str(settings.jobs), "--out", str(settings.out_dir)]
    cmd += ["--preset", settings.preset, "--heartbeat", str(settings.heartbeat)]
    if settings.space is not None:
        cmd += ["--space", str(settings.space)]
    if settings.config is not None:
        cmd += ["--config", str(settings.config)]
    if settings.epochs is not None:
        cmd += ["--epochs", str(settings.epochs)]
    if deadline is not None:
        cmd += ["--timeout", f"{max(deadline - time.monotonic(), 0.001):.3f}"]
    if not settings.mlflow:
        cmd.append("--no-mlflow")
    return cmd


def run_processes(
    settings: TuneSettings, study: optuna.Study, stop: StopFlag, deadline: float | None
) -> str:
    """Start `settings.jobs` worker processes, watch the study, forward Ctrl-C to them."""
    logs = settings.out_dir / WORKER_LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for index in range(settings.jobs):
        log_path = logs / f"worker_{settings.worker_index + index}.log"
        with open(log_path, "wb") as sink:
            proc = subprocess.Popen(
                worker_command(settings, index, deadline),
                stdout=sink,
                stderr=subprocess.STDOUT,
                process_group=0,  # a terminal's Ctrl-C reaches us; we forward it exactly once
            )
        procs.append((proc, log_path))
    bar = TrialBar(settings, study)
    forwarded = False
    try:
        while any(p.poll() is None for p, _ in procs):
            if stop.requested and not forwarded:
                for p, _ in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                forwarded = True
            time.sleep(POLL_S)
            bar.refresh()
    except KeyboardInterrupt:  # a second Ctrl-C: abort the running trials too
        for p, _ in procs:
            if p.poll() is None:
                if not forwarded:
                    p.send_signal(signal.SIGINT)
                    time.sleep(0.1)
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            p.wait()
        raise
    finally:
        bar.close()
    failed = [(p, path) for p, path in procs if p.returncode not in (0, 130)]
    if failed:
        p, path = failed[0]
        raise RunError(
            f"worker process exited with status {p.returncode}: {_last_line(path)} (log: {path})"
        )
    if stop.requested or any(p.returncode == 130 for p, _ in procs):
        return "interrupted"
    if (
        deadline is not None
        and time.monotonic() >= deadline
        and tally(study).counted < settings.trials
    ):
        return "timeout"
    return "done"


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"
