"""The studio's engine link against engines that misbehave on the network: one that accepts connections and never
answers (a hung engine, or a network that drops packets) is said as such within the link's check timeout, and no
page load waits behind a check that another visitor's page started."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from app.engine_link import EngineLink
from engine.client import AsyncEngineClient, EngineClient, ServerError
from tests.app.canned_http import answering, serving

CHECK_S = 0.25  # the link's check timeout in these tests (the studio's is CHECK_TIMEOUT_S)
CLIENT_S = 30.0  # the client's own request timeout: what a check waited before


@pytest.fixture(scope="module")
def hung_engine():
    """A port that accepts connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_hung_engine_is_said_not_answering_within_the_check_timeout(hung_engine):
    t0 = time.monotonic()
    link = EngineLink(EngineClient(hung_engine, token="T", timeout=CLIENT_S), check_timeout_s=CHECK_S)
    took = time.monotonic() - t0
    status = link.status()
    assert CHECK_S * 0.9 <= took < CHECK_S + 2.0, took
    assert not status.ok and status.code == "timeout"
    assert "not answering" in status.problem and f"did not answer within {CHECK_S:g} s" in status.problem


def test_a_page_load_does_not_wait_for_a_check_in_flight(hung_engine):
    link = EngineLink(EngineClient(hung_engine, token="T", timeout=CLIENT_S), recheck_s=0.0, check_timeout_s=CHECK_S)
    checking = threading.Thread(target=link.refresh, kwargs={"force": True})
    checking.start()
    time.sleep(0.1)  # that check now waits on the hung engine
    t0 = time.monotonic()
    status = link.status()  # another visitor's page load
    waited = time.monotonic() - t0
    checking.join()
    assert waited < CHECK_S / 2, f"a page load waited {waited:.2f} s for another page's check"
    assert not status.ok and "not answering" in status.problem


def test_an_openai_compatible_engine_that_stops_is_seen_stopped():
    """--engine openai+http://...: the client kept the backend's model card from the first check, so the banner
    showed the model for ever after the engine stopped (and every request then failed)."""
    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    srv = ServerHandle(create_app(FakeEngine(), Limits(), openai_only=True), host="127.0.0.1", port=0).start()
    try:
        link = EngineLink(EngineClient(srv.url.replace("http://", "openai+http://"), timeout=CLIENT_S),
                          check_timeout_s=CHECK_S)
        assert link.status().ok
    finally:
        srv.stop()
    status = link.refresh(force=True)
    assert not status.ok and "not answering" in status.problem
    assert status.info is not None  # what it served is still said ("last seen serving ...")


