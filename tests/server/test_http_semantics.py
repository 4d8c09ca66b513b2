"""HTTP as a demanding client uses it (beyond the JSON fields): HEAD of a GET resource, a 405 saying
which methods the route takes, a plain HTTP request to the websocket route, a websocket handshake at a path
without one or one websockets refuses, and request bodies sent with a Content-Encoding."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import select
import socket
import time
import zlib
from contextlib import ExitStack

import httpx
import numpy as np
import pytest

from tests.server import FakeEngine, fake_server, handshake_answer, tone_pcm16, wait_for, wav_bytes

WAV = wav_bytes(tone_pcm16(0.5))


@pytest.fixture(scope="module")
def fake():
    with fake_server() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/models/default"])
def test_a_get_resource_answers_head_with_its_status_and_no_body(fake, path):
    got, head = fake.get(path), fake.head(path)
    assert got.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/chat/completions", {"POST"}),
                                                   ("OPTIONS", "/v1/models", {"GET", "HEAD"}),
                                                   ("DELETE", "/health", {"GET", "HEAD"})])
def test_a_method_the_route_does_not_take_is_a_405_that_names_the_ones_it_does(fake, method, path, allowed):
    r = fake.request(method, path)
    assert r.status_code == 405
    assert set(m.strip() for m in r.headers["allow"].split(",")) == allowed
    err = r.json()["error"]
    assert err["code"] == "method_not_allowed" and all(m in err["message"] for m in allowed)


def test_a_plain_http_get_of_the_realtime_route_says_it_needs_a_websocket(fake):
    r = fake.get("/v1/realtime")
    assert r.status_code == 426, r.text
    assert r.headers["upgrade"] == "websocket"
    err = r.json()["error"]
    assert err["code"] == "upgrade_required" and "websocket" in err["message"]


def websocket_handshake(port: int, path: str, method: str = "GET", version: str = "13", extra: str = ""):
    """(status, headers, body) of the server's answer to a websocket opening handshake it refuses (it then
    closes the connection)."""
    request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
               f"Sec-WebSocket-Version: {version}\r\n\r\n")
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/nope", "/v1/realtime/"])
def test_a_websocket_at_a_path_without_one_is_a_404_naming_the_realtime_route(path):
    """A websocket handshake at a path with no websocket route got starlette's 403 with an empty body."""
    with fake_server() as srv:
        status, headers, body = websocket_handshake(srv.port, path)
        err = json.loads(body)["error"]
        assert (status, err["code"]) == (404, "not_found"), body
        assert headers["content-type"] == "application/json"
        assert path in err["message"] and "WS /v1/realtime" in err["message"]
        assert websocket_handshake(srv.port, "/v1/realtime?model=nope")[0] == 404  # (the route itself still answers)


def test_a_websocket_without_the_token_is_refused_as_unauthorized_at_any_path():
    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    with ServerHandle(create_app(FakeEngine(), Limits(), token="sesame")) as srv:
        for path in ("/v1/realtime", "/nope"):
            status, headers, body = websocket_handshake(srv.port, path)
            assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized"), (path, body)
            assert headers["www-authenticate"] == "Bearer"  # (as an HTTP request's 401 says)
        status, _, body = websocket_handshake(srv.port, "/nope", extra="Authorization: Bearer sesame\r\n")
        assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")


def test_an_openai_only_server_says_it_has_no_websocket():
    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    with ServerHandle(create_app(FakeEngine(), Limits(), openai_only=True)) as srv:
        status, _, body = websocket_handshake(srv.port, "/v1/realtime")
        err = json.loads(body)["error"]
        assert (status, err["code"]) == (404, "not_found") and "it serves none" in err["message"]


@pytest.mark.parametrize("method, version, status, code", [("POST", "13", 405, "method_not_allowed"),
                                                           ("GET", "8", 400, "invalid_http_request")])
def test_a_handshake_websockets_refuses_gets_openais_error_body(method, version, status, code):
    """websockets refuses these itself (before the app sees them) with a plain-text body; now OpenAI's."""
    with fake_server() as srv:
        got, headers, body = websocket_handshake(srv.port, "/v1/realtime", method=method, version=version)
        err = json.loads(body)["error"]
        assert (got, err["code"]) == (status, code), body
        assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
        assert not err["message"].startswith("the websocket opening handshake was refused: Failed")
        assert status != 405 or headers["allow"] == "GET"
        assert handshake_answer(srv.port, "/v1/realtime").startswith(b"HTTP/1.1 101")


def test_head_of_a_route_without_get_is_a_405_naming_head(fake):
    r = fake.head("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _post(client, raw: bytes, encoding: str):
    return client.post("/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json", "content-encoding": encoding})


@pytest.mark.parametrize("encoding, compress", [("gzip", lambda b: gzip.compress(b)),
                                                ("deflate", lambda b: zlib.compress(b))])
def test_a_compressed_json_body_is_decoded(fake, encoding, compress):
    r = _post(fake, compress(json.dumps(CHAT).encode()), encoding)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


def test_a_compressed_multipart_upload_is_decoded(fake):
    req = httpx.Request("POST", "http://x/v1/audio/transcriptions", files={"file": ("a.wav", WAV, "audio/wav")})
    body = req.read()
    r = fake.post("/v1/audio/transcriptions", content=gzip.compress(body),
                  headers={"content-type": req.headers["content-type"], "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "fake transcript"


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br"])
def test_a_coding_the_server_does_not_decode_is_a_415_naming_it(fake, encoding):
    r = _post(fake, json.dumps(CHAT).encode(), encoding)  # (a server ignoring the header would take it)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_content_encoding" and encoding in err["message"]


@pytest.mark.parametrize("raw", [b"this is not gzip", gzip.compress(json.dumps(CHAT).encode())[:-12]],
                         ids=["not-gzip", "cut-off"])
def test_a_body_that_does_not_decode_says_so_not_invalid_json(fake, raw):
    r = _post(fake, raw, "gzip")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_content_encoding" and "Content-Encoding" in err["message"]


@pytest.mark.parametrize("encoding, raw", [
    ("gzip", gzip.compress(json.dumps(CHAT).encode()) + gzip.compress(b', "max_tokens": "many"}')),
    ("gzip", gzip.compress(json.dumps(CHAT).encode()) + b"appended"),
    ("deflate", zlib.compress(json.dumps(CHAT).encode()) + b"appended"),
], ids=["second-gzip-member", "gzip-then-bytes", "deflate-then-bytes"])
def test_bytes_after_the_compressed_stream_are_refused_not_dropped(fake, encoding, raw):
    """What followed the end of a body's compressed stream was silently dropped: the request was answered (200)
    from its first part alone."""
    r = _post(fake, raw, encoding)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_content_encoding" and "after its compressed stream ends" in err["message"], err


def test_a_compressed_body_is_held_to_the_size_limit_once_decoded():
    bomb = gzip.compress(json.dumps({**CHAT, "metadata": {"pad": "x" * 3_000_000}}).encode())
    assert len(bomb) < 100_000
    with fake_server(max_request_bytes=1_000_000) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = _post(c, bomb, "gzip")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large" and "decoded" in r.json()["error"]["message"]


def test_a_full_queue_is_a_429_that_says_when_to_retry():
    from engine.events import Done, TextDelta
    from tests.server import FakeEngine, wait_for

    engine = FakeEngine([TextDelta("x")] * 20 + [Done("x" * 20, "stop")], step_s=0.2)
    with fake_server(engine, max_queue=1) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as running:
            lines = running.iter_lines()  # (kept: a dropped line iterator closes the response)
            next(lines)
            with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}):
                wait_for(lambda: srv.ctx.scheduler.waiting == 1)
                r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1


