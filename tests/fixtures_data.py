"""Fixtures that build prepared datasets from ../shared/data and the synthetic generator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.config import PrepareConfig, apply_preset
from pipelines.prepare import prepare_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AMAZON = SHARED_DATA / "amazon"
AMAZON_NAMES = ("Digital_Music", "Office_Products", "Clothing_Shoes_and_Jewelry")


def amazon_paths(name: str) -> tuple[Path, Path]:
    """The interaction log and item catalog of one shared Amazon dataset."""
    return AMAZON / f"{name}.interactions.csv", AMAZON / f"{name}.items.csv"


def prepare_amazon(name: str, out: Path, *, seed: int = 0) -> Path:
    """Prepare one shared Amazon dataset with `--preset paper` into `out`."""
    interactions, items = amazon_paths(name)
    config = apply_preset(
        PrepareConfig(interactions=interactions, items=items, seed=seed), "paper", set()
    )
    return prepare_dataset(config, out, progress=False).path


@pytest.fixture(scope="session")
def prepared_amazon(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `prepared_amazon("Digital_Music")` → a paper-preset dataset dir, built once."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = prepare_amazon(name, tmp_path_factory.mktemp("amazon") / name)
        return cache[name]

    return get
