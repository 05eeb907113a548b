"""FAISS retrieval: exactness, HNSW recall, filters that never come up short, index files."""

from __future__ import annotations

import gc
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.retrieval import (
    DEFAULT_EF_SEARCH,
    Retriever,
    build_index,
    load_index,
    save_index,
    unpad,
)
from serving.synthetic_vectors import clustered_catalog
from tlsan.errors import BundleError, ConfigError, TlsanError

K = 10


def brute_force(
    items: np.ndarray,
    query: np.ndarray,
    k: int,
    exclude: set[int] = frozenset(),
    allowed: set[int] | None = None,
    cats: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ranking: every eligible item scored, score desc then item index asc."""
    scores = items.astype(np.float64) @ query.astype(np.float64)
    idx = np.arange(1, len(items) + 1)
    keep = ~np.isin(idx, list(exclude))
    if allowed is not None:
        keep &= np.isin(cats, list(allowed))
    idx, scores = idx[keep], scores[keep]
    order = np.lexsort((idx, -scores))[:k]
    return idx[order], scores[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


@pytest.fixture(scope="module")
def small() -> dict:
    """20k clustered items with 12 categories (unevenly sized) and one index of each kind."""
    cat = clustered_catalog(20_000, 32, n_queries=64, seed=7)
    cats = (cat.clusters % 12).astype(np.int64)
    indexes = {
        "flat": build_index(cat.items, "flat"),
        "hnsw": build_index(cat.items, "hnsw"),
        "ivf": build_index(cat.items, "ivf"),
    }
    return {"items": cat.items, "queries": cat.queries, "cats": cats, "indexes": indexes}


@pytest.fixture(scope="module")
def catalog_50k() -> dict:
    cat = clustered_catalog(50_000, 64, n_queries=300, seed=11)
    return {"items": cat.items, "queries": cat.queries, "index": build_index(cat.items, "hnsw")}


def with_padding(cats: np.ndarray) -> np.ndarray:
    """Categories indexed by item index (entry 0 = padding), as the vocabulary stores them."""
    return np.concatenate([[0], cats])


# ------------------------------------------------------------------ exactness and recall
def test_flat_equals_brute_force_ranking(small: dict) -> None:
    items, queries = small["items"], small["queries"]
    index = small["indexes"]["flat"]
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlatIP)
    found, scores = Retriever(index, items).search(queries, K)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    assert found.shape == scores.shape == (len(queries), K)
    for b, query in enumerate(queries):
        ref_idx, ref_scores = brute_force(items, query, K)
        np.testing.assert_array_equal(found[b], ref_idx)
        np.testing.assert_allclose(scores[b], ref_scores, rtol=1e-5, atol=1e-5)


def test_queries_without_bias_column_get_the_constant_one(small: dict) -> None:
    retriever = Retriever(small["indexes"]["flat"], small["items"])
    queries = small["queries"]
    with_one = retriever.search(queries, K)
    without = retriever.search(queries[:, :-1], K)
    np.testing.assert_array_equal(with_one[0], without[0])
    np.testing.assert_array_equal(with_one[1], without[1])
    single = retriever.search(queries[3], K)  # one 1-D query is a batch of one
    np.testing.assert_array_equal(single[0][0], with_one[0][3])


def test_hnsw_recall_at_10_on_50k_clustered_items(catalog_50k: dict) -> None:
    items, queries, index = catalog_50k["items"], catalog_50k["queries"], catalog_50k["index"]
    hnsw = faiss.downcast_index(index)
    assert isinstance(hnsw, faiss.IndexHNSWFlat)
    assert hnsw.metric_type == faiss.METRIC_INNER_PRODUCT
    assert hnsw.hnsw.efSearch == DEFAULT_EF_SEARCH
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)  # (300, 50k), one product
    truth = np.argpartition(-scores, K, axis=1)[:, :K] + 1  # exact top-10 sets
    _, raw = index.search(queries, K)
    assert recall(raw + 1, truth) >= 0.95
    found, scores = Retriever(index, items).search(queries, K)
    assert recall(found, truth) >= 0.95
    # scores are exact re-scores, sorted descending
    exact = np.einsum("bkd,bd->bk", items[found - 1], queries)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_auto_picks_flat_below_threshold_and_hnsw_above(small: dict) -> None:
    items = small["items"][:500]
    flat = build_index(items, "auto", flat_threshold=501)
    hnsw = build_index(items, "auto", flat_threshold=500, hnsw_m=8, ef_construction=40)
    assert isinstance(faiss.downcast_index(flat), faiss.IndexFlatIP)
    assert isinstance(faiss.downcast_index(hnsw), faiss.IndexHNSWFlat)
    assert flat.ntotal == hnsw.ntotal == 500 and flat.d == hnsw.d == items.shape[1]


def test_l2_reduction_index_takes_plain_queries(small: dict) -> None:
    """mips='l2' wraps the augmented index: same d as the items, MIPS order from search()."""
    items, queries = small["items"][:3000], small["queries"]
    index = build_index(items, "hnsw", mips="l2", hnsw_m=16, ef_construction=200, ef_search=256)
    gc.collect()  # the wrapper must keep its inner index and transform alive by itself
    assert index.d == items.shape[1] and index.ntotal == len(items)
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    assert inner.d == items.shape[1] + 1 and inner.metric_type == faiss.METRIC_L2
    truth = np.stack([brute_force(items, q, K)[0] for q in queries])
    found, _ = Retriever(index, items).search(queries, K)
    assert recall(found, truth) >= 0.8  # the reduction is weaker than ip-HNSW, but it works


# ------------------------------------------------------------------------------ filters
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_filters_return_exactly_k_eligible_items(small: dict, kind: str) -> None:
    items, queries, cats = small["items"], small["queries"], small["cats"]
    retriever = Retriever(small["indexes"][kind], items, with_padding(cats))
    rng = np.random.default_rng(1)
    exclude, allowed = [], []
    for b, query in enumerate(queries):
        top = brute_force(items, query, 60)[0]
        exclude.append(set(top[: 5 + b % 50].tolist()) | set(rng.integers(1, 20_001, 30).tolist()))
        allowed.append(
            None if b % 3 == 0 else set(rng.choice(12, 1 + b % 4, replace=False).tolist())
        )
    found, scores = retriever.search(queries, K, exclude=exclude, allowed_categories=allowed)
    assert (found >= 1).all() and np.isfinite(scores).all()
    truth = []
    for b in range(len(queries)):
        assert len(set(found[b].tolist())) == K
        assert not set(found[b].tolist()) & exclude[b]
        if allowed[b] is not None:
            assert set(cats[found[b] - 1].tolist()) <= allowed[b]
        exact = items[found[b] - 1] @ queries[b]
        np.testing.assert_allclose(scores[b], exact, rtol=1e-5, atol=1e-5)
        truth.append(brute_force(items, queries[b], K, exclude[b], allowed[b], cats)[0])
    if kind == "flat":
        np.testing.assert_array_equal(found, np.stack(truth))
    else:
        assert recall(found, truth) >= 0.9


def adversarial_case(items: np.ndarray, query: np.ndarray) -> tuple[set[int], np.ndarray]:
    """Exclude the best 200 items and allow only the worse-scoring half (category 1): every
    one of the first C = 210 FAISS candidates is excluded or off-category."""
    order = brute_force(items, query, len(items))[0]
    cats = np.zeros(len(items), np.int64)
    cats[order[len(items) // 2 :] - 1] = 1
    return set(order[:200].tolist()), cats


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_all_faiss_candidates_filtered_out_still_gives_k_valid_items(
    small: dict, kind: str
) -> None:
    items, query = small["items"], small["queries"][0]
    exclude, cats = adversarial_case(items, query)
    retriever = Retriever(small["indexes"][kind], items, cats, ann_depth=10**9)
    found, scores = retriever.search(query, K, exclude=[exclude], allowed_categories=[{1}])
    assert retriever.stats.widened == 1  # the first round found nothing eligible
    assert len(set(found[0].tolist())) == K and (found[0] >= 1).all()
    assert not set(found[0].tolist()) & exclude
    assert (cats[found[0] - 1] == 1).all()
    np.testing.assert_allclose(scores[0], items[found[0] - 1] @ query, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores[0]) <= 0).all()
    if kind == "flat":  # an exact index goes straight to the exact fallback
        ref_idx, ref_scores = brute_force(items, query, K, exclude, {1}, cats)
        np.testing.assert_array_equal(found[0], ref_idx)
        np.testing.assert_allclose(scores[0], ref_scores, rtol=1e-5, atol=1e-5)
        assert retriever.stats.exact == 1 and retriever.stats.faiss_calls == 1


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_widening_past_max_candidates_falls_back_to_exact(small: dict, kind: str) -> None:
    items, query = small["items"], small["queries"][0]
    exclude, cats = adversarial_case(items, query)
    retriever = Retriever(small["indexes"][kind], items, cats, ann_depth=10**9, max_candidates=400)
    found, scores = retriever.search(query, K, exclude=[exclude], allowed_categories=[{1}])
    ref_idx, ref_scores = brute_force(items, query, K, exclude, {1}, cats)
    np.testing.assert_array_equal(found[0], ref_idx)
    np.testing.assert_allclose(scores[0], ref_scores, rtol=1e-5, atol=1e-5)
    # C = 210 finds nothing eligible, C = 420 > max_candidates: exact over the eligible subset
    assert retriever.stats.widened == 1 and retriever.stats.exact == 1
    assert retriever.stats.faiss_calls == 1


def test_widening_without_fallback_when_a_wider_search_suffices(small: dict) -> None:
    items, query = small["items"], small["queries"][1]
    order = brute_force(items, query, len(items))[0]
    exclude = set(order[:100].tolist())
    cats = np.zeros(len(items), np.int64)
    cats[order[300:400] - 1] = 1  # eligible among the best 400: ranks 300..399 only ...
    cats[order[5000:] - 1] = 1  # ... and a large low-scoring tail keeps the share high
    retriever = Retriever(small["indexes"]["ivf"], items, cats, ann_depth=10**9, max_widenings=3)
    found, _ = retriever.search(query, K, exclude=[exclude], allowed_categories=[{1}])
    ref_idx, _ = brute_force(items, query, K, exclude, {1}, cats)
    np.testing.assert_array_equal(found[0], ref_idx)
    assert retriever.stats.widened == 1 and retriever.stats.exact == 0
    assert retriever.stats.faiss_calls == 3  # C = 110 -> 220 -> 440, nprobe doubling too


def test_deep_category_filters_are_scored_exactly_without_faiss(small: dict) -> None:
    """A filter keeping a share s of the catalog needs ~2k/s candidates: past `ann_depth`
    it is answered by exact per-category scoring instead of a deep, unreliable ANN search."""
    items, queries, cats = small["items"], small["queries"][:8], small["cats"]
    shares = np.bincount(cats, minlength=12) / len(cats)
    rare = [c for c in range(12) if 0 < shares[c] < 2 * K / 128]
    assert len(rare) >= 2
    retriever = Retriever(small["indexes"]["hnsw"], items, with_padding(cats), ann_depth=128)
    allowed = [{rare[b % len(rare)]} for b in range(8)]
    exclude = [set(brute_force(items, q, 30)[0][::2].tolist()) for q in queries]
    found, scores = retriever.search(queries, K, exclude=exclude, allowed_categories=allowed)
    assert retriever.stats.faiss_calls == 0 and retriever.stats.exact == 8
    for b, query in enumerate(queries):
        ref_idx, ref_scores = brute_force(items, query, K, exclude[b], allowed[b], cats)
        np.testing.assert_array_equal(found[b], ref_idx)
        np.testing.assert_allclose(scores[b], ref_scores, rtol=1e-5, atol=1e-5)


def test_fewer_than_k_eligible_items_are_padded(small: dict) -> None:
    items, queries = small["items"], small["queries"][:3]
    cats = np.zeros(len(items), np.int64)
    rare = np.array([17, 4242, 19_999])  # rows; item indices are rows + 1
    cats[rare] = 5
    retriever = Retriever(small["indexes"]["hnsw"], items, cats)
    allowed = [{5}, {5}, set()]
    exclude = [set(), {int(rare[0]) + 1}, set()]
    found, scores = retriever.search(queries, K, exclude=exclude, allowed_categories=allowed)
    expect0 = brute_force(items, queries[0], K, set(), {5}, cats)[0]
    np.testing.assert_array_equal(found[0, :3], expect0)
    assert (found[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert sorted(found[1, :2].tolist()) == sorted((rare[1:] + 1).tolist())
    assert (found[1, 2:] == -1).all()
    assert (found[2] == -1).all()  # an empty allowed set admits nothing
    lists = unpad(found, scores)
    assert [len(row) for row in lists] == [3, 2, 0]
    assert all(isinstance(i, int) and isinstance(s, float) for i, s in lists[0])


def test_padding_item_is_never_returned_and_rows_map_to_index_plus_one() -> None:
    rng = np.random.default_rng(3)
    items = rng.standard_normal((50, 9)).astype(np.float32)
    items[0] = 10.0  # row 0 = item 1 is the best for a positive query
    items[-1] = -10.0  # row 49 = item 50 is the best for a negative query
    queries = np.stack([np.ones(9), -np.ones(9)]).astype(np.float32)
    for index in (build_index(items, "flat"), build_index(items, "hnsw", hnsw_m=8)):
        retriever = Retriever(index, items)
        found, scores = retriever.search(queries, 80, exclude=[{0}, {0, 51, -3}])
        assert found[0, 0] == 1 and found[1, 0] == 50
        assert (found[:, :50] >= 1).all() and (found[:, :50] <= 50).all()
        assert (found[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()
        assert 0 not in found


def test_ties_are_broken_by_item_index() -> None:
    items = np.zeros((30, 5), np.float32)
    items[[20, 6, 11, 2]] = 1.0  # four identical best rows: items 21, 7, 12, 3
    retriever = Retriever(build_index(items, "flat"), items)
    found, scores = retriever.search(np.ones((1, 5), np.float32), 3)
    assert found[0].tolist() == [3, 7, 12]
    assert (scores[0] == 5.0).all()


def test_a_batch_equals_its_rows_searched_alone(small: dict) -> None:
    """Per-row filters stay per row in the vectorised batch path (exact index: same answers)."""
    items, queries, cats = small["items"], small["queries"][:12], small["cats"]
    retriever = Retriever(small["indexes"]["flat"], items)
    exclude = [set(range(1, 1 + 40 * b)) for b in range(12)]
    allowed = [None if b % 2 else {b % 12, 3} for b in range(12)]
    batch = retriever.search(
        queries, K, exclude=exclude, allowed_categories=allowed, item_categories=cats
    )
    for b in range(12):
        alone = retriever.search(
            queries[b : b + 1],
            K,
            exclude=[exclude[b]],
            allowed_categories=[allowed[b]],
            item_categories=cats,
        )
        np.testing.assert_array_equal(batch[0][b], alone[0][0])
        np.testing.assert_array_equal(batch[1][b], alone[1][0])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_a_lone_query_takes_the_short_route_with_the_general_routes_answer(
    small: dict, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone query without a category filter skips the batch planning; its answer must be
    the general route's, also where the short route has to give up (every FAISS candidate
    excluded, more exclusions than the candidate budget)."""
    items, queries = small["items"], small["queries"]
    order = brute_force(items, queries[0], len(items))[0]
    cases: list[tuple[np.ndarray, int, set[int] | None]] = [
        (queries[1], K, None),
        (queries[2], 1, set()),
        (queries[3], 25, set(range(1, 400, 3))),
        (queries[0], K, set(order[:200].tolist())),  # the best 200 excluded
        (queries[0], K, set(order[:1_000].tolist())),  # IVF's first probe comes up short
        (queries[4], K, set(range(1, 3_000))),  # C = k + 2,999 > max_candidates
    ]
    short = Retriever(small["indexes"][kind], items)
    general = Retriever(small["indexes"][kind], items)
    monkeypatch.setattr(general, "_search_one", lambda *args: None)
    answered: list[bool] = []
    search_one = short._search_one

    def spy(*args):  # records whether the short route settled the query itself
        found = search_one(*args)
        answered.append(found is not None)
        return found

    monkeypatch.setattr(short, "_search_one", spy)
    for query, k, exclude in cases:
        kwargs = {} if exclude is None else {"exclude": [exclude]}
        got = short.search(query, k, **kwargs)
        want = general.search(query, k, **kwargs)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert len(answered) == len(cases)
    assert answered[:3] == [True, True, True], "the plain cases are the short route's own"
    assert answered[-1] is False, "over the candidate budget it must give up"
    assert short.stats.queries == general.stats.queries == len(cases)
    assert short.stats.faiss_calls == general.stats.faiss_calls
    assert short.stats.widened == general.stats.widened
    assert short.stats.exact == general.stats.exact == 1  # the over-budget case


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_items=st.integers(1, 120),
    k=st.integers(1, 30),
    n_excluded=st.integers(0, 130),
    categories=st.none() | st.sets(st.integers(0, 4), max_size=5),
)
def test_flat_filters_match_brute_force(
    seed: int, n_items: int, k: int, n_excluded: int, categories: set[int] | None
) -> None:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, 6)).astype(np.float32)
    cats = rng.integers(0, 5, n_items)
    query = rng.standard_normal(6).astype(np.float32)
    exclude = set(rng.integers(-2, n_items + 3, n_excluded).tolist())
    retriever = Retriever(build_index(items, "flat"), items, cats, max_candidates=16)
    found, scores = retriever.search(query, k, exclude=[exclude], allowed_categories=[categories])
    ref_idx, ref_scores = brute_force(items, query, k, exclude, categories, cats)
    np.testing.assert_array_equal(found[0, : ref_idx.size], ref_idx)
    np.testing.assert_allclose(scores[0, : ref_idx.size], ref_scores, rtol=1e-5, atol=1e-5)
    assert (found[0, ref_idx.size :] == -1).all()


