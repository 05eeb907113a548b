"""Pipeline speed: `prepare --preset paper` from CSV, Parquet and NDJSON, against pandas.

The log is the one issue 23 describes: 2M events of 160k users and 60k items, integer ids
and unix-second timestamps, written as CSV, Parquet and NDJSON with the same rows. Each
format is prepared with the paper's construction, and a tuned per-user pandas implementation
of the same construction reads the same CSV (see `_pandas_paper`); its examples are checked
to be the very same rows as ours. Runs are interleaved (csv, parquet, ndjson, pandas, then
again) in fresh subprocesses, so load on the machine hits every contender alike, and the
medians and their ratios come from the same run. Leave-one-out at 10M events is measured
once for its peak RSS (the process's own maxrss). Prints one JSON document.

    python benchmarks/pipeline.py                        # the issue's log, 3 rounds, LOO 10M
    python benchmarks/pipeline.py --events 200000 --users 16000 --items 6000 \\
        --repeats 1 --loo-events 0                       # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("csv", "parquet", "ndjson")
SPLITS = ("train", "valid", "test")
MAX_LONG, CAP, SECONDS_PER_DAY = 50, 90, 86_400  # the paper preset's values
VALID_STREAM = 1_000_003  # pipelines.splits: the validation target's draw uses seed + this


def _ours(log_dir: Path, fmt: str, split: str, out: Path) -> dict[str, Any]:
    from dataclasses import replace

    from pipelines.config import PrepareConfig, SessionRule, apply_preset
    from pipelines.prepare import prepare_dataset

    config = PrepareConfig(
        interactions=log_dir / f"interactions.{fmt}", items=log_dir / f"items.{fmt}"
    )
    if split == "paper":
        config = apply_preset(config, "paper", set())
    else:
        config = replace(config, split="leave-one-out", session=SessionRule.parse("gap:30m"))
    start = time.perf_counter()
    result = prepare_dataset(config, out, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    counts = result.manifest["counts"]
    return {"seconds": seconds, "events": result.manifest["stats"]["interactions"], **counts}


def _seeded_choice(user: int, size: int, seed: int = 0) -> int:
    """`pipelines.splits.seeded_choice`: the test target's offset in its session."""
    a, c, mod = 1_103_515_245, 12_345, 2_147_483_647
    h = (user * a + seed * c + 1_013_904_223) % mod
    return ((h * a + c) % mod) % size


@dataclass(frozen=True)
class _History:
    """One user's sorted events (NumPy views), as the pandas baseline's per-user pass sees
    them."""

    user: int
    item: Any
    day: Any
    ts: Any
    mode: Any

    def example(self, h: int, short: Any, target_pos: int) -> tuple:
        """The example whose session starts at position h: the long-term items and their
        taus (a whole history at once), the short-term items, the target and the rest."""
        import numpy as np

        lo = max(h - MAX_LONG, 0)
        delta = np.maximum(self.day[h] - self.day[lo:h] + 1, 1).astype(np.float64)
        tau = (1.0 / np.clip(np.frexp(delta)[1] - 1, 1, 12)).astype(np.float32)
        target = int(self.item[target_pos])
        mode = self.mode[h - 1]
        return (self.user, self.item[lo:h], tau, short, target, mode, self.ts[h], h, target_pos)


def _pandas_sorted_log(log_dir: Path) -> Any:
    """Both pandas baselines start alike: the pyarrow CSV reader, duplicates dropped (the
    first stays), ids and categories mapped to indices in the vocabularies' order, one
    stable sort by user, time and input order."""
    import numpy as np
    import pandas as pd

    log = pd.read_csv(log_dir / "interactions.csv", engine="pyarrow")
    catalog = pd.read_csv(log_dir / "items.csv", engine="pyarrow")
    log = log.drop_duplicates(["user_id", "item_id", "timestamp"])
    users = np.sort(log["user_id"].unique())
    items = np.sort(log["item_id"].unique())
    category_of_item = catalog.set_index("item_id")["category"].reindex(items).astype(str)
    categories = np.sort(category_of_item.unique())
    item_category = np.r_[0, np.searchsorted(categories, category_of_item.to_numpy()) + 1]
    log["user"] = np.searchsorted(users, log["user_id"].to_numpy()) + 1
    log["item"] = np.searchsorted(items, log["item_id"].to_numpy()) + 1
    log["key"] = log["user"].to_numpy(np.int64) * (1 << 32) + log["timestamp"].to_numpy()
    log = log.sort_values("key", kind="stable", ignore_index=True)
    log["day"] = log["timestamp"] // SECONDS_PER_DAY
    log["category"] = item_category[log["item"].to_numpy()]
    return log


