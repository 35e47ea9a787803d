"""Tables larger than memory: peak memory and throughput of `--stream` as the file grows.

    python -m benchmarks.scale                       # 1x, 4x, 16x of ~130 MiB (the largest ~2.03 GiB)
    python -m benchmarks.scale --base-rows 20000     # quicker
    python -m benchmarks.scale --table mixed --repeats 3   # 10M and 40M mixed rows (~1.4 and ~5.6 GiB)

`--table mixed`: text categories (5, 50 and 2,000 values, the last pooled to its top 100), a store
code column (500 codes), gaps in three number columns, 16 numbers and a yes/no label; at 1x it
also trains the same rows' complete numbers alone, the numeric streamed path's contrast.

Writes CSV files of 1, 4 and 16 times a base number of rows (32 float features and a class label,
every row drawn afresh) and trains one epoch on each with `python -m training.fit --stream`, as a
separate process, recording its peak resident memory (the kernel's ru_maxrss) and its
throughput. For contrast it trains the same files in memory (without --stream) up to --in-memory
times the base, and once with two torchrun ranks. Writes benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FEATURES = 32


def write_table(path: Path, rows: int, seed: int, block: int = 100_000) -> None:
    """A learnable classification table, written block by block (it need not fit in memory)."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(0).normal(size=FEATURES)
    with open(path, "w") as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            X = rng.normal(size=(n, FEATURES)) * np.logspace(-2, 4, FEATURES)  # mixed scales
            logit = (X / np.logspace(-2, 4, FEATURES)) @ weights / np.sqrt(FEATURES)
            frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(FEATURES)])
            frame["y"] = np.where(logit + rng.normal(0, 0.5, n) > 0, "yes", "no")
            frame.to_csv(f, index=False, header=start == 0)


MIXED_NUMBERS = 16


def write_mixed_table(path: Path, rows: int, seed: int, text: bool = True, block: int = 200_000) -> None:
    """A learnable mixed table (module docstring), or with `text` False its complete numbers alone."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(0)
    weights, city_effect = fixed.normal(size=MIXED_NUMBERS), fixed.normal(size=50)
    product_effect, store_effect = fixed.normal(size=2000), fixed.normal(size=500)
    popularity = 1 / np.arange(1, 2001) ** 1.1
    popularity /= popularity.sum()
    with open(path, "w") as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            X = rng.normal(size=(n, MIXED_NUMBERS)).round(4)
            frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(MIXED_NUMBERS)])
            logit = X @ weights / np.sqrt(MIXED_NUMBERS)
            if text:
                city, product = rng.integers(0, 50, n), rng.choice(2000, n, p=popularity)
                store = rng.integers(0, 500, n)
                frame["channel"] = np.where(rng.random(n) < 0.02, "",
                                            np.array(["web", "store", "phone", "app", "partner"])[rng.integers(0, 5, n)])
                frame["city"] = np.char.add("city", city.astype(str))
                frame["product"] = np.char.add("p", product.astype(str))
                frame["store"] = 10_000 + 7 * store
                for c in ("x0", "x1", "x2"):
                    frame.loc[rng.random(n) < 0.05, c] = np.nan
                logit = logit + city_effect[city] + product_effect[product] * (product < 100) + store_effect[store]
            frame["y"] = np.where(logit + rng.normal(0, 0.5, n) > 0, "yes", "no")
            frame.to_csv(f, index=False, header=start == 0)


def train(path: Path, models: Path, extra: list[str], ranks: int = 1) -> dict:
    """One epoch in a child process; its peak memory from the kernel (ru_maxrss: the largest
    process of the run; under torchrun, the largest rank)."""
    fit = ["-m", "training.fit", "--data", str(path), "--target", "y", "--epochs", "1",
           "--batch-size", "1024", "--no-store", "--no-progress", "--models-dir", str(models), *extra]
    command = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  str(ranks)] if ranks > 1 else []), *fit]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training failed on {path.name}:\n{stderr[-2000:]}")
    card = json.loads(max(models.rglob("card.json"), key=lambda p: p.stat().st_mtime).read_text())
    rows = sum(card["rows"].values())
    return {"rows": rows, "train_rows": card["rows"]["train"], "wall_s": round(wall, 1),
            "train_s": card["training"]["seconds"],
            "train_rows_per_s": round(card["rows"]["train"] / card["training"]["seconds"]),
            "rows_per_s_overall": round(rows / wall),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "test_accuracy": round(card["metrics"]["test"]["accuracy"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["numeric", "mixed"], default="numeric")
    parser.add_argument("--base-rows", type=int, help="rows of the 1x file (numeric: 216,000; mixed: 10M)")
    parser.add_argument("--sizes", help="multiples of the base (numeric: 1,4,16; mixed: 1,4)")
    parser.add_argument("--in-memory", type=int, default=4, help="numeric: the in-memory contrast up to this size")
    parser.add_argument("--repeats", type=int, default=1, help="training runs per file")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--stream-args", default="", help="more options for the --stream runs, "
                        "e.g. \"--shuffle-rows 20000 --eval-rows 1000\"")
    parser.add_argument("--out", help="file name under benchmarks/results/ (default: scale[_mixed].json)")
    args = parser.parse_args()
    mixed = args.table == "mixed"
    base = args.base_rows or (10_000_000 if mixed else 216_000)
    sizes = [int(k) for k in (args.sizes or ("1,4" if mixed else "1,4,16")).split(",")]
    work = Path(args.dir or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    streamed = ["--stream", *args.stream_args.split()]
    rows = []
    try:
        for k in sizes:
            files = [("stream", work / f"{args.table}_{k}x.csv", True)]
            files += [("stream, numbers only", work / f"numbers_{k}x.csv", False)] if mixed and k == 1 else []
            for mode, path, text in files:
                t = time.perf_counter()
                if mixed:
                    write_mixed_table(path, base * k, seed=k, text=text)
                else:
                    write_table(path, base * k, seed=k)
                size_mb = path.stat().st_size / 2**20
                print(f"wrote {path.name}: {size_mb:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
                runs = [(mode, streamed, 1)]
                if not mixed:
                    runs += [("in memory", [], 1)] if k <= args.in_memory else []
                    runs += [("stream, 2 ranks", streamed, 2)] if k == 1 else []
                for run_mode, extra, ranks in runs:
                    for _ in range(args.repeats):
                        result = train(path, work / "models", extra, ranks)
                        rows.append({"size": f"{k}x", "file_mb": round(size_mb), "mode": run_mode, **result})
                        print(f"  {run_mode}: peak {result['peak_rss_mb']} MB, {result['train_rows_per_s']} "
                              f"train rows/s, {result['rows_per_s_overall']} rows/s overall, "
                              f"{result['wall_s']} s", flush=True)
                        shutil.rmtree(work / "models", ignore_errors=True)
                path.unlink()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    header = f"{'size':>5} {'file MB':>8} {'mode':<16} {'rows':>10} {'peak MB':>8} " \
             f"{'train rows/s':>13} {'wall s':>7} {'test acc':>9}"
    print("\n" + header)
    for r in rows:
        print(f"{r['size']:>5} {r['file_mb']:>8} {r['mode']:<16} {r['rows']:>10} {r['peak_rss_mb']:>8} "
              f"{r['train_rows_per_s']:>13} {r['wall_s']:>7} {r['test_accuracy']:>9}")
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    out = RESULTS / (args.out or f"scale{'_mixed' if mixed else ''}.json")
    out.write_text(json.dumps({"machine": machine, "table": args.table, "base_rows": base,
                               "stream_args": args.stream_args, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
