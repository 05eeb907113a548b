"""Data-parallel training under torchrun: process group, sharding, rank-0 work, agreement.

`torchrun --standalone --nproc-per-node N -m tlsan train ...` starts N processes with
`WORLD_SIZE`, `RANK` and `LOCAL_RANK` set; `session()` joins them into one process group (gloo on
the CPU, NCCL with `--device cuda`). Without torchrun (`WORLD_SIZE` unset or 1) nothing here
initialises torch.distributed and `fit` runs the one-process code path unchanged.

How `fit` uses a `Context` (see tlsan/train.py):
- Batches: `--batch-size` is the global batch. Every rank draws the same permutation of the
  training examples each epoch (the shared, checkpointed generator), cuts it into global
  batches, and takes a strided share of each (`shard_rows`); a last batch that does not divide
  evenly is padded by wrapping around within it, as torch's `DistributedSampler` pads. Each rank
  samples its own negatives from a generator seeded by (seed, epoch, rank).
- Gradients: DistributedDataParallel over a module whose forward is `model.loss` (DDP's reducer
  only sees a forward's graph); it averages the gradients of equal-sized shards during backward,
  in buckets that overlap communication with the backward pass, so a step equals the one-process
  step on the global batch up to the negatives drawn. One local backward on a few examples
  first tells whether the model's loss reaches every parameter; only if not does DDP walk the
  graph for unused parameters at every step (`find_unused_parameters`).
- Rank 0 alone evaluates (validation and test), writes checkpoints and result files and talks
  to MLflow; it broadcasts the validation metrics, so every rank reaches the same best epoch and
  the same early-stopping decision and keeps the same chosen weights.
- Agreement: a failure inside `collective_errors()` (or in rank 0's work) on any rank raises on
  every rank at the same point; `session()` then has every rank exit with status 2 and one line,
  instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tlsan.data import Batch, Split
from tlsan.errors import ConfigError, TlsanError

if TYPE_CHECKING:
    from tlsan.config import TrainConfig
    from tlsan.data import Dataset
    from tlsan.evaluate import EvalResult

T = TypeVar("T")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# Ranks wait for rank 0 while it evaluates the validation split; a collective that outlasts
# this many minutes fails instead of hanging forever (torchrun also stops every rank when one
# dies). TLSAN_DIST_TIMEOUT_MIN overrides it.
DEFAULT_TIMEOUT_MIN = 60


class RankError(TlsanError):
    """Another rank failed at a point where all ranks agree on failures; raised on this rank."""


@dataclass
class Context:
    """Where this process trains: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _replicas: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that evaluates, writes files and tracks the run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live (NCCL only moves CUDA tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def single() -> Context:
    """One process on the CPU: what `fit` assumes when no context is given."""
    return Context()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`cpu`, or `cuda` as this process's GPU (`cuda:LOCAL_RANK`); a clear error otherwise."""
    if name not in DEVICES:
        raise ConfigError(f"--device: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to this torch build")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"--device cuda: process {local_rank} of this node needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} are visible; use --nproc-per-node <= the GPU count"
        )
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(
            f"environment variable {name}: expected an integer, got {value!r}"
        ) from exc


