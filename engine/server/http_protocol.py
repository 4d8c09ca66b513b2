"""The HTTP protocol the engine server runs under uvicorn: uvicorn's h11 protocol, with a request
that does not parse answered in OpenAI's error body and the status h11 names for it.

uvicorn answers every request h11 refuses (a request line and headers past h11's buffer, a
malformed request line or header) with a plain-text 400 "Invalid HTTP request received.": a
client reading OpenAI's JSON error body found none, and headers too long read as a bad request
rather than 431 (RFC 6585 §5). The connection still closes after the answer, as uvicorn's does.
A request head that never arrives whole is timed (OpenAIErrorsH11Protocol.head_timeout_s).
"""

from __future__ import annotations

import asyncio
import json
import sys

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.server.protocol import ApiError
from engine.server.stalled_peers import CutsOffStalledPeers


def parse_error(exc: BaseException | None, max_head_bytes: int) -> ApiError:
    """The error for a request h11 could not parse (`exc`: its RemoteProtocolError, whose
    error_status_hint is 431 for a head past `max_head_bytes`, else 400 or 501)."""
    status = getattr(exc, "error_status_hint", 400)
    if status == 431:
        return ApiError(f"the request line and headers are too long (past {max_head_bytes // 1024} KiB before they "
                        "ended): send shorter or fewer headers, and media in the body",
                        code="request_header_fields_too_large", status=431)
    detail = str(exc)[:120] if exc is not None else ""
    # (a 501 is h11's for a Transfer-Encoding other than chunked: the client's request, not a server fault)
    return ApiError(f"the request is not valid HTTP/1.1{': ' + detail if detail else ''}",
                    code="invalid_http_request", status=status, kind="invalid_request_error")


class OpenAIErrorsH11Protocol(CutsOffStalledPeers, H11Protocol):
    """`head_timeout_s`: how long a connection may take to send a request's whole head (from its opening, or from
    the previous answer). uvicorn waits for a head forever: a client that connected and sent part of a request
    line, or nothing, held its connection (and a file descriptor) for good, and enough of them starve the server.
    A head cut off so is answered 408 in OpenAI's body; a connection that sent nothing is closed. A connection whose
    client reads nothing of its answer is cut off (CutsOffStalledPeers)."""

    def __init__(self, *args, head_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.time_the_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.time_the_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.time_the_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def time_the_head(self) -> None:
        """The head timer runs while the connection owes a request head (h11: the client's side is IDLE)."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self.stop_head_timer()
        elif self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_timed_out)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if not self.conn.trailing_data[0]:  # nothing of a request came: closed as an idle keep-alive connection is
            self.transport.close()
            return
        self.answer_and_close(ApiError(f"the request's head did not arrive whole within {self.head_timeout_s:g} s "
                                       "(its request line and headers stopped before their blank line): send the "
                                       "whole request", code="request_timeout", status=408))

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this while it handles h11's RemoteProtocolError: that error's status and
        OpenAI's body, then the connection closes."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.answer_and_close(parse_error(sys.exc_info()[1], limit))

    def answer_and_close(self, err: ApiError) -> None:
        body = json.dumps({"error": err.to_openai()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"x-should-retry", b"false")]  # (the same request meets the same answer)
        for event in (h11.Response(status_code=err.status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
