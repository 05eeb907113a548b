"""Log lines that a client cannot forge, and one line per rejected request.

Anything a client sends may end up in a log message (BentoML's access log prints the URL
path, which may hold `%0A`). `OneLineFilter` escapes control characters, line separators
and bidi overrides in every message of the server's log handler, so a request can never
start a line of its own. Rejected requests are logged once by the middleware (status and
field, never the input); it marks the request (`mark_rejection_logged`) and the filter then
drops BentoML's access-log line for it.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_rejection_logged: ContextVar[bool] = ContextVar("tlsan_rejection_logged", default=False)
ACCESS_LOGGER = "bentoml.access"


def escape(text: str, limit: int | None = None) -> str:
    """`text` with unsafe characters as `\\xNN`/`\\uNNNN`, cut to `limit` characters."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def mark_rejection_logged() -> None:
    """This request's rejection is logged: its access-log line would be a second one."""
    _rejection_logged.set(True)


class OneLineFilter(logging.Filter):
    """Escapes every message to one safe line; drops access lines of logged rejections."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == ACCESS_LOGGER and _rejection_logged.get():
            return False
        message = record.getMessage()
        if _UNSAFE.search(message):
            record.msg, record.args = escape(message), None
        return True


def install() -> None:
    """Add the filter to the handlers of the server's loggers (BentoML configures them)."""
    handlers = {*logging.getLogger("bentoml").handlers, *logging.getLogger().handlers}
    for handler in handlers:
        if not any(isinstance(f, OneLineFilter) for f in handler.filters):
            handler.addFilter(OneLineFilter())