def test_an_address_where_something_else_answers_is_not_called_a_silent_engine(tmp_path):
    """ENGINE_URL at another web server (a wrong port): its 404 page was said as 'the engine ... is not answering',
    sending the user to look for a stopped engine instead of at the address."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with serving(partial(Quiet, directory=str(tmp_path))) as url:
        status = EngineLink(EngineClient(url, timeout=CLIENT_S), check_timeout_s=5.0).status()
    assert not status.ok and "answered, but not as a Ming engine server does" in status.problem
    assert "HTTP 404" in status.problem and "--port" in status.problem


def test_a_remote_engines_demo_banner_says_to_restart_its_server():
    """A Space (launch.py --engine) driving an engine with the random demo weights told its visitors to run
    'python launch.py --model ...', which starts a second studio and leaves the engine as it was."""
    from app.engine_link import LinkStatus
    from app.ui.banner import banner_html
    from engine.client import ModelInfo

    demo = ModelInfo(id="m", name="ming-tiny-random", is_demo=True, release="2.0", parameters=2_500_000,
                     dtype="float32", device="cpu", placement="", capabilities={"text"})
    status = LinkStatus(True, demo, None, 0.0)
    remote, here = banner_html(status, remote=True), banner_html(status)
    assert "restart the engine server" in remote and "engine.server" in remote and "launch.py" not in remote
    assert "launch.py" in here and "engine.server" not in here


def test_the_banner_says_once_that_a_proxy_holds_the_engines_streams_back_and_how_to_stop_it():
    """A studio behind a buffering proxy showed every tab's progress only at the end of each request, without a word:
    once the client has seen a stream held back (engine.client.core.HeldBackCheck), the banner says so with the fix,
    whether or not the engine is answering at that moment."""
    from app.engine_link import LinkStatus
    from app.ui.banner import banner_html
    from engine.client import ModelInfo
    from engine.client.core import HELD_BACK_NOTE

    link = EngineLink(EngineClient("http://127.0.0.1:9", timeout=1.0), check_timeout_s=CHECK_S)  # (nothing there)
    assert link.held_back is None
    link.client.held_back = HELD_BACK_NOTE  # what the client keeps once a stream came all at once
    real = ModelInfo(id="m", name="Ming", is_demo=False, release="2.0", parameters=10**11, dtype="bfloat16",
                     device="cuda", placement="", capabilities={"text"})
    for status in (LinkStatus(True, real, None, 0.0), link.status()):
        shown = banner_html(status, held_back=link.held_back)
        assert shown.count("Streaming held back") == 1 and "proxy_buffering off" in shown, shown
        assert "Streaming held back" not in banner_html(status)


def test_a_token_sent_unencrypted_over_the_network_is_warned_of():
    """A Space given ENGINE_URL=ws://PUBLIC-IP:8000 sent the engine's token in the clear on every request, silently."""
    from app.engine_link import cleartext_token_warning

    warning = cleartext_token_warning(EngineClient("ws://192.0.2.7:8000", token="sekrit-42"))
    assert warning and "192.0.2.7" in warning and "unencrypted" in warning and "wss://" in warning
    assert "sekrit-42" not in warning
    for quiet in (EngineClient("wss://192.0.2.7:8000", token="T"), EngineClient("ws://127.0.0.1:8000", token="T"),
                  EngineClient("ws://192.0.2.7:8000")):
        assert cleartext_token_warning(quiet) is None


def test_a_request_refused_by_an_engine_shutting_down_says_to_retry_when_it_is_back():
    """A request sent while the engine restarted read only 'Error (server_shutting_down): the server is shutting
    down', with nothing said of what to do; now as the other ways the engine goes away."""
    from app.ui.common import RETRY_WHEN_BACK, error_line
    from engine.events import Error

    line = error_line(Error("the server is shutting down", "server_shutting_down"))
    assert "shutting down" in line and RETRY_WHEN_BACK in line


def test_an_engine_that_hangs_after_answering_does_not_hold_the_voice_lists(hung_engine):
    """An engine seen with a talker, then hung: each page load's voice list (and Live's Start) waited the client's
    whole request timeout for the voice library; once the link finds it down, nothing is asked."""
    from app.ui.common import saved_voice_names

    card = b'{"data": [{"id": "m", "capabilities": ["text", "speech_out"]}]}'
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)

        def answer_once():
            conn, _ = s.accept()
            with conn:  # the first check is answered; later connections wait in the backlog, unanswered
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(card)).encode() + b"\r\n\r\n" + card)
        threading.Thread(target=answer_once, daemon=True).start()
        link = EngineLink(EngineClient(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=CLIENT_S),
                          recheck_s=60.0, check_timeout_s=CHECK_S)
        assert link.status().ok and link.has("speech_out")
        assert not link.refresh(force=True).ok  # it hangs now
        t0 = time.monotonic()
        assert saved_voice_names(link) == []
        assert time.monotonic() - t0 < CHECK_S


