"""Training: `fit` for users and tuners, and the pieces it is made of for federated training.

`fit` trains epoch by epoch, evaluates the validation split after each epoch, keeps the best
checkpoint by `select_metric`, stops early after `patience` epochs without improvement, and
evaluates the test split once, on the chosen checkpoint. The lower-level pieces:

    new_model(config, dataset)                   a freshly initialised (or fitted, for pop) model
    make_optimizer(model, config)                the configured optimizer (None for pop)
    train_epoch(model, opt, split, config, gen, rows=...)   one pass over (a subset of) a split
    evaluate_split(model, dataset, "valid")      full-ranking metrics of one split

Under torchrun, `fit(..., context=...)` trains data-parallel: tlsan/distributed.py holds the
process group, the sharding of each global batch, and rank 0's evaluation and writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tlsan import distributed
from tlsan.config import ModelConfig, TrainConfig
from tlsan.data import Dataset, Split, fold_sessions, load_dataset
from tlsan.errors import ConfigError, RunError
from tlsan.evaluate import EvalResult, evaluate_model
from tlsan.metrics import DEFAULT_KS
from tlsan.reference_protocol import check_protocol, fit_reference
from tlsan.run_dir import (
    CONFIG_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    has_checkpoint,
    load_checkpoint,
    run_config_dict,
    save_checkpoint,
    write_json,
    write_tensors,
)
from tlsan.sequences import training_batches
from tlsan.tracking import Tracker, TrackingOptions

EpochCallback = Callable[[int, dict[str, float]], None]
RESUMABLE_FIELDS = frozenset({"epochs", "patience", "threads", "eval_batch_size"})
PROGRESS_EVERY = 25  # steps between progress-bar refreshes (each one reads the loss)


@dataclass
class EpochStats:
    """One pass over the training rows."""

    loss: float  # mean training loss per example (incl. the L2 term)
    examples: int
    steps: int
    seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FitResult:
    """What `fit` produced; `model` holds the chosen checkpoint's weights."""

    run_dir: Path
    config: TrainConfig
    model: nn.Module
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, Any]]
    wall_s: float
    stopped_early: bool
    mlflow_run_id: str | None
    model_version: str | None
    leaky: bool = False  # a `--protocol reference` run: `test` was chosen on test


def set_threads(threads: int) -> None:
    """Intra-op threads (0 keeps torch's default). One thread is fastest for these small
    models on a shared 2-core machine: a second thread mostly waits on the first."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def new_model(
    config: TrainConfig | ModelConfig, dataset: Dataset, *, seed: int | None = None
) -> nn.Module:
    """A model for `dataset`: seeded initial weights; `pop` is fitted on the train split
    (its half-life chosen on the validation split when the config leaves it at 0)."""
    from tlsan.baselines import Pop
    from tlsan.models import build_model

    model_config = config.model if isinstance(config, TrainConfig) else config
    if seed is None and isinstance(config, TrainConfig):
        seed = config.seed
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(model_config, dataset.sizes, dataset.item_category)
    if isinstance(model, Pop):  # a half-life of 0 is chosen on validation, by the run's metric
        if isinstance(config, TrainConfig):
            model.fit(
                dataset, select_metric=config.select_metric, include_history=config.include_history
            )
        else:
            model.fit(dataset)
    return model


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
    """The configured optimizer over the trainable parameters (None when there are none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not getattr(model, "trainable", True):
        return None
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    config: TrainConfig,
    generator: torch.Generator,
    *,
    rows: Tensor | None = None,
    progress: bool = False,
    desc: str = "train",
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One shuffled pass over `rows` of `split` (all rows by default).

    Loss = `config.loss` (tlsan/scoring.py) over the batches of `training_batches` (each
    example's target, or every position of (Ti)SASRec's sequence windows), plus
    `config.l2 * sum(w**2) / 2` over the model's `l2_parameters()` (the paper's L2).
    `on_step()` runs after every optimizer step (the reference protocol's evaluations).
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    l2_params = model.l2_parameters() if config.l2 > 0 else []
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    steps, batches = training_batches(model, split, config, generator, rows)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress)
    seen = 0
    for step, batch in enumerate(batches, 1):
        if config.session_fold > 0:
            fold = torch.rand(len(batch), generator=generator) < config.session_fold
            batch = fold_sessions(batch, fold)
        loss = model.loss(batch, config.loss)
        if l2_params:
            loss = loss + (0.5 * config.l2) * sum(p.square().sum() for p in l2_params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.clip, foreach=True)
        optimizer.step()
        if on_step is not None:
            on_step()
        total = total + loss.detach() * len(batch)  # not +=: the loss may live on a GPU
        seen += len(batch)
        if progress and (step % PROGRESS_EVERY == 0 or step == steps):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(total) / seen:.4f}", ex_s=f"{seen / elapsed:,.0f}")
            bar.update(step - bar.n)
    bar.close()
    seconds = time.perf_counter() - start
    return EpochStats(float(total) / max(seen, 1), seen, steps, seconds)


