"""The plain Python `Recommender`: train/serve parity, time, cold start, filters, explain, and
the micro-batcher the service groups requests with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from feature_store import Event, OnlineStore, open_store
from serving.batching import MicroBatcher
from serving.errors import RequestError
from serving.recommender import Query, Recommendation, Recommender
from serving.schemas import RecommendResponse
from tlsan.bundle import Bundle, load_bundle, write_bundle
from tlsan.cli import main
from tlsan.config import preset
from tlsan.data import load_dataset
from tlsan.evaluate import evaluate_model
from tlsan.train import fit

DAY = 86_400


@pytest.fixture(scope="module")
def served(
    prepared_amazon: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Bundle]:
    """(data dir, bundle) of a small TLSAN trained for 2 epochs on Digital_Music."""
    from serving.index_builder import build_bundle_index

    data = prepared_amazon("Digital_Music")
    work = tmp_path_factory.mktemp("recommender")
    fit(preset("default").override(epochs=2), data, work / "run", mlflow=False, progress=False)
    write_bundle(work / "run", data, work / "bundle", index_builder=build_bundle_index)
    return data, load_bundle(work / "bundle")


@pytest.fixture(scope="module")
def test_users(served: tuple[Path, Bundle]) -> pl.DataFrame:
    """Each test example with its user's raw id and the events before it (raw ids)."""
    data, _ = served
    users = pl.read_parquet(data / "vocab/users.parquet").rename({"index": "user"})
    return (
        pl.read_parquet(data / "examples/test.parquet")
        .with_row_index("row")
        .join(users, on="user", how="left")
        .sort("row")
    )


def parity_store(data: Path, path: Path) -> OnlineStore:
    """A fresh SQLite store holding what serving holds at each test example: the user's events
    before the test session plus the session's items so far, at their own timestamps, with
    raw ids (`parity_now` is then a moment that sees all of them in the same session)."""
    items = dict(pl.read_parquet(data / "vocab/items.parquet").select("index", "item_id").rows())
    events = pl.read_parquet(data / "events.parquet")
    test = pl.read_parquet(data / "examples/test.parquet")
    users = dict(pl.read_parquet(data / "vocab/users.parquet").rows())
    history = events.join(test.select("user", "history_end"), on="user").filter(
        pl.col("pos") < pl.col("history_end")
    )
    short = test.select(
        "user", pl.col("short_items").alias("item"), pl.col("short_time").alias("timestamp")
    ).explode("item", "timestamp")
    short = short.drop_nulls("item")
    rows = pl.concat(
        [history.select("user", "item", "timestamp"), short.select("user", "item", "timestamp")]
    )
    store = open_store(f"sqlite:///{path}")
    store.bulk_load(
        [users[u] for u in rows["user"].to_list()],
        [items[i] for i in rows["item"].to_list()],
        rows["timestamp"].to_list(),
    )
    return store


def parity_now(test_users: pl.DataFrame) -> list[int]:
    """Per test example, the moment its features are computed at online: the session's
    reference time, or its last item's time when that is later (the same session)."""
    return [
        max([ref, *stamps])
        for ref, stamps in test_users.select("ref_time", "short_time").iter_rows()
    ]


@pytest.fixture
def recommender(served: tuple[Path, Bundle], tmp_path: Path) -> Iterator[Recommender]:
    data, bundle = served
    store = parity_store(data, tmp_path / "store.db")
    yield Recommender(bundle, store)
    store.close()


