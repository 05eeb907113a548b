"""Data-parallel training: two gloo processes under torchrun (real subprocesses) against one.

The torchrun runs use `--log-dir/--redirects`, so every rank's stderr is a file of its own
and torchrun's summary lists every rank's exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.tiny_data import synthetic_dataset
from tlsan import distributed
from tlsan.cli import main
from tlsan.config import TrainConfig, preset
from tlsan.data import Dataset, load_dataset
from tlsan.errors import ConfigError
from tlsan.train import fit, new_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENTRY = ROOT / "tests" / "torchrun_entry.py"
SMALL = ["--d-item", "16", "--d-cat", "16", "--heads", "4", "--batch-size", "128"]
SMALL += ["--negatives", "8", "--eval-batch-size", "512", "--quiet"]
COMPARED = ("ndcg@10", "hr@10", "mrr", "auc")  # validation metrics held to 2%
TIMEOUT_S = 600


@dataclass
class Launch:
    """One torchrun job: its exit status, its own output and every rank's stderr."""

    returncode: int
    output: str
    rank_stderr: dict[int, str]

    def rank_exit_codes(self) -> dict[int, int]:
        """Exit status per rank from torchrun's failure summary (empty when all exited 0)."""
        pattern = r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
        return {int(r): int(c) for r, c in re.findall(pattern, self.output)}


def torchrun(args: list[str], logs: Path, *, entry: bool = False, **env: str) -> Launch:
    """`torchrun --standalone --nproc-per-node 2` of `tlsan ARGS` (or of torchrun_entry.py)."""
    target = [str(ENTRY)] if entry else ["-m", "tlsan"]
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2"]
    command += ["--log-dir", str(logs), "--redirects", "3", *target, *args]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=logs.parent,
        env={**os.environ, **env},
        check=False,
    )
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    return Launch(done.returncode, done.stdout + done.stderr, stderr)


def one_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same `tlsan` command without torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "tlsan", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=cwd,
        env=env,
        check=False,
    )


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def assert_ran_cleanly(launch: Launch) -> None:
    assert launch.returncode == 0, launch.output[-3000:]
    assert sorted(launch.rank_stderr) == [0, 1]
    for rank, text in launch.rank_stderr.items():
        assert "Traceback" not in text, (rank, text[-2000:])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`large`: compared with one process (600 users); `small`: another vocabulary (300)."""
    root = tmp_path_factory.mktemp("ddp_data")
    return {
        "large": synthetic_dataset(root / "large", users=600, items=120, events=18000),
        "small": synthetic_dataset(root / "small"),
    }


@pytest.fixture(scope="module")
def small_dataset(data: dict[str, Path]) -> Dataset:
    return load_dataset(data["small"])


@pytest.fixture(scope="module")
def tlsan_runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLSAN, 3 epochs, seed 0, global batch 128: one process (no torchrun) and two (gloo,
    MLflow on); plus two processes for 2 epochs, then resumed to 3."""
    root = tmp_path_factory.mktemp("ddp_tlsan")
    common = ["train", "--data", str(data["large"]), *SMALL, "--seed", "0"]
    single = one_process([*common, "--epochs", "3", "--no-mlflow", "--out", "one"], root)
    assert single.returncode == 0, single.stderr[-3000:]
    mlflow_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    two = torchrun(
        [*common, "--epochs", "3", "--out", "two", "--experiment", "ddp", "--register-as", ""],
        root / "logs-two",
        entry=True,
        TLSAN_TEST_WEIGHTS_DIR=str(root / "weights"),
        **mlflow_env,
    )
    assert_ran_cleanly(two)
    first = torchrun([*common, "--epochs", "2", "--no-mlflow", "--out", "resumed"], root / "l1")
    assert_ran_cleanly(first)
    resumed = torchrun(
        [*common, "--epochs", "3", "--no-mlflow", "--out", "resumed", "--resume"], root / "l2"
    )
    assert_ran_cleanly(resumed)
    return {"root": root, "one": root / "one", "two": root / "two", "resumed": root / "resumed"}


