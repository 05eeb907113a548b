"""API keys of the HTTP service: the keys file, its hashing, and its atomic updates.

A key is `tlsan_<id>_<secret>`: `id` (12 hex digits) names the key in the file and in logs,
`secret` is 32 random bytes (URL-safe base64). The file stores only a per-key random salt
and SHA-256(salt + secret): the secret has 256 bits of entropy, so a slow hash would add
nothing against guessing while costing every request; the comparison is constant-time
(`hmac.compare_digest`), and an unknown id costs the same hash as a known one.

    {"format": "tlsan-api-keys", "version": 1, "keys": [
      {"id": "3f9a1c2b7d4e", "name": "shop-backend", "scopes": ["events", "recommend"],
       "salt": "<hex>", "sha256": "<hex>", "created_at": "2026-01-01T00:00:00+00:00",
       "revoked_at": null, "rate_limit": null, "rate_burst": null}]}

Scopes: `recommend` (POST /recommend, /similar_items), `events` (POST /events), `explain`
(`"explain": true` on /recommend, on top of `recommend`), `admin` (GET /model, /metrics).
Revoked keys stay in the file (who had access, until when) and are refused. Every change
is written to a temporary file beside the keys file and renamed over it (mode 0600), under
an exclusive lock, so a server reloading the file never sees half of it. This module is
pure Python: `tlsan keys` manages the file, `serving.auth` reads it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tlsan.errors import ConfigError

KEYS_FORMAT = "tlsan-api-keys"
KEYS_VERSION = 1
SCOPES = ("recommend", "events", "explain", "admin")
KEY_PREFIX = "tlsan_"
ID_HEX = 12
SECRET_BYTES = 32
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{ID_HEX}}})_([A-Za-z0-9_-]{{43}})")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: never the secret, only its salted hash."""

    id: str
    name: str
    scopes: tuple[str, ...]
    salt: str
    sha256: str
    created_at: str
    revoked_at: str | None = None
    rate_limit: float | None = None  # requests per second; None: the server's default
    rate_burst: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def matches(self, secret: str) -> bool:
        """Constant-time comparison of a presented secret with the stored hash."""
        return hmac.compare_digest(hash_secret(self.salt, secret), self.sha256)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scopes"] = list(self.scopes)
        return data


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """`tlsan_<id>_<secret>` -> (id, secret); None for anything else."""
    match = _TOKEN.fullmatch(token)
    return None if match is None else (match.group(1), match.group(2))


