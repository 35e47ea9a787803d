"""Drift calibration: how often the monitor cries wolf, and how often it sees a real shift.

    python -m benchmarks.drift_calibration [--replays 200] [--null-replays 1000] [--quick]

In process, against the code the service runs (service/monitor.py's staging, sampling and
windows; training/drift_stats.py's verdicts). A mixed table of six features (two normal, two
skewed, a 500-category Zipf column and a 5-category column) is profiled on 5,000 training rows (a
new training sample every 50 replays). Each replay sends requests of 1, 10, 100 or 1000 rows (drawn
at random) until the recent window holds its rows, then reads the overall verdict: "flagged" is
warn or retrain. In-distribution replays (fresh rows of the training distribution) give the
false-alarm rate; shifted ones (of the first normal feature: a mean shift of 0.25, 0.5 or 1 sd, a
scale change of 1.5x; of the Zipf column: one category's share up by 10 points) the power. For
comparison only, what the default tests of Evidently (KS for numbers, chi-squared for categories,
p < 0.05 per column) and alibi-detect's TabularDrift (the same tests, Bonferroni over the columns)
decide on the same counted rows, reimplemented with scipy.stats. Prints a table; writes
benchmarks/results/drift_calibration.json and docs/drift_calibration.png.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WINDOWS = (500, 1000, 2000, 5000, 10000)
REQUEST_SIZES = (1, 10, 100, 1000)
TRAIN_ROWS = 5000
CATEGORIES = [f"c{k:03d}" for k in range(500)]
ZIPF = 1 / np.arange(1, 501) ** 1.1
ZIPF /= ZIPF.sum()
SMALL = ["red", "green", "blue", "black", "white"]
SMALL_SHARES = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
COLUMNS = [{"name": n, "type": "numeric"} for n in ("normal_a", "normal_b", "lognormal", "exponential")] + \
          [{"name": "zipf_500", "type": "categorical"}, {"name": "colour", "type": "categorical"}]
SCENARIOS = {  # name: what it does to live rows (a dict of columns), in place
    "in-distribution": None,
    "mean +0.25 sd": lambda cols: cols.update(normal_a=cols["normal_a"] + 0.25),
    "mean +0.5 sd": lambda cols: cols.update(normal_a=cols["normal_a"] + 0.5),
    "mean +1 sd": lambda cols: cols.update(normal_a=cols["normal_a"] + 1.0),
    "scale x1.5": lambda cols: cols.update(normal_a=cols["normal_a"] * 1.5),
    "category +10 pts": "zipf",  # drawn from moved shares instead
}
MOVED = ZIPF * (1 - ZIPF[4] - 0.1) / (1 - ZIPF[4])  # the category of rank 5 gains 10 points,
MOVED[4] = ZIPF[4] + 0.1                             # the others shrink in proportion


def draw(rng, n: int, zipf_shares=ZIPF) -> dict[str, np.ndarray]:
    return {"normal_a": rng.normal(0, 1, n), "normal_b": rng.normal(10, 3, n),
            "lognormal": rng.lognormal(0, 1, n), "exponential": rng.exponential(2, n),
            "zipf_500": np.asarray(CATEGORIES, dtype=object)[rng.choice(500, n, p=zipf_shares)],
            "colour": np.asarray(SMALL, dtype=object)[rng.choice(5, n, p=SMALL_SHARES)]}


def feeds(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A request's columns as the service's checked inputs (one [rows, 1] array per column)."""
    return {c["name"]: (cols[c["name"]].astype(np.float32) if c["type"] == "numeric"
                        else cols[c["name"]])[:, None] for c in COLUMNS}


def reference_tests(train: dict, live: dict) -> tuple[bool, bool]:
    """(Evidently's per-column default tests at p < 0.05 flag any column, alibi-detect's
    Bonferroni-corrected ones flag any column)."""
    from scipy import stats
    p = []
    for c in COLUMNS:
        a, b = train[c["name"]], live[c["name"]]
        if c["type"] == "numeric":
            p.append(stats.ks_2samp(a, b).pvalue)
        else:
            cats = np.unique(np.concatenate([a, b]))
            table = np.array([[np.sum(a == k) for k in cats], [np.sum(b == k) for k in cats]])
            p.append(stats.chi2_contingency(table)[1])
    return min(p) < 0.05, min(p) < 0.05 / len(p)