# ------------------------------------------------------------------------ similar items
def test_similar_items_are_cosine_neighbours_without_the_item_itself(small: dict) -> None:
    items = small["items"][:2000]
    retriever = Retriever(build_index(items, "flat"), items)
    asked = np.array([1, 77, 2000])
    found, sims = retriever.similar_items(asked, 5)
    feats = items[:, :-1].astype(np.float64)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for b, item in enumerate(asked):
        cos = unit @ unit[item - 1]
        cos[item - 1] = -np.inf
        ref = np.lexsort((np.arange(1, 2001), -cos))[:5] + 1
        np.testing.assert_array_equal(found[b], ref)
        np.testing.assert_allclose(sims[b], cos[ref - 1], rtol=1e-5, atol=1e-5)
        assert item not in found[b]
    one, _ = retriever.similar_items(77, 5)
    np.testing.assert_array_equal(one[0], found[1])
    tiny = Retriever(build_index(items[:3], "flat"), items[:3])
    found, sims = tiny.similar_items([2], 5)
    assert sorted(found[0, :2].tolist()) == [1, 3] and (found[0, 2:] == -1).all()
    with pytest.raises(TlsanError, match="item_idx: 0 is not an item index"):
        tiny.similar_items(0, 3)


# -------------------------------------------------------------------------- index files
@pytest.mark.parametrize(
    ("kind", "mips"), [("flat", None), ("hnsw", None), ("hnsw", "l2"), ("ivf", None), ("ivf", "ip")]
)
def test_save_load_roundtrip(small: dict, tmp_path: Path, kind: str, mips: str | None) -> None:
    items, queries = small["items"][:4000], small["queries"]
    index = build_index(items, kind, mips=mips, hnsw_m=16, ef_construction=60, ef_search=48)
    path = tmp_path / "bundle" / "items.faiss"
    save_index(index, path)
    save_index(index, path)  # overwriting is atomic too
    assert [p.name for p in path.parent.iterdir()] == ["items.faiss"]
    loaded = load_index(path, expected_dim=items.shape[1], expected_n=len(items))
    assert type(faiss.downcast_index(loaded)) is type(faiss.downcast_index(index))
    np.testing.assert_array_equal(index.search(queries, K)[1], loaded.search(queries, K)[1])
    before = Retriever(index, items).search(queries, K)
    after = Retriever(loaded, items).search(queries, K)
    np.testing.assert_array_equal(before[0], after[0])
    if kind == "hnsw" and mips is None:
        assert faiss.downcast_index(loaded).hnsw.efSearch == 48


