"""A prepared dataset dir (docs/dataset-format.md) as padded tensors, loaded once.

Training and evaluation never touch a DataFrame after loading: every split becomes a handful of
int64/float32 tensors, the items each example's user had seen before it are answered from one
per-user index of the event log (`UserHistory`: sorted `user * n_items + item` keys with the
position of their first event, O(events) memory whatever the split), and a batch is a row gather
plus vectorised negative sampling with rejection against that index.

Layout of the padded arrays: `long_items`/`long_tau`/`long_time` and `short_items`/`short_time`
are **right-aligned** (the most recent event in the last column, padding 0 on the left), so "the
last Ls long-term events" is the slice `[:, -Ls:]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from pipelines.errors import DataValidationError
from pipelines.prepare import FORMAT_VERSION

SPLITS: tuple[str, ...] = ("train", "valid", "test")
EXAMPLE_SCHEMA: dict[str, Any] = {
    "user": pl.Int32,
    "long_items": pl.List(pl.Int32),
    "long_tau": pl.List(pl.Float32),
    "long_time": pl.List(pl.Int64),
    "short_items": pl.List(pl.Int32),
    "short_time": pl.List(pl.Int64),
    "target": pl.Int32,
    "target_pos": pl.Int32,
    "user_category": pl.Int32,
    "ref_time": pl.Int64,
    "history_end": pl.Int32,
}
MAX_REJECTION_ROUNDS = 64


@dataclass(frozen=True)
class VocabSizes:
    """Embedding-table rows per vocabulary (max index + 1; row 0 is padding)."""

    users: int
    items: int
    categories: int

    def to_dict(self) -> dict[str, int]:
        return {"users": self.users, "items": self.items, "categories": self.categories}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VocabSizes:
        return cls(int(data["users"]), int(data["items"]), int(data["categories"]))


@dataclass
class Batch:
    """Model input for B examples (all tensors on the CPU, int64 indices, 0 = padding).

    `target` is 0 where unknown (serving); negatives are set for training batches only, as
    the loss needs them (tlsan/scoring.py). User index 0 means "unknown user": models use
    neutral personal parameters for it. The timestamps are None where the source had none.

    A sequence-window batch (tlsan/sequences.py, all-position training of (Ti)SASRec) holds a
    window of the user's events in `long_items`/`long_time` (empty session) and in
    `next_items` the item each position must predict, 0 where that position adds no loss;
    its per-row `negatives` are then (B, L, K), one row per position.
    """

    user: Tensor  # (B,)
    long_items: Tensor  # (B, L) right-aligned
    long_tau: Tensor  # (B, L) float32, 0 at padding
    short_items: Tensor  # (B, S) right-aligned
    user_category: Tensor  # (B,)
    target: Tensor  # (B,)
    negatives: Tensor | None = None  # (B, K) outside each user's history (bce, softmax)
    long_time: Tensor | None = None  # (B, L) int64 unix seconds, 0 at padding
    short_time: Tensor | None = None  # (B, S) int64 unix seconds, 0 at padding
    next_items: Tensor | None = None  # (B, L) sequence windows only, aligned with long_items
    shared_negatives: Tensor | None = None  # (K,) uniform over the catalog (sampled)

    def __len__(self) -> int:
        return int(self.user.shape[0])


def fold_sessions(batch: Batch, rows: Tensor, tau: float = 1.0) -> Batch:
    """Move the short-term items of the rows where `rows` (B,) is True into the long-term
    history (time feature `tau`), leaving their current session empty.

    Paper-split training examples always have a non-empty current session, while test and
    serving examples often have none (the target opens a new session and the previous one is
    long-term history by then); folding some training sessions shows the model that case.
    """
    if not bool(rows.any()):
        return batch
    L = batch.long_items.shape[1]
    short = batch.short_items * rows.unsqueeze(1)  # (B, S) only the folded rows
    items = torch.cat([batch.long_items, short], 1)  # padding in the middle
    taus = torch.cat([batch.long_tau, (short > 0).to(batch.long_tau.dtype) * tau], 1)
    order = torch.sort((items > 0).to(torch.int8), dim=1, stable=True).indices
    times: dict[str, Tensor | None] = {}
    if batch.long_time is not None and batch.short_time is not None:
        moved = torch.cat([batch.long_time, batch.short_time * rows.unsqueeze(1)], 1)
        times["long_time"] = moved.gather(1, order)[:, -L:]
        times["short_time"] = batch.short_time * ~rows.unsqueeze(1)
    return replace(
        batch,
        long_items=items.gather(1, order)[:, -L:],
        long_tau=taus.gather(1, order)[:, -L:],
        short_items=batch.short_items * ~rows.unsqueeze(1),
        **times,
    )


def _padded(values: np.ndarray, lengths: np.ndarray, width: int, dtype: Any) -> np.ndarray:
    """Right-aligned (N, width) array from flat list values and per-row lengths."""
    return right_aligned(values, lengths, max(width, 1), dtype)


def right_aligned(values: np.ndarray, lengths: np.ndarray, width: int, dtype: Any) -> np.ndarray:
    """(N, width) rows right-aligned (zeros on the left), each holding the last `width` of its
    list: older values beyond the width are cut, as the model's long-term window cuts them.
    The one padding step of training, evaluation and serving (`padded_arrays`, ONNX inputs)."""
    n = len(lengths)
    out = np.zeros((n, width), dtype=dtype)
    if n == 1:  # one row (a lone serving request): no index arithmetic needed
        m = min(values.size, width)
        if m:
            out[0, width - m :] = values[values.size - m :]
        return out
    if values.size:
        kept = np.minimum(lengths, width)
        ends = np.cumsum(lengths)
        rows = np.repeat(np.arange(n), kept)
        within = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        source = np.repeat(ends - kept, kept) + within
        out[rows, width - np.repeat(kept, kept) + within] = values[source]
    return out


def _list_column(frame: pl.DataFrame, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and lengths of a list column (no per-row Python)."""
    lengths = frame.get_column(name).list.len().fill_null(0).to_numpy().astype(np.int64)
    values = frame.get_column(name).explode().drop_nulls().to_numpy().astype(dtype)
    return values, lengths


