"""Start real servers for tests and benchmarks on free local ports, and always stop them.

No mocks: tests talk to a real `redis-server` started here. Also usable from benchmarks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server on `port` answers PING (raw RESP, no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate `proc`, killing it when it ignores SIGTERM for `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server: where it listens and its process id."""

    port: int
    pid: int
    workdir: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextmanager
def redis_server(
    executable: str = REDIS_SERVER, start_timeout: float = 10.0, attempts: int = 3
) -> Iterator[RedisServer]:
    """Run `redis-server` without persistence on a free port in a temporary dir.

    Waits until it answers PING; retries on another port if the chosen one was taken in the
    meantime. The server is stopped and its directory removed however the block exits.
    """
    if shutil.which(executable) is None:
        raise RuntimeError(f"{executable}: redis-server not found; install it (apt redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="tlsan-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(attempts):
            port = free_port()
            log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 - closed below
            try:
                proc = subprocess.Popen(
                    [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir)],
                    cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            finally:
                log.close()
            deadline = time.monotonic() + start_timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if _redis_ping(port):
                    break
                time.sleep(0.02)
            if proc.poll() is None and _redis_ping(port):
                yield RedisServer(port=port, pid=proc.pid, workdir=workdir)
                return
            stop_process(proc)
        log_text = "\n".join(p.read_text(errors="replace") for p in workdir.glob("*.log"))
        raise RuntimeError(f"redis-server did not start after {attempts} attempts:\n{log_text}")
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# BentoML servers (issue 5): `bentoml serve` / `tlsan serve` on a free port, always stopped.
# (Appended section: its imports are local so the Redis part above stays untouched.)
import contextlib  # noqa: E402
import os  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402


@dataclass
class BentoServer:
    """A running BentoML server: its URL, process and log; `kill()` SIGKILLs every process."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list:
        """The launcher and all its descendants (arbiter, worker processes)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the whole server at once: no shutdown hook, no flush, no goodbye."""
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the launcher (it stops its workers), then SIGKILL whatever is left."""
        import psutil

        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _ready(port: int, timeout: float = 1.0) -> bool:
    """True once the server's /readyz answers 200 (the service instance is up)."""
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/readyz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def bento_server(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    start_timeout: float = 120.0,
) -> Iterator[BentoServer]:
    """Start `command` (with `{port}` replaced by a free port) and wait until /readyz is 200.

    E.g. `[sys.executable, "-m", "bentoml", "serve", "serving.service:TlsanService",
    "--host", "127.0.0.1", "--port", "{port}"]` or `tlsan serve ... --port {port}`. The
    server and all its worker processes are stopped however the block exits.
    """
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tlsan-bento-"))
    log_path = workdir / "server.log"
    argv = [part.replace("{port}", str(port)) for part in command]
    full_env = {**os.environ, **(env or {})}
    root = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
    full_env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd or root, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = BentoServer(port=port, proc=proc, log=log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while not _ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if proc.poll() is not None else "timed out"
                raise RuntimeError(f"{argv[:6]}... {state} before ready:\n{server.log_tail()}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
