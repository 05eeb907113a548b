"""ASGI middleware that refuses oversized or non-JSON request bodies before any parsing.

BentoML reads a request body whole before validating it, so without a cap one request could
make a worker buffer gigabytes. Bodies are checked by their Content-Length and, for chunked
uploads, while they stream in; either way the answer is a 413 JSON body naming the limit.
Bodies are always decoded as JSON (multipart and pickle are refused with a 415).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1 << 20


async def _json_response(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """Limit POST bodies on `paths` to `max_body_bytes` and parse them as JSON.

    A JSON body with a Content-Length within the limit passes straight through; any other
    body is read here (BentoML buffers it whole anyway) so that an oversized chunked one is
    answered before the service sees it. Multipart and pickle bodies are refused: BentoML
    would decode them with other serializers. Any other content type (curl's default
    form-urlencoded, text/plain, none) is treated as JSON, so a JSON body sent without the
    header still works and a non-JSON body gets the usual 400 naming the problem.
    """

    def __init__(
        self, app: ASGIApp, *, paths: tuple[str, ...], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ) -> None:
        self.app = app
        self.paths = paths
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        kind = dict(headers).get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind.startswith(b"multipart/") or b"pickle" in kind:
            await _json_response(
                send,
                415,
                {
                    "error": f"content-type {kind.decode(errors='replace')!r} is not supported; "
                    "send application/json",
                    "detail": [{"loc": ["content-type"], "msg": "expected application/json"}],
                },
            )
            return
        limit = self.max_body_bytes
        declared = dict(headers).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(send, int(declared))
            return
        if declared.isdigit() and kind == b"application/json":
            # The common case needs no buffering: the HTTP parser delivers exactly the
            # declared length, and the content type already routes BentoML to JSON.
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [
            (b"content-type", b"application/json")
        ]
        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, size: int) -> None:
        await _json_response(
            send,
            413,
            {
                "error": f"request body of {size}+ bytes exceeds the limit of "
                f"{self.max_body_bytes} bytes",
                "detail": [{"loc": ["body"], "msg": f"at most {self.max_body_bytes} bytes"}],
            },
        )
