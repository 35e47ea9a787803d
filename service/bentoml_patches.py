"""Every change this project makes to BentoML's internals, in one place, for the versions it was
written against.

`apply()` runs when the service module is imported: it patches in each HTTP worker, before BentoML
builds the app (the other processes that import the module serve no request). It checks the installed BentoML first: a version outside
SUPPORTED stops start-up with one line instead of patching code that may have changed.
"""
from __future__ import annotations

import asyncio
import sys

from service.middleware import reply
from service.oip import endpoint_template

SUPPORTED = ((1, 4), (1, 5))  # BentoML versions from 1.4 (inclusive) to 1.5 (exclusive)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version(version: str) -> str | None:
    """Why this BentoML version cannot be patched, or None if it can."""
    low, high = SUPPORTED
    if low <= _release(version) < high:
        return None
    return (f"BentoML {version} is installed, but service/bentoml_patches.py was written for "
            f"{low[0]}.{low[1]} <= version < {high[0]}.{high[1]}; install bentoml>={low[0]}.{low[1]},"
            f"<{high[0]}.{high[1]} (pyproject.toml)")


def apply(routes: tuple[str, ...] = (), tracing: bool = False, front: tuple[type, ...] = ()) -> None:
    import bentoml
    if problem := check_version(bentoml.__version__):
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if not serving_worker():
        return  # `bentoml serve`'s own process, `bentoml build`: they answer no request
    cancel_request_timers()
    served = frozenset(routes) | BENTOML_ROUTES
    bounded_endpoint_labels(served)
    lean_request_metrics(served)
    arranged_middlewares(front, tracing)


def serving_worker() -> bool:
    """Whether this process is one of `bentoml serve`'s HTTP workers (`python -m
    _bentoml_impl.worker.service`). The patches import BentoML's server modules (half a second),
    which the process that starts the workers does not need."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None) == "_bentoml_impl.worker.service"


BENTOML_ROUTES = frozenset({"/", "/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/schema.json"})


def endpoint_label(path: str, routes: frozenset) -> str:
    """The `endpoint` label of a request: its route, a protocol path's template, or "other"."""
    if path in routes:
        return path
    return endpoint_template(path) or "other"


def bounded_endpoint_labels(routes: frozenset) -> None:
    """BentoML labels its request metrics with the raw request path: every distinct path a client
    sends (/v2/models/<any name>, /anything-123) became a new series, without bound, in every
    worker's metric files and on /metrics. Label with the route instead: a served path, the Open
    Inference Protocol's templates ("/v2/models/{model}/infer"), or "other"."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics
    original = Metrics._setup

    def _setup(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name, metric in vars(self).items():
            if name.startswith("metrics_") and hasattr(metric, "labels"):
                metric.labels = _bounded(metric.labels, routes)

    Metrics._setup = _setup


def _bounded(labels, routes: frozenset):
    """Also remembers each labelled child (for what still asks BentoML's way: WebSockets, the
    endpoints' placeholders): prometheus_client checks the names and takes a lock each time. The labels are bounded (routes,
    status codes), so the memo is too."""
    children = {}

    def bounded(*args, **kwargs):
        if "endpoint" in kwargs:
            kwargs["endpoint"] = endpoint_label(kwargs["endpoint"], routes)
        key = (args, tuple(kwargs.items()))
        if (child := children.get(key)) is None:
            child = children[key] = labels(*args, **kwargs)
        return child
    return bounded


def lean_request_metrics(routes: frozenset) -> None:
    """BentoML's request metrics for an HTTP request, the same series and values, without its
    per-request overhead: each endpoint's labelled children are looked up once (BentoML builds four
    label sets per request), no wrapper around `receive` (it only counts WebSocket messages), no
    tuple of skipped paths built per request. It took 78 of the 472 µs of a single-row request in the
    app, 52 after this (medians, docs/benchmarks.md). WebSockets and /metrics take BentoML's own path."""
    from timeit import default_timer

    from bentoml._internal.context import server_context
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics
    original = Metrics.__call__

    def series_of(self, path: str) -> _Series:
        label, known = endpoint_label(path, routes), vars(self).setdefault("_series", {})
        if (series := known.get(label)) is None:
            names = {"service_name": server_context.bento_name,
                     "service_version": server_context.bento_version,
                     "runner_name": server_context.service_name}
            stamped = not path.startswith(tuple(self.skip_paths))
            series = known[label] = _Series(
                self, label, names, self.metrics_last_request_timestamp.labels(**names) if stamped else None)
        return series

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await original(self, scope, receive, send)
        if not self._is_setup:
            self._setup()
        series = series_of(self, scope["path"])
        if series.stamp is not None:
            series.stamp.set_to_current_time()
        started, status = default_timer(), 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                total, duration = series.answered(status)
                total.inc()
                duration.observe(max(default_timer() - started, 0))
            await send(message)

        series.in_progress.inc()
        try:
            await self.app(scope, receive, counted_send)
        finally:
            series.in_progress.dec()

    Metrics.__call__ = __call__


