"""Load-test the prediction service: single-row and 1000-row requests at several concurrencies.

    python -m benchmarks.serve_load                 # starts `bentoml serve` on the newest model
    python -m benchmarks.serve_load --url http://127.0.0.1:3000   # an already running service

Prints requests/s, rows/s, p50/p99 latency and errors per case, and writes JSON to
benchmarks/results/serve_load.json. A benchmark, run on demand; never part of the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(env: dict) -> tuple[subprocess.Popen, str, float]:
    """`bentoml serve` on a free loopback port; returns the process, its URL and seconds to /readyz."""
    import urllib.request
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(["bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 120:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited: {proc.stderr.read().decode()[-500:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bentoml serve did not become ready in 120 s")


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients posting `body` back to back for `seconds`."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client():
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    async with session.post(url + "/predict", data=body, headers=headers) as r:
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
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def rows_for(meta: dict, n: int, seed: int = 0) -> list[list[float]]:
    """Plausible raw rows: drawn around the training mean with the training spread."""
    rng = np.random.default_rng(seed)
    mean, scale = np.array(meta["normalization"]["mean"]), np.array(meta["normalization"]["scale"])
    return (mean + scale * rng.standard_normal((n, len(mean)))).round(4).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running service (default: start one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each case")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--big-rows", type=int, default=1000, help="rows per large request")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()

    proc, startup = None, None
    url = args.url
    if not url:
        env = {**os.environ, "MAX_ROWS": str(max(10_000, args.big_rows))}
        proc, url, startup = start_service(env)
    try:
        import urllib.request
        with urllib.request.urlopen(url + "/metadata") as r:
            meta = json.load(r)
        cases = []
        for rows in (1, args.big_rows):
            body = json.dumps({"instances": rows_for(meta, rows)}).encode()
            for c in map(int, args.concurrency.split(",")):
                result = asyncio.run(load(url, body, c, args.seconds))
                result.update(rows_per_request=rows, concurrency=c,
                              rows_per_s=round(result["requests_per_s"] * rows, 1))
                cases.append(result)
                print(f"  {rows:>5} row(s) x {c:>2} clients: {result['requests_per_s']:>8.1f} req/s",
                      flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nmodel {meta['model']} ({len(meta['feature_names'])} features), "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
          + (f", start-up to /readyz {startup:.2f} s" if startup else ""))
    header = f"{'rows/req':>8} {'clients':>7} {'req/s':>9} {'rows/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    print(header + "\n" + "-" * len(header))
    for r in cases:
        print(f"{r['rows_per_request']:>8} {r['concurrency']:>7} {r['requests_per_s']:>9.1f} "
              f"{r['rows_per_s']:>11.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": meta["model"], "startup_s": startup, "cores": os.cpu_count(),
                               "seconds_per_case": args.seconds, "cases": cases}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
