"""The HTTP protocol the engine server runs under uvicorn: uvicorn's h11 protocol, with a request
that does not parse answered in OpenAI's error body and the status h11 names for it.

uvicorn answers every request h11 refuses (a request line and headers past h11's buffer, a
malformed request line or header) with a plain-text 400 "Invalid HTTP request received.": a
client reading OpenAI's JSON error body found none, and headers too long read as a bad request
rather than 431 (RFC 6585 §5). The connection still closes after the answer, as uvicorn's does.
A request head that never arrives whole is timed (OpenAIErrorsH11Protocol.head_timeout_s), and the
connections the server holds are bounded (OpenAIErrorsH11Protocol.max_connections).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.server.http_api import retry_headers
from engine.server.limits import CHUNKS_BEFORE_AVERAGE, READS_BEFORE_AVERAGE
from engine.server.lingering import LingersAfterAnswer
from engine.server.protocol import ApiError
from engine.server.small_reads import PacesSmallReads
from engine.server.stalled_peers import CutsOffStalledPeers


def parse_error(exc: BaseException | None, max_head_bytes: int, head: bytes = b"") -> ApiError:
    """The error for a request h11 could not parse (`exc`: its RemoteProtocolError, whose
    error_status_hint is 431 for a head past `max_head_bytes`, else 400 or 501; `head`: what came of the request's
    head)."""
    status = getattr(exc, "error_status_hint", 400)
    codings = transfer_codings(head)
    if codings and head.split(b"\n", 1)[0].rstrip().endswith(b"HTTP/1.0"):
        return http10_transfer_encoding()
    if status == 501 and "chunked" in codings and (codings[-1] != "chunked" or codings.count("chunked") > 1):
        # (RFC 9112 §6.3, §7.1: h11 refuses any Transfer-Encoding but a lone chunked with a 501, which says the server
        # lacks a coding, where these are requests with no body length to tell)
        return ApiError(f"the request's Transfer-Encoding is '{', '.join(codings)}': chunked must be its last coding, "
                        "applied once, or where its body ends cannot be told; send 'Transfer-Encoding: chunked' alone",
                        code="invalid_http_request", status=400)
    if status == 431:
        return ApiError(f"the request line and headers are too long (past {max_head_bytes // 1024} KiB before they "
                        "ended): send shorter or fewer headers, and media in the body",
                        code="request_header_fields_too_large", status=431)
    detail = str(exc)[:120] if exc is not None else ""
    # (a 501 is h11's for a Transfer-Encoding other than chunked: the client's request, not a server fault)
    return ApiError(f"the request is not valid HTTP/1.1{': ' + detail if detail else ''}",
                    code="invalid_http_request", status=status, kind="invalid_request_error")


def check_head_size(request: h11.Request, max_head_bytes: int) -> None:
    """RemoteProtocolError (431, parse_error) for a request whose head, written plainly, passes `max_head_bytes`. h11
    holds a head to its limit only while the head is incomplete: one that came whole in a single read (60 KB of
    headers sent at once) was served, the same head sent in pieces refused."""
    size = (len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
            + sum(len(name) + len(value) + len(b": \r\n") for name, value in request.headers) + len(b"\r\n"))
    if size > max_head_bytes:
        raise h11.RemoteProtocolError(f"a request head of {size} bytes", error_status_hint=431)


TRANSFER_ENCODING = b"transfer-encoding:"


def http10_transfer_encoding() -> ApiError:
    """The refusal of an HTTP/1.0 request with a Transfer-Encoding (any coding): HTTP/1.0 has none, and RFC 9112 §6.1
    says a server must treat its framing as faulty and close (a chunked one was read as 1.1's and served)."""
    return ApiError("the request is HTTP/1.0 with a Transfer-Encoding, which HTTP/1.0 does not have, so where its body "
                    "ends cannot be told: send it over HTTP/1.1, or with a Content-Length",
                    code="invalid_http_request", status=400)


def transfer_codings(head: bytes) -> list[str]:
    """The transfer codings a request head's Transfer-Encoding lines name, in order ('chunked', ...), lower case."""
    lines = (line.strip() for line in head.split(b"\n"))
    values = (line[len(TRANSFER_ENCODING):] for line in lines if line.lower().startswith(TRANSFER_ENCODING))
    return [coding.strip().lower().decode("latin-1") for value in values for coding in value.split(b",")
            if coding.strip()]


def client_host(connection) -> str:
    """The client address of a uvicorn connection (HTTP or websocket protocol); '' when it has none (a unix socket)."""
    return connection.client[0] if getattr(connection, "client", None) else ""


class ClosesAfterClient:
    """The transport a request's answer is written to (uvicorn's RequestResponseCycle.transport): the close that follows
    an answer that ends the connection (a refusal with 'Connection: close', a 500) lingers when the request's body is
    still owed (LingersAfterAnswer), else closes. Closed at once with the body still coming, the connection was reset
    and the client met 'broken pipe' instead of the answer."""

    def __init__(self, protocol: "OpenAIErrorsH11Protocol"):
        self.protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self.protocol.transport, name)

    def close(self) -> None:
        if self.protocol.conn.their_state is h11.SEND_BODY:
            self.protocol.close_after_client()
        else:
            self.protocol.transport.close()


