"""Which engine builds the examples: Polars in this process, or the same code on Ray.

Both engines run the same per-block function (`pipelines.prepare.build_block`) on blocks of
whole users; Ray only decides where the blocks run. The choice is not part of the dataset
(`PrepareConfig`, the dataset hash): both engines write the same files, and the manifest
records which one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.errors import DataValidationError

ENGINES = ("polars", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """`--engine`, `--ray-address` and `--ray-partitions`, validated."""

    name: str = "polars"
    address: str | None = None  # None: a Ray started for this run (or the one already running)
    partitions: int = 0  # Ray partitions of the users; 0: twice the cluster's CPUs

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise DataValidationError(
                f"--engine: expected one of {', '.join(ENGINES)}, got {self.name!r}"
            )
        if self.name != "ray" and (self.address is not None or self.partitions):
            raise DataValidationError(
                "--ray-address/--ray-partitions only apply to --engine ray, "
                f"not --engine {self.name}"
            )
        if self.address is not None and not self.address.strip():
            raise DataValidationError("--ray-address: expected HOST:PORT, ray://HOST:PORT or auto")
        if not isinstance(self.partitions, int) or self.partitions < 0:
            raise DataValidationError(
                f"--ray-partitions: expected an integer >= 0 (0 = twice the cluster's CPUs), "
                f"got {self.partitions!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """What the manifest records under `engine` (before the run adds what it found)."""
        data: dict[str, Any] = {"name": self.name}
        if self.name == "ray":
            data["address"] = self.address or "local"
        return data
