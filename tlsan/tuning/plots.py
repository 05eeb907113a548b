"""Study plots as PNG files (Optuna's matplotlib backend; plotly is not a dependency).

Optimization history (is the sweep still improving?), parameter importances (which knobs
matter on this data?) and parallel coordinates (where do the good trials sit?). A plot that
cannot be drawn yet (importances need two finished trials with different values) is skipped
with its reason rather than failing the sweep.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

PLOTS: tuple[str, ...] = ("optimization_history", "param_importances", "parallel_coordinate")


def _figure(drawn: Any) -> Any:
    """The Figure behind what an Optuna plot function returned (Axes or an array of Axes)."""
    first = drawn.flat[0] if hasattr(drawn, "flat") else drawn
    return first.figure


def write_plots(
    study: optuna.Study, out_dir: Path, *, metric: str
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every plot to `out_dir/<name>.png`; returns (written, skipped-with-reason)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    functions: dict[str, Callable[..., Any]] = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name in PLOTS:
        if not complete:
            skipped[name] = "no complete trial yet"
            continue
        if name == "param_importances" and len({t.value for t in complete}) < 2:
            skipped[name] = "needs at least two complete trials with different values"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
                fig = _figure(functions[name](study, target_name=metric))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped[name] = " ".join(str(exc).split())[:200]
            continue
        path = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.tmp.png"
        fig.set_size_inches(max(fig.get_figwidth(), 9), max(fig.get_figheight(), 5))
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        written[name] = path
    return written, skipped
