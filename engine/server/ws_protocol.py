"""The websocket protocol our servers run under uvicorn (the engine server's, and the studio's, which
Gradio starts): uvicorn's websockets (sans-I/O) protocol, with the opening handshakes it leaves hanging
answered and closed.

websockets' parser answers a handshake whose request line or headers are too long (414 / 431) or which
is not HTTP at all by queueing its response, or an end of stream, and raising no event; uvicorn's protocol
only acts on events, so it never wrote that response: the client waited until it gave up, and the
connection, still open, made uvicorn's shutdown fail (it then tried to send a 500 on it).

A peer that reads nothing is not read from either (HandshakeAnsweringProtocol.pause_writing): websockets answers
every ping with a pong by itself, and uvicorn wrote those pongs without flow control, so a client that sent pings and
read nothing grew the server's write buffer by what it sent (200 MB in 40 s on loopback) until its connection closed.

The engine server's protocol (OpenAIErrorsWebSocketProtocol) also answers those refusals in OpenAI's error body.
"""

from __future__ import annotations

import dataclasses
import json
from email.utils import formatdate
from http import HTTPStatus

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from engine.server.limits import CHUNKS_BEFORE_AVERAGE
from engine.server.lingering import LingersAfterAnswer
from engine.server.protocol import ApiError
from engine.server.small_reads import PacesSmallReads
from engine.server.stalled_peers import CutsOffStalledPeers


class HandshakeAnsweringProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_complete and self.conn.handshake_exc is not None:
            self.refuse_handshake()

    def refuse_handshake(self) -> None:
        """Send what the parser queued (its 414 / 431 answer, or nothing for a request that is not HTTP)
        and close; marked complete so that shutdown sends nothing more on it."""
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.handshake_complete = True
        self.close_sent = True
        self.close_after_refusal()

    def close_after_refusal(self) -> None:
        self.transport.close()

    # flow control: while the peer reads nothing of what we write (the transport's buffer is past its high-water
    # mark), its frames are not read either, so the pongs websockets answers its pings with cannot pile up here
    def pause_writing(self) -> None:
        super().pause_writing()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:  # (uvicorn's own pause: a message waits for the app to take it)
            self.transport.resume_reading()

    async def receive(self):
        message = await super().receive()  # (uvicorn resumes reading once the app has taken every message)
        if not self.writable.is_set():
            self.transport.pause_reading()
        return message


def make_uvicorn_default() -> None:
    """Make this uvicorn's "auto" websocket protocol, for a server that others configure (Gradio's launch
    gives no choice of protocol). Call before that server starts."""
    from uvicorn import config  # noqa: PLC0415

    config.WS_PROTOCOLS["auto"] = f"{__name__}:{HandshakeAnsweringProtocol.__name__}"


# the codes of the handshake refusals websockets makes itself (any other is a handshake that is not valid)
HANDSHAKE_REFUSAL_CODES = {405: "method_not_allowed", 414: "request_header_fields_too_large",
                           431: "request_header_fields_too_large", 500: "server_error"}
WEBSOCKETS_PREFIX = "Failed to open a WebSocket connection: "  # (what websockets' refusals begin with)
# the reason of the disconnect the app is told of when the client's close frame had a reason that is not UTF-8
# (closed with 1007, RFC 6455 §7.1.6 and §8.1), which the app otherwise could not tell from a text frame's
CLOSE_REASON_NOT_UTF8 = "the client's close frame had a reason that is not UTF-8"


def in_openai_shape(reject):
    """websockets' `ServerProtocol.reject` (a handshake refusal with a plain-text body) giving the same refusal
    with OpenAI's error body: its status kept, the code from HANDSHAKE_REFUSAL_CODES, its text as the message."""
    def reject_in_openai_shape(status, text: str) -> Response:
        response = reject(status, text)
        code = HANDSHAKE_REFUSAL_CODES.get(response.status_code, "invalid_http_request")
        message = text.removeprefix(WEBSOCKETS_PREFIX).strip().rstrip(".") or response.reason_phrase
        err = ApiError(f"the websocket opening handshake was refused: {message}", code=code,
                       status=response.status_code)
        body = json.dumps({"error": err.to_openai()}).encode()
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body)))):
            del response.headers[name]  # (websockets' Headers adds a value on assignment)
            response.headers[name] = value
        if response.status_code == 405:
            response.headers["Allow"] = "GET"  # (RFC 9110 §15.5.6: a websocket opens with GET only)
        return dataclasses.replace(response, body=body)

    return reject_in_openai_shape