def test_a_streamed_chat_the_engine_refuses_at_once_gets_the_errors_status_not_200():
    """A stream: true chat refused before any output (here context_length_exceeded, as a media prompt
    too long for the context is) answered 200 with the error inside the event stream, unlike the same
    request without stream (400) and unlike speech and images."""
    import time

    from engine.events import Done, Error, TextDelta
    from tests.server import FakeEngine

    with fake_server(FakeEngine([Error("prompt (40000 tokens) + max_new_tokens (3) exceeds the model's context",
                                       "context_length_exceeded")])) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    slow = FakeEngine([TextDelta("late"), Done("late", "stop")], step_s=3.0)  # a long prefill before the first token
    with fake_server(slow) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        t0 = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200 and time.perf_counter() - t0 < 2.0  # the stream still starts at once
            assert any('"late"' in line for line in r.iter_lines())


def test_a_streamed_transcription_the_engine_refuses_at_once_gets_the_errors_status():
    from engine.events import Error
    from tests.server import FakeEngine

    class Refusing(FakeEngine):
        def transcribe(self, audio, **kw):
            yield Error("prompt (40000 tokens) + max_new_tokens (512) exceeds the model's context",
                        "context_length_exceeded")

    with fake_server(Refusing()) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV, "audio/wav")}, data={"stream": "true"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "n": None, "response_format": None, "stream": None, "stop": None,
                              "temperature": None, "modalities": None, "stream_options": None, "seed": None}),
    ("/v1/audio/speech", {"input": "hello", "voice": None, "response_format": None, "speed": None,
                          "stream_format": None, "instructions": None}),
    ("/v1/images/generations", {"prompt": "a cup", "n": None, "size": None, "response_format": None,
                                "output_format": None, "quality": None, "background": None, "stream": None}),
])
def test_an_optional_field_set_to_null_takes_its_default(path, body):
    """{"n": null} was refused ("'n' must be 1"; images: "must be an integer, got NoneType") and a null
    response_format / output_format as an unsupported value, where OpenAI's optional fields are nullable
    and a null means the default."""
    from engine.events import AudioChunk, Done, ImageDone
    from tests.server import FakeEngine, image_array, png_bytes

    class Everything(FakeEngine):
        class talker:
            sample_rate = 24000

        def speak(self, cancel=None, **kw):
            yield AudioChunk.from_samples(np.zeros(240), 24000, text="hello", start_s=0.0)
            yield Done("", "stop")

        has_image_generator = True

        def imagine(self, cancel=None, **kw):
            yield ImageDone(png_bytes(image_array(8, 8)), 8, 8, seed=1)
            yield Done("", "stop")

    with fake_server(Everything(has_talker=True)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text


def test_after_an_internal_error_the_client_connection_keeps_working():
    """A 500 (a bug in a handler) was sent on a keep-alive connection that the server then closed without
    saying so: the client's next request on it failed with a connection reset. The 500 says
    'Connection: close', so a client opens a new connection for the next request."""
    from tests.server import FakeEngine

    class Flaky(FakeEngine):
        broken = False

        def info(self):
            if self.broken:
                raise RuntimeError("the engine's info failed")
            return super().info()

    engine = Flaky()
    with fake_server(engine) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 200
        engine.broken = True
        r = c.get("/v1/models")
        assert r.status_code == 500 and r.json()["error"]["code"] == "server_error", r.text
        assert r.headers.get("connection") == "close"
        engine.broken = False
        for _ in range(3):
            assert c.get("/v1/models").status_code == 200


def raw_answer(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) the server answers a raw HTTP request with; the connection is read to its end
    (a server that closes before reading all of a long request resets it once its answer is read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = b""
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            assert data, "the connection was reset before any answer"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n", 431, "request_header_fields_too_large"),
    (b"GET /v1/models?x=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request_header_fields_too_large"),
    (b"GARBAGE\r\n\r\n", 400, "invalid_http_request"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "invalid_http_request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "invalid_http_request"),
])
def test_a_request_that_does_not_parse_gets_openais_error_body_and_its_status(request_bytes, status, code):
    """Headers too long (or a request that is not HTTP) got uvicorn's plain-text 400 'Invalid HTTP request
    received.': no JSON error body, and 400 where headers too large are a 431 (RFC 6585 §5)."""
    with fake_server() as srv:
        got, headers, body = raw_answer(srv.port, request_bytes)
        assert (got, headers["content-type"], headers["connection"]) == (status, "application/json", "close"), body
        assert headers["x-should-retry"] == "false"  # (a 501 was a server_error that OpenAI's SDK sent twice more)
        err = json.loads(body)["error"]
        assert err["code"] == code and err["type"] == "invalid_request_error", err
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


def test_a_head_past_the_limit_that_arrives_in_one_read_is_a_431_too(fake):
    """h11 holds a head to its 16 KiB only while it is incomplete: 2,000 short headers (18 KB) sent in one write came
    whole in one read and were served (200; a websocket handshake of 100 headers of 200 bytes opened a session), the
    same head sent in pieces refused (431)."""
    many = "".join(f"X-{i}: y\r\n" for i in range(2000))
    status, headers, body = raw_answer(fake.base_url.port, f"GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert (status, headers["connection"]) == (431, "close"), body
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert fake.get("/health").status_code == 200
    fewer_longer = "".join(f"X-{i}: {'y' * 200}\r\n" for i in range(100))  # (websockets takes 128 headers of 8 KiB)
    assert handshake_answer(fake.base_url.port, "/v1/realtime", fewer_longer).startswith(b"HTTP/1.1 431")


def test_a_fault_while_an_answer_streams_still_ends_the_stream(monkeypatch):
    """A chat stream whose encoding raised midway (a bug) was cut off: no error, no [DONE], and uvicorn
    dropped the connection, so a client could not tell a failure from a network drop. It now ends as a
    failed stream does: an error object, then [DONE]; the job is cancelled, not counted as a client leaving."""
    from engine.events import Done, TextDelta
    from engine.server import protocol as wire
    from tests.server import FakeEngine

    encode = wire.ChatChunkEncoder.encode

    def faulty(self, ev):
        if isinstance(ev, TextDelta) and ev.text == "two ":
            raise KeyError("a bug")
        return encode(self, ev)

    monkeypatch.setattr(wire.ChatChunkEncoder, "encode", faulty)
    script = [TextDelta("one "), TextDelta("two "), TextDelta("three "), Done("one two three ", "stop")]
    with fake_server(FakeEngine(script)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = list(r.iter_lines())
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "server_error", events
        assert "data: [DONE]" in lines
        assert c.get("/health").json()["client_aborts"]["left_mid_response"] == 0


JSON_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("request_bytes", [
    JSON_HEAD + b"Content-Length: 500\r\n\r\n" + json.dumps(CHAT).encode(),
    JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + json.dumps(CHAT).encode()[:16] + b"\r\n",
], ids=["content-length-never-filled", "chunked-without-last-chunk"])
def test_a_body_that_stops_arriving_is_a_408_not_a_request_held_forever(request_bytes):
    """A client that declared more body than it sent (or stopped a chunked body before its last chunk) and kept
    the connection open got no answer at all: the request, and its connection, were held forever."""
    with fake_server(body_idle_timeout_s=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(request_bytes)  # (and the connection stays open: nothing more comes)
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # others are served meanwhile
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed without an answer: {data!r}"
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error", err
        assert "0.5 s" in err["message"]


def test_a_body_trickled_within_the_pause_is_a_408_once_its_average_rate_falls_short():
    """A Content-Length body sent 10 bytes at a time, each piece well within the pause (body_idle_timeout_s), held its
    request and connection for as long as its client liked. Past the grace, a body arriving under
    min_body_bytes_per_s on average is refused (408, closing); a body sent at once is still served."""
    chat = json.dumps(CHAT).encode()
    with fake_server(body_rate_grace_s=0.3, min_body_bytes_per_s=1000) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(JSON_HEAD + b"Content-Length: 100000\r\n\r\n")
            started = time.monotonic()
            while not select.select([sock], [], [], 0.05)[0]:
                assert time.monotonic() - started < 5, "the trickled body was never refused"
                sock.sendall(b" " * 10)
            head, body = read_to_close(sock)
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "1000 bytes/s" in err["message"], err
        assert httpx.post(srv.url + "/v1/chat/completions", content=chat, timeout=10,
                          headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("method, path, meant", [
    ("POST", "/v1/chat/completions/", "/v1/chat/completions"),
    ("GET", "/v1/audio/voices//", "/v1/audio/voices"),
    ("DELETE", "/v1/audio/voices/alice/", "/v1/audio/voices/alice"),
])
def test_a_route_with_a_trailing_slash_is_a_404_naming_the_route_not_a_bare_redirect(fake, method, path, meant):
    """A trailing '/' was a 307 with no body, to a URL made from the request's Host header (a client that does
    not follow redirects, as OpenAI's SDK for a POST, saw an empty answer)."""
    r = fake.request(method, path, json=CHAT if method == "POST" else None, headers={"host": "elsewhere.example"})
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)
    err = r.json()["error"]
    assert err["code"] == "not_found" and f"send the request to {meant} " in err["message"], err


@pytest.mark.parametrize("raw, key", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "max_tokens": 4000}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi", "content": "bye"}], "max_tokens": 1}', "content"),
], ids=["top-level", "in-a-message"])
def test_a_json_key_sent_twice_is_refused_naming_it(fake, raw, key):
    """A key sent twice was taken silently with its last value (the first one lost), where a form field sent twice
    is refused: which one the client meant cannot be told."""
    r = fake.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and f"'{key}' appears more than once" in err["message"], err
    assert err["param"] == key


def test_a_realtime_event_with_a_key_sent_twice_is_refused_and_the_session_goes_on():
    from websockets.sync.client import connect

    with fake_server() as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send('{"type": "session.update", "session": {"instructions": "Be brief.", "instructions": "Be long."}}')
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and err["error"]["code"] == "invalid_json", err
        assert err["error"]["param"] == "instructions" and "appears more than once" in err["error"]["message"]
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv(timeout=10))["session"]["instructions"] == "Be brief."


def test_a_request_head_that_stops_is_a_408_and_a_silent_connection_is_closed():
    """A client that sent part of a request line (or connected and sent nothing) held its connection forever:
    uvicorn waits for a head without limit, and enough such connections starve the server of sockets."""
    with fake_server(head_timeout_s=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as silent, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=10) as partial:
            partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # (no blank line: the head never ends)
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # others are served meanwhile
            data = b""
            while chunk := partial.recv(65536):
                data += chunk
            assert silent.recv(100) == b""  # closed, nothing said
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "0.5 s" in err["message"], err


def test_a_kept_alive_connection_is_not_cut_while_its_requests_run_longer_than_the_head_timeout():
    from engine.events import Done, TextDelta

    slow = FakeEngine(script=[TextDelta("a"), TextDelta("b"), Done("ab", "stop")], step_s=0.4)
    with fake_server(slow, head_timeout_s=0.5) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(2):  # (the same connection: each answer takes longer than the head timeout)
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab", r.text


def test_a_realtime_session_outlives_the_head_timeout():
    from websockets.sync.client import connect

    with fake_server(head_timeout_s=0.3) as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        time.sleep(1.0)
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"


def test_a_body_framed_by_both_transfer_encoding_and_content_length_is_refused_and_the_connection_closed():
    """A request with both headers (request smuggling's shape, RFC 9112 §6.3) was read by its chunks and answered
    200 on a connection kept open: a request hidden after it was then answered as the client's next."""
    body = json.dumps(CHAT).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    hidden = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with fake_server() as srv:
        status, headers, answer = raw_answer(srv.port, JSON_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                                             + chunked + hidden)
    assert (status, headers["connection"]) == (400, "close"), answer
    err = json.loads(answer)["error"]  # (one answer: the hidden request is not read)
    assert err["code"] == "invalid_http_request" and "Transfer-Encoding and Content-Length" in err["message"], err


def test_a_realtime_event_with_a_leading_bom_is_read_as_a_body_with_one_is():
    """An HTTP body's leading BOM is skipped, but a realtime event with one was invalid_json ('Unexpected UTF-8 BOM
    (decode using utf-8-sig)': Python's advice, not the client's)."""
    from websockets.sync.client import connect

    with fake_server() as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send("\ufeff" + json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"\xef\xbb\xbf" + json.dumps(CHAT).encode(),
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text


def test_a_data_url_where_plain_base64_is_taken_is_called_a_data_url():
    """input_audio_buffer.append with a data: URL (what an image part takes) was 'not valid base64 (Only base64 data
    is allowed)': Python's words, which did not say what was wrong."""
    from websockets.sync.client import connect

    with fake_server() as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "data:audio/pcm;base64,AAAAAA=="}))
        err = json.loads(ws.recv(timeout=10))["error"]
        assert (err["code"], err["param"]) == ("invalid_base64", "audio"), err
        assert "data: URL" in err["message"] and "'data:audio/pcm;base64,' prefix" in err["message"], err


