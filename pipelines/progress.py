"""Step-by-step progress on stderr: a spinner while a step runs, its time when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class Steps:
    """Times named steps; shows them on stderr when `enabled` (silent in library use)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            with self.console.status(f"{name} ..."):
                yield
        else:
            yield
        self.timings[name] = time.perf_counter() - start
        if self.enabled:
            self.console.print(f"[green]✓[/] {name} [dim]{self.timings[name]:.2f} s[/]")

    def finish(self) -> float:
        total = time.perf_counter() - self._start
        self.timings["total"] = total
        return total
