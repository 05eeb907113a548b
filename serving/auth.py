"""Who may call what: API keys (`Authorization: Bearer ...`), scopes per route, Host names.

The keys file (`tlsan.api_keys`) is read at start-up and re-read when it changes (checked at
most once a second), so `tlsan keys revoke` takes effect on running workers within a second
or so; a file that turns invalid is reported once and the previous keys stay in force.

Routes: `/healthz`, `/livez`, `/readyz`, the OpenAPI page (`/`, `/docs.json`, its assets) and
BentoML's client schema (`/schema.json`) are open;
`/recommend` and `/similar_items` need `recommend`, `/events` needs `events`, `/model`,
`/metrics` and any other path need `admin`; `"explain": true` also needs `explain` (checked
once the body is read).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlsan.api_keys import KeyRecord, read_keys, split_token
from tlsan.errors import ConfigError

logger = logging.getLogger("bentoml.tlsan.auth")

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/", "/docs.json", "/schema.json"})
OPEN_PREFIXES = ("/assets/", "/static_content/")  # the OpenAPI page's scripts and styles
HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
ROUTE_SCOPES = {
    "/recommend": "recommend",
    "/similar_items": "recommend",
    "/events": "events",
    "/model": "admin",
    "/metrics": "admin",
}


def required_scope(path: str) -> str | None:
    """The scope a path needs (None: open to anyone). Unknown paths need `admin`."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
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


@dataclass(frozen=True)
class _Entry:
    """A key as the request path needs it: salt and hash as bytes, the principal made once."""

    salt: bytes
    digest: bytes
    principal: Principal


_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)\s*")
_DUMMY = _Entry(bytes(16), bytes(32), Principal("", "", frozenset(), None, None))


class KeyRing:
    """The active keys of a keys file, reloaded when the file changes."""

    def __init__(
        self, path: Path, *, check_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.check_every = check_every
        self.clock = clock
        self._keys: dict[str, _Entry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = clock() + check_every
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
        self._keys = {r.id: _entry(r) for r in read_keys(self.path) if r.active}
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
        bearer = _BEARER.fullmatch(authorization)
        parts = split_token(bearer.group(1).decode("latin-1")) if bearer else None
        if parts is None:
            raise AuthError(
                "malformed Authorization header: expected 'Bearer tlsan_<id>_<secret>'",
                "malformed",
            )
        key_id, secret = parts
        entry = self._keys.get(key_id)
        # An unknown id costs the same hash and comparison as a known one: timing tells nothing.
        known = entry or _DUMMY
        digest = hashlib.sha256(known.salt + secret.encode()).digest()
        if not hmac.compare_digest(digest, known.digest) or entry is None:
            raise AuthError("invalid or revoked API key", "invalid", key_id)
        return entry.principal


def _entry(record: KeyRecord) -> _Entry:
    return _Entry(
        salt=bytes.fromhex(record.salt),
        digest=bytes.fromhex(record.sha256),
        principal=Principal(
            key_id=record.id,
            name=record.name,
            scopes=frozenset(record.scopes),
            rate_limit=record.rate_limit,
            rate_burst=record.rate_burst,
        ),
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