LONGER_THAN_PYTHON_CONVERTS = "9" * 5000  # (Python turns at most sys.get_int_max_str_digits() = 4300 digits into an int)


@pytest.mark.parametrize("field, code", [("max_tokens", "invalid_value"), ("seed", "invalid_value"),
                                         ("temperature", "invalid_value")])
def test_an_integer_of_more_digits_than_python_converts_is_a_bad_value_named(fake, field, code):
    """A 5,000-digit integer was 'the body is not valid JSON: Exceeds the limit (4300 digits) for integer string
    conversion ... use sys.set_int_max_str_digits()', naming no field: valid JSON, called invalid, with Python's advice."""
    raw = json.dumps({"messages": CHAT["messages"]})[:-1] + f', "{field}": -{LONGER_THAN_PYTHON_CONVERTS}}}'
    r = fake.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == (code, field), str(err)[:300]
    assert "5,001 characters" in err["message"] and len(err["message"]) < 300, err["message"][:300]


def test_such_an_integer_where_a_string_is_taken_is_called_an_int(fake):
    raw = (json.dumps(CHAT)[:-1]
           + f', "stream": true, "stream_options": {{"include_usage": {LONGER_THAN_PYTHON_CONVERTS}}}}}')
    err = fake.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"}).json()
    assert err["error"]["message"].endswith("must be true or false, got int"), err  # (not the parser's own class)


