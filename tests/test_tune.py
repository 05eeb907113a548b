"""`tlsan tune`: search-space validation, exact trial budgets across processes, kill/Ctrl-C
resume, MLflow parent/nested runs, plots, the best config round trip, test split untouched.

Trials are real (tiny) trainings on a synthetic log prepared with `tlsan prepare`; storages
and the MLflow store always live in tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from tlsan.cli import main
from tlsan.config import TrainConfig, load_config_file, preset
from tlsan.errors import ConfigError
from tlsan.tuning.pruning import BestSoFarMedianPruner, BestSoFarPercentilePruner
from tlsan.tuning.space import DEFAULT_SPACE, load_space, space_from_dict
from tlsan.tuning.storage import check_url, journal_path, open_storage
from tlsan.tuning.study import make_pruner, make_sampler, open_study, warmup_epochs
from tlsan.tuning.workers import RETRY_ATTR, SURPLUS_ATTR, run_worker, slot_rank, tally

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic log (80 users, 60 items) prepared with the paper's construction."""
    root = tmp_path_factory.mktemp("tune_data")
    raw = root / "raw"
    args = ["--users", "80", "--items", "60", "--events", "2400", "--seed", "1"]
    assert main(["generate", *args, "--out", str(raw), "--format", "csv"]) == 0
    out = root / "data"
    prepare = ["prepare", "--interactions", str(raw / "interactions.csv")]
    prepare += ["--items", str(raw / "items.csv"), "--out", str(out), "--preset", "paper"]
    assert main([*prepare, "--quiet"]) == 0
    return out


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow and relative paths (mlruns/, runs/) never touch the repository."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


