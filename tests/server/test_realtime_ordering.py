"""Realtime events that arrive while a response runs, in orders a client may send them: each is applied in a
way that keeps the conversation's order, or refused with a clear error, and the session goes on. One server
around a FakeEngine whose reply takes a while (each event after a pause) for the file."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from engine.events import Done, TextDelta
from tests.server import FakeEngine, fake_server, recv_json, recv_until

WORDS = 40
STEP_S = 0.02  # the fake engine's pause before each event: a reply takes WORDS * STEP_S


@pytest.fixture(scope="module")
def server():
    script = [TextDelta(f"w{i} ") for i in range(WORDS)] + [Done("".join(f"w{i} " for i in range(WORDS)), "stop")]
    with fake_server(FakeEngine(script, step_s=STEP_S)) as srv:
        yield srv


def send(ws, event: dict) -> None:
    ws.send(json.dumps(event))


def user_item(ws, text: str = "hi") -> str:
    """Create a user message item; its id, once it has joined (a running response's events read past)."""
    send(ws, {"type": "conversation.item.create",
              "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    while True:
        event = recv_json(ws)
        if event["type"] == "conversation.item.done" and event["item"]["role"] == "user":
            return event["item"]["id"]
        assert event["type"] != "error", event


def test_the_item_a_running_reply_follows_cannot_be_deleted_until_it_ends(server):
    with connect(server.ws_url) as ws:
        recv_json(ws)  # session.created
        asked = user_item(ws)
        send(ws, {"type": "response.create"})
        reply = recv_until(ws, "conversation.item.added")[-1]["item"]["id"]
        later = user_item(ws, "and then?")  # (joins after the reply being written)
        send(ws, {"type": "conversation.item.delete", "item_id": asked, "event_id": "del"})
        events = recv_until(ws, "response.done")
        errors = [e["error"] for e in events if e["type"] == "error"]
        # (before: deleted; the reply, which follows it, then joined at the end, after the user's later item)
        assert [(e["code"], e["param"], e["event_id"]) for e in errors] == [("invalid_state", "item_id", "del")]
        done = next(e for e in events if e["type"] == "conversation.item.done" and e["item"]["id"] == reply)
        assert done["previous_item_id"] == asked
        send(ws, {"type": "conversation.item.delete", "item_id": asked})  # (the reply has joined: it may go now)
        deleted = recv_until(ws, "conversation.item.deleted")[-1]
        assert deleted["item_id"] == asked
        session, = server.ctx.sessions.open.values()
        assert [item.id for item in session.items] == [reply, later]
