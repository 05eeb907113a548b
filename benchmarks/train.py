"""Training and full-ranking evaluation throughput of every model kind.

Two datasets: Digital_Music (../shared/data, paper preset) and a synthetic log with 100k items
(`pipelines.synthetic.generate_log`, leave-one-out split). Each dataset runs in a fresh
subprocess so its peak RSS is its own. Baselines measured in the same run:
- batch building: the reference implementation's per-example Python loop that pads one batch
  at a time (TLSAN/input.py) versus our vectorised gather + negative sampling;
- evaluation: scoring one user at a time (a per-user loop) versus batched full ranking.
Targets on the 2-core dev machine: a TLSAN `paper` epoch on Digital_Music <= 5 s, full-ranking
evaluation of all its test users <= 1 s. `per_kind` puts training examples/s and evaluation
users/s of TLSAN `default` and `paper`, SASRec, TiSASRec (`default`) and pop side by side, all
measured in the same process on Digital_Music; training speed is counted in training targets
per second, since a (Ti)SASRec "example" is a sequence window covering many targets.
Data parallel (`data_parallel`): the same `tlsan train` command on Digital_Music with 1 process
(no torchrun) and with N processes (`torchrun --standalone --nproc-per-node N`, gloo), in
alternating rounds on the same prepared dataset; training examples/s of the whole job (every
rank's examples over the slowest rank's seconds, from history.json) and the ratio to 1 process.
On a 2-core machine shared with other jobs only the ratio within one run means anything.
Prints one JSON document.

    python benchmarks/train.py
    python benchmarks/train.py --synthetic-events 2000000 --steps 300
    python benchmarks/train.py --section data_parallel --dp-processes 1,2 --dp-rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "amazon"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reference_batches(split: Any, batch_size: int, rows: list[int]) -> int:
    """The reference code's batch building: Python lists per example, padded per batch."""
    import numpy as np

    long_lists = [[int(x) for x in row if x] for row in split.arrays.long_items.tolist()]
    tau_lists = [[float(x) for x in row if x] for row in split.arrays.long_tau.tolist()]
    short_lists = [[int(x) for x in row if x] for row in split.arrays.short_items.tolist()]
    users = split.arrays.user.tolist()
    targets = split.arrays.target.tolist()
    start = time.perf_counter()
    for offset in range(0, len(rows), batch_size):
        ts = rows[offset : offset + batch_size]
        sl = [len(long_lists[t]) for t in ts]
        new_sl = [len(short_lists[t]) for t in ts]
        hist_i = np.zeros([len(ts), max(sl)], np.int64)
        hist_t = np.zeros([len(ts), max(sl)], np.float32)
        hist_i_new = np.zeros([len(ts), max(max(new_sl), 1)], np.int64)
        for k, t in enumerate(ts):
            for j in range(len(long_lists[t])):
                hist_i[k][j] = long_lists[t][j]
                hist_t[k][j] = tau_lists[t][j]
            for j in range(len(short_lists[t])):
                hist_i_new[k][j] = short_lists[t][j]
        _ = ([users[t] for t in ts], [targets[t] for t in ts])
    return int((time.perf_counter() - start) * 1e9)


