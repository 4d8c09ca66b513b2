"""OpenAI's presence and frequency penalties in a realtime session: chat completions and response.create took them,
session.update refused them as unknown fields. They are our documented extension in both (OpenAI's Realtime API has
none), checked as chat completions checks them, and the session object shows them."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from tests.server import FakeEngine, fake_server, recv_item, recv_json, recv_until


@pytest.fixture(scope="module")
def engine_and_server():
    engine = FakeEngine()
    with fake_server(engine) as srv:
        yield engine, srv


def ask(ws, response: dict | None = None):
    ws.send(json.dumps({"type": "conversation.item.create",
                        "item": {"type": "message", "role": "user", "content": "hi"}}))
    recv_item(ws)
    ws.send(json.dumps({"type": "response.create", **({"response": response} if response else {})}))
    recv_until(ws, "response.done")


def test_session_penalties_are_kept_shown_and_used_until_a_response_overrides_them(engine_and_server):
    engine, srv = engine_and_server
    with connect(srv.ws_url) as ws:
        created = recv_json(ws)["session"]
        assert (created["presence_penalty"], created["frequency_penalty"]) == (0.0, 0.0)
        ws.send(json.dumps({"type": "session.update", "session": {"presence_penalty": 1.5, "frequency_penalty": -0.5}}))
        updated = recv_json(ws)
        assert updated["type"] == "session.updated", updated
        assert (updated["session"]["presence_penalty"], updated["session"]["frequency_penalty"]) == (1.5, -0.5)
        ask(ws)
        params = engine.calls[-1]["params"]
        assert (params.presence_penalty, params.frequency_penalty) == (1.5, -0.5)
        ask(ws, {"frequency_penalty": 2})  # for this response only
        assert (engine.calls[-1]["params"].presence_penalty, engine.calls[-1]["params"].frequency_penalty) == (1.5, 2)


@pytest.mark.parametrize("field, value, code", [("presence_penalty", 2.5, "invalid_value"),
                                                ("frequency_penalty", "1", "invalid_type")])
def test_a_penalty_out_of_openais_range_is_refused_naming_it_and_nothing_is_applied(engine_and_server, field, value,
                                                                                    code):
    _, srv = engine_and_server
    with connect(srv.ws_url) as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "session.update", "session": {"temperature": 0.5, field: value}}))
        err = recv_json(ws)
        assert err["type"] == "error" and (err["error"]["code"], err["error"]["param"]) == (code, f"session.{field}")
        ws.send(json.dumps({"type": "session.update", "session": {}}))
        assert recv_json(ws)["session"]["temperature"] == 0.0  # the update applied whole or not at all
