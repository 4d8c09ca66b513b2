"""The Live tab's relay (app/live_proxy.py) in front of a real engine server (the tiny engine), with
hands-free clients that speak our generated questions: a second tab of the same user takes the
session over and the first tab's answer stops; a tab closed mid-reply leaves nothing running on the
engine (no session, nothing generating or waiting)."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.live_proxy import LIVE_WS_PATH, LiveProxy
from tests.server import running_server, wait_for
from tests.server.live import LiveClient, silence, speech

pytest.importorskip("silero_vad")

HANDS_FREE = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
              "video": {"window_seconds": 8, "fps": 1}, "max_output_tokens": 300}


@pytest.fixture(scope="module")
def engine_with_proxy(tiny_engine):
    """(engine server, the relay's websocket URL): the relay route served by the same app."""
    with running_server(tiny_engine) as srv:
        proxy = LiveProxy(lambda: (srv.url, None))
        srv.app.router.routes.append(proxy.route())
        yield srv, f"ws://127.0.0.1:{srv.port}{LIVE_WS_PATH}"


def start_talking(ws) -> tuple[LiveClient, str]:
    """A tab asks its question; returns once the answer streams."""
    c = LiveClient(ws)
    c.drain(10)
    c.send(type="session.update", session=HANDS_FREE)
    c.wait(lambda t: "session.updated" in t)
    sid = c.events[-1][1]["session"]["id"]
    c.stream(speech(), pace=4)
    c.stream(silence(3.0), pace=2, until=lambda t: "response.output_text.delta" in t)
    assert "response.output_text.delta" in c.types(), c.types()
    return c, sid


def idle(srv) -> bool:
    return srv.ctx.scheduler.running == 0 and srv.ctx.scheduler.waiting == 0


def test_a_second_tab_takes_over_and_a_tab_closed_mid_reply_leaves_nothing_running(engine_with_proxy):
    srv, url = engine_with_proxy
    with ExitStack() as tabs:
        first, sid1 = start_talking(tabs.enter_context(connect(url + "?client=u1", max_size=None)))
        second_ws = tabs.enter_context(connect(url + "?client=u1", max_size=None))  # the same user again
        replaced = None
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ev = json.loads(first.ws.recv(timeout=10))
                replaced = ev if ev["type"] == "error" else replaced
        assert replaced["error"]["code"] == "live_session_replaced" and closed.value.rcvd.code == 4000
        wait_for(lambda: sid1 not in srv.ctx.sessions.open)  # the first tab's engine session ended ...
        rec1 = wait_for(lambda: next((r for r in srv.ctx.scheduler.history if r.label.endswith(sid1)), None))
        assert rec1.finish_reason == "cancelled" and rec1.new_tokens < 300  # ... and its answer stopped
        _, sid2 = start_talking(second_ws)
        assert list(srv.ctx.sessions.open) == [sid2]
    # the second tab was closed while its answer streamed
    rec2 = wait_for(lambda: next((r for r in srv.ctx.scheduler.history if r.label.endswith(sid2)), None))
    assert rec2.finish_reason == "cancelled" and rec2.new_tokens < 300
    wait_for(lambda: len(srv.ctx.sessions) == 0)
    wait_for(lambda: idle(srv))
