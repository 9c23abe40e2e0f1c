"""Errors as the API answers them: JSON in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with a
one-line message. Its own module so that the jobs routes (app.py) and the OpenAI batch routes
(openai_batch.py) share it without importing each other."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from ..redact import mask_text


class ApiError(Exception):
    """An HTTP error with a one-line message (raised by route code for cases with no ZiyaBatchError)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    # one line, whatever a client put into the ids and values we echo back; every URL in it masked (a message may
    # quote a URL with a password, or a library's text naming the server's own storage endpoint with one)
    message = mask_text(message.replace("\r", "\\r").replace("\n", "\\n"))
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)
