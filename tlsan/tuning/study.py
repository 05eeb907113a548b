"""Create or resume an Optuna study: seeded TPE sampler, pruner, and the study's identity.

A study name in a storage is a promise that its trials are comparable: same metric, dataset,
base config and search space. The first process records these as study user attributes; a
resume (or another worker) with anything different is refused with a clear error instead of
silently mixing incomparable values.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from tlsan.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

PRUNERS: tuple[str, ...] = ("percentile", "median", "hyperband", "none")
IDENTITY_PREFIX = "tlsan."
MLFLOW_PARENT_ATTR = "tlsan.mlflow_parent_run_id"
MEDIAN_STARTUP_TRIALS = 5  # trials that always run to the end before a percentile pruner acts
PRUNE_PERCENTILE = 25.0  # `percentile` prunes the bottom quarter (see make_pruner)
WARMUP_FRACTION = 0.1  # share of the epoch budget every trial trains before it may be pruned
MIN_WARMUP_EPOCHS = 3


def make_sampler(
    seed: int, worker_index: int = 0, n_existing: int = 0
) -> optuna.samplers.BaseSampler:
    """TPE, seeded from (seed, worker index, trials already in the study).

    A sampler is made afresh before each trial (TPE keeps no state but its random generator):
    a resumed study then draws new points instead of repeating its first process's random
    start-up trials, and processes sharing a study (each with its own worker index) do not
    draw the same points, while one process on a fresh study stays reproducible for a seed.
    """
    import numpy as np
    from optuna.samplers import TPESampler

    derived = np.random.SeedSequence([seed, worker_index, n_existing]).generate_state(1)[0]
    return TPESampler(seed=int(derived))


def warmup_epochs(max_epochs: int | None) -> int:
    """Epochs before a trial may be pruned: 10% of the budget, at least 3 (4 for the
    `default` preset's 40 epochs).

    TLSAN's validation curves sit at the popularity level for the first few epochs and only
    then separate (on Digital_Music good and bad configs look alike up to epoch 3), so
    pruning earlier stops trials at random and steers TPE away from good regions. Waiting
    longer costs most of the saving, since early stopping ends a typical trial after ~10-15
    epochs (`benchmarks/tune.py` on Digital_Music, 30 trials: 178 epochs pruned vs 420
    unpruned, 57.6% saved).
    """
    if not max_epochs:
        return MIN_WARMUP_EPOCHS + 1
    return max(MIN_WARMUP_EPOCHS, math.ceil(WARMUP_FRACTION * max_epochs))


def make_pruner(kind: str, max_epochs: int | None) -> optuna.pruners.BasePruner:
    """`percentile` (the default): stop a trial whose best validation value so far is below
    the 25th percentile of the best values completed trials had reached by the same epoch (a
    trial that stopped early counts with its final best, see `tlsan.tuning.pruning`);
    `median`: the same at the 50th percentile, which saves more epochs but also stops more
    slow starters that would have won; `hyperband`: successive halving over epochs, starting
    at the warm-up; `none`: never prune. No trial is pruned during its warm-up epochs.

    Replaying the 30 unpruned Digital_Music trials of `benchmarks/tune.py` through them
    (`--replay`): percentile saves 43.6% of the epochs and keeps a best within 0.66% of the
    unpruned one; median saves 59.8% but prunes the winner (2.1% below)."""
    from optuna.pruners import HyperbandPruner, NopPruner

    from tlsan.tuning.pruning import BestSoFarMedianPruner, BestSoFarPercentilePruner

    warmup = warmup_epochs(max_epochs)
    if kind == "percentile":
        return BestSoFarPercentilePruner(
            PRUNE_PERCENTILE, n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=warmup
        )
    if kind == "median":
        return BestSoFarMedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=warmup)
    if kind == "hyperband":
        return HyperbandPruner(
            min_resource=warmup,
            max_resource=max_epochs if max_epochs else "auto",
            reduction_factor=3,
        )
    if kind == "none":
        return NopPruner()
    raise ConfigError(f"--pruner: expected one of {', '.join(PRUNERS)}, got {kind!r}")


def _describe(storage_url: str, name: str) -> str:
    return f"study {name!r} in {storage_url}"


def open_study(
    storage: BaseStorage,
    storage_url: str,
    name: str,
    *,
    identity: dict[str, Any],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study or load it (resume / another worker), checking its identity."""
    return create_or_open_study(
        storage, storage_url, name, identity=identity, sampler=sampler, pruner=pruner
    )[0]


def create_or_open_study(
    storage: BaseStorage,
    storage_url: str,
    name: str,
    *,
    identity: dict[str, Any],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> tuple[optuna.Study, bool]:
    """(the study, whether this process created it). Creating a study is atomic in every
    Optuna storage (its name is unique), so of several workers started together exactly one
    learns it created the study: that one sets the study up (its MLflow parent run, see
    `tlsan.tuning.mlflow_study.parent_run`) while the others wait for it."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    if not name or not name.strip():
        raise ConfigError("--study: expected a non-empty study name")
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
        )
        created = True
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    except ValueError as exc:
        raise ConfigError(f"{_describe(storage_url, name)}: {exc}") from exc
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"{_describe(storage_url, name)}: exists and minimizes; tlsan tune maximizes "
            "a validation metric (use another --study)"
        )
    check_identity(study, storage_url, identity)
    return study, created


def check_identity(study: optuna.Study, storage_url: str, identity: dict[str, Any]) -> None:
    """Record `identity` on a new study; refuse a study recorded with other values."""
    attrs = study.user_attrs
    recorded = {k[len(IDENTITY_PREFIX) :]: v for k, v in attrs.items() if k in _keys(identity)}
    if not recorded and study.get_trials(deepcopy=False):
        raise ConfigError(
            f"{_describe(storage_url, study.study_name)}: has trials but was not created by "
            "tlsan tune (use another --study)"
        )
    for key, value in identity.items():
        if key in recorded and _canon(recorded[key]) != _canon(value):
            raise ConfigError(
                f"{_describe(storage_url, study.study_name)}: was created with {key} "
                f"{_short(recorded[key])}, now {_short(value)}; its trials would not be "
                "comparable (resume with the same settings, or use another --study)"
            )
    for key, value in identity.items():
        if key not in recorded:
            study.set_user_attr(IDENTITY_PREFIX + key, value)


def _keys(identity: dict[str, Any]) -> set[str]:
    return {IDENTITY_PREFIX + k for k in identity}


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else _canon(value)
    return text if len(text) <= 120 else text[:117] + "..."
