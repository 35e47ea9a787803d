"""Shadow traffic: a loaded version scores a share of its model's live requests beside the
default, off the request path, and only what the two answered is kept (SageMaker's shadow tests,
in spirit). The caller gets the default's answer, as fast and with the same errors as without a
shadow.

A request answered by a default that has a shadow is sampled (`share`); a sampled request's
checked inputs and the default's outputs are appended to a bounded queue (a deque: nothing else
happens on the request path, and nothing is woken), which one thread per worker drains every
DRAIN_SECONDS, scoring the requests that came in one onnxruntime run per pair (which releases the
GIL); a request the queue has no room for is dropped and counted. (A queue.Queue that woke the
thread for every request cost 30% of the default's throughput at share 0.25:
benchmarks/versions.py.) Counted per
pair of default and shadow, as Prometheus counters (`model` and `shadow` labels, summed over
workers and replicas): requests and rows compared, rows where the two labels agree
(classification) or the sum of |difference| in the target's units (regression), the sum of the
rows' mean |difference of probability|, the shadow's errors and seconds, and the dropped rows.
GET /shadow sums them over the server's workers.
"""
from __future__ import annotations

import collections
import functools
import os
import random
import sys
import threading
import time

import numpy as np

QUEUE_REQUESTS = 1024  # sampled requests waiting at most; beyond that they are dropped (and counted)
DRAIN_SECONDS = 0.05   # how often the thread scores what came in


@functools.cache  # once per process: Prometheus metrics are registered globally
def metrics() -> dict:
    from prometheus_client import Counter
    pair = ["model", "shadow"]
    return {
        "requests": Counter("normserve_shadow_requests", "sampled requests the shadow scored", pair),
        "rows": Counter("normserve_shadow_rows", "rows the shadow scored and compared", pair),
        "agree": Counter("normserve_shadow_agree_rows", "rows where the shadow's label is the default's", pair),
        "prob_diff": Counter("normserve_shadow_probability_diff", "sum over rows of the mean |difference| "
                             "of the class probabilities", pair),
        "abs_diff": Counter("normserve_shadow_abs_diff", "sum over rows of |shadow - default| in the "
                            "target's units (regression)", pair),
        "errors": Counter("normserve_shadow_error_rows", "rows the shadow failed on", pair),
        "seconds": Counter("normserve_shadow_seconds", "seconds the shadow spent scoring", pair),
        "dropped": Counter("normserve_shadow_dropped_rows", "sampled rows dropped: the queue was full", pair),
    }


class Shadow:
    """The shadow of one default version: `offer` is called with every request it answered."""

    def __init__(self, default, shadow, share: float, worker: "ShadowWorker"):
        self.default, self.shadow, self.share, self.worker = default, shadow, share, worker
        self.series = {k: m.labels(default.tag, shadow.tag) for k, m in metrics().items()}

    def offer(self, feeds: dict, out: list) -> None:
        """On the request path: a random draw and, if sampled, a reference into the queue."""
        if random.random() >= self.share:
            return
        waiting = self.worker.waiting
        if len(waiting) >= QUEUE_REQUESTS:
            self.series["dropped"].inc(len(out[0]))
        else:
            waiting.append((self, feeds, out))

    def compare(self, feeds: dict, out: list, requests: int) -> None:
        """Off the request path: the shadow's answer to these inputs against the default's."""
        rows, started = len(out[0]), time.perf_counter()
        try:
            theirs = self.shadow.session.run(self.shadow.outputs, feeds)
        except Exception:  # whatever the shadow does, the caller has had its answer
            theirs = None
        s = self.series
        s["seconds"].inc(time.perf_counter() - started)
        s["requests"].inc(requests)
        if theirs is None or not np.isfinite(theirs[0]).all():
            s["errors"].inc(rows)
            return
        s["rows"].inc(rows)
        if self.default.task == "classification":
            s["agree"].inc(int((theirs[1] == out[1]).sum()))
            s["prob_diff"].inc(float(np.abs(theirs[0] - out[0]).mean(axis=1).sum()))
        else:
            s["abs_diff"].inc(float(np.abs(theirs[0].astype(np.float64) - out[0]).sum()))


class ShadowWorker:
    """The queue and the thread that drains it (one per worker process, started when first used)."""

    def __init__(self):
        self.waiting: collections.deque = collections.deque()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def ensure_running(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.drain, name="normserve-shadow", daemon=True)
                self.thread.start()

    def drain(self) -> None:
        while True:
            time.sleep(DRAIN_SECONDS)
            batch = []
            while self.waiting:
                batch.append(self.waiting.popleft())
            if batch:
                try:
                    self.score(batch)
                except Exception as e:  # never stop; say why
                    print(f"warning: shadow scoring: {type(e).__name__}: {e}", file=sys.stderr)

    @staticmethod
    def score(batch: list) -> None:
        """The batch's requests grouped by pair, each group in one run."""
        groups: dict[int, list] = {}
        for item in batch:
            groups.setdefault(id(item[0]), []).append(item)
        for items in groups.values():
            shadow = items[0][0]
            feeds = {k: np.concatenate([f[k] for _, f, _ in items]) for k in items[0][1]}
            out = [np.concatenate([o[j] for _, _, o in items]) for j in range(len(items[0][2]))]
            shadow.compare(feeds, out, len(items))


def stats(pairs: dict[tuple[str, str], float], tasks: dict[str, str]) -> list[dict]:
    """Each pair's figures, summed over this server's workers (their Prometheus files). `pairs`:
    (default tag, shadow tag) -> share, the shadows set now; `tasks`: model tag -> its task."""
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for family in collect():
        name = family.name.removeprefix("normserve_shadow_").removesuffix("_total")
        for sample in family.samples:
            if sample.name.endswith("_total") and "model" in sample.labels:
                key = (sample.labels["model"], sample.labels["shadow"])
                totals.setdefault(key, {})[name] = totals.get(key, {}).get(name, 0.0) + sample.value
    out = []
    for (model, shadow), t in sorted(totals.items()):
        rows = t.get("rows", 0.0)
        entry = {"model": model, "shadow": shadow, "active": (model, shadow) in pairs,
                 "share": pairs.get((model, shadow)), "requests": int(t.get("requests", 0)),
                 "rows_compared": int(rows), "error_rows": int(t.get("error_rows", 0)),
                 "dropped_rows": int(t.get("dropped_rows", 0)),
                 "mean_seconds_per_request": t.get("seconds", 0.0) / max(t.get("requests", 0.0), 1.0)}
        if rows and tasks.get(model, "classification") == "classification":
            entry["label_agreement"] = t.get("agree_rows", 0.0) / rows
            entry["mean_abs_probability_diff"] = t.get("probability_diff", 0.0) / rows
        elif rows:
            entry["mean_abs_diff"] = t.get("abs_diff", 0.0) / rows
        out.append(entry)
    return out


def collect():
    """The shadow metric families: every worker's, in BentoML's multiprocess mode."""
    from prometheus_client import CollectorRegistry
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        families = registry.collect()
    else:
        from prometheus_client import REGISTRY
        families = REGISTRY.collect()
    return [f for f in families if f.name.startswith("normserve_shadow_")]
