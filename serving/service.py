"""The BentoML service: a thin HTTP layer over `serving.recommender.Recommender`.

    TLSAN_BUNDLE=out/bundle TLSAN_STORE=sqlite:///mlruns/feature_store.db \
        bentoml serve serving.service:TlsanService --port 3000
    # or: tlsan serve --bundle out/bundle --port 3000 --workers 2

Environment (read once per worker, at start-up):
- `TLSAN_BUNDLE`: a bundle path, `models:/tlsan@champion` (MLflow) or `bentoml:tlsan:latest`
  (the default: what a bento built with bentofile.yaml packages);
- `TLSAN_STORE`: the online store URL (default `sqlite:///mlruns/feature_store.db`; its
  directory must exist);
- `TLSAN_WORKERS` (default 1), `TLSAN_MAX_BATCH` (default 64), `TLSAN_THREADS` (torch/FAISS
  threads per worker, default 1);
- the security and abuse settings of `tlsan.serve_settings` (`TLSAN_API_KEYS_FILE`,
  `TLSAN_INSECURE_NO_AUTH`, `TLSAN_ALLOWED_HOSTS`, rate and queue limits, ...).

Endpoints: `POST /recommend`, `POST /events`, `POST /similar_items`, `GET /model`, and
BentoML's `/healthz`, `/readyz`, `/metrics`, with the OpenAPI page (`/`, `/docs.json`). The
`ServingGate` middleware checks hosts, API keys and scopes, limits and bodies before any
work (serving/middleware.py); `RequestError` covers what only the bundle can judge. Without
keys the server listens on loopback only (the service's default bind is 127.0.0.1, and a
non-loopback bind is refused at start-up: serving/startup.py).
"""

from __future__ import annotations

import gc
import logging
import os
import sys

# Small per-request frames: Polars' thread pool costs more than it saves, and a worker per core
# is the scaling unit. Must be set before Polars is first imported.
os.environ.setdefault("POLARS_MAX_THREADS", os.environ.get("TLSAN_THREADS") or "1")

import json
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from feature_store import DEFAULT_STORE_URL, StoreError, open_store
from serving import http_protocol, log_safety
from serving.auth import KeyRing
from serving.batching import MicroBatcher
from serving.errors import RequestError
from serving.middleware import GateState, ServingGate
from serving.openapi import build_openapi
from serving.recommender import Query, Recommender
from serving.schemas import (
    EventIn,
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    raw_id,
)
from serving.startup import check_deployment, check_settings, check_worker_bind, worker_failed
from tlsan.bundle import load_bundle
from tlsan.errors import BundleError, ConfigError, TlsanError
from tlsan.serve_settings import ServeSettings, settings_from_env

BUNDLE_ENV = "TLSAN_BUNDLE"
STORE_ENV = "TLSAN_STORE"
WORKERS_ENV = "TLSAN_WORKERS"
MAX_BATCH_ENV = "TLSAN_MAX_BATCH"
THREADS_ENV = "TLSAN_THREADS"
DEFAULT_BUNDLE = "bentoml:tlsan:latest"  # what a built bento packages (bentofile.yaml)
REGISTRY_PREFIXES = ("models:/", "bentoml:")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected a positive integer") from None
    if value < 1:
        raise ConfigError(f"{name}={text!r}: expected a positive integer")
    return value


def _import_time_settings() -> tuple[ServeSettings, int, ConfigError | None]:
    """Settings the module needs when it is imported (worker count, header timeout). A bad
    value must not raise here (a traceback from BentoML's loader): it is kept and reported
    in one line by the start-up check, and by every worker."""
    try:
        return settings_from_env(), _env_int(WORKERS_ENV, 1), None
    except ConfigError as exc:
        return ServeSettings(), 1, exc


SETTINGS, WORKERS, SETTINGS_ERROR = _import_time_settings()
GATE = GateState(settings=SETTINGS)
http_protocol.install(SETTINGS.header_timeout_s)


def _bundle_source() -> str:
    return os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE


def _store_url() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_URL