@contextmanager
def session(device: str = "cpu") -> Iterator[Context]:
    """This process's place in a torchrun job (a plain one-process context without torchrun).

    Under torchrun it joins the process group (gloo, or NCCL on `cuda`) and leaves it at the
    end. A failure all ranks agreed on (see `collective_errors`) makes every rank ignore
    torchrun's SIGTERM, wait for the others at a barrier and only then raise, so that each
    rank prints its own line and exits with its own status (2 for user errors).
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    if world <= 1:
        yield Context(device=torch_device)
        return
    timeout = timedelta(minutes=_env_int("TLSAN_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch_device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    ctx = Context(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)
    try:
        yield ctx
    except Exception as exc:
        if getattr(exc, "agreed_by_all_ranks", False):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the slower ranks
            _barrier(ctx)
            dist.destroy_process_group()
        raise
    _barrier(ctx)
    dist.destroy_process_group()


def _barrier(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


# -- agreement and rank 0's work ---------------------------------------------------------------
def _describe(error: BaseException) -> str:
    if isinstance(error, TlsanError | OSError) or type(error).__name__ == "DataValidationError":
        return str(error)
    return f"{type(error).__name__}: {error}"


@contextmanager
def collective_errors(ctx: Context) -> Iterator[None]:
    """Every rank runs the block and then agrees: if it raised on any rank, every rank raises
    here (the failing ranks their own exception, the others a `RankError` quoting the first
    failing rank). No collective may run inside the block."""
    if not ctx.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    flags = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.comm_device)
    flags[ctx.rank] = int(error is not None)
    dist.all_reduce(flags)
    failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    if not failed:
        return
    first = failed[0]
    message = _broadcast_bytes(
        ctx, _describe(error).encode() if ctx.rank == first and error else b"", first
    ).decode()
    if error is None:
        error = RankError(f"rank {first} of {ctx.world_size} failed: {message}")
    error.agreed_by_all_ranks = True  # type: ignore[attr-defined]
    raise error


def on_main(ctx: Context, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)` on rank 0 only (None elsewhere); its failure stops every rank."""
    if not ctx.distributed:
        return fn(*args, **kwargs)
    result: T | None = None
    with collective_errors(ctx):
        if ctx.is_main:
            result = fn(*args, **kwargs)
    return result


def metrics_from_main(ctx: Context, evaluate: Callable[[], EvalResult]) -> EvalResult:
    """Evaluate once, on rank 0, and give every rank the same metrics (exact floats)."""
    from tlsan.evaluate import EvalResult

    if not ctx.distributed:
        return evaluate()
    result = on_main(ctx, evaluate)
    metrics = broadcast_json(ctx, result.metrics if result is not None else None)
    return result if result is not None else EvalResult(metrics=metrics)


def broadcast_json(ctx: Context, value: Any, src: int = 0) -> Any:
    """`value` of rank `src` on every rank (JSON over a byte tensor: no pickle)."""
    data = json.dumps(value).encode() if ctx.rank == src else b""
    return json.loads(_broadcast_bytes(ctx, data, src))


def _broadcast_bytes(ctx: Context, data: bytes, src: int) -> bytes:
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.comm_device)
    dist.broadcast(size, src)
    if ctx.rank == src:
        buffer = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
    buffer = buffer.to(ctx.comm_device)
    dist.broadcast(buffer, src)
    return bytes(buffer.cpu().numpy())