@dataclass
class ExampleArrays:
    """The padded tensors of a frame of examples (a split, or serving's features).

    `target_pos` is the target event's `pos` in events.parquet (0 where unknown); the
    timestamps are None where the source had none (serving's ONNX-era inputs)."""

    user: Tensor
    long_items: Tensor
    long_tau: Tensor
    short_items: Tensor
    user_category: Tensor
    target: Tensor
    history_end: Tensor
    ref_time: Tensor
    long_time: Tensor | None = None
    short_time: Tensor | None = None
    target_pos: Tensor | None = None

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, rows: Tensor) -> ExampleArrays:
        """The examples at `rows` (every tensor field indexed alike)."""
        return ExampleArrays(
            **{f.name: _rows(getattr(self, f.name), rows) for f in fields(ExampleArrays)}
        )

    def batch(self, rows: Tensor | None = None, negatives: Tensor | None = None) -> Batch:
        """The examples at `rows` (all when None) as a model batch."""
        if rows is None:
            return Batch(
                self.user,
                self.long_items,
                self.long_tau,
                self.short_items,
                self.user_category,
                self.target,
                negatives,
                long_time=self.long_time,
                short_time=self.short_time,
            )
        return Batch(
            self.user[rows],
            self.long_items[rows],
            self.long_tau[rows],
            self.short_items[rows],
            self.user_category[rows],
            self.target[rows],
            negatives,
            long_time=_rows(self.long_time, rows),
            short_time=_rows(self.short_time, rows),
        )


