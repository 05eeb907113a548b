"""FAISS retrieval over a synthetic clustered catalog: exact (IndexFlatIP) vs HNSW vs IVF.

The catalog is `serving.synthetic_vectors.clustered_catalog`: a Gaussian mixture of unit
directions (one cluster per ~1,000 items, uneven sizes) with log-normal norms and a bias
column that grows with the norm, D = dim + 1 = 65; queries `[u_t ; 1]` mix the same clusters.

Index level, for each index: build time, recall@10 against the exact top-10 (raw FAISS search,
k = 10), median latency of one query alone and per query of a batch of 32, and the speedup over
the exact index measured in the same run. HNSW is swept over efSearch, IVF over nprobe.
Variants: `hnsw` (inner-product graph, the default), `hnsw-l2` (MIPS->L2 reduction), `ivf`
(reduction, the default for IVF), `ivf-ip`.

End to end, the `Retriever` (FAISS top-C, filters, exact re-scoring: what serving runs) with
the default settings on the exact index and on HNSW, without filters and with three filters:
`exclude_seen` (50 items per query, half of them from its own exact top 50, as a user's
history ranks high), `one_category` (1 of 12 categories, ~8% of the catalog: scored exactly
by category slices) and `half_categories` (6 of 12: FAISS with C = max(4k, 2k / share)).
Recall is measured against the exact answer under the same filter.

Search runs on `--threads` OpenMP threads (default 1: one serving worker per core); builds use
`--build-threads` (default: all cores). Prints one JSON document.

    python benchmarks/retrieval.py                       # 1M items, ~6 min on 2 cores
    python benchmarks/retrieval.py --items 100000 --variants flat,hnsw,hnsw-l2,ivf,ivf-ip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.retrieval import (  # noqa: E402
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_HNSW_M,
    Retriever,
    build_index,
)
from serving.synthetic_vectors import clustered_catalog  # noqa: E402

K = 10
BATCH = 32
N_CATEGORIES = 12
VARIANTS = ("flat", "hnsw", "hnsw-l2", "ivf", "ivf-ip")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k found (ids may be in any order)."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def latency_ms(
    search: Callable[[slice], object], n_queries: int, n_single: int, n_batches: int
) -> dict[str, float]:
    """Median ms of one query alone, and median ms per query within a batch of 32."""
    single = []
    for i in range(n_single):
        start = time.perf_counter()
        search(slice(i % n_queries, i % n_queries + 1))
        single.append((time.perf_counter() - start) * 1e3)
    batched = []
    for j in range(n_batches):
        first = (j * BATCH) % max(n_queries - BATCH, 1)
        start = time.perf_counter()
        search(slice(first, first + BATCH))
        batched.append((time.perf_counter() - start) * 1e3 / min(BATCH, n_queries))
    return {
        "single_ms": statistics.median(single),
        "batch32_ms_per_query": statistics.median(batched),
    }


def timed_build(threads: int, **kwargs: Any) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = build_index(progress=True, **kwargs)
    return index, time.perf_counter() - start


def set_knob(index: faiss.Index, knob: str, value: int) -> None:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if knob == "efSearch":
        inner.hnsw.efSearch = value
    else:
        inner.nprobe = value


def sweep(
    name: str,
    index: faiss.Index,
    knob: str,
    values: list[int],
    queries: np.ndarray,
    truth: np.ndarray,
    exact: dict[str, float],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Recall and latency of `index` at each value of its search knob (efSearch or nprobe)."""
    rows = []
    for value in tqdm(values, desc=f"{name} {knob}", file=sys.stderr):
        set_knob(index, knob, value)
        faiss.omp_set_num_threads(args.threads)
        _, found = index.search(queries, K)
        lat = latency_ms(
            lambda s: index.search(queries[s], K), len(queries), args.single, args.batches
        )
        rows.append(
            {
                knob: value,
                "recall_at_10": recall_at_k(found, truth),
                **lat,
                "speedup_single": exact["single_ms"] / lat["single_ms"],
                "speedup_batch32": exact["batch32_ms_per_query"] / lat["batch32_ms_per_query"],
            }
        )
    return rows


def filter_scenarios(
    items: np.ndarray, queries: np.ndarray, clusters: np.ndarray, n_queries: int, seed: int
) -> tuple[np.ndarray, dict[str, dict[str, list | None]]]:
    """Per-query filters of the end-to-end runs, and item categories (cluster mod 12)."""
    rng = np.random.default_rng(seed)
    cats = clusters % N_CATEGORIES
    top50 = np.concatenate(  # exact top 50 of each query, 16 queries at a time
        [
            np.argpartition(-(queries[i : i + 16] @ items.T), 50, axis=1)[:, :50] + 1
            for i in range(0, n_queries, 16)
        ]
    )
    seen = [
        set(rng.choice(row, 25, replace=False).tolist())
        | set(rng.integers(1, len(items) + 1, 25).tolist())
        for row in top50
    ]
    one = [{int(rng.integers(N_CATEGORIES))} for _ in range(n_queries)]
    half = [set(rng.choice(N_CATEGORIES, 6, replace=False).tolist()) for _ in range(n_queries)]
    return cats, {
        "none": {"exclude": None, "allowed_categories": None},
        "exclude_seen": {"exclude": seen, "allowed_categories": None},
        "one_category": {"exclude": None, "allowed_categories": one},
        "half_categories": {"exclude": None, "allowed_categories": half},
    }


