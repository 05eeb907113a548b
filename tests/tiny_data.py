"""Small datasets for the model/training/evaluation tests (helpers, not fixtures).

`synthetic_dataset` runs the real pipeline (generator -> `prepare_dataset`) at a size that
trains in seconds; `hand_split` builds a `Split` whose every example and history is chosen by
the test, for metrics computed by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.config import PrepareConfig, SessionRule
from pipelines.prepare import prepare_dataset
from pipelines.synthetic import generate_log
from tlsan.data import ExampleArrays, Split


def synthetic_dataset(
    root: Path, *, users: int = 300, items: int = 80, events: int = 9000, seed: int = 1
) -> Path:
    """A leave-one-out dataset from the synthetic generator (sequential signal to learn)."""
    log = root / "log"
    generate_log(log, users=users, items=items, events=events, seed=seed, fmt="parquet")
    config = PrepareConfig(
        interactions=log / "interactions.parquet",
        items=log / "items.parquet",
        split="leave-one-out",
        session=SessionRule.parse("gap:30m"),
        max_long=20,
        max_short=10,
    )
    return prepare_dataset(config, root / "prepared", progress=False).path


def hand_split(
    targets: list[int], histories: list[list[int]], n_items: int, users: list[int] | None = None
) -> Split:
    """A split with one example per target; `histories[r]` is example r's seen items.

    The history items also fill `long_items` (tau 1), so models see them as input.
    """
    n = len(targets)
    width = max(1, max(len(h) for h in histories))
    long_items = torch.zeros(n, width, dtype=torch.int64)
    for row, history in enumerate(histories):
        if history:
            long_items[row, width - len(history) :] = torch.tensor(history)
    keys = sorted({row * n_items + item for row, h in enumerate(histories) for item in h})
    arrays = ExampleArrays(
        user=torch.tensor(users or [1] * n),
        long_items=long_items,
        long_tau=(long_items > 0).to(torch.float32),
        short_items=torch.zeros(n, 1, dtype=torch.int64),
        user_category=torch.zeros(n, dtype=torch.int64),
        target=torch.tensor(targets),
        history_end=torch.tensor([len(h) for h in histories]),
        ref_time=torch.zeros(n, dtype=torch.int64),
    )
    return Split("hand", arrays, torch.tensor(np.array(keys, dtype=np.int64)), n_items)
