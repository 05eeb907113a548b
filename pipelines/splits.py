"""Which examples exist and which split each belongs to: paper, leave-one-out and time.

Every builder returns position-described examples (see `pipelines.features`) with `split` and
`target`; features are attached afterwards by the shared `attach_features`.
"""

from __future__ import annotations

import polars as pl

from pipelines.features import target_examples

_LCG_A = 1_103_515_245
_LCG_C = 12_345
_MOD = 2_147_483_647


def seeded_choice(user: pl.Expr, seed: int, n: pl.Expr) -> pl.Expr:
    """A deterministic pseudo-random integer in [0, n) per user: the test target's position.

    An integer hash of (user, seed), so it does not depend on row order, thread count or
    library versions.
    """
    h = (user.cast(pl.Int64) * _LCG_A + seed * _LCG_C + 1_013_904_223) % _MOD
    h = (h * _LCG_A + _LCG_C) % _MOD
    return (h % n.cast(pl.Int64)).cast(pl.Int32)


def paper_examples(table: pl.LazyFrame, *, cap: int, seed: int) -> pl.LazyFrame:
    """The paper's construction (DESIGN.md): one training example per session transition,
    the first session that reaches past the event cap as the test example, then validation =
    each user's last training example."""
    per_user = table.group_by("user").agg(pl.len().alias("n_events"))
    sessions = (
        table.group_by("user", "session")
        .agg(
            pl.col("pos").min().alias("start"),
            pl.len().cast(pl.Int32).alias("size"),
            pl.col("session_time").first().alias("ref_time"),
            pl.col("offset").first(),
        )
        .join(per_user, on="user")
        .sort("user", "session")
    )
    m = pl.col("n_events")
    if cap:
        m = pl.min_horizontal(m, pl.lit(cap))
    end = pl.col("start") + pl.col("size")
    is_train = (pl.col("session") > 0) & (end < m - 1)
    sessions = sessions.with_columns(is_train.alias("is_train")).with_columns(
        (pl.col("is_train").cast(pl.Int32).sum().over("user") + 1).alias("test_session"),
        pl.col("session").filter(pl.col("is_train")).max().over("user").alias("valid_session"),
    )
    train = sessions.filter("is_train").select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        end.alias("short_end"),
        pl.lit(-1, dtype=pl.Int32).alias("skip_pos"),
        (pl.col("offset") + end).alias("target_gidx"),
        "ref_time",
        pl.when(pl.col("session") == pl.col("valid_session"))
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split"),
    )
    chosen = pl.col("start") + seeded_choice(pl.col("user"), seed, pl.col("size"))
    test = sessions.filter(pl.col("session") == pl.col("test_session")).select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        end.alias("short_end"),
        chosen.alias("skip_pos"),
        (pl.col("offset") + chosen).alias("target_gidx"),
        "ref_time",
        pl.lit("test").alias("split"),
    )
    examples = pl.concat([train, test]).join(
        table.select(pl.col("gidx").alias("target_gidx"), pl.col("item").alias("target")),
        on="target_gidx",
        how="left",
        maintain_order="left",
    )
    return examples.drop("target_gidx")


def leave_one_out_examples(table: pl.LazyFrame) -> pl.LazyFrame:
    """Every event after a user's first is a target: last = test, one before = valid."""
    n = pl.len().over("user")
    split = (
        pl.when(pl.col("pos") == n - 1)
        .then(pl.lit("test"))
        .when(pl.col("pos") == n - 2)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return target_examples(table.with_columns(split.alias("split")), pl.col("pos") >= 1, ["split"])


def time_examples(table: pl.LazyFrame, *, valid_from: int, test_from: int) -> pl.LazyFrame:
    """Targets before `valid_from` train, in [valid_from, test_from) validate, later test.

    A training example's history only holds events before its target, so no event at or after
    `valid_from` ever reaches training.
    """
    t = pl.col("target_time")
    split = (
        pl.when(t < valid_from)
        .then(pl.lit("train"))
        .when(t < test_from)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )
    return target_examples(table, pl.col("pos") >= 1).with_columns(split.alias("split"))