@pytest.fixture(scope="module")
def engine_hung_on_lists():
    """An engine whose model card (with a talker) answers at once and whose voice library and speech options never
    answer (a stuck worker behind a live front): the link finds it up, so the page asks it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    card = b'{"data": [{"id": "m", "capabilities": ["text", "speech_out"]}]}'
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/v1/models":
                release.wait()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(card)))
            self.end_headers()
            self.wfile.write(card)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_a_voice_list_the_engine_never_sends_is_given_up_after_the_check_timeout(engine_hung_on_lists):
    """The link finds the engine up (its card answers) but its voice library hangs: each page load's voice list (Chat,
    Voice) and Live's Start waited the client's whole request timeout (60 s)."""
    from app.ui.common import saved_voice_names

    link = EngineLink(EngineClient(engine_hung_on_lists, timeout=CLIENT_S), recheck_s=60.0, check_timeout_s=CHECK_S)
    assert link.status().ok and link.has("speech_out")
    t0 = time.monotonic()
    assert saved_voice_names(link) == []
    assert time.monotonic() - t0 < CHECK_S + 1.0


@pytest.mark.parametrize("ask", ["health", "voices", "speech_options"])
def test_the_clients_page_time_questions_take_a_timeout(engine_hung_on_lists, ask):
    from engine.client import ServerError

    client = EngineClient(engine_hung_on_lists, timeout=CLIENT_S)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as refused:
        getattr(client, ask)(timeout=CHECK_S)
    assert time.monotonic() - t0 < CHECK_S + 1.0
    assert refused.value.code == "timeout" and f"did not answer within {CHECK_S:g} s" in str(refused.value)


@pytest.fixture(scope="module")
def engine_with_parts():
    """An engine whose model card the test changes (`parts`: its capabilities), as an engine restarted with other
    parts (a talker, an image generator) between two of the studio's checks."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parts = ["text", "audio_in", "speech_out", "image_out", "realtime"]
    card = {}  # the rest of its card (the test's: image_defaults)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            answer = ({"data": [{"id": "m", "capabilities": parts, **card}]} if self.path == "/v1/models"
                      else {"data": []})
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", parts, card
    server.shutdown()
    server.server_close()


def test_a_page_follows_an_engine_restarted_with_other_parts(engine_with_parts):
    """An engine restarted without its talker and image generator between two checks (the banner saw it answer both
    times): the tabs' notes ("no talker", "no image generator") were worked out at page load only, and the controls
    that follow the engine were set again only when it went away or came back, so the page offered what the engine no
    longer had until a reload."""
    gr = pytest.importorskip("gradio")
    from app.engine_link import IMAGE_OUT, SPEECH_OUT
    from app.ui.banner import build_banner
    from app.ui.common import capability_note

    url, parts, _ = engine_with_parts
    link = EngineLink(EngineClient(url, timeout=CLIENT_S), recheck_s=60.0)
    with gr.Blocks() as demo:  # the banner and two tabs' notes, as the studio builds them (app/studio.py)
        build_banner(link)
        capability_note(link, SPEECH_OUT, "This engine has no talker.")
        capability_note(link, IMAGE_OUT, "This engine has no image generator.")
    engine_state = demo.engine_up
    tick = next(f.fn for f in demo.fns.values() if any(event == "tick" for _, event in f.targets))
    followers = [f for f in demo.fns.values() if (engine_state._id, "change") in f.targets]
    notes = [f.fn for f in followers if [type(o).__name__ for o in f.outputs] == ["Markdown"]]

    _, before = tick()
    assert not any(note() for note in notes)  # it has every part: no tab says it lacks one
    parts.remove("speech_out")
    parts.remove("image_out")
    link.refresh(force=True)  # the banner's next check (every few seconds)
    _, after = tick()
    assert after != before, "the page's engine state did not change, so nothing on it would follow"
    said = " ".join(note() for note in notes)
    assert "no talker" in said and "no image generator" in said


