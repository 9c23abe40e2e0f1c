"""Request body size limits, enforced while the body is read.

FastAPI reads a JSON body whole, and Starlette spools a whole multipart upload to a temporary file, before
any route code can look at its size: a client could make the server take in gigabytes only to be told no
after. BodyLimit counts the bytes as they arrive and stops at the limit: a declared Content-Length over it is
refused before a byte is read, a streamed (chunked) body as soon as it passes it. Either way the answer is
a 413 JSON error, never whatever the app made of a body cut short.
"""
from __future__ import annotations

from typing import Callable

from ..spec import MAX_SPEC_BYTES
from .http_errors import error_response

MAX_BODY_BYTES = MAX_SPEC_BYTES          # a job spec, a batch request: far below this
MULTIPART_OVERHEAD_BYTES = 2**20         # an upload's form headers and its `purpose` field


def body_limit_for(path: str) -> tuple[int, str]:
    """(limit in bytes, what to say when over it) for a request to `path`."""
    if path.rstrip("/") == "/v1/files":
        from . import openai_batch           # read at request time: tests lower it

        limit = openai_batch.MAX_UPLOAD_BYTES
        return (limit + MULTIPART_OVERHEAD_BYTES,
                f"file is larger than {limit // 2**20} MiB; split it into several batches")
    return MAX_BODY_BYTES, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a 413 for a request whose body passes body_limit_for(path), counted while it is read."""

    def __init__(self, app, limit_for: Callable[[str], tuple[int, str]] = body_limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(scope, receive, send, message)
            return
        received, over, started = 0, False, False

        async def counted_receive():
            nonlocal received, over
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    over = True
                    raise _TooLarge()
            return event

        async def guarded_send(event):
            nonlocal started
            if over:
                return      # what the app answers to a body cut short is replaced by the 413 below
            if event["type"] == "http.response.start":
                started = True
            await send(event)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await _send_413(scope, receive, send, message)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(scope, receive, send, message: str) -> None:
    await error_response(413, message, "invalid_request_error")(scope, receive, send)