def replay(monitor_class, meta, window, rng, scenario, train, compare_reference: bool) -> dict:
    from service.monitor import sample_step
    monitor = monitor_class(meta, window=window)
    counted, kept = 0, []
    while counted < window + monitor.bucket_size:  # fill the window, then move it a bucket on
        n = int(rng.choice(REQUEST_SIZES))
        cols = draw(rng, n, MOVED if scenario == "zipf" else ZIPF)
        if callable(scenario):
            scenario(cols)
        monitor.stage(feeds(cols))
        step = sample_step(n)
        counted += len(range(0, n, step))
        if compare_reference:
            kept.append({k: v[::step] for k, v in cols.items()})
    recent = monitor.report()["recent"]
    out = {"rows": recent["rows"], "flagged": recent["verdict"] in ("warn", "retrain"),
           "significant": any(f["significant"] for f in recent["features"]),
           "retrain": recent["verdict"] == "retrain",
           "features": {f["name"]: f["verdict"] for f in recent["features"]}}
    if compare_reference:
        live = {k: np.concatenate([part[k] for part in kept])[-recent["rows"]:] for k in kept[0]}
        out["evidently"], out["alibi"] = reference_tests(train, live)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=200, help="replays per shifted scenario and window")
    parser.add_argument("--null-replays", type=int, default=1000, help="in-distribution replays per window")
    parser.add_argument("--quick", action="store_true", help="50 replays each (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.replays = args.null_replays = 50
    os.environ.setdefault("DRIFT_DIR", tempfile.mkdtemp(prefix="drift-calibration-"))
    from tqdm import tqdm
    from service.monitor import Monitor
    from training import drift

    rng = np.random.default_rng(args.seed)
    results, started = [], time.perf_counter()
    jobs = [(name, w) for name in SCENARIOS for w in WINDOWS]
    bar = tqdm(mininterval=5, total=sum(args.null_replays if name == "in-distribution" else args.replays
                         for name, _ in jobs), desc="replays", unit="replay")
    for name, window in jobs:
        replays = args.null_replays if name == "in-distribution" else args.replays
        runs = []
        for r in range(replays):
            if r % 50 == 0:  # a new training sample, profile and monitor settings
                import pandas as pd
                train = draw(rng, TRAIN_ROWS)
                frame = pd.DataFrame(train)
                meta = {"model": "calibration:1", "modality": "mixed", "input": None,
                        "columns": COLUMNS, "feature_names": [c["name"] for c in COLUMNS],
                        "drift": drift.profile(frame, "mixed", None, COLUMNS)}
            runs.append(replay(Monitor, meta, window, rng, SCENARIOS[name], train,
                               compare_reference=r < 200))
            bar.update()
        refs = [r for r in runs if "evidently" in r]
        results.append({
            "scenario": name, "window": window, "replays": replays,
            "rows_median": float(np.median([r["rows"] for r in runs])),
            "flagged": float(np.mean([r["flagged"] for r in runs])),
            "retrain": float(np.mean([r["retrain"] for r in runs])),
            "significant": float(np.mean([r["significant"] for r in runs])),
            "evidently": float(np.mean([r["evidently"] for r in refs])),
            "alibi": float(np.mean([r["alibi"] for r in refs])), "reference_replays": len(refs),
            "per_feature_flagged": {c["name"]: float(np.mean([r["features"][c["name"]] in ("warn", "retrain")
                                                              for r in runs])) for c in COLUMNS}})
    bar.close()
    print_table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_calibration.json").write_text(json.dumps(
        {"windows": WINDOWS, "request_sizes": REQUEST_SIZES, "train_rows": TRAIN_ROWS,
         "seconds": round(time.perf_counter() - started, 1), "results": results}, indent=2) + "\n")
    plot(results, ROOT / "docs" / "drift_calibration.png")
    print(f"\nwritten to {RESULTS / 'drift_calibration.json'} and docs/drift_calibration.png")


def print_table(results: list[dict]) -> None:
    print(f"\n{'scenario':<18} {'window':>6} {'replays':>7} {'rows':>6} {'test':>6} {'flagged':>8} "
          f"{'retrain':>8} {'evidently':>9} {'alibi':>6}")
    print("-" * 83)
    for r in results:
        print(f"{r['scenario']:<18} {r['window']:>6} {r['replays']:>7} {r['rows_median']:>6.0f} "
              f"{r['significant']:>6.1%} {r['flagged']:>8.1%} {r['retrain']:>8.1%} {r['evidently']:>9.1%} {r['alibi']:>6.1%}")
    print("test: some feature's chi-squared test significant; flagged: overall verdict warn or retrain "
          "(significant and large);\nevidently / alibi: their default tests on the same rows (first 200 replays)")


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    null = [r for r in results if r["scenario"] == "in-distribution"]
    for key, label, style in (("flagged", "this monitor", "o-"),
                              ("significant", "its chi-squared tests alone", "x:"),
                              ("evidently", "Evidently defaults", "s--"),
                              ("alibi", "alibi-detect defaults", "^--")):
        left.plot([r["window"] for r in null], [100 * r[key] for r in null], style, label=label)
    left.axhline(1, color="tab:red", lw=1, ls=":", label="goal: at most 1%")
    left.set(xscale="log", xlabel="window (counted rows)", ylabel="false alarms (% of replays)",
             title="In-distribution traffic (requests of 1-1000 rows)")
    left.legend()
    shifted = [n for n in SCENARIOS if n != "in-distribution"]
    for name, marker in zip(shifted, "ovs^Dx"):  # lines at 100% overlap: the markers tell them apart
        rows = [r for r in results if r["scenario"] == name]
        right.plot([r["window"] for r in rows], [100 * r["flagged"] for r in rows], marker + "-",
                   label=name, markersize=11 - 2 * shifted.index(name), alpha=0.8)
    right.axhline(95, color="tab:red", lw=1, ls=":", label="goal: 0.5 sd at 95% by 2,000 rows")
    right.set(xscale="log", xlabel="window (counted rows)", ylabel="flagged (% of replays)",
              title="Power: shifted traffic", ylim=(-3, 103))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
