"""ASGI middleware for the service: the JSON fast path of /predict, upload checks, and a fix for
BentoML's request timer.

BentoML adds these inside its own metrics, tracing and timeout middleware, so what they answer is
still counted on /metrics.
"""
from __future__ import annotations

import json

import bentoml
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.inputs import parse_body

UPLOAD_ROUTE = "/predict_image"
UPLOAD_FIELD = "image"
JSON_HEADERS = [(b"content-type", b"application/json")]


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _reply(send, status: int, message: str) -> None:
    await _send_json(send, status, json.dumps({"error": message}).encode())


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None if the client went away."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


NPY_TYPES = (b"application/x-npy", b"application/octet-stream")


class BodyLimit:
    """413 for a request body over `max_bytes`, answered as soon as the declared length (or the
    bytes read so far) pass it: BentoML would otherwise parse a body of any size whole first. The
    rest of the body is drained before answering, or clients see a reset instead of the 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(receive, send, body_pending=True)
        seen, pending = 0, True

        async def counting_receive():
            nonlocal seen, pending
            message = await receive()
            pending = message["type"] == "http.request" and message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(receive, send, body_pending=pending)

    async def _refuse(self, receive, send, body_pending: bool):
        while body_pending:  # drain what is left; waiting past the last chunk would hang
            message = await receive()
            body_pending = message["type"] == "http.request" and message.get("more_body", False)
        await _reply(send, 413, f"the request body is over {self.max_bytes // 2 ** 20} MB; split it "
                                "into smaller requests (or raise MAX_BODY_MB)")


class _TooLarge(Exception):
    pass


class FastPredict:
    """POST /predict, answered here: a JSON body (or a .npy array, for bulk scoring) with orjson
    parsing and the service's own checks and scoring (`answer`), without BentoML's generic
    per-request parsing and validation, which cost more than scoring itself
    (docs/benchmarks.md); any other content type gets a 400. The @bentoml.api method documents
    the endpoint in the OpenAPI spec and serves BentoML's Python client the same way."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:
            return
        kind = _content_type(scope)
        if kind not in (b"application/json", *NPY_TYPES):
            # BentoML would try other types as forms (a 500 without a boundary); 400 is documented.
            return await _reply(send, 400, f"unsupported Content-Type {kind.decode(errors='replace')!r}: "
                                           "send JSON (application/json) or a NumPy array "
                                           "(application/x-npy)")
        service = bentoml.get_current_service()
        if kind == b"application/json":
            status, payload = service.answer(lambda: service.check(parse_body(body)))
        else:
            status, payload = service.answer(lambda: service.check_npy(body))
        await _send_json(send, status, payload)


def _content_type(scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower()
    return b"application/json"  # BentoML treats a request without a content type as JSON too


class UploadGuard:
    """BentoML 1.4 answers 500 when binary data arrives under an unexpected multipart field (it
    tries to decode it as JSON). Check the form first: exactly one file in the field `image`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != UPLOAD_ROUTE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, replay)
        if _content_type(scope) != b"multipart/form-data":
            return await _reply(send, 400, f"upload the image as multipart/form-data in the field "
                                           f"{UPLOAD_FIELD!r}")
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart: the parser's own words name the problem
            return await _reply(send, 400, f"malformed multipart body: {e}")
        fields = list(form.keys())
        ok = fields == [UPLOAD_FIELD] and isinstance(form[UPLOAD_FIELD], UploadFile)
        await form.close()
        if not ok:
            return await _reply(send, 400, f"expected one file in the multipart field {UPLOAD_FIELD!r}, "
                                           f"got field(s): {', '.join(fields) or 'none'}")
        replayed = False
        await self.app(scope, replay, send)


def cancel_request_timers() -> None:
    """Replace BentoML 1.4's TimeoutMiddleware, which arms a timer per request and never cancels
    it: the timer holds the request's context (tracing span included) until it fires, so memory
    grows with request rate x timeout. It also waits out the whole timeout when the app fails
    before responding. This one waits for whichever comes first (the response starting, the app
    finishing, the timeout) and keeps nothing afterwards. BentoML looks the class up when it
    builds the app, after the service module is imported."""
    import asyncio

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
                    await _reply(send, 504, f"not able to process the request in {self.timeout} s")
                return
            finally:
                timer.cancel()
            await task  # finishes the response, or re-raises the app's error

    traffic.TimeoutMiddleware = PromptTimeoutMiddleware