def _user_examples(history: _History, starts: Any, rows: dict[str, list[tuple]]) -> None:
    """One user's examples (sessions start at `starts`): the walk's transitions while the
    next session starts before the cap; the session where it stops is the test example, the
    one before it the validation example (built the same way), and only the transitions
    whose target lies before the validation session train (DESIGN.md's last-session)."""
    import numpy as np

    n = history.item.size
    if starts.size < 2:
        return
    ends = np.r_[starts[1:], n]
    n_train = int(np.count_nonzero(ends[1:] < min(n, CAP) - 1))  # a prefix of the sessions
    rows["train"].extend(
        history.example(int(starts[k]), history.item[starts[k] : ends[k]], ends[k])
        for k in range(1, n_train - 1)  # the target of k is the first event of k + 1 < v
    )
    for split, k, seed in (("test", n_train + 1, 0), ("valid", n_train, VALID_STREAM)):
        if 1 <= k < starts.size:
            session = np.arange(starts[k], ends[k])
            chosen = int(starts[k]) + _seeded_choice(history.user, session.size, seed)
            short = history.item[session[session != chosen]]
            rows[split].append(history.example(int(starts[k]), short, chosen))


def _running_mode(category: Any) -> Any:
    """Per event of one user: the most frequent category so far, ties to the one that
    appeared first (one-hot running counts with columns in order of first appearance, so
    the first maximum wins; NumPy only)."""
    import numpy as np

    _, first, code = np.unique(category, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    counts = np.cumsum(np.eye(first.size, dtype=np.int32)[rank[code]], axis=0)
    leader = np.argmax(counts, axis=1)  # the first column holding the maximum
    return category[first[np.argsort(first)][leader]].astype(np.int32)


def _pandas_groupby(log_dir: Path, out: Path) -> dict[str, Any]:
    """The per-user implementation: `groupby("user")`, and each user's work vectorised with
    NumPy over that user's events (day sessions, the running mode category, the taus of a
    whole history at once); no loop over events. The same output as ours, row for row."""
    import numpy as np

    start = time.perf_counter()
    log = _pandas_sorted_log(log_dir)
    rows: dict[str, list[tuple]] = {name: [] for name in SPLITS}
    for user, frame in log.groupby("user", sort=True):
        day = frame["day"].to_numpy()
        mode = _running_mode(frame["category"].to_numpy())
        item, ts = frame["item"].to_numpy(np.int32), frame["timestamp"].to_numpy()
        starts = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])
        _user_examples(_History(int(user), item, day, ts, mode), starts, rows)
    return _pandas_write(rows, out, start, len(log))


