"""Codebooks and vocabularies: raw ids to dense int32 indices, 0 reserved for padding.

Indices follow the raw ids' natural order (numeric when every id is an integer, else
lexicographic), so the same cleaned log always gives the same indices. Right after reading,
every raw user and item id gets its *code*: its rank in that order among all ids of the log
(`Codebook`). Cleaning works on the codes (integers, whatever the ids look like), and the
vocabularies are the codebooks restricted to what cleaning kept, renumbered densely: the order
is the same, so an event's index is a table lookup of its code and the events sorted by code
are already sorted by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


def natural_order(values: pl.Series, column: str) -> pl.DataFrame:
    """The distinct `values` as `key` (native type) and `column` (the raw id as a string),
    sorted numerically when every id is an integer (ties of equal numbers by their text),
    else lexicographically."""
    uniq = pl.DataFrame({"key": values.unique()})
    if uniq["key"].dtype == pl.Categorical:
        uniq = uniq.with_columns(pl.col("key").cast(pl.String))
    uniq = uniq.with_columns(pl.col("key").cast(pl.String).alias(column))
    if uniq["key"].dtype.is_integer():
        return uniq.sort("key")
    numeric = uniq[column].cast(pl.Int64, strict=False)
    if numeric.null_count() == 0:
        return uniq.with_columns(numeric.alias("_num")).sort("_num", column).drop("_num")
    return uniq.sort(column)


@dataclass(frozen=True)
class Codebook:
    """Every distinct raw id of one column of the log, in vocabulary order.

    `table` has `code` (1..n, int32), `key` (the id in its native type) and the raw id as a
    string under the column's name.
    """

    column: str
    table: pl.DataFrame

    @classmethod
    def of(cls, values: pl.Series, column: str) -> Codebook:
        ordered = natural_order(values, column)
        code = pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("code")
        return cls(column, ordered.select(code, "key", column))

    def encode(self, ids: pl.Expr) -> pl.Expr:
        """Codes of raw ids of this codebook's type (every id must be in the book)."""
        return ids.replace_strict(self.table["key"], self.table["code"], return_dtype=pl.Int32)

    def encode_series(self, ids: pl.Series) -> pl.Series:
        """`encode` for a whole column; integer ids within a compact range (at most a few
        times as wide as the column is long) are looked up in an array instead of hashed."""
        keys = self.table["key"]
        if keys.dtype.is_integer() and keys.len():
            low, high = int(keys.min()), int(keys.max())  # type: ignore[arg-type]
            if high - low <= max(4 * ids.len(), 1 << 16):
                lookup = np.zeros(high - low + 1, dtype=np.int32)
                lookup[keys.to_numpy() - low] = self.table["code"].to_numpy()
                return pl.Series(ids.name, lookup[ids.to_numpy() - low])
        return ids.to_frame().select(self.encode(pl.col(ids.name))).to_series()

    def __len__(self) -> int:
        return self.table.height


def dense_index(codes: np.ndarray, size: int) -> np.ndarray:
    """Lookup table code -> index (1..m in code order) over the codes still present; 0 for
    codes that no longer occur."""
    present = np.bincount(codes, minlength=size + 1) > 0
    present[0] = False
    return np.where(present, np.cumsum(present), 0).astype(np.int32)


@dataclass(frozen=True)
class Vocabularies:
    """The three vocabularies of a dataset; items carry their category index."""

    users: pl.DataFrame
    items: pl.DataFrame
    categories: pl.DataFrame

    def sizes(self) -> dict[str, int]:
        """Embedding-table sizes: the number of ids plus the padding row."""
        return {
            "users": self.users.height + 1,
            "items": self.items.height + 1,
            "categories": self.categories.height + 1,
        }


def _restrict(book: Codebook, lookup: np.ndarray) -> pl.DataFrame:
    """`index` and the raw id of the codes the lookup table keeps."""
    index = pl.Series(lookup[1:]).alias("index")
    return (
        book.table.with_columns(index)
        .filter(pl.col("index") > 0)
        .select("index", book.column, "code")
    )


def index_events(
    events: pl.DataFrame,
    users: Codebook,
    items: Codebook,
    item_categories: pl.Series,
) -> tuple[Vocabularies, pl.DataFrame]:
    """Vocabularies of the cleaned events and the events as indices, in the same row order.

    `events` holds `user` and `item` codes and `timestamp`; `item_categories` is the raw
    category of every item code (index = code, row 0 unused).
    """
    user_codes = events["user"].to_numpy()
    item_codes = events["item"].to_numpy()
    user_lookup = dense_index(user_codes, len(users))
    item_lookup = dense_index(item_codes, len(items))
    user_vocab = _restrict(users, user_lookup).drop("code")
    item_vocab = _restrict(items, item_lookup)
    category_of_item = item_categories.gather(item_vocab["code"]).alias("category")
    categories = natural_order(category_of_item, "category").select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("index"), "category"
    )
    item_vocab = (
        item_vocab.with_columns(category_of_item.cast(pl.String))
        .join(
            categories.rename({"index": "category_index"}),
            on="category",
            how="left",
            maintain_order="left",
        )
        .select("index", "item_id", pl.col("category_index").alias("category"))
    )
    item = item_lookup[item_codes]
    category_lookup = np.zeros(item_vocab.height + 1, dtype=np.int32)
    category_lookup[item_vocab["index"].to_numpy()] = item_vocab["category"].to_numpy()
    indexed = pl.DataFrame(
        {
            "user": user_lookup[user_codes],
            "item": item,
            "category": category_lookup[item],
            "timestamp": events["timestamp"],
        }
    )
    return Vocabularies(user_vocab, item_vocab, categories), indexed