def test_a_realtime_integer_of_more_digits_than_python_converts_is_a_bad_value_named():
    from websockets.sync.client import connect

    with fake_server() as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send('{"type": "session.update", "session": {"max_output_tokens": ' + LONGER_THAN_PYTHON_CONVERTS + "}}")
        err = json.loads(ws.recv(timeout=10))["error"]
        assert err["param"] == "session.max_output_tokens" and err["code"] != "invalid_json", str(err)[:300]
        assert len(err["message"]) < 300, err["message"][:300]


def test_an_error_quoting_an_integer_past_pythons_digit_limit_says_its_size():
    from engine.errors import shown_number

    assert shown_number(10 ** 5000) == "an integer of about 5,000 digits"  # (str() of it raised ValueError)


@pytest.mark.parametrize("session, code, param", [
    ({"audio": {"output": {"speed": "fast"}}}, "invalid_type", "session.audio.output.speed"),
    ({"audio": {"output": {"speed": 1e308}}}, "invalid_value", "session.audio.output.speed"),
    ({"speed": -1}, "invalid_value", "session.speed"),
], ids=["string", "huge", "negative"])
def test_realtime_speed_accepted_without_effect_must_still_be_openais(session, code, param):
    """`speed` has no effect here (OpenAI's SDK sends its default, 1.0), and any value was taken silently: a string,
    a negative or a 1e308 speed. It must be a number in OpenAI's 0.25-1.5; 1.0 is still taken."""
    from websockets.sync.client import connect

    with fake_server() as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": session}))
        err = json.loads(ws.recv(timeout=10))["error"]
        assert (err["code"], err["param"]) == (code, param), err
        ws.send(json.dumps({"type": "session.update", "session": {"speed": 1.0, "audio": {"output": {"speed": 1.0}}}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"


@pytest.mark.parametrize("request_bytes", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                           b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n"], ids=["h2-preface", "http3"])
def test_a_request_in_an_http_version_the_server_does_not_speak_is_a_505(fake, request_bytes):
    """h11 read 'HTTP/2.0' and 'HTTP/3.0' as HTTP/1.1: an HTTP/2 client's preface met a 404 for a route '/*', and a
    GET naming HTTP/3.0 was served and kept alive."""
    status, headers, body = raw_answer(fake.base_url.port, request_bytes)
    err = json.loads(body)["error"]
    assert status == 505 and err["code"] == "invalid_http_request" and "HTTP/1.1" in err["message"], body
    assert headers["connection"] == "close"
    assert raw_answer(fake.base_url.port, b"GET /health HTTP/1.0\r\n\r\n")[0] == 200  # (1.0 is still spoken)


@pytest.mark.parametrize("version, status", [(b"1.0", 400), (b"2.0", 505)])
def test_a_websocket_handshake_over_another_http_version_than_1_1_is_refused(fake, version, status):
    """uvicorn rewrote the handshake's request line to HTTP/1.1, so one naming HTTP/1.0 or HTTP/2.0 opened a session
    (RFC 6455: a websocket opens with an HTTP/1.1 GET)."""
    request = (b"GET /v1/realtime HTTP/" + version + b"\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    got, _, body = raw_answer(fake.base_url.port, request)
    err = json.loads(body)["error"]
    assert got == status and err["code"] == "invalid_http_request" and "HTTP/1.1" in err["message"], body


@pytest.mark.parametrize("target", [b"http://engine.example/v1/models", b"HTTPS://engine.example:8000/v1/models?x=1"])
def test_an_absolute_form_request_target_is_served_as_its_path(fake, target):
    """RFC 9112 §3.2.2: a server must accept a target in absolute form (before: a 404 naming '/http://...')."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, body = raw_answer(fake.base_url.port, request)
    assert status == 200 and json.loads(body)["object"] == "list", body


@pytest.mark.parametrize("target", ["ws://engine.example/v1/realtime", "http://engine.example/v1/realtime"])
def test_a_websocket_handshake_with_an_absolute_form_target_opens_the_session(fake, target):
    assert handshake_answer(fake.base_url.port, target).startswith(b"HTTP/1.1 101")  # (before: a 404)


def test_past_the_connection_limit_idle_connections_make_room_and_busy_ones_mean_a_503():
    """A client opening thousands of kept-alive connections held a socket each until they idled out (10 s), and the
    server then accepted no one. Past Limits.max_connections the connection idle longest is closed, so a new client
    is still answered; when every connection is busy (here: a request head under way), a new one's request is
    answered 503 too_many_connections with Retry-After, and it closes."""
    limit = 6
    with fake_server(max_connections=limit) as srv, ExitStack() as stack:
        def opened() -> socket.socket:
            return stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=10))

        flood = [opened() for _ in range(3 * limit)]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # another client is answered
        assert all(s.recv(100) == b"" for s in flood[:2 * limit])  # the ones idle longest were closed, silently
        for s in flood[2 * limit:]:
            s.close()
        wait_for(lambda: len(srv.server.server_state.connections) == 0)
        fill_with_busy_connections(srv, opened, limit)
        late = opened()
        late.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_to_close(late)
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "too_many_connections" and f"{limit} connections" in err["message"], err


def test_a_request_answered_before_its_body_was_read_cannot_hold_its_connection_by_trickling_bytes():
    """A 413 (its Content-Length past the limit) left the connection reading the rest of the declared body, with no
    timer: a client sending a byte now and then held it for ever, never idle, so the connection cap could not make
    room; enough of them and the server refused everyone. What follows such an answer is read for a short while."""
    with fake_server(refusal_linger_s=0.5) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n{")
        head = b""
        while b"payload_too_large" not in head:
            head += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 413"), head

        def closed_while_trickling() -> bool:
            try:
                s.sendall(b"x")
            except OSError:  # (reset: the server has closed)
                pass
            return not srv.server.server_state.connections

        wait_for(closed_while_trickling, timeout=3, interval=0.1)


def test_a_body_sent_just_after_an_early_answer_keeps_the_connection_alive_for_the_next_request():
    """An answer given before its request's body was read (a 415 on the head alone) closed the connection at once,
    though the answer let it be kept alive: a client that sent its body right after the head (as httpx does, in
    another write) met a closed connection at its next request ('Server disconnected without sending a response',
    seen in the fuzz run). A body that comes within the linger keeps the connection."""
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    with fake_server(refusal_linger_s=2.0) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        first = b""
        while b"unsupported_content_type" not in first:
            chunk = s.recv(65536)
            assert chunk, f"closed without the 415: {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 415") and b"connection: close" not in first.lower(), first
        s.sendall(body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = b""
        while b"HTTP/1.1 200" not in second:
            chunk = s.recv(65536)
            assert chunk, f"the connection was closed before the next request was answered: {second!r}"
            second += chunk


def test_one_address_flooding_the_connection_cap_does_not_close_another_clients_kept_alive_connection():
    """Past the cap the connection idle longest was closed, whoever held it: a client pausing between two requests on
    its kept-alive connection lost it to one address opening connections by the dozen. The flooding address's own
    idle connections now make room, and with none idle its new connection is refused, not the other's closed."""
    limit = 6
    with fake_server(max_connections=limit) as srv, ExitStack() as stack:
        def flooded() -> socket.socket:
            return stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=10))

        client = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10, source_address=("127.0.0.2", 0))
        stack.callback(client.close)

        def answered() -> int:
            client.request("GET", "/health")
            response = client.getresponse()
            response.read()
            return response.status

        assert answered() == 200
        kept = client.sock
        flood = [flooded() for _ in range(3 * limit)]  # idle: the flood's own make room, the ones idle longest
        assert all(s.recv(100) == b"" for s in flood[:len(flood) - (limit - 1)])
        assert answered() == 200 and client.sock is kept
        for s in flood:
            s.close()
        wait_for(lambda: len(srv.server.server_state.connections) == 1)
        fill_with_busy_connections(srv, flooded, limit - 1, held=limit)  # none of the flood's idle
        late = flooded()
        late.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_to_close(late)[0].startswith(b"HTTP/1.1 503")
        assert answered() == 200 and client.sock is kept


def fill_with_busy_connections(srv, opened, n: int, held: int | None = None) -> None:
    """`n` connections from `opened()`, each busy (a request head under way), until the server holds `held` (`n`)
    and those are all busy."""
    for s in [opened() for _ in range(n)]:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    connections = srv.server.server_state.connections
    wait_for(lambda: len(connections) == (held or n)
             and sum(c.idle_since is None for c in list(connections)) >= n)  # (the heads came)


def read_to_close(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of what the server sent until it closed."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_refused_request_with_a_large_body_gets_its_503_not_a_reset():
    """The refusal closed the connection as soon as the head had come: with the body still arriving, the close reset
    it, and a client sending a large body met 'connection reset by peer' instead of the 503. The body is now read and
    dropped (bounded) after the answer."""
    limit, body = 2, b"x" * (8 * 1024 * 1024)
    with fake_server(max_connections=limit) as srv, ExitStack() as stack:
        def opened() -> socket.socket:
            return stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=10))

        fill_with_busy_connections(srv, opened, limit)
        late = opened()
        try:
            late.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            head, answer = read_to_close(late)
        except ConnectionError as e:
            pytest.fail(f"the client met {e!r} instead of the 503")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(answer)["error"]["code"] == "too_many_connections"


def raw_target_request(port: int, method: str, target: str) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a request whose target http.client sends as it is ('*', 'host:443')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


MIB_FRAME = bytes([0x82, 0xFF]) + (1 << 20).to_bytes(8, "big") + b"\0" * 4 + b"x" * (1 << 20)  # binary, 1 MiB, masked


def answer_though_a_frame_followed(sock, wait_s: float, expected: str) -> tuple[bytes, bytes]:
    """The answer to a refused handshake (its head and body, read to the close) when the client sent a 1 MiB frame
    `wait_s` after its handshake, by when the refusal has been written: a reset fails the test."""
    time.sleep(wait_s)
    try:
        sock.sendall(MIB_FRAME)
        return read_to_close(sock)
    except ConnectionError as e:
        pytest.fail(f"the client met {e!r} instead of {expected}")


def test_options_asterisk_says_the_methods_the_server_takes_and_connect_is_not_implemented(fake):
    """`OPTIONS *` and `CONNECT host:443` met a 404 naming the routes '/*' and '/host:443', which no client asked for."""
    status, headers, body = raw_target_request(fake.base_url.port, "OPTIONS", "*")
    assert (status, body, headers["content-length"]) == (200, b"", "0")
    assert {"GET", "HEAD", "POST", "DELETE", "OPTIONS"} == {m.strip() for m in headers["allow"].split(",")}
    status, headers, body = raw_target_request(fake.base_url.port, "CONNECT", "example.org:443")
    err = json.loads(body)["error"]
    assert (status, err["code"], headers["x-should-retry"]) == (501, "method_not_allowed", "false"), body
    assert "example.org:443" in err["message"] and "proxy" in err["message"]
    status, _, body = raw_target_request(fake.base_url.port, "GET", "*")
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_http_request")


def test_a_websocket_refused_at_the_session_cap_gets_its_503_though_it_sent_frames_right_after_its_handshake():
    """The denial (503 session_limit_reached) closed the connection at once: a client that sent its first frames right
    after its handshake, as a client not waiting for the 101 does, had them arrive at a closed socket and met a reset
    instead of the 503. The connection now lingers after the answer as an HTTP refusal's does."""
    from websockets.sync.client import connect

    with fake_server(max_sessions=1) as srv, connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as held:
        held.recv(timeout=10)  # (session.created: the one session is open)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as late:
            key = base64.b64encode(os.urandom(16))
            late.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head, answer = answer_though_a_frame_followed(late, 0.2, "the 503")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(answer)["error"]["code"] == "session_limit_reached"


@pytest.mark.parametrize("method, version, key, target, extra, status", [
    ("POST", "13", None, "/v1/realtime", "", 405),
    ("GET", "8", None, "/v1/realtime", "", 400),
    ("GET", "13", "not-a-key", "/v1/realtime", "", 400),
    ("GET", "13", None, "/v1/realtime?x=" + "a" * 9000, "", 414),
    ("GET", "13", None, "/v1/realtime", f"X-Big: {'b' * 9000}\r\n", 431),
], ids=["post", "version", "key", "long-line", "long-header"])
def test_a_handshake_websockets_refuses_itself_gets_its_answer_though_frames_followed(fake, method, version, key,
                                                                                     target, extra, status):
    """websockets' own refusals (a non-GET upgrade, a bad Sec-WebSocket-Version or -Key, a request line or header past
    its 8 KiB) closed the connection at once: a client that sent its first frame right after its handshake met a reset
    instead of the answer. They now linger after the answer as the app's refusals do (Limits.refusal_linger_s)."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n".encode())
        head, answer = answer_though_a_frame_followed(s, 0.1, f"the {status}")
    assert head.startswith(b"HTTP/1.1 %d" % status), head
    assert json.loads(answer)["error"]["message"].startswith("the websocket opening handshake was refused")


def test_the_keep_alive_wait_after_an_early_answer_starts_once_its_body_has_come():
    """After an answer given before its request's body was read (a 415 on the head alone), uvicorn's keep-alive wait
    (Limits.keep_alive_s) ran from the answer: a body sent later within the linger met a closed connection. And once
    the body had come, its data had cancelled the wait and nothing started it again: the idle connection was held
    until the head timer (Limits.head_timeout_s). The linger alone now bounds the body, and the wait starts after it."""
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    keep_alive, head_timeout = 0.2, 1.0
    with fake_server(refusal_linger_s=3.0, keep_alive_s=keep_alive, head_timeout_s=head_timeout) as srv:
        def answered_early() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            answer = b""
            while not answer.endswith(b"}}"):
                answer += s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 415"), answer
            return s

        with answered_early() as late:
            time.sleep(2 * keep_alive)
            late.sendall(body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert late.recv(100).startswith(b"HTTP/1.1 200"), "the body sent within the linger met a closed connection"
        with answered_early() as idle:
            idle.sendall(body)
            sent = time.monotonic()
            assert idle.recv(100) == b""
            assert time.monotonic() - sent < head_timeout / 2, "the idle connection was held until the head timer"
        with answered_early() as trickling:  # (its next head a byte at a time: still cut off by the head timer)
            trickling.sendall(body)
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                if select.select([trickling], [], [], head_timeout / 20)[0]:  # (answered)
                    break
                trickling.sendall(bytes([byte]))
            assert read_to_close(trickling)[0].startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("codings, status", [(b"chunked, identity", 400), (b"Chunked , CHUNKED", 400),
                                             (b"chunked\r\nTransfer-Encoding: chunked", 400),
                                             (b"identity, chunked", 501)])
def test_a_transfer_encoding_whose_last_coding_is_not_a_single_chunked_is_a_400(fake, codings, status):
    """RFC 9112 §6.3: a request whose Transfer-Encoding does not end with chunked (or applies it twice, §7.1) has no
    body length the server can tell, and is a 400 that closes; it was h11's 501, which says the server lacks a coding
    it could add. A coding the server does not know (identity) before a last chunked is still a 501."""
    status_got, headers, body = raw_answer(fake.base_url.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                           b"Transfer-Encoding: " + codings + b"\r\n\r\n0\r\n\r\n")
    err = json.loads(body)["error"]
    assert (status_got, err["code"], headers["connection"]) == (status, "invalid_http_request", "close"), body
    assert status == 501 or "chunked" in err["message"] and "last" in err["message"], err


def holds_control_character(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


@pytest.mark.parametrize("target", [b"/v1/mod%00els", b"/v1/audio/voices/a%0Ab", b"/nope%7f", b"/a\x00b", b"/a\x01b"])
def test_a_path_with_a_control_character_is_a_400_whose_message_does_not_echo_it(fake, target):
    """'/v1/mod%00els' got a 404 whose message named the path with its NUL decoded (a control byte sent back), and
    '%0A' a 404 naming another path (the newline dropped). Now a 400 naming the path as sent; a raw one is h11's 400."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, body = raw_answer(fake.base_url.port, request)
    err = json.loads(body)["error"]
    assert status == 400 and err["type"] == "invalid_request_error", body
    assert not holds_control_character(err["message"]), err
    assert b"%" not in target or (err["code"], err["param"]) == ("invalid_request", "path") and (
        target.decode() in err["message"]), err
    if b"%" in target:  # (a websocket handshake meets the same check)
        ws_status, _, ws_body = websocket_handshake(fake.base_url.port, target.decode())
        assert ws_status == 400 and not holds_control_character(json.loads(ws_body)["error"]["message"]), ws_body


@pytest.mark.parametrize("target", [b"/v1/models?a=%00", b"/health?x=%0a", b"/v1/realtime?model=%1B%5B2J",
                                    b"/v1/models?a=%C2%9B", b"/v1/models/a%c2%85b", b"/v1/models?token=T0k&a=%00"])
def test_a_query_with_a_control_character_is_a_400_whose_message_does_not_echo_it(fake, target):
    """'?a=%00', '%0a', '%1B' (a terminal's escape) in a query were passed on (/v1/models answered 200), and a C1
    control ('%C2%9B', a terminal's CSI) in a path or query too; now a 400 invalid_request naming the query as sent
    (a token in it redacted), for websocket handshakes too."""
    param = "query" if b"?" in target else "path"
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, body = raw_answer(fake.base_url.port, request)
    err = json.loads(body)["error"]
    assert status == 400 and (err["code"], err["param"]) == ("invalid_request", param), body
    quoted = target.decode().partition("?")[2 if param == "query" else 0].replace("T0k", "[redacted]")
    assert quoted in err["message"] and "T0k" not in err["message"], err
    assert not holds_control_character(err["message"]), err
    ws_status, _, ws_body = websocket_handshake(fake.base_url.port, target.decode())
    assert ws_status == 400 and json.loads(ws_body)["error"]["param"] == param, ws_body


@pytest.mark.parametrize("field, value", [("max_tokens", "1_000"), ("temperature", "\u0660.\u0665")])
def test_a_form_number_python_reads_but_no_client_writes_is_refused(fake, field, value):
    """A form's number field went through Python's int() / float(): '1_000' was read as 1000 and Arabic-Indic digits
    ('٠.٥') as 0.5, where a number is ASCII digits with a sign, point and exponent."""
    r = fake.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV, "audio/wav")},
                  data={"model": "default", field: value})
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (400, "invalid_type", field), r.text
    ok = fake.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV, "audio/wav")},
                   data={"model": "default", "temperature": ".5", "max_tokens": "10"})
    assert ok.status_code == 200, ok.text


