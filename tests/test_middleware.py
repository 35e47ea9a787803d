"""The ASGI middleware on its own, fed exact message sequences that HTTP timing only sometimes makes."""
import asyncio
import json
import time

import pytest

from service.middleware import BodyLimit


async def inner_app(scope, receive, send):
    """Reads the whole body, then answers 200."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app, messages: list[dict], headers=()):
    queue = list(messages)
    sent = []

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a real server waits for the client's disconnect here

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": list(headers)}
    await asyncio.wait_for(app(scope, receive, send), timeout=2)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("messages", [
    [{"type": "http.request", "body": b"x" * 150, "more_body": False}],  # the crossing chunk is the last
    [{"type": "http.request", "body": b"x" * 60, "more_body": True},
     {"type": "http.request", "body": b"x" * 60, "more_body": True},
     {"type": "http.request", "body": b"x" * 60, "more_body": False}],
], ids=["one chunk", "three chunks"])
def test_oversized_body_gets_413_without_waiting(messages):
    status, body = asyncio.run(call(BodyLimit(inner_app, max_bytes=100), messages))
    assert status == 413 and "over" in json.loads(body)["error"]


def test_declared_length_over_the_limit_is_refused_before_reading():
    messages = [{"type": "http.request", "body": b"x" * 10, "more_body": False}]
    status, _ = asyncio.run(call(BodyLimit(inner_app, max_bytes=100), messages,
                                 headers=[(b"content-length", b"5000")]))
    assert status == 413


def test_body_within_the_limit_passes():
    messages = [{"type": "http.request", "body": b"x" * 90, "more_body": False}]
    assert asyncio.run(call(BodyLimit(inner_app, max_bytes=100), messages)) == (200, b"ok")


# ---- BentoML's timeout middleware, as service/bentoml_patches.py replaces it ----------------

@pytest.fixture
def deadline_middleware(monkeypatch):
    """BentoML's TimeoutMiddleware as the patch replaces it, for this test only."""
    from bentoml._internal.server.http import traffic
    from service import bentoml_patches
    monkeypatch.setattr(traffic, "TimeoutMiddleware", traffic.TimeoutMiddleware)  # restored after
    bentoml_patches.cancel_request_timers()
    return lambda app, timeout: traffic.TimeoutMiddleware(app, timeout=timeout)


def slow_app(before: float, after: float = 0.0, error: Exception | None = None):
    async def app(scope, receive, send):
        await asyncio.sleep(before)
        if error:
            raise error
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(after)
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def test_a_request_past_its_deadline_gets_504_at_the_deadline(deadline_middleware):
    started = time.perf_counter()
    status, body = asyncio.run(call(deadline_middleware(slow_app(5), timeout=0.2), []))
    assert status == 504 and "0.2 s" in json.loads(body)["error"]
    assert time.perf_counter() - started < 1.5


def test_a_response_under_way_is_not_cut_off_and_errors_are_not_waited_for(deadline_middleware):
    assert asyncio.run(call(deadline_middleware(slow_app(0, after=0.4), timeout=0.2), [])) == (200, b"ok")
    assert asyncio.run(call(deadline_middleware(slow_app(0.01), timeout=0.2), [])) == (200, b"ok")
    for error in (ValueError("boom"), TimeoutError("the app's own")):
        with pytest.raises(type(error), match=str(error)):
            asyncio.run(call(deadline_middleware(slow_app(0, error=error), timeout=30), []))


# ---- the fast path's own deadline: it answers before BentoML's timeout middleware ------------

class EchoScorer:
    @staticmethod
    def answer_json(body):
        return 200, body.upper()

    @staticmethod
    def answer_npy(body):
        return 200, b"npy"


def fast_predict(timeout: float):
    from types import SimpleNamespace

    from service.middleware import FastPredict
    served = SimpleNamespace(default=EchoScorer())
    registry = SimpleNamespace(current=lambda: served)
    return FastPredict(inner_app, route="/predict", registry=registry, timeout=timeout)


def test_the_fast_path_answers_a_body_in_one_message_or_in_chunks():
    one = [{"type": "http.request", "body": b'"ab"', "more_body": False}]
    chunks = [{"type": "http.request", "body": b'"a', "more_body": True},
              {"type": "http.request", "body": b'b"', "more_body": False}]
    for messages in (one, chunks):
        assert asyncio.run(call(fast_predict(timeout=1), messages,
                                headers=[(b"content-type", b"application/json")])) == (200, b'"AB"')


def test_a_body_that_stops_arriving_gets_504_at_the_deadline():
    started = time.perf_counter()
    stalled = [{"type": "http.request", "body": b'{"inst', "more_body": True}]  # then nothing
    status, body = asyncio.run(call(fast_predict(timeout=0.2), stalled))
    assert status == 504 and "0.2 s" in json.loads(body)["error"]
    assert time.perf_counter() - started < 1.5
