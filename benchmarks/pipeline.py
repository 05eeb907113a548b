"""Pipeline throughput: `prepare_dataset` on synthetic logs versus a pandas baseline.

The baseline is the per-user loop that the TLSAN reference preprocessing and most notebooks
use (pandas groupby, a Python loop over each user's sessions) producing the same dataset
(remapped ids, every example with its features, the validation move, Parquet files), run on
the same log and checked to produce the same example counts. Each measurement runs in a fresh
subprocess so peak RSS is its own. Prints one JSON document.

    python benchmarks/pipeline.py                 # 1M and 10M events (pandas on 1M)
    python benchmarks/pipeline.py --events 1000000 --repeats 1   # a quick look
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
    """The paper's construction the way a data scientist writes it (and the reference code's
    build_dataset.py does): remap ids, then a Python loop over each user's sessions that
    builds every example (long-term items and time features, session items, target, user
    category), the validation move, and Parquet files. Same output contents as ours."""
    from collections import Counter

    import pandas as pd

    start = time.perf_counter()
    log = pd.read_parquet(log_dir / "interactions.parquet")
    items = pd.read_parquet(log_dir / "items.parquet")
    log = log.drop_duplicates(["user_id", "item_id", "timestamp"])
    log = log.merge(items, on="item_id", how="left")
    users = {u: n for n, u in enumerate(sorted(log["user_id"].unique()), 1)}
    item_ids = {i: n for n, i in enumerate(sorted(log["item_id"].unique()), 1)}
    cats = {c: n for n, c in enumerate(sorted(log["category"].astype(str).unique()), 1)}
    log["user"] = log["user_id"].map(users)
    log["item"] = log["item_id"].map(item_ids)
    log["cat"] = log["category"].astype(str).map(cats)
    log = log.sort_values(["user", "timestamp"], kind="stable")
    log["day"] = log["timestamp"] // 86_400
    rows: dict[str, list[tuple]] = {"train": [], "valid": [], "test": []}
    for user, frame in log.groupby("user", sort=True):
        item_list = frame["item"].tolist()
        cat_list = frame["cat"].tolist()
        days = frame["day"].tolist()
        times = frame["timestamp"].tolist()
        n = len(item_list)
        m = min(n, 90)
        starts = [0] + [k for k in range(1, n) if days[k] != days[k - 1]]
        bounds = list(zip(starts, starts[1:] + [n], strict=True))
        user_train: list[tuple] = []
        for i, end in bounds[1:]:
            ref = days[i]
            long_items = item_list[:i][-50:]
            long_tau = [
                1.0 / max(1, min(12, (ref - d + 1).bit_length() - 1)) for d in days[:i][-50:]
            ]
            user_cat = Counter(cat_list[:i]).most_common(1)[0][0]
            session = item_list[i:end]
            if end < m - 1:
                user_train.append(
                    (user, long_items, long_tau, session, item_list[end], user_cat, times[i], i)
                )
            else:
                pick = i + (user * 7 + 3) % (end - i)
                short = [it for k, it in enumerate(session, i) if k != pick]
                rows["test"].append(
                    (user, long_items, long_tau, short, item_list[pick], user_cat, times[i], i)
                )
                break
        if user_train:
            rows["valid"].append(user_train.pop())
        rows["train"].extend(user_train)
    columns = [
        "user", "long_items", "long_tau", "short_items", "target", "user_category",
        "ref_time", "history_end",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in rows.items():
            pd.DataFrame(part, columns=columns).to_parquet(Path(tmp) / f"{name}.parquet")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "events": len(log),
        "paper_train_examples": len(rows["train"]) + len(rows["valid"]),
        "test": len(rows["test"]),
    }


def _pandas_reference(log_dir: Path) -> dict:
    """The reference implementation's own construction (TLSAN/build_dataset.py) on pandas:
    per user, per session `tim_list.count`, a deep copy of the history, `pd.value_counts` for
    the user category and the numpy time feature per history event, tuples collected in
    lists. Its catalog scan per item (`meta_df[meta_df['asin'] == item]`, hours at this size)
    is replaced by a dict lookup, and Parquet replaces its pickle. Same counts as ours."""
    import copy

    import numpy as np
    import pandas as pd

    start = time.perf_counter()
    log = pd.read_parquet(log_dir / "interactions.parquet")
    items = pd.read_parquet(log_dir / "items.parquet")
    log = log.drop_duplicates(["user_id", "item_id", "timestamp"])
    # remap ids (the reference's utils/2_remap_id.py): sorted unique values -> 0..n-1
    for column in ("user_id", "item_id"):
        keys = sorted(log[column].unique())
        log[column] = log[column].map(dict(zip(keys, range(len(keys)), strict=True)))
    items = items[items["item_id"].isin(set(keys))].copy()
    items["item_id"] = items["item_id"].map(dict(zip(keys, range(len(keys)), strict=True)))
    category_of = dict(zip(items["item_id"], items["category"], strict=True))
    log = log.sort_values(["user_id", "timestamp"], kind="stable")
    log["day"] = log["timestamp"] // 86_400
    gap = np.array([2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])

    def time_emb(hist_t: list, cur_t: int) -> list:
        return [1 / max(1, np.sum((cur_t - t + 1) >= gap)) for t in hist_t]

    train_set: list[tuple] = []
    valid_set: list[tuple] = []
    test_set: list[tuple] = []
    for user, hist in log.groupby("user_id"):
        pos_list = hist["item_id"].tolist()
        tim_list = hist["day"].tolist()
        valid_length = min(len(pos_list), 90)
        sessions = sorted(set(tim_list))
        i = 0
        pre_session: list = []
        pre_time: list = []
        pre_cates: list = []
        user_train: list[tuple] = []
        for t in sessions:
            count = tim_list.count(t)
            new_session = pos_list[i : i + count]
            new_cates = [category_of[item] for item in new_session]
            if t == sessions[0]:
                pre_session.extend(new_session)
                pre_time.extend(tim_list[i : i + count])
                pre_cates.extend(new_cates)
            else:
                now_cate = pd.Series(pre_cates).value_counts().index[0]
                if i + count < valid_length - 1:
                    emb = time_emb(pre_time[-50:], tim_list[i])
                    history = copy.deepcopy(pre_session)[-50:]
                    user_train.append(
                        (user, history, new_session, emb, pos_list[i + count], now_cate)
                    )
                    pre_session.extend(new_session)
                    pre_time.extend(tim_list[i : i + count])
                    pre_cates.extend(new_cates)
                else:
                    pos_item = pos_list[i]
                    if count > 1:
                        pos_item = new_session[(user * 7 + 3) % count]
                        new_session = [x for x in new_session if x != pos_item]
                    emb = time_emb(pre_time[-50:], t)
                    test_set.append((user, pre_session[-50:], new_session, emb, pos_item, now_cate))
                    break
            i += count
        if user_train:
            valid_set.append(user_train.pop())
        train_set.extend(user_train)
    columns = ["user", "long_items", "short_items", "long_tau", "target", "user_category"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in (("train", train_set), ("valid", valid_set), ("test", test_set)):
            pd.DataFrame(part, columns=columns).to_parquet(Path(tmp) / f"{name}.parquet")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "events": len(log),
        "paper_train_examples": len(train_set) + len(valid_set),
        "test": len(test_set),
    }


def _child(kind: str, log_dir: str, split: str) -> None:
    if kind == "pandas":
        result = _pandas_paper(Path(log_dir))
    elif kind == "pandas-reference":
        result = _pandas_reference(Path(log_dir))
    else:
        result = _ours(Path(log_dir), split)
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
    parser.add_argument("--events", type=int, default=10_000_000)
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
                        "impl": "tlsan-rec (polars + numpy)",
                        "split": split,
                        "events": n,
                        "median_seconds": round(median["seconds"], 3),
                        "events_per_second": round(n / median["seconds"]),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
                        "paper_train_examples": median["paper_train_examples"],
                        "test": median["test"],
                    }
                )
        ours = next(
            r
            for r in report["runs"]
            if r["events"] == args.baseline_events and r["split"] == "paper"
        )
        report["baselines"] = []
        for kind, impl in (
            ("pandas-reference", "pandas, the reference build_dataset.py's construction"),
            ("pandas", "pandas, a tuned per-user loop over plain lists"),
        ):
            base = _measure(kind, logs[args.baseline_events])
            assert base["paper_train_examples"] == ours["paper_train_examples"], (base, ours)
            assert base["test"] == ours["test"], (base, ours)
            report["baselines"].append(
                {
                    "impl": impl,
                    "events": args.baseline_events,
                    "seconds": round(base["seconds"], 3),
                    "events_per_second": round(args.baseline_events / base["seconds"]),
                    "peak_rss_mb": round(base["peak_rss_mb"]),
                    "speedup_of_ours": round(base["seconds"] / ours["median_seconds"], 1),
                }
            )
        paper = sorted(
            (r for r in report["runs"] if r["split"] == "paper"), key=lambda r: r["events"]
        )
        if len(paper) > 1:
            small, large = paper[0], paper[-1]
            report["scaling"] = {
                "events_ratio": large["events"] / small["events"],
                "seconds_ratio": round(large["median_seconds"] / small["median_seconds"], 2),
            }
        largest = paper[-1]
        report["targets"] = {
            "events_per_s>=1M_at_largest": largest["events_per_second"] >= 1_000_000,
            "peak_rss<=3GB_at_largest": largest["peak_rss_mb"] <= 3072,
            ">=20x_reference_style_pandas": report["baselines"][0]["speedup_of_ours"] >= 20,
            "no_worse_than_linear": "scaling" not in report
            or report["scaling"]["seconds_ratio"] <= report["scaling"]["events_ratio"],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