def test_a_bad_transfer_encoding_in_the_same_read_as_the_previous_body_gets_the_same_400(fake):
    """A head whose Transfer-Encoding does not end with a single chunked is a 400 saying so; arriving in the same read
    as the previous request's body (kept alive), it was still h11's 501: its head had not been kept for the answer."""
    chat = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(chat))
        time.sleep(0.1)  # (the head has been read: the body comes in a later read)
        s.sendall(chat + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n"
                  b"\r\n0\r\n\r\n")
        head, body = read_to_close(s)
    second = b"HTTP/1.1 " + body.split(b"HTTP/1.1 ", 1)[1]
    assert head.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 400"), second[:200]
    err = json.loads(second.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "invalid_http_request" and "chunked must be its last coding" in err["message"], err


@pytest.mark.parametrize("coding", [b"chunked", b"gzip"])
def test_an_http_1_0_request_with_a_transfer_encoding_is_a_400_that_closes_and_lingers(fake, coding):
    """RFC 9112 §6.1: HTTP/1.0 has no Transfer-Encoding, and a server must treat such a request's framing as faulty and
    close; a chunked one was read as HTTP/1.1's and served (200), another coding was h11's 501. What the client still
    sends after the answer is read and dropped (the linger), as after the other refusals."""
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(JSON_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: " + coding + b"\r\n\r\n"
                  + b"%x\r\n" % len(json.dumps(CHAT)) + json.dumps(CHAT).encode() + b"\r\n")
        time.sleep(0.1)  # (the refusal has been written by now)
        try:
            s.sendall(b"0\r\n\r\n" + b"x" * (1 << 20))
            head, body = read_to_close(s)
        except ConnectionError as e:
            pytest.fail(f"the client met {e!r} instead of the 400")
    err = json.loads(body)["error"]
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), head
    assert err["code"] == "invalid_http_request" and "HTTP/1.0" in err["message"], err


