"""`tlsan serve`: start the BentoML service over a bundle (as `bentoml serve`, in a subprocess).

tlsan never imports `serving` (imports run downward), so this command checks its inputs,
then runs `python -m bentoml serve serving.service:TlsanService` with the bundle and the
store passed through the environment, and waits for it. Ctrl-C stops the server cleanly.
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

SERVICE = "serving.service:TlsanService"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (BentoML)",
        description="Start the /recommend service: POST /recommend, /events, /similar_items, "
        "GET /model, plus /healthz, /readyz, /metrics and the OpenAPI page at /.",
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
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests per model batch")
    p.add_argument("--threads", type=int, default=1, help="torch/FAISS threads per worker")
    p.set_defaults(func=run)


def absolute_store_url(url: str, cwd: Path) -> str:
    """`sqlite:///relative.db` is relative to where the user runs the command: pin it."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        path, sep, query = url[len(prefix) :].partition("?")
        return f"{prefix}{(cwd / path).resolve()}{sep}{query}"
    return url


def run(args: argparse.Namespace) -> int:
    for flag in ("port", "workers", "max_batch", "threads"):
        value = getattr(args, flag)
        low = 0 if flag == "port" else 1
        if value < low or (flag == "port" and value > 65535):
            raise ConfigError(f"--{flag.replace('_', '-')}: out of range, got {value}")
    from feature_store import open_store
    from tlsan.bundle import BENTOML_PREFIX, MLFLOW_PREFIX, local_bundle_path, read_manifest

    cwd = Path.cwd()
    bundle = args.bundle
    if not bundle.startswith((MLFLOW_PREFIX, BENTOML_PREFIX)):
        bundle = str(Path(bundle).resolve())
    manifest = read_manifest(local_bundle_path(bundle))  # fail here, not in every worker
    print(f"serving {manifest['model_version']} from {bundle}", file=sys.stderr)
    store = absolute_store_url(args.store, cwd)
    open_store(store).close()  # a bad URL or an unreachable server fails here
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
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
