"""The HTTP protocol the engine server runs under uvicorn: uvicorn's h11 protocol, with a request
that does not parse answered in OpenAI's error body and the status h11 names for it.

uvicorn answers every request h11 refuses (a request line and headers past h11's buffer, a
malformed request line or header) with a plain-text 400 "Invalid HTTP request received.": a
client reading OpenAI's JSON error body found none, and headers too long read as a bad request
rather than 431 (RFC 6585 §5). The connection still closes after the answer, as uvicorn's does.
"""

from __future__ import annotations

import json
import sys

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.server.protocol import ApiError


def parse_error(exc: BaseException | None, max_head_bytes: int) -> ApiError:
    """The error for a request h11 could not parse (`exc`: its RemoteProtocolError, whose
    error_status_hint is 431 for a head past `max_head_bytes`, else 400 or 501)."""
    status = getattr(exc, "error_status_hint", 400)
    if status == 431:
        return ApiError(f"the request line and headers are too long (past {max_head_bytes // 1024} KiB before they "
                        "ended): send shorter or fewer headers, and media in the body",
                        code="request_header_fields_too_large", status=431)
    detail = str(exc)[:120] if exc is not None else ""
    return ApiError(f"the request is not valid HTTP/1.1{': ' + detail if detail else ''}",
                    code="invalid_http_request", status=status)


class OpenAIErrorsH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this while it handles h11's RemoteProtocolError: that error's status and
        OpenAI's body, then the connection closes."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        err = parse_error(sys.exc_info()[1], limit)
        body = json.dumps({"error": err.to_openai()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=err.status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
