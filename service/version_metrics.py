"""Request metrics per model version (`model` is name:version): prediction requests by HTTP status,
and the time spent checking, scoring and answering them. BentoML's own request metrics are per
endpoint; several versions answer on one endpoint here.

A request only adds to a few numbers in memory; they go to Prometheus every FLUSH_SECONDS, in one
increment per series (writing each request to the multiprocess files cost 2.3 µs of a ~90 µs
single-row request; benchmarks/versions.py measures the serving speed).
"""
from __future__ import annotations

import asyncio
import functools

import numpy as np

FLUSH_SECONDS = 0.5
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@functools.cache  # once per process: Prometheus metrics are registered globally
def metrics():
    from prometheus_client import Counter, Histogram
    return (Counter("normserve_model_requests", "prediction requests answered, per model version "
                    "and HTTP status", ["model", "code"]),
            Histogram("normserve_model_request_duration_seconds", "time to check, score and answer a "
                      "prediction request, per model version", ["model"], buckets=BUCKETS))


class VersionRequests:
    """One model version's request metrics, counted in memory and flushed in batches."""

    def __init__(self, model: str):
        requests, duration = metrics()
        self.model, self.requests = model, requests
        self.by_status = {code: requests.labels(model, str(code)) for code in (200, 400)}  # exist at 0
        self.duration = duration.labels(model)
        self.pending: dict[int, int] = {}
        self.seconds: list[float] = []
        self.timer = None

    def add(self, status: int, seconds: float) -> None:
        self.pending[status] = self.pending.get(status, 0) + 1
        self.seconds.append(seconds)
        if self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no event loop (called directly): now
                self.flush()

    def flush(self) -> None:
        self.timer = None
        pending, seconds, self.pending, self.seconds = self.pending, self.seconds, {}, []
        for status, n in pending.items():
            if (counter := self.by_status.get(status)) is None:
                counter = self.by_status[status] = self.requests.labels(self.model, str(status))
            counter.inc(n)
        observe_many(self.duration, np.asarray(seconds))


def observe_many(histogram, values: np.ndarray) -> None:
    """What Histogram.observe does for each value (one more in the first bucket whose bound is at
    least the value, and the sum), in one increment per bucket: prometheus_client's own fields, or
    one observe per value if they are not there."""
    buckets, bounds, total = (getattr(histogram, name, None) for name in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for v in values:
            histogram.observe(float(v))
        return
    for i, n in enumerate(np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))):
        if n:
            buckets[i].inc(int(n))
    total.inc(float(values.sum()))
