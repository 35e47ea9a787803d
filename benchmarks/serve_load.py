"""Serving throughput and latency: the BentoML service vs. a bare Starlette app vs. in-process
onnxruntime, on the same ONNX file, with the same load generator; and the service with its drift
monitor switched off (DRIFT=0), loaded in turn, for the monitor's cost.

    python -m benchmarks.serve_load                         # newest model (or MODEL_TAG), numeric
    python -m benchmarks.serve_load --seconds 2 --soak 5000 # quicker

Each server runs pinned to core 0 with one worker; the asyncio client runs on core 1. For each
server: single-row requests at 1, 8 and 32 concurrent clients, 1000-row requests at 1 and 8, the
start-up time to /readyz, and the server's memory (all its processes) before and after a soak of
--soak single-row requests. Prints a table; writes benchmarks/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SERVER_CORE, CLIENT_CORE = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_home() -> str:
    """A BENTOML_HOME sharing the model store: `bentoml serve` empties its home's Prometheus folder
    when it starts, which would break a server already running on the same home."""
    import tempfile
    store = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "models"
    home = tempfile.mkdtemp(prefix="bentoml-bench-")
    os.symlink(store, Path(home) / "models")
    return home


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(SERVER_CORE), *cmd] if shutil.which("taskset") else cmd


def start(kind: str, model_path: str, env: dict, cwd: Path = ROOT,
          pin: bool = True) -> tuple[subprocess.Popen, str, float]:
    """Start a server (from `cwd`: another checkout's code; `pin`: on SERVER_CORE); returns the
    process, its URL and the seconds until /readyz answered 200."""
    port = free_port()
    if kind.startswith("bentoml"):
        cmd = ["bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
        env = {**env, "DRIFT": "0" if kind == "bentoml-nodrift" else "1", "BENTOML_HOME": own_home()}
    else:
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
        env = {**env, "MODEL_PATH": model_path}
    started = time.perf_counter()
    proc = subprocess.Popen(pinned(cmd) if pin else cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 120:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited: {proc.stderr.read().decode()[-800:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"{kind} server did not become ready in 120 s")


def tree_rss_mb(proc: subprocess.Popen) -> float:
    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2 ** 20


async def load(url: str, body: bytes, concurrency: int, seconds: float | None = None,
               requests: int | None = None, content_type: str = "application/json",
               path: str = "/predict", headers: dict | None = None, keep: bool = False) -> dict:
    """`concurrency` clients posting `body` to `path` back to back, for `seconds` or `requests` in
    all (`keep`: the latencies too, in ms)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + (seconds or 1e9)
    remaining = requests if requests is not None else float("inf")
    headers = {"Content-Type": content_type, **(headers or {})}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client():
            nonlocal errors, remaining
            while time.perf_counter() < deadline and remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                try:
                    async with session.post(url + path, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), **({"latencies_ms": lat} if keep else {})}


