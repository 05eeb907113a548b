"""Pruning benchmark: the same sweep with and without pruning, same seed, same space.

Runs `tlsan tune` twice on one prepared dataset (pruner `none`, then `median` or `hyperband`),
each into its own journal file under --out, and reads the studies back: epochs trained by all
trials together (what pruning saves), wall time, best validation value (what pruning may
cost). Optionally trains the `default` preset once (validation only) as the reference a sweep
must beat. Prints one JSON document; targets: pruning saves >= 40% of the epochs for a best
value within 1% of the unpruned sweep's.

An --out that already holds a finished study is resumed, not rerun (Optuna storage semantics):
delete `<pruner>.log` to measure that sweep again.

The studies stay resumable: `tlsan tune --storage journal:OUT/<pruner>.log --study
bench-<pruner> ... --retrain` (same flags) trains the best config and reports test metrics.

    python benchmarks/tune.py --data DIR                     # 30 trials, default space
    python benchmarks/tune.py --data DIR --trials 12 --epochs 8 --concurrent
    python benchmarks/tune.py --data DIR --out OUT --replay-only   # pruners on OUT's sweep

The report also replays the unpruned sweep's recorded curves through every pruner
(`replay`): the same trials for each, so the pruner's own cost is seen apart from the
sampler's diverging path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_SAVED = 0.40
TARGET_GAP = 0.01


def tune_command(args: argparse.Namespace, pruner: str) -> list[str]:
    cmd = [sys.executable, "-m", "tlsan", "tune", "--data", str(args.data)]
    cmd += ["--study", f"bench-{pruner}", "--trials", str(args.trials)]
    cmd += ["--storage", f"journal:{args.out / f'{pruner}.log'}", "--out", str(args.out / pruner)]
    cmd += ["--pruner", pruner, "--seed", str(args.seed), "--metric", args.metric, "--quiet"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.space:
        cmd += ["--space", str(args.space)]
    if not args.mlflow:
        cmd.append("--no-mlflow")
    return cmd


def study_stats(journal: Path, name: str) -> dict[str, Any]:
    """Epochs, states and the best value of a finished study (read from its journal)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    from tlsan.tuning.objective import EPOCHS_ATTR

    study = optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    epochs = [int(t.user_attrs.get(EPOCHS_ATTR, len(t.intermediate_values))) for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "trials": len(trials),
        "complete": len(complete),
        "pruned": len(trials) - len(complete),
        "epochs_trained": sum(epochs),
        "median_epochs_per_trial": statistics.median(epochs) if epochs else 0,
        "best_value": None if best is None else best.value,
        "best_trial": None if best is None else best.number,
        "best_params": None if best is None else best.params,
        "trial_seconds": sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.datetime_complete and t.datetime_start
        ),
    }


