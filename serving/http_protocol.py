"""The workers' HTTP protocol: uvicorn's, with a header read timeout and JSON for bad HTTP.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends
its headers a byte at a time holds it, and a worker's file descriptors, for as long as it
likes; BentoML builds uvicorn's config itself, with no option for this. `install` points
uvicorn's `auto` protocol at `HeaderTimeoutProtocol` (before the worker's server starts:
the service module is imported first): from a connection's start, and from the end of each
response, the next request's headers must be complete within the timeout, or the client
gets a 408 and the connection is closed. Time spent on a request after its headers
(body, work) is bounded by BentoML's request timeout instead. Malformed HTTP (which
uvicorn answers in plain text) gets a JSON 400 like every other refusal.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn.config
from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("bentoml.tlsan.rejected")
_timeout_s = 10.0


def _json_response(status: bytes, error: str, kind: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body, closing the connection."""
    body = json.dumps(
        {"error": error, "detail": [{"loc": ["request"], "msg": error, "type": kind}]}
    ).encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % status
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


_TIMEOUT = _json_response(b"408 Request Timeout", "request headers not received in time", "header_timeout")  # fmt: skip
_INVALID = _json_response(b"400 Bad Request", "invalid HTTP request", "invalid_http")


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's protocol, closing connections whose request headers take too long."""

    _header_timer: asyncio.TimerHandle | None = None
    _waiting_cycle: Any = None
    _started = False  # bytes of a next request arrived since the timer was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._started = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._waiting_cycle = self.cycle  # a new request's headers replace the cycle
        self._started = False
        self._header_timer = self.loop.call_later(_timeout_s, self._expire)

    def _expire(self) -> None:
        self._header_timer = None
        if self.cycle is not self._waiting_cycle or self.transport.is_closing():
            return  # headers arrived in time (or the connection is already going)
        if not self._started:  # an idle connection: nothing was asked, nothing to answer
            self.transport.close()
            return
        client = (self.client or ("-",))[0]
        logger.info(
            "rejected connection status=408 field=header reason=header_timeout client=%s "
            "(headers not complete within %g s)",
            client,
            _timeout_s,
        )
        self.transport.write(_TIMEOUT)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP gets a JSON error body too (uvicorn's is plain text)."""
        self.transport.write(_INVALID)
        self.transport.close()


def install(timeout_s: float) -> None:
    """Use `HeaderTimeoutProtocol` for uvicorn's default (`auto`) HTTP protocol."""
    global _timeout_s
    _timeout_s = float(timeout_s)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderTimeoutProtocol"
