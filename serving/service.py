"""The BentoML service: a thin HTTP layer over `serving.recommender.Recommender`.

    TLSAN_BUNDLE=out/bundle TLSAN_STORE=sqlite:///mlruns/feature_store.db \
        bentoml serve serving.service:TlsanService --port 3000
    # or: tlsan serve --bundle out/bundle --port 3000 --workers 2

Environment (read once per worker, at start-up):
- `TLSAN_BUNDLE`: a bundle path, `models:/tlsan@champion` (MLflow) or `bentoml:tlsan:latest`
  (the default: what a bento built with bentofile.yaml packages);
- `TLSAN_STORE`: the online store URL (default `sqlite:///mlruns/feature_store.db`);
- `TLSAN_WORKERS` (default 1), `TLSAN_MAX_BATCH` (default 64), `TLSAN_MAX_BODY_BYTES`
  (default 1 MiB), `TLSAN_THREADS` (torch/FAISS threads per worker, default 1).

Endpoints: `POST /recommend`, `POST /events`, `POST /similar_items`, `GET /model`, and
BentoML's `/healthz`, `/readyz`, `/metrics` and OpenAPI page (`/`, `/docs.json`). Bad input
gets a 4xx JSON body that names the field: pydantic validation (400) for shapes and types,
`RequestError` for what only the bundle can judge, `RequestGuard` for size and content type.
"""

from __future__ import annotations

import gc
import os

# Small per-request frames: Polars' thread pool costs more than it saves, and a worker per core
# is the scaling unit. Must be set before Polars is first imported.
os.environ.setdefault("POLARS_MAX_THREADS", os.environ.get("TLSAN_THREADS") or "1")

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from feature_store import DEFAULT_STORE_URL, StoreError, open_store
from serving.batching import MicroBatcher
from serving.errors import RequestError
from serving.middleware import DEFAULT_MAX_BODY_BYTES, RequestGuard
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
from tlsan.bundle import load_bundle
from tlsan.errors import BundleError

BUNDLE_ENV = "TLSAN_BUNDLE"
STORE_ENV = "TLSAN_STORE"
WORKERS_ENV = "TLSAN_WORKERS"
MAX_BATCH_ENV = "TLSAN_MAX_BATCH"
MAX_BODY_ENV = "TLSAN_MAX_BODY_BYTES"
THREADS_ENV = "TLSAN_THREADS"
API_PATHS = ("/recommend", "/events", "/similar_items")
DEFAULT_BUNDLE = "bentoml:tlsan:latest"  # what a built bento packages (bentofile.yaml)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{name}={text!r}: expected a positive integer")
    return value


def _error(exc: RequestError | StoreError) -> JSONResponse:
    """A request the bundle cannot serve -> its 4xx; the store being unavailable -> 503."""
    if isinstance(exc, RequestError):
        return JSONResponse(exc.to_json(), status_code=exc.status)
    return JSONResponse(
        {
            "error": f"online store unavailable: {exc}",
            "detail": [{"loc": ["store"], "msg": str(exc)}],
        },
        status_code=503,
    )


def _model_info(request: Request) -> JSONResponse:
    """`GET /model`: what the worker serves (version, dataset, metrics, index)."""
    service = bentoml.get_current_service()
    return JSONResponse(service.recommender.model_info())


# Mounted at the root with one route: BentoML mounts passively (only /model is taken).
model_app = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


@bentoml.asgi_app(model_app, path="/")
@bentoml.service(
    name="tlsan",
    workers=_env_int(WORKERS_ENV, 1),
    threads=4,
    traffic={"timeout": 30},
)
class TlsanService:
    """Time-aware next-item recommendations from a TLSAN bundle and the online store."""

    def __init__(self) -> None:
        source = os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE
        try:
            bundle = load_bundle(source)
        except BundleError as exc:
            unset = "" if os.environ.get(BUNDLE_ENV) else f"{BUNDLE_ENV} is not set, so "
            raise BundleError(
                f"{unset}the bundle {source!r} cannot be served: {exc}. Set {BUNDLE_ENV} to a "
                "bundle directory, models:/tlsan@champion or bentoml:tlsan:latest"
            ) from exc
        self.store = open_store(os.environ.get(STORE_ENV) or DEFAULT_STORE_URL)
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


TlsanService.add_asgi_middleware(
    RequestGuard, paths=API_PATHS, max_body_bytes=_env_int(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)
)
