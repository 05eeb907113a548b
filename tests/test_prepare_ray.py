"""`tlsan prepare --engine ray`: the same dataset as the Polars engine, on a real local Ray.

A local Ray (`ray.init(num_cpus=2)`) started by this module is the engine; one test also
reaches it by address from another process, as a cluster would be. The Polars engine is the
reference: events and vocabularies identical, examples the same rows (compared after
sorting), manifests the same apart from the `engine` entry.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

import pipelines.prepare
from tests.fixtures_data import AMAZON_NAMES
from tlsan.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A local Ray with 2 CPUs for this module; yields its address (GCS host:port)."""
    import ray

    if ray.is_initialized():  # left over by an earlier module: not ours to keep
        ray.shutdown()
    with warnings.catch_warnings():  # Ray's tip about GPU env vars; no GPU here
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def synthetic_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic log from `tlsan generate` (CSV, unsorted rows like a real log)."""
    out = tmp_path_factory.mktemp("ray-synth") / "log"
    args = ["generate", "--users", "2000", "--items", "1500", "--events", "60000"]
    assert main([*args, "--format", "csv", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    return out


def _prepare(interactions: Path, items: Path, out: Path, *flags: str) -> dict:
    args = ["prepare", "--interactions", str(interactions), "--items", str(items)]
    assert main([*args, "--out", str(out), "--quiet", *flags]) == 0
    return json.loads((out / "manifest.json").read_text())


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, maintain_order=True)


def assert_same_dataset(ours: Path, reference: Path) -> None:
    """Identical events and vocabularies, the same example rows, the same manifest (but the
    engine)."""
    for name in ("events", "vocab/users", "vocab/items", "vocab/categories"):
        left = pl.read_parquet(ours / f"{name}.parquet")
        right = pl.read_parquet(reference / f"{name}.parquet")
        assert left.equals(right), name
    for split in SPLITS:
        left = pl.read_parquet(ours / f"examples/{split}.parquet")
        right = pl.read_parquet(reference / f"examples/{split}.parquet")
        assert left.schema == right.schema, split
        assert left.height == right.height > 0, split
        assert _sorted(left).equals(_sorted(right)), split
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (ours, reference)]
    engines = [m.pop("engine") for m in manifests]
    assert manifests[0] == manifests[1]
    assert [e["name"] for e in engines] == ["ray", "polars"]


@pytest.mark.parametrize("name", AMAZON_NAMES)
def test_ray_engine_matches_polars_on_amazon(
    local_ray: str, prepared_amazon: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    from tests.fixtures_data import amazon_paths

    interactions, items = amazon_paths(name)
    manifest = _prepare(
        interactions, items, tmp_path / "ray", "--preset", "paper", "--engine", "ray"
    )
    assert manifest["engine"]["name"] == "ray"
    assert manifest["engine"]["partitions"] == 4  # twice the 2 CPUs of the local Ray
    assert_same_dataset(tmp_path / "ray", prepared_amazon(name))


@pytest.mark.parametrize("split", ["paper", "leave-one-out"])
def test_ray_engine_matches_polars_on_a_synthetic_log(
    local_ray: str,
    synthetic_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    split: str,
) -> None:
    """Small blocks, so both engines stream many blocks (windows on Ray) into the files."""
    monkeypatch.setattr(pipelines.prepare, "CHUNK_EVENTS", 7_000)
    flags = ["--preset", "paper"] if split == "paper" else ["--split", split, "--session", "gap:1h"]
    log, items = synthetic_log / "interactions.csv", synthetic_log / "items.csv"
    polars = _prepare(log, items, tmp_path / "polars", *flags)
    ray = _prepare(log, items, tmp_path / "ray", *flags, "--engine", "ray", "--ray-partitions", "3")
    assert polars["engine"]["blocks"] > 5
    assert ray["engine"]["windows"] > 5 and ray["engine"]["partitions"] == 3
    assert_same_dataset(tmp_path / "ray", tmp_path / "polars")


def test_streamed_blocks_write_the_same_files_as_one_block(
    synthetic_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Polars engine's files do not depend on the block size: row for row, in order."""
    log, items = synthetic_log / "interactions.csv", synthetic_log / "items.csv"
    flags = ["--split", "leave-one-out", "--session", "gap:1h"]
    one = _prepare(log, items, tmp_path / "one", *flags)
    monkeypatch.setattr(pipelines.prepare, "CHUNK_EVENTS", 5_000)
    many = _prepare(log, items, tmp_path / "many", *flags)
    assert one["engine"]["blocks"] == 1 and many["engine"]["blocks"] > 10
    for name in ("events", *(f"examples/{s}" for s in SPLITS)):
        left = pl.read_parquet(tmp_path / "one" / f"{name}.parquet")
        assert left.equals(pl.read_parquet(tmp_path / "many" / f"{name}.parquet")), name
    assert {**one, "engine": None} == {**many, "engine": None}


