"""Who may call what: API keys (`Authorization: Bearer ...`), scopes per route, Host names.

The keys file (`tlsan.api_keys`) is read at start-up and re-read when it changes (checked at
most once a second), so `tlsan keys revoke` takes effect on running workers within a second
or so; a file that turns invalid is reported once and the previous keys stay in force.

Routes: `/healthz`, `/livez`, `/readyz` and the OpenAPI page (`/`, `/docs.json`) are open;
`/recommend` and `/similar_items` need `recommend`, `/events` needs `events`, `/model`,
`/metrics` and any other path need `admin`; `"explain": true` also needs `explain` (checked
once the body is read).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlsan.api_keys import KeyRecord, hash_secret, read_keys, split_token
from tlsan.errors import ConfigError

logger = logging.getLogger("bentoml.tlsan.auth")

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/", "/docs.json"})
HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
ROUTE_SCOPES = {
    "/recommend": "recommend",
    "/similar_items": "recommend",
    "/events": "events",
    "/model": "admin",
    "/metrics": "admin",
}
_DUMMY_SALT, _DUMMY_HASH = "00" * 16, "0" * 64


def required_scope(path: str) -> str | None:
    """The scope a path needs (None: open to anyone). Unknown paths need `admin`."""
    if path in OPEN_PATHS:
        return None
    return ROUTE_SCOPES.get(path, "admin")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's id and name (for logs) and what it may do."""

    key_id: str
    name: str
    scopes: frozenset[str]
    rate_limit: float | None
    rate_burst: float | None


class AuthError(Exception):
    """401: no key, a malformed one, or one that is unknown or revoked."""

    def __init__(self, message: str, reason: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id


class KeyRing:
    """The active keys of a keys file, reloaded when the file changes."""

    def __init__(
        self, path: Path, *, check_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.check_every = check_every
        self.clock = clock
        self._keys: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._reported: tuple[int, int, int] | None = None
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int]:
        stat = os.stat(self.path)
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def reload(self) -> None:
        """Read the file now (`ConfigError` when it is missing or malformed)."""
        try:
            stamp = self._file_stamp()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the API keys file ({exc})") from None
        records = read_keys(self.path)
        self._keys = {r.id: r for r in records if r.active}
        self._stamp = stamp

    @property
    def active(self) -> int:
        return len(self._keys)

    def _refresh(self) -> None:
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_every
        stamp: tuple[int, int, int] | None = None
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self.reload()
            logger.info("API keys reloaded from %s: %d active", self.path, len(self._keys))
        except (OSError, ConfigError) as exc:
            if stamp != self._reported:  # once per change of the file
                self._reported = stamp
                logger.warning("API keys file not reloaded, previous keys stay: %s", exc)

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The caller of an `Authorization` header value, or `AuthError`."""
        self._refresh()
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'", "missing")
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        parts = split_token(token.strip()) if scheme.lower() == "bearer" else None
        if parts is None:
            raise AuthError(
                "malformed Authorization header: expected 'Bearer tlsan_<id>_<secret>'",
                "malformed",
            )
        key_id, secret = parts
        record = self._keys.get(key_id)
        if record is None:  # the same work as for a known id: timing tells nothing
            hmac.compare_digest(hash_secret(_DUMMY_SALT, secret), _DUMMY_HASH)
            raise AuthError("invalid or revoked API key", "invalid", key_id)
        if not record.matches(secret):
            raise AuthError("invalid or revoked API key", "invalid", key_id)
        return Principal(
            key_id=record.id,
            name=record.name,
            scopes=frozenset(record.scopes),
            rate_limit=record.rate_limit,
            rate_burst=record.rate_burst,
        )


class HostPolicy:
    """The Host header names a request may carry (exact names, `*.domain`, or `*`)."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.any = "*" in hosts
        self.exact = frozenset(h for h in hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def allows(self, host_header: bytes | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        host = host_header.decode("latin-1").strip().lower()
        if host.startswith("["):  # [::1]:3000
            name = host[1 : host.find("]")] if "]" in host else ""
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        name = name.rstrip(".")
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))