def offline_top10(data: Path, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """The offline evaluator's top 10 of every test example (`evaluate_model(top_k=10)`: the
    ranking behind its metrics, history excluded, ties by item index) and their scores
    (`user_vectors @ item_vectors.T`, what the evaluator ranks by)."""
    split = load_dataset(data, splits=("test",)).test
    model = bundle.load_model()
    top = evaluate_model(model, split, top_k=10).per_example["top_items"]
    with torch.inference_mode():
        scores = model.user_vectors(split.arrays.batch()) @ model.item_vectors().T
    return top, scores.gather(1, torch.from_numpy(top)).numpy()


def assert_served_as_offline(
    answers: list[Recommendation | RequestError],
    expected: tuple[np.ndarray, np.ndarray],
    index: dict[str, int],
) -> None:
    """Every answer's top 10 is the evaluator's, item for item; scores to float32 rounding."""
    top, scores = expected
    mismatched = []
    for row, answer in enumerate(answers):
        assert not isinstance(answer, RequestError)
        assert answer.strategy == "model"
        served_top = [index[item_id] for item_id, _, _ in answer.items]
        if served_top != top[row].tolist():
            mismatched.append(row)
            continue
        assert [s for _, s, _ in answer.items] == pytest.approx(
            scores[row].tolist(), rel=1e-5, abs=1e-5
        ), row
    assert mismatched == []


# ------------------------------------------------------------------ parity
def test_every_test_user_gets_the_offline_evaluators_top10(
    served: tuple[Path, Bundle], recommender: Recommender, test_users: pl.DataFrame
) -> None:
    data, bundle = served
    expected = offline_top10(data, bundle)
    queries = [
        Query(user_id=u, k=10, now=t)
        for u, t in zip(test_users["user_id"], parity_now(test_users), strict=True)
    ]
    answers = recommender.recommend_batch(queries)
    index = recommender.item_index
    assert len(answers) == test_users.height == 1_659
    assert_served_as_offline(answers, expected, index)
    # Batches of the size the service forms answer the same.
    some = list(range(0, 1_659, 97))
    small = recommender.recommend_batch([queries[i] for i in some])
    assert [a.items for a in small] == [answers[i].items for i in some]
    # Lone requests, the service's low-load case, run on the bundle's ONNX graph: the same
    # top 10 for every test user, scores equal to float32 rounding.
    graph = recommender.model.graph
    assert graph is not None and recommender.model_info()["runtime"]["onnx"] is True
    runs = 0
    run_graph = graph.run

    def counted(inputs: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal runs
        runs += 1
        return run_graph(inputs)

    graph.run = counted  # type: ignore[method-assign]
    top = expected[0]
    for row, query in enumerate(queries):
        (alone,) = recommender.recommend_batch([query])
        assert not isinstance(alone, RequestError)
        assert [index[i] for i, _, _ in alone.items] == top[row].tolist(), row
        assert [s for _, s, _ in alone.items] == pytest.approx(
            [s for _, s, _ in answers[row].items], rel=1e-5, abs=1e-5
        )
    assert runs == len(queries)


@pytest.fixture(scope="module")
def baseline_runs(
    served: tuple[Path, Bundle], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory: a bundle of `kind` trained with `tlsan train` (its default recipe, 2 epochs;
    pop's half-life chosen on validation), built once per kind."""
    from serving.index_builder import build_bundle_index

    data, _ = served
    work = tmp_path_factory.mktemp("baselines")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            run = work / f"{kind}-run"
            args = ["train", "--data", str(data), "--out", str(run), "--model", kind]
            assert main([*args, "--epochs", "2", "--no-mlflow", "--quiet"]) == 0
            write_bundle(run, data, work / kind, index_builder=build_bundle_index)
            built[kind] = work / kind
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["sasrec", "tisasrec", "pop"])
def test_every_model_kind_serves_the_offline_evaluators_ranking(
    kind: str,
    served: tuple[Path, Bundle],
    baseline_runs: Callable[[str], Path],
    test_users: pl.DataFrame,
    tmp_path: Path,
) -> None:
    """A served `sasrec`, `tisasrec` or `pop` bundle answers every Digital_Music test user
    with the offline evaluator's top 10 and scores (the TLSAN test above, on PyTorch), and
    explains with its attention (pop: popularity)."""
    data, _ = served
    bundle = load_bundle(baseline_runs(kind))
    assert bundle.manifest["model"] == kind and bundle.manifest["run"]["model_kind"] == kind
    expected = offline_top10(data, bundle)
    nows = parity_now(test_users)
    queries = [
        Query(user_id=u, k=10, now=t, explain=row % 5 == 0)
        for row, (u, t) in enumerate(zip(test_users["user_id"], nows, strict=True))
    ]
    with parity_store(data, tmp_path / "store.db") as store:
        rec = Recommender(bundle, store)
        assert rec.model.graph is None and rec.model_info()["runtime"]["engine"] == "pytorch"
        sequences: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        model = rec.model.model
        if kind == "tisasrec":  # record the sequences the served forward reads (and run it)
            sequence = model.sequence
            model.sequence = lambda batch: sequences.append(sequence(batch)[:2]) or sequence(batch)
        answers = rec.recommend_batch(queries)
        alone = [rec.recommend_batch([queries[i]])[0] for i in range(0, 1_659, 97)]
    assert len(answers) == 1_659
    assert_served_as_offline(answers, expected, rec.item_index)
    for answer in answers:  # every answer, explanations included, fits the HTTP contract
        assert not isinstance(answer, RequestError)
        RecommendResponse.model_validate(answer.to_json())
    for one, row in zip(alone, range(0, 1_659, 97), strict=True):  # alone: the same answer
        assert [(i, c) for i, _, c in one.items] == [(i, c) for i, _, c in answers[row].items]
        assert [s for _, s, _ in one.items] == pytest.approx(
            [s for _, s, _ in answers[row].items], rel=1e-5, abs=1e-5
        )
    if kind == "tisasrec":  # the served sequence is the offline example's, times included
        offline = bundle.load_model().sequence(
            load_dataset(data, splits=("test",)).test.arrays.batch()
        )
        assert torch.equal(sequences[0][0], offline[0]) and torch.equal(sequences[0][1], offline[1])
    for row in range(0, 1_659, 5):
        explanation = answers[row].explanation
        assert explanation is not None
        if kind == "pop":
            assert explanation["method"] == "popularity" and explanation["long_term"] == []
            assert "popularity" in explanation["summary"]
            continue
        assert explanation["method"] == "self_attention"
        events = explanation["long_term"] + explanation["short_term"]
        assert sum(e["weight"] for e in events) == pytest.approx(1.0, abs=1e-5)
        # the events the model read: the last max_len of [long-term ; session]
        example = test_users.row(row, named=True)
        sequence = (example["long_items"] + example["short_items"])[-model.config.max_len :]
        assert [e["item_id"] for e in events] == [rec.item_ids[i] for i in sequence]
        assert explanation["long_term_summary_weight"] == 0.0


# ------------------------------------------------------------------ time and sessions
def test_recommendations_follow_the_session_and_the_passage_of_time(
    recommender: Recommender, test_users: pl.DataFrame
) -> None:
    user, ref = (
        test_users.filter(pl.col("short_items").list.len() == 0).row(0, named=True)["user_id"],
        test_users.filter(pl.col("short_items").list.len() == 0).row(0, named=True)["ref_time"],
    )
    before = recommender.store.recent(user)
    base = recommender.recommend(Query(user_id=user, k=10, now=ref, explain=True))
    # A click now starts a session: the short-term input changes the answer.
    clicked = base.items[0][0]
    session = recommender.recommend(
        Query(user_id=user, k=10, now=ref + 60, events=[(clicked, ref + 30)], explain=True)
    )
    assert session.items != base.items
    assert [e["item_id"] for e in session.explanation["short_term"]] == [clicked]
    assert clicked not in [i for i, _, _ in session.items]  # seen, so excluded
    # The same click long ago is long-term history instead, with a small time feature.
    later = recommender.recommend(
        Query(user_id=user, k=10, now=ref + 400 * DAY, events=[(clicked, ref + 30)], explain=True)
    )
    assert later.explanation["short_term"] == []
    assert later.explanation["long_term"][-1]["item_id"] == clicked
    assert later.explanation["long_term"][-1]["tau"] == pytest.approx(1 / 8)  # 400 days
    assert later.items != session.items
    # Request events are not stored; events after `now` are ignored.
    assert recommender.store.recent(user) == before
    future = recommender.recommend(
        Query(user_id=user, k=10, now=ref, events=[(clicked, ref + DAY)], explain=True)
    )
    assert future.items == base.items and future.explanation == base.explanation


def test_explanations_are_attention_distributions_over_the_events_used(
    recommender: Recommender, test_users: pl.DataFrame
) -> None:
    row = test_users.filter(pl.col("short_items").list.len() >= 2).row(0, named=True)
    answer = recommender.recommend(
        Query(user_id=row["user_id"], k=5, now=row["ref_time"], explain=True)
    )
    exp = answer.explanation
    assert exp is not None and exp["reference_time"] == row["ref_time"]
    ids = recommender.item_ids
    window = recommender.model.model.config.long_window
    assert [e["item_id"] for e in exp["long_term"]] == [ids[i] for i in row["long_items"][-window:]]
    assert [e["tau"] for e in exp["long_term"]] == pytest.approx(row["long_tau"][-window:])
    assert [e["item_id"] for e in exp["short_term"]] == [ids[i] for i in row["short_items"]]
    assert sum(e["weight"] for e in exp["long_term"]) == pytest.approx(1.0, abs=1e-5)
    total = exp["long_term_summary_weight"] + sum(e["weight"] for e in exp["short_term"])
    assert total == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= e["weight"] <= 1 for e in exp["long_term"] + exp["short_term"])
    assert exp["user_category"] == recommender.category_names[row["user_category"]]
    # Timestamps of the long-term events are the stored ones.
    stored = {(e.item_id, e.timestamp) for e in recommender.store.recent(row["user_id"])}
    assert all((e["item_id"], e["timestamp"]) in stored for e in exp["long_term"])
    # Explaining does not change the answer. (It runs on PyTorch, a plain request on the ONNX
    # graph: the same items, scores equal to float32 rounding.)
    plain = recommender.recommend(Query(user_id=row["user_id"], k=5, now=row["ref_time"]))
    assert [(i, c) for i, _, c in plain.items] == [(i, c) for i, _, c in answer.items]
    assert [s for _, s, _ in plain.items] == pytest.approx(
        [s for _, s, _ in answer.items], rel=1e-5, abs=1e-5
    )


def test_inactivity_gap_sessions_end_when_the_user_pauses(tmp_path: Path) -> None:
    """A second-level log with 30-minute sessions: `now` decides what is the current session."""
    from pipelines.synthetic import generate_log
    from serving.index_builder import build_bundle_index

    generate_log(tmp_path / "raw", users=300, items=200, events=12_000, seed=3)
    data = tmp_path / "data"
    assert main(["prepare", "--interactions", str(tmp_path / "raw/interactions.parquet"),
                 "--items", str(tmp_path / "raw/items.parquet"), "--out", str(data),
                 "--session", "gap:30m", "--split", "leave-one-out", "--quiet"]) == 0  # fmt: skip
    fit(preset("default").override(epochs=1), data, tmp_path / "run", mlflow=False, progress=False)
    write_bundle(tmp_path / "run", data, tmp_path / "bundle", index_builder=build_bundle_index)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest["features"]["session"] == "gap:1800s"
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        rec = Recommender(bundle, store)
        a, b, c = rec.item_ids[1:4]
        t0 = 1_700_000_000
        store.append("u", [Event(a, t0), Event(b, t0 + 600), Event(c, t0 + 7_200)])

        def split(now: int) -> tuple[list[str], list[str]]:
            exp = rec.recommend(Query(user_id="u", now=now, explain=True)).explanation
            assert exp is not None
            return [e["item_id"] for e in exp["long_term"]], [
                e["item_id"] for e in exp["short_term"]
            ]

        assert split(t0 + 1_200) == ([], [a, b])  # 10 min after b: still that session
        assert split(t0 + 3_600) == ([a, b], [])  # 50 min of silence: a new session
        assert split(t0 + 7_300) == ([a, b], [c])
        assert split(t0 + 7_200 + 1_801) == ([a, b, c], [])


# ------------------------------------------------------------------ cold start, filters
def test_cold_start_uses_popularity_and_neutral_parameters(
    recommender: Recommender, served: tuple[Path, Bundle]
) -> None:
    _, bundle = served
    pop = bundle.popularity
    ids = recommender.item_ids
    cold = recommender.recommend(Query(user_id="never-seen", k=7))
    assert cold.strategy == "popularity"
    assert [i for i, _, _ in cold.items] == [ids[i] for i in pop["index"].head(7).to_list()]
    # Per category when filtered: the popularity order restricted to those categories.
    names = recommender.category_names
    top_cat = pop["category"][0]
    filtered = recommender.recommend(Query(user_id="never-seen", k=5, categories=[names[top_cat]]))
    assert filtered.strategy == "popularity_category"
    in_cat = pop.filter(pl.col("category") == top_cat)["index"].head(5).to_list()
    assert [i for i, _, _ in filtered.items] == [ids[i] for i in in_cat]
    # An unknown user with events gets the model with neutral personal parameters (user 0).
    item = ids[pop["index"][0]]
    now = 1_400_000_000
    neutral = recommender.recommend(
        Query(user_id="never-seen", k=10, now=now, events=[(item, now - 100), ("nope", now)])
    )
    assert neutral.strategy == "model_neutral_user"
    assert neutral.unknown_items == ["nope"]
    assert item not in [i for i, _, _ in neutral.items]
    frame = pl.DataFrame(
        {
            "user": [0],
            "long_items": [[]],
            "long_tau": [[]],
            "short_items": [[recommender.item_index[item]]],
            "user_category": [0],
        },
        schema={
            "user": pl.Int32,
            "long_items": pl.List(pl.Int32),
            "long_tau": pl.List(pl.Float32),
            "short_items": pl.List(pl.Int32),
            "user_category": pl.Int32,
        },
    )
    from tlsan.data import arrays_from_frame

    model = recommender.model.model
    with torch.inference_mode():
        batch = arrays_from_frame(frame).batch()
        scores = (model.user_vectors(batch) @ model.item_vectors().T)[0].numpy()
    scores[0] = scores[recommender.item_index[item]] = float("-inf")
    best = np.argsort(-scores, kind="stable")[:10].tolist()
    assert [i for i, _, _ in neutral.items] == [ids[i] for i in best]
    # Only unknown items: no usable history, so popularity, and the ids are listed.
    only_unknown = recommender.recommend(Query(user_id="x", k=3, events=[("nope", now)]))
    assert only_unknown.strategy == "popularity" and only_unknown.unknown_items == ["nope"]


def test_filters_return_k_items_when_the_catalog_has_them(
    recommender: Recommender, test_users: pl.DataFrame, served: tuple[Path, Bundle]
) -> None:
    _, bundle = served
    row = test_users.row(3, named=True)
    user, now = row["user_id"], row["ref_time"]
    counts = bundle.items.group_by("category").len().sort("len")
    small_cat = counts.filter(pl.col("len") >= 3)["category"][0]
    n_small = int(counts.filter(pl.col("category") == small_cat)["len"][0])
    names = recommender.category_names
    seen = {e.item_id for e in recommender.store.recent(user)}
    allowed = {names[small_cat], names[counts["category"][-1]]}
    answer = recommender.recommend(Query(user_id=user, k=20, now=now, categories=list(allowed)))
    assert len(answer.items) == 20
    assert all(cat in allowed for _, _, cat in answer.items)
    assert not seen & {i for i, _, _ in answer.items}
    scores = [s for _, s, _ in answer.items]
    assert scores == sorted(scores, reverse=True)
    # Fewer eligible items than k: all of them, nothing else.
    few = recommender.recommend(
        Query(user_id=user, k=1000, now=now, categories=[names[small_cat]], exclude_seen=False)
    )
    assert len(few.items) == n_small
    # exclude_seen=False lets seen items back in; by default they never appear.
    everything = recommender.recommend(Query(user_id=user, k=1000, now=now, exclude_seen=False))
    assert len(everything.items) == 1_000 and seen & {i for i, _, _ in everything.items}
    with pytest.raises(RequestError, match="unknown categories") as info:
        recommender.recommend(Query(user_id=user, categories=["no-such-category"]))
    assert info.value.field == "categories" and info.value.status == 400


def test_batches_answer_each_query_as_if_alone(
    recommender: Recommender, test_users: pl.DataFrame
) -> None:
    rows = test_users.head(6).rows(named=True)
    queries = [
        Query(user_id=rows[0]["user_id"], k=3, now=rows[0]["ref_time"]),
        Query(user_id="cold", k=4),
        Query(user_id=rows[1]["user_id"], k=12, now=rows[1]["ref_time"], explain=True),
        Query(user_id=rows[2]["user_id"], categories=["no-such-category"]),
        Query(user_id="new", k=5, now=10 * DAY, events=[(recommender.item_ids[5], 9 * DAY)]),
        Query(user_id=rows[3]["user_id"], k=1, now=rows[3]["ref_time"], exclude_seen=False),
    ]
    together = recommender.recommend_batch(queries)
    assert isinstance(together[3], RequestError)
    for query, answer in zip(queries, together, strict=True):
        if query.categories:
            continue
        alone = recommender.recommend(query)
        assert [i for i, _, _ in answer.items] == [i for i, _, _ in alone.items]
        # Scores agree up to float32 rounding (matrix products depend on the batch shape).
        assert [s for _, s, _ in answer.items] == pytest.approx([s for _, s, _ in alone.items])
        assert (answer.strategy, answer.unknown_items) == (alone.strategy, alone.unknown_items)
        assert (answer.explanation is None) == (alone.explanation is None)
        assert len(answer.items) == query.k


def test_events_are_stored_idempotently_and_similar_items_exclude_the_item(
    recommender: Recommender,
) -> None:
    known = recommender.item_ids[10]
    events = [(known, 1_000), ("mystery", 1_001)]
    first = recommender.record_events("fresh-user", events)
    assert first == {
        "user_id": "fresh-user",
        "received": 2,
        "stored": 2,
        "unknown_items": ["mystery"],
    }
    assert recommender.record_events("fresh-user", events)["stored"] == 0
    assert recommender.store.recent("fresh-user") == [Event(known, 1_000), Event("mystery", 1_001)]
    similar = recommender.similar_items(known, 5)
    assert len(similar["items"]) == 5
    assert known not in [i["item_id"] for i in similar["items"]]
    scores = [i["score"] for i in similar["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-6
    with pytest.raises(RequestError, match="unknown item 'mystery'") as info:
        recommender.similar_items("mystery", 5)
    assert info.value.status == 404


# ------------------------------------------------------------------ micro-batching
@pytest.mark.parametrize("inline_max", [1, 8])  # groups in the batch thread / in the loop
def test_concurrent_calls_share_batches_and_keep_their_own_results(inline_max: int) -> None:
    calls: list[list[int]] = []
    threads: set[str] = set()

    def square(batch: list[int]) -> list[int | BaseException]:
        calls.append(list(batch))
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # a batch takes a while: the next calls queue up meanwhile
        return [ValueError(f"odd {x}") if x == 13 else x * x for x in batch]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, max_batch_size=8, inline_max=inline_max)

    async def run() -> list[int | str]:
        async def one(x: int) -> int | str:
            try:
                return await batcher.submit(x)
            except ValueError as exc:
                return str(exc)

        return await asyncio.gather(*(one(x) for x in range(40)))

    try:
        results = asyncio.run(run())
    finally:
        batcher.close()
    assert results == [f"odd {x}" if x == 13 else x * x for x in range(40)]
    assert sorted(x for batch in calls for x in batch) == list(range(40))
    assert max(len(b) for b in calls) == 8  # capped, and grouped under load
    assert len(calls) <= 40 // 8 + 2
    assert batcher.stats.items == 40 and batcher.stats.batches == len(calls)
    # inline_max 8 (the service's setting) runs every batch in the event loop's thread
    assert (threads == {threading.main_thread().name}) == (inline_max == 8)


def test_a_lone_call_runs_at_once_and_a_failing_batch_fails_its_callers() -> None:
    def boom(batch: list[int]) -> list[int]:
        if 0 in batch:
            raise RuntimeError("model crashed")
        return batch

    batcher: MicroBatcher[int, int] = MicroBatcher(boom, max_batch_size=4)

    async def run() -> tuple[float, str]:
        start = time.perf_counter()
        assert await batcher.submit(5) == 5
        elapsed = time.perf_counter() - start
        try:
            await batcher.submit(0)
        except RuntimeError as exc:
            return elapsed, str(exc)
        return elapsed, "no error"

    try:
        elapsed, error = asyncio.run(run())
    finally:
        batcher.close()
    assert elapsed < 0.5  # no batching window to wait for
    assert error == "model crashed"
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(boom, max_batch_size=0)


def test_a_lone_call_runs_in_the_event_loop_and_a_batch_in_the_batch_thread() -> None:
    """A single queued call skips the thread hand-off (its latency is the compute alone);
    a group runs in the batch thread so the loop keeps accepting requests meanwhile."""
    threads: list[tuple[int, str]] = []

    def record(batch: list[int]) -> list[int]:
        threads.append((len(batch), threading.current_thread().name))
        return batch

    batcher: MicroBatcher[int, int] = MicroBatcher(record, max_batch_size=8, name="grouped")

    async def run() -> None:
        assert await batcher.submit(1) == 1
        assert await asyncio.gather(*(batcher.submit(x) for x in range(5))) == list(range(5))

    try:
        asyncio.run(run())
    finally:
        batcher.close()
    assert threads[0] == (1, threading.main_thread().name)
    assert threads[1][0] == 5 and threads[1][1].startswith("grouped")
    with pytest.raises(ValueError, match="inline_max"):
        MicroBatcher(record, inline_max=-1)