def test_the_image_tabs_preview_controls_follow_an_engine_restarted_as_another_release(engine_with_parts):
    """An engine restarted as the Preview (it guides at 5.0 and takes an image guidance) while a page was open: the
    Image tab's Image guidance slider stayed hidden and Guidance at 2.0's default until a reload (the other tabs
    follow the engine as it changes). They now follow it; an engine that goes away and comes back as it was leaves
    the user's values alone."""
    gr = pytest.importorskip("gradio")
    from app.ui.banner import build_banner
    from app.ui.image import build_image_tab

    url, _, card = engine_with_parts
    card["image_defaults"] = {"steps": 28, "guidance": 2.0}  # a 2.0 engine's
    try:
        link = EngineLink(EngineClient(url, timeout=CLIENT_S), recheck_s=60.0)
        with gr.Blocks() as demo:  # the banner and the Image tab, as the studio builds them (app/studio.py)
            build_banner(link)
            build_image_tab(link)
        engine_state = demo.engine_up
        follower = next(f.fn for f in demo.fns.values() if (engine_state._id, "change") in f.targets
                        and [getattr(o, "label", "") for o in f.outputs][:3] == ["Steps", "Guidance",
                                                                                  "Image guidance (Edit / Segment)"])
        *shown, applied = follower(None)  # (what the page load gives: the same function)
        assert [u.get("value") for u in shown[:2]] == [28, 2.0] and shown[2].get("visible") is False
        card["image_defaults"] = {"steps": 28, "guidance": 5.0, "image_guidance": 2.0}  # restarted as the Preview
        link.refresh(force=True)
        *shown, applied = follower(applied)
        assert shown[1].get("value") == 5.0 and shown[2].get("visible") is True and shown[2].get("value") == 2.0
        link.refresh(force=True)  # it went away and came back as it was: the user's values stay
        *shown, again = follower(applied)
        assert again == applied and all("value" not in u and "visible" not in u for u in shown), shown
    finally:
        card.clear()


def test_the_live_tabs_note_and_voices_are_asked_again_when_the_engine_changes(engine_with_parts):
    """The Live tab's "this engine has no speech output" note and its voice list were asked at page load and at Start
    only, where the other tabs follow the engine as the banner sees it change: the studio now has the page ask the tab
    again then (the page side: tests/app/test_live_browser.py, with follow_engine_js)."""
    gr = pytest.importorskip("gradio")
    from app.ui.banner import build_banner
    from app.ui.live import build_live_tab, engine_settings, follow_engine_js

    link = EngineLink(EngineClient(engine_with_parts[0], timeout=CLIENT_S), recheck_s=60.0)
    with gr.Blocks() as demo:  # as the studio builds it (app/studio.py)
        build_banner(link)
        build_live_tab(settings=engine_settings(link))
    on_change = [f for f in demo.fns.values() if (demo.engine_up._id, "change") in f.targets]
    assert [f.js for f in on_change] == [follow_engine_js()] and on_change[0].fn is None


