"""Start-up that refuses what cannot be served, and a server that stops when a worker can't start.

`check_deployment` runs once in BentoML's arbiter (the service's `on_deployment` hook), before
any worker is spawned, for `tlsan serve` and a bento alike: the settings, the keys file, the
bind address (no keys on a non-loopback address: refused), every checksum and path of the
bundle, the store. A problem is one line on stderr and exit status 2.

What only a worker can find out (a model that does not load, ...) used to make BentoML
restart the worker forever. Now the hook also creates a file path (`TLSAN_FATAL_FILE`, in the
workers' environment) and a thread that watches it: a worker that cannot start writes its
one-line reason there and exits; the arbiter then stops the server, which exits with
status 3. Without the hook (another launcher) a failing worker just raises.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

from tlsan.serve_settings import ServeSettings, check_bind, is_loopback, settings_from_env

FATAL_ENV = "TLSAN_FATAL_FILE"
WORKER_FAILED_EXIT = 3
logger = logging.getLogger("bentoml.tlsan.startup")


def bind_host() -> str:
    """The address `bentoml serve` binds: `--host`, else BENTOML_HOST, else its config
    (the service's `http.host`, loopback by default)."""
    argv = sys.argv
    for n, arg in enumerate(argv):
        if arg == "--host" and n + 1 < len(argv):
            return argv[n + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    if os.environ.get("BENTOML_HOST"):
        return os.environ["BENTOML_HOST"]
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.http.host.get())


def check_settings(settings: ServeSettings, host: str) -> None:
    """Keys file readable with at least one active key; bind address allowed."""
    from serving.auth import KeyRing
    from tlsan.errors import ConfigError

    if settings.api_keys_file is not None:
        ring = KeyRing(settings.api_keys_file)
        if ring.active == 0:
            raise ConfigError(
                f"{settings.api_keys_file}: no active API key; create one with "
                "`tlsan keys create --file FILE --name NAME --scopes ...`"
            )
    check_bind(host, settings)


def check_deployment(bundle: str, store: str) -> None:
    """Everything that can be checked before the workers start; exits 2 with one line."""
    from feature_store import StoreError, open_store
    from tlsan.bundle import load_bundle
    from tlsan.errors import TlsanError

    try:
        settings = settings_from_env()
        check_settings(settings, bind_host())
        load_bundle(bundle)  # every checksum, every manifest path inside the bundle
        open_store(store, create_dirs=False).close()
    except (TlsanError, StoreError, OSError) as exc:
        print(f"tlsan: cannot serve: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    _watch_workers()


def _watch_workers() -> None:
    """Arbiter side of the fatal-worker channel: stop the server, exit status 3."""
    folder = Path(tempfile.mkdtemp(prefix="tlsan-workers-"))
    fatal = folder / "fatal"
    os.environ[FATAL_ENV] = str(fatal)  # circus copies the environment into each worker
    failed = threading.Event()

    def watch() -> None:
        while not fatal.exists():
            time.sleep(0.2)
        reason = fatal.read_text(errors="replace").strip().splitlines()[0][:2000]
        print(f"tlsan: a worker could not start, stopping: {reason}", file=sys.stderr, flush=True)
        failed.set()
        os.kill(os.getpid(), signal.SIGTERM)  # circus stops its workers, then returns

    def finish() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if failed.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(WORKER_FAILED_EXIT)

    atexit.register(finish)
    threading.Thread(target=watch, name="tlsan-worker-watch", daemon=True).start()


def worker_failed(reason: str) -> NoReturn:
    """Worker side: report why this worker cannot start (one line) and exit."""
    line = " ".join(reason.split())
    logger.error("worker cannot start: %s", line)
    path = os.environ.get(FATAL_ENV)
    if not path:
        raise SystemExit(f"worker cannot start: {line}")
    with contextlib.suppress(OSError):
        tmp = f"{path}.{os.getpid()}"
        Path(tmp).write_text(line + "\n")
        os.replace(tmp, path)
    for handler in logging.getLogger("bentoml").handlers:
        handler.flush()
    os._exit(WORKER_FAILED_EXIT)


def listening_addresses() -> list[str]:
    """The addresses this process listens on (the socket BentoML handed the worker)."""
    import psutil

    return sorted(
        {
            conn.laddr.ip
            for conn in psutil.Process().net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.laddr
        }
    )


def check_worker_bind(settings: ServeSettings) -> None:
    """The worker's own socket, whatever launched it: non-loopback without keys is refused."""
    for address in listening_addresses():
        if not is_loopback(address):
            check_bind(address, settings)
