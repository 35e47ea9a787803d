"""Batch scoring (`python -m service.batch`): rows/s and peak memory of each engine on large files.

    python -m benchmarks.batch                      # 10M numeric rows, 2M mixed rows, 3 repeats
    python -m benchmarks.batch --rows 1000000 --mixed-rows 200000 --repeats 1   # quicker

Trains two models in a temporary BentoML home (the default recipe: breast_cancer's 30 numeric
features; the synthetic customer table of benchmarks/mixed_table.py, numbers and text categories
with gaps), writes Parquet files of their rows (the numeric one drawn around breast_cancer's rows;
a tenth of the size as well, to see whether memory grows with the file), then, per file and repeat:

- `ort`: onnxruntime alone on the same rows, in memory (the graph's inputs prepared beforehand, the
  same session options, batches of the same size): what scoring costs without reading, checking
  or writing;
- `local`: `python -m service.batch` as its own process, input and output included, its peak
  resident memory from the kernel (VmHWM, read every 20 ms while it runs);
- `spark local[2]` and `spark cluster` (a standalone master and one 2-core worker on 127.0.0.1,
  started here with pyspark's `spark-class`): the same command with `--engine spark`; rows/s
  without the session's start-up, which is reported apart.

Prints a table, writes benchmarks/results/batch.json and batch.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 1_000_000  # rows written per row group


def train(name: str, extra: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "training.fit", "--name", name, "--no-progress", *extra],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def write_numeric(path: Path, rows: int, seed: int = 0) -> None:
    """Rows drawn around breast_cancer's (each feature jittered by 5% of its spread), with an id."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer
    data = load_breast_cancer(as_frame=True).data
    base, spread, rng = data.to_numpy(), data.std().to_numpy(), np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), *((c, pa.float64()) for c in data.columns)])) as w:
        for start in range(0, rows, BLOCK):
            n = min(BLOCK, rows - start)
            x = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, base.shape[1])) * spread
            w.write_table(pa.table({"id": np.arange(start, start + n), **dict(zip(data.columns, x.T))}))


