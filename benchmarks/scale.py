"""Tables larger than memory: peak memory and throughput of `--stream` as the file grows.

    python -m benchmarks.scale                       # 1x, 4x, 16x of ~130 MiB (the largest ~2.03 GiB)
    python -m benchmarks.scale --base-rows 20000     # quicker

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
    parser.add_argument("--base-rows", type=int, default=216_000)
    parser.add_argument("--sizes", default="1,4,16")
    parser.add_argument("--in-memory", type=int, default=4, help="in-memory contrast up to this size")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--stream-args", default="", help="more options for the --stream runs, "
                        "e.g. \"--shuffle-rows 20000 --eval-rows 1000\"")
    parser.add_argument("--out", default="scale.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for k in map(int, args.sizes.split(",")):
            path = work / f"table_{k}x.csv"
            t = time.perf_counter()
            write_table(path, args.base_rows * k, seed=k)
            size_mb = path.stat().st_size / 2**20
            print(f"wrote {path.name}: {size_mb:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
            streamed = ["--stream", *args.stream_args.split()]
            runs = [("stream", streamed, 1)]
            runs += [("in memory", [], 1)] if k <= args.in_memory else []
            runs += [("stream, 2 ranks", streamed, 2)] if k == 1 else []
            for mode, extra, ranks in runs:
                result = train(path, work / "models", extra, ranks)
                rows.append({"size": f"{k}x", "file_mb": round(size_mb), "mode": mode, **result})
                print(f"  {mode}: peak {result['peak_rss_mb']} MB, {result['train_rows_per_s']} train "
                      f"rows/s, {result['wall_s']} s", flush=True)
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
    (RESULTS / args.out).write_text(json.dumps({"machine": machine, "stream_args": args.stream_args,
                                                "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / args.out}")


if __name__ == "__main__":
    main()
