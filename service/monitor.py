"""Covariate-shift monitor: the raw inputs the service scores, counted into the training profile's
bins (training/drift.py) and compared with it (training/drift_stats.py).

Per model version (the `model` label, name:version, on every series): each loaded version has a
monitor of its own, so a new default version starts its own window.

Constant memory: each worker keeps its counts in a small shared-memory file: since start, and a
ring of buckets of recent rows (each about BUCKET_ROWS answered rows), each stamped with the time
of its last row and the rows it answered. Any worker reads every worker's file to answer GET
/drift and to set the per-server Prometheus gauges: since start is the sum of all; each window of
DRIFT_WINDOWS answered rows (500, 1,000, 2,000 and 5,000) is the newest buckets of all workers
that together answered that many rows. Each worker also exports its own counts as Prometheus
counters, which Prometheus sums over workers and replicas (deploy/prometheus/ computes the fleet's
verdicts from them).

Why several windows of answered rows: a shift is seen soon whatever calm traffic came before (the
shortest windows hold only the shift within a few hundred rows of its start), and small shifts
still show in the longest window. Each window is tested at a share of the false-alarm budget
(DRIFT_ALPHA, per stretch of STRETCH_ROWS answered rows): alpha / (windows x (STRETCH_ROWS /
window + 1)), Bonferroni over the windows and over the roughly independent looks a window of that
length takes in a stretch. The recent verdict is the worst window's; benchmarks/drift_calibration.py
measures the false alarms per stretch and the detection delay.

Scoring a request only keeps its input array (of a large request, a sample of rows); they are
counted in batches (every FLUSH_ROWS rows or FLUSH_SECONDS), which keeps the monitor's cost per
request small. A counted row is evidence of one row, whatever the size of its request: the
statistics rest on the rows actually counted, and the windows on the rows answered. Only inputs
that were answered 200 are counted: rejected requests never get here.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from training.contract import column_input
from training.drift import Layout, image_features
from training.drift_stats import VERDICTS, Comparison, Settings

ENABLED = os.environ.get("DRIFT", "1") != "0"
# Answered rows in each recent window (all workers), and the stretch the false-alarm budget holds for.
WINDOW_ROWS = tuple(sorted(int(w) for w in os.environ.get("DRIFT_WINDOWS", "500,1000,2000,5000").split(",")))
STRETCH_ROWS = 2000
SETTINGS = Settings(alpha=float(os.environ.get("DRIFT_ALPHA", Settings.alpha)),
                    min_rows=max(1, int(os.environ.get("DRIFT_MIN_ROWS", Settings.min_rows))),
                    **{name: float(os.environ.get(f"DRIFT_{name.upper()}", default))
                       for name, default in Settings().thresholds().items()})
FLUSH_ROWS = 1024
FLUSH_SECONDS = 0.5
GAUGE_SECONDS = 5.0  # Prometheus scrapes every 15 s or so; GET /drift always brings them up to date
# Of a request with more rows than SAMPLE_ABOVE, about SAMPLE_ABOVE to 2 x SAMPLE_ABOVE evenly
# spaced rows are counted, and at least one row in SAMPLE_STRIDE: counting every row of bulk
# requests would cost ~20-40% of their throughput; one in 4 keeps enough rows in the shortest
# windows (250 of a 1,000-row request) for the tests (one in 8 missed the delay goals' 95th
# percentiles: benchmarks/drift_calibration.py).
SAMPLE_ABOVE = int(os.environ.get("DRIFT_SAMPLE_ABOVE", "64"))
SAMPLE_STRIDE = 4
WINDOWS = ("recent", "since_start")


def bucket_rows(windows: tuple[int, ...]) -> int:
    """Answered rows per bucket: a quarter of the shortest window."""
    return max(1, min(windows) // 4)


def window_alpha(alpha: float, window: int, windows: tuple[int, ...]) -> float:
    """The false-alarm rate one window is tested at (module docstring)."""
    return alpha / (len(windows) * (STRETCH_ROWS / window + 1))


def sample_step(rows: int) -> int:
    """Of a request of `rows` rows, every sample_step(rows)-th row is counted."""
    return min(SAMPLE_STRIDE, max(1, rows // SAMPLE_ABOVE))


@functools.cache  # once per process: Prometheus metrics are registered globally
def metrics() -> dict:
    """Per server, gauges of the verdicts (in BentoML's multiprocess mode the most recent value of
    any worker wins: every worker reports the whole server's numbers). For the fleet, counters of
    each worker's own counts in the test bins, and the training side they are compared with."""
    from prometheus_client import Counter, Gauge
    recent, top = {"multiprocess_mode": "mostrecent"}, {"multiprocess_mode": "max"}
    return {
        "psi": Gauge("normserve_drift_psi", "population stability index of live inputs vs. training",
                     ["model", "feature", "window"], **recent),
        "mean_shift": Gauge("normserve_drift_mean_shift", "(live mean - training mean) / training std",
                            ["model", "feature", "window"], **recent),
        "verdict": Gauge("normserve_drift_verdict", "0 ok, 1 warn, 2 retrain, -1 not enough data",
                         ["model", "feature", "window"], **recent),
        "overall": Gauge("normserve_drift_overall", "worst feature verdict (0 ok, 1 warn, 2 retrain, "
                         "-1 not enough data)", ["model", "window"], **recent),
        "rows": Gauge("normserve_drift_rows", "rows counted", ["model", "window"], **recent),
        "counted": Counter("normserve_drift_counted_rows", "rows counted by the drift monitor", ["model"]),
        "bin_rows": Counter("normserve_drift_bin_rows", "counted rows per test bin of a feature",
                            ["model", "feature", "bin"]),
        "values": Counter("normserve_drift_values", "counted values of a numeric feature (not missing)",
                          ["model", "feature"]),
        "deviation": Counter("normserve_drift_deviation", "sum of counted values' deviations from the "
                             "training mean above or below it, in training standard deviations",
                             ["model", "feature", "side"]),
        "share": Gauge("normserve_drift_reference_share", "training share of a test bin",
                       ["model", "feature", "bin"], **top),
        "reference_rows": Gauge("normserve_drift_reference_rows", "training rows of the drift profile",
                                ["model"], **top),
        "critical": Gauge("normserve_drift_critical_chi2", "chi-squared at which a feature's drift is "
                          "significant", ["model", "feature"], **top),
        "setting": Gauge("normserve_drift_setting", "the monitor's settings (alpha, min_rows, thresholds)",
                         ["model", "name"], **top),
    }


def verdict_code(verdict: str) -> int:
    return VERDICTS.index(verdict) if verdict in VERDICTS else -1


class Profiled:
    """A model's graph inputs as its drift profile counts them (also the batch job's: service/batch.py)."""

    def __init__(self, meta: dict):
        profile = meta["drift"]
        self.modality, self.input = meta["modality"], meta["input"]
        profiled = {f["name"] for f in profile["features"]}
        names = ([c["name"] for c in meta["columns"]] if meta.get("columns")
                 else meta["feature_names"] if self.modality == "table" else sorted(profiled))
        self.not_monitored = [n for n in names if n not in profiled]
        # Which inputs the profile's features are, by name (tables) or column (mixed tables).
        picked = [names.index(f["name"]) for f in profile["features"]] if self.modality == "table" else None
        self.picked = None if picked == list(range(len(names))) else picked
        self.plain = self.modality == "table" and self.picked is None
        self.columns = [c for c in meta.get("columns") or () if c["name"] in profiled]

    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray | None, dict[int, list]]:
        """Inputs as the layout counts them: numbers [rows, numeric features] and each
        categorical feature's values."""
        if self.modality == "image":
            return image_features(feeds[self.input]), {}
        if self.modality == "table":
            X = feeds[self.input]
            return (X if self.picked is None else X[:, self.picked]), {}
        numeric = [feeds[column_input(c)][:, 0] for c in self.columns if c["type"] == "numeric"]
        return (np.stack(numeric, axis=1) if numeric else None,
                {i: feeds[column_input(c)][:, 0].tolist() for i, c in enumerate(self.columns)
                 if c["type"] == "categorical"})


