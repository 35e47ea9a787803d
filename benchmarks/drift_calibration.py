"""Drift calibration: how often the monitor cries wolf, and how soon it sees a real shift.

    python -m benchmarks.drift_calibration [--replays 100] [--runs 3] [--quick]

In process, against the code the service runs (service/monitor.py's staging, sampling, buckets and
windows; training/drift_stats.py's tests and verdicts). A mixed table of six features (two normal,
two skewed, a 500-category Zipf column and a 5-category column whose first category holds 30% of
the rows) is profiled on 5,000 training rows (a new training sample every 25 replays). A replay is
a stream of requests of 1, 10, 100 or 1,000 rows (drawn at random: most answered rows come in
large requests, of which a sample is counted); the monitor is looked at every 125 answered rows
(as /drift or the gauges would be, whatever the traffic), or after each request where one request
answers more.

- False alarms: a calm history (0, 6,000 or 30,000 answered rows, in turn), then 20 calm stretches
  of 2,000 answered rows; a stretch with any look at warn or retrain is a false alarm (goal: at
  most 1 in 100).
- Detection delay: a calm history (0, 6,000 or 30,000 rows), then a persistent change: the answered
  rows from its onset to the first look at warn (or worse) and at retrain (goals: a 0.5 sd mean
  shift at warn within 2,000; a 1 sd shift at retrain within 2,000; a category from 30% to 40% at
  warn within 5,000), reported as the median and the 95th percentile over replays; a change not
  seen within 20,000 rows counts as 20,000.

--runs repeats everything with new seeds. Prints a table (min / median / max over the runs), writes
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
REQUEST_SIZES = (1, 10, 100, 1000)
TRAIN_ROWS = 5000
LOOK_ROWS = 125
HISTORIES = (0, 6000, 30000)
STRETCHES, STRETCH = 20, 2000
HORIZON = 20000
CATEGORIES = [f"c{k:03d}" for k in range(500)]
ZIPF = 1 / np.arange(1, 501) ** 1.1
ZIPF /= ZIPF.sum()
SMALL = ["red", "green", "blue", "black", "white"]
SMALL_SHARES = np.array([0.3, 0.3, 0.2, 0.12, 0.08])
MOVED_SMALL = np.append(0.4, SMALL_SHARES[1:] * 0.6 / SMALL_SHARES[1:].sum())  # red 30% -> 40%
COLUMNS = [{"name": n, "type": "numeric"} for n in ("normal_a", "normal_b", "lognormal", "exponential")] + \
          [{"name": "zipf_500", "type": "categorical"}, {"name": "colour", "type": "categorical"}]
SCENARIOS = {  # name: (what it does to live rows, goal: (verdict, within rows))
    "mean +0.5 sd": (lambda cols: cols.update(normal_a=cols["normal_a"] + 0.5), ("warn", 2000)),
    "mean +1 sd": (lambda cols: cols.update(normal_a=cols["normal_a"] + 1.0), ("retrain", 2000)),
    "category 30% -> 40%": ("colour", ("warn", 5000)),
    "mean +0.25 sd": (lambda cols: cols.update(normal_a=cols["normal_a"] + 0.25), None),
    "scale x1.5": (lambda cols: cols.update(normal_a=cols["normal_a"] * 1.5), None),
}


def draw(rng, n: int, small_shares=SMALL_SHARES) -> dict[str, np.ndarray]:
    return {"normal_a": rng.normal(0, 1, n), "normal_b": rng.normal(10, 3, n),
            "lognormal": rng.lognormal(0, 1, n), "exponential": rng.exponential(2, n),
            "zipf_500": np.asarray(CATEGORIES, dtype=object)[rng.choice(500, n, p=ZIPF)],
            "colour": np.asarray(SMALL, dtype=object)[rng.choice(5, n, p=small_shares)]}


def feeds(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A request's columns as the service's checked inputs (one [rows, 1] array per column)."""
    return {c["name"]: (cols[c["name"]].astype(np.float32) if c["type"] == "numeric"
                        else cols[c["name"]])[:, None] for c in COLUMNS}


def profile_meta(rng) -> dict:
    import pandas as pd

    from training import drift
    frame = pd.DataFrame(draw(rng, TRAIN_ROWS))
    return {"model": "calibration:1", "modality": "mixed", "input": None, "columns": COLUMNS,
            "feature_names": [c["name"] for c in COLUMNS], "drift": drift.profile(frame, "mixed", None, COLUMNS)}


