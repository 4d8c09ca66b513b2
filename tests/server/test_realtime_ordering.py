"""Realtime events that arrive while a response runs, in orders a client may send them: each is applied in a
way that keeps the conversation's order, or refused with a clear error, and the session goes on. One server
around a FakeEngine whose reply takes a while (each event after a pause) for the file."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from engine.events import Done, TextDelta
from tests.server import FakeEngine, b64, fake_server, recv_json, recv_until, tone_pcm16

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


def test_a_response_created_right_after_cancelling_the_running_one_runs(server):
    with connect(server.ws_url) as ws:
        recv_json(ws)  # session.created
        user_item(ws)
        send(ws, {"type": "response.create"})
        first = recv_until(ws, "response.output_text.delta")[-1]["response_id"]
        send(ws, {"type": "response.cancel"})  # a client's barge-in: cancel, the user's new turn, a response to it
        send(ws, {"type": "conversation.item.create",
                  "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "stop"}]}})
        send(ws, {"type": "response.create", "event_id": "again"})  # (all sent at once)
        events = recv_until(ws, "response.done", 10) + recv_until(ws, "response.done", 10)
        # (before: conversation_already_has_active_response, and no second response)
        assert [e["error"] for e in events if e["type"] == "error"] == []
        done = [e["response"] for e in events if e["type"] == "response.done"]
        assert [(r["id"] == first, r["status"]) for r in done] == [(True, "cancelled"), (False, "completed")]


def test_truncating_a_users_spoken_item_says_only_a_reply_can_be_truncated(server):
    with connect(server.ws_url) as ws:
        recv_json(ws)  # session.created
        send(ws, {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_audio", "audio": b64(tone_pcm16(0.5, 24000).tobytes())}]}})
        spoken = recv_until(ws, "conversation.item.done")[-1]["item"]["id"]
        send(ws, {"type": "conversation.item.truncate", "item_id": spoken, "content_index": 0, "audio_end_ms": 100})
        error = recv_json(ws)["error"]
        # (before: "item ... has no audio to truncate", of an item holding half a second of it)
        assert (error["code"], error["param"]) == ("invalid_value", "item_id")
        assert "user message" in error["message"] and "assistant" in error["message"], error


def test_events_a_client_sent_before_it_left_are_not_run_once_its_socket_cannot_be_written():
    """A client that flooded response.create and left: every event it had sent was still handled (jobs started and
    cancelled) until the disconnect came through, its session slot held for seconds; once the socket cannot be written
    the session stops reading and ends."""
    import asyncio
    from types import SimpleNamespace

    from engine.server.limits import Limits
    from engine.server.realtime import RealtimeConnection

    class GoneSocket:
        def __init__(self, events: int):
            self.left = events

        async def send_text(self, text: str) -> None:
            raise ConnectionResetError("the client left")

        async def receive(self) -> dict:
            await asyncio.sleep(0.01)  # (the writer meets the closed socket meanwhile)
            self.left -= 1
            if self.left < 0:
                return {"type": "websocket.disconnect", "code": 1006}
            return {"type": "websocket.receive", "text": '{"type": "response.create"}'}

    closed = []
    settings = SimpleNamespace(to_dict=lambda *_: {})
    session = SimpleNamespace(id="sess_1", settings=settings, active=None)
    ctx = SimpleNamespace(limits=Limits(), model_id="m", sessions=SimpleNamespace(close=closed.append), scheduler=None)
    conn = RealtimeConnection(GoneSocket(events=50), ctx, session)
    handled = []

    async def handle(text: str) -> None:
        handled.append(text)

    conn.handle = handle
    asyncio.run(conn.run())
    assert closed == [session]
    assert len(handled) <= 1, f"{len(handled)} events of a client that had left were run"
