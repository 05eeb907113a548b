"""The model registry: `build_model` turns a `ModelConfig` into TLSAN or a baseline.

Kept apart from the model files so that tlsan/model.py, tlsan/baselines.py and tlsan/sasrec.py
never import each other: they share only the interface of tlsan/scoring.py.
"""

from __future__ import annotations

from torch import Tensor

from tlsan.baselines import Pop
from tlsan.config import MODEL_KINDS, ModelConfig
from tlsan.data import VocabSizes
from tlsan.errors import ConfigError
from tlsan.model import TLSAN
from tlsan.sasrec import SASRec, TiSASRec
from tlsan.scoring import VectorModel

MODELS: dict[str, type[VectorModel]] = {
    "tlsan": TLSAN,
    "sasrec": SASRec,
    "tisasrec": TiSASRec,
    "pop": Pop,
}
assert set(MODELS) == set(MODEL_KINDS), "every configurable kind needs a model class"


def build_model(config: ModelConfig, sizes: VocabSizes, item_category: Tensor) -> VectorModel:
    """A freshly initialised model of `config.kind` (call `torch.manual_seed` first for
    reproducible weights). `pop` starts with zero scores: fit it with `Pop.fit(dataset)`."""
    if item_category.shape[0] != sizes.items:
        raise ConfigError(
            f"item_category has {item_category.shape[0]} rows, expected vocab_sizes.items = "
            f"{sizes.items}"
        )
    if config.kind not in MODELS:
        raise ConfigError(f"model.kind: expected one of {', '.join(MODELS)}, got {config.kind!r}")
    return MODELS[config.kind](config, sizes, item_category)
