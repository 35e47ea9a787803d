"""Model versions in one running server: a switch under load, memory over load/unload cycles, and
the default model's serving speed against the code from before versions.

    python -m benchmarks.versions [--repeats 3] [--switches 10] [--requests 20000] [--baseline REV]

1. Switch under load (per repetition, a fresh server with WORKERS=2): 32 clients, half on /predict
   and half on the protocol's infer, single rows; a steady phase, then the default version
   switched between two versions --switches times, 2 s apart. Reported: non-200 answers, p99 in
   the steady phase and while switching (the same run), how long each load call took, and how long
   from sending it until the last answer from the old version (requests sent after the load).
2. Memory: 20 load/unload cycles of a second model on the same server; the RSS of all the
   server's processes before (after 3 warm-up cycles) and after.
3. Serving speed: single-row /predict at 32 clients, --requests per run, one worker pinned to
   core 0 and the client on core 1 (benchmarks/serve_load.py), this code against --baseline (a git
   worktree of it; default: the commit before service/registry.py was added), alternating, each
   --repeats times.
4. A shadow's cost: the same load on one server (one pinned worker, its shadow thread on the same
   core), a shadow at --shadow-share (0.25) switched on and off between runs, alternating.

--parts picks some of switch (1 and 2), speed, shadow.

Prints a table (min / median / max over repetitions), writes benchmarks/results/versions.json and
docs/versions_switch.png (latency over time in one switch phase, the switches marked).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.serve_load import CLIENT_CORE, RESULTS, ROOT, load, start, tree_rss_mb

TOKEN = "benchmark-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def spread(values) -> list[float]:
    return [round(float(v), 3) for v in (np.min(values), np.median(values), np.max(values))]


def train_versions(data: str, name: str, n: int) -> list[str]:
    """n versions of one model (one network each, a few epochs: serving, not quality, is measured)."""
    tags = []
    for seed in range(n):
        out = subprocess.run(
            ["python", "-m", "training.fit", "--data", data, "--target", "target", "--name", name,
             "--folds", "1", "--epochs", "5", "--seed", str(seed), "--no-progress",
             "--models-dir", tempfile.mkdtemp(prefix="bench-versions-")],
            cwd=ROOT, capture_output=True, text=True, check=True)
        tags.append(next(line.split()[-1] for line in out.stdout.splitlines() if "bentoml tag" in line))
    return tags


def post(url: str, path: str, body: dict) -> int:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **AUTH})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def load_body(version: str) -> dict:
    return {"parameters": {"config": json.dumps({"version_policy": {"specific": {"versions": [version]}}})}}


async def switch_under_load(url: str, name: str, versions: list[str], row: list[float], switches: int,
                            steady_s: float, gap_s: float) -> dict:
    stop, seen, marks = asyncio.Event(), [], []
    predict = json.dumps({"instances": [row]}).encode()
    infer = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(row)],
                                    "data": row}]}).encode()

    async def client(session, protocol: bool):
        path = f"/v2/models/{name}/infer" if protocol else "/predict"
        body = infer if protocol else predict
        while not stop.is_set():
            t = time.perf_counter()
            try:
                async with session.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                    answer = json.loads(await r.read())
                    status = r.status
            except (aiohttp.ClientError, ValueError):
                answer, status = {}, 0
            version = answer.get("model_version") if protocol else str(answer.get("model", ":")).split(":", 1)[1]
            seen.append((t, time.perf_counter() - t, status, version))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        clients = asyncio.gather(*(client(session, i % 2 == 1) for i in range(32)))
        await asyncio.sleep(1.0 + steady_s)  # 1 s of warm-up, then the steady phase
        switching_from = time.perf_counter()
        for i in range(switches):
            target = versions[(i + 1) % 2]
            sent = time.perf_counter()
            async with session.post(f"{url}/v2/repository/models/{name}/load", json=load_body(target),
                                    headers=AUTH) as r:
                assert r.status == 200, await r.text()
            marks.append((sent, time.perf_counter(), target))
            await asyncio.sleep(gap_s)
        stop.set()
        await clients
    steady = [s for s in seen if switching_from - steady_s <= s[0] < switching_from]
    switching = [s for s in seen if s[0] >= switching_from]
    converged = []
    for (sent, _, target), nxt in zip(marks, marks[1:] + [(float("inf"), None, None)]):
        after = [s for s in switching if sent <= s[0] < nxt[0]]
        old = [s[0] + s[1] for s in after if s[3] != target]  # answered by the version before
        converged.append(max(old) - sent if old else 0.0)
    p99 = lambda xs: float(np.percentile([s[1] for s in xs], 99) * 1000)  # noqa: E731
    return {"requests": len(seen), "errors": sum(s[2] != 200 for s in seen),
            "steady_requests": len(steady), "switching_requests": len(switching),
            "p99_steady_ms": round(p99(steady), 2), "p99_switching_ms": round(p99(switching), 2),
            "load_call_s": [round(m[1] - m[0], 4) for m in marks],
            "old_version_last_answer_s": [round(c, 4) for c in converged],
            "timeline": [(round(s[0] - switching_from, 4), round(s[1] * 1000, 3)) for s in seen],
            "marks": [(round(m[0] - switching_from, 4), round(m[1] - switching_from, 4)) for m in marks]}


def memory_cycles(url: str, proc, name: str, versions: list[str], cycles: int = 20) -> dict:
    def cycle():
        post(url, f"/v2/repository/models/{name}/load",
             {"parameters": {"config": json.dumps({"version_policy": {"specific": {"versions": versions}}})}})
        post(url, f"/v2/repository/models/{name}/unload", {})
    for _ in range(3):
        cycle()
    time.sleep(1.0)
    before = tree_rss_mb(proc)
    for _ in range(cycles):
        cycle()
    time.sleep(1.0)
    after = tree_rss_mb(proc)
    return {"cycles": cycles, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "grown_mb": round(after - before, 1)}


def baseline_worktree(rev: str | None) -> tuple[Path, str]:
    """A checkout of the code from before versions, beside this one."""
    if rev is None:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "service/registry.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split()[-1]
        rev = f"{added}^"
    rev = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"normserve-baseline-{rev}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return tree, rev


def serving_speed(tag: str, row: list[float], requests: int, repeats: int, baseline: Path) -> dict:
    import bentoml
    model_path = bentoml.models.get(tag).path_of("model.onnx")
    env = {**os.environ, "MODEL_TAG": tag, "WORKERS": "1"}
    body = json.dumps({"instances": [row]}).encode()
    runs = {"now": [], "before": []}
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})  # the servers are pinned to the other core
    for repeat in range(repeats):
        for code in ("before", "now"):  # alternating
            proc, url, _ = start("bentoml", model_path, env, cwd=baseline if code == "before" else ROOT)
            try:
                asyncio.run(load(url, body, 8, requests=3000))  # warm-up
                r = asyncio.run(load(url, body, 32, requests=requests))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            runs[code].append(r)
            print(f"  speed repeat {repeat + 1} {code:<6}: {r['requests_per_s']:>7.1f} req/s, "
                  f"p99 {r['p99_ms']} ms, errors {r['errors']}", flush=True)
    return runs


def shadow_cost(tags: list[str], row: list[float], requests: int, repeats: int, share: float) -> dict:
    """Alternating runs on one server: without a shadow, and with the other version as the
    default's shadow at `share`."""
    import bentoml
    name, (v1, v2) = tags[0].split(":")[0], [t.split(":", 1)[1] for t in tags]
    env = {**os.environ, "MODEL_TAG": tags[0], "WORKERS": "1", "NORMSERVE_ADMIN_TOKEN": TOKEN}
    body = json.dumps({"instances": [row]}).encode()
    runs = {"off": [], "on": []}
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})
    proc, url, _ = start("bentoml", bentoml.models.get(tags[0]).path_of("model.onnx"), env)
    try:
        post(url, f"/v2/repository/models/{name}/load", load_body(v2))
        post(url, f"/v2/repository/models/{name}/load", load_body(v1))  # v1 the default, v2 loaded
        asyncio.run(load(url, body, 8, requests=3000))  # warm-up
        for repeat in range(repeats):
            for state in ("off", "on"):
                if state == "on":
                    post(url, "/shadow", {"model": name, "version": v2, "share": share})
                r = asyncio.run(load(url, body, 32, requests=requests))
                if state == "on":
                    req = urllib.request.Request(f"{url}/shadow?model={name}", method="DELETE", headers=AUTH)
                    urllib.request.urlopen(req, timeout=60).close()
                runs[state].append(r)
                print(f"  shadow repeat {repeat + 1} {state:<3}: {r['requests_per_s']:>7.1f} req/s, "
                      f"p99 {r['p99_ms']} ms, errors {r['errors']}", flush=True)
        with urllib.request.urlopen(url + "/shadow", timeout=60) as answer:
            runs["figures"] = json.loads(answer.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000, help="per serving-speed run")
    parser.add_argument("--steady", type=float, default=8.0, help="seconds of steady load before switching")
    parser.add_argument("--baseline", help="git revision to compare the serving speed with")
    parser.add_argument("--shadow-share", type=float, default=0.25)
    parser.add_argument("--parts", default="switch,speed,shadow")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    from sklearn.datasets import load_breast_cancer
    data = Path(tempfile.mkdtemp(prefix="bench-versions-")) / "breast_cancer.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(data, index=False)
    print("training two versions of 'bench-switch' and two of 'bench-other' ...", flush=True)
    switch_tags, other_tags = train_versions(str(data), "bench-switch", 2), train_versions(str(data), "bench-other", 2)
    versions = [t.split(":", 1)[1] for t in switch_tags]
    import pandas as pd
    row = [round(float(v), 4) for v in pd.read_csv(data).drop(columns="target").iloc[0]]

    switch_runs, memory, speed, shadow, rev = [], [], {}, {}, None
    for repeat in range(args.repeats if "switch" in parts else 0):
        env = {**os.environ, "MODEL_TAG": switch_tags[0], "WORKERS": "2", "NORMSERVE_ADMIN_TOKEN": TOKEN}
        proc, url, _ = start("bentoml", "", env, pin=False)
        try:
            r = asyncio.run(switch_under_load(url, "bench-switch", versions, row, args.switches,
                                              args.steady, 2.0))
            switch_runs.append(r)
            memory.append(memory_cycles(url, proc, "bench-other", [t.split(":", 1)[1] for t in other_tags]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"  switch repeat {repeat + 1}: {r['requests']} requests, {r['errors']} errors, p99 steady "
              f"{r['p99_steady_ms']} ms, switching {r['p99_switching_ms']} ms, load calls "
              f"{max(r['load_call_s']):.3f} s at most, old version last answered "
              f"{max(r['old_version_last_answer_s']):.3f} s after a load was sent; memory "
              f"+{memory[-1]['grown_mb']} MB over 20 cycles", flush=True)

    if "speed" in parts:
        baseline, rev = baseline_worktree(args.baseline)
        speed = serving_speed(switch_tags[0], row, args.requests, args.repeats, baseline)
    if "shadow" in parts:
        shadow = shadow_cost(switch_tags, row, args.requests, args.repeats, args.shadow_share)
    summary = report(switch_runs, memory, speed, shadow, rev, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in switch_runs[1:]:
        r.pop("timeline")
    out = RESULTS / ("versions.json" if parts == {"switch", "speed", "shadow"} else f"versions-{'-'.join(sorted(parts))}.json")
    out.write_text(json.dumps({"summary": summary, "switch_runs": switch_runs, "memory": memory, "speed": speed,
                               "shadow": shadow, "baseline": rev}, indent=1) + "\n")
    if switch_runs:
        plot(switch_runs[0], ROOT / "docs" / "versions_switch.png")
    print(f"\nwritten to {out}" + (" and docs/versions_switch.png" if switch_runs else ""))


def report(switch_runs, memory, speed, shadow, rev, args) -> dict:
    summary, rows = {}, []
    if switch_runs:
        summary.update(switch_summary(switch_runs, memory))
        rows += [("errors (non-200) during switching", summary["errors"], ""),
                 ("requests per run", summary["requests"], ""),
                 ("p99 steady (ms)", summary["p99_steady_ms"], ""),
                 ("p99 while switching (ms)", summary["p99_switching_ms"], ""),
                 ("p99 switching / steady", summary["p99_switching_vs_steady"], "goal <= 2"),
                 ("load call (s)", summary["load_call_s"], f"{args.switches} per run"),
                 ("load sent -> last old answer (s)", summary["old_version_last_answer_s"], ""),
                 ("RSS growth, 20 load/unload cycles (MB)", summary["memory_grown_mb"], "goal < 50")]
    for label, runs, key, versus in (("speed", speed, "before", "now"), ("shadow", shadow, "off", "on")):
        if not runs:
            continue
        med = lambda k, code: float(np.median([r[k] for r in runs[code]]))  # noqa: E731
        part = {f"{label}_req_per_s": {k: spread([r["requests_per_s"] for r in runs[k]]) for k in (key, versus)},
                f"{label}_p99_ms": {k: spread([r["p99_ms"] for r in runs[k]]) for k in (key, versus)},
                f"{label}_throughput_ratio": round(med("requests_per_s", versus) / med("requests_per_s", key), 3),
                f"{label}_p99_ratio": round(med("p99_ms", versus) / med("p99_ms", key), 3)}
        summary.update(part)
        goal = ("(goal >= 0.9)", "(goal <= 1.1)") if label == "speed" else ("(goal >= 0.9)", "(goal <= 1.5)")
        note = rev if label == "speed" else f"share {args.shadow_share}"
        rows += [(f"/predict req/s {key}", part[f"{label}_req_per_s"][key], note),
                 (f"/predict req/s {versus}", part[f"{label}_req_per_s"][versus],
                  f"{part[f'{label}_throughput_ratio']:.3f}x {goal[0]}"),
                 (f"/predict p99 ms {key}", part[f"{label}_p99_ms"][key], note),
                 (f"/predict p99 ms {versus}", part[f"{label}_p99_ms"][versus],
                  f"{part[f'{label}_p99_ratio']:.3f}x {goal[1]}")]
    print(f"\n{'':<42} {'min / median / max':>30}")
    for label, values, note in rows:
        print(f"{label:<42} {' / '.join(f'{v:g}' for v in values):>30}  {note}")
    return summary


def switch_summary(switch_runs, memory) -> dict:
    ratio = [r["p99_switching_ms"] / r["p99_steady_ms"] for r in switch_runs]
    return {
        "errors": spread([r["errors"] for r in switch_runs]),
        "requests": spread([r["requests"] for r in switch_runs]),
        "p99_steady_ms": spread([r["p99_steady_ms"] for r in switch_runs]),
        "p99_switching_ms": spread([r["p99_switching_ms"] for r in switch_runs]),
        "p99_switching_vs_steady": spread(ratio),
        "load_call_s": spread([v for r in switch_runs for v in r["load_call_s"]]),
        "old_version_last_answer_s": spread([v for r in switch_runs for v in r["old_version_last_answer_s"]]),
        "memory_grown_mb": spread([m["grown_mb"] for m in memory]),
    }


def plot(run: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t, ms = np.array(run["timeline"]).T
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.scatter(t, ms, s=1, alpha=0.3, color="tab:blue", label="a request (sent at, latency)")
    for i, (sent, answered) in enumerate(run["marks"]):
        ax.axvspan(sent, max(answered, sent + 0.01), color="tab:red", alpha=0.4,
                   label="a load call (the default switched)" if i == 0 else None)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set(yscale="log", xlabel="seconds from the first switch (before 0: the steady phase)",
           ylabel="latency (ms)", title=f"two workers, 32 clients; {run['errors']} errors in "
                                        f"{run['requests']:,} requests")
    ax.legend(loc="upper left", fontsize=8, markerscale=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
