"""Synthetic `[x_i ; b_i]` catalogs and `[u_t ; 1]` queries shaped like a trained TLSAN's.

Retrieval quality depends on the geometry of the vectors, so tests and benchmarks need data
that looks like learned embeddings rather than isotropic noise: items fall into topical
clusters of uneven size, their norms vary over a log-normal range (popular items drift to
larger norms during training), and the learned bias grows with the norm. User states mix the
same topics, with larger norms than items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlsan.errors import ConfigError


@dataclass(frozen=True)
class SyntheticCatalog:
    """Item rows `[x_i ; b_i]` (row r is item index r + 1), their cluster ids, and queries."""

    items: np.ndarray  # (n_items, dim + 1) float32
    clusters: np.ndarray  # (n_items,) int64, the mixture component of each item
    queries: np.ndarray  # (n_queries, dim + 1) float32, last column = 1


def _directions(
    rng: np.random.Generator, centers: np.ndarray, which: np.ndarray, spread: float
) -> np.ndarray:
    """Unit vectors scattered around the chosen cluster centres."""
    dim = centers.shape[1]
    out = centers[which] + rng.standard_normal((which.size, dim), dtype=np.float32) * (
        spread / np.sqrt(dim)
    )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def clustered_catalog(
    n_items: int,
    dim: int = 64,
    *,
    n_queries: int = 1000,
    n_clusters: int | None = None,
    spread: float = 0.7,
    norm_sigma: float = 0.35,
    seed: int = 0,
) -> SyntheticCatalog:
    """A Gaussian-mixture catalog of `n_items` rows of width `dim + 1` plus matching queries.

    `n_clusters` defaults to one cluster per ~1,000 items (at least 8); `spread` is the
    within-cluster noise relative to the unit-length centres; `norm_sigma` the
    log-normal spread of the item norms.
    """
    if n_items < 1 or dim < 1 or n_queries < 0:
        raise ConfigError(
            f"clustered_catalog: expected n_items >= 1, dim >= 1, n_queries >= 0, "
            f"got n_items={n_items}, dim={dim}, n_queries={n_queries}"
        )
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or max(8, n_items // 1000)
    centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(n_clusters, 0.7))

    clusters = rng.choice(n_clusters, size=n_items, p=weights)
    norms = rng.lognormal(mean=0.0, sigma=norm_sigma, size=n_items).astype(np.float32)
    vectors = _directions(rng, centers, clusters, spread) * norms[:, None]
    bias = 0.5 * np.log(norms) + 0.1 * rng.standard_normal(n_items, dtype=np.float32)
    items = np.concatenate([vectors, bias[:, None]], axis=1).astype(np.float32)

    q_clusters = rng.choice(n_clusters, size=n_queries, p=weights)
    q_norms = rng.lognormal(mean=1.0, sigma=0.3, size=n_queries).astype(np.float32)
    users = _directions(rng, centers, q_clusters, spread) * q_norms[:, None]
    queries = np.concatenate([users, np.ones((n_queries, 1), np.float32)], axis=1)
    return SyntheticCatalog(
        items=np.ascontiguousarray(items),
        clusters=clusters.astype(np.int64),
        queries=np.ascontiguousarray(queries, dtype=np.float32),
    )
