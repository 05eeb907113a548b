"""Fixtures that start real servers (redis-server, ...) on free local ports; see tests/servers.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.servers import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_session_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test session, stopped when the session ends."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_session_server: RedisServer) -> str:
    """URL of an empty Redis database: the session server, flushed before each test."""
    with socket.create_connection(("127.0.0.1", redis_session_server.port), timeout=5) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"FLUSHALL on {redis_session_server.url()} answered {reply!r}")
    return redis_session_server.url()