def validation_ks(select_metric: str) -> tuple[int, ...]:
    """The default ks plus the k of the selection metric (e.g. ndcg@15)."""
    if "@" in select_metric:
        return tuple(sorted(set(DEFAULT_KS) | {int(select_metric.split("@")[1])}))
    return DEFAULT_KS


def evaluate_split(
    model: nn.Module,
    dataset: Dataset,
    split: str = "valid",
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    include_history: bool = False,
    batch_size: int = 1024,
) -> EvalResult:
    """Full-ranking metrics of `model` on one split of `dataset`."""
    return evaluate_model(
        model, dataset.split(split), ks=ks, include_history=include_history, batch_size=batch_size
    )


def _check_resume(saved: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """Only the epoch budget and runtime knobs may change when resuming."""
    old = TrainConfig.from_dict(saved).flat()
    new = config.flat()
    for name, value in new.items():
        if name not in RESUMABLE_FIELDS and old.get(name) != value:
            raise ConfigError(
                f"--resume: {run_dir} was trained with {name}={old.get(name)!r}, now {value!r}; "
                f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change when resuming"
            )


def _plot_curves(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Training loss and the validation metric per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = [h.get("loss") for h in history]
    if any(v is not None for v in losses):
        ax_loss.plot(epochs, [math.nan if v is None else v for v in losses], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_metric.plot(epochs, [h[metric] for h in history], marker="o", color="tab:green")
    ax_metric.set(title=f"validation {metric}", xlabel="epoch")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _fresh_state(config: TrainConfig) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "epoch": 0,
        "best_epoch": -1,
        "best_value": -math.inf,
        "best_valid": None,
        "bad_epochs": 0,
        "history": [],
        "train_seconds": 0.0,
        "mlflow_run_id": None,
    }


def fit(
    config: TrainConfig,
    data: Dataset | Path | str,
    out_dir: Path | str,
    *,
    on_epoch: EpochCallback | None = None,
    mlflow: bool = True,
    resume: bool = False,
    progress: bool = True,
    evaluate_test: bool = True,
    tracking: TrackingOptions | None = None,
    context: distributed.Context | None = None,
    run_meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train `config` on `data` into the run dir `out_dir`; see the module docstring.

    `on_epoch(epoch, valid_metrics)` runs after each epoch's validation (epochs count from 1);
    an exception from it (e.g. `optuna.TrialPruned`) propagates, the MLflow run ends as KILLED
    and no final file (model, metrics, config) is written. `resume=True` continues from
    `out_dir/checkpoint/` (model, optimizer, RNG, epoch, best so far). `evaluate_test=False`
    never reads the test split (tuning). `tracking` sets MLflow's experiment, run name, parent
    run and registered model name; `mlflow=False` switches MLflow off.

    `context` (from `tlsan.distributed.session`) is this process's rank and device under
    torchrun: every rank trains on its share of each global batch, rank 0 alone evaluates,
    writes files and tracks, and `on_epoch` runs on every rank with rank 0's metrics.
    None: one process on the CPU. `run_meta` adds JSON fields to config.json (the CLI's
    preset, for example).
    """
    began = time.perf_counter()
    ctx = context or distributed.single()
    progress = progress and ctx.is_main
    run_dir = Path(out_dir)
    with distributed.collective_errors(ctx):  # a failure on one rank stops all of them
        dataset = data if isinstance(data, Dataset) else load_dataset(Path(data))
        resuming = resume and has_checkpoint(run_dir)
        if not resuming and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise RunError(
                f"{run_dir}: already exists and is not a resumable run; choose another --out "
                "(or pass --resume to continue an interrupted run)"
            )
        check_protocol(config, dataset)
        if config.protocol == "reference":
            if ctx.world_size > 1:
                raise ConfigError("--protocol reference: one process only, as the reference")
            return _fit_reference(config, dataset, run_dir, resume, progress, mlflow, tracking)
        distributed.check_global_batch(config, ctx.world_size)
        set_threads(config.threads)
        model = distributed.place(ctx, new_model(config, dataset))
        optimizer = make_optimizer(model, config)
        generator = torch.Generator().manual_seed(config.seed)
        state = _fresh_state(config)
        best_weights: dict[str, Tensor] | None = None
        if resuming:
            saved, best_weights = load_checkpoint(
                run_dir, model=model, optimizer=optimizer, generator=generator
            )
            _check_resume(saved["config"], config, run_dir)
            state.update({k: v for k, v in saved.items() if k in state and k != "config"})
            state["config"] = config.to_dict()
    distributed.check_same_start(ctx, config, dataset, model, generator, state)
    trainee = distributed.trainer(ctx, model, dataset.train, config)

    options = tracking or TrackingOptions()
    options.enabled = options.enabled and mlflow and ctx.is_main
    tracker = Tracker(options)
    tags = {"dataset_hash": dataset.dataset_hash, "model_kind": config.model.kind}
    params = {**config.flat(), **{f"vocab_{k}": v for k, v in dataset.sizes.to_dict().items()}}
    with distributed.collective_errors(ctx):
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        state["mlflow_run_id"] = tracker.start(params, tags, resume_run_id=state["mlflow_run_id"])
    ks = validation_ks(config.select_metric)
    metric = config.select_metric

    def evaluate(model: nn.Module, split: str) -> EvalResult:
        """Once, on rank 0 (and on the CPU); every rank gets the same metrics."""
        return distributed.metrics_from_main(
            ctx,
            lambda: evaluate_split(
                distributed.cpu_model(ctx, model), dataset, split,
                ks=ks if split == "valid" else DEFAULT_KS, batch_size=config.eval_batch_size,
                include_history=config.include_history,
            ),
        )  # fmt: skip

    history: list[dict[str, Any]] = state["history"]
    stopped_early = False
    try:
        trainable = optimizer is not None
        for epoch in range(state["epoch"] + 1, (config.epochs if trainable else 0) + 1):
            if config.patience and state["bad_epochs"] >= config.patience:
                stopped_early = True
                break
            assert optimizer is not None
            train = distributed.shard(ctx, dataset.train, epoch, config.seed)
            stats = train_epoch(
                trainee, optimizer, train, config, generator,
                progress=progress, desc=f"epoch {epoch}/{config.epochs}",
            )  # fmt: skip
            stats = distributed.epoch_totals(ctx, stats)
            valid = evaluate(model, "valid")
            record = {
                "epoch": epoch,
                "loss": stats.loss,
                "train_seconds": stats.seconds,
                "examples_per_s": stats.examples_per_s,
                **valid.metrics,
            }
            tracker.log_epoch(epoch, {"loss": stats.loss, **valid.metrics})
            if on_epoch is not None:
                on_epoch(epoch, dict(valid.metrics))
            history.append(record)
            value = valid.metrics[metric]
            if value > state["best_value"]:
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                state.update(best_value=value, best_epoch=epoch, best_valid=valid.metrics)
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["train_seconds"] += stats.seconds
            if progress:
                others = "  ".join(
                    f"{name} {valid.metrics[name]:.4f}"
                    for name in ("ndcg@10", "auc")
                    if name != metric
                )
                tqdm.write(
                    f"epoch {epoch}: loss {stats.loss:.4f}  valid {metric} {value:.4f}  {others}  "
                    f"({stats.seconds:.1f} s, {stats.examples_per_s:,.0f} ex/s)"
                )
            distributed.on_main(  # rank 0 writes; a failure there stops every rank
                ctx, save_checkpoint,
                run_dir, model=model, optimizer=optimizer, generator=generator,
                state=state, best_weights=best_weights if state["best_epoch"] == epoch else None,
            )  # fmt: skip
        if config.patience and state["bad_epochs"] >= config.patience:
            stopped_early = stopped_early or state["epoch"] < config.epochs
        if best_weights is None:  # nothing trained (pop, or epochs = 0): the model as built
            valid = evaluate(model, "valid")
            history.append({"epoch": 0, "loss": None, **valid.metrics})
            tracker.log_epoch(0, valid.metrics)
            if on_epoch is not None:
                on_epoch(0, dict(valid.metrics))
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state.update(best_value=valid.metrics[metric], best_epoch=0, best_valid=valid.metrics)
        model.load_state_dict(best_weights)
        distributed.broadcast_weights(ctx, model)  # the chosen checkpoint, bit for bit
        model = distributed.cpu_model(ctx, model)
        model.eval()
        test = None
        if evaluate_test:
            test = evaluate(model, "test").metrics
        wall = time.perf_counter() - began
        valid_best: dict[str, float] = state["best_valid"]
        files = distributed.on_main(
            ctx, _write_results, run_dir, config, dataset, model, state, valid_best, test, wall,
            run_meta,
        )  # fmt: skip
        version = distributed.on_main(ctx, tracker.finish, valid_best, test, run_dir, files)
    except BaseException as exc:
        tracker.end("FAILED" if isinstance(exc, Exception) and not _is_pruned(exc) else "KILLED")
        raise
    return FitResult(
        run_dir=run_dir,
        config=config,
        model=model,
        best_epoch=int(state["best_epoch"]),
        valid=valid_best,
        test=test,
        history=history,
        wall_s=wall,
        stopped_early=stopped_early,
        mlflow_run_id=tracker.run_id,
        model_version=version,
    )


def _fit_reference(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: Path,
    resume: bool,
    progress: bool,
    mlflow: bool,
    tracking: TrackingOptions | None,
) -> FitResult:
    """`fit` under `--protocol reference` (tlsan/reference_protocol.py): no validation, the
    best test evaluation every 1,000 steps; the result's `test` is that (leaky) figure."""
    if resume:
        raise ConfigError("--resume: not available with --protocol reference (a short run)")
    options = tracking or TrackingOptions()
    options.enabled = options.enabled and mlflow
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit_reference(config, dataset, run_dir, tracking=options, progress=progress)
    return FitResult(
        run_dir=run_dir,
        config=config,
        model=result.model,
        best_epoch=-1,
        valid={},
        test=result.metrics["test"],
        history=[],
        wall_s=result.wall_s,
        stopped_early=False,
        mlflow_run_id=result.mlflow_run_id,
        model_version=result.model_version,
        leaky=True,
    )


def _is_pruned(exc: BaseException) -> bool:
    """Optuna's TrialPruned, recognised by name (no optuna import here)."""
    return type(exc).__name__ == "TrialPruned"


def _write_results(
    run_dir: Path,
    config: TrainConfig,
    dataset: Dataset,
    model: nn.Module,
    state: dict[str, Any],
    valid: dict[str, float],
    test: dict[str, float] | None,
    wall: float,
    run_meta: dict[str, Any] | None = None,
) -> list[str]:
    """The final files of a run (each via temp + rename); returns their names."""
    extra = {
        **(run_meta or {}),
        "best_epoch": int(state["best_epoch"]),
        "epochs_trained": int(state["epoch"]),
        "select_metric": config.select_metric,
    }
    popularity = getattr(model, "popularity_summary", None)  # pop: the half-life it used
    if callable(popularity):
        extra["popularity"] = popularity()
    write_tensors(run_dir / MODEL_FILE, model.state_dict())
    write_json(run_dir / CONFIG_FILE, run_config_dict(config, dataset, model, extra))
    write_json(run_dir / METRICS_FILE, {"valid": valid, "test": test})
    write_json(
        run_dir / HISTORY_FILE,
        {
            "select_metric": config.select_metric,
            "best_epoch": int(state["best_epoch"]),
            "train_seconds": float(state["train_seconds"]),
            "wall_seconds": wall,
            "epochs": state["history"],
        },
    )
    _plot_curves(state["history"], config.select_metric, run_dir / CURVES_FILE)
    return [MODEL_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, CURVES_FILE]
