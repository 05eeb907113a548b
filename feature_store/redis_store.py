"""The Redis online store, for serving replicas on several machines.

Layout per user (keys under `prefix`):
- `{prefix}ev:{user}` sorted set, score = timestamp, member = `<seq:020d>:<timestamp>:<item>`;
  equal scores sort by member, i.e. by the zero-padded arrival number `seq`, so reads come
  back by timestamp with ties in arrival order;
- `{prefix}seen:{user}` hash whose fields `<timestamp>:<item>` are the stored events (the
  idempotency check) plus the field `#seq`, the user's arrival counter;
- `{prefix}ties:{user}` set of the `seen` fields the cap dropped whose timestamp ties the
  oldest kept event: they stay in `seen` so that sending them again is refused (they would
  count as newer than their tie-mates); older dropped events leave `seen` at once;
- `{prefix}users` set of users with events.

Every append is one Lua script, so the duplicate check, the insert and the retention cap are
atomic with respect to other clients. Bulk loads send those scripts pipelined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from feature_store.base import (
    DEFAULT_MAX_EVENTS_PER_USER,
    Event,
    OnlineStore,
    check_cap,
    check_columns,
    check_events,
    check_id,
    check_n,
)
from feature_store.errors import StoreError

DEFAULT_PREFIX = "tlsan:fs:"
_SEQ_WIDTH = 20  # digits of seq in a member; the payload starts after "<seq>:"
# Events per script call in bulk loads: keeps each call short so other clients are not stalled.
_EVENTS_PER_CALL = 1000

# KEYS: events zset, seen hash, users set, ties set. ARGV: cap, user, then timestamp/item
# pairs. Returns how many events it stored that the cap kept (seq > the counter before).
_APPEND_LUA = """
local cap = tonumber(ARGV[1])
local seq0 = tonumber(redis.call('HGET', KEYS[2], '#seq') or '0')
local added = 0
for i = 3, #ARGV, 2 do
  local field = ARGV[i] .. ':' .. ARGV[i + 1]
  if redis.call('HSETNX', KEYS[2], field, '1') == 1 then
    local seq = redis.call('HINCRBY', KEYS[2], '#seq', 1)
    redis.call('ZADD', KEYS[1], ARGV[i], string.format('%020d', seq) .. ':' .. field)
    added = added + 1
  end
end
if added > 0 then
  redis.call('SADD', KEYS[3], ARGV[2])
end
local extra = redis.call('ZCARD', KEYS[1]) - cap
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[1], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  local oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
  for _, member in ipairs(old) do
    local field = string.sub(member, 22)
    if tonumber(string.match(field, '^(-?%d+):')) < oldest then
      redis.call('HDEL', KEYS[2], field)
    else
      redis.call('SADD', KEYS[4], field)
    end
    if tonumber(string.sub(member, 1, 20)) > seq0 then
      added = added - 1
    end
  end
  for _, field in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    if tonumber(string.match(field, '^(-?%d+):')) < oldest then
      redis.call('SREM', KEYS[4], field)
      redis.call('HDEL', KEYS[2], field)
    end
  end
