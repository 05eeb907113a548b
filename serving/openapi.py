"""The OpenAPI document of the service (`GET /docs.json`), generated from `serving.schemas`.

BentoML's own document drops the integer branch of the ids, the error bodies the service
really sends, `/model`, and the 401/403/413/415/429/503 answers; this one is built from the
same pydantic models that validate the requests, lists every status each route can answer
with its body and headers, and the bearer security of the routes that need a key (only
when the server has keys: without them no route answers 401 or 403). The schema-driven
fuzz test (tests/test_security.py) holds the service to it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving.auth import HEALTH_PATHS, ROUTE_SCOPES
from serving.schemas import (
    ErrorBody,
    EventsRequest,
    EventsResponse,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    TimeoutBody,
)

REF = "#/components/schemas/{model}"
POST_ROUTES: dict[str, tuple[type[BaseModel], type[BaseModel], str]] = {
    "/recommend": (
        RecommendRequest,
        RecommendResponse,
        "The k next items for a user at `now` (default: the server clock). `explain` needs "
        "the `explain` scope.",
    ),
    "/events": (
        EventsRequest,
        EventsResponse,
        "Append a user's events to the online store (idempotent). Timestamps later than the "
        "server clock plus the allowed skew are refused; each user takes a limited number of "
        "events per minute.",
    ),
    "/similar_items": (
        SimilarItemsRequest,
        SimilarItemsResponse,
        "Items nearest to an item by its learned vector.",
    ),
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_WHY = {
    400: "Bad request: invalid JSON or fields (`detail` names them), or a Host not allowed",
    401: "No API key, a malformed one, or an unknown or revoked key",
    403: "The API key lacks the scope this request needs",
    404: "Unknown item",
    413: "Request body over the size limit",
    415: "Content-Type is not exactly one application/json header",
    429: "Rate limit of the API key, or the user's events-per-minute cap",
    503: "Too many requests in flight, or the online store is unavailable",
    504: "The request took longer than the server's timeout",
}


def _error(status: int, schema: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _WHY[status],
        "content": {"application/json": {"schema": schema}},
    }
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
    return response


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def build_openapi(*, auth: bool, version: str = "1") -> dict[str, Any]:
    """The document for a server with (`auth`) or without API keys."""
    models: list[tuple[type[BaseModel], Any]] = [
        (m, mode)
        for request, response, _ in POST_ROUTES.values()
        for m, mode in ((request, "validation"), (response, "serialization"))
    ] + [(ModelInfo, "serialization"), (ErrorBody, "serialization"), (TimeoutBody, "serialization")]
    refs, defs = models_json_schema(models, ref_template=REF)
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
        return refs[(model, mode)]

    error, timeout = ref(ErrorBody), ref(TimeoutBody)
    secured = [{"bearer": []}] if auth else []

    def guarded(statuses: list[int]) -> dict[str, Any]:
        codes = sorted(set(statuses) | ({401, 403, 429} if auth else set()) | {400, 503})
        out = {str(s): _error(s, error) for s in codes}
        out["504"] = _error(504, timeout)
        return out

    paths: dict[str, Any] = {}
    for path, (request, response, summary) in POST_ROUTES.items():
        statuses = [413, 415] + ([404] if path == "/similar_items" else [])
        statuses += [429] if path == "/events" else []
        paths[path] = {
            "post": {
                "operationId": path.strip("/"),
                "summary": summary,
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(request, "validation")}},
                },
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": ref(response)}},
                    },
                    **guarded(statuses),
                },
            }
        }
    paths["/model"] = {
        "get": {
            "operationId": "model",
            "summary": "What the worker serves: version, dataset, metrics, index, runtime.",
            "security": secured,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": ref(ModelInfo)}},
                },
                **guarded([]),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics.",
            "security": secured,
            "responses": {"200": _text("Prometheus text format"), **guarded([])},
        }
    }
    for path in sorted(HEALTH_PATHS):
        responses = {"200": _text("OK")}
        if path == "/readyz":
            responses["503"] = _text("Not ready yet")
        paths[path] = {
            "get": {"operationId": path.strip("/"), "security": [], "responses": responses}
        }
    assert set(ROUTE_SCOPES) <= set(paths), "every scoped route is documented"
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tlsan",
            "version": version,
            "description": "TLSAN time-aware next-item recommendations. Errors are JSON: "
            "`error` (one line) and `detail` (`loc` names the field).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "tlsan_<id>_<secret> (tlsan keys create)",
            }
        }
    return document
