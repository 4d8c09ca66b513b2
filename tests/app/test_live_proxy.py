"""The Live tab's websocket relay (app/live_proxy.py) against a fake engine: the token is added on
the server side, closes propagate both ways, bad input gets a message, the engine being down or
refusing the token is said plainly, other sites' pages and logged-out browsers are refused, and a
second tab takes the session over."""

from __future__ import annotations

import base64
import json

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.live_proxy import LIVE_WS_PATH, LiveProxy, origin_allowed, realtime_url
from tests.app.fake_engine import REPLY, FakeEngine


@pytest.fixture
def engine():
    with FakeEngine(token="engine-secret") as fake:
        yield fake


def make_app(url: str, token: str | None, **app_attrs):
    proxy = LiveProxy(lambda: (url, token), open_timeout=3.0)
    app = Starlette(routes=[proxy.route()])
    for name, value in app_attrs.items():  # Gradio's App keeps its login on these attributes
        setattr(app, name, value)
    return proxy, app


def recv(ws) -> dict:
    return json.loads(ws.receive_text())


def recv_until(ws, kind: str, limit: int = 50) -> list[dict]:
    got = []
    for _ in range(limit):
        got.append(recv(ws))
        if got[-1]["type"] == kind:
            return got
    raise AssertionError(f"no {kind} in {[e['type'] for e in got]}")