class Monitor:
    def __init__(self, meta: dict, windows: tuple[int, ...] = WINDOW_ROWS, settings: Settings = SETTINGS):
        profile = meta["drift"]
        self.layout, self.windows = Layout(profile), tuple(sorted(windows))
        # Since start (and, for Prometheus, the fleet's hour): one look at settings.alpha.
        self.comparison = Comparison(self.layout, settings, profile.get("rows"))
        self.window_tests = {w: Comparison(self.layout, settings, profile.get("rows"),
                                           alpha=window_alpha(settings.alpha, w, self.windows))
                             for w in self.windows}
        self.input, self.model = meta["input"], meta["model"]
        self.features = Profiled(meta)
        self.not_monitored, self.plain = self.features.not_monitored, self.features.plain
        key = hashlib.sha256(json.dumps([meta["model"], profile]).encode()).hexdigest()[:12]
        # BentoML empties its Prometheus folder when `bentoml serve` starts: counts start at zero.
        root = os.environ.get("DRIFT_DIR") or os.path.join(
            os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir(), "normserve-drift")
        self.dir, self.pattern = Path(root), f"{key}-*.f64"
        self.dir.mkdir(parents=True, exist_ok=True)
        # A version loaded again counts anew: a file of its own, not the one an earlier load of it
        # in this process may still have mapped.
        (self.dir / f"{key}-{os.getpid()}.f64").unlink(missing_ok=True)
        # Row 0: since start; rows 1..buckets: the ring of recent buckets. The last two columns
        # hold the time a bucket was last added to, and the rows it answered (counted or not).
        self.bucket_size = bucket_rows(self.windows)  # answered rows
        # The ring's full buckets (all but the one being filled) hold the longest window, so one
        # worker alone can fill it.
        self.buckets = math.ceil(self.windows[-1] / self.bucket_size) + 2
        self.file = np.memmap(self.dir / f"{key}-{os.getpid()}.f64", np.float64, "w+",
                              shape=(1 + self.buckets, self.layout.size + 2))
        self.counts = self.file.view(np.ndarray)  # the same memory, without memmap's Python hooks
        self.bucket = 0
        # Staging: the rows waiting to be counted (numeric ones as the requests' own arrays, which
        # the garbage collector does not track), the answered rows each stands for, and the rows
        # answered since start.
        self.numbers: list[np.ndarray] = []
        self.texts: dict[int, list] = {i: [] for i in self.layout.lookup}
        self.weights: list[tuple[int, int, int]] = []  # per request: rows, step, rows counted
        self.staged = self.answered = 0
        self.timer = self.gauge_timer = None  # the next count, the next gauge update
        self.metrics, self.gauges_at = metrics(), -GAUGE_SECONDS
        self.exported = np.zeros(self.layout.size)  # this worker's counts already in the counters
        self.export_reference()

    def observe(self, feeds: dict[str, np.ndarray]) -> None:
        """Stage the checked inputs of an answered request; they are counted within FLUSH_SECONDS."""
        self.stage(feeds)
        if self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.tick)
            except RuntimeError:  # no event loop (called directly): count now
                self.flush()

    def stage(self, feeds: dict[str, np.ndarray]) -> None:
        """Keep a request's rows (of a large one, every sample_step-th row) until the next count.
        The cost of every request: a few hundred nanoseconds."""
        if self.plain:  # a table's rows, every column profiled: the common case, kept short
            numeric, texts = feeds[self.input], ()
        else:
            numeric, texts = self.features(feeds)
            texts = texts.items()
        rows = len(numeric) if numeric is not None else len(next(iter(texts))[1])
        self.answered += rows
        step = sample_step(rows)
        if numeric is not None:
            self.numbers.append(numeric if step == 1 else numeric[::step].copy())
        for i, values in texts:
            self.texts[i] += values[::step]
        counted = -(-rows // step)
        self.weights.append((rows, step, counted))
        self.staged += counted
        if self.staged >= FLUSH_ROWS:
            self.flush()

    def tick(self) -> None:
        """Count what is staged; bring the gauges and counters up to date within GAUGE_SECONDS."""
        self.timer = None
        self.flush()
        if self.gauge_timer is None:
            due = max(0.0, self.gauges_at + GAUGE_SECONDS - time.monotonic())
            self.gauge_timer = asyncio.get_running_loop().call_later(due, self.update_gauges)

    def update_gauges(self) -> None:
        self.gauge_timer = None
        self.export(self.report())

    def flush(self) -> None:
        """Count what is staged: the rows that fill the current bucket in one go, then the next
        bucket's, so the windows move by a bucket (BUCKET_ROWS answered rows) at a time."""
        rows, self.staged = self.staged, 0
        self.counts[0, -1] = self.answered
        if not rows:
            return
        numbers = np.concatenate(self.numbers) if self.numbers else None
        requests = self.weights  # per request: rows answered, step, rows counted
        texts, now = self.texts, time.time()
        self.numbers, self.texts, self.weights = [], {i: [] for i in self.texts}, []
        # A bucket closes after the request that fills it (a request is never split): groups of
        # whole requests, each ending where its bucket reaches bucket_size answered rows.
        already = self.counts[1 + self.bucket, -1]  # answered rows in the open bucket
        starts, groups, answered, end = [0], [], 0.0, 0
        for rows_answered, _, rows_counted in requests:
            answered += rows_answered
            end += rows_counted
            if already + answered >= self.bucket_size:
                groups.append(answered)
                starts.append(end)
                already, answered = 0.0, 0.0
        if answered:
            groups.append(answered)
        else:
            starts.pop()  # the last request closed its bucket: no group starts after it
        for delta, answered in zip(self.layout.count_groups(numbers, texts, starts), groups):
            row = self.counts[1 + self.bucket]
            row[:-2] += delta
            self.counts[0, :-2] += delta
            row[-2], row[-1] = now, row[-1] + answered  # time orders buckets across workers
            if row[-1] >= self.bucket_size:  # full: the next one, the oldest leaving the windows
                self.bucket = (self.bucket + 1) % self.buckets
                self.counts[1 + self.bucket] = 0

    def totals(self) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, int]], int]:
        """Since start: every worker's counts summed. Each window: the newest buckets of all
        workers, newest first, until they answered the window's rows (its counts, and the rows
        they answered). And the rows answered since start."""
        since, buckets = np.zeros(self.layout.size + 2), []
        for path in self.dir.glob(self.pattern):
            try:
                counts = np.fromfile(path, np.float64).reshape(1 + self.buckets, self.layout.size + 2)
            except (OSError, ValueError):  # a worker's file being created
                continue
            since += counts[0]
            buckets += [b for b in counts[1:] if b[0] > 0]
        buckets.sort(key=lambda b: -b[-2])
        windows, total, answered, taken = {}, np.zeros(self.layout.size), 0.0, 0
        for w in self.windows:
            while answered < w and taken < len(buckets):
                total += buckets[taken][:-2]
                answered += buckets[taken][-1]
                taken += 1
            windows[w] = (total.copy(), int(answered))
        return since[:-2], windows, int(since[-1])

    def report(self) -> dict:
        self.flush()
        since, windows, answered = self.totals()
        looked = []
        for w, (counts, rows) in windows.items():
            result = self.window_tests[w].compare(counts)
            looked.append({**result, "window_rows": w, "answered_in_window": rows})
        # The recent verdict: the worst window's (of equals, the longest: the most evidence).
        rank = {v: i for i, v in enumerate(("not_enough_data", *VERDICTS))}
        recent = max(reversed(looked), key=lambda r: rank[r["verdict"]])
        s = self.comparison.settings
        return {"enabled": True, "verdict": recent["verdict"], "window_rows": recent["window_rows"],
                "windows": [{"window_rows": r["window_rows"], "answered_rows": r["answered_in_window"],
                             "rows": r["rows"], "verdict": r["verdict"]} for r in looked],
                "min_rows": s.min_rows, "alpha": s.alpha, "thresholds": s.thresholds(),
                "answered_rows": answered, "not_monitored": self.not_monitored, "recent": recent,
                "since_start": self.comparison.compare(since)}

    def export_reference(self) -> None:
        """The training side of the fleet's comparison, and every counter at zero, so that each
        series exists from the first scrape (Prometheus's increase() then counts from 0)."""
        m, model, s = self.metrics, self.model, self.comparison.settings
        m["reference_rows"].labels(model).set(self.comparison.reference_rows)
        for name, value in {"alpha": s.alpha, "min_rows": s.min_rows, **s.thresholds()}.items():
            m["setting"].labels(model, name).set(value)
        m["counted"].labels(model).inc(0)
        for test in self.comparison.tests:
            m["critical"].labels(model, test.name).set(test.critical)
            for b, share in enumerate(test.shares):
                m["share"].labels(model, test.name, str(b)).set(share)
                m["bin_rows"].labels(model, test.name, str(b)).inc(0)
            if test.kind == "numeric":
                m["values"].labels(model, test.name).inc(0)
                for side in ("above", "below"):
                    m["deviation"].labels(model, test.name, side).inc(0)

    def export(self, report: dict) -> None:
        """The server's verdicts as gauges; this worker's new counts added to the counters."""
        self.gauges_at = time.monotonic()
        m = self.metrics
        for window in WINDOWS:
            r = report[window]
            m["rows"].labels(self.model, window).set(r["rows"])
            m["overall"].labels(self.model, window).set(verdict_code(r["verdict"]))
            for f in r["features"]:
                labels = (self.model, f["name"], window)
                m["verdict"].labels(*labels).set(verdict_code(f["verdict"]))
                if f["psi"] is not None:
                    m["psi"].labels(*labels).set(f["psi"])
                if f.get("mean_shift") is not None:
                    m["mean_shift"].labels(*labels).set(f["mean_shift"])
        new = self.counts[0, :-2] - self.exported
        if not new[0]:
            return
        self.exported += new
        m["counted"].labels(self.model).inc(new[0])
        for test, f, offset in zip(self.comparison.tests, self.layout.features, self.layout.offsets):
            for b, rows in enumerate(test.bin_counts(new)):
                if rows:
                    m["bin_rows"].labels(self.model, test.name, str(b)).inc(rows)
            if test.kind == "numeric":
                values, above, below = new[offset:offset + 3]
                std = f["std"] or 1.0
                m["values"].labels(self.model, test.name).inc(values)
                m["deviation"].labels(self.model, test.name, "above").inc(above / std)
                m["deviation"].labels(self.model, test.name, "below").inc(below / std)