def end_to_end(
    retrievers: dict[str, Retriever],
    queries: np.ndarray,
    scenarios: dict[str, dict[str, list | None]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Recall against the exact Retriever and latency of each Retriever under each filter."""
    faiss.omp_set_num_threads(args.threads)
    out: dict[str, Any] = {}
    for scenario, filters in tqdm(scenarios.items(), desc="retriever", file=sys.stderr):
        n = len(filters["exclude"] or filters["allowed_categories"] or queries)
        q = queries[:n]
        answers = {}
        row: dict[str, Any] = {}
        for name, retriever in retrievers.items():

            def run(
                s: slice, r: Retriever = retriever, q: np.ndarray = q, f: dict = filters
            ) -> tuple[np.ndarray, np.ndarray]:
                picked = {key: None if v is None else v[s] for key, v in f.items()}
                return r.search(q[s], K, **picked)

            answers[name] = run(slice(0, n))[0]
            n_single = min(args.single, 50 if name == "exact" else args.single, n)
            stats_before = dict(vars(retriever.stats))
            lat = latency_ms(run, n, n_single, min(args.batches, 10))
            row[name] = {
                "recall_at_10": recall_at_k(answers[name], answers["exact"]),
                **lat,
                "exact_rows": retriever.stats.exact - stats_before["exact"],
                "widened_rows": retriever.stats.widened - stats_before["widened"],
            }
        for name in row:
            if name != "exact":
                for mode in ("single_ms", "batch32_ms_per_query"):
                    row[name][f"speedup_{mode.split('_')[0]}"] = (
                        row["exact"][mode] / row[name][mode]
                    )
        out[scenario] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--filter-queries", type=int, default=200, help="queries per filter run")
    parser.add_argument("--dim", type=int, default=64, help="d; vectors are d + 1 wide")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads for search")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default="flat,hnsw,ivf", help=",".join(VARIANTS))
    parser.add_argument("--hnsw-m", type=int, default=DEFAULT_HNSW_M)
    parser.add_argument("--ef-construction", type=int, default=DEFAULT_EF_CONSTRUCTION)
    parser.add_argument("--ef-search", default=f"16,32,{DEFAULT_EF_SEARCH},128,256")
    parser.add_argument("--nprobe", default="4,8,16,32,64,128", help="plus the default")
    parser.add_argument("--single", type=int, default=200, help="timed single queries")
    parser.add_argument("--batches", type=int, default=30, help="timed batches of 32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; expected some of {VARIANTS}")
    ef_values = sorted({int(v) for v in args.ef_search.split(",")} | {DEFAULT_EF_SEARCH})
    nprobe_values = sorted({int(v) for v in args.nprobe.split(",")})

    start = time.perf_counter()
    catalog = clustered_catalog(args.items, args.dim, n_queries=args.queries, seed=args.seed)
    items, queries = catalog.items, catalog.queries
    report: dict[str, Any] = {
        "items": args.items,
        "dim": items.shape[1],
        "queries": args.queries,
        "k": K,
        "faiss": faiss.__version__,
        "cpu_count": os.cpu_count(),
        "search_threads": args.threads,
        "build_threads": args.build_threads,
        "generate_s": time.perf_counter() - start,
    }

    # Exact baseline: IndexFlatIP. Ground truth on all cores, latency on the search threads.
    flat, build_s = timed_build(args.build_threads, item_vectors=items, kind="flat")
    _, truth = flat.search(queries, K)
    faiss.omp_set_num_threads(args.threads)
    exact = latency_ms(
        lambda s: flat.search(queries[s], K), len(queries), min(args.single, 100), args.batches
    )
    report["exact"] = {"build_s": build_s, **exact}

    hnsw_index = None
    for name, kind, mips, knob, values in (
        ("hnsw", "hnsw", "ip", "efSearch", ef_values),
        ("hnsw-l2", "hnsw", "l2", "efSearch", ef_values),
        ("ivf", "ivf", "l2", "nprobe", nprobe_values),
        ("ivf-ip", "ivf", "ip", "nprobe", nprobe_values),
    ):
        if name not in variants:
            continue
        index, build_s = timed_build(
            args.build_threads,
            item_vectors=items,
            kind=kind,
            mips=mips,
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
        )
        entry: dict[str, Any] = {"build_s": build_s}
        if kind == "hnsw":
            entry.update(M=args.hnsw_m, efConstruction=args.ef_construction)
        else:
            ivf = faiss.extract_index_ivf(index)
            entry.update(nlist=ivf.nlist, default_nprobe=ivf.nprobe)
            values = sorted(set(values) | {ivf.nprobe})
        entry["sweep"] = sweep(name, index, knob, values, queries, truth, exact, args)
        report[name] = entry
        if name == "hnsw":
            set_knob(index, knob, DEFAULT_EF_SEARCH)
            hnsw_index = index
        del index

    # End to end: what serving runs, default settings, with and without filters.
    cats, scenarios = filter_scenarios(
        items, queries, catalog.clusters, min(args.filter_queries, len(queries)), args.seed
    )
    retrievers = {"exact": Retriever(flat, items, cats)}
    if hnsw_index is not None:
        retrievers["hnsw"] = Retriever(hnsw_index, items, cats)
    report["retriever"] = end_to_end(retrievers, queries, scenarios, args)

    if "hnsw" in report:
        default = next(r for r in report["hnsw"]["sweep"] if r["efSearch"] == DEFAULT_EF_SEARCH)
        report["target"] = {
            "efSearch": DEFAULT_EF_SEARCH,
            "hnsw_recall_at_10": default["recall_at_10"],
            "hnsw_speedup_single": default["speedup_single"],
            "goal": "recall@10 >= 0.98 at >= 100x lower latency than exact",
            "met": default["recall_at_10"] >= 0.98 and default["speedup_single"] >= 100,
        }
    report["total_s"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
