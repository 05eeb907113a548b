"""The serving bundle: `tlsan export`, loading from a path, MLflow and the BentoML store, and
clear `BundleError`s for incomplete, corrupt and other-version bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest
import torch
import yaml

from tlsan.bundle import (
    BUNDLE_FORMAT_VERSION,
    load_bundle,
    popularity_table,
    read_manifest,
    sha256,
    write_bundle,
)
from tlsan.cli import main
from tlsan.config import preset
from tlsan.errors import BundleError
from tlsan.run_dir import load_run
from tlsan.train import fit

ROOT = Path(__file__).resolve().parents[1]
# Magic numbers of the formats a bundle may hold; pickle (0x80 protocol byte) is not one.
PARQUET, FAISS_FLAT, FAISS_HNSW = b"PAR1", b"IxFI", b"IHNf"


@pytest.fixture(scope="module")
def trained(
    prepared_amazon: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(run dir, data dir): a small TLSAN trained for 2 epochs on Digital_Music."""
    data = prepared_amazon("Digital_Music")
    run = tmp_path_factory.mktemp("bundle-run") / "run"
    config = preset("default").override(epochs=2, patience=0)
    fit(config, data, run, mlflow=False, progress=False)
    return run, data


@pytest.fixture(scope="module")
def bundle(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, data = trained
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert (
        main(["export", "--run", str(run), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    )
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_export_writes_every_part_and_a_manifest_that_describes_them(
    bundle: Path, trained: tuple[Path, Path]
) -> None:
    run, data = trained
    manifest = read_manifest(bundle)
    data_manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert manifest["dataset_hash"] == data_manifest["dataset_hash"]
    assert manifest["metrics"] == json.loads((run / "metrics.json").read_text())
    assert manifest["model"] == "tlsan"
    # which model, its recipe and how it scored on validation (test: reported, never used)
    metrics = json.loads((run / "metrics.json").read_text())
    summary = manifest["run"]
    assert summary["model_kind"] == "tlsan" and summary["recipe"]["loss"] == "ce"
    assert summary["validation"] == {
        "select_metric": "ndcg@10",
        "ndcg@10": metrics["valid"]["ndcg@10"],
        "hr@10": metrics["valid"]["hr@10"],
    }
    assert summary["test"]["ndcg@10"] == metrics["test"]["ndcg@10"]
    weights_hash = sha256(run / "model.safetensors")
    assert manifest["model_version"] == f"tlsan-{weights_hash[:12]}"
    assert manifest["created_at"].endswith("+00:00")
    assert manifest["features"] == {"session": "day", "max_long": 50, "max_short": 0}
    assert manifest["index"]["kind"] == "flat"  # 1,583 items: below the HNSW threshold
    assert manifest["onnx"]["file"] == "model/model.onnx"  # TLSAN's user vectors for serving
    n_items = data_manifest["vocab_sizes"]["items"] - 1
    assert manifest["counts"]["items"] == n_items
    for name, entry in manifest["files"].items():
        assert sha256(bundle / name) == entry["sha256"], name

    loaded = load_bundle(bundle)
    model = load_run(run).model
    with torch.inference_mode():
        expected = model.item_vectors().numpy()
    np.testing.assert_array_equal(loaded.item_vectors, expected)
    model_config = json.loads((run / "config.json").read_text())["config"]["model"]
    width = model_config["d_item"] + model_config["d_cat"] + 1  # [x_i ; b_i]
    assert loaded.item_vectors.shape == (n_items + 1, width)
    # Raw ids with their categories, as the dataset's vocabularies hold them.
    assert loaded.items.equals(pl.read_parquet(data / "vocab/items.parquet").sort("index"))
    # Popularity ranks the whole catalog once, best first.
    pop = loaded.popularity
    assert sorted(pop["index"].to_list()) == list(range(1, n_items + 1))
    assert pop["rank"].to_list() == list(range(1, n_items + 1))
    assert (np.diff(pop["score"].to_numpy()) <= 0).all()
    # Nothing pickled: every file is JSON, Parquet, safetensors or a FAISS index.
    for path in bundle.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:8]
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".parquet":
                assert head[:4] == PARQUET, path
            elif path.suffix == ".faiss":
                assert head[:4] in (FAISS_FLAT, FAISS_HNSW), path
            elif path.suffix == ".onnx":  # a protobuf ONNX model, loadable without torch
                onnx.checker.check_model(onnx.load(str(path)))
            else:
                assert path.suffix == ".safetensors", path
                header = int.from_bytes(head, "little")
                json.loads(path.read_bytes()[8 : 8 + header])


def test_export_builds_the_requested_index_kind(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    out = tmp_path / "hnsw"
    args = ["export", "--run", str(run), "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*args, "--index", "hnsw", "--version", "v-test"]) == 0
    manifest = read_manifest(out)
    assert manifest["index"]["kind"] == "hnsw" and manifest["model_version"] == "v-test"
    assert (out / "index.faiss").read_bytes()[:4] == FAISS_HNSW
    # An existing bundle is only replaced on request.
    assert main([*args, "--index", "flat"]) == 2
    assert read_manifest(out)["index"]["kind"] == "hnsw"
    assert main([*args, "--index", "flat", "--overwrite", "--no-onnx"]) == 0
    manifest = read_manifest(out)
    assert manifest["index"]["kind"] == "flat"
    # Without the ONNX graph the bundle serves on PyTorch alone.
    assert manifest["onnx"]["file"] is None and "--no-onnx" in manifest["onnx"]["reason"]
    assert not (out / "model/model.onnx").exists()
    from serving.model_step import ModelStep

    runtime = ModelStep(load_bundle(out)).runtime
    assert runtime["onnx"] is False and runtime["engine"] == "pytorch"
    # `auto` switches to HNSW at the configured catalog size.
    assert main([*args, "--overwrite", "--flat-threshold", "1000", "--no-onnx"]) == 0
    assert read_manifest(out)["index"]["kind"] == "hnsw"


def test_a_failed_export_leaves_nothing_behind(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained

    def broken_builder(vectors: Path, index: Path, kind: str, threshold: int) -> dict[str, object]:
        index.write_bytes(b"half an index")
        raise BundleError("index build failed on purpose")

    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="on purpose"):
        write_bundle(run, data, out, index_builder=broken_builder)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_run_from_another_dataset(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = trained
    other = tmp_path / "other"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["dataset_hash"] = "0000000000000000"
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "bundle"
    args = ["export", "--run", str(run), "--data", str(other), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on dataset" in err[0] and "0000000000000000" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "index.faiss").unlink(), "incomplete bundle, missing index.faiss"),
        (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
        (lambda b: (b / "manifest.json").write_text("{not json"), "not valid JSON"),
        (
            lambda b: (b / "model/model.safetensors").write_bytes(
                (b / "model/model.safetensors").read_bytes()[:-100]
            ),
            "model.safetensors: .* bytes, the manifest says",
        ),
        (
            lambda b: (b / "vocab/items.parquet").write_bytes(
                bytes([(b / "vocab/items.parquet").read_bytes()[0] ^ 1])
                + (b / "vocab/items.parquet").read_bytes()[1:]
            ),
            "items.parquet: checksum differs",
        ),
    ],
    ids=["missing-index", "missing-manifest", "bad-manifest", "truncated-weights", "edited-vocab"],
)
def test_incomplete_or_corrupt_bundles_are_refused_with_a_clear_error(
    bundle: Path,
    tmp_path: Path,
    damage: Callable[[Path], object],
    message: str,
) -> None:
    copy = _copy(bundle, tmp_path)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_bundles_of_another_format_or_model_version_are_refused(
    bundle: Path, trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, _ = trained
    # A bundle written by a future tlsan.
    newer = _copy(bundle, tmp_path / "a")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 2, this tlsan reads version 1"):
        load_bundle(newer)
    # Weights of another model version, checksums made consistent: caught at model load.
    mixed = _copy(bundle, tmp_path / "b")
    state = load_run(run).model.state_dict()
    state["E_i.weight"] = state["E_i.weight"] + 0.5
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(mixed / "model/model.safetensors"))
    manifest = json.loads((mixed / "manifest.json").read_text())
    path = mixed / "model/model.safetensors"
    manifest["files"]["model/model.safetensors"] = {
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
    }
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_bundle(mixed)
    with pytest.raises(BundleError, match="does not match the bundled weights"):
        loaded.load_model()
    # An ONNX graph exported from other weights, checksums consistent: caught when serving loads.
    graph_mix = _copy(bundle, tmp_path / "c")
    other = load_run(run).model
    with torch.no_grad():
        other.summary.weight.add_(0.1)
    from tlsan.onnx_graph import export_user_vectors

    graph = graph_mix / "model/model.onnx"
    export_user_vectors(other, graph)
    manifest = json.loads((graph_mix / "manifest.json").read_text())
    manifest["files"]["model/model.onnx"] = {"sha256": sha256(graph), "bytes": graph.stat().st_size}
    (graph_mix / "manifest.json").write_text(json.dumps(manifest))
    from serving.model_step import ModelStep

    with pytest.raises(BundleError, match="ONNX graph does not match the model's weights"):
        ModelStep(load_bundle(graph_mix))
    # A model of an architecture this version does not know.
    config = json.loads((mixed / "model/config.json").read_text())
    config["config"]["model"]["kind"] = "transformer-xl"
    (mixed / "model/config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not load with this tlsan version"):
        load_bundle(mixed, verify=False).load_model()
    # A run dir is not a bundle.
    with pytest.raises(BundleError, match="this is a run dir: export it"):
        load_bundle(run)


def test_popularity_is_decayed_by_age_and_ranks_unseen_items_last() -> None:
    day = 86_400
    events = pl.LazyFrame(
        {"item": [1, 1, 2, 3, 3, 3], "timestamp": [10 * day, 9 * day, 10 * day, 0, 0, 0]}
    )
    items = pl.DataFrame(
        {"index": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"], "category": [1, 1, 2, 2]},
        schema={"index": pl.Int32, "item_id": pl.String, "category": pl.Int32},
    )
    table, reference = popularity_table(events, items, half_life_days=1.0)
    assert reference == 10 * day
    scores = dict(zip(table["index"].to_list(), table["score"].to_list(), strict=True))
    assert scores[1] == pytest.approx(1.5)  # today + one day old (half weight)
    assert scores[2] == pytest.approx(1.0)
    assert scores[3] == pytest.approx(3 * 2.0**-10)
    assert scores[4] == 0.0
    assert table["index"].to_list() == [1, 2, 3, 4]
    # no decay: plain counts
    flat, _ = popularity_table(events, items, half_life_days=float("inf"))
    assert flat["index"].to_list() == [3, 1, 2, 4] and flat["score"].to_list() == [3, 2, 1, 0]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(BundleError, match="half_life_days"):
            popularity_table(events, items, half_life_days=bad)


def test_pop_and_the_cold_start_share_one_popularity_and_half_life(
    trained: tuple[Path, Path], bundle: Path, tmp_path: Path
) -> None:
    """`pop` scores the training events and the bundle's cold start all events, with the
    same function and the same half-life: the pop run's own choice on validation, and for
    another model the half-life pop validates best with (chosen at export, never on test)."""
    from tlsan.baselines import training_events
    from tlsan.data import load_dataset
    from tlsan.popularity import (
        HALF_LIFE_GRID,
        half_life_from_json,
        half_life_label,
        recency_popularity,
    )

    _, data = trained
    dataset = load_dataset(data)
    pop_run = tmp_path / "pop-run"
    assert main(["train", "--data", str(data), "--out", str(pop_run), "--model", "pop",
                 "--no-mlflow", "--quiet"]) == 0  # fmt: skip
    recorded = json.loads((pop_run / "config.json").read_text())["popularity"]
    assert recorded["chosen_on_validation"] and len(recorded["validation"]) == len(HALF_LIFE_GRID)
    half_life = half_life_from_json(recorded["half_life_days"])
    validation = recorded["validation"]  # the best candidate (the first of equals) is chosen
    assert half_life_label(half_life) == max(validation, key=validation.__getitem__)
    items, stamps = training_events(dataset)
    expected = recency_popularity(items, stamps, dataset.sizes.items, half_life).scores
    model = load_run(pop_run).model
    np.testing.assert_array_equal(model.b.detach().numpy(), expected.astype(np.float32))
    # the pop run's bundle: its half-life, over every event of the dataset
    out = tmp_path / "pop-bundle"
    assert main(["export", "--run", str(pop_run), "--data", str(data), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["popularity"]["half_life_days"] == recorded["half_life_days"]
    assert manifest["popularity"]["chosen_by"] == "the pop run (validation)"
    assert manifest["run"]["model_kind"] == "pop" and manifest["run"]["recipe"]["loss"] is None
    events = pl.read_parquet(data / "events.parquet")
    everything = recency_popularity(
        events["item"].to_numpy(), events["timestamp"].to_numpy(), dataset.sizes.items, half_life
    )
    served = load_bundle(out).popularity
    np.testing.assert_allclose(
        served["score"].to_numpy(), everything.scores[served["index"].to_numpy()], rtol=1e-12
    )
    # a TLSAN run's bundle chose the same half-life on validation at export
    tlsan_manifest = read_manifest(bundle)
    assert tlsan_manifest["popularity"]["half_life_days"] == recorded["half_life_days"]
    assert tlsan_manifest["popularity"]["chosen_by"] == "validation ndcg@10 at export"
    assert tlsan_manifest["popularity"]["validation"] == recorded["validation"]
    # an explicit half-life is used as given
    fixed = tmp_path / "fixed"
    assert main(["export", "--run", str(pop_run), "--data", str(data), "--out", str(fixed),
                 "--quiet", "--popularity-half-life-days", "30"]) == 0  # fmt: skip
    assert read_manifest(fixed)["popularity"]["half_life_days"] == 30.0


@pytest.mark.slow
def test_a_bundle_loads_from_mlflow_and_the_bentoml_store_and_builds_a_bento(
    bundle: Path, trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = trained
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp_path),
    }
    out = tmp_path / "registered"
    export = subprocess.run(
        [sys.executable, "-m", "tlsan", "export", "--run", str(run), "--data", str(data),
         "--out", str(out), "--register", "--bentoml", "--quiet"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    assert "models:/tlsan/1 (alias @champion)" in export.stdout
    version = read_manifest(out)["model_version"]
    probe = (
        "import sys; from tlsan.bundle import load_bundle\n"
        "for source in sys.argv[1:]:\n"
        "    b = load_bundle(source)\n"
        "    print(source, b.model_version, b.item_vectors.shape[0])\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, "models:/tlsan@champion", "models:/tlsan/1",
         "bentoml:tlsan", "bentoml:tlsan:latest"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    rows = [line.split() for line in loaded.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == [
        "models:/tlsan@champion", "models:/tlsan/1", "bentoml:tlsan", "bentoml:tlsan:latest",
    ]  # fmt: skip
    assert {r[1] for r in rows} == {version}
    assert {r[2] for r in rows} == {"1584"}
    # `bentoml build` packages the service with the bundle from the model store.
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    bento = yaml.safe_load(
        next((tmp_path / "bentoml/bentos/tlsan").glob("*/bento.yaml")).read_text()
    )
    assert bento["service"] == "serving.service:TlsanService"
    assert [m["tag"].split(":")[0] for m in bento["models"]] == ["tlsan"]
    missing = subprocess.run(
        [sys.executable, "-c", probe, "models:/tlsan@nope"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode != 0 and "BundleError" in missing.stderr
    assert "models:/tlsan@nope: no such registered model version" in missing.stderr
