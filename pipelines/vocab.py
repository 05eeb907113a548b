"""Vocabularies: raw ids (strings) to dense int32 indices, 0 reserved for padding.

Indices follow the raw ids' natural order (numeric when every id is an integer, else
lexicographic), so the same cleaned log always gives the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


def build_vocab(values: pl.Series, column: str) -> pl.DataFrame:
    """`index` (1..n, int32) and the raw id `column` (string) of every distinct value."""
    uniq = pl.DataFrame({column: values.unique()})
    numeric = uniq[column].cast(pl.Int64, strict=False)
    if numeric.null_count() == 0:
        uniq = uniq.with_columns(numeric.alias("_key")).sort("_key", column).drop("_key")
    else:
        uniq = uniq.sort(column)
    return uniq.select(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("index"), column)


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


def build_vocabularies(events: pl.DataFrame) -> Vocabularies:
    """Vocabularies of a cleaned log with string columns user_id, item_id, category."""
    users = build_vocab(events["user_id"], "user_id")
    categories = build_vocab(events["category"], "category")
    item_category = events.select("item_id", "category").unique("item_id", keep="first")
    items = (
        build_vocab(events["item_id"], "item_id")
        .join(item_category, on="item_id", how="left", maintain_order="left")
        .join(
            categories.rename({"index": "category_index"}),
            on="category",
            how="left",
            maintain_order="left",
        )
        .select("index", "item_id", pl.col("category_index").alias("category"))
    )
    return Vocabularies(users, items, categories)


def index_events(events: pl.DataFrame, vocab: Vocabularies) -> pl.DataFrame:
    """Events as int32 indices, sorted by user, timestamp and input order (a stable sort)."""
    return (
        events.lazy()
        .drop("category")
        .join(
            vocab.users.lazy().rename({"index": "user"}),
            on="user_id",
            how="left",
        )
        .join(
            vocab.items.lazy().rename({"index": "item"}),
            on="item_id",
            how="left",
        )
        .select("user", "item", "category", "timestamp", "row")
        .sort("user", "timestamp", "row")
        .drop("row")
        .collect()
    )
