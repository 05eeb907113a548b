"""Build, save and load the FAISS index over the item rows `[x_i ; b_i]`.

TLSAN scores item i for a user state u_t as `<[u_t ; 1], [x_i ; b_i]>`, so retrieval is a
maximum-inner-product search (MIPS). Index row r is item index r + 1 (0 is padding).

Which index, measured by `benchmarks/retrieval.py` on clustered synthetic catalogs (D = 65,
one search thread, this 2-core machine):
- `flat`: exact `IndexFlatIP`; `auto` picks it below `flat_threshold` items.
- `hnsw`: `IndexHNSWFlat` with the inner product itself as similarity (ip-NSW, Morozov and
  Babenko, NeurIPS 2018); `auto` picks it from `flat_threshold` items on. On 1M items,
  M = 32, efConstruction = 200 (build 130-150 s on 2 threads), efSearch = 64: recall@10 0.993
  at 0.10 ms per query, 216x faster than exact (23 ms); efSearch 32: 0.988 at 350x.
  The textbook MIPS->L2 reduction (append sqrt(max_norm^2 - |v|^2), query with 0) is far
  worse for HNSW (100k items, efSearch 64: recall@10 0.58 against 0.995): the appended
  coordinate crushes the items onto a thin cap of the sphere, and the L2 graph loses the
  high-norm hubs that MIPS queries need. `mips="l2"` keeps it available.
- `ivf`: `IndexIVFFlat`, ~4 sqrt(n) lists. Here the reduction helps (k-means in the augmented
  space separates items by norm as well as topic: 100k items, nprobe 16, recall@10 0.999
  against 0.916 with inner-product lists), so `ivf` defaults to `mips="l2"`. On 1M items
  (nlist 4000, default nprobe 62): recall@10 0.983 at 0.12 ms, 196x faster than exact.

A reduced index is wrapped in an `IndexPreTransform` that appends the zero coordinate to the
queries, so every index we build or load has `d == D` and answers `search(queries (B, D))`
with the best MIPS candidates first; the Retriever re-scores them exactly anyway.
Everything is FAISS native serialization (no pickle); efSearch and nprobe are stored in the
file. Files are written to a temporary name, fsynced, then renamed into place.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

from tlsan.errors import BundleError, ConfigError, TlsanError

IndexKind = Literal["auto", "flat", "hnsw", "ivf"]
MipsMode = Literal["ip", "l2"]

INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf")
DEFAULT_FLAT_THRESHOLD = 200_000
# Tuned with benchmarks/retrieval.py on 1M clustered items (D = 65), see the module docstring;
# efSearch is stored in the index file and can be changed after loading.
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 64
_ADD_CHUNK = 50_000


def _check_vectors(item_vectors: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, 2-D, finite: what FAISS needs, with errors that say why."""
    arr = np.asarray(item_vectors)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise TlsanError(
            f"item_vectors: expected a 2-D array (n_items >= 1, D >= 1), got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise TlsanError(f"item_vectors: expected floating-point values, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise TlsanError(f"item_vectors: row {bad} (item index {bad + 1}) holds NaN or inf")
    return arr


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def resolve_kind(kind: str, n_items: int, flat_threshold: int = DEFAULT_FLAT_THRESHOLD) -> str:
    """`auto` -> `flat` below `flat_threshold` items, `hnsw` from it on."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    return "flat" if n_items < _positive("flat_threshold", flat_threshold) else "hnsw"


def default_nlist(n_items: int) -> int:
    """About 4 sqrt(n) inverted lists, with at least ~39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n_items)), n_items // 39))


def default_nprobe(nlist: int) -> int:
    """Probe ~1/64 of the lists (at least 16): recall@10 0.98 on 1M items, 0.999 on 100k."""
    return min(nlist, max(16, nlist // 64))


def mips_to_l2(item_vectors: np.ndarray) -> np.ndarray:
    """Append sqrt(max_norm^2 - |v|^2): L2 order to a query `[q ; 0]` equals inner-product order."""
    sq = np.einsum("ij,ij->i", item_vectors, item_vectors, dtype=np.float64)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([item_vectors, extra[:, None]], axis=1))


def _add(index: faiss.Index, vectors: np.ndarray, progress: bool, what: str) -> None:
    """Add in chunks so that long HNSW builds show progress."""
    with tqdm(total=len(vectors), desc=f"FAISS {what}", unit="item", disable=not progress) as bar:
        for start in range(0, len(vectors), _ADD_CHUNK):
            chunk = vectors[start : start + _ADD_CHUNK]
            index.add(chunk)
            bar.update(len(chunk))


def _reduced(inner: faiss.Index, dim: int) -> faiss.Index:
    """Wrap an L2 index over `[v ; extra]` so that it takes `D`-wide queries (`[q ; 0]`)."""
    index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(dim, dim + 1, False), inner)
    index.ntotal = inner.ntotal
    return index


