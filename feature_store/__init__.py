"""Online feature store: each user's raw event history for serving, in SQLite or Redis.

`open_store(url)` picks the backend from the URL:
- `sqlite:///relative/path.db` (relative to the working directory) or `sqlite:////abs/path.db`,
  query options `max_events_per_user`, `synchronous` (full | normal | extra), `timeout` (s);
- `redis://[user:password@]host:port/db`, query options `prefix`, `max_events_per_user`, and
  any redis-py connection option.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from feature_store.base import DEFAULT_MAX_EVENTS_PER_USER, Event, OnlineStore, check_cap
from feature_store.errors import StoreError

DEFAULT_STORE_URL = "sqlite:///mlruns/feature_store.db"

__all__ = [
    "DEFAULT_MAX_EVENTS_PER_USER",
    "DEFAULT_STORE_URL",
    "Event",
    "OnlineStore",
    "StoreError",
    "open_store",
]

_EXPECTED = "expected sqlite:///path/to/file.db or redis://host:port/db"


def open_store(
    url: str | None = None, *, max_events_per_user: int | None = None, create_dirs: bool = True
) -> OnlineStore:
    """Open (creating if needed) the store at `url`; `max_events_per_user` overrides the URL's.

    `create_dirs=False` (serving) refuses an SQLite file whose directory does not exist,
    rather than creating it: a typo in a path should not silently start an empty store."""
    url = DEFAULT_STORE_URL if url is None else url
    if not isinstance(url, str) or "://" not in url:
        raise StoreError(f"store URL {url!r}: {_EXPECTED}")
    try:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
        shown = url if parts.password is None else url.replace(f":{parts.password}@", ":***@")
    except ValueError as exc:
        raise StoreError(f"store URL {url!r}: {exc}; {_EXPECTED}") from exc
    cap_text = options.pop("max_events_per_user", DEFAULT_MAX_EVENTS_PER_USER)
    cap = check_cap(cap_text if max_events_per_user is None else max_events_per_user, shown)
    if parts.scheme == "sqlite":
        return _open_sqlite(url, parts.netloc, parts.path, options, cap, create_dirs)
    if parts.scheme in ("redis", "rediss", "unix"):
        from feature_store.redis_store import DEFAULT_PREFIX, RedisStore

        prefix = options.pop("prefix", DEFAULT_PREFIX)
        plain = urlunsplit(parts._replace(query=urlencode(options)))
        return RedisStore.from_url(plain, prefix=prefix, max_events_per_user=cap)
    raise StoreError(f"store URL {shown!r}: unknown scheme {parts.scheme!r}; {_EXPECTED}")


def _open_sqlite(
    url: str, netloc: str, path: str, options: dict[str, str], cap: int, create_dirs: bool
) -> OnlineStore:
    from feature_store.sqlite_store import SQLiteStore

    file = unquote(path[1:])  # "sqlite:///rel" -> "rel", "sqlite:////abs" -> "/abs"
    if netloc or not file or file == ":memory:":
        raise StoreError(
            f"store URL {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db "
            "(a file; in-memory databases cannot be shared between workers)"
        )
    if not create_dirs and not Path(file).parent.is_dir():
        raise StoreError(
            f"store URL {url!r}: directory {Path(file).parent} does not exist; create it "
            "first (or fix the path)"
        )
    unknown = sorted(set(options) - {"synchronous", "timeout"})
    if unknown:
        raise StoreError(
            f"store URL {url!r}: unknown option(s) {unknown}; expected max_events_per_user, "
            "synchronous or timeout"
        )
    try:
        timeout = float(options.get("timeout", 30.0))
    except ValueError:
        raise StoreError(
            f"store URL {url!r}: timeout must be seconds, got {options['timeout']!r}"
        ) from None
    return SQLiteStore(
        Path(file),
        max_events_per_user=cap,
        synchronous=options.get("synchronous", "full"),
        timeout=timeout,
        url=url,
    )