def in_process(model_path: str, rows_list: list[np.ndarray], seconds: float) -> list[dict]:
    """The compute ceiling: onnxruntime called directly, one thread, no HTTP and no JSON."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for X in rows_list:
        n, end = 0, time.perf_counter() + seconds
        t = time.perf_counter()
        while time.perf_counter() < end:
            session.run(None, {name: X})
            n += 1
        rate = n / (time.perf_counter() - t)
        out.append({"rows_per_request": len(X), "requests_per_s": round(rate, 1),
                    "rows_per_s": round(rate * len(X), 1)})
    return out


def rows_for(meta: dict, n: int, seed: int = 0) -> list[list[float]]:
    """Plausible raw rows: drawn around the training mean with the training spread (the model's
    drift profile, from its ONNX metadata)."""
    rng = np.random.default_rng(seed)
    features = meta["drift"]["features"]
    mean, std = np.array([f["mean"] for f in features]), np.array([f["std"] for f in features])
    return (mean + std * rng.standard_normal((n, len(mean)))).round(4).tolist()


def monitor_cost(model_path: str, env: dict, meta: dict, args) -> dict:
    """The drift monitor's cost: the service with it on and off (DRIFT=0), both running, loaded in
    turn (who goes first alternates; for half the rounds the other was started first),
    --monitor-rounds rounds of --seconds / 2 per case. This VM's
    speed wanders by ~10% between runs seconds apart, so the cost is the median of the rounds'
    paired ratios."""
    kinds = ("bentoml", "bentoml-nodrift")
    buf = io.BytesIO()
    np.save(buf, np.asarray(rows_for(meta, args.big_rows), dtype=np.float32))
    cases = {"1 row x 32 clients": (json.dumps({"instances": rows_for(meta, 1)}).encode(), 32,
                                    "application/json"),
             f"{args.big_rows} rows x 1, JSON": (
                 json.dumps({"instances": rows_for(meta, args.big_rows)}).encode(), 1, "application/json"),
             f"{args.big_rows} rows x 1, .npy": (buf.getvalue(), 1, "application/x-npy")}
    rates = {(case, kind): [] for case in cases for kind in kinds}
    # Half the rounds with the servers started in one order, half in the other: an A/A run (both
    # off) showed the server started first ~3% faster.
    for half, started in enumerate((kinds, kinds[::-1])):
        servers = {kind: start(kind, model_path, env)[:2] for kind in started}
        try:
            for _, url in servers.values():
                asyncio.run(load(url, cases["1 row x 32 clients"][0], 8, requests=2000))  # warm-up
            for round_ in range(half * args.monitor_rounds // 2, (half + 1) * args.monitor_rounds // 2):
                for case, (body, clients, content_type) in cases.items():
                    for kind in kinds[::1 if round_ % 2 else -1]:
                        r = asyncio.run(load(servers[kind][1], body, clients, seconds=args.seconds / 2,
                                             content_type=content_type))
                        rates[case, kind].append(r["requests_per_s"])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    result = {}
    print(f"\ndrift monitor on vs. off (DRIFT=0), {args.monitor_rounds} alternating rounds:")
    for case in cases:
        on, off = (np.array(rates[case, k]) for k in kinds)
        cost = float(np.median(1 - on / off))
        result[case] = {"on_req_s": on.tolist(), "off_req_s": off.tolist(), "median_cost": round(cost, 4)}
        print(f"  {case:<24} on {np.median(on):>8.1f} req/s, off {np.median(off):>8.1f} req/s (medians); "
              f"median paired cost {cost:+.1%}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="bentoml,bare",
                        help="bentoml (drift monitor on), bentoml-nodrift (DRIFT=0), bare; '' for none")
    parser.add_argument("--monitor-rounds", type=int, default=12,
                        help="rounds of the drift monitor on/off comparison (0: skip it)")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each case")
    parser.add_argument("--soak", type=int, default=50_000, help="requests between memory readings")
    parser.add_argument("--big-rows", type=int, default=1000, help="rows per large request")
    args = parser.parse_args()

    import bentoml
    from service.loading import resolve_model_tag
    tag = resolve_model_tag()
    model_path = bentoml.models.get(tag).path_of("model.onnx")
    env = {**os.environ, "MODEL_TAG": tag, "MAX_ROWS": str(max(10_000, args.big_rows)),
           "WORKERS": "1"}
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})
    cases = [(1, 1), (1, 8), (1, 32), (args.big_rows, 1), (args.big_rows, 8)]
    report: dict = {"model": tag, "cores": os.cpu_count(), "seconds_per_case": args.seconds,
                    "soak_requests": args.soak, "servers": {}}
    import onnxruntime as ort
    from training.contract import decode_metadata
    meta = decode_metadata(ort.InferenceSession(model_path).get_modelmeta().custom_metadata_map)
    for kind in [k for k in args.servers.split(",") if k]:
        proc, url, startup = start(kind, model_path, env)
        try:
            with urllib.request.urlopen(url + "/metadata") as r:
                served = json.load(r)
            if served["modality"] != "table":
                raise SystemExit(f"{tag} is a {served['modality']} model; this benchmark posts numeric "
                                 "rows: set MODEL_TAG to a numeric table model")
            bodies = {n: json.dumps({"instances": rows_for(meta, n)}).encode()
                      for n in {rows for rows, _ in cases}}
            asyncio.run(load(url, bodies[1], 8, requests=2000))  # warm-up
            results = []
            for rows, c in cases:
                r = asyncio.run(load(url, bodies[rows], c, seconds=args.seconds))
                r.update(rows_per_request=rows, concurrency=c,
                         rows_per_s=round(r["requests_per_s"] * rows, 1))
                results.append(r)
                print(f"  {kind:<8} {rows:>5} row(s) x {c:>2} clients: {r['requests_per_s']:>8.1f} "
                      f"req/s, p99 {r['p99_ms']} ms, errors {r['errors']}", flush=True)
            if kind == "bentoml":  # the bulk path: the same rows as a .npy array
                buf = io.BytesIO()
                np.save(buf, np.asarray(rows_for(meta, args.big_rows), dtype=np.float32))
                for c in (1, 8):
                    r = asyncio.run(load(url, buf.getvalue(), c, seconds=args.seconds,
                                         content_type="application/x-npy"))
                    r.update(rows_per_request=args.big_rows, concurrency=c, format="npy",
                             rows_per_s=round(r["requests_per_s"] * args.big_rows, 1))
                    results.append(r)
            before = tree_rss_mb(proc)
            soak = asyncio.run(load(url, bodies[1], 32, requests=args.soak))
            after = tree_rss_mb(proc)
            print(f"  {kind:<8} soak {soak['requests']} requests: {before:.1f} -> {after:.1f} MB, "
                  f"errors {soak['errors']}", flush=True)
            report["servers"][kind] = {"startup_s": round(startup, 3), "cases": results,
                                       "memory_before_mb": round(before, 1),
                                       "memory_after_mb": round(after, 1), "soak": soak}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    X1 = np.asarray(rows_for(meta, 1), dtype=np.float32)
    Xn = np.asarray(rows_for(meta, args.big_rows), dtype=np.float32)
    report["in_process"] = in_process(model_path, [X1, Xn], min(args.seconds, 2.0))

    print(f"\nmodel {tag} ({len(meta['feature_names'])} features); servers pinned to core "
          f"{SERVER_CORE}, client on core {CLIENT_CORE}, one worker")
    header = (f"{'server':<12} {'rows/req':>8} {'format':>6} {'clients':>7} {'req/s':>9} {'rows/s':>11} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    print(header + "\n" + "-" * len(header))
    for kind, s in report["servers"].items():
        for r in s["cases"]:
            print(f"{kind:<12} {r['rows_per_request']:>8} {r.get('format', 'json'):>6} "
                  f"{r['concurrency']:>7} {r['requests_per_s']:>9.1f} "
                  f"{r['rows_per_s']:>11.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['errors']:>6}")
    for r in report["in_process"]:
        print(f"{'in-process':<12} {r['rows_per_request']:>8} {'-':>6} {'-':>7} {r['requests_per_s']:>9.1f} "
              f"{r['rows_per_s']:>11.0f}")
    print()
    for kind, s in report["servers"].items():
        print(f"{kind}: start-up to /readyz {s['startup_s']:.2f} s; memory {s['memory_before_mb']:.1f} -> "
              f"{s['memory_after_mb']:.1f} MB over {s['soak']['requests']} requests "
              f"({s['memory_after_mb'] - s['memory_before_mb']:+.1f} MB), soak errors {s['soak']['errors']}")
    if {"bentoml", "bare"} <= set(report["servers"]):
        b, r = (report["servers"][k]["cases"] for k in ("bentoml", "bare"))
        for i, (rows, c) in enumerate(cases):
            print(f"bentoml / bare at {rows} row(s) x {c}: {b[i]['requests_per_s'] / r[i]['requests_per_s']:.2f}")
    if args.monitor_rounds:
        report["drift_monitor"] = monitor_cost(model_path, env, meta, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS / 'serve_load.json'}")


if __name__ == "__main__":
    main()