def _time_eval(model: Any, split: Any, repeats: int, batch_size: int = 1024) -> list[float]:
    from tlsan.evaluate import evaluate_model

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_model(model, split, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    return times


def _per_user_eval(model: Any, split: Any, users: int) -> float:
    """Users/s when every user is scored alone (the naive loop)."""
    import torch

    model.eval()
    n = min(users, len(split))
    start = time.perf_counter()
    with torch.inference_mode():
        items = model.item_vectors()
        for row in range(n):
            batch = split.arrays.batch(torch.tensor([row]))
            scores = model.user_vectors(batch) @ items.T
            scores[:, 0] = float("-inf")
            _ = (scores >= scores[0, batch.target]).sum()
    return n / (time.perf_counter() - start)


def _train_rate(config: Any, dataset: Any, steps: int | None, repeats: int) -> dict[str, Any]:
    """Examples/s of `train_epoch` (a full epoch when steps is None)."""
    import torch

    from tlsan.train import make_optimizer, new_model, train_epoch

    model = new_model(config, dataset)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    rows = None
    if steps is not None:
        rows = torch.randperm(len(dataset.train), generator=generator)[: steps * config.batch_size]
    seconds, rates = [], []
    for _ in range(repeats):
        stats = train_epoch(model, optimizer, dataset.train, config, generator, rows=rows)
        seconds.append(stats.seconds)
        rates.append(stats.examples_per_s)
    return {
        "examples": stats.examples,
        "steps": stats.steps,
        "seconds_median": statistics.median(seconds),
        "examples_per_s_median": statistics.median(rates),
        # training targets per second: (Ti)SASRec's `examples` are sequence windows, each
        # covering many targets; a full epoch uses every target of the split exactly once
        "train_targets_per_s": len(dataset.train) / statistics.median(seconds)
        if steps is None
        else None,
        "model": model,
    }


def section_digital_music(repeats: int) -> dict[str, Any]:
    # The prepared dataset lives until the end: (Ti)SASRec read events.parquet for their windows.
    with tempfile.TemporaryDirectory() as tmp:
        return _digital_music(Path(tmp), repeats)


def _prepare_digital_music(out: Path) -> Path:
    """Digital_Music from ../shared/data with `--preset paper`, written to `out`."""
    from pipelines.config import PrepareConfig, apply_preset
    from pipelines.prepare import prepare_dataset

    config = apply_preset(
        PrepareConfig(
            interactions=SHARED / "Digital_Music.interactions.csv",
            items=SHARED / "Digital_Music.items.csv",
        ),
        "paper",
        set(),
    )
    return prepare_dataset(config, out, progress=False).path


def _digital_music(tmp: Path, repeats: int) -> dict[str, Any]:
    from tlsan.config import preset
    from tlsan.data import load_dataset
    from tlsan.train import set_threads

    set_threads(1)
    dataset = load_dataset(_prepare_digital_music(tmp / "dm"))
    out: dict[str, Any] = {"train_examples": len(dataset.train), "test_users": len(dataset.test)}
    paper = preset("paper")
    tlsan = _train_rate(paper, dataset, None, repeats)
    model = tlsan.pop("model")
    eval_times = _time_eval(model, dataset.test, max(repeats, 5))
    loop_rate = _per_user_eval(model, dataset.test, 300)
    rows = list(range(len(dataset.train)))
    reference_ns = _reference_batches(dataset.train, paper.batch_size, rows)
    import torch

    start = time.perf_counter()
    for _ in dataset.train.batches(
        paper.batch_size, negatives=paper.negatives, generator=torch.Generator()
    ):
        pass
    ours_batches = time.perf_counter() - start
    out["tlsan_paper"] = {
        **tlsan,
        "epoch_target_s": 5.0,
        "eval_all_test_users_s_median": statistics.median(eval_times),
        "eval_target_s": 1.0,
        "eval_users_per_s": len(dataset.test) / statistics.median(eval_times),
        "eval_per_user_loop_users_per_s": loop_rate,
        "eval_speedup_vs_per_user_loop": len(dataset.test)
        / statistics.median(eval_times)
        / loop_rate,
    }
    out["batch_building_epoch"] = {
        "ours_s": ours_batches,
        "reference_python_loop_s": reference_ns / 1e9,
        "speedup": (reference_ns / 1e9) / ours_batches,
        "note": "ours includes negative sampling; the reference loop only pads",
    }
    default = preset("default", "tlsan", dataset.sizes.items)
    out["tlsan_default"] = _with_eval(
        _train_rate(default, dataset, None, repeats), dataset.test, max(repeats, 3)
    )
    # the previous default recipe (softmax over 32 sampled negatives outside the history): what
    # "TLSAN no slower than before" compares with, in this run
    previous = _train_rate(default.override(loss="softmax"), dataset, None, repeats)
    previous.pop("model")
    out["tlsan_default_previous_sampled_softmax"] = previous
    out["tlsan_default_train_rate_vs_previous"] = (
        out["tlsan_default"]["train_targets_per_s"] / previous["train_targets_per_s"]
    )
    for kind in ("sasrec", "tisasrec"):
        rate = _train_rate(preset("default", kind, dataset.sizes.items), dataset, None, 1)
        out[f"{kind}_default"] = _with_eval(rate, dataset.test, 3)
    out["pop"] = _pop_rates(dataset, max(repeats, 3))
    out["per_kind"] = {  # the two rates of every model kind, side by side (this run)
        name: {
            "train_targets_per_s": out[name].get("train_targets_per_s"),
            "eval_users_per_s": out[name]["eval_users_per_s"],
        }
        for name in ("tlsan_default", "tlsan_paper", "sasrec_default", "tisasrec_default", "pop")
    }
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _with_eval(rate: dict[str, Any], split: Any, repeats: int) -> dict[str, Any]:
    """A `_train_rate` result with the full-ranking evaluation rate of its trained model."""
    model = rate.pop("model")
    times = _time_eval(model, split, repeats)
    return {
        **rate,
        "eval_all_test_users_s_median": statistics.median(times),
        "eval_users_per_s": len(split) / statistics.median(times),
    }


def _pop_rates(dataset: Any, repeats: int) -> dict[str, Any]:
    """pop trains nothing: the seconds of fitting it (half-life chosen on validation, as
    `tlsan train --model pop` does) and its evaluation rate."""
    from tlsan.config import preset
    from tlsan.train import new_model

    start = time.perf_counter()
    model = new_model(preset("default", "pop"), dataset)
    fit_s = time.perf_counter() - start
    times = _time_eval(model, dataset.test, repeats)
    return {
        "fit_s": fit_s,
        "note": "no training examples: fitting counts the training events once",
        "eval_all_test_users_s_median": statistics.median(times),
        "eval_users_per_s": len(dataset.test) / statistics.median(times),
    }


def section_synthetic(
    users: int, items: int, events: int, steps: int, eval_users: int
) -> dict[str, Any]:
    import torch

    from pipelines.config import PrepareConfig, SessionRule
    from pipelines.prepare import prepare_dataset
    from pipelines.synthetic import generate_log
    from tlsan.config import preset
    from tlsan.data import load_dataset
    from tlsan.train import set_threads

    set_threads(1)
    out: dict[str, Any] = {"users": users, "items": items, "events": events}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_log(Path(tmp) / "log", users=users, items=items, events=events, seed=0)
        config = PrepareConfig(
            interactions=Path(tmp) / "log" / "interactions.parquet",
            items=Path(tmp) / "log" / "items.parquet",
            split="leave-one-out",
            session=SessionRule.parse("gap:30m"),
        )
        path = prepare_dataset(config, Path(tmp) / "prepared", progress=False).path
        out["generate_and_prepare_s"] = time.perf_counter() - start
        start = time.perf_counter()
        dataset = load_dataset(path)
        out["load_s"] = time.perf_counter() - start
        # (Ti)SASRec read events.parquet for their windows: train inside the temp dir
        out["train_examples"] = len(dataset.train)
        out["catalog"] = dataset.sizes.items
        subset = dataset.subset("test", torch.arange(min(eval_users, len(dataset.test))))
        for name, config in (
            ("tlsan_default", preset("default")),
            ("sasrec_default", preset("default", "sasrec")),
        ):
            rate = _train_rate(config, dataset, steps, 1)
            model = rate.pop("model")
            times = _time_eval(model, subset, 2)
            out[name] = {
                **rate,
                "eval_users": len(subset),
                "eval_s_median": statistics.median(times),
                "eval_users_per_s": len(subset) / statistics.median(times),
            }
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _train_command(processes: int, args: list[str]) -> list[str]:
    """`tlsan train ARGS` in one process, or under torchrun with `processes` gloo ranks."""
    if processes == 1:
        return [sys.executable, "-m", "tlsan", "train", *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "tlsan",
        "train",
        *args,
    ]


def section_data_parallel(
    processes: list[int], rounds: int, epochs: int, model: str, preset_name: str
) -> dict[str, Any]:
    """Training examples/s of 1 and N processes on Digital_Music, rounds interleaved."""

    out: dict[str, Any] = {
        "model": model,
        "preset": preset_name,
        "epochs_per_run": epochs,
        "rounds": rounds,
        "note": "examples/s of the whole job (all ranks' examples / slowest rank's seconds), "
        "median over runs of each run's median epoch; the machine is shared: read the ratios",
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare_digital_music(Path(tmp) / "dm")
        rates: dict[int, list[float]] = {n: [] for n in processes}
        walls: dict[int, list[float]] = {n: [] for n in processes}
        for round_ in range(rounds):
            for n in processes:
                run = Path(tmp) / f"run-{n}-{round_}"
                args = ["--data", str(data), "--out", str(run), "--model", model]
                args += ["--preset", preset_name, "--epochs", str(epochs), "--patience", "0"]
                args += ["--no-mlflow", "--quiet"]
                start = time.perf_counter()
                done = subprocess.run(
                    _train_command(n, args), capture_output=True, text=True, cwd=tmp, check=False
                )
                walls[n].append(time.perf_counter() - start)
                if done.returncode != 0:
                    return {**out, "error": done.stderr.strip().splitlines()[-5:]}
                history = json.loads((run / "history.json").read_text())["epochs"]
                rates[n].append(statistics.median(e["examples_per_s"] for e in history))
    base = statistics.median(rates[processes[0]])
    out["runs"] = {
        str(n): {
            "examples_per_s_median": statistics.median(rates[n]),
            "examples_per_s_per_process": statistics.median(rates[n]) / n,
            "examples_per_s_all": rates[n],
            "wall_s_median": statistics.median(walls[n]),
            f"ratio_to_{processes[0]}_process": statistics.median(rates[n]) / base,
        }
        for n in processes
    }
    return out


def _subprocess(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-5:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", choices=["digital_music", "synthetic", "data_parallel"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-users", type=int, default=20_000)
    parser.add_argument("--synthetic-items", type=int, default=100_000)
    parser.add_argument("--synthetic-events", type=int, default=1_000_000)
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps on the synthetic log"
    )
    parser.add_argument("--eval-users", type=int, default=2000, help="synthetic test users ranked")
    parser.add_argument("--dp-processes", default="1,2", help="training processes to compare")
    parser.add_argument("--dp-rounds", type=int, default=2, help="interleaved rounds per count")
    parser.add_argument("--dp-epochs", type=int, default=2, help="epochs per data-parallel run")
    parser.add_argument("--dp-model", default="tlsan", choices=["tlsan", "sasrec"])
    parser.add_argument("--dp-preset", default="default", choices=["paper", "default"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.section == "digital_music":
        print(json.dumps(section_digital_music(args.repeats)))
        return
    dp_args = [
        "--section", "data_parallel", "--dp-processes", args.dp_processes,
        "--dp-rounds", str(args.dp_rounds), "--dp-epochs", str(args.dp_epochs),
        "--dp-model", args.dp_model, "--dp-preset", args.dp_preset,
    ]  # fmt: skip
    if args.section == "data_parallel":
        processes = [int(n) for n in args.dp_processes.split(",")]
        print(
            json.dumps(
                section_data_parallel(
                    processes, args.dp_rounds, args.dp_epochs, args.dp_model, args.dp_preset
                )
            )
        )
        return
    if args.section == "synthetic":
        result = section_synthetic(
            args.synthetic_users,
            args.synthetic_items,
            args.synthetic_events,
            args.steps,
            args.eval_users,
        )
        print(json.dumps(result))
        return
    report = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "torch_threads": 1,
        "digital_music": _subprocess(
            ["--section", "digital_music", "--repeats", str(args.repeats)]
        ),
        "synthetic_100k_items": _subprocess(
            [
                "--section",
                "synthetic",
                "--synthetic-users",
                str(args.synthetic_users),
                "--synthetic-items",
                str(args.synthetic_items),
                "--synthetic-events",
                str(args.synthetic_events),
                "--steps",
                str(args.steps),
                "--eval-users",
                str(args.eval_users),
            ]
        ),  # fmt: skip
        "data_parallel_digital_music": _subprocess(dp_args),
    }
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
