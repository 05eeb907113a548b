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


def paper_examples(events: pl.DataFrame, *, cap: int, seed: int) -> pl.LazyFrame:
    """The paper's construction (DESIGN.md): one training example per session transition,
    the first session that reaches past the event cap as the test example, then validation =
    each user's last training example.

    `events` is the collected event table, sorted by user and time, so each session is its first row and everything
    per user comes from neighbouring rows: the training sessions of a user are a prefix
    (sessions 1..k, since a session's end grows while the cap stays), the test session is
    k + 1 and the validation session k. Targets are gathered by row position.
    """
    table = events.lazy()
    gidx = pl.col("gidx")
    last_of_user = pl.col("user") != pl.col("user").shift(-1)
    with_end = table.with_columns(
        pl.when(last_of_user.fill_null(True)).then(gidx + 1).backward_fill().alias("user_end")
    )
    same_user_next = (pl.col("user") == pl.col("user").shift(-1)).fill_null(False)
    sessions = with_end.filter(pl.col("pos") == pl.col("session_start")).select(
        "user",
        "offset",
        "session",
        pl.col("pos").alias("start"),
        (
            pl.when(same_user_next).then(gidx.shift(-1)).otherwise(pl.col("user_end"))
            - pl.col("offset")
        )
        .cast(pl.Int32)
        .alias("end"),
        (pl.col("user_end") - pl.col("offset")).alias("n_events"),
        pl.col("session_time").alias("ref_time"),
    )
    m = pl.col("n_events")
    if cap:
        m = pl.min_horizontal(m, pl.lit(cap))
    is_train = (pl.col("session") > 0) & (pl.col("end") < m - 1)
    sessions = sessions.with_columns(is_train.alias("is_train")).with_columns(
        (pl.col("is_train") & ~(same_user_next & pl.col("is_train").shift(-1))).alias("is_valid"),
        (
            (pl.col("session") > 0)
            & ~pl.col("is_train")
            & ((pl.col("session") == 1) | pl.col("is_train").shift(1).fill_null(False))
        ).alias("is_test"),
    )
    item = pl.lit(events["item"])
    size = pl.col("end") - pl.col("start")
    train = sessions.filter("is_train").select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        pl.col("end").alias("short_end"),
        pl.lit(-1, dtype=pl.Int32).alias("skip_pos"),
        item.gather(pl.col("offset") + pl.col("end")).alias("target"),
        "ref_time",
        pl.when("is_valid").then(pl.lit("valid")).otherwise(pl.lit("train")).alias("split"),
    )
    chosen = pl.col("start") + seeded_choice(pl.col("user"), seed, size)
    test = sessions.filter("is_test").select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        pl.col("end").alias("short_end"),
        chosen.alias("skip_pos"),
        item.gather(pl.col("offset") + chosen).alias("target"),
        "ref_time",
        pl.lit("test").alias("split"),
    )
    return pl.concat([train, test])


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