class _Series:
    """One endpoint's children of BentoML's request metrics; per status code, made when first seen
    (status codes are bounded)."""

    def __init__(self, metrics, endpoint: str, names: dict, stamp):
        self.metrics, self.labels, self.stamp = metrics, {"endpoint": endpoint, **names}, stamp
        self.in_progress = metrics.metrics_request_in_progress.labels(**self.labels)
        self.by_status = {}

    def answered(self, status: int):
        if (pair := self.by_status.get(status)) is None:
            labels = {**self.labels, "http_response_code": status}
            pair = self.by_status[status] = (self.metrics.metrics_request_total.labels(**labels),
                                             self.metrics.metrics_request_duration.labels(**labels))
        return pair


def arranged_middlewares(front: tuple[type, ...], tracing: bool) -> None:
    """BentoML's middleware stack, rearranged as the service asks:
    - the service's middlewares of the classes in `front` go before BentoML's timeout middleware
      (still inside its metrics and tracing): they answer without awaiting anything once the body
      is in, and read the body under their own deadline, so the timeout's task, future and timer
      per request (85 of the 472 µs of a single-row request in the app, docs/benchmarks.md) would
      buy them nothing. The other routes keep the timeout.
    - BentoML's OpenTelemetry middleware is left out when tracing is off (TRACING unset): with
      every URL excluded it records nothing, but it still builds each request's URL and matches it.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    listed = ServiceAppFactory.middlewares.fget

    def middlewares(self):
        stack = [m for m in listed(self) if tracing or m.cls is not OpenTelemetryMiddleware]
        timeout = next(i for i, m in enumerate(stack) if issubclass(m.cls, TimeoutMiddleware))
        ahead = [m for m in stack[timeout:] if m.cls in front]
        return stack[:timeout] + ahead + [m for m in stack[timeout:] if m.cls not in front]

    ServiceAppFactory.middlewares = property(middlewares)


def cancel_request_timers() -> None:
    """Replace BentoML 1.4's TimeoutMiddleware, which arms a timer per request and never cancels
    it: the timer holds the request's context (tracing span included) until it fires, so memory
    grows with request rate x timeout. It also waits out the whole timeout when the app fails
    before responding. This one waits for whichever comes first (the response starting, the app
    finishing, the timeout) and keeps nothing afterwards. BentoML looks the class up when it
    builds the app, after the service module is imported. The app runs in a task of its own:
    tried in the request's own task under asyncio.timeout instead, p99 at 32 clients was 15.6 ms
    against 12.5 (medians of three serve_tail runs) at the same throughput (benchmarks/serve_tail.py).
    """
    from bentoml._internal.server.http import traffic

    class PromptTimeoutMiddleware(traffic.TimeoutMiddleware):
        async def __call__(self, scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_=None):
                if not waiter.done():
                    waiter.set_result(None)

            async def _send(message):
                wake()
                await send(message)

            timer = loop.call_later(self.timeout, self._set_timer_out, waiter)
            task = asyncio.ensure_future(self.app(scope, receive, _send))
            task.add_done_callback(wake)  # an app that fails before responding wakes us at once
            try:
                await waiter
            except asyncio.TimeoutError:
                if task.cancel():
                    await reply(send, 504, f"not able to process the request in {self.timeout} s")
                return
            finally:
                timer.cancel()
            await task  # finishes the response, or re-raises the app's error

    traffic.TimeoutMiddleware = PromptTimeoutMiddleware
