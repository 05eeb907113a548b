"""The serving bundle: everything `/recommend` needs, in one directory, written atomically.

    BUNDLE/
      manifest.json             format, model version, model kind, the run's recipe and
                                validation metrics (test too, when the run has them: reported,
                                never used), dataset hash, created at, feature settings,
                                counts, index description, popularity, file checksums
      model/config.json         the run's fully resolved config
      model/model.safetensors   the run's weights
      model/metrics.json        the run's valid/test metrics
      item_vectors.safetensors  `item_vectors`: [x_i ; b_i] per item index (row 0 = padding)
      index.faiss               FAISS index over rows 1..n (FAISS native format)
      vocab/{users,items,categories}.parquet   raw ids <-> indices, item categories
      popularity.parquet        recent popularity per item (cold start; overall and per category):
                                every event of the prepared dataset (train, valid and test
                                periods: all known at export), decayed with the half-life of
                                `cold_start_half_life` (tlsan/popularity.py, the one
                                implementation `pop` uses too)

No pickle anywhere: safetensors, JSON, Parquet and FAISS's own format. Every file's SHA-256
is in the manifest, so a truncated or edited file is caught at load time rather than giving
wrong answers. A bundle loads from a path, an MLflow model URI (`models:/tlsan@champion`)
or the BentoML model store (`bentoml:tlsan:latest`).

The FAISS index is built by `serving.index_builder` (imports only run downward), passed in
as `index_builder` or, by default, run as a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tlsan.errors import BundleError

BUNDLE_FORMAT = "tlsan-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
RUN_FILES = ("config.json", "model.safetensors", "metrics.json")
ITEM_VECTORS = "item_vectors.safetensors"
INDEX = "index.faiss"
POPULARITY = "popularity.parquet"
VOCAB_FILES = ("users.parquet", "items.parquet", "categories.parquet")
MLFLOW_PREFIX = "models:/"
BENTOML_PREFIX = "bentoml:"
DEFAULT_MODEL_NAME = "tlsan"
BUNDLE_EXPERIMENT = "tlsan-bundles"

# (item vectors file, index file, requested kind, flat threshold) -> the built index's description
IndexBuilder = Callable[[Path, Path, str, int], dict[str, Any]]
DEFAULT_FLAT_THRESHOLD = 200_000  # `auto`: exact below this many items, HNSW from it on


# ------------------------------------------------------------------ helpers
def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path}: {what} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: {what} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_item_vectors(path: Path) -> np.ndarray:
    """The `item_vectors` tensor of a safetensors file as float32 (n_items + 1, D + 1)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "item_vectors" not in tensors:
        raise BundleError(f"{path}: expected a tensor named 'item_vectors', got {list(tensors)}")
    vectors = tensors["item_vectors"]
    if vectors.ndim != 2 or vectors.shape[0] < 2 or vectors.dtype != np.float32:
        raise BundleError(
            f"{path}: item_vectors must be float32 (n_items + 1, D + 1), got "
            f"{vectors.dtype} {vectors.shape}"
        )
    return vectors


