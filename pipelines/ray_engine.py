"""`tlsan prepare --engine ray`: the Polars engine's per-block function, run on Ray.

The driver reads, cleans and indexes the log (the vocabularies are built once), then
partitions the users by a hash of their index; every partition is one Ray task that runs
`pipelines.prepare.build_block` on its users, exactly as the Polars engine does in process.
To write the same files (events.parquet sorted by user), the users are also cut into ranges
("windows") of about a block's events each: every task yields its output window by window
(a Ray streaming generator, so a task holds one window at a time), and the driver merges
window w of every partition, sorts it by user and appends it to the files. Nothing else
changes: one implementation, two engines.

`ray` is imported inside the functions, so the Polars engine never loads it.
"""

from __future__ import annotations

import logging
import socket
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

import pipelines
from pipelines.config import PrepareConfig
from pipelines.engine import EngineConfig
from pipelines.errors import EngineError
from pipelines.writing import Block

PROBE_SECONDS = 3.0
ADDRESS_FORMS = "HOST:PORT (the address `ray start --head` prints), ray://HOST:PORT or auto"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: neighbouring users spread out

Piece = tuple[pa.Table, dict[str, pa.Table]] | None  # one window of one partition


def check_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail in seconds, not minutes, when no Ray cluster answers at `address`.

    `ray.init` retries an address that does not answer for minutes (and ends the process when
    a port answers that is not Ray's), so the address is probed first: a TCP connection, then
    the first call `ray.init` makes there (the GCS's GetClusterId, or the Ray Client server's
    ping for ray://), each within `timeout` seconds.
    """
    if address == "auto":
        return
    client = address.startswith("ray://")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r}: expected {ADDRESS_FORMS}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise EngineError(
            f"--ray-address {address}: no Ray cluster answers there ({reason}, "
            f"{timeout:.0f} s probe); expected {ADDRESS_FORMS} of a running cluster's head"
        ) from None
    _probe(address, f"{host}:{port}", client, timeout)


def _probe(address: str, target: str, client: bool, timeout: float) -> None:
    """Make the first call `ray.init` makes at `target`, with a short deadline."""
    import grpc
    from ray.core.generated import (
        gcs_service_pb2,
        gcs_service_pb2_grpc,
        ray_client_pb2,
        ray_client_pb2_grpc,
    )

    with grpc.insecure_channel(target) as channel:
        try:
            if client:
                ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                    ping, timeout=timeout, metadata=[("client_id", uuid.uuid4().hex)]
                )
            else:
                gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
                gcs.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            what = (
                f"no answer in {timeout:.0f} s"
                if code == grpc.StatusCode.DEADLINE_EXCEEDED
                else f"something answers there but not a Ray head ({code.name if code else exc})"
            )
            raise EngineError(
                f"--ray-address {address}: {what}; expected {ADDRESS_FORMS} of a running "
                "cluster's head"
            ) from None


def user_partition(user: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of every user index: a multiplicative hash, the same on every run."""
    hashed = (user.astype(np.uint64) * _GOLDEN) >> np.uint64(32)
    return (hashed % np.uint64(partitions)).astype(np.int64)


def window_bounds(events: pl.DataFrame, size: int) -> list[int]:
    """User-index bounds [b0, b1, ..., bW] of consecutive user ranges of about `size` events
    (never splitting a user); `events` is sorted by user and not empty."""
    from pipelines.prepare import user_blocks

    users = [int(block["user"][0]) for block in user_blocks(events, size)]
    return [*users, int(events["user"][-1]) + 1]


def concat_blocks(blocks: list[Block]) -> Block:
    """Blocks of disjoint users as one block (row order kept)."""
    table = pl.concat([b[0] for b in blocks])
    return table, {name: pl.concat([b[1][name] for b in blocks]) for name in blocks[0][1]}


def partition_windows(shard: pa.Table, config: PrepareConfig, bounds: list[int]) -> Iterator[Piece]:
    """The Ray task: one partition's users (sorted by user), built block by block with
    `build_block`, yielded window by window (None for a window without its users)."""
    from pipelines.prepare import build_block, user_blocks

    events = pl.from_arrow(shard)
    assert isinstance(events, pl.DataFrame)
    cuts = np.searchsorted(events["user"].to_numpy(), bounds)
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        if end == start:
            yield None
            continue
        window = events.slice(int(start), int(end - start))
        table, examples = concat_blocks([build_block(b, config) for b in user_blocks(window)])
        yield table.to_arrow(), {name: frame.to_arrow() for name, frame in examples.items()}


def _merge(pieces: list[Piece]) -> Block | None:
    """Window w of every partition as one block sorted by user (a user's rows keep their
    order: they all come from one partition)."""
    present = [p for p in pieces if p is not None]
    if not present:
        return None

    def frame(tables: list[pa.Table]) -> pl.DataFrame:
        merged = pl.from_arrow(pa.concat_tables(tables))
        assert isinstance(merged, pl.DataFrame)
        return merged.sort("user", maintain_order=True)

    names = list(present[0][1])
    return frame([p[0] for p in present]), {n: frame([p[1][n] for p in present]) for n in names}


def _connect(engine: EngineConfig) -> bool:
    """Connect to the cluster, or start a local Ray for this run ("local": never a cluster
    that happens to run on this machine); True if this run opened the session.

    On a cluster, this `pipelines` package travels with the job (Ray's runtime_env
    py_modules), so the workers run exactly the driver's code; they need its dependencies
    (polars, numpy, pyarrow) installed.
    """
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if engine.address is None:
        options.update(address="local", include_dashboard=False)
    else:
        options.update(address=engine.address, runtime_env={"py_modules": [pipelines]})
    try:
        with warnings.catch_warnings():  # a tip about GPU env vars; these tasks use no GPU
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = engine.address or "a local Ray"
        raise EngineError(f"--engine ray: cannot start or reach {where}: {exc}") from None
    return True


def ray_blocks(
    events: pl.DataFrame,
    config: PrepareConfig,
    engine: EngineConfig,
    info: dict[str, Any],
    block_events: int,
) -> Iterator[Block]:
    """Blocks of whole users in ascending user order, built by Ray tasks (see module doc)."""
    import ray

    started = _connect(engine)
    try:
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        n_users = int(events["user"].n_unique())
        partitions = max(1, min(engine.partitions or 2 * cpus, n_users))
        bounds = window_bounds(events, block_events)
        info.update(partitions=partitions, windows=len(bounds) - 1, cluster_cpus=cpus)
        part = user_partition(events["user"].to_numpy(), partitions)
        order = np.argsort(part, kind="stable")
        sizes = np.bincount(part, minlength=partitions)
        shuffled = events[order]
        task = ray.remote(num_cpus=1)(partition_windows)
        streams = []
        start = 0
        for size in sizes:
            shard = shuffled.slice(start, int(size)).to_arrow()
            start += int(size)
            if size:
                streams.append(task.remote(shard, config, bounds))
        del shuffled, order, part
        for _ in range(len(bounds) - 1):
            block = _merge([ray.get(next(stream)) for stream in streams])
            if block is not None:
                yield block
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()
        raise EngineError(
            f"--engine ray: a partition task failed: {first[-1] if first else exc!r}"
        ) from exc
    finally:
        if started:
            ray.shutdown()
