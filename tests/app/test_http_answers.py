"""The studio's web server answers a request it cannot parse with h11's status and a plain sentence of why: a request
head past h11's buffer is 431 (uvicorn said '400 Invalid HTTP request received.' to everything), and launch.py makes
it the protocol of the server Gradio starts."""

from __future__ import annotations

import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from app.http_answers import ClearErrorsH11Protocol, make_studio_http_default  # noqa: E402


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture(scope="module")
def studio_port():
    config = uvicorn.Config(hello, host="127.0.0.1", port=0, http=ClearErrorsH11Protocol, log_level="error",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(timeout=5)


def answer(port: int, *parts: bytes) -> bytes:
    """What the server answers to `parts` sent one after another (as a slow client or a proxy sends a long head)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for part in parts:
            s.sendall(part)
            time.sleep(0.05)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_a_request_head_past_the_buffer_is_431_and_says_what_to_do(studio_port):
    got = answer(studio_port, b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 70_000, b"\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), got[:200]
    assert b"16 KiB" in body and b"cookies" in body and len(body) < 400


@pytest.mark.parametrize("request_bytes, status", [(b"HELLO WORLD\r\n\r\n", b"400 Bad Request"),
                                                   (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                                                    b"501 Not Implemented")])
def test_a_request_that_is_not_http_says_so_with_its_status(studio_port, request_bytes, status):
    got = answer(studio_port, request_bytes)
    assert got.startswith(b"HTTP/1.1 " + status) and b"not valid HTTP/1.1" in got, got[:200]


def test_a_request_that_parses_is_served(studio_port):
    got = answer(studio_port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK") and b"hello" in got


def test_launch_makes_it_the_protocol_of_the_server_gradio_starts(monkeypatch):
    from uvicorn import config

    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", config.HTTP_PROTOCOLS["auto"])  # restored after the test
    make_studio_http_default()
    loaded = uvicorn.Config(hello, lifespan="off")  # as Gradio makes it: http="auto"
    loaded.load()
    assert loaded.http_protocol_class is ClearErrorsH11Protocol
