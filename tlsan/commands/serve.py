"""`tlsan serve`: start the BentoML service over a bundle (as `bentoml serve`, in a subprocess).

tlsan never imports `serving` (imports run downward), so this command checks its inputs,
then runs `python -m bentoml serve serving.service:TlsanService` with the bundle, the store
and the security settings (`tlsan.serve_settings`) passed through the environment, and
waits for it. Before any worker starts it refuses, in one line with exit status 2: a bundle
with any file whose checksum differs or a manifest path outside the bundle, a store whose
directory is missing (or `sqlite:///:memory:`, which workers cannot share), an unreadable
keys file, and a non-loopback `--host` without `--api-keys` (unless `--insecure-no-auth`).
A worker that still cannot start stops the server (exit status 3). Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from feature_store import DEFAULT_STORE_URL
from tlsan.errors import ConfigError
from tlsan.serve_settings import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_FUTURE_SKEW_S,
    DEFAULT_MAX_QUEUE,
    DEFAULT_RATE,
    DEFAULT_USER_EVENTS_PER_MINUTE,
    ServeSettings,
    check_bind,
    parse_hosts,
)

SERVICE = "serving.service:TlsanService"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (BentoML)",
        description="Start the /recommend service: POST /recommend, /events, /similar_items, "
        "GET /model, plus /healthz, /readyz, /metrics and the OpenAPI page at /. Without "
        "--api-keys it listens on loopback only.",
    )
    p.add_argument(
        "--bundle",
        required=True,
        help="bundle dir, models:/NAME@ALIAS or models:/NAME/VERSION (MLflow), bentoml:NAME[:TAG]",
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE_URL,
        help=f"online store URL: sqlite:///file.db or redis://host:port/db (default {DEFAULT_STORE_URL})",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; any other needs --api-keys)",
    )
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests per model batch")
    p.add_argument("--threads", type=int, default=1, help="torch/FAISS threads per worker")
    sec = p.add_argument_group("access and abuse limits (per worker process)")
    sec.add_argument(
        "--api-keys",
        type=Path,
        help="API keys file (`tlsan keys create`); every route but the health probes and the "
        "OpenAPI page then needs 'Authorization: Bearer KEY' with the route's scope",
    )
    sec.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without API keys (anyone reaching it can read and "
        "rewrite every user's data)",
    )
    sec.add_argument(
        "--allowed-hosts",
        help="Host header names accepted, e.g. api.example.com,*.internal (default: any with "
        "keys or --insecure-no-auth, else localhost,127.0.0.1,::1)",
    )
    sec.add_argument("--rate-limit", type=float, default=DEFAULT_RATE,
                     help=f"requests/s per API key (default {DEFAULT_RATE:g}; a key's own "
                     "rate_limit wins)")  # fmt: skip
    sec.add_argument("--rate-burst", type=float, help="token bucket size (default 2x the rate)")
    sec.add_argument(
        "--user-events-per-minute",
        type=int,
        default=DEFAULT_USER_EVENTS_PER_MINUTE,
        help=f"events stored per user and minute (default {DEFAULT_USER_EVENTS_PER_MINUTE})",
    )
    sec.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests in flight before 503 + Retry-After (default {DEFAULT_MAX_QUEUE})",
    )
    sec.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help=f"seconds a client has to send a request's headers (default {DEFAULT_HEADER_TIMEOUT_S:g})",
    )
    sec.add_argument(
        "--max-future-skew",
        type=int,
        default=DEFAULT_MAX_FUTURE_SKEW_S,
        help="seconds an event's timestamp may be ahead of the server clock (default "
        f"{DEFAULT_MAX_FUTURE_SKEW_S})",
    )
    sec.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES})",
    )
    p.set_defaults(func=run)


def absolute_store_url(url: str, cwd: Path) -> str:
    """`sqlite:///relative.db` is relative to where the user runs the command: pin it.
    (`sqlite:///:memory:` is left alone, for the store to refuse.)"""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        path, sep, query = url[len(prefix) :].partition("?")
        if path == ":memory:":
            return url
        return f"{prefix}{(cwd / path).resolve()}{sep}{query}"
    return url


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The flags as `ServeSettings` (checked: positive numbers, host names)."""
    for flag in ("rate_limit", "rate_burst", "user_events_per_minute", "max_queue",
                 "header_timeout", "max_future_skew", "max_body_bytes"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None and not (value > 0 and value != float("inf")):
            raise ConfigError(
                f"--{flag.replace('_', '-')}: expected a positive number, got {value}"
            )
    keys = None if args.api_keys is None else args.api_keys.resolve()
    return ServeSettings(
        api_keys_file=keys,
        insecure_no_auth=args.insecure_no_auth,
        allowed_hosts=None
        if args.allowed_hosts is None
        else parse_hosts(args.allowed_hosts, "--allowed-hosts"),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        user_events_per_minute=args.user_events_per_minute,
        max_queue=args.max_queue,
        header_timeout_s=args.header_timeout,
        max_future_skew_s=args.max_future_skew,
        max_body_bytes=args.max_body_bytes,
    )


def run(args: argparse.Namespace) -> int:
    for flag in ("port", "workers", "max_batch", "threads"):
        value = getattr(args, flag)
        low = 0 if flag == "port" else 1
        if value < low or (flag == "port" and value > 65535):
            raise ConfigError(f"--{flag.replace('_', '-')}: out of range, got {value}")
    from feature_store import open_store
    from tlsan.api_keys import read_keys
    from tlsan.bundle import BENTOML_PREFIX, MLFLOW_PREFIX, load_bundle

    settings = settings_from_args(args)
    keys = settings.api_keys_file
    if keys is not None and not any(r.active for r in read_keys(keys)):
        raise ConfigError(f"{keys}: no active API key; create one with `tlsan keys create`")
    check_bind(args.host, settings)
    cwd = Path.cwd()
    bundle = args.bundle
    if not bundle.startswith((MLFLOW_PREFIX, BENTOML_PREFIX)):
        bundle = str(Path(bundle).resolve())
    loaded = load_bundle(bundle)  # every checksum and path, before any worker starts
    store = absolute_store_url(args.store, cwd)
    open_store(store, create_dirs=False).close()  # bad URL, missing dir, unreachable server
    print(f"serving {loaded.model_version} from {bundle}", file=sys.stderr)
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env.update(settings.to_env())
    env.update(
        TLSAN_BUNDLE=bundle,
        TLSAN_STORE=store,
        TLSAN_WORKERS=str(args.workers),
        TLSAN_MAX_BATCH=str(args.max_batch),
        TLSAN_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable, "-m", "bentoml", "serve", SERVICE,
        "--working-dir", str(root), "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        """SIGTERM/SIGINT to us stops the server gracefully (it stops its own workers)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