def tune_args(data: Path, study: str, storage: str, out: Path, *extra: str) -> list[str]:
    return ["tune", "--data", str(data), "--study", study, "--storage", storage,
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlsan", *args]


def journal_study(path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


class Watcher:
    """Polls a journal as another process would ([] until the study exists); one storage
    handle, so each poll reads only the new lines."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.study: optuna.Study | None = None

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        if self.study is None:
            if not self.path.exists():
                return []
            try:
                self.study = journal_study(self.path, self.name)
            except KeyError:  # the journal file exists, the study not yet
                return []
        return self.study.get_trials(deepcopy=False)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- search space ------------------------------------------------------------------------------
def test_default_space_covers_the_documented_parameters() -> None:
    space = load_space(None, preset("default"))
    expected = {"lr", "d_item", "d_cat", "heads", "long_window", "dropout", "l2",
                "batch_size", "negatives", "optimizer"}  # fmt: skip
    assert expected <= set(space.names)
    assert DEFAULT_SPACE.name == "default_space.yaml" and DEFAULT_SPACE.parent.name == "tlsan"
    lr = next(p for p in space.params if p.name == "lr")
    assert lr.log and lr.low < lr.high


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("params:\n  learning_rate: {distribution: float, low: 0.1, high: 1.0}\n",
         ["parameter 'learning_rate'", "unknown"]),
        ("params:\n  lr: {distribution: float, low: 0.1, high: 0.01}\n",
         ["parameter 'lr'", "inverted range"]),
        ("params:\n  negatives: {distribution: int, low: 4, high: 4}\n",
         ["parameter 'negatives'", "empty range"]),
        ("params:\n  negatives: {distribution: int, low: 1.5, high: 4}\n",
         ["parameter 'negatives'", "'low' expected an integer"]),
        ("params:\n  lr: {distribution: float, low: fast, high: 1.0}\n",
         ["parameter 'lr'", "'low' expected a number"]),
        ("params:\n  lr: {distribution: gaussian, low: 0.1, high: 1.0}\n",
         ["parameter 'lr'", "unknown distribution 'gaussian'"]),
        ("params:\n  optimizer: {distribution: categorical, choices: []}\n",
         ["parameter 'optimizer'", "non-empty list"]),
        ("params:\n  optimizer: {distribution: categorical, choices: [adam, rmsprop]}\n",
         ["parameter 'optimizer'", "'rmsprop'"]),
        ("params:\n  dropout: {distribution: float, low: 0.0, high: 1.5}\n",
         ["parameter 'dropout'", "1.5"]),
        ("params:\n  lr: {distribution: float, low: 0.0, high: 0.1, log: true}\n",
         ["parameter 'lr'", "low > 0"]),
        ("params:\n  heads: {distribution: categorical, choices: [5, 8]}\n",
         ["parameter 'heads'", "divisor"]),
        ("params:\n  d_item: {distribution: categorical, choices: [16, 24]}\n"
         "  heads: {distribution: categorical, choices: [8, 16]}\n",
         ["combination", "heads"]),
        ("params:\n  seed: {distribution: int, low: 0, high: 9}\n",
         ["parameter 'seed'", "set by tlsan tune"]),
        ("params: [lr]\n", ["'params' expected a non-empty mapping"]),
        ("params:\n  lr: {distribution: float, low: 0.1, high: 1.0}\nextra: 1\n",
         ["unknown top-level key 'extra'"]),
        ("params:\n  lr: {distribution: float\n", ["not valid YAML"]),
    ],
)  # fmt: skip
def test_bad_space_names_file_parameter_and_expectation(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = write_space(tmp_path / "space.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_space(path, preset("default"))
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_space_bounds_written_as_yaml_text_are_read_as_numbers() -> None:
    """PyYAML reads `1e-4` (no decimal point) as a string: accepted for float bounds."""
    space = space_from_dict(
        {"params": {"lr": {"distribution": "float", "low": "1e-4", "high": "1e-2", "log": True}}},
        preset("default"),
    )
    assert space.params[0].low == pytest.approx(1e-4)


def test_bad_space_file_is_one_error_line_and_exit_2(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = write_space(
        tmp_path / "bad.yaml", "params:\n  lr: {distribution: lognormal, low: 0.1, high: 1.0}\n"
    )
    journal = tmp_path / "study.log"
    status = main(tune_args(tiny_data, "bad", f"journal:{journal}", tmp_path / "out",
                            "--trials", "2", "--space", str(space)))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("tlsan tune: error:") and str(space) in err
    assert "unknown distribution 'lognormal'" in err
    assert not journal.exists()  # refused before any study was created


# -- storage and study identity ----------------------------------------------------------------
def test_storage_urls_are_checked_before_connecting(tmp_path: Path) -> None:
    assert journal_path("journal:runs/study.log") == Path("runs/study.log")
    assert journal_path("journal:///abs/study.log") == Path("/abs/study.log")
    assert journal_path("sqlite:///x.db") is None
    for bad in ("optuna.db", "redis://localhost", "sqlite:///:memory:", "journal:"):
        with pytest.raises(ConfigError, match="--storage"):
            check_url(bad)
    open_storage(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'optuna.db'}")
    assert (tmp_path / "deep" / "dir" / "optuna.db").exists()


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 's.log'}"

    def study(metric: str) -> optuna.Study:
        return open_study(open_storage(url), url, "s", identity={"metric": metric},
                          sampler=make_sampler(0), pruner=make_pruner("none", None))  # fmt: skip

    study("ndcg@10")
    assert study("ndcg@10").user_attrs["tlsan.metric"] == "ndcg@10"
    with pytest.raises(ConfigError, match="created with metric ndcg@10, now hr@10"):
        study("hr@10")


# -- the trial loop (real Optuna, a cheap objective) --------------------------------------------
def quadratic(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    for step in range(1, 4):
        trial.report(-(x**2) * step, step)
        if trial.should_prune():
            raise optuna.TrialPruned
    return -(x**2)


def journal_handle(path: Path, worker: int = 0, pruner: str = "none") -> optuna.Study:
    url = f"journal:{path}"
    return open_study(open_storage(url), url, "loop", identity={"metric": "x"},
                      sampler=make_sampler(0, worker), pruner=make_pruner(pruner, 3))  # fmt: skip


def test_racing_workers_never_exceed_the_budget(tmp_path: Path) -> None:
    """Two handles on one journal both pass the budget check; the later trial is surplus."""
    a = journal_handle(tmp_path / "s.log", 0)
    b = journal_handle(tmp_path / "s.log", 1)
    assert run_worker(a, quadratic, 2).trials == [0, 1]
    ta, tb = a.ask(), b.ask()  # both saw 2 counted < 3
    assert (slot_rank(a, ta.number), slot_rank(b, tb.number)) == (3, 4)
    a.tell(ta, quadratic(ta))
    b.tell(tb, state=TrialState.FAIL)
    result = run_worker(b, quadratic, 3)
    assert result.trials == [] and tally(b).counted == 3  # nothing left to run
    result = run_worker(b, quadratic, 5)  # raising the budget resumes the same study
    assert len(result.trials) == 2 and tally(b).counted == 5


def test_surplus_trial_is_closed_before_it_runs(tmp_path: Path) -> None:
    """Another worker claims the last slot between the budget check and `ask()`."""
    a = journal_handle(tmp_path / "s.log", 0)
    b = journal_handle(tmp_path / "s.log", 1)
    run_worker(a, quadratic, 1)
    raced: list[optuna.Trial] = []
    ran: list[int] = []

    def racing_sampler(n: int) -> optuna.samplers.BaseSampler:
        if not raced:
            raced.append(b.ask())  # the other worker's trial, created just now
        return make_sampler(0, 0, n)

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return 0.0

    def other_worker_finishes(counts: object) -> None:
        b.tell(raced[0], 0.5)

    result = run_worker(a, objective, 2, poll_s=0.01, sampler_for=racing_sampler,
                        on_wait=other_worker_finishes)  # fmt: skip
    assert ran == [] and result.surplus == 1
    trials = a.get_trials(deepcopy=False)
    surplus = [t for t in trials if t.user_attrs.get(SURPLUS_ATTR)]
    assert len(surplus) == 1 and surplus[0].state == TrialState.FAIL
    assert sum(t.state in COUNTED for t in trials) == 2


def test_dead_workers_trial_is_failed_and_retried(tmp_path: Path) -> None:
    a = journal_handle(tmp_path / "s.log", 0)
    b = journal_handle(tmp_path / "s.log", 1)
    run_worker(a, quadratic, 1)
    orphan = b.ask()  # a worker that dies mid-trial: it never beats nor finishes
    orphan_x = orphan.suggest_float("x", -1.0, 1.0)
    time.sleep(0.4)
    result = run_worker(a, quadratic, 3, heartbeat_s=0.1, poll_s=0.01)
    assert result.reaped == [orphan.number]
    trials = {t.number: t for t in a.get_trials(deepcopy=False)}
    assert trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in trials.values() if t.user_attrs.get(RETRY_ATTR) == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["x"] == orphan_x  # the same point, evaluated again
    assert trials[0].state == TrialState.COMPLETE  # nothing completed was lost
    assert sum(t.state in COUNTED for t in trials.values()) == 3


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruned_trials_count_towards_the_budget(tmp_path: Path, pruner: str) -> None:
    study = journal_handle(tmp_path / "s.log", pruner=pruner)
    run_worker(study, quadratic, 12, sampler_for=lambda n: make_sampler(0, 0, n))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert sum(s in COUNTED for s in states) == 12
    assert TrialState.PRUNED in states  # the pruner stopped some


def test_fresh_seed_repeats_and_resume_draws_new_points(tmp_path: Path) -> None:
    def params(study: optuna.Study) -> list[float]:
        return [t.params["x"] for t in study.get_trials(deepcopy=False)]

    runs = []
    for name in ("a", "b"):
        study = journal_handle(tmp_path / f"{name}.log")
        run_worker(study, quadratic, 3, sampler_for=lambda n: make_sampler(7, 0, n))
        runs.append(params(study))
    assert runs[0] == runs[1]  # same seed, fresh study: same trials
    resumed = journal_handle(tmp_path / "a.log")  # a new process on the same study
    run_worker(resumed, quadratic, 5, sampler_for=lambda n: make_sampler(7, 0, n))
    xs = params(resumed)
    assert xs[:3] == runs[0] and len(set(xs)) == 5  # no start-up draw repeated


# -- real sweeps -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_tracks_mlflow_writes_best_config_and_retrains(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from tlsan.tracking import metric_key

    out = tmp_path / "out"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = tune_args(tiny_data, "sweep", storage, out, "--epochs", "2", "--seed", "3")
    assert main([*args, "--trials", "3", "--retrain"]) == 0
    stdout = capsys.readouterr().out
    study = optuna.load_study(study_name="sweep", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state in COUNTED for t in trials)
    assert all(1 <= len(t.intermediate_values) <= 2 for t in trials)  # one report per epoch

    # MLflow: a parent run for the study, one nested run per trial, plots on the parent.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tlsan").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "tuning"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"best/{metric_key('ndcg@10')}"] == pytest.approx(study.best_value)
    children = {
        r.data.tags["optuna.trial_number"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        and "optuna.trial_number" in r.data.tags
    }
    assert sorted(children) == ["0", "1", "2"]
    for trial in trials:
        run = children[str(trial.number)]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.data.params["lr"] == str(trial.params["lr"])
        curve = client.get_metric_history(run.info.run_id, metric_key("ndcg@10"))
        assert [m.step for m in curve] == sorted(trial.intermediate_values)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert f"study/{name}.png" in artifacts
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "study/best_config.yaml" in artifacts

    # The best config holds the best trial's parameters and trains to the same validation score.
    best = study.best_trial
    best_file = out / "best_config.yaml"
    config = load_config_file(best_file)
    flat = config.flat()
    for name, value in best.params.items():
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert flat[name] == expected, name
    assert config.epochs == 2 and config.select_metric == "ndcg@10" and config.seed == 3
    retrained = json.loads((out / f"best_trial_{best.number:04d}" / "metrics.json").read_text())
    assert retrained["valid"]["ndcg@10"] == pytest.approx(best.value)
    assert set(retrained["test"]) >= {"ndcg@10", "hr@10", "auc", "paper_auc"}
    assert "test" in stdout and f"{retrained['test']['ndcg@10']:.5f}" in stdout

    # `tlsan train --config FILE` takes the file as it is.
    run_dir = tmp_path / "train_run"
    status = main(["train", "--data", str(tiny_data), "--out", str(run_dir),
                   "--config", str(best_file), "--no-mlflow", "--quiet"])  # fmt: skip
    assert status == 0
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained["valid"]["ndcg@10"] == pytest.approx(best.value)
    saved = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    assert saved == config

    # Same storage and study name: a resume with a larger budget adds only what is missing.
    assert main([*args, "--trials", "4", "--no-mlflow"]) == 0
    assert [t.number for t in study.get_trials(deepcopy=False, states=COUNTED)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sweep_never_reads_the_test_split(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "examples" / "test.parquet").write_bytes(b"not a parquet file")
    storage = f"journal:{tmp_path / 'study.log'}"
    args = tune_args(data, "blind", storage, tmp_path / "out", "--epochs", "1", "--no-mlflow")
    assert main([*args, "--trials", "2"]) == 0
    study = journal_study(tmp_path / "study.log", "blind")
    assert sum(t.state in COUNTED for t in study.get_trials(deepcopy=False)) == 2
    capsys.readouterr()
    # Only the retrain of the best config reads the test split (and finds it corrupt).
    assert main([*args, "--trials", "2", "--retrain"]) == 2
    err = capsys.readouterr().err
    assert "test.parquet" in err and err.startswith("tlsan tune: error:")


@pytest.mark.slow
def test_two_worker_processes_finish_exactly_n_trials(tiny_data: Path, tmp_path: Path) -> None:
    """`--jobs 2` (two worker processes) plus one process started on its own, one journal."""
    journal = tmp_path / "study.log"
    common = tune_args(tiny_data, "shared", f"journal:{journal}", tmp_path / "out",
                       "--trials", "6", "--epochs", "2", "--no-mlflow")  # fmt: skip
    procs = [
        subprocess.Popen(tune_cmd(*common, "--jobs", "2"), stderr=subprocess.PIPE, text=True),
        subprocess.Popen(
            tune_cmd(*common, "--worker-index", "2"), stderr=subprocess.PIPE, text=True
        ),
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    trials = journal_study(journal, "shared").get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in COUNTED]
    assert len(counted) == 6
    assert len({t.number for t in trials}) == len(trials)  # distinct trial numbers
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    surplus = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get(SURPLUS_ATTR) for t in surplus)  # only lost races failed
    workers = {t.user_attrs["worker"] for t in counted}
    logs = list((tmp_path / "out" / "workers").glob("worker_*.log"))
    assert len(logs) == 2  # the --jobs 2 workers wrote their logs
    assert len(workers) >= 2, workers  # the trials were shared, not run by one process


@pytest.mark.slow
def test_killed_worker_loses_no_completed_trial_and_the_study_resumes(
    tiny_data: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "study.log"
    space = write_space(  # no early stopping: every trial trains its 20 epochs
        tmp_path / "space.yaml",
        "params:\n  lr: {distribution: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
        "fixed:\n  patience: 0\n",
    )
    cmd = tune_cmd(*tune_args(tiny_data, "killed", f"journal:{journal}", tmp_path / "out",
                              "--trials", "2", "--epochs", "20", "--space", str(space),
                              "--no-mlflow", "--heartbeat", "1"))  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        watcher = Watcher(journal, "killed")

        def mid_trial() -> bool:
            trials = watcher.trials()
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING and 1 <= len(t.intermediate_values) <= 15
            ]  # mid-training: epochs of its 20 are still ahead when it is killed
            return bool(done and running)

        wait_for(mid_trial, "a completed trial and another one mid-training")
    finally:
        proc.kill()
        proc.wait()
    study = journal_study(journal, "killed")
    before = {t.number: t for t in study.get_trials(deepcopy=False)}
    completed = {n: t.value for n, t in before.items() if t.state == TrialState.COMPLETE}
    killed = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert completed and len(killed) == 1

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = {t.number: t for t in journal_study(journal, "killed").get_trials(deepcopy=False)}
    for number, value in completed.items():
        assert after[number].state == TrialState.COMPLETE and after[number].value == value
    assert after[killed[0]].state == TrialState.FAIL
    retry = [t for t in after.values() if t.user_attrs.get(RETRY_ATTR) == killed[0]]
    assert len(retry) == 1 and retry[0].state in COUNTED
    assert retry[0].params == before[killed[0]].params
    assert sum(t.state in COUNTED for t in after.values()) == 2


@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_trial(tiny_data: Path, tmp_path: Path) -> None:
    journal = tmp_path / "study.log"
    cmd = tune_cmd(*tune_args(tiny_data, "stopped", f"journal:{journal}", tmp_path / "out",
                              "--trials", "4", "--epochs", "4", "--no-mlflow"))  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    watcher = Watcher(journal, "stopped")

    def running() -> bool:
        return any(
            t.state == TrialState.RUNNING and t.intermediate_values for t in watcher.trials()
        )

    wait_for(running, "a trial mid-training")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "stopping after the running trial" in err
    assert "Resume with: tlsan tune" in err and "--study stopped" in err
    trials = journal_study(journal, "stopped").get_trials(deepcopy=False)
    assert trials and all(t.state in COUNTED for t in trials)  # it finished, nothing failed
    assert len(trials) < 4
    assert os.path.exists(tmp_path / "out" / "best_config.yaml")


# -- the early-stopping-aware median pruner -----------------------------------------------------
def completed_trial(curve: list[float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=max(curve),
        intermediate_values={epoch: v for epoch, v in enumerate(curve, start=1)},
        distributions={},
        params={},
    )


def running_trial_prunes(study: optuna.Study, curve: list[float]) -> list[bool]:
    trial = study.ask()
    decisions = []
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)
        decisions.append(trial.should_prune())
    study.tell(trial, state=TrialState.FAIL)
    return decisions


def test_median_pruner_counts_early_stopped_trials_with_their_best() -> None:
    """Completed trials stopped at epoch 4 (converged at 0.10); a slow trial at 0.05 by
    epoch 8 is pruned although no completed trial reported anything at epoch 8. Optuna's
    MedianPruner (values at the same epoch only) keeps it running."""
    fast = [[0.04, 0.08, 0.10, 0.09], [0.05, 0.09, 0.10, 0.10], [0.03, 0.07, 0.09, 0.08]]
    slow = [0.02, 0.02, 0.03, 0.03, 0.04, 0.04, 0.05, 0.05]

    def study_with(pruner: optuna.pruners.BasePruner) -> optuna.Study:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for curve in fast:
            study.add_trial(completed_trial(curve))
        return study

    ours = running_trial_prunes(study_with(BestSoFarMedianPruner(3, 5)), slow)
    assert ours == [False] * 4 + [True] * 4  # warm-up first, then the carried-forward median
    optunas = running_trial_prunes(study_with(optuna.pruners.MedianPruner(3, 5)), slow)
    assert optunas[5:] == [False] * 3  # nothing to compare with after epoch 4


def test_median_pruner_keeps_a_trial_above_the_median_and_waits_for_startup() -> None:
    study = optuna.create_study(direction="maximize", pruner=BestSoFarMedianPruner(3, 1))
    for curve in ([0.05, 0.06], [0.07, 0.08]):
        study.add_trial(completed_trial(curve))
    assert running_trial_prunes(study, [0.01, 0.01]) == [False, False]  # 2 of 3 start-up
    study.add_trial(completed_trial([0.06, 0.07]))  # bests by epoch 2: 0.06, 0.07, 0.08
    assert running_trial_prunes(study, [0.01, 0.075]) == [True, False]  # best so far counts
    minimize = optuna.create_study(direction="minimize", pruner=BestSoFarMedianPruner(1, 1))
    minimize.add_trial(completed_trial([0.5, 0.4]))
    assert running_trial_prunes(minimize, [0.45, 0.3]) == [False, False]
    assert running_trial_prunes(minimize, [0.6, 0.6]) == [True, True]


def test_median_pruner_waits_a_tenth_of_the_epoch_budget() -> None:
    pruner = make_pruner("median", 40)
    assert isinstance(pruner, BestSoFarMedianPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(5):
        study.add_trial(completed_trial([0.1] * 6))
    assert running_trial_prunes(study, [0.01] * 6) == [False] * 3 + [True] * 3  # warm-up 4
    assert warmup_epochs(None) == 4 and warmup_epochs(10) == 3 and warmup_epochs(100) == 10


def test_percentile_pruner_stops_only_the_bottom_quarter() -> None:
    """Bests of five completed trials by epoch 2: 0.04, 0.06, 0.07, 0.08, 0.10 (25th
    percentile 0.06, median 0.07). A trial at 0.065 survives the default percentile pruner but
    not the median one; a trial at 0.05 is pruned by both."""
    bests = [0.04, 0.06, 0.07, 0.08, 0.10]

    def study_with(pruner: optuna.pruners.BasePruner) -> optuna.Study:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for best in bests:
            study.add_trial(completed_trial([best / 2, best]))
        return study

    quarter = make_pruner("percentile", 10)  # warm-up 3 epochs
    assert isinstance(quarter, BestSoFarPercentilePruner)
    middling = [0.03, 0.05, 0.065, 0.065]
    poor = [0.03, 0.04, 0.05, 0.05]
    assert running_trial_prunes(study_with(quarter), middling) == [False] * 4
    assert running_trial_prunes(study_with(quarter), poor) == [False, False, True, True]
    median = make_pruner("median", 10)
    assert running_trial_prunes(study_with(median), middling) == [False, False, True, True]
    minimize = optuna.create_study(
        direction="minimize", pruner=BestSoFarPercentilePruner(25.0, 1, 1)
    )
    for worst in (0.4, 0.5, 0.6, 0.7):  # minimising: the top quarter (above 0.625) is pruned
        minimize.add_trial(optuna.trial.create_trial(value=worst, intermediate_values={1: worst}))
    assert running_trial_prunes(minimize, [0.6]) == [False]
    assert running_trial_prunes(minimize, [0.65]) == [True]


def test_percentile_pruner_rejects_a_percentile_outside_0_100() -> None:
    with pytest.raises(ValueError, match="percentile"):
        BestSoFarPercentilePruner(0.0)
    with pytest.raises(ValueError, match="percentile"):
        BestSoFarPercentilePruner(101.0)


def test_cli_pruner_choices_match_the_pruners_the_study_builds() -> None:
    """The CLI lists the pruners literally (no Optuna import at start-up): keep it in step."""
    import argparse

    from tlsan.commands.tune import register
    from tlsan.tuning.settings import TuneSettings
    from tlsan.tuning.study import PRUNERS

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    tune = next(a for a in parser._subparsers._group_actions[0].choices.values())
    pruner = next(a for a in tune._actions if "--pruner" in a.option_strings)
    assert list(pruner.choices) == list(PRUNERS)
    assert pruner.default == "percentile" == TuneSettings.__dataclass_fields__["pruner"].default


# -- shared tracking across machines: a real MLflow server ------------------------------------
@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` as a process on a free port of 127.0.0.1: SQLite backend store and
    proxied artifacts, both in tmp_path; stopped (with its workers) at the end."""
    import urllib.request

    from tlsan.processes import free_port, stop_tree

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_exe), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (store / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (store / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        stop_tree(proc.pid)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_two_tune_workers_share_one_study_and_one_mlflow_server(
    tiny_data: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """Two `tlsan tune` processes started together, as on two machines: one Optuna RDB
    storage, one `mlflow server`. The study counts exactly N trials from both workers, and
    MLflow holds one parent run for the study with each trial's run nested under it (its
    artifacts stored through the server)."""
    from mlflow import MlflowClient

    from tlsan.tuning.study import MLFLOW_PARENT_ATTR

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    procs = [
        subprocess.Popen(
            tune_cmd(
                *tune_args(
                    tiny_data,
                    "shared",
                    storage,
                    tmp_path / f"machine{i}",
                    "--trials",
                    "8",
                    "--epochs",
                    "2",
                    "--worker-index",
                    str(i),
                )
            ),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in COUNTED]
    assert len(counted) == 8
    assert all(t.user_attrs.get(SURPLUS_ATTR) for t in trials if t.state == TrialState.FAIL)
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in counted}
    assert pids == {str(p.pid) for p in procs}  # both workers ran trials of the one study

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tlsan")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "tuning"]
    assert len(parents) == 1, [r.info.run_id for r in parents]  # one parent, not one each
    parent = parents[0]
    assert study.user_attrs[MLFLOW_PARENT_ATTR] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == sorted(t.number for t in counted)
    for trial in counted:
        run = children[trial.number]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.data.params["lr"] == str(trial.params["lr"])
    # artifacts travel through the server into its artifact store
    some = children[counted[0].number].info.run_id
    assert {a.path for a in client.list_artifacts(some, "run")} >= {"run/metrics.json"}
    stored = tmp_path / "server" / "artifacts"
    assert any(p.name == "metrics.json" for p in stored.rglob("*"))
    assert "study/best_config.yaml" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "study")
    }