def _pandas_columnar(log_dir: Path, out: Path) -> dict[str, Any]:
    """Tuned further than per-user: sessions and the running mode category on whole columns
    (groupby cumcount/cummax), then one pass over the users on NumPy views of their rows (no
    per-group DataFrames) that slices out each example. The same output as ours."""
    import numpy as np
    import pandas as pd

    start = time.perf_counter()
    log = _pandas_sorted_log(log_dir)
    first = log["user"].ne(log["user"].shift()).to_numpy()
    new_session = first | log["day"].ne(log["day"].shift()).to_numpy()
    pairs = log.groupby(["user", "category"], sort=False)
    own = pairs.cumcount().to_numpy() + 1
    row = np.arange(len(log))
    first_row = (
        pd.Series(np.where(own == 1, row, 0))
        .groupby([log["user"], log["category"]], sort=False)
        .transform("max")
        .to_numpy()
    )  # the row of each (user, category)'s first event
    size = log.groupby("user", sort=False)["user"].transform("size").to_numpy()
    user_start = np.maximum.accumulate(np.where(first, row, 0))
    span = (size + 1).astype(np.int64) ** 2  # a user's scores lie in [0, span)
    base = np.cumsum(np.where(first, span, 0)) - span  # the users before, stacked
    score = base + own * (size + 1) - (first_row - user_start)  # ties: first appearance
    lead = np.maximum.accumulate(np.where(score == np.maximum.accumulate(score), row, 0))
    mode = log["category"].to_numpy(np.int32)[lead]
    user, item = log["user"].to_numpy(), log["item"].to_numpy(np.int32)
    day, ts = log["day"].to_numpy(), log["timestamp"].to_numpy()
    bounds = np.r_[np.flatnonzero(first), len(log)]
    rows: dict[str, list[tuple]] = {name: [] for name in SPLITS}
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        history = _History(int(user[a]), item[a:b], day[a:b], ts[a:b], mode[a:b])
        _user_examples(history, np.flatnonzero(new_session[a:b]), rows)
    return _pandas_write(rows, out, start, len(log))


