"""Covariate-shift monitor: the raw inputs the service scores, counted into the training profile's
bins (training/drift.py) and compared with it.

Constant memory: each worker keeps its counts in a small shared-memory file: since start, and a
ring of buckets of recent rows, each stamped with the time of its last row. Any worker reads every
worker's file to answer GET /drift and to set the Prometheus gauges: since start is the sum of
all, the recent window the newest buckets of all workers that together hold DRIFT_WINDOW rows.
Scoring a request only queues its inputs; they are counted in batches (every FLUSH_ROWS rows or
FLUSH_SECONDS), which keeps the monitor's cost per request small. Only inputs that were answered
200 are counted: rejected requests never get here.
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
SAMPLE_STRIDE = 16
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
    def __init__(self, meta: dict, directory: str | None = None):
        self.layout = Layout(meta["drift"])
        self.modality, self.input, self.columns = meta["modality"], meta["input"], meta.get("columns")
        key = hashlib.sha256(json.dumps([meta["model"], meta["drift"]]).encode()).hexdigest()[:12]
        # BentoML empties its Prometheus folder when `bentoml serve` starts: counts start at zero.
        root = directory or os.environ.get("DRIFT_DIR") or os.path.join(
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
        self.pending, self.pending_rows = [], 0  # (inputs, rows counted, rows answered, arrival)
        self.timer = self.gauge_timer = None  # the next count, the next gauge update
        self.gauges, self.gauges_at = gauges(), -GAUGE_SECONDS

    def observe(self, feeds: dict[str, np.ndarray]) -> None:
        """Queue the checked inputs of an answered request; they are counted within FLUSH_SECONDS."""
        rows = len(next(iter(feeds.values())))
        if rows > SAMPLE_ABOVE:
            feeds = {name: values[::SAMPLE_STRIDE] for name, values in feeds.items()}
        counted = len(next(iter(feeds.values())))
        self.pending.append((feeds, counted, rows, time.time()))
        self.pending_rows += counted
        if self.pending_rows >= FLUSH_ROWS:
            self.flush()
        if self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.tick)
            except RuntimeError:  # no event loop (called directly): count now
                self.flush()

    def tick(self) -> None:
        """Count what is queued; bring the gauges up to date within GAUGE_SECONDS."""
        self.timer = None
        self.flush()
        if self.gauge_timer is None:
            due = max(0.0, self.gauges_at + GAUGE_SECONDS - time.monotonic())
            self.gauge_timer = asyncio.get_running_loop().call_later(due, self.update_gauges)

    def update_gauges(self) -> None:
        self.gauge_timer = None
        self.set_gauges(self.report())

    def _features(self, pending: list[dict]) -> tuple[np.ndarray | None, dict[int, list]]:
        """The queued inputs as the layout counts them: numbers [rows, numeric features] and
        each categorical feature's values."""
        if self.modality == "image":
            return image_features(np.concatenate([f[self.input] for f in pending])), {}
        if self.modality == "table":
            return np.concatenate([f[self.input] for f in pending]), {}
        columns = {c["name"]: np.concatenate([f[c["name"]][:, 0] for f in pending])
                   for c in self.columns}
        numeric = [columns[c["name"]] for c in self.columns if c["type"] == "numeric"]
        return (np.stack(numeric, axis=1) if numeric else None,
                {i: columns[c["name"]].tolist() for i, c in enumerate(self.columns)
                 if c["type"] == "categorical"})

    def flush(self) -> None:
        """Count what is queued: the requests that fill the current bucket in one go, then the
        next bucket's, so the window moves by about a bucket (DRIFT_WINDOW / 9 rows) at a time."""
        pending, self.pending, self.pending_rows = self.pending, [], 0
        start = 0
        while start < len(pending):
            stop, rows, room = start, 0, self.bucket_size - self.bucket_rows
            while stop < len(pending) and rows < room:
                rows += pending[stop][2]
                stop += 1
            group = pending[start:stop]
            numeric, categorical = self._features([feeds for feeds, *_ in group])
            sampled = any(counted != rows for _, counted, rows, _ in group)
            weights = (np.repeat([rows / counted for _, counted, rows, _ in group],
                                 [counted for _, counted, _, _ in group]) if sampled else None)
            delta = self.layout.count(numeric, categorical, weights)
            self.counts[0, :-1] += delta
            self.counts[1 + self.bucket, :-1] += delta
            # Stamped with the arrival of its newest row: the window is ordered across workers.
            self.counts[1 + self.bucket, -1] = group[-1][3]
            self.bucket_rows += rows
            start = stop
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
