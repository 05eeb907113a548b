"""Synthetic e-commerce interaction logs with the structure TLSAN is meant to learn.

Real logs are expensive to share and too small for load tests, so this module writes logs of
any size that behave like them: Zipf-like item popularity inside `K` categories of skewed size;
per-user favourite categories (Dirichlet weights) that drift as the user ages; bursty visits
(heavy-tailed gaps of hours to weeks between sessions, seconds to minutes inside one);
re-interactions with recent items; a sequential signal (the next item is often a fixed
"successor" of the previous one, or from its category), so that a sequence model beats
popularity; heavy-tailed events per user with exactly `events` rows in total.

Generation streams over chunks of users (about `chunk_events` events each), vectorised with
numpy inside a chunk (loops run per chunk and per dependency round, never per event), so memory
stays bounded by the chunk size plus O(users + items) for the per-user counts and the catalog.

Row order imitates an unsorted log without a global shuffle (which would need every row in
memory): users are assigned to chunks in random order, each chunk is shuffled, and a shuffle
buffer of half a chunk mixes it with rows carried over from earlier chunks before writing. Rows
of one user therefore spread over neighbouring output blocks, not over the whole file.

Everything is seeded: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.atomic import atomic_directory, check_output
from pipelines.errors import DataValidationError

OutputFormat = Literal["csv", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "parquet")
GENERATOR_VERSION = 1
DAY = 86_400
DEFAULT_START = "2015-01-01"
DEFAULT_DAYS = 365
DEFAULT_CHUNK_EVENTS = 1 << 20
MIN_EVENTS_PER_USER = 3

# Event kinds: how an event's item is chosen.
_REPEAT, _SUCCESSOR, _SAME_CATEGORY, _FRESH = 0, 1, 2, 3

INTERACTION_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
)


@dataclass(frozen=True)
class Behaviour:
    """The knobs of the user model; the defaults give Amazon-like logs.

    Kind probabilities are (repeat, successor, same category); the rest is a fresh item drawn
    from the user's current favourite categories. Inside a session the sequential kinds
    dominate; the first event of a session leans on the user's tastes instead.
    """

    item_zipf: float = 1.1  # popularity ~ 1 / local rank**item_zipf within a category
    category_zipf: float = 0.8  # category sizes ~ 1 / rank**category_zipf
    activity_sigma: float = 1.2  # log-normal sigma of events per user (heavy tail)
    favourites: int = 3  # active favourite categories per user
    dirichlet_alpha: float = 0.7  # concentration of the favourite weights
    drift_steps: int = 4  # how many times the favourite set can change
    drift_days: float = 90.0  # median days between two changes of the favourite set
    explore: float = 0.1  # fresh items from a random (popularity-weighted) category
    session_start_prob: tuple[float, float] = (0.2, 0.55)  # per-user range, P(new session)
    short_gap_prob: float = 0.35  # share of return gaps that are short (same-day visits)
    short_gap_hours: float = 3.0  # median short return gap
    long_gap_days: float = 3.0  # median of the users' typical long return gap
    long_gap_sigma: float = 1.3
    within_gap_seconds: float = 60.0  # median gap between events of one session
    within_gap_sigma: float = 1.0
    in_session_kinds: tuple[float, float, float] = (0.08, 0.35, 0.37)
    session_start_kinds: tuple[float, float, float] = (0.15, 0.10, 0.15)
    repeat_lag_prob: float = 0.5  # geometric lag (in events) of a repeat
    successor_same_category: float = 0.7  # successors from the item's own category

    def __post_init__(self) -> None:
        probs = {
            "explore": self.explore,
            "short_gap_prob": self.short_gap_prob,
            "successor_same_category": self.successor_same_category,
            "repeat_lag_prob": self.repeat_lag_prob,
            **{f"session_start_prob[{i}]": p for i, p in enumerate(self.session_start_prob)},
        }
        for name, kinds in (
            ("in_session_kinds", self.in_session_kinds),
            ("session_start_kinds", self.session_start_kinds),
        ):
            if len(kinds) != 3 or sum(kinds) > 1.0 or min(kinds) < 0.0:
                raise DataValidationError(
                    f"behaviour.{name}: expected 3 probabilities summing to at most 1, got {kinds}"
                )
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise DataValidationError(f"behaviour.{name}: expected a probability, got {p}")
        lo, hi = self.session_start_prob
        if not 0.0 < lo <= hi:
            raise DataValidationError(
                f"behaviour.session_start_prob: expected 0 < low <= high, got {(lo, hi)}"
            )
        if self.favourites < 1 or self.drift_steps < 0:
            raise DataValidationError(
                "behaviour.favourites / drift_steps: expected >= 1 and >= 0, got "
                f"{self.favourites} and {self.drift_steps}"
            )


@dataclass(frozen=True)
class GeneratorParams:
    """The resolved parameters of one run (written to `generator.json`)."""

    users: int
    items: int
    events: int
    categories: int
    seed: int
    format: OutputFormat
    start: int  # unix seconds of the window's start
    days: int
    chunk_events: int
    behaviour: Behaviour = field(default_factory=Behaviour)


@dataclass(frozen=True)
class GeneratorSummary:
    """What `generate_log` wrote, and how fast."""

    path: Path
    interactions: Path
    items_file: Path
    params: GeneratorParams
    chunks: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.params.events / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------- validation


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataValidationError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def parse_start(value: str | int | datetime) -> int:
    """Unix seconds from an ISO-8601 date/time (UTC unless it says otherwise) or an integer."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        seconds = int(value)
        if seconds < 0:
            raise DataValidationError(f"start: expected a time at or after 1970-01-01, got {value}")
        return seconds
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise DataValidationError(
                f"start: expected an ISO-8601 date such as 2015-01-01, got {value!r}"
            ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    seconds = int(parsed.timestamp())
    if seconds < 0:
        raise DataValidationError(f"start: expected a time at or after 1970-01-01, got {value!r}")
    return seconds


def resolve_params(
    *,
    users: int,
    items: int,
    events: int,
    seed: int = 0,
    fmt: str = "parquet",
    categories: int | None = None,
    start: str | int | datetime = DEFAULT_START,
    days: int = DEFAULT_DAYS,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    behaviour: Behaviour | None = None,
) -> GeneratorParams:
    """Check every argument (the error names the parameter) and fill in the defaults."""
    users = _positive_int("users", users)
    items = _positive_int("items", items)
    events = _positive_int("events", events)
    days = _positive_int("days", days)
    chunk_events = _positive_int("chunk_events", chunk_events)
    if events < users:
        raise DataValidationError(
            f"events: expected at least one event per user (events >= users = {users:,}), "
            f"got {events:,}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataValidationError(f"seed: expected a non-negative integer, got {seed!r}")
    if fmt not in FORMATS:
        raise DataValidationError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if categories is None:
        categories = min(items, max(5, items // 50))
    categories = _positive_int("categories", categories)
    if categories > items:
        raise DataValidationError(
            f"categories: expected at most one category per item (<= items = {items:,}), "
            f"got {categories:,}"
        )
    start_s = parse_start(start)
    if start_s + days * DAY > 2**62:
        raise DataValidationError(f"start/days: the window ends too far in the future ({days} d)")
    return GeneratorParams(
        users=users,
        items=items,
        events=events,
        categories=categories,
        seed=int(seed),
        format=fmt,  # type: ignore[arg-type]
        start=start_s,
        days=days,
        chunk_events=chunk_events,
        behaviour=behaviour or Behaviour(),
    )


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Catalog:
    """Items, their categories and popularity, laid out for O(1) vectorised sampling.

    Items are stored grouped by category (`by_category`, slice `[start[c], start[c] + size[c])`
    for category `c`) in popularity order. Within a category the item of local rank `j` has
    popularity ~ 1 / (j + 1.5)**zipf (a continuous Zipf law, sampled by its closed-form
    inverse CDF instead of a binary search: several times faster per event); a category's
    share of demand is proportional to its size. Local ranks are assigned to random item ids.
    """

    category_of: np.ndarray  # (M,) int32 category of each item index
    by_category: np.ndarray  # (M,) int32 item indices grouped by category, popular first
    start: np.ndarray  # (K,) int64 first position of each category in by_category
    size: np.ndarray  # (K,) int64 items per category
    cum_category: np.ndarray  # (K,) float64 cumulative category popularity
    zipf: float
    successor: np.ndarray  # (M,) int32 the item that tends to follow each item

    def local_rank(self, size: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Zipf-distributed ranks in `[0, size)`: inverse CDF of x**-zipf on [1, size + 1)."""
        top = size + 1.0
        if abs(self.zipf - 1.0) < 1e-9:
            x = np.exp(u * np.log(top))
        else:
            e = 1.0 - self.zipf
            x = (1.0 + u * (top**e - 1.0)) ** (1.0 / e)
        return np.minimum(x.astype(np.int64) - 1, size - 1)

    def draw_in(self, cats: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One popularity-weighted item of each category in `cats` (uniforms `u`)."""
        return self.by_category[self.start[cats] + self.local_rank(self.size[cats], u)]

    def draw_categories(self, u: np.ndarray) -> np.ndarray:
        """Categories weighted by their popularity."""
        cats = np.searchsorted(self.cum_category, u * self.cum_category[-1], side="right")
        return np.minimum(cats, len(self.cum_category) - 1).astype(np.int32)

    def draw_any(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Popularity-weighted items from the whole catalog (uniforms `u`, `v`)."""
        return self.draw_in(self.draw_categories(u), v)


def build_catalog(params: GeneratorParams) -> Catalog:
    """Categories of skewed size (each non-empty), Zipf popularity, a successor per item."""
    b = params.behaviour
    m, k = params.items, params.categories
    rng = np.random.default_rng([params.seed, 0])
    size_weight = 1.0 / np.arange(1, k + 1) ** b.category_zipf
    extra = rng.choice(k, size=m - k, p=size_weight / size_weight.sum())
    category_of = np.concatenate([np.arange(k), extra]).astype(np.int32)
    rng.shuffle(category_of)
    by_category = np.lexsort((rng.random(m), category_of)).astype(np.int32)
    size = np.bincount(category_of, minlength=k).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    catalog = Catalog(
        category_of=category_of,
        by_category=by_category,
        start=start,
        size=size,
        cum_category=np.cumsum(size.astype(np.float64)),
        zipf=b.item_zipf,
        successor=np.zeros(m, dtype=np.int32),
    )
    same = rng.random(m) < b.successor_same_category
    successor = np.where(
        same,
        catalog.draw_in(category_of, rng.random(m)),
        catalog.draw_any(rng.random(m), rng.random(m)),
    ).astype(np.int32)
    # An item is never its own successor (that would be a repeat): redraw, then take a neighbour.
    for _ in range(3):
        selfish = np.flatnonzero(successor == np.arange(m))
        successor[selfish] = catalog.draw_any(rng.random(len(selfish)), rng.random(len(selfish)))
    selfish = successor == np.arange(m)
    successor[selfish] = (successor[selfish] + 1) % m
    return replace(catalog, successor=successor)


# --------------------------------------------------------------------------- users


def events_per_user(params: GeneratorParams) -> np.ndarray:
    """Heavy-tailed (log-normal) events per user summing to exactly `events`.

    Every user first gets `min(3, events // users)` events; the rest is spread by a
    multinomial over log-normal activity weights.
    """
    rng = np.random.default_rng([params.seed, 1])
    base = min(MIN_EVENTS_PER_USER, params.events // params.users)
    rest = params.events - base * params.users
    weight = rng.lognormal(0.0, params.behaviour.activity_sigma, params.users)
    counts = rng.multinomial(rest, weight / weight.sum()) if rest else np.zeros(params.users)
    counts = counts.astype(np.int64) + base
    assert int(counts.sum()) == params.events
    return counts


def chunk_bounds(counts: np.ndarray, chunk_events: int) -> np.ndarray:
    """User-index boundaries of chunks holding about `chunk_events` events each."""
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(chunk_events, int(ends[-1]), chunk_events), "left")
    bounds = np.unique(np.concatenate([[0], cuts + 1, [len(counts)]]))
    return bounds[bounds <= len(counts)]


# --------------------------------------------------------------------------- one chunk


def _session_times(
    rng: np.random.Generator,
    b: Behaviour,
    window: int,
    user: np.ndarray,
    first: np.ndarray,
    new_session: np.ndarray,
) -> np.ndarray:
    """Seconds since the window start of every event (non-decreasing within each user).

    Sessions are laid out by return gaps (a mix of same-day visits and heavy-tailed absences
    around a per-user typical gap), squeezed when a user's life would not fit the window;
    events inside a session follow each other by log-normal gaps of seconds to minutes.
    """
    n_users = len(first) - 1
    starts = np.flatnonzero(new_session)
    session = np.cumsum(new_session) - 1
    session_user = user[starts]
    user_first, user_last = session[first[:-1]], session[first[1:] - 1]
    returns = np.ones(len(starts), dtype=bool)
    returns[user_first] = False
    returns = np.flatnonzero(returns)
    typical = np.exp(rng.normal(math.log(b.long_gap_days * DAY), 0.7, n_users))
    short = rng.random(len(returns)) < b.short_gap_prob
    gap = np.zeros(len(starts))
    gap[returns] = np.where(
        short,
        rng.lognormal(math.log(b.short_gap_hours * 3600), 0.8, len(returns)),
        rng.lognormal(0.0, b.long_gap_sigma, len(returns)) * typical[session_user[returns]],
    )
    at = np.cumsum(gap)
    at -= at[user_first][session_user]  # 0 at each user's first session
    squeeze = np.minimum(1.0, 0.9 * window / np.maximum(at[user_last], 1.0))
    at *= squeeze[session_user]
    within = np.exp(rng.standard_normal(len(user), dtype=np.float32) * b.within_gap_sigma)
    within *= b.within_gap_seconds
    within[starts] = 0.0
    inside = np.cumsum(within, dtype=np.float64)
    offset = (at - inside[starts])[session] + inside  # 0 at each user's first event
    life = offset[first[1:] - 1]
    user_start = rng.random(n_users) * np.maximum(window - life, 0.0)
    return offset + user_start[user]


def _resolve(
    rng: np.random.Generator,
    catalog: Catalog,
    item: np.ndarray,
    kind: np.ndarray,
    lag: np.ndarray,
    events: np.ndarray,
) -> np.ndarray:
    """Fill in the items of `events` whose source item is known; return the others."""
    k = kind[events]
    source = item[events - lag[events]]
    ready = source >= 0
    events, k, value = events[ready], k[ready], source[ready]
    succ = k == _SUCCESSOR
    value[succ] = catalog.successor[value[succ]]
    same = np.flatnonzero(k == _SAME_CATEGORY)
    value[same] = catalog.draw_in(catalog.category_of[value[same]], rng.random(len(same)))
    item[events] = value
    return np.flatnonzero(~ready)


def generate_chunk(
    rng: np.random.Generator, counts: np.ndarray, catalog: Catalog, params: GeneratorParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The events of one chunk of users, user by user in time order.

    Returns `(user, item, time)`: chunk-local user index (int32), item index (int32) and
    seconds since the window start (int64).
    """
    b = params.behaviour
    n_users, n = len(counts), int(counts.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    first = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    is_first = np.zeros(n, dtype=bool)
    is_first[first[:-1]] = True

    # Sessions: every event starts a new one with a per-user probability.
    p_new = rng.uniform(*b.session_start_prob, n_users)
    new_session = is_first | (rng.random(n) < p_new[user])
    window = params.days * DAY
    offset = _session_times(rng, b, window, user, first, new_session)
    seconds = np.minimum(offset.astype(np.int64), window - 1)

    # How each event picks its item: sequential kinds inside a session, tastes at its start.
    r = rng.random(n)
    cut_in = np.cumsum(b.in_session_kinds)
    cut_start = np.cumsum(b.session_start_kinds)
    kind = (r >= cut_in[0]).view(np.int8) + (r >= cut_in[1]) + (r >= cut_in[2])
    starts = np.flatnonzero(new_session)
    rs = r[starts]
    kind[starts] = (rs >= cut_start[0]).view(np.int8) + (rs >= cut_start[1]) + (rs >= cut_start[2])
    kind[is_first] = _FRESH

    # Fresh items: a favourite category of the user's current phase (drift with age).
    slots = b.favourites + b.drift_steps
    favourite = catalog.draw_categories(rng.random(n_users * slots))
    weights = np.cumsum(rng.dirichlet(np.full(b.favourites, b.dirichlet_alpha), n_users), 1)
    period = np.exp(rng.normal(math.log(b.drift_days * DAY), 0.5, n_users))
    phase = rng.random(n_users)
    fresh = np.flatnonzero(kind == _FRESH)
    fu = user[fresh]
    age = offset[fresh] - offset[first[:-1]][fu]
    slot = np.minimum(b.drift_steps, (age / period[fu] + phase[fu]).astype(np.int64))
    pick = rng.random(len(fresh))
    for column in range(b.favourites - 1):
        slot += pick > weights[:, column][fu]
    category = favourite[fu.astype(np.int64) * slots + slot]
    explore = np.flatnonzero(rng.random(len(fresh)) < b.explore)
    category[explore] = catalog.draw_categories(rng.random(len(explore)))
    item = np.full(n, -1, dtype=np.int32)
    item[fresh] = catalog.draw_in(category, rng.random(len(fresh)))

    # Dependent items copy (repeat), follow (successor) or stay near (same category) a source
    # event. They resolve in rounds of chain depth: round d holds the events d steps after
    # the last fresh one, whose previous event resolved in round d - 1. The few repeats
    # reaching behind a deeper unresolved event wait for a final catch-up loop.
    lag = np.ones(n, dtype=np.int64)
    repeat = np.flatnonzero(kind == _REPEAT)
    lag[repeat] = np.minimum(
        rng.geometric(b.repeat_lag_prob, len(repeat)), repeat - first[:-1][user[repeat]]
    )
    waiting: list[np.ndarray] = []
    layer = fresh
    while True:
        layer = layer[layer < n - 1] + 1
        layer = layer[kind[layer] != _FRESH]
        if not len(layer):
            break
        left = _resolve(rng, catalog, item, kind, lag, layer)
        waiting.append(layer[left])
    pending = np.sort(np.concatenate(waiting)) if waiting else np.zeros(0, dtype=np.int64)
    while len(pending):
        left = _resolve(rng, catalog, item, kind, lag, pending)
        if len(left) == len(pending):  # a chain always ends in a fresh item
            raise AssertionError("unresolvable item dependencies")
        pending = pending[left]
    return user, item, seconds


# --------------------------------------------------------------------------- writing


class _Sink:
    """Appends blocks of rows to the interactions file (Parquet row groups or CSV chunks)."""

    def __init__(self, path: Path, fmt: OutputFormat) -> None:
        self.path, self.fmt = path, fmt
        self._parquet: pq.ParquetWriter | None = None
        self._csv = None
        if fmt == "parquet":
            self._parquet = pq.ParquetWriter(
                path, INTERACTION_SCHEMA, compression="zstd", use_dictionary=["user_id", "item_id"]
            )
        else:
            self._csv = path.open("wb")
            self._header = True

    def write(self, columns: dict[str, np.ndarray]) -> None:
        if self._parquet is not None:
            arrays = [pa.array(columns[name]) for name in INTERACTION_SCHEMA.names]
            self._parquet.write_table(pa.Table.from_arrays(arrays, schema=INTERACTION_SCHEMA))
        else:
            pl.DataFrame(columns).write_csv(self._csv, include_header=self._header)
            self._header = False

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()


def _write_items(path: Path, fmt: OutputFormat, catalog: Catalog) -> None:
    frame = pl.DataFrame(
        {
            "item_id": np.arange(1, len(catalog.category_of) + 1, dtype=np.int64),
            "category": pl.Series(catalog.category_of + 1).cast(pl.String),
        }
    ).with_columns(category=pl.lit("c") + pl.col("category"))
    if fmt == "parquet":
        frame.write_parquet(path, compression="zstd", statistics=False)
    else:
        frame.write_csv(path)


def _blocks(
    params: GeneratorParams, catalog: Catalog, counts: np.ndarray, bounds: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled output blocks: a shuffle buffer of half a chunk carries random rows of each
    chunk over into the blocks of the next ones (each row stays on with probability ~1/3)."""
    user_ids = np.random.default_rng([params.seed, 2]).permutation(params.users) + 1
    mixer = np.random.default_rng([params.seed, 3])
    carry: dict[str, np.ndarray] | None = None
    for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rng = np.random.default_rng([params.seed, 4, index])
        user, item, seconds = generate_chunk(rng, counts[lo:hi], catalog, params)
        block = {
            "user_id": user_ids[lo:hi][user].astype(np.int64),
            "item_id": item.astype(np.int64) + 1,
            "timestamp": seconds + params.start,
        }
        if carry is not None:
            block = {name: np.concatenate([carry[name], block[name]]) for name in block}
        order = mixer.permutation(len(block["user_id"]))
        emit = max(0, len(order) - params.chunk_events // 2)
        if emit:
            yield {name: col[order[:emit]] for name, col in block.items()}
        carry = {name: col[order[emit:]] for name, col in block.items()}
    if carry is not None and len(carry["user_id"]):
        yield carry


def generate_log(
    out_dir: Path,
    *,
    users: int,
    items: int,
    events: int,
    seed: int = 0,
    fmt: str = "parquet",
    categories: int | None = None,
    start: str | int | datetime = DEFAULT_START,
    days: int = DEFAULT_DAYS,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    behaviour: Behaviour | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> GeneratorSummary:
    """Write `interactions.<fmt>`, `items.<fmt>` and `generator.json` into `out_dir`.

    `out_dir` appears complete or not at all (built beside it, then renamed); an existing
    non-empty `out_dir` is refused unless `overwrite`.
    """
    began = time.perf_counter()
    params = resolve_params(
        users=users,
        items=items,
        events=events,
        seed=seed,
        fmt=fmt,
        categories=categories,
        start=start,
        days=days,
        chunk_events=chunk_events,
        behaviour=behaviour,
    )
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite=overwrite)
    catalog = build_catalog(params)
    counts = events_per_user(params)
    bounds = chunk_bounds(counts, params.chunk_events)
    interactions = out_dir / f"interactions.{params.format}"
    items_file = out_dir / f"items.{params.format}"
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_items(tmp / items_file.name, params.format, catalog)
        sink = _Sink(tmp / interactions.name, params.format)
        bar = tqdm(
            total=params.events,
            unit="ev",
            unit_scale=True,
            desc="generate",
            disable=not progress,
            postfix={"chunks": len(bounds) - 1},
        )
        written = 0
        # One writer thread: Parquet encoding and compression (which release the GIL) of
        # block i overlap the generation of block i + 1; at most one block waits in memory.
        pending: Future[None] | None = None
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-writer") as pool:
                for block in _blocks(params, catalog, counts, bounds):
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(sink.write, block)
                    written += len(block["user_id"])
                    bar.update(len(block["user_id"]))
                if pending is not None:
                    pending.result()
        finally:
            sink.close()
            bar.close()
        if written != params.events:  # a bug, never bad input
            raise AssertionError(f"wrote {written} events, expected {params.events}")
        (tmp / "generator.json").write_text(json.dumps(describe(params), indent=2) + "\n")
    return GeneratorSummary(
        path=out_dir,
        interactions=interactions,
        items_file=items_file,
        params=params,
        chunks=len(bounds) - 1,
        seconds=time.perf_counter() - began,
    )


def describe(params: GeneratorParams) -> dict[str, Any]:
    """The JSON form of the resolved parameters (no timings: the file must be reproducible)."""
    data = asdict(params)
    data["start_iso"] = datetime.fromtimestamp(params.start, UTC).isoformat()
    data["generator_version"] = GENERATOR_VERSION
    data["files"] = {
        "interactions": f"interactions.{params.format}",
        "items": f"items.{params.format}",
    }
    data["columns"] = {
        "interactions": {"user_id": "int64", "item_id": "int64", "timestamp": "int64 unix s"},
        "items": {"item_id": "int64", "category": "string"},
    }
    return data