def test_a_frame_sent_in_the_same_write_as_the_websocket_handshake_reaches_the_session(fake):
    """uvicorn handed the websocket protocol the handshake's head alone: an event a client sent right behind its
    handshake, in the same write (a client not waiting for the 101), was dropped without a word."""
    event = json.dumps({"type": "session.update", "session": {"instructions": "be brief"}}).encode()
    frame = bytes([0x81, 0x80 | 126]) + len(event).to_bytes(2, "big") + b"\0" * 4 + event  # text, masked with zeros
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  + frame)
        got = b""
        while b'"session.updated"' not in got:
            chunk = s.recv(65536)
            assert chunk, f"the session closed without answering the event: {got[-300:]!r}"
            got += chunk
    assert got.startswith(b"HTTP/1.1 101") and b"be brief" in got.split(b'"session.updated"')[1]


def test_json_nested_ten_thousand_deep_in_an_unexpected_field_is_a_400_that_says_so(fake):
    """A valid body nesting 10 000 arrays in a field no endpoint reads was told 'maximum recursion depth exceeded while
    decoding a JSON array from a unicode string': Python's words, not what the client did wrong; a realtime event too."""
    from websockets.sync.client import connect

    nested = "[" * 10_000 + "]" * 10_000
    r = fake.post("/v1/chat/completions", content=f'{{"messages": [], "metadata": {nested}}}',
                  headers={"content-type": "application/json"})
    with connect(f"ws://127.0.0.1:{fake.base_url.port}/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(f'{{"type": "session.update", "session": {{"x": {nested}}}}}')
        event_error = json.loads(ws.recv(timeout=10))["error"]
    for err in (r.json()["error"], event_error):
        assert err["code"] == "invalid_json" and "nest deeper" in err["message"] and "recursion" not in err["message"]
    assert r.status_code == 400


@pytest.mark.parametrize("head, status", [
    (JSON_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.2\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1050000\r\n\r\n",
     505)], ids=["te-and-cl", "http-1.2"])
def test_a_refusal_that_closes_its_connection_is_answered_though_the_body_was_still_coming(fake, head, status):
    """The gate's refusals that end the connection (both Transfer-Encoding and Content-Length: 400; an HTTP version
    not spoken: 505) were closed at once after the answer, with the body still coming: the client met a reset (broken
    pipe) instead of the answer. What it still sends is now read and dropped for the linger, as after other refusals."""
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(head)
        time.sleep(0.1)  # (the refusal has been written by now)
        try:
            s.sendall(b"x" * (1 << 20))
            answer, body = read_to_close(s)
        except ConnectionError as e:
            pytest.fail(f"the client met {e!r} instead of the {status}")
    assert answer.startswith(b"HTTP/1.1 %d" % status) and json.loads(body)["error"]["code"] == "invalid_http_request"


def test_a_request_expecting_100_continue_answered_before_it_says_the_connection_closes(fake):
    """A request with 'Expect: 100-continue' refused on its head (a 415) got its answer without a 100, as it should,
    but one that let the connection live: a client that then left the body out (as RFC 9110 §10.1.1 lets it) and sent
    its next request had that request read as the body, and met a silent close 5 s later. Such an answer now says
    'Connection: close'; one the server read the body of (after its 100) keeps the connection."""
    expecting = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(expecting % 300 + b"Content-Type: text/plain\r\n\r\n")
        started = time.monotonic()
        head, body = read_to_close(s)
        assert head.startswith(b"HTTP/1.1 415") and b"connection: close" in head.lower(), head
        assert time.monotonic() - started < 2, "the answer did not end the connection"
    chat = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(expecting % len(chat) + b"Content-Type: application/json\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(chat)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower(), answer


def test_a_chunked_body_sent_a_byte_a_chunk_is_refused_before_it_holds_the_server(fake):
    """A chunked body cost the server its parsing per chunk: 1 MiB sent a byte a chunk took 27 s of the event loop,
    and /health answered in 3-5 s meanwhile. Chunks averaging under Limits.min_chunk_bytes are refused (400) once
    CHUNKS_BEFORE_AVERAGE have come; a body in fair chunks is still read."""
    from engine.server.http_protocol import CHUNKS_BEFORE_AVERAGE

    def chunked(payload: bytes, size: int) -> bytes:
        return b"".join(b"%x\r\n" % len(payload[i:i + size]) + payload[i:i + size] + b"\r\n"
                        for i in range(0, len(payload), size)) + b"0\r\n\r\n"

    chat = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * 4 * CHUNKS_BEFORE_AVERAGE}]}).encode()
    head = JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    status, headers, body = raw_answer(fake.base_url.port, head + chunked(chat, 1))
    err = json.loads(body)["error"]
    assert (status, err["code"], headers["connection"]) == (400, "chunks_too_small", "close"), body
    assert raw_answer(fake.base_url.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                      + chunked(chat, 1024))[0] == 200


