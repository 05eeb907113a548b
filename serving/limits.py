"""Abuse limits of one worker process: per-key rate, per-user event rate, requests in flight.

All three live in the worker's event loop (the ASGI middleware calls them between awaits), so
they need no locks; each answers "go" (0.0) or how many seconds to wait, which becomes a
`Retry-After` header. Their memory is bounded: one bucket per API key, one counter per user
seen in the current minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBuckets:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up.

    A request takes one token; without one it waits `(1 - tokens) / rate` seconds.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, rate: float, burst: float) -> float:
        """0.0 when a token was taken, else the seconds until one is there."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate


class UserEventCap:
    """At most `limit` events stored per user in each clock minute (fixed windows).

    Caps how fast anyone, even with the `events` scope, can push a user's real history out
    of the store's per-user retention; counters reset when the minute turns.
    """

    def __init__(self, limit: int, clock: Clock = time.time) -> None:
        self.limit = limit
        self.clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    def admit(self, user: str, n: int) -> float:
        """0.0 when `n` more events fit this minute (they are counted), else the seconds to
        the next minute."""
        now = self.clock()
        window = int(now // 60)
        if window != self._window:
            self._window, self._counts = window, {}
        used = self._counts.get(user, 0)
        if used + n > self.limit:
            return (window + 1) * 60 - now
        self._counts[user] = used + n
        return 0.0


class InFlight:
    """Requests being served by this worker; a new one beyond `limit` is turned away (503)
    instead of queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


def retry_after(seconds: float) -> str:
    """The `Retry-After` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
