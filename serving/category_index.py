"""Item rows grouped by category, so that a category filter costs O(its items), not O(catalog).

Besides the grouping, it keeps a copy of the item matrix in category order: scoring one
category is then a matrix-vector product over a contiguous slice (0.6 ms for 84k rows of 65
floats here, against 4 ms for gathering the same rows by fancy indexing). The copy costs one
more item matrix of memory, built only when categories are given.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from tlsan.errors import TlsanError


def category_ids(allowed: Iterable[object], where: str) -> np.ndarray:
    """A request's category indices as a unique int64 array (negatives match nothing)."""
    try:
        values = np.fromiter((int(c) for c in allowed), np.int64)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise TlsanError(f"{where}: expected category indices (ints): {exc}") from exc
    return np.unique(values)


class CategoryIndex:
    """The category of every index row (row r = item index r + 1), grouped for fast lookup."""

    def __init__(self, item_categories: np.ndarray, items: np.ndarray) -> None:
        """`item_categories`: indexed by item index (n_items + 1, entry 0 = padding) or by row."""
        n_items = items.shape[0]
        cats = np.asarray(item_categories)
        if cats.ndim != 1 or not np.issubdtype(cats.dtype, np.integer):
            raise TlsanError(
                f"item_categories: expected a 1-D integer array, got shape {cats.shape} "
                f"dtype {cats.dtype}"
            )
        if cats.size == n_items + 1:
            cats = cats[1:]
        elif cats.size != n_items:
            raise TlsanError(
                f"item_categories: expected {n_items + 1} entries (indexed by item index, "
                f"0 = padding) or {n_items} (one per index row), got {cats.size}"
            )
        if cats.size and cats.min() < 0:
            raise TlsanError(
                f"item_categories: expected category indices >= 0, found {int(cats.min())}"
            )
        self.source = item_categories
        self.row_categories = np.ascontiguousarray(cats, dtype=np.int64)
        self.order = np.argsort(self.row_categories, kind="stable")  # rows in category order
        self.sorted_items = np.ascontiguousarray(items[self.order])
        values, starts, counts = np.unique(
            self.row_categories[self.order], return_index=True, return_counts=True
        )
        self._span = {
            int(v): (int(s), int(s + c)) for v, s, c in zip(values, starts, counts, strict=True)
        }

    def spans(self, allowed: np.ndarray) -> list[tuple[int, int]]:
        """[start, end) positions in category order of the allowed categories present."""
        return [self._span[c] for c in allowed.tolist() if c in self._span]

    def count(self, allowed: np.ndarray) -> int:
        """How many rows fall in the allowed categories."""
        return sum(end - start for start, end in self.spans(allowed))

    def contains(self, rows: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Whether each of `rows` (any shape) lies in an allowed category."""
        return np.isin(self.row_categories[rows], allowed)

    def scores(self, allowed: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the allowed categories and their scores `<item, query>`, slice by slice."""
        spans = self.spans(allowed)
        if not spans:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        rows = np.concatenate([self.order[s:e] for s, e in spans])
        scores = np.concatenate([self.sorted_items[s:e] @ query for s, e in spans])
        return rows, scores
