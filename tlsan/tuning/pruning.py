"""Median and percentile pruners that understand early stopping.

Optuna's `MedianPruner` compares a trial at epoch t with the values other completed trials
reported *at epoch t*. With early stopping most completed trials have no value at later
epochs (they stopped because they had converged), so a slow, mediocre trial is compared only
with the few other slow trials and runs on for tens of epochs. Here a completed trial counts
at every later epoch with the best value it reached (what it would still offer had it kept
training), and a running trial is stopped when its best so far is below the median (or a
lower percentile) of those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def best_up_to(values: Mapping[int, float], step: int, maximize: bool) -> float | None:
    """Best reported value at or before `step` (NaNs ignored), None when there is none."""
    seen = [v for s, v in values.items() if s <= step and not math.isnan(v)]
    if not seen:
        return None
    return max(seen) if maximize else min(seen)


class BestSoFarPercentilePruner(BasePruner):
    """Prune when the trial's best so far is worse than the given percentile of the best-so-far
    values of completed trials at the same step, a completed trial keeping its final best
    after it stopped. `percentile` 50 is the median; 25 prunes only the bottom quarter
    (for a maximised metric; the top quarter when minimising).

    No pruning before `n_startup_trials` trials completed, nor while the trial's last step is
    below `n_warmup_steps`.
    """

    def __init__(
        self, percentile: float = 50.0, n_startup_trials: int = 5, n_warmup_steps: int = 0
    ) -> None:
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError("n_startup_trials and n_warmup_steps must be >= 0")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (0, 100], got {percentile}")
        self._percentile = percentile
        self._startup = n_startup_trials
        self._warmup = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._warmup:
            return False
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self._startup:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        current = best_up_to(trial.intermediate_values, step, maximize)
        if current is None:
            return True  # only NaNs so far: nothing worth training on
        others = [best_up_to(t.intermediate_values, step, maximize) for t in completed]
        reached = [v for v in others if v is not None]
        if not reached:
            return False
        q = self._percentile if maximize else 100.0 - self._percentile
        threshold = float(np.percentile(reached, q))
        return current < threshold if maximize else current > threshold


class BestSoFarMedianPruner(BestSoFarPercentilePruner):
    """`BestSoFarPercentilePruner` at the median."""

    def __init__(self, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> None:
        super().__init__(50.0, n_startup_trials, n_warmup_steps)
