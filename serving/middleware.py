"""The ASGI gate in front of the service: every check a request passes before any work.

In order, each refusal a JSON body (`error` + `detail` naming the field) and one log line:
1. Host header in the allow-list (400; DNS rebinding), except the health probes;
2. `GET /docs.json`: the service's own OpenAPI document (`serving.openapi`);
3. with API keys: a valid key (401), the route's scope (403), the key's rate (429);
4. requests in flight within the bound (503 with `Retry-After`, not an unbounded queue);
5. POST bodies: exactly one `Content-Type: application/json` (415; a browser cannot send it
   cross-site without a CORS preflight, which the service never grants), within the size
   limit (413, by Content-Length or while streaming), strict JSON that the endpoint's model
   validates (400; `serving.request_body`), `explain` only with its scope (403), `/events`
   timestamps no later than the clock plus the allowed skew (400) and within the user's
   events-per-minute cap (429).
The body is then replayed to BentoML. Answers with status 4xx or 503 from further in
(unknown item, store unavailable, ...) are logged the same way, once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from serving.auth import HEALTH_PATHS, AuthError, HostPolicy, KeyRing, Principal, required_scope
from serving.limits import InFlight, TokenBuckets, UserEventCap, retry_after
from serving.log_safety import escape, mark_rejection_logged
from serving.request_body import BodyError, validate
from serving.schemas import EventsRequest, RecommendRequest, SimilarItemsRequest, raw_id
from tlsan.serve_settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("bentoml.tlsan.rejected")
BODY_MODELS: dict[str, type[BaseModel]] = {
    "/recommend": RecommendRequest,
    "/events": EventsRequest,
    "/similar_items": SimilarItemsRequest,
}
_WARN = frozenset({401, 403, 429, 503})


@dataclass
class GateState:
    """What the gate enforces; filled in by the worker at start-up (`TlsanService.__init__`),
    before the first request: settings, the key ring (None: no authentication), the
    OpenAPI document."""

    settings: ServeSettings = field(default_factory=ServeSettings)
    keys: KeyRing | None = None
    openapi: bytes = b"{}"
    clock: Callable[[], float] = time.time
    ready: bool = False


class Rejection(Exception):
    """An answer the gate gives instead of the service."""

    def __init__(
        self,
        status: int,
        error: str,
        loc: list[str | int],
        kind: str,
        headers: dict[str, str] | None = None,
        detail: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body = {
            "error": error,
            "detail": detail or [{"loc": loc, "msg": error, "type": kind}],
        }
        self.headers = headers or {}


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


async def _send_json(
    send: Send, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class _Logged:
    """Wraps `send`: an answer with status 4xx or 503 gets one log line (status, the field
    from its JSON `detail`, the key's name), and its access-log line is dropped."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self.send = send
        self.method = scope.get("method", "")
        self.path = scope.get("path", "")
        self.client = (scope.get("client") or ("-",))[0]
        self.principal: Principal | None = None
        self.status = 0
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self._rejected:
                mark_rejection_logged()
        elif message["type"] == "http.response.body" and self._rejected:
            if sum(len(c) for c in self.chunks) < 8192:
                self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self._log()
        await self.send(message)

    @property
    def _rejected(self) -> bool:
        return 400 <= self.status < 500 or self.status == 503

    def _log(self) -> None:
        where, kind = "-", "-"
        try:
            detail = json.loads(b"".join(self.chunks))["detail"][0]
            where = ".".join(str(p) for p in detail["loc"]) or "body"
            kind = str(detail.get("type") or "-")
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        who = "-" if self.principal is None else f"{self.principal.name}({self.principal.key_id})"
        logger.log(
            logging.WARNING if self.status in _WARN else logging.INFO,
            "rejected %s %s status=%d field=%s reason=%s key=%s client=%s",
            self.method,
            escape(self.path, 120),
            self.status,
            escape(where, 120),
            escape(kind, 40),
            who,
            escape(str(self.client), 64),
        )


class ServingGate:
    """ASGI middleware: hosts, keys, scopes, limits and strict bodies (module docstring)."""

    def __init__(self, app: ASGIApp, *, state: GateState) -> None:
        self.app = app
        self.state = state
        self.buckets = TokenBuckets()
        self._built_for: ServeSettings | None = None

    def _limits(self) -> None:
        """(Re)build the per-worker limits when the worker's settings are known."""
        settings = self.state.settings
        if self._built_for is not settings:
            self.hosts = HostPolicy(settings.hosts)
            self.user_cap = UserEventCap(settings.user_events_per_minute, self.state.clock)
            self.in_flight = InFlight(settings.max_queue)
            self._built_for = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        logged = _Logged(scope, send)
        try:
            await self._serve(scope, receive, logged)
        except Rejection as rejection:
            await _send_json(logged, rejection.status, rejection.body, rejection.headers)

    async def _serve(self, scope: Scope, receive: Receive, send: _Logged) -> None:
        self._limits()
        state, path = self.state, scope["path"]
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        if path not in HEALTH_PATHS and not self.hosts.allows(_header(headers, b"host")):
            raise Rejection(
                400,
                "Host header not allowed (see --allowed-hosts)",
                ["header", "host"],
                "host_not_allowed",
            )
        if path == "/docs.json" and scope.get("method") == "GET":
            await _send_json(send, 200, state.openapi)
            return
        needed = required_scope(path)
        if needed is None:
            await self.app(scope, receive, send)
            return
        if not state.ready:
            raise Rejection(
                503, "the worker is starting", ["server"], "not_ready", {"Retry-After": "1"}
            )
        principal = self._authorize(headers, needed, send) if state.keys is not None else None
        if not self.in_flight.enter():
            raise Rejection(
                503,
                f"too many requests in flight (at most {self.in_flight.limit} per worker); retry",
                ["server"],
                "overloaded",
                {"Retry-After": "1"},
            )
        try:
            model = BODY_MODELS.get(path)
            if model is not None and scope.get("method") == "POST":
                body = await self._read_body(headers, receive)
                self._check_body(path, validate_body(model, body), principal)
                # BentoML parses the same bytes with the same model: what passed here (no
                # duplicate keys, no NaN, UTF-8) passes there with the same meaning.
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.in_flight.leave()

    def _authorize(
        self, headers: list[tuple[bytes, bytes]], needed: str, send: _Logged
    ) -> Principal:
        assert self.state.keys is not None
        try:
            principal = self.state.keys.authenticate(_header(headers, b"authorization"))
            send.principal = principal
        except AuthError as exc:
            challenge = 'Bearer realm="tlsan"'
            if exc.reason != "missing":
                challenge += ', error="invalid_token"'
            raise Rejection(
                401,
                str(exc),
                ["header", "authorization"],
                f"api_key_{exc.reason}",
                {"WWW-Authenticate": challenge},
            ) from None
        if needed not in principal.scopes:
            raise Rejection(
                403,
                f"this API key lacks the {needed!r} scope",
                ["header", "authorization"],
                "scope_missing",
            )
        settings = self.state.settings
        rate = principal.rate_limit or settings.rate_limit
        burst = principal.rate_burst or (
            settings.burst if principal.rate_limit is None else 2.0 * rate
        )
        wait = self.buckets.take(principal.key_id, rate, max(burst, 1.0))
        if wait:
            raise Rejection(
                429,
                f"rate limit of this API key exceeded ({rate:g} requests/s); retry later",
                ["header", "authorization"],
                "rate_limited",
                {"Retry-After": retry_after(wait)},
            )
        return principal

    async def _read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
        kinds = [value for key, value in headers if key == b"content-type"]
        media, _, params = (kinds[0] if len(kinds) == 1 else b"").partition(b";")
        charset = params.strip().lower()
        if (
            len(kinds) != 1
            or media.strip().lower() != b"application/json"
            or charset not in (b"", b"charset=utf-8", b'charset="utf-8"')
        ):
            why = "more than one Content-Type header" if len(kinds) > 1 else "a body must be JSON"
            raise Rejection(
                415,
                f"{why}: send one 'Content-Type: application/json' header",
                ["header", "content-type"],
                "unsupported_media_type",
            )
        limit = self.state.settings.max_body_bytes
        declared = _header(headers, b"content-length") or b""
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Rejection(400, "client disconnected", ["body"], "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> Rejection:
        limit = self.state.settings.max_body_bytes
        return Rejection(
            413,
            f"request body of {size}+ bytes exceeds the limit of {limit} bytes",
            ["body"],
            "body_too_large",
        )

    def _check_body(self, path: str, request: BaseModel, principal: Principal | None) -> None:
        if (
            isinstance(request, RecommendRequest)
            and request.explain
            and principal is not None
            and "explain" not in principal.scopes
        ):
            raise Rejection(
                403,
                "'explain': true needs an API key with the 'explain' scope",
                ["explain"],
                "scope_missing",
            )
        if isinstance(request, EventsRequest):
            skew = self.state.settings.max_future_skew_s
            now = self.state.clock()
            for n, event in enumerate(request.events):
                if event.timestamp > now + skew:
                    raise Rejection(
                        400,
                        f"events.{n}.timestamp: {event.timestamp} is more than {skew} s after "
                        f"the server's clock ({int(now)}); events from the future are refused",
                        ["events", n, "timestamp"],
                        "timestamp_in_future",
                    )
            wait = self.user_cap.admit(raw_id(request.user_id), len(request.events))
            if wait:
                cap = self.user_cap.limit
                raise Rejection(
                    429,
                    f"this user's events are over the cap of {cap} per minute; retry later",
                    ["user_id"],
                    "user_events_per_minute",
                    {"Retry-After": retry_after(wait)},
                )


def validate_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """`serving.request_body.validate`, its refusal as a 400 `Rejection`."""
    try:
        return validate(model, body)
    except BodyError as exc:
        raise Rejection(400, str(exc), [], "", detail=exc.detail) from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already read body to the app, then the real channel."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