def _pandas_write(
    rows: dict[str, list[tuple]], out: Path, start: float, events: int
) -> dict[str, Any]:
    """The examples as Parquet files (list columns from the NumPy arrays, via pyarrow)."""
    import pandas as pd

    columns = [
        "user", "long_items", "long_tau", "short_items", "target", "user_category",
        "ref_time", "history_end", "target_pos",
    ]  # fmt: skip
    dtypes = {
        "user": "int32", "target": "int32", "user_category": "int32", "history_end": "int32",
        "target_pos": "int32",
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for name, part in rows.items():
        frame = pd.DataFrame(part, columns=columns).astype(dtypes)
        frame.to_parquet(out / f"{name}.parquet", index=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "events": events, **{n: len(p) for n, p in rows.items()}}


PANDAS = {"pandas-groupby": _pandas_groupby, "pandas-columnar": _pandas_columnar}


def _child(kind: str, log_dir: str, split: str, out: str) -> None:
    import pyarrow.parquet  # noqa: F401  (imports are not timed, on either side)

    if kind in PANDAS:
        import pandas  # noqa: F401

        cpu = time.process_time()
        result = PANDAS[kind](Path(log_dir), Path(out))
    else:
        import pipelines.prepare  # noqa: F401

        cpu = time.process_time()
        result = _ours(Path(log_dir), kind, split, Path(out))
    result["cpu_seconds"] = time.process_time() - cpu
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _measure(kind: str, log_dir: Path, out: Path, split: str = "paper") -> dict[str, Any]:
    """One run in a fresh process (its own peak RSS, no warm caches of an earlier run)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(log_dir), split, str(out)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_log(folder: Path, *, events: int, users: int, items: int) -> dict[str, Any]:
    """The synthetic log as Parquet (integer ids, unix seconds), then the same rows as CSV and
    NDJSON; the item catalog likewise."""
    import polars as pl

    from pipelines.synthetic import generate_log

    generate_log(folder, users=users, items=items, events=events, seed=0, progress=False)
    for name in ("interactions", "items"):
        frame = pl.read_parquet(folder / f"{name}.parquet")
        frame.write_csv(folder / f"{name}.csv")
        frame.write_ndjson(folder / f"{name}.ndjson")
    log = pl.read_parquet(folder / "interactions.parquet")
    return {
        "events": log.height,
        "users": log["user_id"].n_unique(),
        "items": log["item_id"].n_unique(),
        "schema": {name: str(dtype) for name, dtype in log.schema.items()},
        "bytes": {fmt: (folder / f"interactions.{fmt}").stat().st_size for fmt in FORMATS},
    }


def same_examples(ours: Path, pandas: Path) -> dict[str, bool]:
    """Per split: do both hold the same example rows (sorted, every column)?"""
    import polars as pl

    result = {}
    for name in SPLITS:
        left = pl.read_parquet(ours / "examples" / f"{name}.parquet")
        right = pl.read_parquet(pandas / f"{name}.parquet").select(left.columns).cast(left.schema)
        result[name] = left.sort(left.columns).equals(right.sort(left.columns))
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    return {
        "median_seconds": round(statistics.median(seconds), 3),
        "median_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 3),
        "runs_seconds": [round(s, 3) for s in seconds],
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=160_000)
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--loo-events", type=int, default=10_000_000, help="0 = skip")
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "pipeline", "repeats": args.repeats}
    kinds = (*FORMATS, *PANDAS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log_dir = root / "log"
        report["log"] = _write_log(log_dir, events=args.events, users=args.users, items=args.items)
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(_measure(kind, log_dir, root / f"out-{kind}"))
        first = runs["csv"][0]
        for kind in kinds:
            for run in runs[kind]:
                assert all(run[k] == first[k] for k in SPLITS), (kind, run, first)
        report["examples"] = {name: first[name] for name in SPLITS}
        report["prepare_paper"] = {kind: _summary(runs[kind]) for kind in FORMATS}
        report["pandas_csv"] = {kind: _summary(runs[kind]) for kind in PANDAS}
        report["same_examples_as_ours"] = {
            kind: all(same_examples(root / "out-csv", root / f"out-{kind}").values())
            for kind in PANDAS
        }
        median = {k: report["prepare_paper"][k]["median_seconds"] for k in FORMATS}
        cpu = {k: report["prepare_paper"][k]["median_cpu_seconds"] for k in FORMATS}
        pandas = {k: report["pandas_csv"][k]["median_seconds"] for k in PANDAS}
        pandas_cpu = {k: report["pandas_csv"][k]["median_cpu_seconds"] for k in PANDAS}
        report["ratios"] = {
            **{f"{k}_over_csv": round(pandas[k] / median["csv"], 2) for k in PANDAS},
            **{f"{k}_over_csv_cpu": round(pandas_cpu[k] / cpu["csv"], 2) for k in PANDAS},
            "csv_over_parquet": round(median["csv"] / median["parquet"], 2),
            "ndjson_over_parquet": round(median["ndjson"] / median["parquet"], 2),
            "slowest_over_fastest_format": round(max(median.values()) / min(median.values()), 2),
        }
        if args.loo_events:
            loo_dir = root / "loo"
            from pipelines.synthetic import generate_log

            n = args.loo_events
            generate_log(loo_dir, users=n // 40, items=n // 50, events=n, seed=0, progress=False)
            loo = _measure("parquet", loo_dir, root / "out-loo", "leave-one-out")
            report["leave_one_out"] = {
                "events": n,
                "seconds": round(loo["seconds"], 3),
                "peak_rss_mb": round(loo["peak_rss_mb"]),
                "train": loo["train"],
            }
    ratios = report["ratios"]
    report["targets"] = {
        "csv_>=10x_faster_than_pandas_per_user": ratios["pandas-groupby_over_csv"] >= 10,
        "csv_>=15x_faster_than_pandas_per_user_(goal)": ratios["pandas-groupby_over_csv"] >= 15,
        "csv_within_1.5x_of_parquet": ratios["csv_over_parquet"] <= 1.5,
        "all_formats_within_1.5x": ratios["slowest_over_fastest_format"] <= 1.5,
        "same_examples_as_pandas": all(report["same_examples_as_ours"].values()),
    }
    if "leave_one_out" in report:
        report["targets"]["leave_one_out_peak_rss<=2GB"] = (
            report["leave_one_out"]["peak_rss_mb"] <= 2048
        )
    report["note"] = (
        "medians of interleaved runs, each in a fresh subprocess, in one run on this machine "
        "(2 shared cores): compare the ratios, not the seconds, across runs"
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