# -- sharding, in process -----------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(128, 2), (7, 2), (1, 2), (10, 3), (5, 4)])
def test_each_rank_takes_an_equal_share_of_every_global_batch(n: int, world: int) -> None:
    chunk = torch.arange(100, 100 + n)
    shares = [distributed.shard_rows(chunk, rank, world) for rank in range(world)]
    assert len({s.numel() for s in shares}) == 1 and shares[0].numel() == -(-n // world)
    together = torch.cat(shares)
    assert set(together.tolist()) == set(chunk.tolist())  # every row, padding repeats a few
    assert together.numel() - n < world


def test_sharded_epoch_holds_the_one_process_batches(small_dataset: Dataset) -> None:
    train = small_dataset.train
    one = list(train.batches(64, negatives=3, generator=torch.Generator().manual_seed(9)))
    ranks = [
        list(
            distributed.ShardedSplit(train, rank, 2, distributed.negative_seed(9, 1, rank)).batches(
                64, negatives=3, generator=torch.Generator().manual_seed(9)
            )
        )
        for rank in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, whole in enumerate(one):
        parts = [ranks[0][step], ranks[1][step]]
        assert len(parts[0]) == len(parts[1]) == -(-len(whole) // 2)
        keys = sorted(
            torch.cat([p.user * 100_000 + p.target for p in parts]).unique().tolist()
        )  # the same examples, by (user, target)
        assert keys == sorted((whole.user * 100_000 + whole.target).unique().tolist())
        for part in parts:  # each rank's own negatives, outside the example's history
            assert part.negatives is not None and part.negatives.shape == (len(part), 3)
            assert not bool((part.negatives == part.target.unsqueeze(1)).any())
    assert not torch.equal(ranks[0][0].negatives, ranks[1][0].negatives)


def test_global_batch_must_split_evenly_and_fingerprints_name_the_difference(
    small_dataset: Dataset,
) -> None:
    config = preset("default").override(batch_size=100)
    distributed.check_global_batch(config, 1)
    distributed.check_global_batch(config, 4)
    with pytest.raises(ConfigError, match=r"--batch-size 100: expected a multiple of the 3"):
        distributed.check_global_batch(config, 3)
    small = preset("default").override(d_item=16, d_cat=16, heads=4)
    state = {"epoch": 0, "best_epoch": -1}
    gen = torch.Generator().manual_seed(0)

    def fingerprint(config: TrainConfig, seed: int = 0) -> list[list[str]]:
        model = new_model(config, small_dataset, seed=seed)
        return distributed.start_fingerprint(config, small_dataset, model, gen, state)

    same = fingerprint(small)
    assert distributed.first_difference([same, fingerprint(small)]) is None
    assert "config field 'lr'" in str(
        distributed.first_difference([same, fingerprint(small.override(lr=0.5))])
    )
    assert "has different values on rank 0 and rank 1" in str(
        distributed.first_difference([same, fingerprint(small, seed=1)])
    )


def test_without_torchrun_nothing_distributed_starts(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session("cpu") as ctx:
        assert not ctx.distributed and ctx.is_main and not dist.is_initialized()
    # a GPU this process cannot have: no CUDA here, or no GPU 99 on a machine with CUDA
    monkeypatch.setenv("LOCAL_RANK", "99")
    status = main(
        ["train", "--data", str(data["small"]), "--out", str(tmp_path / "r")]
        + ["--device", "cuda", "--no-mlflow"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--device cuda" in err[0], err
    assert not (tmp_path / "r").exists()


# -- torchrun: two gloo processes --------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tlsan_runs: dict[str, Path]) -> None:
    one, two = read(tlsan_runs["one"], "metrics.json"), read(tlsan_runs["two"], "metrics.json")
    for name in COMPARED:
        assert abs(two["valid"][name] - one["valid"][name]) <= 0.02 * one["valid"][name], name
    assert two["test"] is not None and set(two["test"]) == set(one["test"])
    history = read(tlsan_runs["two"], "history.json")
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    # rank 0 alone wrote the run dir: the files of a one-process run, nothing per rank
    assert sorted(p.name for p in tlsan_runs["two"].iterdir()) == sorted(
        p.name for p in tlsan_runs["one"].iterdir()
    )
    assert read(tlsan_runs["two"], "config.json")["config"]["batch_size"] == 128
    # every rank ends with the chosen checkpoint, bit for bit the one rank 0 wrote
    from safetensors.torch import load_file

    written = {
        name: hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
        for name, value in load_file(tlsan_runs["two"] / "model.safetensors").items()
    }
    for rank in (0, 1):
        assert read(tlsan_runs["root"] / "weights", f"rank{rank}.json") == written, rank
    # and one MLflow run, from rank 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tlsan_runs['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["valid/ndcg_at_10"] == pytest.approx(two["valid"]["ndcg@10"])
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "ndcg_at_10")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_resume_under_torchrun_continues_exactly(tlsan_runs: dict[str, Path]) -> None:
    straight, resumed = tlsan_runs["two"], tlsan_runs["resumed"]
    assert read(resumed, "metrics.json") == read(straight, "metrics.json")
    losses = [
        [e["loss"] for e in read(run, "history.json")["epochs"]] for run in (straight, resumed)
    ]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_baselines_and_early_stopping_end_every_rank(
    data: dict[str, Path], small_dataset: Dataset, tmp_path: Path
) -> None:
    # SGD at lr 1e-30 leaves the weights as they are: validation cannot improve after epoch 1,
    # so patience 1 stops before epoch 3, in one process and in two
    stalled = ["train", "--data", str(data["small"]), *SMALL, "--model", "sasrec"]
    stalled += ["--optimizer", "sgd", "--lr", "1e-30", "--patience", "1", "--epochs", "5"]
    stalled += ["--no-mlflow"]
    single = one_process([*stalled, "--out", "one"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = torchrun([*stalled, "--out", "two"], tmp_path / "logs-sasrec")
    assert_ran_cleanly(launch)
    for run in ("one", "two"):
        config = read(tmp_path / run, "config.json")
        assert (config["best_epoch"], config["epochs_trained"]) == (1, 2), run
    one, two = (read(tmp_path / run, "metrics.json")["valid"] for run in ("one", "two"))
    for name in COMPARED:
        assert abs(two[name] - one[name]) <= 0.02 * one[name], name
    # pop: nothing to train; evaluated once on rank 0, exactly as in one process
    pop = torchrun(
        ["train", "--data", str(data["small"]), "--model", "pop", "--quiet", "--no-mlflow"]
        + ["--out", "pop"],
        tmp_path / "logs-pop",
    )
    assert_ran_cleanly(pop)
    alone = fit(preset("default", "pop"), small_dataset, tmp_path / "pop-1", mlflow=False)
    assert read(tmp_path / "pop", "metrics.json") == {"valid": alone.valid, "test": alone.test}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", r"nowhere: not a directory"),
        ("vocab", r"do not start from the same state: dataset is hash"),
        (
            "weights",
            r"do not start from the same state: parameter '.*' \(shape .*\) "
            r"has different values on rank 0 and rank 1",
        ),
    ],
)
def test_ranks_that_disagree_stop_together_with_one_line(
    case: str, expected: str, data: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "missing": {"TLSAN_TEST_RANK1_DATA": str(tmp_path / "nowhere")},
        "vocab": {"TLSAN_TEST_RANK1_DATA": str(data["small"])},
        "weights": {"TLSAN_TEST_RANK1_NUDGE": "1"},
    }[case]
    args = ["train", "--data", str(data["large"]), *SMALL, "--epochs", "1", "--no-mlflow"]
    launch = torchrun([*args, "--out", "run"], tmp_path / "logs", entry=True, **env)
    assert launch.returncode != 0
    assert launch.rank_exit_codes() == {0: 2, 1: 2}, launch.output[-3000:]
    for rank, text in launch.rank_stderr.items():
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tlsan train: error: "), (rank, text)
        assert re.search(expected, lines[0]), (rank, lines[0])
        if case == "missing" and rank == 0:  # the rank that did not fail says which one did
            assert lines[0].startswith("tlsan train: error: rank 1 of 2 failed: "), lines[0]
    assert not (tmp_path / "run").exists()
