"""The progress bar of a sweep: counted trials of the whole study, best value so far.

It reads the study from its storage, so trials run by other processes or machines show up too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsan.tuning.settings import TuneSettings
from tlsan.tuning.workers import tally

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


class TrialBar:
    """tqdm bar over the study's counted trials with the best value so far."""

    def __init__(self, settings: TuneSettings, study: optuna.Study) -> None:
        from tqdm import tqdm

        self.study = study
        self.metric = settings.metric
        self.lines = settings.progress or settings.worker  # --quiet: nothing per trial
        self.bar = tqdm(
            total=settings.trials,
            desc=f"tune {settings.study}",
            unit="trial",
            disable=not settings.progress or settings.worker,
            dynamic_ncols=True,
        )
        self.refresh()

    def refresh(self, note: str = "") -> None:
        counts = tally(self.study)
        self.bar.n = min(counts.counted, self.bar.total)
        best = best_value(self.study)
        post = {f"best {self.metric}": "-" if best is None else f"{best:.5f}"}
        post["running"] = str(counts.running)
        if note:
            post["now"] = note
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.lines:
            value = "-" if trial.value is None else f"{trial.value:.5f}"
            self.bar.write(f"trial {trial.number}: {trial.state.name.lower()} ({value})")
        self.refresh()

    def close(self) -> None:
        self.bar.close()


def best_value(study: optuna.Study) -> float | None:
    try:
        return float(study.best_value)
    except ValueError:  # no complete trial yet
        return None
