"""ASGI middleware that answers bad uploads with a 4xx before BentoML's own parsing sees them."""
from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.requests import Request

UPLOAD_ROUTE = "/predict_image"
UPLOAD_FIELD = "image"


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class UploadGuard:
    """BentoML 1.4 answers 500 when binary data arrives under an unexpected multipart field (it
    tries to decode it as JSON). Check the form first: exactly one file in the field `image`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != UPLOAD_ROUTE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, replay)
        if request.headers.get("content-type", "").split(";")[0].strip() != "multipart/form-data":
            return await _reply(send, 415, f"upload the image as multipart/form-data in the field "
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
