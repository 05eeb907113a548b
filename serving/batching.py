"""Adaptive micro-batching: concurrent calls share one batched computation.

The recommender's cost is dominated by per-call overhead (one feature computation, one
model forward, one FAISS search), not by the batch size, so the service groups requests. The
batch adapts to the load without a fixed window: while one batch computes (in the event
loop, or in a worker thread for groups above `inline_max`), new calls queue up, and they all
form the next batch. At low load a call runs at once (no added latency); under load the batches
grow up to `max_batch_size`. `max_wait_ms` optionally holds a small batch back a little
longer to collect more calls.

BentoML's own `batchable=True` APIs take a list per request; our wire shape is one request
per call, and the wrapper service BentoML documents for that adds a second process and an
HTTP hop per call, so the batching lives here, in-process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    """Counters for observability and tests: how well requests were grouped."""

    batches: int = 0
    items: int = 0
    max_batch: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.max_batch = max(self.max_batch, size)
        if len(self.sizes) < 10_000:
            self.sizes.append(size)


class MicroBatcher(Generic[T, R]):
    """Run `fn(list[T]) -> list[R | Exception]` on groups of concurrently submitted items.

    Groups of up to `inline_max` items (by default a lone call) run directly in the event
    loop, which saves two thread hand-offs; larger ones run in one dedicated thread, so the
    loop keeps reading requests meanwhile and batches never overlap. That thread pays off
    only when `fn` mostly releases the GIL; the service's recommender does not, so it runs
    every batch inline. An exception instance in the result list fails only that item's
    call; an exception raised by `fn` fails the batch.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        name: str = "batcher",
        inline_max: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected an integer >= 1, got {max_batch_size}")
        if inline_max < 0:
            raise ValueError(f"inline_max: expected >= 0, got {inline_max}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: expected >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.inline_max = inline_max
        self.stats = BatchStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests)
            self._loop = loop
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if self.max_wait and len(self._queue) < self.max_batch_size:
                    deadline = time.monotonic() + self.max_wait
                    while len(self._queue) < self.max_batch_size and time.monotonic() < deadline:
                        await asyncio.sleep(0.0005)
                batch = self._queue[: self.max_batch_size]
                del self._queue[: len(batch)]
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        assert self._loop is not None
        self.stats.record(len(batch))
        items = [item for item, _ in batch]
        try:
            if len(items) <= self.inline_max:
                results = self.fn(items)
            else:
                results = await self._loop.run_in_executor(self._executor, self.fn, items)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)}"
                )
        except Exception as exc:  # the whole batch failed: every caller sees the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller went away (client disconnect, timeout)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Stop the worker and its thread; queued calls are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
        for _, future in self._queue:
            if not future.done():
                future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
