"""Per-component costs behind docs/scaling.md, measured on this machine; prints one JSON document.

`measured` holds what ran here; `computed` scales it to `--at-users` users and `--at-items` items
(100M and 10M by default) by plain multiplication, with every assumption written next to it.

- model: bytes per user and per item of TLSAN (`default` and `paper` presets) and SASRec, as
  weights (inference) and as weights + gradients + Adam moments after one real training step
  (training), from real models at two vocabulary sizes: (bytes at 2n - bytes at n) / n.
- store: bytes per user in the online store (SQLite file size after a WAL checkpoint; Redis
  `used_memory` of a throw-away redis-server) for users with E1 and E2 stored events of raw
  ids shaped like Amazon's (14-character user ids, 10-character item ids): a per-event cost
  and a per-user overhead.
- index: FAISS bytes per item (serialized) and one-query latency on one thread for the served
  index kinds (flat, hnsw, ivf) over synthetic `[x_i ; b_i]` rows as wide as TLSAN's default.
- prepare: events/s of `prepare_dataset` (Polars, one process, leave-one-out) on a synthetic
  Parquet log: the work each Ray task does on its partition of users.
- serving: `/recommend` requests/s per server core (1000 / server CPU ms per request) from
  `benchmarks/serve.py` run here with reduced settings (or its JSON via --serve-json).
- training: examples/s per training process (1 and 2 processes) from `benchmarks/train.py
  --section data_parallel` (or its JSON via --train-json).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --serve-json serve.json --train-json train.json
    python benchmarks/scaling.py --skip serving,training
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTIONS = ("model", "store", "index", "prepare", "serving", "training")
GIB = 1024**3


# -- model -------------------------------------------------------------------------------------
def _model_bytes(kind: str, preset_name: str, users: int, items: int) -> tuple[int, int]:
    """(weights, weights + grads + optimizer state) after one training step, in bytes."""
    import torch

    from tlsan.config import preset
    from tlsan.data import Batch, VocabSizes
    from tlsan.model import build_model
    from tlsan.train import make_optimizer

    config = preset(preset_name, kind)
    torch.manual_seed(0)
    model = build_model(config.model, VocabSizes(users, items, 50), torch.randint(1, 50, (items,)))
    weights = sum(t.nbytes for t in model.state_dict().values())
    optimizer = make_optimizer(model, config)
    assert optimizer is not None
    b, length, short = 8, 20, 5
    batch = Batch(
        user=torch.randint(1, users, (b,)),
        long_items=torch.randint(1, items, (b, length)),
        long_tau=torch.rand(b, length),
        short_items=torch.randint(1, items, (b, short)),
        user_category=torch.randint(1, 50, (b,)),
        target=torch.randint(1, items, (b,)),
        negatives=torch.randint(1, items, (b, config.negatives)),
    )
    model.loss(batch, config.loss).backward()
    optimizer.step()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(
        v.nbytes
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return weights, weights + grads + state


def section_model(users: int, items: int) -> dict[str, Any]:
    out: dict[str, Any] = {"method": f"rows {users}/{2 * users} users, {items}/{2 * items} items"}
    for kind, preset_name in (("tlsan", "default"), ("tlsan", "paper"), ("sasrec", "default")):
        base = _model_bytes(kind, preset_name, users, items)
        more_users = _model_bytes(kind, preset_name, 2 * users, items)
        more_items = _model_bytes(kind, preset_name, users, 2 * items)
        out[f"{kind}_{preset_name}"] = {
            "weights_bytes_per_user": (more_users[0] - base[0]) / users,
            "weights_bytes_per_item": (more_items[0] - base[0]) / items,
            "training_bytes_per_user": (more_users[1] - base[1]) / users,
            "training_bytes_per_item": (more_items[1] - base[1]) / items,
        }
    return out


# -- online store ------------------------------------------------------------------------------
def _events(users: int, per_user: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    rng = np.random.default_rng(seed)
    u = [f"A{n:013d}" for n in range(users) for _ in range(per_user)]
    items = [f"B{n:09d}" for n in rng.integers(0, 5_000_000, users * per_user).tolist()]
    ts = (1_400_000_000 + np.tile(np.arange(per_user) * 3600, users)).tolist()
    return u, items, ts


def _sqlite_bytes(path: Path, data: tuple[list[str], list[str], list[int]]) -> int:
    from feature_store import open_store

    with open_store(f"sqlite:///{path}") as store:
        store.bulk_load(*data)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages, size = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size"))
    conn.close()
    return int(pages * size)


def _redis_bytes(url: str, data: tuple[list[str], list[str], list[int]]) -> int:
    import redis

    from feature_store import open_store

    client = redis.Redis.from_url(url)
    client.flushdb()
    before = int(client.info("memory")["used_memory"])
    with open_store(url) as store:
        store.bulk_load(*data)
    after = int(client.info("memory")["used_memory"])
    client.flushdb()
    client.close()
    return after - before


def section_store(users: int, counts: tuple[int, int]) -> dict[str, Any]:
    from tests.servers import redis_server

    out: dict[str, Any] = {
        "users": users,
        "events_per_user": list(counts),
        "ids": "14-char user ids, 10-char item ids, integer unix seconds",
    }
    sizes: dict[str, list[int]] = {"sqlite": [], "redis": []}
    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        for e in counts:
            data = _events(users, e, seed=e)
            sizes["sqlite"].append(_sqlite_bytes(Path(tmp) / f"store-{e}.db", data))
            sizes["redis"].append(_redis_bytes(server.url(), data))
    for name, (small, large) in sizes.items():
        per_event = (large - small) / (users * (counts[1] - counts[0]))
        out[name] = {
            "bytes": {str(e): b for e, b in zip(counts, (small, large), strict=True)},
            "bytes_per_event": per_event,
            "bytes_per_user_overhead": small / users - counts[0] * per_event,
        }
    return out


# -- FAISS index -------------------------------------------------------------------------------
def section_index(items: int, dim: int, queries: int) -> dict[str, Any]:
    import faiss

    from serving.faiss_index import build_index
    from serving.synthetic_vectors import clustered_catalog

    catalog = clustered_catalog(items, dim, n_queries=queries, seed=0)
    out: dict[str, Any] = {"items": items, "row_width": dim + 1, "search_threads": 1}
    for kind in ("flat", "hnsw", "ivf"):
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        index = build_index(catalog.items, kind)  # type: ignore[arg-type]
        build_s = time.perf_counter() - start
        faiss.omp_set_num_threads(1)
        index.search(catalog.queries[:10], 10)  # warm-up
        times = []
        for q in range(queries):
            start = time.perf_counter()
            index.search(catalog.queries[q : q + 1], 10)
            times.append((time.perf_counter() - start) * 1e3)
        out[kind] = {
            "bytes_per_item": faiss.serialize_index(index).nbytes / items,
            "build_s": build_s,
            "single_query_ms_median": statistics.median(times),
        }
    return out


# -- prepare -----------------------------------------------------------------------------------
def section_prepare(users: int, items: int, events: int) -> dict[str, Any]:
    from pipelines.config import PrepareConfig, SessionRule
    from pipelines.prepare import prepare_dataset
    from pipelines.synthetic import generate_log

    with tempfile.TemporaryDirectory() as tmp:
        generate_log(Path(tmp) / "log", users=users, items=items, events=events, seed=0)
        config = PrepareConfig(
            interactions=Path(tmp) / "log" / "interactions.parquet",
            items=Path(tmp) / "log" / "items.parquet",
            split="leave-one-out",
            session=SessionRule.parse("gap:30m"),
        )
        start = time.perf_counter()
        prepared = prepare_dataset(config, Path(tmp) / "prepared", progress=False)
        seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in prepared.path.rglob("*") if p.is_file())
    return {
        "users": users,
        "items": items,
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "prepared_bytes_per_event": disk / events,
    }


# -- serving and training (other benchmarks) ---------------------------------------------------
def _json_of(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-5:]}
    return json.loads(done.stdout[done.stdout.index("{") :])


def section_serving(serve_json: Path | None) -> dict[str, Any]:
    if serve_json is not None:
        report = json.loads(serve_json.read_text())
        source = str(serve_json)
    else:
        command = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--concurrency", "16"]
        command += ["--requests", "1000", "--rounds", "1", "--open-loop-requests", "300"]
        command += ["--retrieval-items", "0", "--epochs", "1"]
        report = _json_of(command)
        source = " ".join(command[1:])
        if "error" in report:
            return {"source": source, **report}
    runs = report["recommend"]
    best = max(runs, key=lambda r: r["throughput_rps"])
    cpu_ms = statistics.median(r["server_cpu_ms_per_request"] for r in runs)
    return {
        "source": source,
        "server_cpu_ms_per_request": cpu_ms,
        "requests_per_s_per_core": 1000.0 / cpu_ms,
        "throughput_rps_one_worker": best["throughput_rps"],
        "at_concurrency": best["concurrency"],
        "p99_ms": best["p99_ms"],
        "in_process_recommend": report.get("in_process_recommend"),
        "note": "server CPU counts the BentoML worker and its arbiter; the load generator "
        "runs on the same 2 cores",
    }


def section_training(train_json: Path | None) -> dict[str, Any]:
    if train_json is not None:
        report = json.loads(train_json.read_text())
        source = str(train_json)
        report = report.get("data_parallel_digital_music", report)
    else:
        command = [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--section"]
        command += ["data_parallel", "--dp-rounds", "2", "--dp-epochs", "2"]
        report = _json_of(command)
        source = " ".join(command[1:])
    return {"source": source, **report}


# -- extrapolation -----------------------------------------------------------------------------
def computed(measured: dict[str, Any], users: int, items: int, args: Any) -> dict[str, Any]:
    """Measured unit costs times the target sizes; every assumption is named."""
    out: dict[str, Any] = {"users": users, "items": items, "assumptions": {}}
    model = measured.get("model")
    if model:
        for name, unit in model.items():
            if not isinstance(unit, dict):
                continue
            out[f"{name}_weights_gib"] = {
                "users": users * unit["weights_bytes_per_user"] / GIB,
                "items": items * unit["weights_bytes_per_item"] / GIB,
            }
            out[f"{name}_training_state_gib"] = {
                "users": users * unit["training_bytes_per_user"] / GIB,
                "items": items * unit["training_bytes_per_item"] / GIB,
            }
    store = measured.get("store")
    if store:
        e = args.stored_events
        out["assumptions"]["stored_events_per_user"] = e
        for name in ("sqlite", "redis"):
            unit = store[name]
            per_user = unit["bytes_per_user_overhead"] + e * unit["bytes_per_event"]
            out[f"store_{name}_gib"] = users * per_user / GIB
    index = measured.get("index")
    if index:
        scale = items / index["items"]
        for kind in ("flat", "hnsw", "ivf"):
            out[f"index_{kind}_gib"] = items * index[kind]["bytes_per_item"] / GIB
        out["index_flat_single_query_ms"] = index["flat"]["single_query_ms_median"] * scale
        out["assumptions"]["flat_latency"] = "linear in items (measured at index.items)"
    prepare = measured.get("prepare")
    if prepare:
        events = users * args.events_per_user
        out["assumptions"]["events_per_user"] = args.events_per_user
        out["prepare_core_hours"] = events / prepare["events_per_s"] / 3600
    serving = measured.get("serving")
    if serving and "requests_per_s_per_core" in serving:
        out["assumptions"]["peak_requests_per_s"] = args.peak_rps
        out["serving_cores_at_peak"] = args.peak_rps / serving["requests_per_s_per_core"]
    training = measured.get("training")
    if training and "runs" in training:
        one = training["runs"]["1"]["examples_per_s_median"]
        examples = users * args.examples_per_user
        out["assumptions"]["training_examples_per_user_per_epoch"] = args.examples_per_user
        out["training_process_hours_per_epoch"] = examples / one / 3600
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", default="", help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--model-users", type=int, default=20_000)
    parser.add_argument("--model-items", type=int, default=10_000)
    parser.add_argument("--store-users", type=int, default=5_000)
    parser.add_argument("--store-events", default="10,50", help="two events-per-user counts")
    parser.add_argument("--index-items", type=int, default=50_000)
    parser.add_argument("--index-queries", type=int, default=200)
    parser.add_argument("--prepare-events", type=int, default=1_000_000)
    parser.add_argument("--serve-json", type=Path, help="a benchmarks/serve.py report to reuse")
    parser.add_argument("--train-json", type=Path, help="a benchmarks/train.py report to reuse")
    parser.add_argument("--at-users", type=int, default=100_000_000)
    parser.add_argument("--at-items", type=int, default=10_000_000)
    parser.add_argument("--stored-events", type=int, default=50, help="per user, online store")
    parser.add_argument("--events-per-user", type=int, default=20, help="in the raw log")
    parser.add_argument("--examples-per-user", type=int, default=10, help="training, per epoch")
    parser.add_argument("--peak-rps", type=float, default=10_000.0)
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown section(s) {sorted(unknown)}; expected {SECTIONS}")
    from tlsan.config import preset

    width = preset("default").model.dim
    measured: dict[str, Any] = {}
    machine = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    steps = {
        "model": lambda: section_model(args.model_users, args.model_items),
        "store": lambda: section_store(
            args.store_users, tuple(int(e) for e in args.store_events.split(","))
        ),
        "index": lambda: section_index(args.index_items, width, args.index_queries),
        "prepare": lambda: section_prepare(args.prepare_events // 20, 20_000, args.prepare_events),
        "serving": lambda: section_serving(args.serve_json),
        "training": lambda: section_training(args.train_json),
    }
    for name in SECTIONS:
        if name not in skip:
            print(f"{name} ...", file=sys.stderr)
            measured[name] = steps[name]()
    report = {
        "machine": machine,
        "measured": measured,
        "computed": computed(measured, args.at_users, args.at_items, args),
    }
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
