"""`tlsan tune`: an Optuna hyper-parameter sweep, tracked in MLflow, resumable and parallel."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hyper-parameter sweep with Optuna (tracked in MLflow)",
        description="Run an Optuna study of TLSAN trainings on a prepared dataset: TPE sampler, "
        "per-epoch pruning on the validation metric, one MLflow parent run with a nested run "
        "per trial. The same --storage and --study resume the study; several processes (or "
        "machines) with the same ones share it and finish exactly --trials trials between them. "
        "The test split is never read during the sweep.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--study", required=True, help="study name (resumes it if it exists)")
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="complete + pruned trials the study should have in total (resume: what is missing)",
    )
    p.add_argument(
        "--storage",
        default="sqlite:///mlruns/optuna.db",
        metavar="URL",
        help="Optuna storage: sqlite:///FILE, postgresql://..., mysql://... or journal:PATH "
        "(default sqlite:///mlruns/optuna.db)",
    )
    p.add_argument(
        "--space", type=Path, help="search space YAML (default: tlsan/default_space.yaml)"
    )
    p.add_argument("--metric", default="ndcg@10", help="validation metric to maximise")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no trial after this")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="worker processes (default 1)")
    p.add_argument(
        "--pruner", choices=["percentile", "median", "hyperband", "none"], default="percentile"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and every training")
    p.add_argument("--retrain", action="store_true", help="train the best config, report test")
    p.add_argument(
        "--out", type=Path, help="trial run dirs, plots, best config (default runs/tune/STUDY)"
    )
    p.add_argument("--epochs", type=int, metavar="N", help="cap on the epochs of every trial")
    p.add_argument("--preset", choices=["paper", "default"], default="default", help="base config")
    p.add_argument("--config", type=Path, help="base config file (JSON/YAML) over the preset")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="no MLflow tracking")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="trial heartbeat; a trial silent for 3 beats is failed and retried (default 30)",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        default=0,
        metavar="I",
        help="give each process started on its own on a shared study its own index, so their "
        "samplers draw different points (--jobs numbers its workers itself)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from tlsan.tuning.sweep import TuneSettings

    return TuneSettings(
        data=args.data,
        study=args.study,
        trials=args.trials,
        storage=args.storage,
        space=args.space,
        metric=args.metric,
        timeout=args.timeout,
        jobs=args.jobs,
        pruner=args.pruner,
        seed=args.seed,
        retrain=args.retrain,
        out=args.out,
        epochs=args.epochs,
        preset=args.preset,
        config=args.config,
        mlflow=args.mlflow,
        heartbeat=args.heartbeat,
        worker_index=args.worker_index,
        worker=args.worker,
        progress=not args.quiet and not args.worker,
    )


def resume_command(settings: Any) -> str:
    """The command that continues this study (same identity flags)."""
    cmd = ["tlsan", "tune", "--data", str(settings.data), "--study", settings.study]
    cmd += ["--storage", settings.storage, "--trials", str(settings.trials)]
    for flag, value, default in (
        ("--space", settings.space, None),
        ("--metric", settings.metric, "ndcg@10"),
        ("--epochs", settings.epochs, None),
        ("--preset", settings.preset, "default"),
        ("--config", settings.config, None),
        ("--out", settings.out, None),
        ("--pruner", settings.pruner, "percentile"),
        ("--seed", settings.seed, 0),
        ("--jobs", settings.jobs, 1),
    ):
        if value is not None and value != default:
            cmd += [flag, str(value)]
    if not settings.mlflow:
        cmd.append("--no-mlflow")
    return shlex.join(cmd)


class _CtrlC:
    """First Ctrl-C: stop after the running trial. Second: abort it (KeyboardInterrupt)."""

    def __init__(self, stop: Any, quiet: bool) -> None:
        self.stop = stop
        self.quiet = quiet
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.requested:
            raise KeyboardInterrupt
        self.stop.request("interrupted")
        if not self.quiet:
            print(
                "\ntlsan tune: stopping after the running trial (Ctrl-C again to abort it)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run(args: argparse.Namespace) -> int:
    from tlsan.tuning.sweep import run_sweep
    from tlsan.tuning.workers import StopFlag

    settings = settings_from_args(args)
    stop = StopFlag()
    try:
        with _CtrlC(stop, quiet=args.worker):
            outcome = run_sweep(settings, stop)
    except KeyboardInterrupt:
        if not args.worker:
            print(_interrupted_message(settings, None), file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.worker:
        print(f"worker {settings.worker_index}: ran trials {outcome.ran_here} ({outcome.status})")
        return EXIT_INTERRUPTED if outcome.status == "interrupted" else 0
    report(settings, outcome)
    if outcome.status == "interrupted":
        print(_interrupted_message(settings, outcome.counted), file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _interrupted_message(settings: Any, counted: int | None) -> str:
    done = "" if counted is None else f"{counted}/{settings.trials} trials are "
    return (
        f"tlsan tune: interrupted; {done}saved in {settings.storage} (study {settings.study!r}). "
        f"Resume with: {resume_command(settings)}"
    )


def report(settings: Any, outcome: Any) -> None:
    """Best trial, files written, test metrics of the retrained best config."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if outcome.status == "timeout":
        console.print(
            f"--timeout reached: {outcome.counted}/{outcome.trials} trials in the study; "
            f"run again to continue: {resume_command(settings)}"
        )
    best = outcome.best
    if best is None:
        console.print(f"study {settings.study!r}: no complete trial yet")
        return
    table = Table(title=f"best trial {best.number} of study {settings.study!r}")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_row(f"valid {settings.metric}", f"{best.value:.5f}")
    table.add_section()
    for name, value in sorted(best.params.items()):
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"best config: {outcome.best_config_path}")
    if outcome.plots:
        console.print(f"plots: {', '.join(str(p) for p in outcome.plots.values())}")
    for name, reason in outcome.skipped_plots.items():
        console.print(f"plot {name} skipped: {reason}")
    if outcome.parent_run_id is not None:
        console.print(f"MLflow parent run: {outcome.parent_run_id}")
    if outcome.retrain is not None:
        result = outcome.retrain
        metrics = Table(title=f"retrained best config: {result.run_dir}")
        metrics.add_column("metric")
        metrics.add_column("valid", justify="right")
        metrics.add_column("test", justify="right")
        for key, value in result.valid.items():
            test = (result.test or {}).get(key)
            metrics.add_row(key, f"{value:.5f}", "-" if test is None else f"{test:.5f}")
        console.print(metrics)
