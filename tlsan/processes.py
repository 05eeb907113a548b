"""Processes we start and must stop: free ports, process groups, whole process trees.

Servers the project starts for a job (Flower's SuperLink and SuperNodes, `mlflow server` in
tests) run in sessions of their own and are stopped with every descendant: first SIGTERM to
the process (its own shutdown stops what it started), then SIGKILL for whatever is left.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tlsan.errors import RunError

STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


class ProcessGroup:
    """Processes started for one job (servers, workers), stopped together, also on errors."""

    def __init__(self, logs: Path) -> None:
        self.logs = Path(logs)
        self.started: list[Started] = []
        self._previous: Any = None

    def start(
        self, name: str, command: Sequence[str], env: Mapping[str, str], *, echo: bool = False
    ) -> Started:
        """Start `command` with its output in LOGS/NAME.log (`echo`: on this terminal)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=None if echo else handle,
            stderr=None if echo else subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches tlsan, which stops these
        )
        started = Started(name, process, log, handle)
        self.started.append(started)
        return started

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        """A RunError naming the first process (of `names`, default all) that exited."""
        for item in self.started:
            if names is not None and item.name not in names:
                continue
            if item.process.poll() is not None:
                raise RunError(
                    f"{item.name} exited with status {item.process.returncode}; "
                    f"last lines of {item.log}:\n{tail(item.log)}"
                )

    def stop(self) -> None:
        """Stop every process, newest first, with all its descendants."""
        while self.started:
            item = self.started.pop()
            stop_tree(item.process.pid)
            try:
                item.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                item.process.kill()
                item.process.wait()
            item.handle.close()

    def __enter__(self) -> ProcessGroup:
        """While the group runs, SIGTERM ends this process through `__exit__` (Python's default
        would end it at once and leave the group running)."""
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _terminated)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_tree(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to `pid` (its own shutdown stops what it started), then SIGKILL to it and to
    every descendant still alive after `timeout_s` (found before the first signal: children
    that Flower detaches into sessions of their own are still its descendants then)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with suppress(psutil.NoSuchProcess):
        root.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs([root], timeout=timeout_s)
    # the descendants get a moment to follow their parent down, then no more
    _, alive = psutil.wait_procs(family[1:] + alive, timeout=2.0)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])