def test_engine_urls():
    assert realtime_url("ws://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/realtime"
    assert realtime_url("https://gpu.example.org/ming/") == "wss://gpu.example.org/ming/v1/realtime"
    assert realtime_url("ws://h:1/v1/realtime") == "ws://h:1/v1/realtime"
    with pytest.raises(ValueError, match="ws://HOST:PORT"):
        realtime_url("127.0.0.1:8000")


def test_relays_both_ways_with_the_token_added_on_the_server(engine):
    proxy, app = make_app(engine.url, engine.token)
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        assert recv(ws)["type"] == "session.created"
        ws.send_text(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0" * 1600)
                                 .decode(), "sample_rate": 16000}))
        ws.send_text(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send_text(json.dumps({"type": "response.create"}))
        events = recv_until(ws, "response.done")
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == REPLY
        assert "user:" not in "".join(proxy.active) and len(proxy.active) == 1
    assert engine.wait_closed(1), "the engine socket stayed open after the browser left"
    assert engine.got.headers[0]["Authorization"] == "Bearer engine-secret"
    assert engine.got.types()[:3] == ["input_audio_buffer.append", "input_audio_buffer.commit", "response.create"]
    assert proxy.active == {}


def test_the_engine_closing_ends_the_page_session_with_a_message(engine):
    _, app = make_app(engine.url, engine.token)
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        recv(ws)
        ws.send_text(json.dumps({"type": "close_me"}))
        err = recv(ws)
        assert err["type"] == "error" and err["error"]["code"] == "engine_closed"
        assert "1011" in err["error"]["message"] and "engine stopping" in err["error"]["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 4001


def test_bad_input_gets_a_message_and_the_session_goes_on(engine):
    proxy, app = make_app(engine.url, engine.token)
    proxy.max_message_bytes = 1000
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        recv(ws)
        ws.send_bytes(b"\x00\x01")
        assert recv(ws)["error"]["code"] == "binary_not_supported"
        ws.send_text("x" * 1001)
        assert recv(ws)["error"]["code"] == "message_too_large"
        ws.send_text(json.dumps({"type": "response.create"}))
        assert recv(ws)["type"] == "response.created"
    assert engine.wait_closed(1)
    assert engine.got.types()[0] == "response.create"  # nothing of the bad input reached the engine


def test_an_engine_that_is_down_or_refuses_the_token_is_named(engine):
    _, app = make_app(engine.url, "wrong-token")
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        err = recv(ws)
        assert err["error"]["code"] == "engine_unauthorized" and "--engine-token" in err["error"]["message"]
    port = engine.port
    engine.close()
    _, app = make_app(f"ws://127.0.0.1:{port}", "engine-secret")
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        err = recv(ws)
        assert err["error"]["code"] == "engine_unreachable" and f"127.0.0.1:{port}" in err["error"]["message"]
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()


def test_pages_of_other_sites_are_refused():
    headers = lambda origin, host="studio.example:7860": {"origin": origin, "host": host}  # noqa: E731
    assert origin_allowed({})  # not a browser
    assert origin_allowed(headers("https://studio.example:7860"))
    assert not origin_allowed(headers("https://evil.example"))
    assert origin_allowed(headers("http://localhost:7860", "127.0.0.1:7860"))
    assert not origin_allowed(headers("https://evil.example", "127.0.0.1:7860"))
    assert origin_allowed({"origin": "https://x.hf.space", "host": "10.0.0.2:7860", "x-forwarded-host": "x.hf.space"})


def test_a_cross_site_page_cannot_open_the_socket(engine):
    _, app = make_app(engine.url, engine.token)
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect(LIVE_WS_PATH, headers={"origin": "https://evil.example"}):
                pass
        assert refused.value.code == 1008
    assert engine.got.headers == []  # the engine was never contacted


def test_the_studio_login_is_required_when_it_has_one(engine):
    _, app = make_app(engine.url, engine.token, auth={"ann": "pw"}, auth_dependency=None, cookie_id="c1",
                      tokens={"tok-ann": "ann"})
    with TestClient(app) as client:
        with client.websocket_connect(LIVE_WS_PATH) as ws:
            err = recv(ws)
            assert err["error"]["code"] == "login_required"
        client.cookies.set("access-token-unsecure-c1", "tok-ann")
        with client.websocket_connect(LIVE_WS_PATH) as ws:
            assert recv(ws)["type"] == "session.created"
    assert len(engine.got.headers) == 1


def test_a_second_tab_takes_over_and_the_first_is_told(engine):
    proxy, app = make_app(engine.url, engine.token)
    with TestClient(app) as client:
        with client.websocket_connect(LIVE_WS_PATH + "?client=browser-1") as first:
            assert recv(first)["type"] == "session.created"
            with client.websocket_connect(LIVE_WS_PATH + "?client=browser-1") as second:
                assert recv(second)["type"] == "session.created"
                err = recv(first)
                assert err["error"]["code"] == "live_session_replaced"
                with pytest.raises(WebSocketDisconnect) as closed:
                    first.receive_text()
                assert closed.value.code == 4000
                assert engine.wait_closed(1)  # the first tab's engine session ended
                second.send_text(json.dumps({"type": "response.create"}))
                assert recv(second)["type"] == "response.created"
                assert list(proxy.active) == ["browser:browser-1"]
    assert engine.wait_closed(2) and proxy.active == {}


def test_two_browsers_sharing_one_login_keep_their_own_sessions(engine):
    """A Space's STUDIO_AUTH is one login for all its visitors: the session was kept per login, so a second visitor's
    Start stopped the first visitor's live session ('Live was started in another tab or window')."""
    proxy, app = make_app(engine.url, engine.token, auth={"demo": "pw"}, auth_dependency=None, cookie_id="c1",
                          tokens={"tok-a": "demo", "tok-b": "demo"})
    with TestClient(app) as visitor_a, TestClient(app) as visitor_b:
        visitor_a.cookies.set("access-token-unsecure-c1", "tok-a")
        visitor_b.cookies.set("access-token-unsecure-c1", "tok-b")
        with visitor_a.websocket_connect(LIVE_WS_PATH + "?client=browser-a") as a:
            assert recv(a)["type"] == "session.created"
            with visitor_b.websocket_connect(LIVE_WS_PATH + "?client=browser-b") as b:
                assert recv(b)["type"] == "session.created"
                for ws in (a, b):  # both sessions still answer
                    ws.send_text(json.dumps({"type": "response.create"}))
                    assert recv_until(ws, "response.created")[-1]["type"] == "response.created"
                assert sorted(proxy.active) == ["user:demo/browser:browser-a", "user:demo/browser:browser-b"]


def test_installed_in_a_real_gradio_app_behind_its_login(engine):
    """demo.launch(auth=..., app_kwargs=proxy.app_kwargs()): the route sits in Gradio's own app and
    trusts Gradio's login cookie; the page itself still loads."""
    gr = pytest.importorskip("gradio")
    import httpx
    from websockets.sync.client import connect

    from app.studio import close_studio

    proxy = LiveProxy(lambda: (engine.url, engine.token))
    with gr.Blocks() as demo:
        gr.Markdown("studio")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                auth=("ann", "pw"), app_kwargs=proxy.app_kwargs())
    try:
        base = demo.local_url.rstrip("/")
        url = base.replace("http://", "ws://") + LIVE_WS_PATH
        with connect(url) as ws:
            assert json.loads(ws.recv())["error"]["code"] == "login_required"
        with httpx.Client() as http:
            assert http.post(base + "/login", data={"username": "ann", "password": "pw"}).status_code == 200
            cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
            assert http.get(base + "/").status_code == 200
        with connect(url, additional_headers={"Cookie": cookie, "Origin": base}) as ws:
            assert json.loads(ws.recv())["type"] == "session.created"
    finally:
        close_studio(demo)
    assert engine.wait_closed(1)


def test_a_frame_that_is_not_utf8_costs_one_log_line_not_a_stack_trace(engine, caplog):
    """Under uvicorn (what Gradio runs), a hostile page's non-UTF-8 text frame is closed with 1007;
    the studio's log gets the relay's one line, not uvicorn's traceback."""
    import logging
    import threading
    import time

    import uvicorn

    from tests.server import invalid_utf8_frame

    _, app = make_app(engine.url, engine.token)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    uvicorn_log = logging.getLogger("uvicorn.error")  # (it does not propagate to the root logger)
    uvicorn_log.addHandler(caplog.handler)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with caplog.at_level(logging.INFO):
            got = invalid_utf8_frame(port, path=LIVE_WS_PATH)
            assert b"\x88\x02\x03\xef" in got  # closed with 1007
            deadline = time.monotonic() + 5
            while not any("client abort" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.02)
    finally:
        server.should_exit = True
        thread.join(10)
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert sum("client abort (invalid_utf8_frame)" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory):
    """A port that answers TLS with a self-signed certificate (an engine's TLS proxy nobody told this machine of)."""
    import socket
    import ssl
    import threading

    from tests.app.self_signed import self_signed_context

    context, _ = self_signed_context(tmp_path_factory.mktemp("tls"))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):  # the relay refused the certificate
                conn.close()
    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_an_engine_behind_an_untrusted_certificate_or_hung_is_said_so_not_asked_if_running(tls_port):
    """The Live tab said 'cannot reach the engine ... (SSLCertVerificationError); is it running?' of an engine behind
    a self-signed certificate, and '(TimeoutError); is it running?' of one that took the connection and never
    answered; both are said by their cause now, as the studio's banner says them."""
    import socket

    _, app = make_app(f"wss://127.0.0.1:{tls_port}", "engine-secret")
    with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
        err = recv(ws)["error"]
    assert err["code"] == "engine_unreachable" and "does not trust" in err["message"], err
    assert "SSL_CERT_FILE" in err["message"] and "is it running" not in err["message"]
    with socket.create_server(("127.0.0.1", 0)) as hung:  # takes connections into its backlog, answers nothing
        proxy, app = make_app(f"ws://127.0.0.1:{hung.getsockname()[1]}", "engine-secret")
        proxy.open_timeout = 0.3
        with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
            err = recv(ws)["error"]
    assert err["code"] == "engine_unreachable" and "did not answer within 0.3 s" in err["message"], err