class OpenAIErrorsH11Protocol(LingersAfterAnswer, CutsOffStalledPeers, PacesSmallReads, H11Protocol):
    """`head_timeout_s`: how long a connection may take to send a request's whole head (from its opening, or from
    the previous answer). uvicorn waits for a head forever: a client that connected and sent part of a request
    line, or nothing, held its connection (and a file descriptor) for good, and enough of them starve the server.
    A head cut off so is answered 408 in OpenAI's body; a connection that sent nothing is closed. A connection whose
    client reads nothing of its answer is cut off (CutsOffStalledPeers).

    `max_connections`: the connections (HTTP and websocket) the server holds. uvicorn took every one: a client opening
    thousands of keep-alive connections held a file descriptor each until they idled out, and the server then could
    accept no one. Past the limit an idle connection (kept alive, owing no request) of the client address holding the
    most connections is closed, as a client expects a kept-alive connection may be (make_room); with none that may be,
    the new connection's request is answered 503 (too_many_connections, Retry-After) and it closes. `on_full(what)` is
    told of each (None: no one is)."""

    def __init__(self, *args, head_timeout_s: float, max_connections: int, min_chunk_bytes: int,
                 on_full: Callable[[str], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_chunk_bytes = min_chunk_bytes
        self.body_chunks = self.body_bytes = 0  # of the chunked body being read
        self.body_reads = self.body_read_bytes = 0  # the reads of the body being read (chunked or not), their bytes
        self.body_refusal: ApiError | None = None
        self.conn.next_event = self.counting_chunks(self.conn.next_event)
        self.head_timeout_s = head_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None
        self.max_connections = max_connections
        self.on_full = on_full
        self.idle_since: float | None = None  # (loop time) kept alive, owing no request: may be closed to make room
        self.refusal: ApiError | None = None  # past the limit with no connection idle: its request's answer
        self.head_received = bytearray()  # what came of the request head now owed (for a refusal's message)
        self.head_begun_kept = False  # whether head_received holds what came of it before its first read

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.make_room()
        self.time_the_head()

    def make_room(self) -> None:
        """Close an idle connection of the client address holding the most connections (of its idle ones, the one idle
        longest), or refuse this one's request when no address holding at least as many as this one's has one idle.
        Closing the connection idle longest of all let one address's flood close a light client's kept-alive
        connection between two of its requests; a flood now makes room among its own connections."""
        held = Counter(client_host(c) for c in self.connections)
        mine = held[client_host(self)]
        idle = [c for c in self.connections if isinstance(c, OpenAIErrorsH11Protocol) and c is not self
                and c.idle_since is not None and not c.transport.is_closing() and held[client_host(c)] >= mine]
        if idle:
            victim = min(idle, key=lambda c: (-held[client_host(c)], c.idle_since))
            victim.transport.close()
            self.tell(f"{len(self.connections) - 1} connections were open, the limit is {self.max_connections}: one "
                      f"of {held[client_host(victim)]} from {client_host(victim)}, idle "
                      f"{self.loop.time() - victim.idle_since:.1f} s, was closed")
            return
        self.refusal = ApiError(f"the server holds {len(self.connections) - 1} connections, its limit, and none that "
                                "could make room is idle; try again shortly", code="too_many_connections", status=503)
        self.tell(f"{len(self.connections) - 1} connections were open, the limit is {self.max_connections}, none "
                  f"idle from an address holding as many as {client_host(self)} ({mine}): a new one was refused (503)")

    def tell(self, what: str) -> None:
        if self.on_full is not None:
            self.on_full(what)

    def data_received(self, data: bytes) -> None:
        if self.dropped_while_lingering(data):
            return
        if self.refusal is not None:
            self.refuse_request(data)
            return
        self.keep_head(data)
        if self.conn.their_state is h11.SEND_BODY:
            self.body_reads += 1
            self.body_read_bytes += len(data)
        answered_early = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        super().data_received(data)  # (uvicorn's cancels the keep-alive wait: data came)
        if self.conn.their_state is h11.SEND_BODY:  # (a body still owed: a read that ended it delays nothing)
            self.pace_small_read(len(data))
        head_under_way = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if not head_under_way:  # (the next head starts afresh)
            self.head_received.clear()
        if answered_early and self.conn.their_state is h11.IDLE and not head_under_way:
            self.wait_for_next_request()
        self.time_the_head()

    def counting_chunks(self, next_event):
        """h11's next_event, keeping what came of a request head before its first read (keep_head_begun), refusing
        a head past h11's limit that came whole in one read (check_head_size), and refusing a chunked body whose chunks average under `min_chunk_bytes` once
        CHUNKS_BEFORE_AVERAGE have come: each chunk costs the event loop its parsing (a 1 MiB body sent a byte a chunk
        held it 27 s, every other connection waiting)."""

        def next_event_counted():
            self.keep_head_begun()
            event = next_event()
            if isinstance(event, h11.Request):
                self.body_chunks = self.body_bytes = self.body_reads = self.body_read_bytes = 0
                self.head_begun_kept = False
                check_head_size(event, self.max_head_bytes())
            elif isinstance(event, h11.Data):
                self.check_reads()
                if event.chunk_end:
                    self.count_chunk(len(event.data))
            return event

        return next_event_counted

    def count_chunk(self, size: int) -> None:
        """One more chunk of the body (of `size` bytes, counted at its end); RemoteProtocolError, with body_refusal
        its answer, once the chunks are too many for their size."""
        self.body_chunks += 1
        self.body_bytes += size
        if self.body_chunks > CHUNKS_BEFORE_AVERAGE and self.body_bytes < self.body_chunks * self.min_chunk_bytes:
            average = self.body_bytes // self.body_chunks
            self.body_refusal = ApiError(
                f"the request's body came in {self.body_chunks} chunks of {average} bytes on average; send chunks of "
                f"at least {self.min_chunk_bytes} bytes, or the body with a Content-Length", code="chunks_too_small")
            raise h11.RemoteProtocolError(self.body_refusal.message, error_status_hint=400)

    def check_reads(self) -> None:
        """RemoteProtocolError, with body_refusal its answer, for a body (with a Content-Length or chunked) whose
        reads average under `min_read_bytes` once READS_BEFORE_AVERAGE have come: each read costs the event loop a
        wake-up and h11's parsing, and 4 clients sending a body a byte a packet took 40-70 % of a core."""
        if self.body_reads > READS_BEFORE_AVERAGE and self.body_read_bytes < self.body_reads * self.min_read_bytes:
            self.body_refusal = ApiError(
                f"the request's body came in {self.body_reads} pieces of {self.body_read_bytes // self.body_reads} "
                f"bytes on average; the server takes a body in pieces of at least {self.min_read_bytes} bytes on "
                "average (Limits.min_read_bytes): send it in larger writes", code="body_pieces_too_small")
            raise h11.RemoteProtocolError(self.body_refusal.message, error_status_hint=400)

    def may_resume_reading(self) -> bool:
        return not self.flow.read_paused  # (uvicorn's flow control: the app has not taken what was read)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle.transport is self.transport:  # (a request's cycle, just made)
            self.cycle.transport = ClosesAfterClient(self)

    def keep_head_begun(self) -> None:
        """At the first read of a request head: keep what came of it already (in the same read as the previous
        request's body, or while its answer was under way, when keep_head kept nothing: its refusal was h11's 501)."""
        if self.conn.their_state is h11.IDLE and not self.head_begun_kept:
            self.head_received[:] = self.conn.trailing_data[0][:self.max_head_bytes() + 1]
            self.head_begun_kept = True

    def keep_head(self, data: bytes) -> None:
        """Keep what comes while a request head is owed (up to h11's limit on a head), so that a head h11 refuses can be
        answered with what was wrong in it."""
        if self.conn.their_state is not h11.IDLE:
            return
        room = self.max_head_bytes() + 1 - len(self.head_received)
        if room > 0:
            self.head_received += data[:room]

    def max_head_bytes(self) -> int:
        return self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE

    def wait_for_next_request(self) -> None:
        """The body owed after an early answer has come and the connection is idle: the keep-alive wait starts now
        (uvicorn starts it at an answer only, and the body's data cancelled it: the idle connection was held until the
        head timer)."""
        if not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def refuse_request(self, data: bytes) -> None:
        """A refused connection's request: answered with the refusal once its head has come whole (answered before,
        it could be lost to the reset a close with unread data makes), then closed."""
        self.conn.receive_data(data)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            event = None
        if event is h11.NEED_DATA:
            return
        if isinstance(event, h11.Request):
            self.answer_and_close(self.refusal)
        else:
            self.transport.close()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        """A websocket opening handshake: over HTTP/1.1 only (RFC 6455 §4.1). uvicorn rewrote any request line to
        HTTP/1.1 before websockets read it, so one naming HTTP/1.0 or HTTP/2.0 opened a session. What came after the
        handshake's head (frames a client sent without waiting for the 101) goes to the websocket too."""
        if event.http_version != b"1.1":
            version = event.http_version.decode("ascii", "replace")
            self.answer_and_close(ApiError(
                f"the websocket handshake is HTTP/{version}; a websocket opens with an HTTP/1.1 GET (RFC 6455)",
                code="invalid_http_request", status=505 if version > "1.1" else 400))
            return
        sent_after_head = self.conn.trailing_data[0]
        super().handle_websocket_upgrade(event)
        if sent_after_head:  # (uvicorn hands the websocket protocol the head alone: frames sent with it were lost)
            self.transport.get_protocol().data_received(sent_after_head)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # answered before its body was read (a 413 by its Content-Length, a 401, a 415): uvicorn reads on for
            # the rest, which a client trickling a byte now and then made last for ever, its connection never idle;
            # the rest must come within the linger, and only the linger bounds it (uvicorn's keep-alive wait, started
            # at the answer, closed a connection whose body came later). (Closed at the answer, a client that sent its
            # body at once and kept the connection alive, as the answer let it, met a closed connection at its next
            # request.)
            self._unset_keepalive_if_required()
            self.loop.call_later(self.linger.seconds, self.close_if_body_still_owed, self.cycle)
            return
        self.time_the_head()

    def close_if_body_still_owed(self, cycle) -> None:
        """The linger after an answer given before its request's body was read is over: close unless that body has
        come (the connection went on to its next request, or is idle)."""
        if self.cycle is cycle and self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def time_the_head(self) -> None:
        """The head timer runs while the connection owes a request head (h11: the client's side is IDLE)."""
        owes_head = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        idle = owes_head and not self.conn.trailing_data[0] and self.refusal is None
        self.idle_since = (self.idle_since or self.loop.time()) if idle else None
        if not owes_head:
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
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # (answered already: a body after an early answer)
            self.close_after_client()
            return
        self.answer_and_close(self.body_refusal or parse_error(sys.exc_info()[1], self.max_head_bytes(),
                                                                bytes(self.head_received)))

    def answer_and_close(self, err: ApiError) -> None:
        if self.cycle is not None and not self.cycle.response_started:  # (the app reading the body: the answer is ours,
            self.cycle.disconnected = self.cycle.response_complete = True  # and shutdown need not wait for the app's)
            self.cycle.message_event.set()
        body = json.dumps({"error": err.to_openai()}).encode()
        # (a bad request meets the same answer again: not to be retried; a refusal for load: when to try again)
        retry = retry_headers(err.status) or {"x-should-retry": "false"}
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in retry.items())]
        for event in (h11.Response(status_code=err.status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.close_after_client()

    def close_after_client(self) -> None:
        """LingersAfterAnswer's, with the head timer stopped (no request is owed any more)."""
        self.stop_head_timer()
        super().close_after_client()