def test_ray_address_of_a_running_cluster(
    local_ray: str, synthetic_log: Path, tmp_path: Path
) -> None:
    """Another process reaches the module's Ray by its address, as a cluster would be
    reached, and ships this `pipelines` package to it."""
    log, items = synthetic_log / "interactions.csv", synthetic_log / "items.csv"
    flags = ["--preset", "paper"]
    _prepare(log, items, tmp_path / "polars", *flags)
    command = [sys.executable, "-m", "tlsan.cli", "prepare", "--interactions", str(log)]
    command += ["--items", str(items), "--out", str(tmp_path / "ray"), "--quiet", *flags]
    command += ["--engine", "ray", "--ray-address", local_ray]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["engine"]["address"] == local_ray
    assert_same_dataset(tmp_path / "ray", tmp_path / "polars")


def test_the_polars_engine_never_imports_ray(synthetic_log: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from tlsan.cli import main; "
        f"status = main(['prepare', '--interactions', {str(synthetic_log / 'interactions.csv')!r}, "
        f"'--items', {str(synthetic_log / 'items.csv')!r}, '--out', {str(tmp_path / 'o')!r}, "
        "'--preset', 'paper', '--quiet']); "
        "assert status == 0; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port that accepts connections and never says anything (not Ray)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def _fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str]) -> str:
    log = tmp_path / "log.csv"
    pl.DataFrame(
        {"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [1, 2, 3], "category": "c"}
    ).write_csv(log)
    out = tmp_path / "out"
    status = main(["prepare", "--interactions", str(log), "--out", str(out), "--quiet", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("tlsan prepare: error: "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp dir left"
    return lines[0]


def test_unknown_engine(capsys, tmp_path: Path) -> None:
    line = _fails(capsys, tmp_path, ["--engine", "spark"])
    assert "argument --engine: invalid choice: 'spark'" in line and "'ray'" in line


@pytest.mark.timeout(60)  # the probe answers in seconds; without it ray.init retries minutes
def test_a_ray_address_where_nothing_listens(capsys, tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    line = _fails(capsys, tmp_path, ["--engine", "ray", "--ray-address", address])
    assert f"--ray-address {address}: no Ray cluster answers there" in line
    assert "refused" in line.lower()


@pytest.mark.timeout(60)
def test_a_ray_address_that_answers_but_is_not_ray(
    capsys, tmp_path: Path, silent_listener: str
) -> None:
    line = _fails(capsys, tmp_path, ["--engine", "ray", "--ray-address", silent_listener])
    assert f"--ray-address {silent_listener}: no answer in 3 s" in line


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--engine", "ray", "--ray-address", "head-node"], "expected HOST:PORT"),
        (["--ray-address", "127.0.0.1:6379"], "only apply to --engine ray"),
        (["--engine", "ray", "--ray-partitions", "-1"], "--ray-partitions: expected an integer"),
    ],
)
def test_bad_ray_options(capsys, tmp_path: Path, flags: list[str], needle: str) -> None:
    assert needle in _fails(capsys, tmp_path, flags)