end
return added
"""

# KEYS: as above. ARGV: user. Returns the number of events removed.
_DELETE_LUA = """
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
redis.call('SREM', KEYS[3], ARGV[1])
return n
"""


def redact(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _decode(member: str) -> Event:
    """`<seq>:<timestamp>:<item>` -> Event (item ids may contain ':')."""
    ts, item = member[_SEQ_WIDTH + 1 :].split(":", 1)
    return Event(item, int(ts))


class RedisStore(OnlineStore):
    """Events in a Redis database; see the module docstring for the key layout."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
        url: str = "redis://",
    ) -> None:
        self.url = url
        self.max_events_per_user = check_cap(max_events_per_user, url)
        self.prefix = prefix
        self._client = client
        self._closed = False
        with self._redis_errors("connect"):
            client.ping()
        self._append = client.register_script(_APPEND_LUA)
        self._delete = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_events_per_user: int = 1000,
        **kwargs: Any,
    ) -> RedisStore:
        """Connect with redis-py's URL parser (`redis://[user:pass@]host:port/db`); messages
        show the URL with its password masked."""
        shown = redact(url)
        try:
            client = redis.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, **kwargs
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{shown}: not a usable Redis URL ({exc})") from exc
        return cls(client, prefix=prefix, max_events_per_user=max_events_per_user, url=shown)

    # ---- helpers ----
    def _keys(self, user: str) -> list[str]:
        p = self.prefix
        return [f"{p}ev:{user}", f"{p}seen:{user}", f"{p}users", f"{p}ties:{user}"]

    @contextmanager
    def _redis_errors(self, action: str) -> Iterator[None]:
        """Turn redis-py errors into `StoreError`s that name the server and the operation."""
        if self._closed:
            raise StoreError(f"{self.url}: the store is closed")
        try:
            yield
        except redis.exceptions.ConnectionError as exc:
            raise StoreError(
                f"{self.url}: {action} failed: cannot reach the Redis server ({exc}); "
                "expected a running redis-server at this address"
            ) from exc
        except redis.exceptions.RedisError as exc:
            expected = "; expected a Redis server at this address" if action == "connect" else ""
            raise StoreError(f"{self.url}: {action} failed: {exc}{expected}") from exc

    # ---- writes ----
    def append(self, user_id: str, events: Sequence[Event]) -> int:
        user = check_id(user_id, "user_id")
        evs = check_events(events)
        if not evs:
            return 0
        args: list[Any] = [self.max_events_per_user, user]
        for e in evs:
            args += (e.timestamp, e.item_id)
        with self._redis_errors("append"):
            return int(self._append(keys=self._keys(user), args=args))

    def bulk_load(
        self,
        users: Any,
        items: Any,
        timestamps: Any,
        *,
        batch_size: int = 100_000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Group rows by user (keeping their order) and send one script per user chunk,
        pipelined, one round trip per `batch_size` rows."""
        u, it, ts = check_columns(users, items, timestamps)
        if batch_size < 1:
            raise StoreError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        added = 0
        for start in range(0, len(u), batch_size):
            stop = min(start + batch_size, len(u))
            per_user: dict[str, list[Any]] = {}
            for user, item, t in zip(u[start:stop], it[start:stop], ts[start:stop], strict=True):
                args = per_user.get(user)
                if args is None:
                    args = per_user[user] = []
                args += (t, item)
            with self._redis_errors("bulk_load"):
                pipe = self._client.pipeline(transaction=False)
                step = 2 * _EVENTS_PER_CALL
                for user, args in per_user.items():
                    keys = self._keys(user)
                    for i in range(0, len(args), step):
                        head = [self.max_events_per_user, user]
                        self._append(keys=keys, args=head + args[i : i + step], client=pipe)
                added += sum(int(r) for r in pipe.execute())
            if progress is not None:
                progress(stop - start)
        return added

    def delete_user(self, user_id: str) -> int:
        user = check_id(user_id, "user_id")
        with self._redis_errors("delete_user"):
            return int(self._delete(keys=self._keys(user), args=[user]))

    # ---- reads ----
    def recent(self, user_id: str, n: int | None = None) -> list[Event]:
        user, n = check_id(user_id, "user_id"), check_n(n)
        if n == 0:
            return []
        with self._redis_errors("recent"):
            members = self._client.zrange(self._keys(user)[0], 0 if n is None else -n, -1)
        return [_decode(m) for m in members]

    def recent_many(self, user_ids: Any, n: int | None = None) -> dict[str, list[Event]]:
        """One pipelined round trip for the whole batch."""
        users, n = [check_id(u, "user_id") for u in user_ids], check_n(n)
        if n == 0:
            return dict.fromkeys(users, [])
        with self._redis_errors("recent_many"):
            pipe = self._client.pipeline(transaction=False)
            for user in users:
                pipe.zrange(self._keys(user)[0], 0 if n is None else -n, -1)
            replies = pipe.execute()
        return {user: [_decode(m) for m in ms] for user, ms in zip(users, replies, strict=True)}

    def count(self, user_id: str) -> int:
        user = check_id(user_id, "user_id")
        with self._redis_errors("count"):
            return int(self._client.zcard(self._keys(user)[0]))

    def users(self) -> Iterator[str]:
        with self._redis_errors("users"):
            yield from self._client.sscan_iter(f"{self.prefix}users", count=1000)

    def n_users(self) -> int:
        with self._redis_errors("n_users"):
            return int(self._client.scard(f"{self.prefix}users"))

    def n_events(self) -> int:
        """Events stored over all users (one pipelined ZCARD per user)."""
        users = list(self.users())
        with self._redis_errors("n_events"):
            pipe = self._client.pipeline(transaction=False)
            for user in users:
                pipe.zcard(self._keys(user)[0])
            return sum(int(c) for c in pipe.execute())

    # ---- lifecycle ----
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
