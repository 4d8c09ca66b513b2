"""Clients that read nothing of what the server writes: the server's memory stays bounded and, past
Limits.slow_reader_timeout_s, their connection is cut and what it held is freed. One fake-engine server for
the file; each client's side of the connection has a small receive window, and the server's socket for it a
small send buffer, so its window fills in milliseconds (as a real network's does after a few MB)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

import pytest

from tests.server import fake_server, wait_for

SMALL_WINDOW = 4096  # bytes: the kernel buffers of a stalled connection, on both sides
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    with fake_server() as srv:
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
    pings = masked_frame(0x9, b"p" * 125) * 64
    sent = send_for(sock, pings, 0.6)
    buffered = proto.transport.get_write_buffer_size()
    sock.close()
    # (before: every ping's pong stayed in the server's buffer, as many bytes as the client sent: megabytes here)
    assert buffered < MiB, f"the server holds {buffered} bytes of pongs after {sent} bytes of pings"
