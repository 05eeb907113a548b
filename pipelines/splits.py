"""Which examples exist and which split each belongs to: paper, leave-one-out and time.

Every builder returns position-described examples (see `pipelines.features`) with `split`,
`target` and `target_pos` (the target event's position within its user); features are
attached afterwards by the shared `attach_features`.
"""

from __future__ import annotations

import polars as pl

from pipelines.config import Protocol, TrainTargets
from pipelines.features import target_examples

_LCG_A = 1_103_515_245
_LCG_C = 12_345
_MOD = 2_147_483_647
# The validation target's draw uses its own stream: seed + VALID_STREAM (the test target's
# draw, seed itself, is unchanged from the paper's construction).
VALID_STREAM = 1_000_003
# Rows of paper transitions that no split trains on (their target lies in the validation or
# the test session); counted in the manifest, never written.
EXCLUDED = "excluded"
# Paper transitions when the training targets are every event (`train_targets="events"`):
# counted for the manifest's paper count, never written.
PAPER_TRANSITION = "paper-transition"


def seeded_choice(user: pl.Expr, seed: int, n: pl.Expr) -> pl.Expr:
    """A deterministic pseudo-random integer in [0, n) per user: a target's position in its
    session.

    An integer hash of (user, seed), so it does not depend on row order, thread count or
    library versions.
    """
    h = (user.cast(pl.Int64) * _LCG_A + seed * _LCG_C + 1_013_904_223) % _MOD
    h = (h * _LCG_A + _LCG_C) % _MOD
    return (h % n.cast(pl.Int64)).cast(pl.Int32)


def _sessions(events: pl.DataFrame, cap: int) -> pl.LazyFrame:
    """One row per session with its positions (start, end), its user's event count and the
    paper's roles: `is_train` (a transition of step 3) and `is_test` (the session where the
    walk stops)."""
    gidx = pl.col("gidx")
    last_of_user = pl.col("user") != pl.col("user").shift(-1)
    with_end = events.lazy().with_columns(
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
        *(["test_draw"] if "test_draw" in events.columns else []),
    )
    m = pl.col("n_events")
    if cap:
        m = pl.min_horizontal(m, pl.lit(cap))
    is_train = (pl.col("session") > 0) & (pl.col("end") < m - 1)
    return sessions.with_columns(is_train.alias("is_train")).with_columns(
        (
            (pl.col("session") > 0)
            & ~pl.col("is_train")
            & ((pl.col("session") == 1) | pl.col("is_train").shift(1).fill_null(False))
        ).alias("is_test"),
    )


def paper_examples(
    events: pl.DataFrame,
    *,
    cap: int,
    seed: int,
    protocol: Protocol = "leak-free",
    train_targets: TrainTargets = "transitions",
) -> pl.LazyFrame:
    """The paper's construction (DESIGN.md) with our leak-free validation and training.

    Per user, the walk's last session `t` is the test example (its short-term session minus
    the target); the session `v = t - 1` is the validation example built the same way (only
    when `v` is not the first session, which only seeds the history); the paper's transitions
    train only when their target event lies before `v` (the others are marked EXCLUDED).

    `protocol="reference"` rebuilds the published protocol instead, for reproduction only:
    every transition trains (including the one whose target is the test target), a
    single-item test session keeps its target in the short-term input, and there is no
    validation example.

    `train_targets="events"` trains on every event of the sessions between the first and `v`
    instead of the paper's transitions, each built like a serving request (`target_examples`:
    short-term = the earlier events of its own session): more targets per user, and training
    examples shaped like the validation and test examples (whose session is mostly empty).
    The transitions are then counted as PAPER_TRANSITION and not written.

    `events` is the collected event table, sorted by user and time, so each session is its
    first row and everything per user comes from neighbouring rows. Targets are gathered by
    row position.
    """
    test_session = pl.when("is_test").then(pl.col("session")).max().over("user")
    sessions = _sessions(events, cap).with_columns(test_session.alias("test_session"))
    item = pl.lit(events["item"])
    if protocol == "reference":
        train_split = pl.lit("train")
    else:  # a transition from s targets the first event of s + 1: keep s + 1 < v = t - 1
        before_valid = pl.col("session") + 1 < pl.col("test_session") - 1
        train_split = pl.when(before_valid).then(pl.lit("train")).otherwise(pl.lit(EXCLUDED))
    if train_targets == "events":
        train_split = pl.lit(PAPER_TRANSITION)
    train = sessions.filter("is_train").select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        pl.col("end").alias("short_end"),
        pl.lit(-1, dtype=pl.Int32).alias("skip_pos"),
        item.gather(pl.col("offset") + pl.col("end")).alias("target"),
        pl.col("end").alias("target_pos"),
        "ref_time",
        train_split.alias("split"),
    )
    size = pl.col("end") - pl.col("start")
    if protocol == "reference":  # the reference code's own random choice, replayed
        test = _held_out(sessions.filter("is_test"), item, pl.col("test_draw"), "test", protocol)
        return pl.concat([train, test])
    if train_targets == "events":
        valid_session = sessions.select("user", (pl.col("test_session") - 1).alias("v"))
        valid_session = valid_session.unique(maintain_order=True)
        table = events.lazy().join(valid_session, on="user", how="inner", maintain_order="left")
        is_target = (pl.col("session") >= 1) & (pl.col("session") < pl.col("v"))
        dense = target_examples(table, is_target).drop("target_time").sort("user", "target_pos")
        train = pl.concat([train, dense.with_columns(split=pl.lit("train"))], how="diagonal")
    test_draw = seeded_choice(pl.col("user"), seed, size)
    test = _held_out(sessions.filter("is_test"), item, test_draw, "test", protocol)
    is_valid = (pl.col("session") == pl.col("test_session") - 1) & (pl.col("session") > 0)
    valid_draw = seeded_choice(pl.col("user"), seed + VALID_STREAM, size)
    valid = _held_out(sessions.filter(is_valid), item, valid_draw, "valid", protocol)
    return pl.concat([train, test, valid])


def _held_out(
    sessions: pl.LazyFrame, item: pl.Expr, draw: pl.Expr, split: str, protocol: Protocol
) -> pl.LazyFrame:
    """The test (or validation) example of each of `sessions`: long-term = the events before
    the session, short-term = its items minus the target, target = its `draw`-th item. Under
    the reference protocol a single-item session keeps its target in the short-term input
    (the reference code's leak (b))."""
    size = pl.col("end") - pl.col("start")
    chosen = pl.col("start") + draw
    skip = chosen
    if protocol == "reference":
        skip = pl.when(size == 1).then(pl.lit(-1, dtype=pl.Int32)).otherwise(chosen)
    return sessions.select(
        "user",
        "offset",
        pl.col("start").alias("history_end"),
        pl.col("start").alias("short_start"),
        pl.col("end").alias("short_end"),
        skip.cast(pl.Int32).alias("skip_pos"),
        item.gather(pl.col("offset") + chosen).alias("target"),
        chosen.cast(pl.Int32).alias("target_pos"),
        "ref_time",
        pl.lit(split).alias("split"),
    )


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