class Stream:
    """Requests into a monitor, looked at every LOOK_ROWS answered rows: [(answered, verdict)]."""

    def __init__(self, monitor, rng):
        self.monitor, self.rng, self.answered, self.next_look = monitor, rng, 0, LOOK_ROWS

    def send(self, rows: int, scenario=None) -> list[tuple[int, str]]:
        looks, end = [], self.answered + rows
        while self.answered < end:
            n = int(self.rng.choice(REQUEST_SIZES))
            cols = draw(self.rng, n, MOVED_SMALL if scenario == "colour" else SMALL_SHARES)
            if callable(scenario):
                scenario(cols)
            self.monitor.stage(feeds(cols))
            self.answered += n
            if self.answered >= self.next_look:
                looks.append((self.answered, self.monitor.report()["verdict"]))
                self.next_look = (self.answered // LOOK_ROWS + 1) * LOOK_ROWS
        return looks


def flagged(verdict: str, at_least: str = "warn") -> bool:
    order = ("not_enough_data", "ok", "warn", "retrain")
    return order.index(verdict) >= order.index(at_least)


def replay_calm(monitor, rng, history: int) -> list[bool]:
    """Per calm stretch of STRETCH answered rows: whether any look flagged it."""
    stream = Stream(monitor, rng)
    stream.send(history)
    return [any(flagged(v) for _, v in stream.send(STRETCH)) for _ in range(STRETCHES)]


def replay_shift(monitor, rng, history: int, scenario) -> dict:
    """Answered rows from the onset to the first look at warn and at retrain (HORIZON if never)."""
    stream = Stream(monitor, rng)
    stream.send(history)
    onset, delays, sent = stream.answered, {}, 0
    while sent < HORIZON and len(delays) < 2:
        for answered, verdict in stream.send(LOOK_ROWS, scenario):
            for level in ("warn", "retrain"):
                if level not in delays and flagged(verdict, level):
                    delays[level] = answered - onset
        sent = stream.answered - onset
    return {level: delays.get(level, HORIZON) for level in ("warn", "retrain")}


def one_run(seed: int, replays: int, monitor_class) -> dict:
    rng = np.random.default_rng(seed)
    meta, calm, shifts = None, [], {name: [] for name in SCENARIOS}
    for r in range(replays):
        if r % 25 == 0:
            meta = profile_meta(rng)
        history = HISTORIES[r % len(HISTORIES)]
        calm += replay_calm(monitor_class(meta), rng, history)
        for name, (scenario, _) in SCENARIOS.items():
            shifts[name].append(replay_shift(monitor_class(meta), rng, history, scenario))
    out = {"false_alarm_rate": float(np.mean(calm)), "calm_stretches": len(calm), "delays": {}}
    for name, results in shifts.items():
        out["delays"][name] = {level: {"median": float(np.median([d[level] for d in results])),
                                       "p95": float(np.percentile([d[level] for d in results], 95))}
                               for level in ("warn", "retrain")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=100, help="replays per run (each: every scenario)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="15 replays, one run (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.replays, args.runs = 15, 1
    os.environ.setdefault("DRIFT_DIR", tempfile.mkdtemp(prefix="drift-calibration-"))
    from service.monitor import WINDOW_ROWS, Monitor
    started, runs = time.perf_counter(), []
    for run in range(args.runs):
        runs.append(one_run(1000 + run, args.replays, Monitor))
        r = runs[-1]
        print(f"  run {run + 1}: false alarms {r['false_alarm_rate']:.2%} of {r['calm_stretches']} calm stretches; "
              + "; ".join(f"{name}: warn {d['warn']['median']:.0f} / {d['warn']['p95']:.0f}"
                          for name, d in r["delays"].items()), flush=True)
    summary = report(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_calibration.json").write_text(json.dumps(
        {"windows": WINDOW_ROWS, "request_sizes": REQUEST_SIZES, "train_rows": TRAIN_ROWS, "look_rows": LOOK_ROWS,
         "histories": HISTORIES, "replays": args.replays, "seconds": round(time.perf_counter() - started, 1),
         "summary": summary, "runs": runs}, indent=2) + "\n")
    plot(runs, ROOT / "docs" / "drift_calibration.png")
    print(f"\nwritten to {RESULTS / 'drift_calibration.json'} and docs/drift_calibration.png")


def spread(values) -> list[float]:
    return [float(np.min(values)), float(np.median(values)), float(np.max(values))]


def report(runs: list[dict]) -> dict:
    summary = {"false_alarm_rate": spread([r["false_alarm_rate"] for r in runs]), "delays": {}}
    print(f"\n{'':<44} {'min / median / max over runs':>30}   goal")
    print(f"{'calm stretches of 2,000 rows flagged':<44} "
          f"{' / '.join(f'{v:.2%}' for v in summary['false_alarm_rate']):>30}   <= 1%")
    for name, (_, goal) in SCENARIOS.items():
        summary["delays"][name] = {}
        for level in ("warn", "retrain"):
            for stat in ("median", "p95"):
                values = spread([r["delays"][name][level][stat] for r in runs])
                summary["delays"][name][f"{level}_{stat}"] = values
                target = f"<= {goal[1]:,}" if goal and goal[0] == level else ""
                print(f"{f'{name}: rows to {level} ({stat})':<44} "
                      f"{' / '.join(f'{v:,.0f}' for v in values):>30}   {target}")
    return summary


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.2))
    names = list(SCENARIOS)
    for k, level, colour in ((0, "warn", "tab:orange"), (1, "retrain", "tab:red")):
        for stat, marker in (("median", "o"), ("p95", "^")):
            for r_i, r in enumerate(runs):
                xs = np.arange(len(names)) + (k - 0.5) * 0.3 + (r_i - 1) * 0.05
                ax.scatter(xs, [r["delays"][n][level][stat] for n in names], marker=marker, color=colour,
                           label=f"{level} ({stat})" if r_i == 0 else None, alpha=0.8)
    for i, name in enumerate(names):
        goal = SCENARIOS[name][1]
        if goal:
            ax.hlines(goal[1], i - 0.4, i + 0.4, color="k", lw=1.5, ls=":", label="goal" if i == 0 else None)
    ax.set(yscale="log", ylabel="answered rows from onset", xticks=range(len(names)), xticklabels=names,
           title=f"Detection delay (requests of 1-1000 rows; false alarms {np.median([r['false_alarm_rate'] for r in runs]):.1%} "
                 "of calm 2,000-row stretches)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
