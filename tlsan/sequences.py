"""Training batches: per-example batches for TLSAN, sequence windows for (Ti)SASRec.

Our splits hold one example per target event (leave-one-out and time: every event after a
user's first; last-session: one per session transition), each with its history. Training a
sequence model on every example, each scoring every position, would use a target once per
later example of its user; instead the training targets of the split become **sequence
windows**, so every training target enters the loss exactly once per epoch:

- per user, the last window ends at the user's latest training target e: its inputs are the
  events [e - max_len, e) of events.parquet (fewer at the user's start) and position j
  predicts event j + 1;
- the next window ends at the latest training target at or before that window's first input
  event, and so on back to the user's first event, so longer users give consecutive
  chunks of max_len, every target in exactly one window;
- a position adds to the loss only if its next event is a training target of the split:
  every position in leave-one-out and time splits, only session transitions in the
  last-session split. Inputs are earlier events than every label they precede, so nothing
  the split holds out (valid and test targets come after the user's training targets)
  reaches a window.

Window inputs are the user's event sequence, which is what [long ; short] holds for the
leave-one-out and time splits' examples (up to `max_long`/`max_short`); the timestamps come
with them for TiSASRec. `rows` restricts training to some examples (a federated client, a
distributed shard): only their targets are labels, each still once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tlsan.config import TrainConfig
from tlsan.data import MAX_REJECTION_ROUNDS, Batch, Split, UserHistory
from tlsan.errors import TlsanError
from tlsan.scoring import PER_ROW_NEGATIVES


@dataclass(frozen=True)
class Windows:
    """Sequence windows as global event indices into `UserHistory.items`: inputs are the
    events [start, end), position j predicts event j + 1, so labels are (start, end]."""

    user: Tensor  # (W,)
    start: Tensor  # (W,)
    end: Tensor  # (W,) always a training target
    is_target: Tensor  # (n_events,) bool: events that are training targets of the rows

    def __len__(self) -> int:
        return int(self.user.numel())

    @property
    def labels(self) -> int:
        """Training targets covered by the windows (each exactly once)."""
        return int(self.is_target.sum())


def _history(split: Split) -> UserHistory:
    if split.history is None or split.arrays.target_pos is None:
        raise TlsanError(
            f"split {split.name!r}: sequence training needs the event log and target_pos of a "
            "prepared dataset (tlsan.data.load_dataset)"
        )
    return split.history


def sequence_windows(split: Split, max_len: int, rows: Tensor | None = None) -> Windows:
    """The windows covering the training targets of `rows` (default: all) of `split`."""
    history = _history(split)
    arrays = split.arrays
    assert arrays.target_pos is not None
    rows = torch.arange(len(split)) if rows is None else rows.to(torch.int64)
    users = arrays.user[rows]
    targets = torch.unique(history.user_start[users] + arrays.target_pos[rows])  # sorted
    is_target = torch.zeros(history.items.numel(), dtype=torch.bool)
    is_target[targets] = True
    owner = torch.searchsorted(history.user_start, targets, right=True) - 1  # user per target
    active = torch.unique(owner)
    limit = history.user_start[active + 1] - 1  # the latest event a window may end at
    found_user, found_start, found_end = [torch.zeros(0, dtype=torch.int64)] * 3
    while active.numel():  # one round per window of the longest user
        at = torch.searchsorted(targets, limit, right=True) - 1  # latest target <= limit
        first = history.user_start[active]
        ok = (at >= 0) & (targets[at.clamp(min=0)] >= first)  # ... and still the user's
        active, first, end = active[ok], first[ok], targets[at[ok]]
        start = torch.maximum(first, end - max_len)
        found_user = torch.cat([found_user, active])
        found_start = torch.cat([found_start, start])
        found_end = torch.cat([found_end, end])
        limit = start  # the next window's last label is this window's first input, or earlier
    return Windows(found_user, found_start, found_end, is_target)


def window_batch(
    split: Split,
    windows: Windows,
    index: Tensor,
    *,
    kind: str,
    negatives: int,
    generator: torch.Generator | None = None,
) -> Batch:
    """The windows at `index` as a batch: inputs right-aligned in `long_items`/`long_time`,
    `next_items` the training target each position predicts (0 = none), and the negatives
    `kind` needs: `negatives` per position outside the user's events up to the window's end
    (bce, softmax), `negatives` shared by the batch (sampled), none (ce)."""
    history = _history(split)
    user, start, end = windows.user[index], windows.start[index], windows.end[index]
    width = max(1, int((end - start).max()))
    event = end.unsqueeze(1) - width + torch.arange(width)  # (B, W) global event indices
    valid = event >= start.unsqueeze(1)
    event = torch.where(valid, event, 0)
    items = history.items[event] * valid
    label = torch.where(valid, event + 1, 0)  # <= end: the same user's events
    next_items = torch.where(valid & windows.is_target[label], history.items[label], 0)
    times = None if history.times is None else history.times[event] * valid
    B = int(index.numel())
    empty = torch.zeros(B, 0, dtype=torch.int64)
    batch = Batch(
        user=user,
        long_items=items,
        long_tau=valid.to(torch.float32),
        short_items=empty,
        user_category=torch.zeros(B, dtype=torch.int64),
        target=history.items[end],
        long_time=times,
        short_time=None if times is None else empty,
        next_items=next_items,
    )
    if kind in PER_ROW_NEGATIVES:
        ends = (end - history.user_start[user] + 1).view(B, 1, 1)  # the user's events so far
        shape = (B, width, negatives)
        batch.negatives = _outside(history, user.view(B, 1, 1), ends, shape, generator)
    elif kind == "sampled":
        shared = torch.randint(1, history.n_items, (negatives,), generator=generator)
        batch.shared_negatives = shared
    return batch


def _outside(
    history: UserHistory,
    users: Tensor,
    ends: Tensor,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
) -> Tensor:
    """Uniform items none of which `users` had among their first `ends` events (redrawn up to
    MAX_REJECTION_ROUNDS times, as `Split.sample_negatives`)."""
    neg = torch.randint(1, history.n_items, shape, generator=generator)
    for _ in range(MAX_REJECTION_ROUNDS):
        bad = history.seen_before(users, neg, ends)
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        neg[bad] = torch.randint(1, history.n_items, (n_bad,), generator=generator)
    return neg


def training_batches(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    generator: torch.Generator,
    rows: Tensor | None = None,
) -> tuple[int, Iterator[Batch]]:
    """(steps, batches) of one shuffled training epoch over `rows` of `split` for
    `model.loss(batch, config.loss)`: sequence windows for models with `sequence_training`,
    else per-example batches; each with the negatives `config.loss` needs."""
    kind, count = config.loss, config.negatives
    if getattr(model, "sequence_training", False):
        # under torchrun `split` is one rank's view (tlsan.distributed.ShardedSplit): the same
        # global order of windows on every rank, each taking its share of every global batch
        base: Split = getattr(split, "split", split)
        share = getattr(split, "share", None)
        windows = sequence_windows(base, config.model.max_len, rows)
        order = torch.randperm(len(windows), generator=generator)
        chunks = order.split(config.batch_size)
        own = split.negative_generator() if share is not None else generator  # type: ignore[attr-defined]
        return len(chunks), (
            window_batch(
                base, windows, share(chunk) if share is not None else chunk,
                kind=kind, negatives=count, generator=own,
            )
            for chunk in chunks
        )  # fmt: skip
    n_rows = len(split) if rows is None else int(rows.numel())
    steps = -(-n_rows // config.batch_size)
    per_row = count if kind in PER_ROW_NEGATIVES else 0
    batches = split.batches(config.batch_size, negatives=per_row, generator=generator, rows=rows)
    if kind != "sampled":
        return steps, batches
    n_items = split.n_items
    return steps, (
        replace(b, shared_negatives=torch.randint(1, n_items, (count,), generator=generator))
        for b in batches
    )
