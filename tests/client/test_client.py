"""engine/client.py against a real server: events as a sync and an async iterator, server errors as
exceptions or as error events, and a clean reconnect that carries the conversation over."""

import asyncio

import numpy as np
import pytest

from engine.client import (AsyncRealtimeClient, AsyncStudioClient, ConnectionLost, RealtimeClient, ServerError,
                           StudioClient)
from tests.server import SYSTEM, reference_chat, running_server, tone_pcm16, wav_bytes


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_sessions=3) as srv:
        yield srv


def deltas(events) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.text.delta")


def test_sync_realtime_client_streams_and_raises_server_errors(server, tiny_engine):
    with RealtimeClient(server.ws_url) as rt:
        with pytest.raises(ServerError) as info:
            list(rt.respond())  # nothing in the conversation yet
        assert info.value.code == "conversation_empty"
        with pytest.raises(ServerError) as info:
            rt.update_session(output_modalities=["audio"])
        assert info.value.code == "modality_not_supported"
        rt.update_session(instructions=SYSTEM, max_output_tokens=4)
        rt.add_message("user", "Hello there")
        events = list(rt.respond())
    assert [e["type"] for e in events][:2] == ["response.created", "response.queue_position"]
    expected = reference_chat(tiny_engine, [{"role": "user", "content": "Hello there"}], 4, system_prompt=SYSTEM)
    assert deltas(events) == expected.text and events[-1]["type"] == "response.done"


def test_errors_as_events_when_asked(server):
    with RealtimeClient(server.ws_url, raise_errors=False) as rt:
        events = list(rt.respond())
        assert len(events) == 1 and events[0]["type"] == "error"
        assert events[0]["error"]["code"] == "conversation_empty"
        rt.send({"type": "no.such.event", "event_id": "x1"})
        ev = rt.recv(timeout=10)
        assert ev["type"] == "error" and ev["error"]["code"] == "unknown_event" and ev["error"]["event_id"] == "x1"


def test_async_realtime_client(server, tiny_engine):
    async def main():
        async with AsyncRealtimeClient(server.ws_url) as rt:
            await rt.update_session(instructions=SYSTEM)
            await rt.add_message("user", "Async hello")
            return [ev async for ev in rt.respond(max_output_tokens=3)]

    events = asyncio.run(main())
    expected = reference_chat(tiny_engine, [{"role": "user", "content": "Async hello"}], 3, system_prompt=SYSTEM)
    assert deltas(events) == expected.text


def test_reconnect_replays_settings_and_conversation(server, tiny_engine):
    pcm = tone_pcm16(0.4)
    with RealtimeClient(server.ws_url) as rt:
        first_id = rt.session["id"]
        rt.update_session(instructions=SYSTEM, max_output_tokens=3)
        rt.add_message("user", "Remember this.")
        rt.append_audio(pcm, 16000)
        rt.commit_audio()
        reply = deltas(list(rt.respond()))
        rt.ws.close()  # the connection drops
        with pytest.raises(ConnectionLost):
            rt.recv(timeout=5)
        session = rt.reconnect()
        assert session["id"] != first_id and rt.session["instructions"] == SYSTEM
        rt.add_message("user", "And now?")
        events = list(rt.respond())
    messages = [{"role": "user", "content": "Remember this."},
                {"role": "user", "content": [{"type": "audio", "audio": pcm, "sample_rate": 16000}]},
                {"role": "assistant", "content": reply}, {"role": "user", "content": "And now?"}]
    expected = reference_chat(tiny_engine, messages, 3, system_prompt=SYSTEM)
    assert events[-1]["response"]["usage"]["input_tokens"] == expected.stats.prompt_tokens
    assert deltas(events) == expected.text


def test_session_limit_surfaces_as_an_exception(server):
    with RealtimeClient(server.ws_url), RealtimeClient(server.ws_url), RealtimeClient(server.ws_url):
        with pytest.raises(ServerError) as info:
            RealtimeClient(server.ws_url).connect()
        assert info.value.code == "session_limit_reached"


def test_http_clients(server, tiny_engine):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "HTTP hello"}]
    expected = reference_chat(tiny_engine, msgs[1:], 4, system_prompt=SYSTEM)
    with StudioClient(server.url) as c:
        assert c.health()["status"] == "ok" and c.models()[0]["id"] == server.ctx.model_id
        events = list(c.chat_stream(msgs, max_tokens=4))
        assert events[0]["type"] == "queue_position" and events[-1]["type"] == "done"
        assert "".join(e["text"] for e in events if e["type"] == "delta") == expected.text
        assert c.chat(msgs, max_tokens=4)["choices"][0]["message"]["content"] == expected.text
        out = c.transcribe(wav_bytes(tone_pcm16(0.5)), hotwords=["Ming"], dialect="上海", max_tokens=4)
        assert out["language"] == "上海" and isinstance(out["text"], str)
        with pytest.raises(ServerError) as info:
            list(c.chat_stream(msgs, max_tokens=0))
        assert info.value.status == 400 and info.value.code == "invalid_value"

    async def main():
        async with AsyncStudioClient(server.url) as ac:
            return [e async for e in ac.chat_stream(msgs, max_tokens=4)]

    events = asyncio.run(main())
    assert "".join(e["text"] for e in events if e["type"] == "delta") == expected.text
    assert np.isfinite(events[-1]["metrics"]["time_to_first_token_ms"])
