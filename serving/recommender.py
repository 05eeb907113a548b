"""The recommendation logic, free of HTTP: one `Recommender` per worker process.

A batch of queries costs one feature-store read, one `online_features` call (the pipeline's
own feature code, so online inputs equal offline ones), one model forward and one FAISS
search, whatever its size; the service groups concurrent requests to use that.

Per query (DESIGN.md, "Serving contract"):
- history = the user's stored events plus the request's own events (not stored), minus
  duplicates; events after `now` and items the bundle does not know are ignored (the
  request's unknown ids are listed in the answer);
- `now` (default: the clock) is the reference time: the session `now` falls in is the
  short-term input, earlier sessions the long-term history, time features relative to it;
- a user with events gets the model (neutral personal parameters when the bundle does not
  know the user); a user without any gets recent popularity, per category when filtered;
- `exclude_seen` leaves out every item of the history; `categories` keeps only those;
- `explain` adds the model's attention over the events it read (TLSAN: feature-wise
  attention; SASRec/TiSASRec: the last position's self-attention, mean over heads and
  blocks), or a one-line popularity explanation (`pop`, and every cold start).
The same for every model kind of the harness (serving/model_step.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feature_store import Event, OnlineStore
from pipelines.config import SessionRule
from pipelines.features import History, UserFeatures, online_features
from serving.errors import RequestError
from serving.model_step import FEATURE_WISE, POPULARITY, SELF_ATTENTION, ModelStep
from serving.retrieval import Retriever, load_index
from tlsan.bundle import Bundle, run_summary
from tlsan.onnx_graph import DEFAULT_MAX_BATCH
from tlsan.popularity import half_life_from_json, half_life_label

Clock = Callable[[], float]


@dataclass(frozen=True)
class Query:
    """One `/recommend` request, ids already normalised to strings."""

    user_id: str
    k: int = 10
    events: Sequence[tuple[str, int]] = ()
    now: int | None = None
    exclude_seen: bool = True
    categories: Sequence[str] | None = None
    explain: bool = False


@dataclass
class Recommendation:
    """The answer to one query; `items` are `(item_id, score, category)`, best first."""

    user_id: str
    items: list[tuple[str, float, str]]
    strategy: str
    model_version: str
    unknown_items: list[str] = field(default_factory=list)
    explanation: dict[str, Any] | None = None
    now: int = 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "user_id": self.user_id,
            "items": [{"item_id": i, "score": s, "category": c} for i, s, c in self.items],
            "strategy": self.strategy,
            "model_version": self.model_version,
            "unknown_items": self.unknown_items,
        }
        if self.explanation is not None:
            data["explanation"] = self.explanation
        return data


@dataclass
class _Prepared:
    """A query after vocabulary lookups: what the batch steps need."""

    query: Query
    now: int
    items: list[int]
    categories: list[int]
    timestamps: list[int]
    unknown: list[str]
    allowed: set[int] | None


class Recommender:
    """Bundle + online store -> recommendations, in batches.

    `clock` gives the default `now`; `threads` caps torch and FAISS threads of the whole
    process (the service passes 1: one worker per core; None leaves them alone);
    `max_candidates` bounds FAISS widening before exact fallback (see serving.retrieval);
    `onnx_max_batch` is the largest batch the bundle's ONNX graph runs (0: PyTorch only).
    """

    def __init__(
        self,
        bundle: Bundle,
        store: OnlineStore,
        *,
        clock: Clock = time.time,
        threads: int | None = None,
        max_candidates: int | None = None,
        onnx_max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.threads = threads
        self._limited = threading.local()
        self._limit_threads()
        self.bundle = bundle
        self.store = store
        self.clock = clock
        self.model_version = bundle.model_version
        features = bundle.manifest["features"]
        self.session = SessionRule.parse(str(features["session"]))
        self.max_long = int(features["max_long"])
        self.max_short = int(features["max_short"])

        items = bundle.items
        n_items = items.height
        self.item_ids: list[str] = [""] + items["item_id"].to_list()
        self.item_index: dict[str, int] = {i: n for n, i in enumerate(self.item_ids) if n}
        self.item_category = np.zeros(n_items + 1, dtype=np.int64)
        self.item_category[items["index"].to_numpy()] = items["category"].to_numpy()
        categories = bundle.categories
        self.category_names: list[str] = [""] * (int(categories["index"].max() or 0) + 1)
        for index, name in categories.iter_rows():
            self.category_names[index] = name
        self.category_index = {name: n for n, name in enumerate(self.category_names) if n}
        self.user_index: dict[str, int] = dict(
            zip(bundle.users["user_id"].to_list(), bundle.users["index"].to_list(), strict=True)
        )
        popularity = bundle.popularity
        self.pop_items = popularity["index"].to_numpy().astype(np.int64)
        self.pop_scores = popularity["score"].to_numpy().astype(np.float64)

        vectors = bundle.item_vectors
        index = load_index(bundle.index_path, vectors.shape[1], n_items)
        kwargs = {} if max_candidates is None else {"max_candidates": max_candidates}
        self.retriever = Retriever(index, vectors[1:], self.item_category, **kwargs)
        self.model = ModelStep(bundle, threads=threads or 1, onnx_max_batch=onnx_max_batch)
        self.cold_start_summary, self.pop_summary = _popularity_summaries(bundle)

    # ------------------------------------------------------------------ API
    def recommend(self, query: Query) -> Recommendation:
        """One query (raises `RequestError` for a bad one)."""
        result = self.recommend_batch([query])[0]
        if isinstance(result, RequestError):
            raise result
        return result

    def recommend_batch(self, queries: Sequence[Query]) -> list[Recommendation | RequestError]:
        """Answers in query order; a query the bundle cannot serve gets its `RequestError`."""
        self._limit_threads()
        results: list[Recommendation | RequestError | None] = [None] * len(queries)
        users = sorted({q.user_id for q in queries})
        stored = self.store.recent_many(users) if users else {}
        clock_now = int(self.clock())
        prepared: list[tuple[int, _Prepared]] = []
        for n, query in enumerate(queries):
            try:
                prepared.append((n, self._prepare(query, stored.get(query.user_id, []), clock_now)))
            except RequestError as exc:
                results[n] = exc
        with_history = [(n, p) for n, p in prepared if p.items]
        for n, p in prepared:
            if not p.items:
                results[n] = self._popular(p)
        if with_history:
            for n, rec in zip(
                (n for n, _ in with_history),
                self._personal([p for _, p in with_history]),
                strict=True,
            ):
                results[n] = rec
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def record_events(self, user_id: str, events: Sequence[tuple[str, int]]) -> dict[str, Any]:
        """Append to the online store (idempotent); unknown items are stored and listed."""
        stored = self.store.append(user_id, [Event(item, ts) for item, ts in events])
        unknown = sorted({item for item, _ in events if item not in self.item_index})
        return {
            "user_id": user_id,
            "received": len(events),
            "stored": stored,
            "unknown_items": unknown,
        }

    def similar_items(self, item_id: str, k: int) -> dict[str, Any]:
        """Nearest items by cosine of the item vectors `x_i` (bias left out)."""
        self._limit_threads()
        index = self.item_index.get(item_id)
        if index is None:
            raise RequestError("item_id", f"unknown item {item_id!r}", status=404)
        items, scores = self.retriever.similar_items([index], k)
        return {
            "item_id": item_id,
            "items": [
                {
                    "item_id": self.item_ids[i],
                    "score": float(s),
                    "category": self.category_names[self.item_category[i]],
                }
                for i, s in zip(items[0], scores[0], strict=True)
                if i > 0
            ],
            "model_version": self.model_version,
        }

    def model_info(self) -> dict[str, Any]:
        """What `/model` shows: version, which model serves and how it scored on validation
        (test too when the run has it: reported, never used), the runtime, dataset, metrics,
        features, index, counts."""
        m = self.bundle.manifest
        run = m.get("run") or run_summary(self.bundle.config, self.bundle.metrics)
        return {
            "model_version": self.model_version,
            "model": m["model"],
            **run,
            "dataset_hash": m.get("dataset_hash"),
            "metrics": m.get("metrics", {}),
            "created_at": m.get("created_at"),
            "features": m["features"],
            "counts": m.get("counts", {}),
            "index": m["index"],
            "popularity": m.get("popularity", {}),
            "runtime": self.model.runtime,
            "source": self.bundle.source,
        }

    # -------------------------------------------------------------- helpers
    def _limit_threads(self) -> None:
        """Apply the thread cap in the calling thread, once per thread.

        OpenMP's thread count is per thread: a cap set in the main thread does not reach the
        service's batch thread, where FAISS would then start one OpenMP thread per core whose
        spin-waiting takes a core from the event loop (measured: /recommend at one request
        at a time spent ~2 ms more per request without the cap in the batch thread).
        """
        if self.threads is None or getattr(self._limited, "done", False):
            return
        _limit_threads(self.threads)
        self._limited.done = True

    def _prepare(self, query: Query, stored: list[Event], clock_now: int) -> _Prepared:
        now = clock_now if query.now is None else int(query.now)
        allowed = None
        if query.categories is not None:
            unknown_cats = [c for c in query.categories if c not in self.category_index]
            if unknown_cats:
                raise RequestError(
                    "categories",
                    f"unknown categories {sorted(set(unknown_cats))[:10]}; expected raw "
                    f"category ids of the catalog ({len(self.category_index)} known)",
                )
            allowed = {self.category_index[c] for c in query.categories}
        seen = {(e.item_id, e.timestamp) for e in stored}
        extra = [(i, t) for i, t in query.events if (i, t) not in seen]
        events = [(e.item_id, e.timestamp) for e in stored]
        if extra:  # request events may be older than stored ones: keep time order (stable)
            events = sorted(events + extra, key=lambda event: event[1])
        items: list[int] = []
        cats: list[int] = []
        stamps: list[int] = []
        for item_id, ts in events:
            if ts > now:
                continue
            index = self.item_index.get(item_id)
            if index is None:
                continue
            items.append(index)
            cats.append(int(self.item_category[index]))
            stamps.append(ts)
        unknown = sorted({i for i, _ in query.events if i not in self.item_index})
        return _Prepared(query, now, items, cats, stamps, unknown, allowed)

    def _popular(self, p: _Prepared) -> Recommendation:
        """Recent popularity, walking the ranking until k items pass the filters."""
        q = p.query
        seen = np.fromiter(set(p.items), np.int64) if q.exclude_seen and p.items else None
        allowed = np.fromiter(p.allowed, np.int64) if p.allowed is not None else None
        picked: list[int] = []
        scores: list[float] = []
        start, chunk = 0, max(4 * q.k, 64)
        while len(picked) < q.k and start < self.pop_items.size:
            block = self.pop_items[start : start + chunk]
            keep = np.ones(block.size, dtype=bool)
            if seen is not None:
                keep &= ~np.isin(block, seen)
            if allowed is not None:
                keep &= np.isin(self.item_category[block], allowed)
            rows = np.flatnonzero(keep)[: q.k - len(picked)]
            picked.extend(block[rows].tolist())
            scores.extend(self.pop_scores[start + rows].tolist())
            start += chunk
            chunk *= 2
        return Recommendation(
            user_id=q.user_id,
            items=self._named(picked, scores),
            strategy="popularity" if p.allowed is None else "popularity_category",
            model_version=self.model_version,
            unknown_items=p.unknown,
            explanation=self._popularity_explanation(p.now, self.cold_start_summary)
            if q.explain
            else None,
            now=p.now,
        )

    def _personal(self, batch: list[_Prepared]) -> list[Recommendation]:
        """The model path for a batch: features, one forward, one FAISS search."""
        features = online_features(
            [History(p.items, p.categories, p.timestamps) for p in batch],
            [p.now for p in batch],
            session=self.session,
            max_long=self.max_long,
            max_short=self.max_short,
        )
        users = np.array([self.user_index.get(p.query.user_id, 0) for p in batch], np.int64)
        explain = np.array([p.query.explain for p in batch], dtype=bool)
        vectors, attention = self.model.user_vectors(features, users, explain=explain)
        k = max(p.query.k for p in batch)
        exclude = [set(p.items) if p.query.exclude_seen else None for p in batch]
        allowed = [p.allowed for p in batch]
        top, scores = self.retriever.search(vectors, k, exclude=exclude, allowed_categories=allowed)
        out = []
        for b, p in enumerate(batch):
            keep = top[b, : p.query.k]
            valid = keep > 0
            explanation = None
            if p.query.explain:
                explanation = self._explanation(features.row(b), p, attention[b])
            out.append(
                Recommendation(
                    user_id=p.query.user_id,
                    items=self._named(keep[valid].tolist(), scores[b, : p.query.k][valid].tolist()),
                    strategy="model" if users[b] else "model_neutral_user",
                    model_version=self.model_version,
                    unknown_items=p.unknown,
                    explanation=explanation,
                    now=p.now,
                )
            )
        return out

    def _named(self, items: list[int], scores: list[float]) -> list[tuple[str, float, str]]:
        return [
            (self.item_ids[i], float(s), self.category_names[self.item_category[i]])
            for i, s in zip(items, scores, strict=True)
        ]

    def _explanation(
        self, row: UserFeatures, p: _Prepared, attention: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Attention over the events behind a model answer, with the events' raw ids: the
        most recent long-term events and session items the model read (each list as long as
        its weights); `pop` has none and explains its answer as popularity."""
        if attention is None:
            return {
                **self._popularity_explanation(p.now, self.pop_summary),
                "user_category": self.category_names[int(row.user_category)] or None,
                "reference_time": int(row.ref_time),
            }
        n_long, n_short = len(attention["long"]), len(attention["short"])
        long_items = row.long_items[len(row.long_items) - n_long :]
        long_tau = row.long_tau[len(row.long_tau) - n_long :]
        stamps = row.long_time[len(row.long_time) - n_long :]
        short_items = row.short_items[len(row.short_items) - n_short :]
        return {
            "method": attention["method"],
            "summary": SUMMARIES[attention["method"]],
            "long_term": [
                {
                    "item_id": self.item_ids[i],
                    "category": self.category_names[self.item_category[i]],
                    "timestamp": int(t),
                    "tau": float(tau),
                    "weight": float(w),
                }
                for i, t, tau, w in zip(
                    long_items, stamps, long_tau, attention["long"], strict=True
                )
            ],
            "short_term": [
                {
                    "item_id": self.item_ids[i],
                    "category": self.category_names[self.item_category[i]],
                    "weight": float(w),
                }
                for i, w in zip(short_items, attention["short"], strict=True)
            ],
            "long_term_summary_weight": float(attention["summary"]),
            "user_category": self.category_names[int(row.user_category)] or None,
            "reference_time": int(row.ref_time),
        }

    def _popularity_explanation(self, now: int, summary: str) -> dict[str, Any]:
        return {
            "method": POPULARITY,
            "summary": summary,
            "long_term": [],
            "short_term": [],
            "long_term_summary_weight": 0.0,
            "user_category": None,
            "reference_time": now,
        }