def _all_gather_bytes(ctx: Context, data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank."""
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.comm_device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8)
    buffer[: len(data)] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    buffer = buffer.to(ctx.comm_device)
    gathered = [torch.zeros_like(buffer) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, buffer)
    return [bytes(g.cpu().numpy()[: int(s.item())]) for g, s in zip(gathered, sizes, strict=True)]


# -- the same start on every rank --------------------------------------------------------------
def _digest(tensor: Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=8).hexdigest()


def start_fingerprint(
    config: TrainConfig,
    dataset: Dataset,
    model: nn.Module,
    generator: torch.Generator,
    state: dict[str, Any],
) -> list[list[str]]:
    """[what, description, value digest] of everything that must match across ranks before the
    first step: the dataset, every config field, the resume point, the shuffling generator, and
    every parameter and buffer (shape, dtype and a hash of the values)."""
    rows = [
        ["dataset", f"hash {dataset.dataset_hash!r}, vocab sizes {dataset.sizes.to_dict()}", ""]
    ]
    rows += [[f"config field {k!r}", repr(v), ""] for k, v in sorted(config.flat().items())]
    rows.append(["resume point", f"epoch {state['epoch']}, best epoch {state['best_epoch']}", ""])
    rows.append(["shuffling generator", "state", _digest(generator.get_state())])
    for name, value in model.state_dict().items():
        kind = "parameter" if name in dict(model.named_parameters()) else "buffer"
        rows.append(
            [f"{kind} {name!r}", f"shape {list(value.shape)} {value.dtype}", _digest(value)]
        )
    return rows


def first_difference(rows: list[list[list[str]]]) -> str | None:
    """The first way in which a rank's fingerprint differs from rank 0's, in words."""
    base = {what: (desc, digest) for what, desc, digest in rows[0]}
    for rank, other in enumerate(rows[1:], 1):
        theirs = {what: (desc, digest) for what, desc, digest in other}
        for what, desc, digest in rows[0]:
            if what not in theirs:
                return f"rank 0 has {what} ({desc}), rank {rank} has none"
            their_desc, their_digest = theirs[what]
            if their_desc != desc:
                return f"{what} is {desc} on rank 0 but {their_desc} on rank {rank}"
            if their_digest != digest:
                return f"{what} ({desc}) has different values on rank 0 and rank {rank}"
        for what, desc, _ in other:
            if what not in base:
                return f"rank {rank} has {what} ({desc}), rank 0 has none"
    return None


def check_same_start(
    ctx: Context,
    config: TrainConfig,
    dataset: Dataset,
    model: nn.Module,
    generator: torch.Generator,
    state: dict[str, Any],
) -> None:
    """Every rank must start from the same dataset, config, weights and resume point; if not,
    every rank raises the same ConfigError (DDP would silently copy rank 0's weights over the
    others and train on mismatched data)."""
    if not ctx.distributed:
        return
    mine = json.dumps(start_fingerprint(config, dataset, model, generator, state)).encode()
    difference = first_difference([json.loads(b) for b in _all_gather_bytes(ctx, mine)])
    if difference is not None:
        error = ConfigError(
            f"the {ctx.world_size} training processes do not start from the same state: "
            f"{difference}; every process must read the same dataset, config and checkpoint"
        )
        error.agreed_by_all_ranks = True  # type: ignore[attr-defined]
        raise error


def check_global_batch(config: TrainConfig, world_size: int) -> None:
    """`--batch-size` is the global batch: every one of the processes takes an equal share."""
    if world_size > 1 and config.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size}: expected a multiple of the {world_size} training "
            f"processes (it is the global batch; each process takes batch_size / {world_size})"
        )


# -- sharding ----------------------------------------------------------------------------------
def shard_rows(chunk: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s share of one global batch: rows rank, rank + W, ... after padding the
    batch to a multiple of W by wrapping around it, so every rank gets len/W rows (rounded up)."""
    n = chunk.numel()
    padded = chunk[torch.arange(math.ceil(n / world_size) * world_size) % n]
    return padded[rank::world_size]


def negative_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed of its own for each rank and epoch (no state to checkpoint: resume re-derives it)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class ShardedSplit:
    """A training split as one rank of `world_size` sees it; `train_epoch` uses it like a
    `Split`: `len()` is the global count (steps are global batches) and `batches()` yields
    this rank's share of each global batch, with negatives from this rank's own generator."""

    split: Split
    rank: int
    world_size: int
    negatives_seed: int

    def __len__(self) -> int:
        return len(self.split)

    @property
    def n_items(self) -> int:
        return self.split.n_items

    def share(self, chunk: Tensor) -> Tensor:
        """This rank's rows of one global batch (sequence windows use it too)."""
        return shard_rows(chunk, self.rank, self.world_size)

    def negative_generator(self) -> torch.Generator:
        """This rank's own generator for the negatives of an epoch."""
        return torch.Generator().manual_seed(self.negatives_seed)

    def batches(
        self,
        batch_size: int,
        *,
        negatives: int = 0,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        rows: Tensor | None = None,
    ) -> Iterator[Batch]:
        """`batch_size` is the global batch; `generator` (the same on every rank) shuffles."""
        rows = torch.arange(len(self.split)) if rows is None else rows.to(torch.int64)
        if shuffle:
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
        own = self.negative_generator()
        for chunk in rows.split(batch_size):
            mine = self.share(chunk)
            neg = self.split.sample_negatives(mine, negatives, own) if negatives else None
            yield self.split.arrays.batch(mine, neg)


def shard(ctx: Context, split: Split, epoch: int, seed: int) -> Split | ShardedSplit:
    """The training split for `train_epoch` in epoch `epoch`: as is for one process."""
    if not ctx.distributed:
        return split
    return ShardedSplit(split, ctx.rank, ctx.world_size, negative_seed(seed, epoch, ctx.rank))


# -- the model on its device and across ranks --------------------------------------------------
def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Every tensor field of `batch` on `device`."""
    moved = {
        f.name: getattr(batch, f.name).to(device)
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), Tensor)
    }
    return replace(batch, **moved)


def _trainable(model: nn.Module) -> bool:
    return getattr(model, "trainable", True) and any(p.requires_grad for p in model.parameters())


def place(ctx: Context, model: nn.Module) -> nn.Module:
    """A trainable model moved to the context's device (a CPU replica is kept for evaluation)."""
    if ctx.device.type != "cpu" and _trainable(model):
        ctx._replicas[id(model)] = copy.deepcopy(model)
        model.to(ctx.device)
    return model


def cpu_model(ctx: Context, model: nn.Module) -> nn.Module:
    """`model` itself on the CPU; for a GPU model, its CPU replica with the current weights
    (evaluation, which indexes with CPU tensors, runs there)."""
    replica = ctx._replicas.get(id(model))
    if replica is None:
        return model
    replica.load_state_dict(model.state_dict())
    return replica


class _LossForward(nn.Module):
    """`model.loss` as a forward, the only call through which DDP's reducer sees gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, kind: str) -> Tensor:
        return self.model.loss(batch, kind)


class DataParallelModel:
    """The model as `train_epoch` sees it on a GPU or under torchrun: `loss()` moves the batch
    to the device and, with several processes, runs through DDP; everything else (`train()`,
    `l2_parameters()`, scoring) is the model's own."""

    def __init__(self, model: nn.Module, device: torch.device, ddp: nn.Module | None) -> None:
        self._model = model
        self._device = device
        self._ddp = ddp

    def loss(self, batch: Batch, kind: str = "bce") -> Tensor:
        batch = batch_to(batch, self._device)
        if self._ddp is None:
            return self._model.loss(batch, kind)
        return self._ddp(batch, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def reaches_every_parameter(
    model: nn.Module, split: Split, config: TrainConfig, device: torch.device
) -> bool:
    """Does one loss (plus the L2 term) on a few training examples give every trainable
    parameter a gradient? Leaves `.grad` and every random generator untouched."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = torch.arange(min(len(split), 8))
    negatives = split.sample_negatives(rows, config.negatives, torch.Generator().manual_seed(0))
    batch = batch_to(split.arrays.batch(rows, negatives), device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loss = model.loss(batch, config.loss)
        if config.l2 > 0:
            loss = loss + sum(p.square().sum() for p in model.l2_parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return all(g is not None for g in grads)


def trainer(
    ctx: Context, model: nn.Module, split: Split, config: TrainConfig
) -> nn.Module | DataParallelModel:
    """What `train_epoch` trains: the model itself for one CPU process (nothing changes),
    else a `DataParallelModel` (DDP across ranks; construction is a collective)."""
    if not _trainable(model) or (not ctx.distributed and ctx.device.type == "cpu"):
        return model
    ddp = None
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            _LossForward(model),
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (item categories) never change
            find_unused_parameters=not reaches_every_parameter(model, split, config, ctx.device),
        )
    return DataParallelModel(model, ctx.device, ddp)


def epoch_totals(ctx: Context, stats: Any) -> Any:
    """One epoch's `EpochStats` over all ranks: the mean loss, every rank's examples, the
    slowest rank's seconds (so examples_per_s is the job's throughput)."""
    if not ctx.distributed:
        return stats
    sums = torch.tensor([stats.loss * stats.examples, stats.examples], dtype=torch.float64)
    slowest = torch.tensor([stats.seconds], dtype=torch.float64)
    sums, slowest = sums.to(ctx.comm_device), slowest.to(ctx.comm_device)
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, examples = sums.tolist()
    return replace(
        stats,
        loss=loss_sum / max(examples, 1.0),
        examples=int(examples),
        seconds=float(slowest.item()),
    )


def broadcast_weights(ctx: Context, model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the chosen checkpoint, bit for bit)."""
    if not ctx.distributed:
        return
    for value in model.state_dict().values():
        buffer = value.detach().to(ctx.comm_device)
        dist.broadcast(buffer, 0)
        if not ctx.is_main:
            value.copy_(buffer)