def test_a_realtime_message_in_a_flood_of_empty_fragments_closes_the_session_with_1008(fake):
    """A text frame left unfinished and followed by empty continuation frames grew the server's list of the message's
    fragments without bound (no byte counted against the message limit) and cost the event loop each frame: 1 M of
    them (6 MB sent) held 1 M entries. Fragments averaging under Limits.min_chunk_bytes once CHUNKS_BEFORE_AVERAGE have
    come now close the session (1008, saying why)."""
    from engine.server.http_protocol import CHUNKS_BEFORE_AVERAGE

    empty_fragment = bytes([0x00, 0x80]) + b"\0" * 4  # continuation, not final, no payload, masked
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        got = s.recv(65536)
        while b"session.created" not in got:
            got += s.recv(65536)
        s.sendall(bytes([0x01, 0x81]) + b"\0" * 4 + b"{" + empty_fragment * (2 * CHUNKS_BEFORE_AVERAGE))
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    close = got[got.rindex(b"\x88"):]  # the close frame: code, then reason
    assert int.from_bytes(close[2:4], "big") == 1008 and b"fragments" in close, got[-200:]


def reads_of(monkeypatch, protocol, counts) -> list[int]:
    """The sizes of the reads connections of `protocol` (a uvicorn protocol class) make for which `counts(connection)`
    holds when the read comes."""
    sizes: list[int] = []
    data_received = protocol.data_received

    def counted(connection, data: bytes) -> None:
        if counts(connection):
            sizes.append(len(data))
        data_received(connection, data)

    monkeypatch.setattr(protocol, "data_received", counted)
    return sizes