@pytest.fixture(scope="module")
def redirect_to_https():
    """A front that answers every request, a websocket handshake too, with a redirect to https:// (nginx's `return 301
    https://$host$request_uri` on port 80)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(301)
            self.send_header("Location", "https://engine.example.org" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_engine_address_that_redirects_says_where_to(redirect_to_https):
    """ENGINE_URL=http://box (a front that redirects to https://): the banner said the server 'answered, but not as a
    Ming engine server does (the server's answer is not JSON)', Speech 'the stream ended without a result' and Chat
    'InvalidURI: https://... isn't a valid URI'. Each now says the address redirects and the one to give instead."""
    from engine.events import Error

    client = EngineClient(redirect_to_https, token="sekrit-42", timeout=CLIENT_S)
    problem = EngineLink(client, check_timeout_s=CHECK_S * 8).status().problem
    spoken = list(client.speak("hello"))
    chatted = list(client.chat([{"role": "user", "content": "hi"}]))  # (the realtime socket)
    for said in (problem, spoken[-1].message, chatted[-1].message):
        assert "redirects (HTTP 301) to https://engine.example.org/" in said, said
        assert "--engine https://engine.example.org," in said and "sekrit-42" not in said, said
    assert isinstance(spoken[-1], Error) and len(spoken) == len(chatted) == 1


@pytest.fixture(scope="module")
def self_signed_engine(tmp_path_factory, engine_with_parts):
    """(the https:// URL of an engine behind a self-signed certificate, that certificate's file)."""
    import ssl
    from urllib.parse import urlsplit

    from tests.app.self_signed import self_signed_context

    context, cert = self_signed_context(tmp_path_factory.mktemp("tls"))
    plain_port = urlsplit(engine_with_parts[0]).port
    with socket.socket() as listener:  # TLS in front of the plain card server, as an engine's TLS proxy
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def relay(conn):
            try:
                with context.wrap_socket(conn, server_side=True) as tls, socket.create_connection(
                        ("127.0.0.1", plain_port)) as plain:
                    plain.sendall(tls.recv(65536))
                    while chunk := plain.recv(65536):
                        tls.sendall(chunk)
            except (OSError, ssl.SSLError):  # the client refused the certificate
                pass

        def serve():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=relay, args=(conn,), daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        yield f"https://127.0.0.1:{listener.getsockname()[1]}", cert


def test_an_untrusted_certificate_is_said_with_the_way_to_trust_it(self_signed_engine, monkeypatch):
    """An engine behind a self-signed certificate: the banner said 'the engine ... is not answering (connect_failed:
    ... SSLCertVerificationError ...)', sending the user to look for a stopped engine; it says the certificate is not
    trusted and how to trust it (SSL_CERT_FILE, which both transports read), and that works."""
    url, cert = self_signed_engine
    status = EngineLink(EngineClient(url, timeout=CLIENT_S), check_timeout_s=5.0).status()
    assert not status.ok and "not answering" not in status.problem
    assert "does not trust" in status.problem and "self-signed" in status.problem, status.problem
    assert "SSL_CERT_FILE" in status.problem
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert EngineLink(EngineClient(url, timeout=CLIENT_S), check_timeout_s=5.0).status().ok


def test_https_to_an_engine_that_serves_plain_http_says_to_give_its_http_address(engine_with_parts):
    status = EngineLink(EngineClient(engine_with_parts[0].replace("http://", "https://"), timeout=CLIENT_S),
                        check_timeout_s=5.0).status()
    assert not status.ok and "could not open TLS" in status.problem and "http://" in status.problem, status.problem


def test_an_engine_answering_503_while_it_starts_is_not_said_as_not_answering():
    """An engine (or its proxy) answering 503 'model is loading, retry in 10 s' was said as 'the engine ... is not
    answering (... model is loading ...)': it answered. The banner says it answered that it cannot serve yet, with
    its words and when it asks to be tried again."""
    starting = answering(503, {"detail": "model is loading"}, {"Retry-After": "10"})
    with serving(starting) as url:
        status = EngineLink(EngineClient(url, timeout=CLIENT_S), check_timeout_s=5.0).status()
    assert not status.ok and "not answering" not in status.problem, status.problem
    assert "cannot serve yet" in status.problem and "model is loading" in status.problem
    assert "try again in 10 s" in status.problem


def cut_answers(*answers: bytes):
    """A handler answering each GET, in turn, with the next of `answers`' raw bytes (a head and a body the connection
    ends before it is whole), then closing the connection."""
    left = list(answers)

    class Cut(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.wfile.write(left.pop(0))
            self.close_connection = True

        def log_message(self, *args):  # (quiet)
            pass

    return Cut


def test_a_card_cut_off_before_its_end_is_said_as_cut_off_not_as_unreachable():
    """A model card shorter than its Content-Length, or whose chunked body ended mid-chunk (the server or a proxy closed
    it), was said as 'could not reach the engine server ... RemoteProtocolError' and the banner as 'is not answering':
    it had answered. Both say the answer was cut off."""
    card = b'{"object": "list", "data": [{"id": "m"}]}'
    short = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n" + card
    mid_chunk = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"100\r\n" + card)
    async def checked_async(url):
        async with AsyncEngineClient(url, timeout=CLIENT_S) as client:
            with pytest.raises(ServerError) as checked:
                await client.info()
            return checked.value.message

    with serving(cut_answers(short, mid_chunk, short, mid_chunk)) as url:
        client = EngineClient(url, timeout=CLIENT_S)
        with pytest.raises(ServerError) as checked:
            client.info()
        said = [checked.value.message, asyncio.run(checked_async(url))]
        said += [EngineLink(client, check_timeout_s=5.0).status().problem]
        said += [EngineLink(client, check_timeout_s=5.0).status().problem]
    for problem in said:
        assert "was cut off" in problem and "could not reach" not in problem and "not answering" not in problem, problem