SUMMARIES = {  # one line per explanation method (`pop` and cold starts: `_popularity_summaries`)
    FEATURE_WISE: "TLSAN's attention over the user's recent long-term events "
    "(first attention) and over the current session and the long-term summary (second)",
    SELF_ATTENTION: "self-attention of the latest event over the events read, averaged over "
    "heads and blocks",
}


def _popularity_summaries(bundle: Bundle) -> tuple[str, str]:
    """One line for a cold start's popularity explanation and one for a `pop` model's."""
    cold = bundle.manifest.get("popularity", {})
    cold_half_life = half_life_label(half_life_from_json(cold.get("half_life_days")))
    cold_start = (
        f"no usable history: the most popular items of all events known at export, each "
        f"event weighted by recency (half-life {cold_half_life})"
    )
    run = bundle.config.get("popularity") if bundle.manifest.get("model") == "pop" else None
    if isinstance(run, dict):
        half_life = half_life_label(half_life_from_json(run.get("half_life_days")))
        chosen = ", chosen on validation" if run.get("chosen_on_validation") else ""
    else:
        half_life, chosen = "as configured", ""
    pop = (
        f"popularity model: the most popular items of the training events, each event "
        f"weighted by recency (half-life {half_life}{chosen})"
    )
    return cold_start, pop


def _limit_threads(threads: int) -> None:
    """One worker per core: keep torch and FAISS (in this thread) from oversubscribing."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