def write_mixed(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.mixed_table import customers
    writer = None
    for k, start in enumerate(range(0, rows, BLOCK)):
        block = pa.Table.from_pandas(customers(min(BLOCK, rows - start), seed=k), preserve_index=False)
        writer = writer or pq.ParquetWriter(path, block.schema)
        writer.write_table(block)
    writer.close()


def ort_alone(tag: str, path: Path, chunk: int) -> dict:
    """onnxruntime on the file's rows held in memory, the graph's inputs built before the clock
    starts: the pace scoring alone would set. The faster of two ways to use the cores: one batch
    at a time on all of them, or as the local engine does (local_workers: batches at once)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from service.batch import local_workers, open_scorer, reading
    from service.rows import check_frame
    workers, threads = local_workers()
    scorer = open_scorer(tag, os.cpu_count() or 1)
    read = reading(scorer, [], None)
    table = pq.read_table(path, columns=read.columns)
    feeds = [check_frame(scorer, read.frame(b))[0] for b in table.to_batches(chunk)]
    del table
    rows = sum(len(next(iter(f.values()))) for f in feeds)
    started = time.perf_counter()
    for f in feeds:
        scorer.session.run(scorer.outputs, f)
    one_at_a_time = time.perf_counter() - started
    session = open_scorer(tag, threads).session
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: session.run(scorer.outputs, f), feeds))
    at_once = time.perf_counter() - started
    seconds = min(one_at_a_time, at_once)
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "one_at_a_time_rows_per_s": round(rows / one_at_a_time), "at_once_rows_per_s": round(rows / at_once)}


def batch_job(tag: str, path: Path, out: Path, env: dict, engine: str, master: str = "local[2]") -> dict:
    """`python -m service.batch` as its own process: its rows/s and peak memory."""
    command = [sys.executable, "-m", "service.batch", "--model", tag, "--input", str(path), "--output", str(out),
               "--keep", "id" if "numeric" in tag else "customer_id", "--engine", engine, "--master", master,
               "--overwrite", "--no-progress"]
    log = out.with_name("job.log")
    started, peak = time.perf_counter(), 0
    with open(log, "w") as f:  # a file, not a pipe: nothing blocks on a full pipe while we wait
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, high_water_mb(proc.pid))
            time.sleep(0.02)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed on {path.name}:\n{log.read_text()[-3000:]}")
    report = json.loads(out.with_name(out.name + ".drift.json").read_text())
    return {"rows": report["rows_out"], "errors": report["errors"], "seconds": report["seconds"],
            "startup_s": report.get("startup_seconds", 0.0), "wall_s": round(wall, 2),
            "rows_per_s": round(report["rows_out"] / report["seconds"]),
            "peak_rss_mb": peak if engine == "local" else None}


def high_water_mb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM). Not ru_maxrss: Linux carries the
    forking parent's peak into a child's across exec, and this parent holds whole files."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:  # it has just ended
        pass
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone_cluster(work: Path):
    """A Spark master and one worker (2 cores) on 127.0.0.1; returns (URL, processes)."""
    import pyspark
    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    port, ui = free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(work / "spark-work")}
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"spark://127.0.0.1:{port}"
    worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", url, "--cores", "2",
                               "--memory", "2g", "--webui-port", str(free_port())], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                if json.load(r).get("aliveworkers", 0) >= 1:
                    return url, [worker, master]
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("the standalone Spark cluster did not start within 120 s")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = list(dict.fromkeys(r["file"] for r in runs))
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        medians = [np.median([r["rows_per_s"] for r in runs if r["file"] == f and r["mode"] == mode] or [np.nan])
                   for f in files]
        ax.bar(np.arange(len(files)) + j * width, np.array(medians) / 1e3, width, label=mode)
    ax.set_xticks(np.arange(len(files)) + width * (len(modes) - 1) / 2, files)
    ax.set_ylabel("thousand rows/s (median of repeats)")
    ax.set_title(f"batch scoring, {os.cpu_count()} cores (spark: without start-up)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(runs: list[dict]) -> list[dict]:
    table = []
    for key in dict.fromkeys((r["file"], r["mode"]) for r in runs):
        group = [r for r in runs if (r["file"], r["mode"]) == key]
        ort = [r["rows_per_s"] for r in runs if r["file"] == key[0] and r["mode"] == "ort"]
        speed = [r["rows_per_s"] for r in group]
        row = {"file": key[0], "mode": key[1], "repeats": len(group), "rows": group[0]["rows"],
               "rows_per_s": [min(speed), int(np.median(speed)), max(speed)],
               "vs_ort": round(float(np.median(speed)) / float(np.median(ort)), 2) if ort else None}
        for k in ("peak_rss_mb", "startup_s"):
            if any(r.get(k) for r in group):
                v = [r[k] for r in group]
                row[k] = [min(v), float(np.median(v)), max(v)]
        table.append(row)
    local = {t["file"]: t["rows_per_s"][1] for t in table if t["mode"] == "local"}
    for t in table:
        if t["mode"].startswith("spark") and t["file"] in local:
            t["vs_local"] = round(t["rows_per_s"][1] / local[t["file"]], 2)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="numeric file's rows")
    parser.add_argument("--mixed-rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--no-spark", dest="spark", action="store_false")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    os.environ.update(env)
    cluster = []
    try:
        customers = work / "customers.csv"
        from benchmarks.mixed_table import customers as table
        table(20_000).to_csv(customers, index=False)
        print("training the two models ...", flush=True)
        train("batch-numeric", ["--models-dir", str(work / "models")], env)
        train("batch-mixed", ["--data", str(customers), "--target", "churned", "--models-dir", str(work / "models")], env)
        files = {f"numeric {args.rows // 10:,}": ("batch-numeric", work / "numeric_small.parquet", args.rows // 10),
                 f"numeric {args.rows:,}": ("batch-numeric", work / "numeric.parquet", args.rows),
                 f"mixed {args.mixed_rows:,}": ("batch-mixed", work / "mixed.parquet", args.mixed_rows)}
        for name, (tag, path, rows) in files.items():
            started = time.perf_counter()
            (write_numeric if "numeric" in tag else write_mixed)(path, rows)
            print(f"wrote {name} rows: {path.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - started:.0f} s",
                  flush=True)
        modes = [("local", "local", "")]
        if args.spark:
            url, cluster = standalone_cluster(work)
            modes += [("spark local[2]", "spark", "local[2]"), ("spark cluster", "spark", url)]
        runs = []
        for repeat in range(args.repeats):
            for name, (tag, path, _) in files.items():
                r = {"file": name, "mode": "ort", "repeat": repeat, **ort_alone(tag, path, args.chunk_rows)}
                runs.append(r)
                print(f"  {name:<20} {'ort':<15} {r['rows_per_s']:>10,} rows/s", flush=True)
                for mode, engine, master in modes:
                    if engine == "spark" and name.startswith("numeric") and path.name == "numeric_small.parquet":
                        continue  # the small file is there for local's memory
                    out = work / ("out.parquet" if engine == "local" else "out")
                    r = {"file": name, "mode": mode, "repeat": repeat, **batch_job(tag, path, out, env, engine, master)}
                    runs.append(r)
                    print(f"  {name:<20} {mode:<15} {r['rows_per_s']:>10,} rows/s  peak {r['peak_rss_mb']} MB"
                          f"  start-up {r['startup_s']:.1f} s", flush=True)
    finally:
        for p in cluster:
            p.terminate()
            p.wait(timeout=30)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    table = summarize(runs)
    print(f"\n{'file':<20} {'mode':<15} {'rows/s min / median / max':>30} {'x ort':>6} {'x local':>8} "
          f"{'peak MB (median)':>17} {'start-up s':>11}")
    for t in table:
        speed = " / ".join(f"{v:,}" for v in t["rows_per_s"])
        print(f"{t['file']:<20} {t['mode']:<15} {speed:>30} {t['vs_ort'] or '':>6} {t.get('vs_local', ''):>8} "
              f"{t['peak_rss_mb'][1] if 'peak_rss_mb' in t else '':>17} "
              f"{t['startup_s'][1] if 'startup_s' in t else '':>11}")
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "batch.json").write_text(json.dumps({"machine": machine, "args": vars(args), "table": table,
                                                    "runs": runs}, indent=1) + "\n")
    plot(runs, RESULTS / "batch.png")
    print(f"\nwrote {RESULTS / 'batch.json'} and batch.png")


if __name__ == "__main__":
    main()