def _error(exc: RequestError | StoreError) -> JSONResponse:
    """A request the bundle cannot serve -> its 4xx; the store being unavailable -> 503."""
    if isinstance(exc, RequestError):
        return JSONResponse(exc.to_json(), status_code=exc.status)
    return JSONResponse(
        {
            "error": f"online store unavailable: {exc}",
            "detail": [{"loc": ["store"], "msg": str(exc), "type": "store_unavailable"}],
        },
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _model_info(request: Request) -> JSONResponse:
    """`GET /model`: what the worker serves (version, dataset, metrics, index). A local
    bundle's path stays private: only registry sources (`models:/`, `bentoml:`) are shown."""
    service = bentoml.get_current_service()
    info = dict(service.recommender.model_info())
    source = info.get("source")
    if source is not None and not str(source).startswith(REGISTRY_PREFIXES):
        info["source"] = "local bundle"
    return JSONResponse(info)


# Mounted at the root with one route: BentoML mounts passively (only /model is taken).
model_app = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


@bentoml.asgi_app(model_app, path="/")
@bentoml.service(
    name="tlsan",
    workers=WORKERS,
    threads=4,
    traffic={"timeout": 30},
    http={"host": "127.0.0.1"},  # a bento listens beyond this machine only when asked to
)
class TlsanService:
    """Time-aware next-item recommendations from a TLSAN bundle and the online store."""

    @bentoml.on_deployment
    def check_before_workers() -> None:
        """In BentoML's arbiter, before any worker: refuse what cannot be served (exit 2)."""
        if SETTINGS_ERROR is not None:
            print(f"tlsan: cannot serve: {SETTINGS_ERROR}", file=sys.stderr, flush=True)
            sys.exit(2)
        check_deployment(_bundle_source(), _store_url())

    def __init__(self) -> None:
        log_safety.install()
        try:
            self._start()
        except (TlsanError, StoreError, OSError) as exc:
            worker_failed(str(exc))
        except Exception as exc:  # a bug: keep the traceback, still do not restart forever
            logging.getLogger("bentoml.tlsan.startup").exception("worker start-up failed")
            worker_failed(f"{type(exc).__name__}: {exc}")

    def _start(self) -> None:
        if SETTINGS_ERROR is not None:
            raise SETTINGS_ERROR
        check_settings(SETTINGS, "127.0.0.1")
        check_worker_bind(SETTINGS)
        keys = None if SETTINGS.api_keys_file is None else KeyRing(SETTINGS.api_keys_file)
        source = _bundle_source()
        try:
            bundle = load_bundle(source)
        except BundleError as exc:
            unset = "" if os.environ.get(BUNDLE_ENV) else f"{BUNDLE_ENV} is not set, so "
            raise BundleError(
                f"{unset}the bundle {source!r} cannot be served: {exc}. Set {BUNDLE_ENV} to a "
                "bundle directory, models:/tlsan@champion or bentoml:tlsan:latest"
            ) from exc
        self.store = open_store(_store_url(), create_dirs=False)
        self.recommender = Recommender(bundle, self.store, threads=_env_int(THREADS_ENV, 1))
        # Everything loaded so far lives as long as the worker: move it out of the garbage
        # collector's generations, so full collections under load do not walk the vocab
        # dicts and index tables (a pause on every long-tail request otherwise).
        gc.collect()
        gc.freeze()
        # Every batch runs in the event loop: the recommender's work is GIL-bound Python
        # stretches, so a batch thread gave the loop little time meanwhile and cost two
        # hand-offs per batch (measured: throughput +11% at 4 and at 32 concurrent clients
        # without it). Requests that arrive during a batch wait in the socket and together
        # form the next one.
        max_batch = _env_int(MAX_BATCH_ENV, 64)
        self.batcher: MicroBatcher[Query, Any] = MicroBatcher(
            self.recommender.recommend_batch,
            max_batch_size=max_batch,
            name="recommend",
            inline_max=max_batch,
        )
        GATE.keys = keys
        GATE.openapi = json.dumps(
            build_openapi(auth=keys is not None, version=bundle.model_version)
        ).encode()
        GATE.ready = True

    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(
        self,
        user_id: str | int,
        k: int,
        events: list[EventIn],
        now: int | None,
        exclude_seen: bool,
        categories: list[str | int] | None,
        explain: bool,
    ) -> RecommendResponse:
        """The k next items for a user at `now` (default: the server clock)."""
        query = Query(
            user_id=raw_id(user_id),
            k=k,
            events=tuple((raw_id(e.item_id), e.timestamp) for e in events),
            now=now,
            exclude_seen=exclude_seen,
            categories=None if categories is None else tuple(raw_id(c) for c in categories),
            explain=explain,
        )
        try:
            result = await self.batcher.submit(query)
        except (RequestError, StoreError) as exc:
            return _error(exc)  # type: ignore[return-value]
        return RecommendResponse.model_validate(result.to_json())

    @bentoml.api(route="/events", input_spec=EventsRequest)
    def events(self, user_id: str | int, events: list[EventIn]) -> EventsResponse:
        """Append a user's events to the online store; the next /recommend sees them."""
        try:
            result = self.recommender.record_events(
                raw_id(user_id), [(raw_id(e.item_id), e.timestamp) for e in events]
            )
        except StoreError as exc:
            return _error(exc)  # type: ignore[return-value]
        return EventsResponse.model_validate(result)

    @bentoml.api(route="/similar_items", input_spec=SimilarItemsRequest)
    def similar_items(self, item_id: str | int, k: int) -> SimilarItemsResponse:
        """Items nearest to an item by its learned vector."""
        try:
            result = self.recommender.similar_items(raw_id(item_id), k)
        except RequestError as exc:
            return _error(exc)  # type: ignore[return-value]
        return SimilarItemsResponse.model_validate(result)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.batcher.close()
        self.store.close()


TlsanService.add_asgi_middleware(ServingGate, state=GATE)