@pytest.fixture
def body_reads(monkeypatch):
    """The sizes of the reads the server's HTTP connections make of request bodies (their other reads left out)."""
    import h11

    from engine.server.http_protocol import OpenAIErrorsH11Protocol

    return reads_of(monkeypatch, OpenAIErrorsH11Protocol, lambda connection: connection.conn.their_state is h11.SEND_BODY)


def test_a_body_sent_a_byte_a_packet_wakes_the_server_a_bounded_number_of_times_a_second(fake, body_reads):
    """A Content-Length body sent one byte per packet as fast as the client could was read a packet at a time: each
    read cost the event loop its wake-up and h11's parsing, and 4 such clients took 40-70 % of a core. After a read
    under Limits.min_read_bytes reading now pauses SMALL_READ_PAUSE_S, so what comes meanwhile is read at once: at
    most 1 / SMALL_READ_PAUSE_S reads under that size a second (a packet a read: hundreds to thousands), and the
    request is served."""
    from engine.server.limits import SMALL_READ_PAUSE_S, Limits

    chat = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * 12_000}]}).encode()
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(JSON_HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(chat))
        started = time.monotonic()
        for byte in chat:
            s.send(bytes([byte]))
        head, _ = read_to_close(s)
        took = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 200"), head
    small = [size for size in body_reads if size < Limits().min_read_bytes]
    most = took / SMALL_READ_PAUSE_S + 2  # (each small read is followed by the pause: a late timer makes fewer)
    assert len(small) <= most, f"{len(small)} reads under {Limits().min_read_bytes} bytes in {took:.2f} s"


def test_a_body_whose_reads_stay_tiny_is_refused_naming_the_limit(fake, body_reads, monkeypatch):
    """A body whose reads average under Limits.min_read_bytes once READS_BEFORE_AVERAGE have come (a client sending a
    byte at a time, each past the read pause) is refused: 400 body_pieces_too_small, naming the limit (the count
    before the average is held lowered to 4 here, from 1024)."""
    monkeypatch.setattr("engine.server.http_protocol.READS_BEFORE_AVERAGE", 4)
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.sendall(JSON_HEAD + b"Content-Length: 500\r\n\r\n")
        try:
            for _ in range(10):
                s.send(b" ")
                time.sleep(0.02)  # (past the read pause: each byte is a read)
        except ConnectionError:
            pass
        head, body = read_to_close(s)
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["code"] == "body_pieces_too_small" and "256 bytes" in err["message"], err


def test_a_realtime_message_sent_a_byte_a_packet_wakes_the_server_a_bounded_number_of_times_a_second(fake, monkeypatch):
    """A realtime message sent one byte per packet was read a packet at a time, as a request body was: after a read
    under Limits.min_read_bytes that leaves a frame unfinished, reading pauses SMALL_READ_PAUSE_S (PacesSmallReads), and
    the message is still handled."""
    from engine.server.limits import SMALL_READ_PAUSE_S, Limits
    from engine.server.ws_protocol import OpenAIErrorsWebSocketProtocol

    reads = reads_of(monkeypatch, OpenAIErrorsWebSocketProtocol, lambda connection: connection.handshake_complete)
    payload = json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "a" * 4000}})
    frame = bytes([0x81, 0xFE]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload.encode()  # masked, zeros
    with socket.create_connection(("127.0.0.1", fake.base_url.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        got = b""
        while b"session.created" not in got:
            got += s.recv(65536)
        reads.clear()
        started = time.monotonic()
        for byte in frame:
            s.send(bytes([byte]))
        while b"session.updated" not in got:
            got += s.recv(65536)
        took = time.monotonic() - started
    small = [size for size in reads if size < Limits().min_read_bytes]
    most = took / SMALL_READ_PAUSE_S + 2  # (each small read is followed by the pause: a late timer makes fewer)
    assert len(small) <= most, f"{len(small)} reads under {Limits().min_read_bytes} bytes in {took:.2f} s"