def replay_pruners(journal: Path, name: str, kinds: list[str]) -> dict[str, Any]:
    """Replay the unpruned sweep's completed trials, in trial order, through each pruner.

    Every trial reports its recorded per-epoch curve to a fresh in-memory study with the
    pruner; where the pruner stops it, the rest of its curve is not counted. The trials
    (and so the sampled configurations) are the same for every pruner, which separates
    what the pruner decides from the path the sampler would have taken after a pruning:
    the live pruned sweep mixes both. Costs no training.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    from tlsan.tuning.study import IDENTITY_PREFIX, make_pruner

    source = optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    trials = sorted(
        (t for t in source.trials if t.state == TrialState.COMPLETE), key=lambda t: t.number
    )
    if not trials:
        raise SystemExit(f"{journal}: no completed trials to replay")
    max_epochs = source.user_attrs.get(IDENTITY_PREFIX + "epochs")
    total = sum(len(t.intermediate_values) for t in trials)
    best = max(t.value for t in trials if t.value is not None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, Any] = {"trials": len(trials), "epochs_unpruned": total, "best": best}
    for kind in kinds:
        study = optuna.create_study(direction="maximize", pruner=make_pruner(kind, max_epochs))
        epochs, kept, pruned = 0, [], []
        for recorded in trials:
            trial = study.ask()
            stopped = False
            for step in sorted(recorded.intermediate_values):
                trial.report(recorded.intermediate_values[step], step)
                epochs += 1
                if trial.should_prune():
                    stopped = True
                    break
            if stopped:
                study.tell(trial, state=TrialState.PRUNED)
                pruned.append(recorded.number)
            else:
                study.tell(trial, recorded.value)
                kept.append((recorded.value, recorded.number))
        kept_best, kept_trial = max(kept)
        saved = 1.0 - epochs / total
        gap = (best - kept_best) / best
        out[kind] = {
            "epochs_trained": epochs,
            "epochs_saved_ratio": saved,
            "best_value": kept_best,
            "best_trial": kept_trial,
            "best_value_relative_gap": gap,
            "pruned_trials": pruned,
            "targets_met": saved >= TARGET_SAVED and gap <= TARGET_GAP,
        }
    return out


def default_preset_valid(data: Path, metric: str, seed: int) -> dict[str, Any]:
    """Validation score of the `default` preset (never reads the test split)."""
    from tlsan.config import preset
    from tlsan.train import fit
    from tlsan.tuning.objective import load_tuning_data

    config = preset("default").override(select_metric=metric, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = fit(
            config,
            load_tuning_data(data),
            Path(tmp) / "run",
            mlflow=False,
            progress=False,
            evaluate_test=False,
        )
        seconds = time.perf_counter() - start
    return {
        "valid": result.valid[metric],
        "best_epoch": result.best_epoch,
        "epochs_trained": len([h for h in result.history if h["epoch"]]),
        "seconds": seconds,
    }


def run_sweeps(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Both sweeps, one after the other or side by side; returns their wall times."""
    pruners = ("none", args.pruner)
    walls: dict[str, dict[str, float]] = {}
    if args.concurrent:
        start = time.perf_counter()
        procs = {
            p: subprocess.Popen(tune_command(args, p), cwd=args.out, stdout=subprocess.DEVNULL)
            for p in pruners
        }
        while len(walls) < len(procs):
            for pruner, proc in procs.items():
                if pruner not in walls and proc.poll() is not None:
                    if proc.returncode != 0:
                        raise SystemExit(f"tlsan tune --pruner {pruner} failed ({proc.returncode})")
                    walls[pruner] = {"wall_s": time.perf_counter() - start}
            time.sleep(0.5)
        return walls
    for pruner in pruners:
        start = time.perf_counter()
        subprocess.run(
            tune_command(args, pruner), cwd=args.out, check=True, stdout=subprocess.DEVNULL
        )
        walls[pruner] = {"wall_s": time.perf_counter() - start}
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset dir")
    parser.add_argument("--out", type=Path, help="journals and trial dirs (default: a temp dir)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, help="epoch cap per trial (default: the preset's)")
    parser.add_argument(
        "--pruner", choices=["percentile", "median", "hyperband"], default="percentile"
    )
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", type=Path, help="search space (default: the shipped one)")
    parser.add_argument("--mlflow", action="store_true", help="track both sweeps in MLflow")
    parser.add_argument(
        "--concurrent", action="store_true", help="run both sweeps at once (2+ cores)"
    )
    parser.add_argument(
        "--skip-default", action="store_true", help="do not train the default preset"
    )
    parser.add_argument(
        "--replay-only",
        action="store_true",
        help="only replay --out's finished unpruned sweep through every pruner (no training)",
    )
    args = parser.parse_args()
    args.data = args.data.resolve()
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="tlsan-bench-tune-"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.space = args.space.resolve() if args.space else None

    kinds = ["percentile", "median", "hyperband"]
    if args.replay_only:
        report = replay_pruners(args.out / "none.log", "bench-none", kinds)
        print(json.dumps({"out": str(args.out), "replay": report}, indent=2, default=str))
        return
    walls = run_sweeps(args)
    unpruned = {
        "pruner": "none",
        **walls["none"],
        **study_stats(args.out / "none.log", "bench-none"),
    }
    pruned = {
        "pruner": args.pruner,
        **walls[args.pruner],
        **study_stats(args.out / f"{args.pruner}.log", f"bench-{args.pruner}"),
    }
    saved = 1.0 - pruned["epochs_trained"] / max(unpruned["epochs_trained"], 1)
    gap = None
    if unpruned["best_value"] and pruned["best_value"] is not None:
        gap = (unpruned["best_value"] - pruned["best_value"]) / unpruned["best_value"]
    report: dict[str, Any] = {
        "data": str(args.data),
        "trials": args.trials,
        "epoch_cap": args.epochs,
        "seed": args.seed,
        "metric": args.metric,
        "concurrent": args.concurrent,
        "out": str(args.out),
        "unpruned": unpruned,
        "pruned": pruned,
        "epochs_saved_ratio": saved,
        "wall_ratio_pruned_over_unpruned": pruned["wall_s"] / unpruned["wall_s"],
        # from the studies' own trial start/end times: also right when a sweep was resumed
        "trial_seconds_ratio": pruned["trial_seconds"] / max(unpruned["trial_seconds"], 1e-9),
        "best_value_relative_gap": gap,
        "targets": {
            f"epochs_saved>={TARGET_SAVED}": saved >= TARGET_SAVED,
            f"best_within_{TARGET_GAP:.0%}": gap is not None and gap <= TARGET_GAP,
        },
    }
    report["replay"] = replay_pruners(args.out / "none.log", "bench-none", kinds)
    if not args.skip_default:
        default = default_preset_valid(args.data, args.metric, args.seed)
        report["default_preset"] = default
        best = max(v for v in (unpruned["best_value"], pruned["best_value"]) if v is not None)
        report["best_sweep_value_beats_default"] = best > default["valid"]
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
