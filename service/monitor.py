"""Covariate-shift monitor: the raw inputs the service scores, counted into the training profile's
bins (training/drift.py) and compared with it.

Constant memory: each worker keeps its counts in a small shared-memory file: since start, and a
ring of buckets of recent rows, each stamped with the time of its last row. Any worker reads every
worker's file to answer GET /drift and to set the Prometheus gauges: since start is the sum of
all, the recent window the newest buckets of all workers that together hold DRIFT_WINDOW rows.
Scoring a request only copies its inputs into fixed staging arrays (of a large request, a sample
of rows); they are counted in batches (every FLUSH_ROWS rows or FLUSH_SECONDS), which keeps the
monitor's cost per request small. Only inputs that were answered 200 are counted: rejected
requests never get here.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from training.drift import VERDICTS, Layout, compare, image_features

ENABLED = os.environ.get("DRIFT", "1") != "0"
WINDOW = int(os.environ.get("DRIFT_WINDOW", "10000"))     # rows in the recent window (all workers)
MIN_ROWS = int(os.environ.get("DRIFT_MIN_ROWS", "500"))   # fewer rows give "not_enough_data"
THRESHOLDS = {name: float(os.environ.get(f"DRIFT_{name.upper()}", default)) for name, default in (
    ("psi_warn", 0.1), ("psi_retrain", 0.25), ("shift_warn", 0.25), ("shift_retrain", 0.5))}
BUCKETS = 10
FLUSH_ROWS = 1024
FLUSH_SECONDS = 0.5
GAUGE_SECONDS = 5.0  # Prometheus scrapes every 15 s or so; GET /drift always brings them up to date
# Of a request with more rows than this, every SAMPLE_STRIDE-th row is counted, standing for the
# rows around it: counting every row of bulk requests would cost ~20-40% of their throughput.
SAMPLE_ABOVE = int(os.environ.get("DRIFT_SAMPLE_ABOVE", "64"))
SAMPLE_STRIDE = 32
WINDOWS = ("recent", "since_start")


def gauges():
    """Prometheus gauges; in BentoML's multiprocess mode the most recent value of any worker wins
    (every worker reports the whole server's numbers)."""
    from prometheus_client import Gauge
    kw = {"multiprocess_mode": "mostrecent"}
    return {
        "psi": Gauge("normserve_drift_psi", "population stability index of live inputs vs. training",
                     ["feature", "window"], **kw),
        "mean_shift": Gauge("normserve_drift_mean_shift", "(live mean - training mean) / training std",
                            ["feature", "window"], **kw),
        "verdict": Gauge("normserve_drift_verdict", "0 ok, 1 warn, 2 retrain, -1 not enough data",
                         ["feature", "window"], **kw),
        "overall": Gauge("normserve_drift_overall", "worst feature verdict (0 ok, 1 warn, 2 retrain, "
                         "-1 not enough data)", ["window"], **kw),
        "rows": Gauge("normserve_drift_rows", "rows counted", ["window"], **kw),
    }


def verdict_code(verdict: str) -> int:
    return VERDICTS.index(verdict) if verdict in VERDICTS else -1


class Monitor:
    def __init__(self, meta: dict):
        self.layout = Layout(meta["drift"])
        self.modality, self.input, self.columns = meta["modality"], meta["input"], meta.get("columns")
        key = hashlib.sha256(json.dumps([meta["model"], meta["drift"]]).encode()).hexdigest()[:12]
        # BentoML empties its Prometheus folder when `bentoml serve` starts: counts start at zero.
        root = os.environ.get("DRIFT_DIR") or os.path.join(
            os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir(), "normserve-drift")
        self.dir, self.pattern = Path(root), f"{key}-*.f64"
        self.dir.mkdir(parents=True, exist_ok=True)
        # Row 0: since start; rows 1..BUCKETS: the ring of recent buckets. The last column holds
        # the time a bucket was last added to.
        self.file = np.memmap(self.dir / f"{key}-{os.getpid()}.f64", np.float64, "w+",
                              shape=(1 + BUCKETS, self.layout.size + 1))
        self.counts = self.file.view(np.ndarray)  # the same memory, without memmap's Python hooks
        self.bucket, self.bucket_rows = 0, 0
        # The ring's full buckets (all but the one being filled) hold a window on their own, so
        # one worker alone can fill it.
        self.bucket_size = max(1, math.ceil(WINDOW / (BUCKETS - 1)))
        # Staging: the rows waiting to be counted, copied into fixed arrays (holding on to each
        # request's objects instead makes Python's garbage collector work much harder).
        n = len(self.layout.base)
        self.numbers = np.empty((FLUSH_ROWS, n), np.float32) if n else None
        self.texts = {i: [""] * FLUSH_ROWS for i in self.layout.lookup}
        self.weights, self.arrivals = np.ones(FLUSH_ROWS), np.zeros(FLUSH_ROWS)
        self.staged = 0
        self.timer = self.gauge_timer = None  # the next count, the next gauge update
        self.gauges, self.gauges_at = gauges(), -GAUGE_SECONDS

    def _features(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray | None, dict[int, list]]:
        """A request's inputs as the layout counts them: numbers [rows, numeric features] and
        each categorical feature's values."""
        if self.modality == "image":
            return image_features(feeds[self.input]), {}
        if self.modality == "table":
            return feeds[self.input], {}
        numeric = [feeds[c["name"]][:, 0] for c in self.columns if c["type"] == "numeric"]
        return (np.stack(numeric, axis=1) if numeric else None,
                {i: feeds[c["name"]][:, 0].tolist() for i, c in enumerate(self.columns)
                 if c["type"] == "categorical"})

    def observe(self, feeds: dict[str, np.ndarray]) -> None:
        """Stage the checked inputs of an answered request; they are counted within FLUSH_SECONDS."""
        numeric, texts = self._features(feeds)
        rows = len(numeric) if numeric is not None else len(next(iter(texts.values())))
        step = SAMPLE_STRIDE if rows > SAMPLE_ABOVE else 1
        weight, now = rows / len(range(0, rows, step)), time.time()
        for first in range(0, rows, step * FLUSH_ROWS):  # a huge request, in pieces
            part = slice(first, first + step * FLUSH_ROWS, step)
            k = len(range(*part.indices(rows)))
            if self.staged + k > FLUSH_ROWS:
                self.flush()
            at = slice(self.staged, self.staged + k)
            if numeric is not None:
                self.numbers[at] = numeric[part]
            for i, values in texts.items():
                self.texts[i][at] = values[part]
            self.weights[at], self.arrivals[at] = weight, now
            self.staged += k
        if self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.tick)
            except RuntimeError:  # no event loop (called directly): count now
                self.flush()

    def tick(self) -> None:
        """Count what is staged; bring the gauges up to date within GAUGE_SECONDS."""
        self.timer = None
        self.flush()
        if self.gauge_timer is None:
            due = max(0.0, self.gauges_at + GAUGE_SECONDS - time.monotonic())
            self.gauge_timer = asyncio.get_running_loop().call_later(due, self.update_gauges)

    def update_gauges(self) -> None:
        self.gauge_timer = None
        self.set_gauges(self.report())

    def flush(self) -> None:
        """Count what is staged: the rows that fill the current bucket in one go, then the next
        bucket's, so the window moves by about a bucket (DRIFT_WINDOW / 9 rows) at a time. A
        sampled row of a large request stands for the rows around it (its weight)."""
        rows, self.staged = self.staged, 0
        if not rows:
            return
        weights = self.weights[:rows]
        answered = np.cumsum(weights)  # rows answered, up to each staged row
        starts, start, filled = [], 0, self.bucket_rows
        while start < rows:  # where each bucket's rows begin
            starts.append(start)
            before = answered[start - 1] if start else 0.0
            start = min(rows, int(np.searchsorted(answered, before + self.bucket_size - filled)) + 1)
            filled = 0
        deltas = self.layout.count_groups(None if self.numbers is None else self.numbers[:rows],
                                          {i: values[:rows] for i, values in self.texts.items()},
                                          weights, starts)
        for delta, stop in zip(deltas, starts[1:] + [rows]):
            self.counts[0, :-1] += delta
            self.counts[1 + self.bucket, :-1] += delta
            # Stamped with the arrival of its newest row: the window is ordered across workers.
            self.counts[1 + self.bucket, -1] = self.arrivals[stop - 1]
            self.bucket_rows += delta[0]
            if self.bucket_rows >= self.bucket_size:  # the oldest bucket leaves the window
                self.bucket, self.bucket_rows = (self.bucket + 1) % BUCKETS, 0
                self.counts[1 + self.bucket] = 0

    def totals(self) -> dict[str, np.ndarray]:
        """Since start: every worker's counts summed. Recent: the newest buckets of all workers,
        newest first, until they hold WINDOW rows."""
        since, buckets = np.zeros(self.layout.size), []
        for path in self.dir.glob(self.pattern):
            try:
                counts = np.fromfile(path, np.float64).reshape(1 + BUCKETS, self.layout.size + 1)
            except (OSError, ValueError):  # a worker's file being created
                continue
            since += counts[0, :-1]
            buckets += [b for b in counts[1:] if b[0] > 0]
        recent = np.zeros(self.layout.size)
        for bucket in sorted(buckets, key=lambda b: -b[-1]):
            if recent[0] >= WINDOW:
                break
            recent += bucket[:-1]
        return {"recent": recent, "since_start": since}

    def report(self) -> dict:
        self.flush()
        totals = self.totals()
        windows = {w: compare(self.layout, totals[w], THRESHOLDS, MIN_ROWS) for w in WINDOWS}
        return {"enabled": True, "verdict": windows["recent"]["verdict"],
                "window_rows": WINDOW, "min_rows": MIN_ROWS, "thresholds": THRESHOLDS, **windows}

    def set_gauges(self, report: dict) -> None:
        self.gauges_at = time.monotonic()
        g = self.gauges
        for window in WINDOWS:
            r = report[window]
            g["rows"].labels(window).set(r["rows"])
            g["overall"].labels(window).set(verdict_code(r["verdict"]))
            for f in r["features"]:
                labels = (f["name"], window)
                g["verdict"].labels(*labels).set(verdict_code(f["verdict"]))
                if f["psi"] is not None:
                    g["psi"].labels(*labels).set(f["psi"])
                if f.get("mean_shift") is not None:
                    g["mean_shift"].labels(*labels).set(f["mean_shift"])