def build_index(
    item_vectors: np.ndarray,
    kind: IndexKind = "auto",
    *,
    flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    nlist: int | None = None,
    nprobe: int | None = None,
    mips: MipsMode | None = None,
    seed: int = 0,
    progress: bool = False,
) -> faiss.Index:
    """A FAISS index over `item_vectors` (n_items, D) whose row r is item index r + 1.

    `mips` picks how inner products are searched: `"ip"` natively or `"l2"` through the
    norm-augmentation reduction; by default `ip` for HNSW and `l2` for IVF (see module doc).
    The returned index always has `d == D` and `ntotal == n_items`.
    """
    vectors = _check_vectors(item_vectors)
    n_items, dim = vectors.shape
    kind = resolve_kind(kind, n_items, flat_threshold)
    if mips is not None and mips not in ("ip", "l2"):
        raise ConfigError(f"mips: expected 'ip' or 'l2', got {mips!r}")
    if kind == "flat":
        if mips == "l2":
            raise ConfigError("mips='l2' applies to hnsw and ivf indexes only, not to flat")
        index = faiss.IndexFlatIP(dim)
        _add(index, vectors, progress, "flat")
        return index
    if kind == "hnsw":
        mode = mips or "ip"
        m = _positive("hnsw_m", hnsw_m)
        data = vectors if mode == "ip" else mips_to_l2(vectors)
        metric = faiss.METRIC_INNER_PRODUCT if mode == "ip" else faiss.METRIC_L2
        inner = faiss.IndexHNSWFlat(data.shape[1], m, metric)
        inner.hnsw.efConstruction = _positive("ef_construction", ef_construction)
        inner.hnsw.efSearch = _positive("ef_search", ef_search)
        _add(inner, data, progress, f"hnsw-{mode}")
        return inner if mode == "ip" else _reduced(inner, dim)
    mode = mips or "l2"
    lists = _positive("nlist", nlist) if nlist is not None else default_nlist(n_items)
    if lists > n_items:
        raise ConfigError(f"nlist: expected at most n_items={n_items} lists, got {lists}")
    data = vectors if mode == "ip" else mips_to_l2(vectors)
    if mode == "ip":
        inner = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(data.shape[1]), data.shape[1], lists, faiss.METRIC_INNER_PRODUCT
        )
    else:
        inner = faiss.IndexIVFFlat(faiss.IndexFlatL2(data.shape[1]), data.shape[1], lists)
    inner.cp.seed = seed
    probes = default_nprobe(lists) if nprobe is None else _positive("nprobe", nprobe)
    inner.nprobe = min(probes, lists)
    rng = np.random.default_rng(seed)
    n_train = min(n_items, 64 * lists)
    sample = data if n_train == n_items else data[np.sort(rng.choice(n_items, n_train, False))]
    inner.train(sample)
    _add(inner, data, progress, f"ivf-{mode}")
    return inner if mode == "ip" else _reduced(inner, dim)


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> Path:
    """Write `index` with `faiss.write_index` to a temporary file, fsync, then rename into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_index(path: str | os.PathLike[str], expected_dim: int, expected_n: int) -> faiss.Index:
    """Read a FAISS index file and check that it covers `expected_n` items of width `expected_dim`."""
    source = Path(path)
    if not source.is_file():
        raise BundleError(f"FAISS index {source}: file not found")
    try:
        index = faiss.read_index(str(source))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"FAISS index {source}: not a readable FAISS index file ({reason[:200]})"
        ) from exc
    if index.d != expected_dim:
        raise BundleError(
            f"FAISS index {source}: vectors of dimension {index.d}, expected {expected_dim} "
            f"(the item vectors' width, [x_i ; b_i])"
        )
    if index.ntotal != expected_n:
        raise BundleError(
            f"FAISS index {source}: holds {index.ntotal} items, expected {expected_n} "
            f"(one row per item index 1..{expected_n})"
        )
    if not index.is_trained:
        raise BundleError(f"FAISS index {source}: the index is not trained")
    return index