def test_bad_index_files_raise_bundle_error(small: dict, tmp_path: Path) -> None:
    items = small["items"][:1000]
    dim = items.shape[1]
    with pytest.raises(BundleError, match="missing.faiss: file not found"):
        load_index(tmp_path / "missing.faiss", dim, 1000)
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"not a faiss index" * 10)
    with pytest.raises(BundleError, match="garbage.faiss: not a readable FAISS index"):
        load_index(garbage, dim, 1000)
    good = save_index(
        build_index(items, "hnsw", hnsw_m=8, ef_construction=40), tmp_path / "a.faiss"
    )
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated.faiss: not a readable FAISS index"):
        load_index(truncated, dim, 1000)
    with pytest.raises(BundleError, match=f"dimension {dim}, expected {dim + 1}"):
        load_index(good, dim + 1, 1000)
    with pytest.raises(BundleError, match="holds 1000 items, expected 999"):
        load_index(good, dim, 999)
    assert load_index(good, dim, 1000).ntotal == 1000


# ------------------------------------------------------------------------ bad arguments
def test_bad_arguments_name_the_parameter(small: dict) -> None:
    items = small["items"][:500]
    with pytest.raises(ConfigError, match="index kind: expected one of auto, flat, hnsw, ivf"):
        build_index(items, "annoy")
    with pytest.raises(ConfigError, match="hnsw_m: expected a positive integer"):
        build_index(items, "hnsw", hnsw_m=0)
    with pytest.raises(ConfigError, match="nlist: expected at most n_items=500"):
        build_index(items, "ivf", nlist=501)
    with pytest.raises(TlsanError, match="item_vectors: expected a 2-D array"):
        build_index(items[0], "flat")
    bad = items.copy()
    bad[3, 2] = np.nan
    with pytest.raises(TlsanError, match="row 3 \\(item index 4\\) holds NaN"):
        build_index(bad, "flat")
    retriever = Retriever(build_index(items, "flat"), items)
    query = small["queries"][:2]
    with pytest.raises(ConfigError, match="k: expected a positive integer"):
        retriever.search(query, 0)
    with pytest.raises(TlsanError, match=r"queries: expected shape \(B, 32\)"):
        retriever.search(np.ones((2, 7), np.float32), K)
    with pytest.raises(TlsanError, match=r"exclude: expected one entry per query \(2\), got 1"):
        retriever.search(query, K, exclude=[set()])
    with pytest.raises(TlsanError, match="item_categories: required"):
        retriever.search(query, K, allowed_categories=[{1}, None])
    with pytest.raises(TlsanError, match="item_categories: expected 501 entries"):
        retriever.search(query, K, allowed_categories=[{1}, None], item_categories=np.ones(7, int))
    with pytest.raises(TlsanError, match="index: covers 500 vectors"):
        Retriever(build_index(items, "flat"), items[:400])
    with pytest.raises(ConfigError, match="max_widenings: expected an integer >= 0"):
        Retriever(build_index(items, "flat"), items, max_widenings=-1)
    with pytest.raises(ConfigError, match="ann_depth: expected a positive integer"):
        Retriever(build_index(items, "flat"), items, ann_depth=0)
    with pytest.raises(TlsanError, match="allowed_categories\\[1\\]: expected category indices"):
        retriever.search(
            query, K, allowed_categories=[None, {"a"}], item_categories=np.ones(500, int)
        )
    with pytest.raises(TlsanError, match=r"exclude\[1\]: expected item indices \(ints\)"):
        retriever.search(query, K, exclude=[{1}, {2.5}])


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(-5, 60), min_size=1, max_size=30),
    values=st.lists(st.integers(-10, 70), min_size=0, max_size=40),
)
def test_sorted_contains_equals_isin(keys: list[int], values: list[int]) -> None:
    """The binary-search membership test the exclude filter uses agrees with np.isin."""
    from serving.retrieval import _sorted_contains

    sorted_keys = np.unique(np.array(keys, np.int64))
    arr = np.array(values, np.int64).reshape(-1, 1) if values else np.empty((0, 1), np.int64)
    assert np.array_equal(_sorted_contains(sorted_keys, arr), np.isin(arr, sorted_keys))