def _rows(values: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if values is None else values[rows]


def arrays_from_frame(
    frame: pl.DataFrame, *, max_long: int | None = None, max_short: int | None = None
) -> ExampleArrays:
    """Padded tensors from example rows (columns of docs/dataset-format.md).

    `target`, `target_pos`, `history_end` and `ref_time` may be missing (serving features):
    they become 0; `long_time`/`short_time` may be missing: they become None. Widths default
    to the longest list in the frame.
    """
    long_values, long_len = _list_column(frame, "long_items", np.int64)
    tau_values, tau_len = _list_column(frame, "long_tau", np.float32)
    if not np.array_equal(long_len, tau_len):
        raise DataValidationError("long_tau: expected one value per long_items entry")
    short_values, short_len = _list_column(frame, "short_items", np.int64)
    times: dict[str, np.ndarray] = {}
    for name, lengths in (("long_time", long_len), ("short_time", short_len)):
        if name in frame.columns:
            values, time_len = _list_column(frame, name, np.int64)
            if not np.array_equal(lengths, time_len):
                items = name.replace("time", "items")
                raise DataValidationError(f"{name}: expected one value per {items} entry")
            times[name] = values

    def scalar(name: str) -> np.ndarray | None:
        if name not in frame.columns:
            return None
        return frame.get_column(name).fill_null(0).to_numpy()

    return padded_arrays(
        user=scalar("user"),
        long_items=long_values,
        long_tau=tau_values,
        long_lengths=long_len,
        short_items=short_values,
        short_lengths=short_len,
        user_category=scalar("user_category"),
        target=scalar("target"),
        history_end=scalar("history_end"),
        ref_time=scalar("ref_time"),
        target_pos=scalar("target_pos"),
        max_long=max_long,
        max_short=max_short,
        rows=frame.height,
        **times,
    )


def padded_arrays(
    *,
    rows: int,
    long_items: np.ndarray,
    long_tau: np.ndarray,
    long_lengths: np.ndarray,
    short_items: np.ndarray,
    short_lengths: np.ndarray,
    user: np.ndarray | None = None,
    user_category: np.ndarray | None = None,
    target: np.ndarray | None = None,
    history_end: np.ndarray | None = None,
    ref_time: np.ndarray | None = None,
    target_pos: np.ndarray | None = None,
    long_time: np.ndarray | None = None,
    short_time: np.ndarray | None = None,
    max_long: int | None = None,
    max_short: int | None = None,
) -> ExampleArrays:
    """Padded tensors from flat list values and per-row lengths: the one padding step of
    training, evaluation and serving (which hands its feature arrays over without a frame).
    Missing scalar columns become 0, missing timestamps None; widths default to the longest
    list."""
    width_long = max_long or int(long_lengths.max(initial=0))
    width_short = max_short or int(short_lengths.max(initial=0))
    if long_lengths.max(initial=0) > width_long or short_lengths.max(initial=0) > width_short:
        raise DataValidationError(
            f"examples: history longer than the padded width ({width_long}/{width_short})"
        )

    def scalar(values: np.ndarray | None) -> Tensor:
        if values is None:
            return torch.zeros(rows, dtype=torch.int64)
        return torch.from_numpy(np.asarray(values).astype(np.int64))

    def padded(values: np.ndarray | None, lengths: np.ndarray, width: int) -> Tensor | None:
        if values is None:
            return None
        return torch.from_numpy(_padded(values, lengths, width, np.int64))

    return ExampleArrays(
        user=scalar(user),
        long_items=torch.from_numpy(_padded(long_items, long_lengths, width_long, np.int64)),
        long_tau=torch.from_numpy(_padded(long_tau, long_lengths, width_long, np.float32)),
        short_items=torch.from_numpy(_padded(short_items, short_lengths, width_short, np.int64)),
        user_category=scalar(user_category),
        target=scalar(target),
        history_end=scalar(history_end),
        ref_time=scalar(ref_time),
        long_time=padded(long_time, long_lengths, width_long),
        short_time=padded(short_time, short_lengths, width_short),
        target_pos=scalar(target_pos),
    )


@dataclass
class UserHistory:
    """Every user's events in order, indexed for "had the user seen item i before position p".

    `pair_keys` holds `user * n_items + item` once per (user, item) pair, sorted, and
    `first_pos` the position of that pair's first event: item i is in the user's first p events
    iff its pair exists and `first_pos < p`. Memory is O(events), whatever the split.
    """

    user_start: Tensor  # (n_users + 1,) offsets of each user's events in `items`
    items: Tensor  # (n_events,) item of every event, by user then pos
    pair_keys: Tensor  # (n_pairs,) sorted
    first_pos: Tensor  # (n_pairs,)
    n_items: int
    times: Tensor | None = None  # (n_events,) int64 unix seconds of every event

    @classmethod
    def from_events(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        n_users: int,
        n_items: int,
        times: np.ndarray | None = None,
    ) -> UserHistory:
        """From event columns sorted by user and pos (as events.parquet is)."""
        user_start = np.searchsorted(users, np.arange(n_users + 1)).astype(np.int64)
        pos = np.arange(users.size, dtype=np.int64) - user_start[users]
        keys, first = np.unique(users * n_items + items, return_index=True)
        return cls(
            torch.from_numpy(user_start),
            torch.from_numpy(items.astype(np.int64)),
            torch.from_numpy(keys.astype(np.int64)),
            torch.from_numpy(pos[first]),
            n_items,
            None if times is None else torch.from_numpy(times.astype(np.int64)),
        )

    def seen_before(self, users: Tensor, items: Tensor, ends: Tensor) -> Tensor:
        """Elementwise (broadcast): did `users` have `items` among their first `ends` events?"""
        if self.pair_keys.numel() == 0:
            return torch.zeros(torch.broadcast_shapes(users.shape, items.shape), dtype=torch.bool)
        keys = users * self.n_items + items
        at = torch.searchsorted(self.pair_keys, keys).clamp_(max=self.pair_keys.numel() - 1)
        return (self.pair_keys[at] == keys) & (self.first_pos[at] < ends)

    def prefixes(self, users: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
        """(row, item) for the first `ends[r]` events of `users[r]`, every row r."""
        rows = torch.repeat_interleave(torch.arange(users.numel()), ends)
        offsets = torch.arange(rows.numel()) - torch.repeat_interleave(ends.cumsum(0) - ends, ends)
        return rows, self.items[self.user_start[users][rows] + offsets]


@dataclass
class Split:
    """One split's examples plus what each example's user had seen before it.

    An example's history ("seen" items, excluded from ranking and from negative sampling) is
    the user's events with `pos < history_end` plus its short-term items. Datasets loaded from
    disk answer that from the shared per-user index `history`; a split built by hand may give
    `keys` instead: sorted unique `row * n_items + item` of every seen pair.
    """

    name: str
    arrays: ExampleArrays
    keys: Tensor | None  # (nnz,) int64 sorted, when `history` is None
    n_items: int
    history: UserHistory | None = None
    # (n,) one negative per example drawn once by `tlsan prepare --protocol reference` (the
    # reference code's fixed negatives); None everywhere else
    fixed_negatives: Tensor | None = None

    def __len__(self) -> int:
        return len(self.arrays)

    def seen_mask(self, rows: Tensor, items: Tensor) -> Tensor:
        """(B, C) bool: was `items[b, c]` in the history of example `rows[b]`?"""
        if self.history is None:
            keys_all = self.keys if self.keys is not None else torch.zeros(0, dtype=torch.int64)
            if keys_all.numel() == 0:
                return torch.zeros(items.shape, dtype=torch.bool)
            keys = rows.unsqueeze(1) * self.n_items + items
            pos = torch.searchsorted(keys_all, keys).clamp_(max=keys_all.numel() - 1)
            return keys_all[pos] == keys
        users = self.arrays.user[rows].unsqueeze(1)
        ends = self.arrays.history_end[rows].unsqueeze(1)
        seen = self.history.seen_before(users, items, ends)
        short = self.arrays.short_items[rows].unsqueeze(1)  # (B, 1, S)
        in_short = ((items.unsqueeze(-1) == short) & (short > 0)).any(-1)
        return seen | in_short

    def seen_pairs(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(row - start, item) pairs (unique) of the seen sets of the rows [start, stop)."""
        if self.history is None:
            keys_all = self.keys if self.keys is not None else torch.zeros(0, dtype=torch.int64)
            lo = int(torch.searchsorted(keys_all, torch.tensor(start * self.n_items)))
            hi = int(torch.searchsorted(keys_all, torch.tensor(stop * self.n_items)))
            keys = keys_all[lo:hi]
            return keys // self.n_items - start, keys % self.n_items
        rows = torch.arange(start, stop)
        r_hist, i_hist = self.history.prefixes(
            self.arrays.user[rows], self.arrays.history_end[rows]
        )
        short = self.arrays.short_items[rows]
        r_short, col = (short > 0).nonzero(as_tuple=True)
        keys = torch.cat([r_hist, r_short]) * self.n_items + torch.cat(
            [i_hist, short[r_short, col]]
        )
        keys = torch.unique(keys)  # sorted
        return keys // self.n_items, keys % self.n_items

    @property
    def seen_keys(self) -> Tensor:
        """All seen pairs as sorted `row * n_items + item` (materialised on demand)."""
        if self.history is None:
            return self.keys if self.keys is not None else torch.zeros(0, dtype=torch.int64)
        rows, items = self.seen_pairs(0, len(self))
        return rows * self.n_items + items

    def sample_negatives(
        self, rows: Tensor, count: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, count) uniform items outside each example's history and != its target.

        Rejected draws are redrawn (vectorised); after MAX_REJECTION_ROUNDS rounds any left
        (a user who has seen almost the whole catalog) are kept as they are.
        """
        shape = (rows.shape[0], count)
        neg = torch.randint(1, self.n_items, shape, generator=generator)
        target = self.arrays.target[rows].unsqueeze(1)
        for _ in range(MAX_REJECTION_ROUNDS):
            bad = self.seen_mask(rows, neg) | (neg == target)
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            neg[bad] = torch.randint(1, self.n_items, (n_bad,), generator=generator)
        return neg

    def paper_negatives(self, seed: int = 0) -> Tensor:
        """One seeded negative per example (the paper's AUC protocol), fixed for a seed; the
        dataset's own fixed negatives under the reference protocol."""
        if self.fixed_negatives is not None:
            return self.fixed_negatives
        generator = torch.Generator().manual_seed(seed)
        return self.sample_negatives(torch.arange(len(self)), 1, generator).squeeze(1)

    def batches(
        self,
        batch_size: int,
        *,
        negatives: int = 0,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        rows: Tensor | None = None,
    ) -> Iterator[Batch]:
        """Batches over `rows` (default: all), shuffled with `generator`, with negatives."""
        rows = torch.arange(len(self)) if rows is None else rows.to(torch.int64)
        if shuffle:
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
        for chunk in rows.split(batch_size):
            neg = self.sample_negatives(chunk, negatives, generator) if negatives else None
            if neg is not None and self.fixed_negatives is not None:
                neg[:, 0] = self.fixed_negatives[chunk]  # the reference protocol's pair
            yield self.arrays.batch(chunk, neg)


@dataclass
class Dataset:
    """A prepared dataset dir: vocabulary sizes, item categories, splits, manifest."""

    path: Path
    manifest: dict[str, Any]
    sizes: VocabSizes
    item_category: Tensor  # (n_items,) int64, 0 for padding
    splits: dict[str, Split]

    @property
    def dataset_hash(self) -> str:
        return str(self.manifest.get("dataset_hash", ""))

    @property
    def train(self) -> Split:
        return self.split("train")

    @property
    def valid(self) -> Split:
        return self.split("valid")

    @property
    def test(self) -> Split:
        return self.split("test")

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataValidationError(
                f"{self.path}: split {name!r} not loaded (loaded: {', '.join(self.splits)})"
            )
        return self.splits[name]

    def events(self) -> pl.DataFrame:
        """The cleaned event log (for popularity)."""
        return pl.read_parquet(self.path / "events.parquet")

    def subset(self, split: str, rows: Tensor) -> Split:
        """A split restricted to `rows` (unique; e.g. one federated client's examples)."""
        full = self.split(split)
        rows = rows.to(torch.int64)
        arrays = full.arrays.take(rows)
        fixed = None if full.fixed_negatives is None else full.fixed_negatives[rows]
        if full.history is not None:
            return replace(full, arrays=arrays, fixed_negatives=fixed)
        new_index = torch.full((len(full),), -1, dtype=torch.int64)
        new_index[rows] = torch.arange(rows.numel())
        old = full.seen_keys
        kept = old[new_index[old // full.n_items] >= 0]
        new_keys = new_index[kept // full.n_items] * full.n_items + kept % full.n_items
        return replace(full, arrays=arrays, keys=torch.sort(new_keys).values, fixed_negatives=fixed)


def _pad_left(tensor: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0))


def concat_splits(name: str, parts: list[Split]) -> Split:
    """One split holding the examples of `parts` in order (e.g. train + valid for a refit)."""
    if not parts:
        raise ValueError("concat_splits needs at least one split")
    n_items = parts[0].n_items
    widths = {
        key: max(getattr(p.arrays, key.replace("time", "items")).shape[1] for p in parts)
        for key in ("long_items", "long_tau", "short_items", "long_time", "short_time")
    }
    columns: dict[str, Tensor | None] = {}
    for f in fields(ExampleArrays):
        values = [getattr(p.arrays, f.name) for p in parts]
        if any(v is None for v in values):  # a part without timestamps: none in the result
            columns[f.name] = None
            continue
        if f.name in widths:
            values = [_pad_left(v, widths[f.name]) for v in values]
        columns[f.name] = torch.cat(values)
    arrays = ExampleArrays(**columns)
    history = parts[0].history
    if history is not None and all(p.history is history for p in parts):
        return Split(name, arrays, None, n_items, history)
    keys, offset = [], 0
    for part in parts:
        keys.append(part.seen_keys + offset * n_items)
        offset += len(part)
    return Split(name, arrays, torch.cat(keys), n_items)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise DataValidationError(f"{path}: not a directory; expected a prepared dataset dir")
    if not manifest_path.is_file():
        raise DataValidationError(
            f"{path}: no manifest.json; expected a dataset dir written by `tlsan prepare`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataValidationError(f"{manifest_path}: not valid JSON ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataValidationError(
            f"{manifest_path}: dataset format_version {version!r}, expected {FORMAT_VERSION} "
            "(examples now carry long_time, short_time and target_pos); re-run `tlsan prepare` "
            "to rebuild it"
        )
    sizes = manifest.get("vocab_sizes")
    if not isinstance(sizes, dict) or not {"users", "items", "categories"} <= set(sizes):
        raise DataValidationError(
            f"{manifest_path}: expected 'vocab_sizes' with users, items and categories"
        )
    return manifest


def _read_parquet(path: Path, what: str, columns: dict[str, Any]) -> pl.DataFrame:
    if not path.is_file():
        raise DataValidationError(f"{path}: missing; expected {what} of a prepared dataset")
    try:
        frame = pl.read_parquet(path, columns=list(columns))
    except Exception as exc:  # polars raises several types for bad files and missing columns
        raise DataValidationError(
            f"{path}: cannot read {what} with columns {', '.join(columns)} ({exc})"
        ) from exc
    for name, dtype in columns.items():
        if frame.schema[name] != dtype:
            raise DataValidationError(
                f"{path}: column {name!r} has type {frame.schema[name]}, expected {dtype}"
            )
    return frame


def _item_categories(path: Path, n_items: int) -> Tensor:
    items = _read_parquet(
        path / "vocab" / "items.parquet",
        "the item vocabulary",
        {"index": pl.Int32, "category": pl.Int32},
    )
    index = items.get_column("index").to_numpy().astype(np.int64)
    if index.size and (index.min() < 1 or index.max() >= n_items):
        raise DataValidationError(
            f"{path / 'vocab' / 'items.parquet'}: item index out of range 1..{n_items - 1}"
        )
    table = np.zeros(n_items, dtype=np.int64)
    table[index] = items.get_column("category").to_numpy()
    return torch.from_numpy(table)


def load_dataset(path: Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """Load a prepared dataset dir; anything that does not fit the contract raises
    `DataValidationError` naming the file and what was expected."""
    path = Path(path)
    manifest = _read_manifest(path)
    sizes = VocabSizes.from_dict(manifest["vocab_sizes"])
    item_category = _item_categories(path, sizes.items)
    events = _read_parquet(
        path / "events.parquet",
        "the event log",
        {"user": pl.Int32, "item": pl.Int32, "pos": pl.Int32, "timestamp": pl.Int64},
    )
    ev_user = events.get_column("user").to_numpy().astype(np.int64)
    ev_pos = events.get_column("pos").to_numpy()
    if ev_user.size and (np.any(np.diff(ev_user) < 0) or ev_user.max() >= sizes.users):
        raise DataValidationError(
            f"{path / 'events.parquet'}: expected rows sorted by user with indices < {sizes.users}"
        )
    user_start = np.searchsorted(ev_user, np.arange(sizes.users)).astype(np.int64)
    if ev_user.size and np.any(ev_pos != np.arange(ev_user.size) - user_start[ev_user]):
        raise DataValidationError(
            f"{path / 'events.parquet'}: expected 'pos' to count 0, 1, ... within each user"
        )
    user_items = events.get_column("item").to_numpy().astype(np.int64)
    history = UserHistory.from_events(
        ev_user,
        user_items,
        sizes.users,
        sizes.items,
        events.get_column("timestamp").to_numpy(),
    )
    max_lengths = manifest.get("max_lengths", {})
    loaded: dict[str, Split] = {}
    for name in splits:
        file = path / "examples" / f"{name}.parquet"
        frame = _read_parquet(file, f"the {name} examples", EXAMPLE_SCHEMA)
        arrays = arrays_from_frame(
            frame,
            max_long=int(max_lengths.get("long", 0)) or None,
            max_short=int(max_lengths.get("short", 0)) or None,
        )
        _check_ranges(file, arrays, sizes, user_start, user_items)
        fixed = _fixed_negatives(file, sizes) if manifest.get("leaky") else None
        loaded[name] = Split(name, arrays, None, sizes.items, history, fixed)
    return Dataset(path, manifest, sizes, item_category, loaded)


def _fixed_negatives(file: Path, sizes: VocabSizes) -> Tensor | None:
    """The `negative` column of a `--protocol reference` dataset (None where a split has no
    rows, as its validation split)."""
    frame = _read_parquet(file, "the reference protocol's fixed negatives", {"negative": pl.Int32})
    if frame.height == 0:
        return None
    values = torch.from_numpy(frame.get_column("negative").to_numpy().astype(np.int64))
    if int(values.min()) < 1 or int(values.max()) >= sizes.items:
        raise DataValidationError(
            f"{file}: column 'negative' has indices outside 1..{sizes.items - 1}"
        )
    return values


def _check_ranges(
    file: Path, arrays: ExampleArrays, sizes: VocabSizes, user_start: np.ndarray, items: np.ndarray
) -> None:
    """Indices inside the vocabularies, histories inside the event log, and every target at
    its `target_pos` there."""
    n_events = items.size
    checks = (
        ("user", arrays.user, sizes.users),
        ("target", arrays.target, sizes.items),
        ("long_items", arrays.long_items, sizes.items),
        ("short_items", arrays.short_items, sizes.items),
        ("user_category", arrays.user_category, sizes.categories),
    )
    for name, values, size in checks:
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
            raise DataValidationError(
                f"{file}: column {name!r} has indices outside 0..{size - 1} (manifest vocab_sizes)"
            )
    if len(arrays):
        users = arrays.user.numpy()
        available = np.append(user_start[1:], n_events)[users] - user_start[users]
        if np.any(arrays.history_end.numpy() > available) or int(arrays.history_end.min()) < 0:
            raise DataValidationError(
                f"{file}: column 'history_end' points past the user's events in events.parquet"
            )
        assert arrays.target_pos is not None
        target_pos = arrays.target_pos.numpy()
        inside = (target_pos >= 0) & (target_pos < available)
        at = user_start[users] + np.where(inside, target_pos, 0)
        if not inside.all() or np.any(items[np.minimum(at, n_events - 1)] != arrays.target.numpy()):
            raise DataValidationError(
                f"{file}: column 'target_pos' does not point at each example's target in "
                "events.parquet"
            )
