"""How the studio's web server (the uvicorn Gradio starts) answers a request it cannot parse: with the status h11
names for it and one plain sentence saying what was wrong.

uvicorn answers every request h11 refuses with "400 Invalid HTTP request received.": a request head (request line
and headers) that outgrew h11's buffer before it ended (a browser's pile of cookies for the Space's domain, a proxy's
headers) was called a bad request instead of 431 (RFC 6585 §5), and nothing said what to change. Install it with
`make_studio_http_default()` before Gradio starts its server (launch.py does).
"""

from __future__ import annotations

import sys
from http import HTTPStatus

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TOO_LONG = 431  # h11's error_status_hint for a head past its buffer (else 400, or 501 for a Transfer-Encoding)
DETAIL_CHARS = 120  # how much of h11's own words the answer repeats


def unparsable_request_text(status: int, head_limit_bytes: int, exc: BaseException | None) -> str:
    """The answer's body for a request h11 refused with `status` (its RemoteProtocolError `exc`)."""
    said = f"{status} {HTTPStatus(status).phrase}"
    if status == HEAD_TOO_LONG:
        return (f"{said}: the request line and headers passed "
                f"{head_limit_bytes // 1024} KiB before they ended. In a browser: clear this site's cookies, then "
                "reload; behind a proxy: send fewer or shorter headers.\n")
    detail = str(exc)[:DETAIL_CHARS] if exc is not None else ""
    return f"{said}: the request is not valid HTTP/1.1{': ' + detail if detail else ''}.\n"


class ClearErrorsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a request that does not parse answered with h11's status and a short plain-text
    reason (the connection still closes after it, as uvicorn's does)."""

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this while it handles h11's RemoteProtocolError (sys.exc_info() holds it)."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        body = unparsable_request_text(status, limit, exc).encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        reason = HTTPStatus(status).phrase.encode()
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def make_studio_http_default() -> None:
    """Make ClearErrorsH11Protocol uvicorn's "auto" HTTP protocol (Gradio's launch gives no choice of protocol; with
    httptools installed, as on some hosts, "auto" would otherwise be httptools, which answers the same plain 400).
    Call before the server starts."""
    from uvicorn import config  # noqa: PLC0415

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{ClearErrorsH11Protocol.__name__}"
