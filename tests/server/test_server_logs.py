"""What the server writes to its log (issue 9 §4, §6): the token never appears (access lines of HTTP
and websocket requests, right or wrong tokens), and a client that aborts (a truncated upload, an
invalid UTF-8 websocket frame, a connection reset mid-answer) costs one line, not a stack trace, and
is counted in /health."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from engine.server import Limits, ServerHandle, create_app
from tests.server import (invalid_utf8_frame, raw_frame, reset_mid_stream, tone_pcm16, torch_threads, truncated_upload,
                          wait_for, wav_bytes)

TOKEN = "tok-SECRET-42"
WRONG = "tok-WRONG-77"
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "engine.server")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [logging.Formatter().format(r) for r in self.records]


@contextmanager
def logged_server(engine, token: str | None = None):
    app = create_app(engine, Limits(), token=token)
    capture = Capture()
    with torch_threads(1), ServerHandle(app, log_level="info") as srv:
        for name in LOGGERS:
            logging.getLogger(name).addHandler(capture)
        try:
            yield srv, capture
        finally:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(capture)


def test_redaction_of_tokens_in_urls():
    from engine.server.auth import redact_token

    assert redact_token("GET /v1/models?token=abc HTTP/1.1") == "GET /v1/models?token=[redacted] HTTP/1.1"
    assert redact_token("/v1/realtime?model=x&TOKEN=a%2Bb&y=1") == "/v1/realtime?model=x&TOKEN=[redacted]&y=1"
    assert redact_token("no secret here; mytoken=1") == "no secret here; mytoken=1"


def test_the_token_is_never_written_to_the_log(tiny_engine):
    with logged_server(tiny_engine, TOKEN) as (srv, capture):
        assert httpx.get(srv.url + f"/v1/models?token={TOKEN}").status_code == 200
        assert httpx.get(srv.url + f"/v1/models?x=1&token={WRONG}").status_code == 401
        r = httpx.post(srv.url + f"/v1/chat/completions?token={TOKEN}", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200
        assert httpx.get(srv.url + f"/nowhere?token={TOKEN}").status_code == 404
        with connect(srv.ws_url + f"?token={TOKEN}") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with pytest.raises(InvalidStatus):
            connect(srv.ws_url + f"?token={WRONG}").close()
        wait_for(lambda: sum("WebSocket" in line for line in capture.lines) >= 2, 5)
        time.sleep(0.2)
    text = "\n".join(capture.lines)
    assert "/v1/models?token=[redacted]" in text and "/v1/realtime?token=[redacted]" in text
    assert TOKEN not in text and WRONG not in text


def test_client_aborts_cost_one_line_each_and_are_counted(tiny_engine):
    with logged_server(tiny_engine) as (srv, capture):
        before = httpx.get(srv.url + "/health").json().get("client_aborts", {})
        truncated_upload(srv.port, "/v1/chat/completions", b"application/json", b'{"messages": [')
        truncated_upload(srv.port, "/v1/audio/transcriptions", b"multipart/form-data; boundary=zz",
                         b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
                         + wav_bytes(tone_pcm16(0.2)))
        closing = invalid_utf8_frame(srv.port)
        assert b"\x88\x02\x03\xef" in closing  # closed with 1007 (invalid frame payload data), as RFC 6455 says
        closing = raw_frame(srv.port, b"\x03\xe8\xff\xfe", opcode=0x8)  # a close frame's reason
        assert closing[closing.index(b"\x88"):][2:4] == b"\x03\xef"  # 1007 too (RFC 6455 §7.1.6)
        closing = raw_frame(srv.port, b"x", opcode=0x3)  # a reserved opcode
        assert closing[closing.index(b"\x88"):][2:4] == (1002).to_bytes(2, "big")  # a protocol error
        reset_mid_stream(srv.port)
        wait_for(lambda: srv.ctx.scheduler.running == 0 and srv.ctx.scheduler.waiting == 0, 30)
        time.sleep(0.3)
        tracebacks = [r for r in capture.records if r.exc_info or "Traceback" in r.getMessage()]
        assert tracebacks == [], [logging.Formatter().format(r)[:300] for r in tracebacks]
        after = wait_for(lambda: (lambda h: h if sum(h.values()) - sum(before.values()) >= 6 else None)(
            httpx.get(srv.url + "/health").json().get("client_aborts", {})), 10)
    assert after["truncated_upload"] - before["truncated_upload"] == 2
    assert after["invalid_utf8_frame"] - before["invalid_utf8_frame"] == 2
    assert after["invalid_frame"] - before["invalid_frame"] == 1
    assert after["left_mid_response"] - before["left_mid_response"] == 1
    aborts = [line for line in capture.lines if "client abort" in line]
    assert len(aborts) == sum(after.values()) - sum(before.values()) == 6, capture.lines
    assert all("\n" not in line for line in aborts)
    frames = [line for line in aborts if "invalid_utf8_frame" in line]  # each logged as the frame it was
    assert sum("a text frame that is not UTF-8" in line for line in frames) == 1, frames
    assert sum("a close frame whose reason is not UTF-8" in line for line in frames) == 1, frames
    refused = [line for line in aborts if "(invalid_frame)" in line]
    assert len(refused) == 1 and "invalid opcode" in refused[0] and "1002" in refused[0], refused
