"""Auth: a non-loopback bind without a token is refused at start-up (also from the command line);
with a token every request needs it (Bearer header or ?token= for browsers), compared in constant
time; loopback without a token stays open. Plus the command line serving for real."""

import hmac
import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from engine.server import auth
from engine.server.auth import StartupRefused, check_bind
from tests.paths import REPO
from tests.server import running_server

TOKEN = "s3cret-token_42+/="


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_bind_without_token_is_refused(host):
    with pytest.raises(StartupRefused, match="--token"):
        check_bind(host, None)
    check_bind(host, "t")  # with a token it may serve
    for bad in ("  ", "has space", "tokén"):
        with pytest.raises(StartupRefused):
            check_bind(host, bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_without_token_is_allowed(host):
    check_bind(host, None)


def test_an_in_process_server_refuses_a_public_bind_without_token_too():
    from engine.server import ServerHandle, create_app
    from tests.server import FakeEngine

    with pytest.raises(StartupRefused, match="--token"):
        ServerHandle(create_app(FakeEngine()), host="0.0.0.0")


def test_token_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.token_matches("abc", "abc") and not auth.token_matches("abd", "abc")
    assert not auth.token_matches(None, "abc") and not auth.token_matches("\ud800", "abc")
    assert calls and all(c == (bytes, bytes) for c in calls)


def test_with_a_token_every_request_needs_it(tiny_engine):
    with running_server(tiny_engine, token=TOKEN) as srv:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # liveness stays open, it tells nothing secret
        ok = httpx.post(srv.url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        ok = httpx.get(srv.url + "/v1/models", params={"token": TOKEN})
        assert ok.status_code == 200
        # the official client sends its api_key as the Bearer token
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=TOKEN, max_retries=0) as c:
            assert c.chat.completions.create(model="default", messages=chat["messages"], max_tokens=2).choices
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        # websockets: refused at the handshake without it; header or query parameter let in
        with pytest.raises(InvalidStatus) as info:
            connect(srv.ws_url).close()
        assert info.value.response.status_code == 401
        assert json.loads(info.value.response.body)["error"]["code"] == "unauthorized"
        with pytest.raises(InvalidStatus):
            connect(srv.ws_url + "?token=wrong").close()
        with connect(srv.ws_url + "?token=" + quote(TOKEN, safe="")) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with connect(srv.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_refuses_public_bind_without_token_before_loading():
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "MING_SERVER_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "engine.server", "--host", "0.0.0.0"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "refusing to listen on '0.0.0.0' without a token" in r.stderr
    assert time.monotonic() - t0 < 30  # refused up front, no model load


def test_command_line_serves_the_model(tiny_checkpoint):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MING_SERVER_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.server", "--model", str(tiny_checkpoint), "--port",
                             str(port), "--token", "cli-token", "--threads", "1", "--log-level", "info"],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": "Bearer cli-token"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert r.json()["model"] == tiny_checkpoint.name
        # the access log (uvicorn's, as the command line configures it) never shows a token, right or wrong
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models?token=cli-token", timeout=30).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models?token=not-the-token", timeout=30).status_code == 401
    finally:
        proc.terminate()
        proc.wait(20)
    log = proc.stdout.read() + proc.stderr.read()  # (uvicorn's access lines go to stdout)
    assert "/v1/models?token=[redacted]" in log
    assert "cli-token" not in log and "not-the-token" not in log


def test_a_browser_websocket_sends_its_key_as_openais_sdk_does_and_gets_the_subprotocol_it_offered():
    """OpenAI's browser SDK cannot set headers on a websocket: it offers the subprotocols "realtime" and
    "openai-insecure-api-key.<key>". The key was not read (401) and the handshake named no subprotocol,
    which a browser treats as a failed connection when it offered some."""
    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    key = "sk-browser_key.42"  # (a subprotocol is an HTTP token: no '/', '+' or '=')
    with ServerHandle(create_app(FakeEngine(), Limits(), token=key)) as srv:
        offered = ["realtime", "openai-insecure-api-key." + key, "openai-beta.realtime-v1"]
        with connect(srv.ws_url, subprotocols=offered) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with pytest.raises(InvalidStatus) as refused:
            connect(srv.ws_url, subprotocols=["realtime", "openai-insecure-api-key.wrong"]).close()
        assert refused.value.response.status_code == 401
        with connect(srv.ws_url + "?token=" + key, subprotocols=["other"]) as ws:
            assert ws.subprotocol is None  # only "realtime" is answered; never a key


@pytest.fixture(scope="module")
def fake_with_token():
    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    with ServerHandle(create_app(FakeEngine(), Limits(), token=TOKEN)) as srv:
        yield srv


@pytest.mark.parametrize("query, headers, param", [
    ([("token", TOKEN), ("token", "other")], [], "token"),
    ([("token", "other"), ("token", TOKEN)], [], "token"),
    ([("token", TOKEN), ("token", TOKEN)], [], "token"),
    ([], [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")], "Authorization"),
    ([("token", "other")], [("Authorization", f"Bearer {TOKEN}")], "token"),
    ([("token", TOKEN)], [("Authorization", "Bearer other")], "token"),
])
def test_a_token_given_twice_or_in_two_places_that_disagree_is_refused_naming_the_parameter(fake_with_token, query,
                                                                                           headers, param):
    """`?token=a&token=b` took the first value and two Authorization headers the first: which one the server checks
    must not be the client's guess (a proxy adding a header, a URL with the token pasted twice). Refused alike, 400,
    whichever of them is right."""
    from tests.server import handshake_answer

    srv = fake_with_token
    r = httpx.get(srv.url + "/v1/models", params=query, headers=headers)
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (400, "invalid_value", param), r.text
    assert TOKEN not in err["message"] and "other" not in err["message"]
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    path = "/v1/realtime?" + "&".join(f"token={quote(value, safe='')}" for _, value in query)
    assert handshake_answer(srv.port, path, extra).startswith(b"HTTP/1.1 400")
    # the same token in the header and the query is one token, not a disagreement
    same = httpx.get(srv.url + "/v1/models", params={"token": TOKEN}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert same.status_code == 200
