"""The paper's published protocol (`--protocol reference`), for reproducing its figure only.

The reference code (TsingZ0/TLSAN `train.py`) trains on every transition, including the one
whose (positive, fixed negative) pair is the test pair, evaluates the test AUC every 1,000
steps and reports the best: a figure chosen on test, on a test set that was trained on
(DESIGN.md, "Validation and leakage"). `fit_reference` does the same with our model on a
dataset written by `tlsan prepare --protocol reference`, so that our `paper` preset can be
compared with the reference code under identical rules. Everything it writes says `leaky`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tlsan.config import TrainConfig
from tlsan.data import Dataset
from tlsan.errors import RunError
from tlsan.evaluate import evaluate_model
from tlsan.run_dir import (
    CONFIG_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    run_config_dict,
    write_json,
    write_tensors,
)
from tlsan.tracking import Tracker, TrackingOptions


@dataclass
class ReferenceResult:
    """The best-on-test model of a reference-protocol run and what metrics.json holds."""

    model: nn.Module
    metrics: dict[str, Any]
    wall_s: float
    mlflow_run_id: str | None
    model_version: str | None


EVAL_EVERY_STEPS = 1000  # the reference's eval_freq
LEAKY_NOTE = (
    "LEAKY: the paper's published protocol (test pairs are trained on, single-item test "
    "sessions contain their target, the best test evaluation is reported); reproduction only"
)


def check_protocol(config: TrainConfig, dataset: Dataset) -> None:
    """A reference dataset trains only under the reference protocol, and vice versa."""
    leaky = bool(dataset.manifest.get("leaky"))
    if leaky and config.protocol != "reference":
        raise RunError(
            f"{dataset.path}: prepared with --protocol reference (leaky: test pairs are trained "
            "on); train it with --protocol reference, or prepare the data without it"
        )
    if config.protocol == "reference" and not leaky:
        raise RunError(
            f"--protocol reference needs a dataset written by `tlsan prepare --protocol "
            f"reference`; {dataset.path} was prepared with the leak-free protocol"
        )


def fit_reference(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: Path,
    *,
    tracking: TrackingOptions,
    progress: bool = True,
    eval_every: int = EVAL_EVERY_STEPS,
) -> ReferenceResult:
    """Train `config` for `config.epochs` epochs over all training pairs, evaluate the test
    split every `eval_every` steps and at the end, keep the weights of the best test
    paper_auc, and write the run dir (metrics.json says `leaky`)."""
    from tlsan.train import make_optimizer, new_model, set_threads, train_epoch

    began = time.perf_counter()
    set_threads(config.threads)
    model = new_model(config, dataset)
    optimizer = make_optimizer(model, config)
    if optimizer is None:
        raise RunError(f"--protocol reference trains a model; {config.model.kind} has no weights")
    generator = torch.Generator().manual_seed(config.seed)
    tracker = Tracker(tracking)
    tags = {
        "dataset_hash": dataset.dataset_hash,
        "model_kind": config.model.kind,
        "protocol": "reference",
        "leaky": "true",
    }
    tracker.start({**config.flat(), "leaky": True}, tags, resume_run_id=None)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"paper_auc": -math.inf}
    best_weights: dict[str, torch.Tensor] | None = None
    step = 0
    epoch = 0

    def evaluate_test() -> dict[str, float]:
        nonlocal best, best_weights
        metrics = evaluate_model(model, dataset.test, batch_size=config.eval_batch_size).metrics
        model.train()
        history.append({"step": step, "epoch": epoch, **metrics})
        tracker.log_epoch(step, metrics)
        if metrics["paper_auc"] > best["paper_auc"]:
            best = {"step": step, **metrics}
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return metrics

    def on_step() -> None:
        nonlocal step
        step += 1
        if step % eval_every == 0:
            evaluate_test()

    try:
        for epoch in range(1, config.epochs + 1):
            train_epoch(
                model, optimizer, dataset.train, config, generator, progress=progress,
                desc=f"epoch {epoch}/{config.epochs}", on_step=on_step,
            )  # fmt: skip
            if progress and history:
                last = history[-1]
                shown = f"test paper_auc {last['paper_auc']:.4f} at step {last['step']}"
                tqdm.write(f"epoch {epoch}: {shown} (LEAKY protocol)")
        final = evaluate_test() if not history or history[-1]["step"] != step else history[-1]
        assert best_weights is not None
        model.load_state_dict(best_weights)
        metrics = {
            "protocol": "reference",
            "leaky": True,
            "note": LEAKY_NOTE,
            "valid": None,
            "test": {k: v for k, v in best.items() if k != "step"},
            "best_step": int(best["step"]),
            "test_final": {k: v for k, v in final.items() if k not in ("step", "epoch")},
            "steps": step,
        }
        extra = {"best_step": int(best["step"]), "steps": step, "leaky": True}
        write_tensors(run_dir / MODEL_FILE, model.state_dict())
        write_json(run_dir / CONFIG_FILE, run_config_dict(config, dataset, model, extra))
        write_json(run_dir / METRICS_FILE, metrics)
        write_json(
            run_dir / HISTORY_FILE,
            {
                "protocol": "reference",
                "leaky": True,
                "wall_seconds": time.perf_counter() - began,
                "evaluations": history,
            },
        )
        _plot_steps(history, run_dir / CURVES_FILE)
        files = [MODEL_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, CURVES_FILE]
        tracker.finish({}, {f"best_{k}": v for k, v in metrics["test"].items()}, run_dir, files)
    except BaseException as exc:
        tracker.end("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    wall = time.perf_counter() - began
    return ReferenceResult(model, metrics, wall, tracker.run_id, tracker.model_version)


def _plot_steps(history: list[dict[str, Any]], path: Path) -> None:
    """Test paper_auc against training steps (the reference's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["paper_auc"] for h in history], marker="o")
    ax.set(title="test paper_auc (LEAKY reference protocol)", xlabel="step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
