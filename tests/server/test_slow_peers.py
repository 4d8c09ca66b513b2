"""Clients that read nothing of what the server writes: the server's memory stays bounded and, past
Limits.slow_reader_timeout_s, their connection is cut and what it held is freed. One fake-engine server for
the file; each client's side of the connection has a small receive window, and the server's socket for it a
small send buffer, so its window fills in milliseconds (as a real network's does after a few MB)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import httpx
import pytest

from engine.events import Done, TextDelta
from tests.server import FakeEngine, fake_server, wait_for

SMALL_WINDOW = 4096  # bytes: the kernel buffers of a stalled connection, on both sides
MiB = 1024 * 1024
STALLED_S = 0.5  # the server's slow_reader_timeout_s here
LONG_REPLY = [TextDelta("x" * 4000)] * 100 + [Done("x" * 400_000, "stop")]  # 400 KB: far past both windows


@pytest.fixture(scope="module")
def server():
    with fake_server(FakeEngine(LONG_REPLY), slow_reader_timeout_s=STALLED_S) as srv:
        yield srv


def server_side(srv, client: socket.socket):
    """The server's protocol object for `client`'s connection (uvicorn's), its socket's send buffer made small."""
    port = client.getsockname()[1]
    proto = wait_for(lambda: next((c for c in list(srv.server.server_state.connections)
                                   if c.transport.get_extra_info("peername")[1] == port), None))
    proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_WINDOW)
    return proto


def stalled_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW)  # (before connecting: the window it offers)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def open_websocket(port: int) -> socket.socket:
    s = stalled_socket(port)
    s.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert s.recv(12) == b"HTTP/1.1 101"
    return s


def masked_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # (a mask of zeros)


def text_frame(event: dict) -> bytes:
    payload = json.dumps(event).encode()
    assert 126 <= len(payload) < 65536
    return bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


def cut_off(srv, proto) -> bool:
    """The server dropped the connection of `proto` (its client reading nothing meanwhile), within 10 s."""
    return wait_for(lambda: proto not in srv.server.server_state.connections, 10)


def stalled_readers(srv) -> int:
    return httpx.get(srv.url + "/health").json()["client_aborts"]["stalled_reader"]


def send_for(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send `data` over and over for `seconds` (or until the peer stops taking it); the bytes sent."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(data)
        except BlockingIOError:
            time.sleep(0.005)
    sock.setblocking(True)
    return sent


def test_a_ping_flood_that_reads_no_pong_does_not_grow_the_servers_memory(server):
    sock = open_websocket(server.port)
    proto = server_side(server, sock)
    proto.stalled_peer_s = 60  # (this connection is not cut off while its flood is measured)
    pings = masked_frame(0x9, b"p" * 125) * 64
    sent = send_for(sock, pings, 0.6)
    buffered = proto.transport.get_write_buffer_size()
    sock.close()
    # (before: every ping's pong stayed in the server's buffer, as many bytes as the client sent: megabytes here)
    assert buffered < MiB, f"the server holds {buffered} bytes of pongs after {sent} bytes of pings"


def test_a_stream_whose_client_reads_nothing_is_cut_off_and_its_job_cancelled(server):
    before, jobs = stalled_readers(server), len(server.ctx.scheduler.history)
    sock = stalled_socket(server.port)
    proto = server_side(server, sock)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert cut_off(server, proto)  # (before: held, its answer's task blocked, until the client closed)
    sock.close()
    job = wait_for(lambda: next(iter(list(server.ctx.scheduler.history)[jobs:]), None))
    assert job.finish_reason in ("cancelled", "slow_reader")
    assert stalled_readers(server) == before + 1


def test_a_realtime_session_whose_client_reads_nothing_is_closed(server):
    before = stalled_readers(server)
    sock = open_websocket(server.port)
    proto = server_side(server, sock)
    sock.sendall(text_frame({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi " * 40}]}}))
    sock.sendall(text_frame({"type": "response.create", "response": {"metadata": {"why": "x" * 100}}}))
    assert cut_off(server, proto)
    sock.close()
    wait_for(lambda: not server.ctx.sessions.open)  # (before: its slot was held for max_session_s, an hour)
    assert stalled_readers(server) == before + 1
