"""What the HTTP service enforces, as environment variables shared by `tlsan serve` and a bento.

`tlsan serve` turns its flags into these variables for the BentoML processes; a bento
(`bentoml serve tlsan:latest`) reads the same variables, so both run the same checks. Bad
values are a `ConfigError` naming the variable (or the flag) and what was expected.

| variable | flag | default |
| --- | --- | --- |
| TLSAN_API_KEYS_FILE | --api-keys | none: no authentication, loopback only |
| TLSAN_INSECURE_NO_AUTH | --insecure-no-auth | off: a non-loopback bind needs keys |
| TLSAN_ALLOWED_HOSTS | --allowed-hosts | with keys or --insecure-no-auth `*`, else localhost names |
| TLSAN_RATE_LIMIT | --rate-limit | 100 requests/s per key and worker |
| TLSAN_RATE_BURST | --rate-burst | twice the rate |
| TLSAN_USER_EVENTS_PER_MINUTE | --user-events-per-minute | 600 stored events per user and worker (> one request's 500) |
| TLSAN_MAX_QUEUE | --max-queue | 128 requests in flight per worker |
| TLSAN_HEADER_TIMEOUT_S | --header-timeout | 10 s to send a request's headers |
| TLSAN_MAX_FUTURE_SKEW_S | --max-future-skew | 300 s: later event timestamps are refused |
| TLSAN_MAX_BODY_BYTES | --max-body-bytes | 1 MiB |

Limits are per worker process: with W workers a key may reach W times its rate (a client on
one keep-alive connection talks to one worker).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tlsan.errors import ConfigError

KEYS_ENV = "TLSAN_API_KEYS_FILE"
INSECURE_ENV = "TLSAN_INSECURE_NO_AUTH"
ALLOWED_HOSTS_ENV = "TLSAN_ALLOWED_HOSTS"
RATE_ENV = "TLSAN_RATE_LIMIT"
BURST_ENV = "TLSAN_RATE_BURST"
USER_EVENTS_ENV = "TLSAN_USER_EVENTS_PER_MINUTE"
MAX_QUEUE_ENV = "TLSAN_MAX_QUEUE"
HEADER_TIMEOUT_ENV = "TLSAN_HEADER_TIMEOUT_S"
SKEW_ENV = "TLSAN_MAX_FUTURE_SKEW_S"
MAX_BODY_ENV = "TLSAN_MAX_BODY_BYTES"

DEFAULT_RATE = 100.0
DEFAULT_USER_EVENTS_PER_MINUTE = 600
DEFAULT_MAX_QUEUE = 128
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_FUTURE_SKEW_S = 300
DEFAULT_MAX_BODY_BYTES = 1 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_HOST = re.compile(r"(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*\.?|[0-9a-f:.]+")


@dataclass(frozen=True)
class ServeSettings:
    """The service's security and abuse settings (see the module docstring)."""

    api_keys_file: Path | None = None
    insecure_no_auth: bool = False
    allowed_hosts: tuple[str, ...] | None = None  # None: the default for the mode
    rate_limit: float = DEFAULT_RATE
    rate_burst: float | None = None  # None: twice the rate
    user_events_per_minute: int = DEFAULT_USER_EVENTS_PER_MINUTE
    max_queue: int = DEFAULT_MAX_QUEUE
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_future_skew_s: int = DEFAULT_MAX_FUTURE_SKEW_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def burst(self) -> float:
        return self.rate_burst if self.rate_burst is not None else 2.0 * self.rate_limit

    @property
    def hosts(self) -> tuple[str, ...]:
        """Allowed Host header names: given, else any with keys (a browser page cannot send
        the key) or with --insecure-no-auth, else the loopback names (DNS rebinding)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.api_keys_file is not None or self.insecure_no_auth:
            return ("*",)
        return LOOPBACK_HOSTS

    def to_env(self) -> dict[str, str]:
        env = {
            INSECURE_ENV: "1" if self.insecure_no_auth else "0",
            RATE_ENV: repr(self.rate_limit),
            USER_EVENTS_ENV: str(self.user_events_per_minute),
            MAX_QUEUE_ENV: str(self.max_queue),
            HEADER_TIMEOUT_ENV: repr(self.header_timeout_s),
            SKEW_ENV: str(self.max_future_skew_s),
            MAX_BODY_ENV: str(self.max_body_bytes),
            KEYS_ENV: "" if self.api_keys_file is None else str(self.api_keys_file),
            ALLOWED_HOSTS_ENV: "" if self.allowed_hosts is None else ",".join(self.allowed_hosts),
            BURST_ENV: "" if self.rate_burst is None else repr(self.rate_burst),
        }
        return env


def parse_hosts(text: str, where: str) -> tuple[str, ...]:
    """`api.example.com,*.internal,10.0.0.5` -> lowercase names; `*` allows any."""
    hosts = tuple(h.strip().lower().strip("[]") for h in text.split(",") if h.strip())
    if not hosts:
        raise ConfigError(f"{where}: expected host names separated by commas, got {text!r}")
    for host in hosts:
        if host != "*" and not _HOST.fullmatch(host):
            raise ConfigError(f"{where}: {host!r} is not a host name, an IP, '*.domain' or '*'")
    return hosts


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = -1
    if not value > 0 or value != value or value == float("inf"):
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name}={text!r}: expected {kind}")
    return value


def settings_from_env(env: Mapping[str, str] | None = None) -> ServeSettings:
    """The settings a worker or a bento's start-up reads from the environment."""
    env = os.environ if env is None else env
    insecure = env.get(INSECURE_ENV, "").strip().lower()
    if insecure not in _TRUE + _FALSE:
        raise ConfigError(f"{INSECURE_ENV}={insecure!r}: expected 1 or 0")
    keys = env.get(KEYS_ENV, "").strip()
    hosts = env.get(ALLOWED_HOSTS_ENV, "").strip()
    burst = env.get(BURST_ENV, "").strip()
    return ServeSettings(
        api_keys_file=Path(keys) if keys else None,
        insecure_no_auth=insecure in _TRUE,
        allowed_hosts=parse_hosts(hosts, ALLOWED_HOSTS_ENV) if hosts else None,
        rate_limit=_number(env, RATE_ENV, DEFAULT_RATE, integer=False),
        rate_burst=_number(env, BURST_ENV, 0.0, integer=False) if burst else None,
        user_events_per_minute=int(
            _number(env, USER_EVENTS_ENV, DEFAULT_USER_EVENTS_PER_MINUTE, integer=True)
        ),
        max_queue=int(_number(env, MAX_QUEUE_ENV, DEFAULT_MAX_QUEUE, integer=True)),
        header_timeout_s=_number(env, HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S, integer=False),
        max_future_skew_s=int(_number(env, SKEW_ENV, DEFAULT_MAX_FUTURE_SKEW_S, integer=True)),
        max_body_bytes=int(_number(env, MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES, integer=True)),
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: ServeSettings) -> None:
    """Refuse to listen beyond this machine without API keys (unless explicitly insecure)."""
    if is_loopback(host) or settings.api_keys_file is not None or settings.insecure_no_auth:
        return
    raise ConfigError(
        f"refusing to listen on {host} without API keys: anyone who can reach it could read "
        f"and rewrite every user's data; pass --api-keys FILE ({KEYS_ENV}), bind 127.0.0.1, "
        f"or accept the risk with --insecure-no-auth ({INSECURE_ENV}=1)"
    )
