"""Build a bundle's FAISS index from its item vectors: in-process, or as `python -m`.

`tlsan export` writes every other part of a bundle itself, but imports only run downward
(serving -> tlsan), so it runs this module as a subprocess to build the index with the
retrieval code, just as `tlsan serve` runs `bentoml serve serving.service:...`. Python callers
on the serving side (tests, benchmarks) pass `build_bundle_index` to `write_bundle` directly.

    python -m serving.index_builder ITEM_VECTORS.safetensors INDEX.faiss --kind auto \
        [--flat-threshold 200000]

prints the index description as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tlsan.bundle import DEFAULT_FLAT_THRESHOLD, read_item_vectors
from tlsan.errors import TlsanError


def build_bundle_index(
    vectors_file: Path, index_file: Path, kind: str, flat_threshold: int = DEFAULT_FLAT_THRESHOLD
) -> dict[str, Any]:
    """Index the rows of item indices 1..n (row 0, padding, is never retrievable); `auto`
    means exact (flat) below `flat_threshold` items and HNSW from it on."""
    import faiss

    from serving.faiss_index import build_index, resolve_kind, save_index

    vectors = read_item_vectors(vectors_file)[1:]
    resolved = resolve_kind(kind, len(vectors), flat_threshold)
    index = build_index(vectors, resolved, progress=len(vectors) >= 100_000)
    save_index(index, index_file)
    info: dict[str, Any] = {
        "kind": resolved,
        "requested": kind,
        "flat_threshold": flat_threshold,
        "rows": int(index.ntotal),
        "dim": int(index.d),
        "faiss": faiss.__version__,
    }
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        info.update(hnsw_m=int(hnsw.hnsw.nb_neighbors(1)), ef_search=int(hnsw.hnsw.efSearch))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.index_builder")
    parser.add_argument("vectors", type=Path)
    parser.add_argument("index", type=Path)
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--flat-threshold", type=int, default=DEFAULT_FLAT_THRESHOLD)
    args = parser.parse_args(argv)
    try:
        info = build_bundle_index(args.vectors, args.index, args.kind, args.flat_threshold)
    except TlsanError as exc:
        print(f"index builder: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