@pytest.mark.parametrize("moved_to", ["https://engine.example.org", "/ming"])
def test_an_engine_address_that_redirects_is_said_with_the_address_to_give(moved_to):
    """ENGINE_URL=http://box where a front redirects to https://: Start said 'cannot reach the engine at box
    (InvalidURI); is it running?' (websockets tried to follow the redirect to an https:// address). One to another path
    of the same host was followed (here round a loop: 'SecurityError: more than 10 redirects'): never followed now."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(301)
            self.send_header("Location", moved_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        _, app = make_app(f"http://127.0.0.1:{front.server_address[1]}", "engine-secret")
        with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
            err = recv(ws)["error"]
    finally:
        front.shutdown()
        front.server_close()
    assert err["code"] == "engine_unreachable" and "redirects (HTTP 301)" in err["message"], err
    give = moved_to if "://" in moved_to else f"ws://127.0.0.1:{front.server_address[1]}{moved_to}"
    assert f"--engine {give}," in err["message"] and "is it running" not in err["message"], err


@pytest.mark.parametrize("http", ["HTTP/1.1", "HTTP/1.0"])
def test_a_handshake_answered_200_is_said_as_no_websocket_opened_not_as_refused(http):
    """A proxy in front of the engine that does not pass websockets on (nginx without the Upgrade headers) answers the
    relay's handshake 200 with a page or JSON: Start said 'the engine refused the live session: HTTP 200 from ...', a
    success called a refusal, and of an HTTP/1.0 server's answer 'cannot reach the engine ... (InvalidMessage); is it
    running?'. Each says the handshake was answered without opening a websocket, and what does that."""
    from tests.app.canned_http import answering, serving

    class Plain(answering(200, {"ok": True})):
        protocol_version = http  # (nginx answers HTTP/1.1; Python's http.server, by default, 1.0)

    with serving(Plain) as front:
        _, app = make_app(front, "engine-secret")
        with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
            err = recv(ws)["error"]
    assert err["code"] == "engine_unreachable" and "without opening a websocket" in err["message"], err
    assert "Upgrade" in err["message"] and "refused" not in err["message"] and "running?" not in err["message"], err


def test_an_engine_with_every_session_taken_is_said_in_its_own_words():
    """An engine with all its realtime sessions open (64) refuses the handshake with 503 and its reason; Start said
    only 'the engine answered HTTP 503 to the live session'."""
    import threading

    from websockets.sync.server import serve

    refusal = {"error": {"type": "server_error", "code": "session_limit_reached", "param": None,
                         "message": "too many realtime sessions: 64 are open, the limit is 64; try again later"}}

    def full(connection, request):
        answer = connection.respond(503, json.dumps(refusal))
        answer.headers["Content-Type"] = "application/json"
        return answer

    with serve(lambda ws: None, "127.0.0.1", 0, process_request=full) as engine:
        threading.Thread(target=engine.serve_forever, daemon=True).start()
        _, app = make_app(f"ws://127.0.0.1:{engine.socket.getsockname()[1]}", "engine-secret")
        with TestClient(app) as client, client.websocket_connect(LIVE_WS_PATH) as ws:
            err = recv(ws)["error"]
        engine.shutdown()
    assert "too many realtime sessions" in err["message"] and "try again later" in err["message"], err
