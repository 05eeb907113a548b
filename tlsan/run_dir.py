"""The run directory: what `tlsan train` writes and everything downstream reads.

    RUN_DIR/model.safetensors   weights of the chosen checkpoint (incl. the item-category buffer)
    RUN_DIR/config.json         {"format_version", "config": TrainConfig.to_dict(), "model_kind",
                                 "vocab_sizes", "dataset_hash", "data_dir", "vector_dim", ...}
    RUN_DIR/metrics.json        {"valid": {...}, "test": {...}}
    RUN_DIR/history.json        per-epoch numbers
    RUN_DIR/curves.png          loss and validation metric per epoch
    RUN_DIR/checkpoint/         resume state: last.safetensors (model, optimizer, RNG),
                                best.safetensors, state.json

Every file is written to a temporary name and renamed into place. Nothing here uses pickle:
tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tlsan.config import TrainConfig
from tlsan.data import Dataset, VocabSizes
from tlsan.errors import ConfigError, RunError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoint"
RUN_FILES: tuple[str, ...] = (MODEL_FILE, CONFIG_FILE, METRICS_FILE)


# -- atomic writes -----------------------------------------------------------------------------
def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_json(path: Path, data: Any) -> Path:
    """JSON via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """safetensors via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RunError(f"{path}: missing {what}; expected a run dir written by `tlsan train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunError(f"{path}: {what} is not valid JSON ({exc})") from exc


def read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise RunError(f"{path}: missing {what}; expected a run dir written by `tlsan train`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: corrupt {what}, not a readable safetensors file ({exc})") from exc


# -- run config --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """The resolved config of a run and the dataset it was trained on."""

    config: TrainConfig
    sizes: VocabSizes
    dataset_hash: str
    meta: dict[str, Any]


def run_config_dict(
    config: TrainConfig, dataset: Dataset, model: nn.Module, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What config.json holds: the training config plus the dataset it is bound to."""
    return {
        "format_version": FORMAT_VERSION,
        "model_kind": config.model.kind,
        "config": config.to_dict(),
        "vocab_sizes": dataset.sizes.to_dict(),
        "dataset_hash": dataset.dataset_hash,
        "data_dir": str(Path(dataset.path).resolve()),
        "vector_dim": int(getattr(model, "vector_dim", 0)),
        "torch_version": torch.__version__,
        **(extra or {}),
    }


def read_run_info(run_dir: Path) -> RunInfo:
    """Parse and check RUN_DIR/config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: not a directory; expected a run dir written by `tlsan train`")
    data = read_json(path, "run config")
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise RunError(
            f"{path}: expected a run config with format_version {FORMAT_VERSION}, got "
            f"{data.get('format_version') if isinstance(data, dict) else type(data).__name__!r}"
        )
    for key in ("config", "vocab_sizes", "dataset_hash"):
        if key not in data:
            raise RunError(f"{path}: missing field {key!r}")
    try:
        config = TrainConfig.from_dict(data["config"])
    except ConfigError as exc:
        raise RunError(f"{path}: {exc}") from exc
    try:
        sizes = VocabSizes.from_dict(data["vocab_sizes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: vocab_sizes: expected users, items, categories ({exc})") from exc
    return RunInfo(config, sizes, str(data["dataset_hash"]), data)


def check_same_dataset(info: RunInfo, dataset: Dataset, run_dir: Path) -> None:
    """The run must have been trained on `dataset` (same manifest hash and vocabularies)."""
    if info.dataset_hash != dataset.dataset_hash or info.sizes != dataset.sizes:
        raise RunError(
            f"{run_dir}: trained on dataset {info.dataset_hash} "
            f"(vocab sizes {info.sizes.to_dict()}), but --data {dataset.path} is dataset "
            f"{dataset.dataset_hash} (vocab sizes {dataset.sizes.to_dict()})"
        )


# -- loading a trained model -------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A run dir read back: its config, the model (eval mode) and config.json's content."""

    info: RunInfo
    model: nn.Module

    @property
    def config(self) -> TrainConfig:
        return self.info.config


def model_from_weights(info: RunInfo, weights: dict[str, Tensor], source: Path) -> nn.Module:
    """Build the model of `info` and load `weights` into it, with clear errors on mismatch."""
    from tlsan.models import build_model

    if "item_category" not in weights:
        raise RunError(f"{source}: no 'item_category' tensor; not a tlsan model file")
    model = build_model(info.config.model, info.sizes, weights["item_category"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RunError(
            f"{source}: tensors do not match a {info.config.model.kind} model "
            f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise RunError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)
    return model.eval()


def load_run(run_dir: Path, data: Dataset | None = None) -> LoadedRun:
    """Read RUN_DIR into a model; with `data`, also check it was trained on that dataset."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if data is not None:
        check_same_dataset(info, data, run_dir)
    weights = read_tensors(run_dir / MODEL_FILE, "model weights")
    return LoadedRun(info, model_from_weights(info, weights, run_dir / MODEL_FILE))


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / METRICS_FILE, "metrics")


# -- resume state ------------------------------------------------------------------------------
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in rest["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    state: dict[str, Any],
    best_weights: dict[str, Tensor] | None,
) -> None:
    """Everything needed to continue after the last finished epoch."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    rest: dict[str, Any] = {}
    if optimizer is not None:
        optim_tensors, rest = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = generator.get_state()
    if best_weights is not None:
        write_tensors(folder / "best.safetensors", best_weights)
    write_tensors(folder / "last.safetensors", tensors)
    write_json(folder / "state.json", {**state, "optimizer": rest})


def load_checkpoint(
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Restore model, optimizer and RNG in place; returns (state.json, best weights)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    state = read_json(folder / "state.json", "resume state")
    tensors = read_tensors(folder / "last.safetensors", "resume checkpoint")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
        if optimizer is not None and state.get("optimizer"):
            optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
            optimizer.load_state_dict(_unflatten_optimizer(optim, state["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{folder}: checkpoint does not fit this config's model ({exc})") from exc
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.batches"])
    best_path = folder / "best.safetensors"
    best = read_tensors(best_path, "best checkpoint") if best_path.is_file() else None
    return state, best


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / "state.json").is_file()
