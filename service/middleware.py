"""ASGI middleware for the service: a body-size limit, the fast path of the prediction route, the
Open Inference Protocol's paths, and upload checks. Each is given what it needs (routes, the
functions that answer) when it is added.

BentoML adds these inside its own metrics (and tracing) middleware, so what they answer is still
counted on /metrics. The body limit, the fast path and the protocol sit in front of BentoML's
timeout middleware (service/bentoml_patches.py): once the body is in they answer without awaiting
anything, so they keep a deadline only for reading the body, as `read_body` does.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.oip import HEADER_LENGTH

JSON_HEADERS = [(b"content-type", b"application/json")]


async def send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def reply(send, status: int, message: str) -> None:
    """An error answer: {"error": message}."""
    await send_json(send, status, json.dumps({"error": message}).encode())


async def read_body(receive, timeout: float | None = None) -> bytes | None:
    """The whole request body, or None if the client went away. A body that does not arrive in one
    message is read under `timeout` seconds (asyncio.TimeoutError past it); one that does needs no
    timer."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    if not message.get("more_body", False):
        return message.get("body", b"")

    async def rest() -> bytes | None:
        chunks, more = [message.get("body", b"")], True
        while more:
            following = await receive()
            if following["type"] == "http.disconnect":
                return None
            chunks.append(following.get("body", b""))
            more = following.get("more_body", False)
        return b"".join(chunks)
    return await asyncio.wait_for(rest(), timeout)


async def body_or_reply(receive, send, timeout: float) -> bytes | None:
    """The body, or None once the client has gone or been answered 504 (BentoML's words). Then the
    event loop gets one turn before the caller scores without awaiting: the requests that arrived
    meanwhile are read in this round of the loop, not after it. Without that turn 1-2% of requests
    waited a whole extra round (p99 at 32 clients 27 ms instead of 17, docs/benchmarks.md)."""
    try:
        body = await read_body(receive, timeout)
    except asyncio.TimeoutError:
        await reply(send, 504, f"not able to process the request in {timeout} s")
        return None
    await asyncio.sleep(0)
    return body


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
        await reply(send, 413, f"the request body is over {self.max_bytes // 2 ** 20} MB; split it "
                                "into smaller requests (or raise MAX_BODY_MB)")


class _TooLarge(Exception):
    pass


def chosen_model(scope) -> str | None:
    """The `model` query parameter (NAME or NAME:VERSION), if the request names one."""
    query = scope.get("query_string", b"")
    if not query:
        return None
    return parse_qs(query.decode(errors="replace")).get("model", [None])[-1]


def scorer_or_reply(registry, scope):
    """The scorer a request names with ?model= (else the server's default), or an error answer."""
    from service.registry import NotLoaded
    try:
        return registry.find(chosen_model(scope)), None
    except NotLoaded as e:
        return None, (404, str(e))


class FastPredict:
    """POST `route`, answered here by the scorer of the model the request names (?model=NAME or
    NAME:VERSION; else the server's default): a JSON body by its `answer_json`, a .npy array
    (bulk scoring) by its `answer_npy`; any other content type gets a 400. This skips BentoML's
    generic per-request parsing and validation, which cost more than scoring itself
    (docs/benchmarks.md). The body is read within `timeout` seconds."""

    def __init__(self, app, route: str, registry, timeout: float):
        self.app, self.route, self.registry, self.timeout = app, route, registry, timeout
        self.answers = {b"application/json": "answer_json", **dict.fromkeys(NPY_TYPES, "answer_npy")}

    async def __call__(self, scope, receive, send):
        if not _posted_to(scope, self.route):
            return await self.app(scope, receive, send)
        body = await body_or_reply(receive, send, self.timeout)
        if body is None:
            return
        kind = _content_type(scope)
        if kind not in self.answers:
            # BentoML would try other types as forms (a 500 without a boundary); 400 is documented.
            return await reply(send, 400, f"unsupported Content-Type {kind.decode(errors='replace')!r}: "
                                          "send JSON (application/json) or a NumPy array "
                                          "(application/x-npy)")
        scorer, error = (self.registry.current().default, None) if not scope.get("query_string") \
            else scorer_or_reply(self.registry, scope)
        if error:
            return await reply(send, *error)
        await send_json(send, *getattr(scorer, self.answers[kind])(body))


class OpenInference:
    """The Open Inference Protocol's paths (/v2 and below), answered by `protocol.handle`
    (service/oip.py), and its model repository extension (/v2/repository/..., by
    `repository.handle`: service/repository.py); a binary answer goes out as
    application/octet-stream. The body is read within `timeout` seconds."""

    def __init__(self, app, protocol, repository, timeout: float):
        self.app, self.protocol, self.repository, self.timeout = app, protocol, repository, timeout

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v2" or path.startswith("/v2/")):
            return await self.app(scope, receive, send)
        body = await body_or_reply(receive, send, self.timeout) if scope["method"] == "POST" else b""
        if body is None:
            return
        if path.startswith("/v2/repository/"):
            return await send_json(send, *await self.repository.handle(scope["method"], path,
                                                                       scope["headers"], body))
        length = next((v for k, v in scope["headers"] if k == HEADER_LENGTH), None)
        status, headers, answer = self.protocol.handle(scope["method"], path, body, length)
        kind = b"application/octet-stream" if headers else b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(answer)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": answer})


def _posted_to(scope, route: str) -> bool:
    return scope["type"] == "http" and scope["path"] == route and scope["method"] == "POST"


def _content_type(scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower()
    return b"application/json"  # BentoML treats a request without a content type as JSON too


class ImageUpload:
    """POST `route` with an image file, answered here by the scorer of the model the request
    names (?model=, as FastPredict): exactly one file in the multipart field `field`, read by the
    code training read its images with. (BentoML 1.4 answers 500 when binary data arrives under an
    unexpected field: it tries to decode it as JSON.)"""

    def __init__(self, app, route: str, field: str, registry):
        self.app, self.route, self.field, self.registry = app, route, field, registry

    async def __call__(self, scope, receive, send):
        if not _posted_to(scope, self.route):
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:
            return

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        if _content_type(scope) != b"multipart/form-data":
            return await reply(send, 400, f"upload the image as multipart/form-data in the field "
                                           f"{self.field!r}")
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart: the parser's own words name the problem
            return await reply(send, 400, f"malformed multipart body: {e}")
        fields = list(form.keys())
        ok = fields == [self.field] and isinstance(form[self.field], UploadFile)
        data = await form[self.field].read() if ok else b""
        await form.close()
        if not ok:
            return await reply(send, 400, f"expected one file in the multipart field {self.field!r}, "
                                           f"got field(s): {', '.join(fields) or 'none'}")
        scorer, error = scorer_or_reply(self.registry, scope)
        if error:
            return await reply(send, *error)
        await send_json(send, *scorer.answer_image(data))