def popularity_table(
    events: pl.LazyFrame, items: pl.DataFrame, *, half_life_days: float
) -> tuple[pl.DataFrame, int]:
    """Recent popularity of every item (`tlsan.popularity.recency_popularity` over `events`;
    half-life in days, `inf` for none), as the bundle's ranking.

    Age is measured from the log's last event. Ranking order is score desc, then all-time
    count desc, then item index asc; items without events come last, so a ranking by
    popularity always covers the whole catalog. Per category is the same order filtered.
    """
    from tlsan.popularity import check_half_life, recency_popularity

    try:
        check_half_life(half_life_days, "half_life_days")
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    frame = events.select("item", "timestamp").collect()
    if frame.height == 0:
        raise BundleError("events.parquet: no events, cannot compute popularity")
    index = items.get_column("index").to_numpy().astype(np.int64)
    n_rows = int(max(index.max(initial=0), frame.get_column("item").max() or 0)) + 1
    popularity = recency_popularity(
        frame.get_column("item").to_numpy(),
        frame.get_column("timestamp").to_numpy(),
        n_rows,
        half_life_days,
    )
    table = (
        items.select(pl.col("index").cast(pl.Int32), pl.col("category").cast(pl.Int32))
        .with_columns(
            pl.Series("score", popularity.scores[index], pl.Float64),
            pl.Series("count", popularity.counts[index], pl.Int64),
        )
        .sort(["score", "count", "index"], descending=[True, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("rank"))
    )
    assert popularity.reference_time is not None
    return table, int(popularity.reference_time)


def cold_start_half_life(
    run_config: dict[str, Any], data_dir: Path, requested: float | None
) -> dict[str, Any]:
    """The half-life of the bundle's cold-start popularity, and why (the manifest's record).

    - `requested` (`--popularity-half-life-days`): as given;
    - a `pop` run: the half-life that run used (chosen on validation unless it was set);
    - any other run: chosen now on the dataset's validation split, the way a `pop` run chooses
      it (the run's select metric and history protocol; training events only), so exporting
      never reads test and every bundle's cold start is the `pop` that validates best.
    """
    from tlsan.popularity import CHOOSE, half_life_json

    config = run_config.get("config", {})
    model = config.get("model", {})
    if requested is not None:
        return {"half_life_days": half_life_json(requested), "chosen_by": "export option"}
    recorded = run_config.get("popularity")
    if model.get("kind") == "pop" and isinstance(recorded, dict):
        return {
            "half_life_days": recorded.get("half_life_days"),
            "chosen_by": "the pop run (validation)"
            if recorded.get("chosen_on_validation")
            else "the pop run's config",
        }
    if model.get("kind") == "pop" and float(model.get("pop_half_life_days", CHOOSE)) > 0:
        return {"half_life_days": half_life_json(float(model["pop_half_life_days"])),
                "chosen_by": "the pop run's config"}  # fmt: skip
    from tlsan.baselines import Pop, choose_half_life, training_events
    from tlsan.config import ModelConfig
    from tlsan.data import load_dataset

    dataset = load_dataset(data_dir, splits=("train", "valid"))
    select_metric = str(config.get("select_metric", "ndcg@10"))
    include_history = bool(config.get("include_history", False))
    pop = Pop(ModelConfig(kind="pop"), dataset.sizes, dataset.item_category)
    items, stamps = training_events(dataset)
    chosen, selection = choose_half_life(
        pop, dataset, items, stamps, select_metric, include_history
    )
    return {
        "half_life_days": half_life_json(chosen),
        "chosen_by": f"validation {select_metric} at export",
        "validation": selection,
    }


def run_summary(run_config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Which model a run is and how it scored: kind, recipe (preset, changed fields, loss),
    the validation metrics that chose its checkpoint (select metric, NDCG@10, HR@10), and its
    test metrics only when it has them (reported once after training, never used to choose).
    What the manifest records and `GET /model` shows."""
    config = run_config.get("config") if isinstance(run_config.get("config"), dict) else {}
    kind = run_config.get("model_kind") or config.get("model", {}).get("kind")
    select = str(run_config.get("select_metric") or config.get("select_metric") or "ndcg@10")
    recipe = run_config.get("recipe")
    if not isinstance(recipe, dict):
        recipe = {"preset": None, "changed": None, "loss": config.get("loss")}
    if kind == "pop":
        recipe = {**recipe, "loss": None}  # nothing is trained
    valid = metrics.get("valid") if isinstance(metrics.get("valid"), dict) else {}
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else None

    def pick(values: dict[str, Any]) -> dict[str, Any]:
        names = dict.fromkeys([select, "ndcg@10", "hr@10"])
        return {name: values[name] for name in names if name in values}

    summary: dict[str, Any] = {
        "model_kind": kind,
        "recipe": recipe,
        "include_history": bool(config.get("include_history", False)),
        "validation": {"select_metric": select, **pick(valid)},
    }
    if test:
        summary["test"] = {**pick(test), "note": "reported after training, never used to choose"}
    if metrics.get("leaky"):
        summary["leaky"] = True  # --protocol reference: its test figure was chosen on test
    return summary


def subprocess_index_builder(
    vectors: Path, index: Path, kind: str, flat_threshold: int
) -> dict[str, Any]:
    """Build the index with `python -m serving.index_builder` (tlsan never imports serving)."""
    cmd = [sys.executable, "-m", "serving.index_builder", str(vectors), str(index),
           "--kind", kind, "--flat-threshold", str(flat_threshold)]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    # stdout carries the result; stderr (progress bars, errors) goes straight to the user.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise BundleError(
            f"building the FAISS index ({kind}) failed with exit status {proc.returncode} "
            "(its error is printed above)"
        )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BundleError(f"the index builder printed no description: {proc.stdout!r}") from exc


# ------------------------------------------------------------------ the model
def _load_run_for(run_dir: Path, data_dir: Path, data_manifest: dict[str, Any]) -> tuple[Any, Any]:
    """The run's model, checked against the dataset it is exported with."""
    from tlsan.errors import RunError
    from tlsan.run_dir import MODEL_FILE, model_from_weights, read_run_info, read_tensors

    info = read_run_info(run_dir)
    sizes = data_manifest.get("vocab_sizes")
    if info.dataset_hash != data_manifest.get("dataset_hash") or info.sizes.to_dict() != sizes:
        raise RunError(
            f"{run_dir}: trained on dataset {info.dataset_hash} (vocab sizes "
            f"{info.sizes.to_dict()}), but --data {data_dir} is dataset "
            f"{data_manifest.get('dataset_hash')} (vocab sizes {sizes})"
        )
    weights = read_tensors(run_dir / MODEL_FILE, "model weights")
    return info, model_from_weights(info, weights, run_dir / MODEL_FILE)


def _item_vectors(model: Any) -> np.ndarray:
    """`[x_i ; b_i]` for every item index (row 0 = padding) as float32."""
    import torch

    with torch.inference_mode():
        return np.ascontiguousarray(model.item_vectors().numpy(), dtype=np.float32)


# ------------------------------------------------------------------ writing
def _export_graph(
    model: Any, folder: Path, wanted: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """The manifest's `onnx` entry; writes the graph into `folder` when it is wanted and the
    model can have one (a failed export is an error: pass onnx=False / --no-onnx instead)."""
    from tlsan.errors import GraphError
    from tlsan.onnx_graph import INPUT_NAMES, ONNX_FILE, export_user_vectors, exportable

    if not wanted:
        return {"file": None, "reason": "exported without the ONNX graph (--no-onnx)"}
    reason = exportable(model)
    if reason is not None:
        return {"file": None, "reason": reason}
    say("exporting the user-vector graph (ONNX)")
    try:
        export_user_vectors(model, folder / ONNX_FILE)
    except GraphError as exc:
        raise BundleError(f"{exc}; export with --no-onnx to serve on PyTorch only") from exc
    return {"file": f"{MODEL_DIR}/{ONNX_FILE}", "inputs": list(INPUT_NAMES)}


@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out` that replaces it only when the block succeeds."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: already exists and is not empty (pass --overwrite to replace)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "bundle")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _readable(root: Path) -> None:
    """Temp files are created private (0600/0700); a bundle is read by other users too."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_bundle(
    run_dir: Path,
    data_dir: Path,
    out: Path,
    *,
    index_kind: str = "auto",
    index_builder: IndexBuilder | None = None,
    flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
    model_version: str | None = None,
    half_life_days: float | None = None,
    overwrite: bool = False,
    onnx: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a trained run (`run_dir`, trained on the prepared dataset `data_dir`) to `out`.

    With `onnx`, a TLSAN model's user vectors are also exported as an ONNX graph, which the
    service runs for small batches (`tlsan.onnx_graph`). `half_life_days` sets the cold-start
    popularity's half-life (inf: no decay); None chooses it (`cold_start_half_life`)."""
    from safetensors.numpy import save_file

    say = progress or (lambda _msg: None)
    run_dir, data_dir, out = Path(run_dir), Path(data_dir), Path(out)
    data_manifest = _read_json(data_dir / "manifest.json", "the prepared dataset's manifest")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise BundleError(f"{run_dir / name}: missing; expected a run dir from `tlsan train`")
    say("loading the run")
    info, model = _load_run_for(run_dir, data_dir, data_manifest)
    kind = info.config.model.kind
    with _atomic_dir(out, overwrite) as tmp:
        (tmp / MODEL_DIR).mkdir()
        for name in RUN_FILES:
            shutil.copy2(run_dir / name, tmp / MODEL_DIR / name)
        (tmp / "vocab").mkdir()
        for name in VOCAB_FILES:
            source = data_dir / "vocab" / name
            if not source.is_file():
                raise BundleError(f"{source}: missing; expected a prepared dataset dir")
            shutil.copy2(source, tmp / "vocab" / name)
        say("computing item vectors")
        vectors = _item_vectors(model)
        items = pl.read_parquet(data_dir / "vocab" / "items.parquet")
        if vectors.shape[0] != items.height + 1:
            raise BundleError(
                f"{run_dir}: the model has {vectors.shape[0] - 1} items, the dataset's vocabulary "
                f"{items.height}; was it trained on {data_dir}?"
            )
        save_file({"item_vectors": vectors}, str(tmp / ITEM_VECTORS))
        graph_info = _export_graph(model, tmp / MODEL_DIR, onnx, say)
        say(f"building the FAISS index ({index_kind})")
        builder = index_builder or subprocess_index_builder
        index_info = builder(tmp / ITEM_VECTORS, tmp / INDEX, index_kind, flat_threshold)
        say("computing popularity")
        from tlsan.popularity import half_life_from_json

        popularity_info = cold_start_half_life(info.meta, data_dir, half_life_days)
        popularity, reference = popularity_table(
            pl.scan_parquet(data_dir / "events.parquet"),
            items,
            half_life_days=half_life_from_json(popularity_info["half_life_days"]),
        )
        popularity.write_parquet(tmp / POPULARITY)
        files = {
            str(path.relative_to(tmp)): {"sha256": sha256(path), "bytes": path.stat().st_size}
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        weights_hash = files[f"{MODEL_DIR}/model.safetensors"]["sha256"]
        metrics = _read_json(run_dir / "metrics.json", "the run's metrics")
        features = data_manifest.get("config", {})
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_version": model_version or f"{kind}-{weights_hash[:12]}",
            "model": kind,
            "run": run_summary(info.meta, metrics),
            "dataset_hash": data_manifest.get("dataset_hash"),
            "metrics": metrics,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": {"run_dir": str(run_dir.resolve()), "data_dir": str(data_dir.resolve())},
            "features": {
                "session": features.get("session", "day"),
                "max_long": int(features.get("max_long", 50)),
                "max_short": int(features.get("max_short", 0)),
            },
            "counts": {
                "users": data_manifest.get("vocab_sizes", {}).get("users"),
                "items": items.height,
                "categories": pl.read_parquet(data_dir / "vocab" / "categories.parquet").height,
            },
            "item_vectors": {"rows": int(vectors.shape[0]), "dim": int(vectors.shape[1])},
            "index": index_info,
            "onnx": graph_info,
            "popularity": {
                **popularity_info,
                "reference_time": reference,
                "events": "all events of the prepared dataset (known at export)",
            },
            "files": files,
        }
        _write_json(tmp / MANIFEST, manifest)
    say(f"bundle written to {out}")
    return out


# ------------------------------------------------------------------ reading
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, checked for format and completeness."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory; expected a bundle from `tlsan export`")
    if not (path / MANIFEST).is_file():
        hint = (
            " (this is a run dir: export it with `tlsan export --run ...`)"
            if (path / "model.safetensors").is_file()
            else ""
        )
        raise BundleError(f"{path}: no {MANIFEST}; expected a bundle from `tlsan export`{hint}")
    manifest = _read_json(path / MANIFEST, "the bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}"
        )
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r}, this tlsan reads version "
            f"{BUNDLE_FORMAT_VERSION}; re-export the run with this version's `tlsan export`"
        )
    required = ("model_version", "model", "features", "item_vectors", "index", "files")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise BundleError(f"{path / MANIFEST}: missing keys {missing}")
    expected = (
        {f"{MODEL_DIR}/{name}" for name in RUN_FILES}
        | {ITEM_VECTORS, INDEX, POPULARITY}
        | {f"vocab/{name}" for name in VOCAB_FILES}
    )
    absent = sorted(name for name in expected if not (path / name).is_file())
    if absent:
        raise BundleError(f"{path}: incomplete bundle, missing {', '.join(absent)}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise BundleError(f"{path / MANIFEST}: 'files' must map file names to their checksums")
    unlisted = sorted(expected - set(files))
    if unlisted:
        raise BundleError(f"{path / MANIFEST}: no checksum for {', '.join(unlisted)}")
    for name in files:
        _check_member(path, name)
    return manifest


def _check_member(root: Path, name: object) -> None:
    """A manifest entry must name a file inside the bundle: relative, no `..`, no symlink
    leading out (a manifest is data; it must not make the server read other files)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"{root / MANIFEST}: file entry {name!r} is not a relative path")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or parts[0] == "~":
        raise BundleError(
            f"{root / MANIFEST}: file entry {name!r} points outside the bundle; "
            "expected a path relative to the bundle directory"
        )
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file entry {name!r} resolves outside the bundle")


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file's size and SHA-256 against the manifest: catches truncation and edits."""
    for name, expected in sorted(manifest["files"].items()):
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: incomplete bundle, missing {name}")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise BundleError(
                f"{file}: {size} bytes, the manifest says {expected.get('bytes')}: the bundle "
                "is corrupt (truncated or replaced); re-export it"
            )
        if sha256(file) != expected.get("sha256"):
            raise BundleError(
                f"{file}: checksum differs from the manifest: the bundle is corrupt; re-export it"
            )


@dataclass
class Bundle:
    """A verified bundle directory; parts load lazily (the model needs torch)."""

    path: Path
    manifest: dict[str, Any]
    source: str

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def index_path(self) -> Path:
        return self.path / INDEX

    @cached_property
    def config(self) -> dict[str, Any]:
        return _read_json(self.path / MODEL_DIR / "config.json", "the model config")

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return _read_json(self.path / MODEL_DIR / "metrics.json", "the model metrics")

    @cached_property
    def item_vectors(self) -> np.ndarray:
        vectors = read_item_vectors(self.path / ITEM_VECTORS)
        expected = self.manifest["item_vectors"]
        if [vectors.shape[0], vectors.shape[1]] != [expected.get("rows"), expected.get("dim")]:
            raise BundleError(
                f"{self.path / ITEM_VECTORS}: shape {vectors.shape}, the manifest says "
                f"({expected.get('rows')}, {expected.get('dim')})"
            )
        return vectors

    def _parquet(self, name: str, columns: dict[str, type[pl.DataType]]) -> pl.DataFrame:
        file = self.path / name
        try:
            frame = pl.read_parquet(file)
        except Exception as exc:  # polars raises several types for unreadable files
            raise BundleError(f"{file}: not a readable Parquet file ({exc})") from exc
        for column, dtype in columns.items():
            if column not in frame.columns:
                raise BundleError(f"{file}: missing column {column!r}")
            if not isinstance(frame.schema[column], dtype):
                raise BundleError(
                    f"{file}: column {column!r} is {frame.schema[column]}, expected {dtype.__name__}"
                )
        return frame

    @cached_property
    def users(self) -> pl.DataFrame:
        return self._parquet("vocab/users.parquet", {"index": pl.Int32, "user_id": pl.String})

    @cached_property
    def items(self) -> pl.DataFrame:
        return self._parquet(
            "vocab/items.parquet",
            {"index": pl.Int32, "item_id": pl.String, "category": pl.Int32},
        ).sort("index")

    @cached_property
    def categories(self) -> pl.DataFrame:
        return self._parquet(
            "vocab/categories.parquet", {"index": pl.Int32, "category": pl.String}
        ).sort("index")

    @cached_property
    def popularity(self) -> pl.DataFrame:
        return self._parquet(
            POPULARITY,
            {"index": pl.Int32, "category": pl.Int32, "score": pl.Float64, "rank": pl.Int32},
        ).sort("rank")

    def load_model(self) -> Any:
        """The trained model (torch, eval mode), checked against the bundle's item vectors.

        Weights that do not fit the config, or item vectors computed from other weights, mean
        the parts come from different model versions: `BundleError`.
        """
        from tlsan.errors import RunError
        from tlsan.run_dir import MODEL_FILE, model_from_weights, read_run_info, read_tensors

        folder = self.path / MODEL_DIR
        try:
            info = read_run_info(folder)
            model = model_from_weights(
                info, read_tensors(folder / MODEL_FILE, "model weights"), folder / MODEL_FILE
            )
        except RunError as exc:
            raise BundleError(
                f"{self.path}: the bundled model does not load with this tlsan version ({exc})"
            ) from exc
        vectors = _item_vectors(model)
        stored = self.item_vectors
        if vectors.shape != stored.shape or not np.allclose(vectors, stored, rtol=1e-5, atol=1e-6):
            raise BundleError(
                f"{self.path}: {ITEM_VECTORS} does not match the bundled weights (shape "
                f"{stored.shape} vs {vectors.shape}): parts of two model versions; re-export"
            )
        return model


def open_bundle(path: Path, *, verify: bool = True, source: str | None = None) -> Bundle:
    """A bundle directory, checked for completeness and (with `verify`) checksums."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path=path, manifest=manifest, source=source or str(path))


def load_bundle(source: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """A bundle from a path, `models:/NAME@ALIAS` / `models:/NAME/VERSION` (MLflow) or
    `bentoml:NAME[:TAG]` (the BentoML model store)."""
    text = os.fspath(source)
    if text.startswith(MLFLOW_PREFIX):
        cached = _from_mlflow(text)
        try:
            return open_bundle(cached, verify=verify, source=text)
        except BundleError:  # a damaged cached download: fetch it once more
            shutil.rmtree(cached, ignore_errors=True)
            return open_bundle(_from_mlflow(text), verify=verify, source=text)
    return open_bundle(local_bundle_path(text), verify=verify, source=text)


def local_bundle_path(source: str | os.PathLike[str]) -> Path:
    """The local directory behind a bundle source (an MLflow version is downloaded to its
    cache, a BentoML tag resolved in the model store); raises `BundleError` when the source
    does not exist, so a server can refuse it before it starts its workers."""
    text = os.fspath(source)
    if text.startswith(MLFLOW_PREFIX):
        return _from_mlflow(text)
    if text.startswith(BENTOML_PREFIX):
        return _from_bentoml(text[len(BENTOML_PREFIX) :])
    return Path(text)


# ------------------------------------------------------------ MLflow, BentoML
def _mlflow_client() -> Any:
    """A client on the tracking store training uses (MLFLOW_TRACKING_URI or mlruns/mlflow.db)."""
    import mlflow
    from mlflow import MlflowClient

    from tlsan.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def _from_mlflow(uri: str) -> Path:
    """Download the bundle artifacts of a registered model version (cached per version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _mlflow_client()
    spec = uri[len(MLFLOW_PREFIX) :]
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in spec:
            name, number = spec.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise BundleError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as exc:
        raise BundleError(f"{uri}: no such registered model version ({exc.message})") from exc
    # keyed by the registry too: two tracking stores can both hold a `tlsan` version 1
    registry = hashlib.sha256(client.tracking_uri.encode()).hexdigest()[:12]
    cache = (
        Path(tempfile.gettempdir())
        / "tlsan-bundles"
        / f"{version.name}-v{version.version}-{registry}-{version.run_id or 'norun'}"
    )
    if (cache / MANIFEST).is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(staging)
            )
        )
    except MlflowException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"{uri}: cannot download the bundle ({exc.message})") from exc
    if not (local / MANIFEST).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(
            f"{uri}: version {version.version} of {version.name!r} holds no bundle "
            f"({MANIFEST} missing); register one with `tlsan export --register`"
        )
    with contextlib.suppress(OSError):  # another process cached it first
        local.rename(cache)
    shutil.rmtree(staging, ignore_errors=True)
    return cache


def register_mlflow(
    bundle: Path, *, name: str = DEFAULT_MODEL_NAME, alias: str | None = "champion"
) -> str:
    """Log the bundle dir as run artifacts, register them as a model version, set `alias`.

    The registered source is the plain bundle directory (no MLmodel flavour, no pickle).
    Returns the new version number.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlsan.tracking import artifact_location, tracking_uri

    manifest = read_manifest(bundle)
    client = _mlflow_client()
    experiment = client.get_experiment_by_name(BUNDLE_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            BUNDLE_EXPERIMENT, artifact_location=artifact_location(tracking_uri())
        )
    )
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"export {manifest['model_version']}"
    ) as run:
        mlflow.set_tags(
            {
                "model_version": manifest["model_version"],
                "dataset_hash": str(manifest.get("dataset_hash")),
                "kind": "bundle",
            }
        )
        mlflow.log_artifacts(str(bundle), artifact_path="bundle")
        run_id = run.info.run_id
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/bundle",
        run_id=run_id,
        tags={"model_version": manifest["model_version"], "kind": "bundle"},
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _from_bentoml(tag: str) -> Path:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag if ":" in tag else f"{tag}:latest")
    except NotFound as exc:
        raise BundleError(f"bentoml:{tag}: not in the BentoML model store ({exc})") from exc
    except ValueError as exc:
        raise BundleError(f"bentoml:{tag}: not a valid model tag ({exc})") from exc
    return Path(model.path)


def save_to_bentoml(bundle: Path, *, name: str = DEFAULT_MODEL_NAME) -> str:
    """Copy the bundle into the BentoML model store (`bentoml.models.create`); returns the tag."""
    import bentoml

    manifest = read_manifest(bundle)
    with bentoml.models.create(
        name,
        labels={"model_version": manifest["model_version"], "kind": "tlsan-bundle"},
        metadata={
            "model_version": manifest["model_version"],
            "dataset_hash": str(manifest.get("dataset_hash")),
        },
    ) as model:
        shutil.copytree(bundle, model.path, dirs_exist_ok=True)
    return str(model.tag)