def parse_scopes(text: str | Sequence[str], where: str) -> tuple[str, ...]:
    """`"recommend,events"` (or a list) -> sorted unique scopes; unknown ones are refused."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = {s.strip() for s in items if isinstance(s, str) and s.strip()}
    unknown = sorted(scopes - set(SCOPES))
    if not isinstance(text, str) and any(not isinstance(s, str) for s in items):
        raise ConfigError(f"{where}: scopes must be strings, expected some of {', '.join(SCOPES)}")
    if unknown:
        raise ConfigError(
            f"{where}: unknown scope(s) {unknown}; expected some of {', '.join(SCOPES)}"
        )
    if not scopes:
        raise ConfigError(f"{where}: no scopes; expected some of {', '.join(SCOPES)}")
    return tuple(sorted(scopes))


def _positive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: expected a positive number or null, got {value!r}")
    return float(value)


def _record(raw: Any, where: str) -> KeyRecord:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object, got {type(raw).__name__}")
    fields = {"id", "name", "scopes", "salt", "sha256", "created_at", "revoked_at",
              "rate_limit", "rate_burst"}  # fmt: skip
    unknown = sorted(set(raw) - fields)
    missing = sorted({"id", "name", "scopes", "salt", "sha256", "created_at"} - set(raw))
    if unknown or missing:
        raise ConfigError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    key_id, salt, digest = raw["id"], raw["salt"], raw["sha256"]
    if not (isinstance(key_id, str) and len(key_id) == ID_HEX and _HEX.fullmatch(key_id)):
        raise ConfigError(f"{where}.id: expected {ID_HEX} lowercase hex digits")
    if not (isinstance(salt, str) and len(salt) == 32 and _HEX.fullmatch(salt)):
        raise ConfigError(f"{where}.salt: expected 32 lowercase hex digits")
    if not (isinstance(digest, str) and len(digest) == 64 and _HEX.fullmatch(digest)):
        raise ConfigError(f"{where}.sha256: expected 64 lowercase hex digits")
    name = raw["name"]
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise ConfigError(f"{where}.name: expected 1-64 characters of A-Z a-z 0-9 . _ -")
    if not isinstance(raw["scopes"], list):
        raise ConfigError(f"{where}.scopes: expected a list of {', '.join(SCOPES)}")
    if not isinstance(raw["created_at"], str):
        raise ConfigError(f"{where}.created_at: expected an ISO-8601 time string")
    if raw.get("revoked_at") is not None and not isinstance(raw["revoked_at"], str):
        raise ConfigError(f"{where}.revoked_at: expected an ISO-8601 time string or null")
    return KeyRecord(
        id=key_id,
        name=name,
        scopes=parse_scopes(raw["scopes"], f"{where}.scopes"),
        salt=salt,
        sha256=digest,
        created_at=raw["created_at"],
        revoked_at=raw.get("revoked_at"),
        rate_limit=_positive(raw.get("rate_limit"), f"{where}.rate_limit"),
        rate_burst=_positive(raw.get("rate_burst"), f"{where}.rate_burst"),
    )


def parse_keys(data: Any, source: str) -> list[KeyRecord]:
    """The records of a parsed keys file, every field checked; ids must be unique."""
    if not isinstance(data, dict) or data.get("format") != KEYS_FORMAT:
        raise ConfigError(f"{source}: not a tlsan API keys file (expected format {KEYS_FORMAT!r})")
    if data.get("version") != KEYS_VERSION:
        raise ConfigError(
            f"{source}: keys file version {data.get('version')!r}, expected {KEYS_VERSION}"
        )
    if not isinstance(data.get("keys"), list):
        raise ConfigError(f"{source}: 'keys' must be a list")
    records = [_record(raw, f"{source}: keys[{n}]") for n, raw in enumerate(data["keys"])]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: duplicate key ids")
    return records


def read_keys(path: Path) -> list[KeyRecord]:
    """Every record of the keys file at `path` (a missing or malformed file: `ConfigError`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: API keys file not found; create one with `tlsan keys create`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API keys file ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_keys(data, str(path))


def _write_keys(path: Path, records: Sequence[KeyRecord]) -> None:
    """Temp file in the same directory, fsync, rename over `path`: readers see old or new."""
    payload = {
        "format": KEYS_FORMAT,
        "version": KEYS_VERSION,
        "keys": [r.to_json() for r in records],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file's directory, so two `tlsan keys` runs never lose an
    update (the keys file itself is replaced by each write, so it cannot hold the lock)."""
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def create_key(
    path: Path,
    name: str,
    scopes: str | Sequence[str],
    *,
    rate_limit: float | None = None,
    rate_burst: float | None = None,
) -> tuple[KeyRecord, str]:
    """Add a key to the file (created if missing); returns its record and the token, which
    is shown once and never stored."""
    path = Path(path)
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"--name {name!r}: expected 1-64 characters of A-Z a-z 0-9 . _ -")
    checked = parse_scopes(scopes, "--scopes")
    limit = _positive(rate_limit, "--rate-limit")
    burst = _positive(rate_burst, "--rate-burst")
    with _locked(path):
        records = read_keys(path) if path.exists() else []
        if any(r.name == name and r.active for r in records):
            raise ConfigError(f"{path}: an active key named {name!r} exists; revoke it first")
        taken = {r.id for r in records}
        key_id = secrets.token_hex(ID_HEX // 2)
        while key_id in taken:
            key_id = secrets.token_hex(ID_HEX // 2)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
        salt = secrets.token_hex(16)
        record = KeyRecord(
            id=key_id,
            name=name,
            scopes=checked,
            salt=salt,
            sha256=hash_secret(salt, secret),
            created_at=_now(),
            rate_limit=limit,
            rate_burst=burst,
        )
        _write_keys(path, [*records, record])
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def revoke_key(path: Path, *, key_id: str | None = None, name: str | None = None) -> KeyRecord:
    """Mark the active key with this id (or name) revoked; returns its updated record."""
    path = Path(path)
    if (key_id is None) == (name is None):
        raise ConfigError("tlsan keys revoke: give exactly one of --id or --name")
    with _locked(path):
        records = read_keys(path)
        hits = [
            n
            for n, r in enumerate(records)
            if r.active and (r.id == key_id if key_id is not None else r.name == name)
        ]
        if not hits:
            what = f"id {key_id!r}" if key_id is not None else f"name {name!r}"
            raise ConfigError(f"{path}: no active key with {what} (see `tlsan keys list`)")
        records[hits[0]] = replace(records[hits[0]], revoked_at=_now())
        _write_keys(path, records)
    return records[hits[0]]
