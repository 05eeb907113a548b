"""Top-k retrieval for batches of user states: FAISS candidates, filters, exact re-scoring.

`Retriever.search` answers "the k best items for each query `[u_t ; 1]`" while honouring
per-query exclusions (items already seen) and category filters:

1. FAISS proposes the top-C rows, C = max(4k, k + |exclude|), and C >= 2k / share when a
   category filter keeps only `share` of the catalog.
2. Excluded and off-category rows are dropped; the rest are re-scored exactly with numpy
   (`x_i . u_t + b_i`): the approximate index proposes, it never decides the order.
3. A query left with fewer than k eligible candidates doubles C (IVF also doubles nprobe) and
   asks again, up to `max_widenings` times and `max_candidates` rows; then (at once for an
   exact index) it is scored exactly over its eligible subset. So a filter never returns
   fewer than k items while the catalog has k eligible ones.

Why so little widening, and why category filters needing more than `ann_depth` candidates go
straight to exact scoring (over contiguous per-category slices, see `category_index.py`):
graph indexes answer deep queries poorly. ip-HNSW finds 0.99 of the true top 10 but only
~0.55 of the top 240 on 50k clustered items, so a filtered query that must dig deep gets
eligible but mediocre items. Measured on 200k items, a 50%-share category filter: recall@10
0.82 when widening up to 2048 candidates, 0.98 with one widening then exact (the default);
a 8%-share filter: 0.49 through FAISS, 1.0 exact (benchmarks/retrieval.py).

Results are `(B, k)` arrays sorted by score desc, ties by item index asc; scores are float64
dot products rounded to float32, the same whichever path found the item. A query with fewer
than k eligible items gets its row padded with item -1 and score -inf (`unpad` gives plain
lists for JSON). Threads: FAISS parallelises over the queries of a batch with OpenMP; one
serving worker per core wants `faiss.omp_set_num_threads(1)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from serving.category_index import CategoryIndex, category_ids
from serving.faiss_index import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_FLAT_THRESHOLD,
    DEFAULT_HNSW_M,
    INDEX_KINDS,
    build_index,
    load_index,
    save_index,
)
from tlsan.errors import ConfigError, TlsanError

__all__ = [
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_ANN_DEPTH",
    "DEFAULT_FLAT_THRESHOLD",
    "DEFAULT_HNSW_M",
    "DEFAULT_MAX_CANDIDATES",
    "DEFAULT_MAX_WIDENINGS",
    "INDEX_KINDS",
    "Retriever",
    "RetrieverStats",
    "build_index",
    "load_index",
    "save_index",
    "unpad",
]

DEFAULT_MAX_CANDIDATES = 2048
DEFAULT_MAX_WIDENINGS = 1
DEFAULT_ANN_DEPTH = 128
_CHUNK = 32  # queries per exact matrix product: (n_items, 32) float32 scores at a time
_NO_ITEM = np.iinfo(np.int64).max  # sorts after every real item index (ties on -inf)
_NO_ROWS = np.empty(0, np.int64)
_ONE_QUERY = np.zeros(1, np.int64)


@dataclass
class RetrieverStats:
    """Cumulative counters: how often filters forced wider or exact searches."""

    queries: int = 0
    faiss_calls: int = 0
    widened: int = 0  # query rows whose first FAISS round left fewer than k eligible items
    exact: int = 0  # query rows scored exactly over their eligible subset


@dataclass
class _Plan:
    """Per query: excluded rows, allowed categories, eligible count, first C."""

    exclude: list[np.ndarray]
    allowed: list[np.ndarray | None]
    want: np.ndarray  # min(k, eligible items)
    candidates: np.ndarray  # C of the first FAISS round
    pending: list[int]  # rows that go to FAISS
    exact: list[int]  # rows scored exactly right away


def unpad(item_idx: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per query, the `(item index, score)` pairs without the `-1` / `-inf` padding."""
    return [
        [(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
        for row_i, row_s in zip(item_idx, scores, strict=True)
    ]


def _top_k(items: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score desc, item index asc) of 1-D `items`/`scores`, fewer if there are fewer."""
    if items.size > k:
        part = np.argpartition(-scores, k - 1)[:k]
        keep = np.flatnonzero(scores >= scores[part].min())  # every item tied at the k-th score
        items, scores = items[keep], scores[keep]
    order = np.lexsort((items, -scores))[:k]
    return items[order], scores[order]


def _sorted_contains(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`np.isin(values, sorted_keys)` for an ascending key array, by binary search: a few
    vectorised calls where `isin` sorts and merges (several times slower on the handful of
    keys one request excludes)."""
    at = np.searchsorted(sorted_keys, values)
    return sorted_keys[np.minimum(at, sorted_keys.size - 1)] == values


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


class Retriever:
    """A FAISS index plus the exact item matrix `[x_i ; b_i]` (row r = item index r + 1)."""

    def __init__(
        self,
        index: faiss.Index,
        item_vectors: np.ndarray,
        item_categories: np.ndarray | None = None,
        *,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        max_widenings: int = DEFAULT_MAX_WIDENINGS,
        ann_depth: int = DEFAULT_ANN_DEPTH,
    ) -> None:
        items = np.asarray(item_vectors)
        if items.ndim != 2 or items.shape[0] < 1 or not np.issubdtype(items.dtype, np.floating):
            raise TlsanError(
                f"item_vectors: expected a float (n_items, D) array, got shape {items.shape} "
                f"dtype {items.dtype}"
            )
        self.items = np.ascontiguousarray(items, dtype=np.float32)
        self.n_items, self.dim = self.items.shape
        if index.d != self.dim or index.ntotal != self.n_items:
            raise TlsanError(
                f"index: covers {index.ntotal} vectors of dimension {index.d}, expected "
                f"{self.n_items} of dimension {self.dim} (the item_vectors)"
            )
        self.index = index
        self.max_candidates = _positive_int("max_candidates", max_candidates)
        if (
            isinstance(max_widenings, bool)
            or not isinstance(max_widenings, int)
            or max_widenings < 0
        ):
            raise ConfigError(f"max_widenings: expected an integer >= 0, got {max_widenings!r}")
        self.max_widenings = max_widenings
        self.ann_depth = _positive_int("ann_depth", ann_depth)
        self.exact_index = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        self._ivf = faiss.try_extract_index_ivf(index)
        self._pretransform = isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
        self.categories = (
            None if item_categories is None else CategoryIndex(item_categories, self.items)
        )
        self._passed_categories: CategoryIndex | None = None
        self._feature_norms: np.ndarray | None = None
        self.stats = RetrieverStats()

    # ----------------------------------------------------------------- inputs
    def _queries(self, queries: np.ndarray) -> np.ndarray:
        """(B, D) float32 queries; `u_t` of width D - 1 gets the constant 1 appended."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] not in (self.dim - 1, self.dim) or q.shape[0] < 1:
            raise TlsanError(
                f"queries: expected shape (B, {self.dim - 1}) for u_t or (B, {self.dim}) for "
                f"[u_t ; 1], got {np.asarray(queries).shape}"
            )
        if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
            raise TlsanError(f"queries: expected numbers, got dtype {q.dtype}")
        q = np.asarray(q, dtype=np.float32)
        if q.shape[1] == self.dim - 1:
            q = np.concatenate([q, np.ones((q.shape[0], 1), np.float32)], axis=1)
        if not np.isfinite(q).all():
            raise TlsanError("queries: hold NaN or inf values")
        return np.ascontiguousarray(q)

    @staticmethod
    def _per_query(name: str, value: Sequence[object] | None, n_queries: int) -> list:
        if value is None:
            return [None] * n_queries
        if len(value) != n_queries:
            raise TlsanError(
                f"{name}: expected one entry per query ({n_queries}), got {len(value)}"
            )
        return list(value)

    def _excluded_rows(self, items: object, b: int) -> np.ndarray:
        """Sorted rows (item index - 1) of the excluded items that exist in the catalog."""
        if items is None or len(items) == 0:  # type: ignore[arg-type]
            return np.empty(0, np.int64)
        # ints only: a float would otherwise be truncated silently. One array conversion
        # checks the element type of the whole collection at once.
        given = items if isinstance(items, list | tuple | np.ndarray) else list(items)  # type: ignore[call-overload]
        values = np.array(given)
        if values.ndim != 1 or values.dtype.kind not in "iu":
            kinds = sorted({type(i).__name__ for i in np.ravel(values).tolist()})
            raise TlsanError(f"exclude[{b}]: expected item indices (ints), got {kinds}")
        arr = values.astype(np.int64, copy=False) if values.dtype.kind == "i" else values
        return np.unique(arr[(arr >= 1) & (arr <= self.n_items)]).astype(np.int64) - 1

    def _category_index(self, item_categories: np.ndarray | None) -> CategoryIndex | None:
        """The constructor's categories, or those given to search(): grouping them costs
        O(n log n), so the last array passed is kept and reused while the same object comes."""
        if item_categories is None:
            return self.categories
        for known in (self.categories, self._passed_categories):
            if known is not None and known.source is item_categories:
                return known
        self._passed_categories = CategoryIndex(item_categories, self.items)
        return self._passed_categories

    def _plan(
        self,
        n_q: int,
        k: int,
        exclude: Sequence[object] | None,
        allowed_categories: Sequence[object] | None,
        cats: CategoryIndex | None,
    ) -> _Plan:
        """Eligible counts and the route of each query (FAISS or exact)."""
        excl = [
            self._excluded_rows(e, b)
            for b, e in enumerate(self._per_query("exclude", exclude, n_q))
        ]
        raw_allowed = self._per_query("allowed_categories", allowed_categories, n_q)
        allowed = [
            None if a is None else category_ids(a, f"allowed_categories[{b}]")  # type: ignore[arg-type]
            for b, a in enumerate(raw_allowed)
        ]
        if cats is None and any(a is not None for a in allowed):
            raise TlsanError(
                "item_categories: required when allowed_categories is given (pass it to "
                "Retriever(...) or to search())"
            )
        want = np.zeros(n_q, np.int64)
        first = np.zeros(n_q, np.int64)
        pending, exact = [], []
        limit = min(self.max_candidates, self.n_items)
        for b in range(n_q):
            c = max(4 * k, k + excl[b].size)
            deep = False
            if allowed[b] is None:
                eligible = self.n_items - excl[b].size
            else:
                assert cats is not None
                eligible = cats.count(allowed[b]) - int(cats.contains(excl[b], allowed[b]).sum())
                c_share = math.ceil(2 * k * self.n_items / max(eligible, 1))
                c, deep = max(c, c_share), c_share > self.ann_depth
            want[b] = min(k, eligible)
            first[b] = min(c, self.n_items)
            if want[b] > 0:
                (exact if deep or first[b] > limit else pending).append(b)
        return _Plan(excl, allowed, want, first, pending, exact)

    # ----------------------------------------------------------------- search
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[set[int] | None] | None = None,
        allowed_categories: Sequence[set[int] | None] | None = None,
        item_categories: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices `(B, k)` int64 and exact scores `(B, k)` float32 per query.

        `queries`: (B, D - 1) user states `u_t` or (B, D) `[u_t ; 1]`. `exclude[b]`: item
        indices query b must not get; `allowed_categories[b]`: the category indices it may
        get (`None` = any); `item_categories`: category per item, indexed by item index
        (length n_items + 1) or by row (n_items); defaults to the one given at construction.
        Rows with fewer than k eligible items are padded with -1 / -inf.
        """
        q = self._queries(queries)
        k = _positive_int("k", k)
        n_q = q.shape[0]
        if n_q == 1 and (allowed_categories is None or allowed_categories[0] is None):
            found = self._search_one(q, k, None if exclude is None else exclude[0])
            if found is not None:
                return found
        cats = self._category_index(item_categories)
        plan = self._plan(n_q, k, exclude, allowed_categories, cats)
        self.stats.queries += n_q
        out_items = np.full((n_q, k), -1, np.int64)
        out_scores = np.full((n_q, k), -np.inf, np.float32)

        excl_keys = self._pair_keys(plan.exclude)
        pending = np.asarray(plan.pending, np.int64)
        cand = plan.candidates.copy()
        limit = min(self.max_candidates, self.n_items)
        exact = list(plan.exact)
        round_no = 0
        while pending.size:
            ids = self._faiss_search(q[pending], int(cand[pending].max()), round_no)
            ok = ids >= 0
            rows = np.where(ok, ids, 0)
            if excl_keys.size:
                ok &= ~_sorted_contains(excl_keys, pending[:, None] * self.n_items + rows)
            if cats is not None:
                for j, b in enumerate(pending.tolist()):
                    if plan.allowed[b] is not None:
                        ok[j] &= cats.contains(rows[j], plan.allowed[b])
            done = ok.sum(axis=1) >= plan.want[pending]
            if done.all():
                self._rescore(pending, rows, ok, q, plan.want, out_items, out_scores)
                break
            if done.any():
                self._rescore(
                    pending[done], rows[done], ok[done], q, plan.want, out_items, out_scores
                )
            grow = pending[~done]
            if round_no == 0:
                self.stats.widened += int(grow.size)
            cand[grow] *= 2
            if self.exact_index or round_no >= self.max_widenings:
                to_exact = np.ones(grow.size, bool)
            else:
                to_exact = cand[grow] > limit
            exact.extend(grow[to_exact].tolist())
            pending = grow[~to_exact]
            round_no += 1
        if exact:
            exact.sort()
            self._exact(exact, q, plan, cats, out_items, out_scores)
            self._canonical(exact, q, out_items, out_scores)
        return out_items, out_scores

    def _search_one(
        self, q: np.ndarray, k: int, exclude: object
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """A lone query without a category filter (the service's common case) in one FAISS
        call, without the batch planning: the same candidates and exact re-scoring as
        `search`'s first round. None when that round would not settle it (ANN misses, deep
        exclusions, an exhausted catalog): `search` then takes the general route."""
        if exclude is not None and len(exclude) > 0:  # type: ignore[arg-type]
            if isinstance(exclude, list | tuple | set | frozenset | np.ndarray):
                excl = self._excluded_rows(exclude, 0)
            else:
                return None
        else:
            excl = _NO_ROWS
        want = min(k, self.n_items - excl.size)
        c = min(max(4 * k, k + excl.size), self.n_items)
        if want < 1 or c > min(self.max_candidates, self.n_items):
            return None
        ids = self._faiss_search(q, c, 0)
        ok = ids >= 0
        if excl.size:
            ok &= ~_sorted_contains(excl, ids)
        if int(ok.sum()) < want:
            self.stats.faiss_calls -= 1  # the general route searches again
            return None
        self.stats.queries += 1
        out_items = np.full((1, k), -1, np.int64)
        out_scores = np.full((1, k), -np.inf, np.float32)
        rows = np.where(ok, ids, 0)
        self._rescore(_ONE_QUERY, rows, ok, q, np.array([want]), out_items, out_scores)
        return out_items, out_scores

    def _pair_keys(self, excl: list[np.ndarray]) -> np.ndarray:
        """(query, row) pairs as one int64 key each, for one vectorised membership test;
        ascending, since each query's rows are sorted and below `n_items`."""
        parts = [b * self.n_items + rows for b, rows in enumerate(excl) if rows.size]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _faiss_search(self, q: np.ndarray, c: int, round_no: int) -> np.ndarray:
        """Top-c rows per query; IVF probes twice as many lists each widening round."""
        self.stats.faiss_calls += 1
        params = None
        if self._ivf is not None and round_no > 0:
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.nprobe = min(self._ivf.nlist, self._ivf.nprobe * 2**round_no)
            params = ivf_params
            if self._pretransform:
                params = faiss.SearchParametersPreTransform()
                params.index_params = ivf_params
        _, ids = self.index.search(q, c, params=params)
        return ids

    def _rescore(
        self,
        which: np.ndarray,
        rows: np.ndarray,
        ok: np.ndarray,
        q: np.ndarray,
        want: np.ndarray,
        out_items: np.ndarray,
        out_scores: np.ndarray,
    ) -> None:
        """Exact scores of the eligible candidates of several queries, best `want` of each.

        Scores are float64 dot products rounded to float32, like `_canonical` computes them,
        so a (query, item) pair scores the same whichever path picked it."""
        vectors = self.items[rows].astype(np.float64)  # (P, C, D)
        scores = np.matmul(vectors, q[which].astype(np.float64)[:, :, None])[:, :, 0]
        scores = np.where(ok, scores.astype(np.float32), np.float32(-np.inf))
        items = np.where(ok, rows + 1, _NO_ITEM)
        order = np.lexsort((items, -scores), axis=-1)[:, : out_items.shape[1]]
        picked = np.arange(len(which))[:, None]
        top_items, top_scores = items[picked, order], scores[picked, order]
        keep = np.arange(order.shape[1])[None, :] < want[which][:, None]
        out_items[which, : order.shape[1]] = np.where(keep, top_items, -1)
        out_scores[which, : order.shape[1]] = np.where(keep, top_scores, -np.inf)

    def _exact(
        self,
        which: list[int],
        q: np.ndarray,
        plan: _Plan,
        cats: CategoryIndex | None,
        out_items: np.ndarray,
        out_scores: np.ndarray,
    ) -> None:
        """Exact scoring over each query's eligible rows: its category slices, else the catalog."""
        self.stats.exact += len(which)
        dense = []
        for b in which:
            allowed = plan.allowed[b]
            if allowed is None or cats is None:
                dense.append(b)
                continue
            rows, scores = cats.scores(allowed, q[b])
            if plan.exclude[b].size:
                keep = ~np.isin(rows, plan.exclude[b])
                rows, scores = rows[keep], scores[keep]
            self._put(b, *_top_k(rows + 1, scores, int(plan.want[b])), out_items, out_scores)
        all_items = np.arange(1, self.n_items + 1, dtype=np.int64)
        for start in range(0, len(dense), _CHUNK):
            chunk = dense[start : start + _CHUNK]
            block = self.items @ q[chunk].T  # (n_items, len(chunk))
            for j, b in enumerate(chunk):
                scores = block[:, j]
                scores[plan.exclude[b]] = -np.inf
                keep = np.isfinite(scores)
                top = _top_k(all_items[keep], scores[keep], int(plan.want[b]))
                self._put(b, *top, out_items, out_scores)

    @staticmethod
    def _put(
        b: int, items: np.ndarray, scores: np.ndarray, out_items: np.ndarray, out_scores: np.ndarray
    ) -> None:
        out_items[b, : items.size] = items
        out_scores[b, : items.size] = scores

    def _canonical(
        self, which: list[int], q: np.ndarray, out_items: np.ndarray, out_scores: np.ndarray
    ) -> None:
        """Re-score rows picked by an exact path in float64 (rounded to float32) and re-sort,
        as `_rescore` scores: a (query, item) pair gets one score whichever path picked it."""
        rows_b = np.asarray(which, np.int64)
        found = out_items[rows_b]
        valid = found >= 0
        vectors = self.items[np.where(valid, found - 1, 0)].astype(np.float64)  # (P, k, D)
        exact = np.matmul(vectors, q[rows_b].astype(np.float64)[:, :, None])[:, :, 0]
        scores = np.where(valid, exact.astype(np.float32), np.float32(-np.inf))
        keys = np.where(valid, found, _NO_ITEM)
        order = np.lexsort((keys, -scores), axis=-1)
        picked = np.arange(len(rows_b))[:, None]
        out_items[rows_b] = found[picked, order]
        out_scores[rows_b] = scores[picked, order]

    # ---------------------------------------------------------- similar items
    def _norms(self) -> np.ndarray:
        """|x_i| of the item vectors without the bias column, computed once."""
        if self._feature_norms is None:
            feats = self.items[:, :-1]
            self._feature_norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
        return self._feature_norms

    def similar_items(
        self, item_idx: int | Sequence[int] | np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items nearest to each given item by cosine of `x_i` (bias left out), itself excluded.

        Returns `(B, k)` item indices and cosine similarities (B = number of items asked for;
        padded with -1 / -inf when the catalog has fewer than k other items). Exact: one
        matrix product over the catalog per 32 items asked for.
        """
        k = _positive_int("k", k)
        asked = np.atleast_1d(np.asarray(item_idx))
        if asked.ndim != 1 or not np.issubdtype(asked.dtype, np.integer):
            raise TlsanError(f"item_idx: expected item indices (ints), got {item_idx!r}")
        bad = asked[(asked < 1) | (asked > self.n_items)]
        if bad.size:
            raise TlsanError(
                f"item_idx: {int(bad[0])} is not an item index; expected 1..{self.n_items} "
                f"(0 is padding)"
            )
        norms = self._norms()
        rows = asked.astype(np.int64) - 1
        unit = self.items[rows].copy()
        unit[:, -1] = 0.0  # the bias is no part of an item's features
        unit /= np.maximum(norms[rows], np.finfo(np.float32).tiny)[:, None]
        want = min(k, self.n_items - 1)
        out_items = np.full((rows.size, k), -1, np.int64)
        out_scores = np.full((rows.size, k), -np.inf, np.float32)
        safe_norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
        all_items = np.arange(1, self.n_items + 1, dtype=np.int64)
        for start in range(0, rows.size, _CHUNK):
            block = (self.items @ unit[start : start + _CHUNK].T) / safe_norms[:, None]
            for j in range(block.shape[1]):
                b = start + j
                sims = block[:, j]
                sims[rows[b]] = -np.inf
                if want:
                    self._put(b, *_top_k(all_items, sims, want), out_items, out_scores)
        return out_items, out_scores
