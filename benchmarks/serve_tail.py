"""Tail latency and throughput of single-row requests: the service's /predict and its Open
Inference Protocol route (JSON and binary tensors) against the bare Starlette + onnxruntime app.

    python -m benchmarks.serve_tail [--requests 20000] [--repeats 3]

Servers pinned to core 0 (one worker each), the aiohttp client on core 1, as in
benchmarks/serve_load.py. Each level (8 and 32 concurrent clients) sends --requests single-row
requests, --repeats times, servers loaded in turn. Prints a table of min / median / max of the
repetitions' throughput and p99, the ratios to the bare app, writes
benchmarks/results/serve_tail.json and docs/serve_latency.png (a latency histogram per server at
32 clients, all repetitions pooled).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import numpy as np

from benchmarks.serve_load import CLIENT_CORE, RESULTS, ROOT, load, rows_for, start

LEVELS = (8, 32)


def routes(meta: dict, tag: str) -> dict[str, tuple[str, str, bytes, str, dict]]:
    """What each route is sent: (server, path, body, content type, headers)."""
    row = rows_for(meta, 1)
    name, version = tag.split(":")
    infer = f"/v2/models/{name}/versions/{version}/infer"
    tensor = {"name": meta["input"], "datatype": "FP32", "shape": [1, len(row[0])]}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 4 * len(row[0])}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {
        "bare /predict": ("bare", "/predict", json.dumps({"instances": row}).encode(), "application/json", {}),
        "bentoml /predict": ("bentoml", "/predict", json.dumps({"instances": row}).encode(),
                             "application/json", {}),
        "bentoml /v2 JSON": ("bentoml", infer, json.dumps({"inputs": [{**tensor, "data": row[0]}]}).encode(),
                             "application/json", {}),
        "bentoml /v2 binary": ("bentoml", infer, head + np.asarray(row[0], "<f4").tobytes(),
                               "application/octet-stream", {"Inference-Header-Content-Length": str(len(head))}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per level and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import bentoml
    import onnxruntime as ort
    from service.loading import resolve_model_tag
    from training.contract import decode_metadata
    tag = resolve_model_tag()
    model_path = bentoml.models.get(tag).path_of("model.onnx")
    meta = decode_metadata(ort.InferenceSession(model_path).get_modelmeta().custom_metadata_map)
    if meta["modality"] != "table":
        raise SystemExit(f"{tag} is a {meta['modality']} model; set MODEL_TAG to a numeric table model")
    env = {**os.environ, "MODEL_TAG": tag, "WORKERS": "1"}
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})
    servers = {kind: start(kind, model_path, env)[:2] for kind in ("bentoml", "bare")}
    plan = routes(meta, tag)
    runs = {(route, c): [] for route in plan for c in LEVELS}
    latencies = {route: [] for route in plan}
    try:
        for _, url in servers.values():
            asyncio.run(load(url, plan["bare /predict"][2], 8, requests=3000))  # warm-up
        for repeat in range(args.repeats):
            for c in LEVELS:
                for route, (server, path, body, kind, headers) in plan.items():
                    r = asyncio.run(load(servers[server][1], body, c, requests=args.requests, path=path,
                                         content_type=kind, headers=headers, keep=True))
                    lat = r.pop("latencies_ms")
                    if c == 32:
                        latencies[route].append(lat)
                    runs[route, c].append(r)
                    print(f"  repeat {repeat + 1} {route:<20} x{c:>2}: {r['requests_per_s']:>8.1f} req/s, "
                          f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    summary = report(runs, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_tail.json").write_text(json.dumps(
        {"model": tag, "requests_per_level": args.requests, "repeats": args.repeats,
         "runs": {f"{route} x{c}": rs for (route, c), rs in runs.items()}, "summary": summary}, indent=2) + "\n")
    plot(latencies, ROOT / "docs" / "serve_latency.png")
    print(f"\nwritten to {RESULTS / 'serve_tail.json'} and docs/serve_latency.png")


def report(runs: dict, args) -> dict:
    def spread(values):
        return [round(float(v), 2) for v in (np.min(values), np.median(values), np.max(values))]

    print(f"\n{args.requests} single-row requests per level, {args.repeats} repetitions (min / median / max)")
    print(f"{'route':<20} {'clients':>7} {'req/s':>26} {'p99 ms':>20} {'req/s vs bare':>14} {'p99 vs bare':>12}")
    summary = {}
    for (route, c), rs in runs.items():
        rate, p99 = spread([r["requests_per_s"] for r in rs]), spread([r["p99_ms"] for r in rs])
        bare = runs["bare /predict", c]
        rate_ratio = np.median([r["requests_per_s"] for r in rs]) / np.median([r["requests_per_s"] for r in bare])
        p99_ratio = np.median([r["p99_ms"] for r in rs]) / np.median([r["p99_ms"] for r in bare])
        summary[f"{route} x{c}"] = {"requests_per_s": rate, "p99_ms": p99,
                                    "throughput_vs_bare": round(float(rate_ratio), 3),
                                    "p99_vs_bare": round(float(p99_ratio), 3)}
        print(f"{route:<20} {c:>7} {' / '.join(f'{v:.0f}' for v in rate):>26} "
              f"{' / '.join(f'{v:.2f}' for v in p99):>20} {rate_ratio:>14.2f} {p99_ratio:>12.2f}")
    return summary


def plot(latencies: dict[str, list[np.ndarray]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(latencies), 1, figsize=(9, 2.4 * len(latencies)), sharex=True)
    bins = np.geomspace(0.3, 300, 120)
    for ax, (route, parts) in zip(axes, latencies.items()):
        lat = np.concatenate(parts)
        ax.hist(np.clip(lat, bins[0], bins[-1]), bins=bins, color="tab:blue")
        for q, style in ((50, "--"), (99, "-")):
            ax.axvline(np.percentile(lat, q), color="tab:red", ls=style, label=f"p{q} {np.percentile(lat, q):.2f} ms")
        ax.set(xscale="log", yscale="log", ylabel="requests", title=f"{route}, 32 clients, {len(lat):,} requests")
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("latency (ms)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
