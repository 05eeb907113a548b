"""Pipeline throughput: `prepare_dataset` on synthetic logs versus a pandas baseline.

The baseline is the per-user loop that the TLSAN reference preprocessing and most notebooks
use (pandas groupby, a Python loop over each user's sessions), run on the same log and checked
to produce the same example counts. Each measurement runs in a fresh subprocess so peak RSS
is its own. Prints one JSON document.

    python benchmarks/pipeline.py                 # 1M events (and pandas on 1M)
    python benchmarks/pipeline.py --events 10000000 --baseline-events 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ours(log_dir: Path, split: str) -> dict:
    from pipelines.config import PrepareConfig, SessionRule, apply_preset
    from pipelines.prepare import prepare_dataset

    config = PrepareConfig(
        interactions=log_dir / "interactions.parquet", items=log_dir / "items.parquet"
    )
    if split == "paper":
        config = apply_preset(config, "paper", set())
    else:
        from dataclasses import replace

        config = replace(config, split="leave-one-out", session=SessionRule.parse("gap:30m"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = prepare_dataset(config, Path(tmp) / "out", progress=False)
        seconds = time.perf_counter() - start
    counts = result.manifest["counts"]
    return {"seconds": seconds, "events": result.manifest["stats"]["interactions"], **counts}


def _pandas_paper(log_dir: Path) -> dict:
    """The paper's construction the way reference code writes it: a loop per user."""
    import pandas as pd

    start = time.perf_counter()
    log = pd.read_parquet(log_dir / "interactions.parquet")
    items = pd.read_parquet(log_dir / "items.parquet")
    log = log.drop_duplicates(["user_id", "item_id", "timestamp"])
    log = log.merge(items, on="item_id", how="left")
    log = log.sort_values(["user_id", "timestamp"], kind="stable")
    log["day"] = log["timestamp"] // 86_400
    train = test = 0
    for _, user in log.groupby("user_id", sort=True):
        item_list = user["item_id"].tolist()
        days = user["day"].tolist()
        n = len(item_list)
        m = min(n, 90)
        starts = [0] + [k for k in range(1, n) if days[k] != days[k - 1]]
        bounds = list(zip(starts, starts[1:] + [n], strict=True))
        for i, end in bounds[1:]:
            history = item_list[:i]
            ref = days[i]
            _tau = [1.0 / max(1, min(12, (ref - d + 1).bit_length() - 1)) for d in days[:i][-50:]]
            _ = (history[-50:], item_list[i:end])
            if end < m - 1:
                train += 1
            else:
                test += 1
                break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "events": len(log), "paper_train_examples": train, "test": test}


def _child(kind: str, log_dir: str, split: str) -> None:
    result = _pandas_paper(Path(log_dir)) if kind == "pandas" else _ours(Path(log_dir), split)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _measure(kind: str, log_dir: Path, split: str = "paper") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(log_dir), split],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _log(folder: Path, events: int) -> Path:
    from pipelines.synthetic import generate_log

    users = max(1_000, events // 40)
    generate_log(folder, users=users, items=max(1_000, events // 50), events=events, seed=0)
    return folder


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--baseline-events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report: dict = {"benchmark": "pipeline", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = sorted({args.baseline_events, args.events})
        logs = {n: _log(Path(tmp) / f"log{n}", n) for n in sizes}
        for n in sizes:
            for split in ("paper", "leave-one-out"):
                runs = [_measure("ours", logs[n], split) for _ in range(args.repeats)]
                runs.sort(key=lambda r: r["seconds"])
                median = runs[len(runs) // 2]
                report["runs"].append(
                    {
                        "impl": "tlsan-rec (polars)",
                        "split": split,
                        "events": n,
                        "median_seconds": round(median["seconds"], 3),
                        "events_per_second": round(n / median["seconds"]),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
                        "paper_train_examples": median["paper_train_examples"],
                        "test": median["test"],
                    }
                )
        base = _measure("pandas", logs[args.baseline_events])
        ours = next(
            r
            for r in report["runs"]
            if r["events"] == args.baseline_events and r["split"] == "paper"
        )
        assert base["paper_train_examples"] == ours["paper_train_examples"], (base, ours)
        assert base["test"] == ours["test"], (base, ours)
        report["baseline"] = {
            "impl": "pandas per-user loop (reference style)",
            "events": args.baseline_events,
            "seconds": round(base["seconds"], 3),
            "peak_rss_mb": round(base["peak_rss_mb"]),
        }
        report["speedup_vs_pandas"] = round(base["seconds"] / ours["median_seconds"], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