class OpenAIErrorsWebSocketProtocol(LingersAfterAnswer, CutsOffStalledPeers, PacesSmallReads,
                                    HandshakeAnsweringProtocol):
    """The engine server's: every opening handshake websockets refuses itself (a method other than GET, a
    missing or unsupported Sec-WebSocket-Version or -Key, a request line or headers too long) is answered with
    OpenAI's error body, not websockets' plain text, as the HTTP protocol answers (engine.server.http_protocol). A
    session whose client reads nothing is cut off (CutsOffStalledPeers), which closes the session. A handshake the
    app refuses (its denial response: 401, 404, 503 at the session cap), or websockets does (405, 400, 414, 431), is
    followed by the end of our side of the stream, not a close (LingersAfterAnswer): a client that sent its first frames right after its handshake met a
    reset instead of the answer. A frame trickled in small reads is read at a bounded rate (PacesSmallReads)."""

    def __init__(self, *args, min_chunk_bytes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn.reject = in_openai_shape(self.conn.reject)  # (websockets: "you may modify the response")
        self.min_chunk_bytes = min_chunk_bytes
        self.message_bytes = 0  # of the message whose fragments are coming

    def handle_text(self, event) -> None:
        self.message_bytes = len(event.data)
        super().handle_text(event)

    def handle_bytes(self, event) -> None:
        self.message_bytes = len(event.data)
        super().handle_bytes(event)

    def handle_cont(self, event) -> None:
        """A message's next fragment; the session is closed (1008) once the fragments are too many for their size
        (as a chunked HTTP body's: Limits.min_chunk_bytes): empty continuation frames grew the list of fragments
        without bound, no byte counting against the message limit, each costing the event loop."""
        self.message_bytes += len(event.data)
        fragments = len(self.frames) + 1
        if fragments > CHUNKS_BEFORE_AVERAGE and self.message_bytes < fragments * self.min_chunk_bytes:
            self.frames = []
            self.conn.fail(1008, f"a message in {fragments} fragments of {self.message_bytes // fragments} bytes on "
                                 f"average; send fragments of at least {self.min_chunk_bytes} bytes")
            if self.conn.close_sent is None:  # (before the app accepted the session: no close frame to send)
                self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008})
                self.transport.close()
                return
            self.handle_parser_exception()
            return
        super().handle_cont(event)

    def data_received(self, data: bytes) -> None:
        if not self.dropped_while_lingering(data):
            super().data_received(data)
            if self.conn.reader.buffer:  # (a frame left unfinished: a small read of it is paced, PacesSmallReads)
                self.pace_small_read(len(data))

    def may_resume_reading(self) -> bool:
        return not self.read_paused and self.writable.is_set()  # (the app has taken every message; the peer reads)

    def handle_parser_exception(self) -> None:
        """uvicorn's (the close frame websockets queued is sent, the app told, the connection closed), with the app told
        that the server refused a frame (`refused_frame` in the disconnect: a client's own close with 1002 is not one),
        and which, when it was a close frame whose reason is not UTF-8: websockets decodes no other frame (a text
        frame is decoded by uvicorn, which fails it with 1007 too), and that close was logged as a text frame."""
        close = self.conn.close_sent
        assert close is not None
        reason = CLOSE_REASON_NOT_UTF8 if isinstance(self.conn.parser_exc, UnicodeDecodeError) else close.reason
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": reason,
                               "refused_frame": True})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()

    def handle_connect(self, event: Request) -> None:
        """A handshake websockets refuses (its `accept` answers other than 101) is answered and lingered after, as a
        refusal by the parser is: uvicorn wrote it and closed at once, so the frames a client sent right after its
        handshake met a closed socket and the client a reset instead of the answer."""
        response = self.conn.accept(event)
        if response.status_code == 101:
            accept = self.conn.accept
            self.conn.accept = lambda _request: response  # (uvicorn's handle_connect accepts it again: once is enough)
            try:
                super().handle_connect(event)
            finally:
                self.conn.accept = accept
            return
        self.request, self.response, self.handshake_initiated = event, response, True
        self.conn.send_response(response)
        self.refuse_handshake()

    def close_after_refusal(self) -> None:
        self.close_after_client()

    async def send(self, message) -> None:
        if self.initial_response is None or message["type"] != "websocket.http.response.body" or message.get(
                "more_body", False):
            await super().send(message)
            return
        # the denial's last part: uvicorn would write the answer and close at once; it gathers the body, we answer
        await super().send({**message, "more_body": True})
        status, headers, body = self.initial_response
        response = Response(status, HTTPStatus(status).phrase, Headers(headers), body)
        for name, value in (("Date", formatdate(usegmt=True)), ("Connection", "close"),
                            ("Content-Length", str(len(body)))):
            response.headers.setdefault(name, value)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self.conn.send_response(response)
        self.close_sent = True
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_after_client()
        self.close_timer = self.linger_timer  # (uvicorn closes the transport once the app ends unless a close is timed)
