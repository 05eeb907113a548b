"""Fixtures that start real servers (redis-server, ...) on free local ports; see tests/servers.py."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def dm_bundle(
    prepared_amazon: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Digital_Music (paper preset), TLSAN trained for 2 epochs and exported, built once for
    the server tests: (prepared dataset dir, bundle dir). Tests copy it before damaging it."""
    from serving.index_builder import build_bundle_index
    from tlsan.bundle import write_bundle
    from tlsan.config import preset
    from tlsan.train import fit

    data = prepared_amazon("Digital_Music")
    work = tmp_path_factory.mktemp("dm-bundle")
    fit(preset("default").override(epochs=2), data, work / "run", mlflow=False, progress=False)
    write_bundle(work / "run", data, work / "bundle", index_builder=build_bundle_index)
    return data, work / "bundle"
