"""engine.client against a real server on loopback: chat and transcription as engine events (sync and
async, realtime and HTTP), server errors as Error events with the server's code, cancel reaching a
request whether queued or running, a dead or unreachable server as an error (never a hang), the
realtime session client with reconnect, and the same methods on both sides, without torch."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from engine.client import (AsyncEngineClient, AsyncRealtimeClient, ConnectionLost, Endpoints, EngineClient,
                           RealtimeClient, ServerError)
from engine.client.core import env_settings
from engine.events import (PREFILL_STAGE, AudioChunk, Done, Error, GenerationStats, Progress, QueuePosition,
                           TextDelta)
from tests.paths import REPO
from tests.server import (SYSTEM, FakeEngine, every_kind_script, fake_server, image_array, long_prompt, png_bytes,
                          reference_chat, running_server, tone_pcm16, wait_for, wav_bytes)


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_sessions=4) as srv:
        yield srv


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def one_final(events):
    finals = [e for e in events if isinstance(e, (Done, Error))]
    assert len(finals) == 1 and events[-1] is finals[0], events
    return finals[0]


def public_methods(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, callable)
            if not name.startswith("_")}


@pytest.mark.parametrize("sync_cls, async_cls", [(EngineClient, AsyncEngineClient),
                                                 (RealtimeClient, AsyncRealtimeClient)])
def test_sync_and_async_clients_offer_the_same_methods(sync_cls, async_cls):
    sync_m, async_m = public_methods(sync_cls), public_methods(async_cls)
    assert sorted(sync_m) == sorted(async_m)
    for name, sig in sync_m.items():
        assert list(sig.parameters.values()) == list(async_m[name].parameters.values()), name


def test_the_client_imports_without_torch_or_the_server():
    code = ("import sys, engine.client, engine.events; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_one_url_gives_both_transports():
    for url in ("http://h:1", "ws://h:1", "ws://h:1/v1/realtime", "http://h:1/v1/"):
        assert Endpoints.parse(url) == Endpoints("http://h:1", "ws://h:1/v1/realtime")
    assert Endpoints.parse("wss://x.hf.space", "t").http == "https://x.hf.space"
    assert Endpoints.parse("https://x.hf.space", "t").headers == {"Authorization": "Bearer t"}
    with pytest.raises(ValueError):
        Endpoints.parse("localhost:8000")
    for url in ("https://box.example.org/ming/", "wss://box.example.org/ming/v1/realtime"):  # behind a proxy's path
        assert Endpoints.parse(url) == Endpoints("https://box.example.org/ming", "wss://box.example.org/ming/v1/realtime")
    with pytest.raises(ValueError, match="routes"):  # a route pasted as the address: 404 on every request
        Endpoints.parse("http://h:1/v1/chat/completions")
    with pytest.raises(ValueError, match="--engine-token") as refused:  # a secret in the URL: said without it
        Endpoints.parse("ws://alice:s3cret@h:1")
    assert "s3cret" not in str(refused.value)
    assert Endpoints.parse("ws://h:1", " s3cret\r\n").headers == {"Authorization": "Bearer s3cret"}  # a pasted line
    assert Endpoints.parse("wss://h:1/v1/realtime?token=s3cret").token == "s3cret"  # as the engine's socket takes it
    with pytest.raises(ValueError, match="routes") as refused:  # a URL refused is repeated without its query
        Endpoints.parse("http://h:1/v1/models?token=s3cret")
    assert "s3cret" not in str(refused.value)
    for bad in ("s3cret two", "s3cr\x00et", "s3crét"):
        with pytest.raises(ValueError, match="ENGINE_TOKEN") as refused:
            Endpoints.parse("ws://h:1", bad)
        assert "s3cr" not in str(refused.value)
    assert env_settings({"ENGINE_URL": "ws://h:1", "ENGINE_TOKEN": "t"}) == ("ws://h:1", "t")
    with pytest.raises(ValueError, match="ENGINE_URL"):
        env_settings({})


class DropsReusedConnections:
    """An HTTP server that answers the first request of each connection (kept alive) with a model card and closes the
    connection unanswered when a second request comes on it: what a server whose keep-alive timeout ends as the
    client reuses the connection does (uvicorn's is 5 s, the studio's engine check period too)."""

    CARD = b'{"object": "list", "data": [{"id": "m", "name": "kept-alive"}]}'

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                if b"\r\n\r\n" in conn.recv(65536):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(self.CARD)).encode() + b"\r\n\r\n" + self.CARD)
                    conn.recv(65536)  # the next request on this connection: closed, unanswered


def test_a_kept_alive_connection_the_engine_dropped_is_not_an_engine_down():
    """The studio's banner flipped to ENGINE UNAVAILABLE ('Server disconnected without sending a response') when its
    check reused a connection the engine closed at its keep-alive timeout; a GET is asked again afresh."""
    server = DropsReusedConnections()
    try:
        with EngineClient(server.url, timeout=10) as client:
            assert [client.info().name for _ in range(3)] == ["kept-alive"] * 3

        async def three_checks():
            async with AsyncEngineClient(server.url, timeout=10) as client:
                return [(await client.info()).name for _ in range(3)]
        assert asyncio.run(three_checks()) == ["kept-alive"] * 3
        assert server.connections == 6
    finally:
        server.sock.close()


def test_an_engine_behind_a_proxy_path_is_reached_there():
    """ENGINE_URL=https://box.example.org/ming (a reverse proxy serving the engine under /ming): the path was dropped,
    so every request went to /v1/... at the proxy's root (404) and the studio said the engine was not answering."""
    from fastapi import FastAPI

    from engine.server import Limits, ServerHandle, create_app
    from tests.server import FakeEngine

    engine_app = create_app(FakeEngine(), Limits())
    proxy = FastAPI()
    proxy.mount("/ming", engine_app)  # what the proxy does: /ming/... reaches the engine as /...
    proxy.state.ctx = engine_app.state.ctx
    with ServerHandle(proxy) as srv, EngineClient(srv.url + "/ming/", timeout=10) as client:
        assert client.info().id == "fake-omni"
        events = list(client.chat([{"role": "user", "content": "Hi"}], max_tokens=4))  # the realtime socket too
    assert isinstance(events[-1], Done), events[-1]


def test_chat_with_media_equals_the_in_process_engine(server, tiny_engine):
    img, pcm = image_array(30, 44, seed=3), tone_pcm16(0.5)
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "What do you see and hear?"},
                                             {"type": "image", "image": img},
                                             {"type": "audio", "audio": pcm.astype(np.float32) / 32768,
                                              "sample_rate": 16000}]}]
    expected = reference_chat(tiny_engine, messages, 6, system_prompt=SYSTEM)
    with EngineClient(server.url) as client:
        info = client.info()
        assert info.name == tiny_engine.info().name and {"text", "image_in", "audio_in"} <= info.capabilities
        assert info.max_new_tokens == server.ctx.limits.max_new_tokens == info.limits["max_new_tokens"]
        assert client.health()["status"] == "ok"
        events = list(client.chat(messages, max_tokens=6, system=SYSTEM))
        http_events = list(client.chat(messages, max_tokens=6, system=SYSTEM, transport="http"))
    for evs in (events, http_events):
        assert evs[0] == QueuePosition(0, 0)
        done = one_final(evs)
        assert isinstance(done, Done) and text_of(evs) == done.text == expected.text
        assert done.finish_reason == expected.finish_reason and done.stats.new_tokens == expected.stats.new_tokens
        assert done.stats.prompt_tokens == expected.stats.prompt_tokens > 60  # the media reached the model
        assert done.stats.media_encode_s > 0 and done.stats.time_to_first_token_s > 0


def test_async_chat_and_transcription(server, tiny_engine):
    messages = [{"role": "user", "content": "Async hello"}]
    expected = reference_chat(tiny_engine, messages, 4, system_prompt=SYSTEM)

    async def main():
        async with AsyncEngineClient(server.url) as client:
            chat = [ev async for ev in client.chat(messages, max_tokens=4, system=SYSTEM)]
            heard = [ev async for ev in client.transcribe(wav_bytes(tone_pcm16(0.5)), dialect="上海", max_tokens=4)]
            return chat, heard, (await client.info()).name

    chat, heard, name = asyncio.run(main())
    assert text_of(chat) == one_final(chat).text == expected.text and name == tiny_engine.info().name
    done = one_final(heard)
    assert isinstance(done, Done) and done.result["language"] == "上海" and done.result["text"] == done.text
    assert done.finish_reason == "length"  # cut at max_tokens=4 (the client read every transcript as complete)



def test_a_translation_through_both_clients_is_the_engines_translation(server, tiny_engine):
    """translate() (/v1/audio/translations, new): the sync and async clients get the in-process engine's
    translation of the same clip (greedy, 4 tokens) as one Done whose result is English text. Hotwords go with it as
    with a transcription (they were refused as an unknown field)."""
    from engine.sampling import GenerationParams

    pcm, words = tone_pcm16(0.5), ["Jingdezhen", "Ming"]
    expected = [ev for ev in tiny_engine.transcribe(pcm.astype(np.float32) / 32768, sample_rate=16000, hotwords=words,
                                                    params=GenerationParams(max_new_tokens=4), task="translate")][-1]

    async def main():
        async with AsyncEngineClient(server.url) as client:
            return [ev async for ev in client.translate(wav_bytes(pcm), max_tokens=4, hotwords=words)]

    with EngineClient(server.url) as client:
        synced = list(client.translate(pcm, sample_rate=16000, max_tokens=4, hotwords=words))
    for events in (synced, asyncio.run(main())):
        done = one_final(events)
        assert isinstance(done, Done) and done.result == {"language": "English", "text": expected.result["text"]}
        assert done.finish_reason == expected.finish_reason


WINDOW_TOKENS = 8


@pytest.mark.parametrize("stop", ["cancel", "aclose"])
def test_stopping_an_async_transcription_frees_the_engine(server, stop):
    """The async client's stop path: a transcription stopped mid-way (its cancel event set, or its stream closed by
    the caller) ends the job on the server at once, a long recording's later windows are not transcribed, and the
    engine is free for the next request. (The random weights never write the language tag, so a window's text comes
    whole at its end: the stop lands as the second window starts.)"""
    before = len(server.ctx.scheduler.history)
    long_recording = wav_bytes(tone_pcm16(32.0, rate=8000), rate=8000)  # two windows (asr_windows: 30 s each)

    async def main():
        async with AsyncEngineClient(server.url) as client:
            cancel, events = threading.Event(), []
            stream = client.transcribe(long_recording, max_tokens=WINDOW_TOKENS, cancel=cancel)
            async for ev in stream:
                events.append(ev)
                if isinstance(ev, TextDelta):
                    if stop == "aclose":
                        break
                    cancel.set()
            await stream.aclose()
            record = await asyncio.to_thread(wait_for, lambda: next(iter(list(server.ctx.scheduler.history)[before:]),
                                                                    None), 20)
            free = (server.ctx.scheduler.running, server.ctx.scheduler.waiting)
            after = [ev async for ev in client.transcribe(wav_bytes(tone_pcm16(0.5)), max_tokens=1)]
            # the next request's record lands after its reply: wait for it, so that it is not taken for the stopped
            # job of a test that follows
            await asyncio.to_thread(wait_for, lambda: len(server.ctx.scheduler.history) >= before + 2 or None, 20)
            return events, record, free, after

    events, record, free, after = asyncio.run(main())
    if stop == "cancel":
        assert one_final(events).finish_reason == "cancelled"
    assert record.label == "audio.transcriptions" and record.finish_reason == "cancelled", record
    assert record.new_tokens <= WINDOW_TOKENS and record.cancel_latency_s < 1.0, record  # the second window: stopped
    assert free == (0, 0) and one_final(after).finish_reason == "length"

def test_every_event_kind_reaches_the_client_over_both_transports():
    script = every_kind_script()
    with fake_server() as srv, EngineClient(srv.url) as client:
        for transport in ("realtime", "http"):
            events = list(client.chat([{"role": "user", "content": "draw and speak"}], transport=transport))
            assert events[:-1] == [QueuePosition(0, 0)] + script[:-1], transport
            assert one_final(events).stats.audio_seconds == pytest.approx(0.04)
    assert any(isinstance(e, AudioChunk) for e in events)


def test_a_long_prompts_prefill_progress_reaches_the_client_over_both_transports(server, tiny_engine):
    """A prompt longer than one prefill chunk (512 tokens on the CPU) says how far its reading is before the first
    token: realtime's response.progress and the chat stream's `: progress` comment both come back as Progress."""
    unit = "the quick brown fox jumps over the lazy dog. "
    content = unit * (600 // len(tiny_engine.tokenizer.encode_plain(unit)) + 1)
    with EngineClient(server.url) as client:
        for transport in ("realtime", "http"):
            events = list(client.chat([{"role": "user", "content": content}], max_tokens=1, transport=transport))
            done = one_final(events)
            reports = [e for e in events if isinstance(e, Progress)]
            assert reports and reports[0] == Progress(PREFILL_STAGE, 0, done.stats.prompt_tokens), transport
            assert done.stats.prompt_tokens > 512 and all(r.stage == PREFILL_STAGE for r in reports)
            first_text = next(i for i, e in enumerate(events) if isinstance(e, (TextDelta, Done)))
            assert events.index(reports[-1]) < first_text, transport


def test_openai_penalties_and_logit_bias_reach_the_engine_over_both_transports(server, tiny_engine):
    """The server honoured presence_penalty / frequency_penalty / logit_bias on /v1/chat/completions, but the client
    could not send them (and realtime's response.create refused them). Both transports now give the in-process
    engine's reply for the same settings, and out-of-range values come back as the server's error naming them."""
    msgs = [{"role": "user", "content": "Say it again and again"}]
    forced = tiny_engine.tokenizer.encode_plain(" cat")[0]
    penalties = dict(presence_penalty=2.0, frequency_penalty=2.0)
    want = reference_chat(tiny_engine, msgs, 4, **penalties)
    assert want.text != reference_chat(tiny_engine, msgs, 4).text  # the penalties change this reply
    with EngineClient(server.url) as client:
        for transport in ("realtime", "http"):
            done = one_final(list(client.chat(msgs, max_tokens=4, transport=transport, **penalties)))
            assert done.text == want.text, transport
            done = one_final(list(client.chat(msgs, max_tokens=3, logit_bias={forced: 100}, transport=transport)))
            assert done.text == tiny_engine.tokenizer.decode([forced] * 3), transport
            for bad, names in ((dict(presence_penalty=3.0), "presence_penalty"),
                               (dict(logit_bias={10 ** 9: 1}), "logit_bias")):
                (err,) = list(client.chat(msgs, max_tokens=3, transport=transport, **bad))
                assert err.code == "invalid_value" and names in err.message, (transport, err)
        (err,) = list(client.chat(msgs, logit_bias={"cat": 1}))
        assert err.code == "invalid_request" and "token ids" in err.message


def test_server_errors_become_error_events_with_the_servers_code(server):
    with EngineClient(server.url) as client:
        cases = [(dict(max_tokens=10 ** 6), "max_tokens_exceeded"),
                 (dict(modalities=("text", "image")), "modality_not_supported"),
                 (dict(transport="http", max_tokens=10 ** 6), "max_tokens_exceeded")]
        for kwargs, code in cases:
            events = list(client.chat([{"role": "user", "content": "hi"}], **kwargs))
            assert len(events) == 1 and isinstance(events[0], Error) and events[0].code == code, (kwargs, events)
        for bad in ([], [{"role": "tool", "content": "x"}],
                    [{"role": "user", "content": [{"type": "video", "video": [image_array()]}]}]):
            (err,) = list(client.chat(bad))
            assert err.code == "invalid_request"


def _collect(events, out: list, first_event: threading.Event | None = None, kind=TextDelta):
    for ev in events:
        out.append(ev)
        if first_event is not None and isinstance(ev, kind):
            first_event.set()


def test_cancel_reaches_a_running_and_a_queued_request(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    msgs = [{"role": "user", "content": prompt}]
    before = len(server.ctx.scheduler.history)
    with EngineClient(server.url) as client:
        stop_a, stop_b, a_running, b_queued = threading.Event(), threading.Event(), threading.Event(), threading.Event()
        got_a, got_b = [], []
        ta = threading.Thread(target=_collect, args=(client.chat(msgs, max_tokens=400, system=SYSTEM, cancel=stop_a),
                                                     got_a, a_running))
        ta.start()
        assert a_running.wait(30)
        tb = threading.Thread(target=_collect, args=(client.chat(msgs, max_tokens=400, system=SYSTEM, cancel=stop_b),
                                                     got_b, b_queued, QueuePosition))
        tb.start()
        assert b_queued.wait(30)
        stop_b.set()  # B is waiting in line behind A
        tb.join(10)
        stop_a.set()  # A is generating
        ta.join(10)
    assert not ta.is_alive() and not tb.is_alive()
    assert got_b[0] == QueuePosition(1, 1) and not any(isinstance(e, TextDelta) for e in got_b)
    assert one_final(got_b).finish_reason == "cancelled"
    done_a = one_final(got_a)
    assert done_a.finish_reason == "cancelled" and done_a.stats.new_tokens < 400
    history = server.ctx.scheduler.history
    records = wait_for(lambda: list(history)[before:] if len(history) >= before + 2 else None)
    assert sorted(r.finish_reason for r in records) == ["cancelled", "cancelled"]
    ran = [r for r in records if r.new_tokens]
    assert len(ran) == 1 and ran[0].steps_after_cancel is not None and ran[0].steps_after_cancel <= 1


def test_closing_the_stream_stops_the_request(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    with EngineClient(server.url) as client:
        for transport in ("realtime", "http"):
            before = len(server.ctx.scheduler.history)
            stream = client.chat([{"role": "user", "content": prompt}], max_tokens=400, system=SYSTEM,
                                 transport=transport)
            for ev in stream:
                if isinstance(ev, TextDelta):
                    break
            stream.close()
            rec = wait_for(lambda start=before: next(iter(list(server.ctx.scheduler.history)[start:]), None), 20)
            assert rec.finish_reason == "cancelled" and rec.new_tokens < 400, transport


@pytest.mark.parametrize("transport", ["realtime", "http"])
def test_a_server_that_dies_mid_stream_ends_it_with_an_error(transport):
    slow = FakeEngine(script=[TextDelta(f"{i} ") for i in range(200)] + [Done("", "stop")], step_s=0.05)
    events = []
    with fake_server(slow) as srv:
        client = EngineClient(srv.url, timeout=10)
        stream = client.chat([{"role": "user", "content": "count"}], transport=transport)
        for ev in stream:
            events.append(ev)
            if isinstance(ev, TextDelta):
                break
        srv.server.force_exit = True  # no graceful shutdown: the server just goes away
        srv.stop()
        t0 = time.monotonic()
        events += list(stream)
        client.close()
    assert time.monotonic() - t0 < 10
    err = one_final(events)
    assert isinstance(err, Error) and err.code == "connection_lost", err


def test_an_unreachable_server_or_a_wrong_token_is_a_clear_error(tiny_engine):
    with EngineClient("ws://127.0.0.1:9", timeout=5) as client:  # nothing listens on port 9
        with pytest.raises(ServerError) as info:
            client.health()
        assert info.value.code == "connect_failed"
        (err,) = list(client.chat([{"role": "user", "content": "hi"}]))
        assert err.code == "connect_failed"
    with running_server(tiny_engine, token="right") as srv:
        with EngineClient(srv.url, token="wrong") as client:
            assert client.health()["status"] == "ok"  # liveness is open
            with pytest.raises(ServerError) as info:
                client.info()
            assert (info.value.code, info.value.status) == ("unauthorized", 401)
            for transport in ("realtime", "http"):
                (err,) = list(client.chat([{"role": "user", "content": "hi"}], transport=transport))
                assert err.code == "unauthorized"
        with EngineClient(srv.url, token="right") as client:
            assert isinstance(one_final(list(client.chat([{"role": "user", "content": "hi"}], max_tokens=2))), Done)


def test_realtime_client_session_errors_and_reconnect(server, tiny_engine):
    pcm = tone_pcm16(0.4)
    with RealtimeClient(server.ws_url) as rt:
        first_id = rt.session["id"]
        (err,) = list(rt.respond())  # nothing in the conversation yet
        assert err.code == "conversation_empty"
        with pytest.raises(ServerError) as info:
            rt.update_session(output_modalities=["image"])
        assert info.value.code == "modality_not_supported"
        rt.update_session(instructions=SYSTEM, max_output_tokens=3)
        added = rt.add_message("user", "Remember this.")["item"]
        assert rt.retrieve_item(added["id"]) == added  # the server's view of the item
        with pytest.raises(ServerError) as info:
            rt.retrieve_item("item_nope")
        assert info.value.code == "item_not_found"
        rt.append_audio(pcm, 16000)
        rt.commit_audio()
        rt.append_frame(png_bytes(image_array(seed=1)), 1.0)
        rt.clear_video()
        reply = text_of(list(rt.respond()))
        rt.ws.close()  # the connection drops
        with pytest.raises(ConnectionLost):  # (after what had already come: rate_limits.updated follows response.done)
            for _ in range(3):
                rt.recv(timeout=5)
        session = rt.reconnect()
        assert session["id"] != first_id and rt.session["instructions"] == SYSTEM
        rt.add_message("user", "And now?")
        events = list(rt.respond())
    messages = [{"role": "user", "content": "Remember this."},
                {"role": "user", "content": [{"type": "audio", "audio": pcm, "sample_rate": 16000}]},
                {"role": "assistant", "content": reply}, {"role": "user", "content": "And now?"}]
    expected = reference_chat(tiny_engine, messages, 3, system_prompt=SYSTEM)
    assert one_final(events).stats.prompt_tokens == expected.stats.prompt_tokens
    assert text_of(events) == expected.text


def test_async_realtime_client_and_the_session_limit(server, tiny_engine):
    async def main():
        async with AsyncRealtimeClient(server.ws_url) as rt:
            await rt.update_session(instructions=SYSTEM)
            added = (await rt.add_message("user", "Async hello"))["item"]
            assert await rt.retrieve_item(added["id"]) == added
            return [ev async for ev in rt.respond(max_output_tokens=3)]

    events = asyncio.run(main())
    expected = reference_chat(tiny_engine, [{"role": "user", "content": "Async hello"}], 3, system_prompt=SYSTEM)
    assert text_of(events) == expected.text
    with RealtimeClient(server.ws_url), RealtimeClient(server.ws_url), RealtimeClient(server.ws_url), \
            RealtimeClient(server.ws_url):
        with pytest.raises(ServerError) as info:
            RealtimeClient(server.ws_url).connect()
        assert info.value.code == "session_limit_reached"


def test_a_request_waiting_longer_than_the_read_timeout_is_kept_alive():
    """The HTTP stream's keepalive comments keep a slow (or queued) request from timing out, while a
    read timeout still guards against a server that sends nothing at all."""
    slow = FakeEngine(script=[TextDelta("late"), Done("late", "stop")], step_s=0.6)
    with fake_server(slow, keepalive_s=0.15) as srv, EngineClient(srv.url, timeout=0.4) as client:
        events = list(client.chat([{"role": "user", "content": "take your time"}], transport="http"))
    assert text_of(events) == "late" and isinstance(one_final(events), Done)


def test_chats_reuse_an_emptied_session_and_replace_a_dead_one(server, tiny_engine):
    first, second = [{"role": "user", "content": "First question."}], [{"role": "user", "content": "Second one."}]
    expected = reference_chat(tiny_engine, second, 3, system_prompt=SYSTEM)
    with EngineClient(server.url) as client:
        list(client.chat(first, max_tokens=3, system=SYSTEM))
        events = list(client.chat(second, max_tokens=3, system=SYSTEM))  # the pooled session, emptied
        wait_for(lambda: len(server.ctx.sessions) == 1)  # one session served both chats
        assert text_of(events) == expected.text
        assert one_final(events).stats.prompt_tokens == expected.stats.prompt_tokens  # the first chat is gone
        (pooled,) = client._sessions._idle
        pooled.ws.close()  # the idle connection dies (say, the server restarted)
        events = list(client.chat(second, max_tokens=3, system=SYSTEM))
        assert text_of(events) == expected.text and isinstance(one_final(events), Done)


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport", "http://127.0.0.1:70000", "http://:8000",
                                 "ws://127.0.0.1:0", "localhost:8000"])
@pytest.mark.parametrize("cls", [EngineClient, AsyncEngineClient, RealtimeClient])
def test_a_malformed_engine_url_is_refused_when_the_client_is_made(cls, url):
    """Not an httpx InvalidURL (or a connect to port 4464) on the first call: a ValueError naming the URL."""
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        cls(url)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "60"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(timeout):
    """timeout=0 made every socket non-blocking ("Operation now in progress" on a reachable server)."""
    for cls in (EngineClient, AsyncEngineClient, RealtimeClient):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            cls("http://127.0.0.1:8000", timeout=timeout)


def test_a_proxys_html_error_page_is_said_by_its_title_not_passed_on_as_markup():
    """Behind a reverse proxy, an engine that is down answers with the proxy's 502 page: the client's error was
    the page's first 200 characters of markup ('<html>\\r\\n<head><title>502 Bad Gateway</title>...'). It now
    says the status, the page's title and that a proxy or gateway answered, not the engine."""
    import http.server

    page = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
            b"</center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n" + b"<!-- padding -->" * 40)

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with EngineClient(f"http://127.0.0.1:{proxy.server_address[1]}", timeout=10) as client:
            with pytest.raises(ServerError) as info:
                client.info()
    finally:
        proxy.shutdown()
        proxy.server_close()
    message = str(info.value.args[0]) if info.value.args else str(info.value)
    assert info.value.status == 502 and info.value.code == "server_error"
    assert "502 Bad Gateway" in message and "proxy or gateway" in message and "<" not in message, message


def test_the_realtime_client_reads_g711_replies_as_pcm16():
    """A session asking for G.711 replies (audio/pcmu, as a phone bridge does) got AudioChunks holding the
    G.711 bytes labelled PCM16 at 8 kHz (half the length, noise). The client reads the format from
    response.created and turns each byte into its PCM16 sample."""
    from tests.server.test_realtime_live import spoken_reply_script

    engine = FakeEngine(script=spoken_reply_script(words=3, chunk_s=0.2, rate=8000), has_talker=True)
    with fake_server(engine) as srv, RealtimeClient(srv.ws_url) as rt:
        rt.update_session(output_modalities=["audio"], audio={"output": {"format": {"type": "audio/pcmu"}}})
        rt.add_message("user", "Say something.")
        chunks = [e for e in rt.respond() if isinstance(e, AudioChunk)]
    talker = np.concatenate([ev.samples() for ev in engine.script if isinstance(ev, AudioChunk)])
    got = np.concatenate([c.samples() for c in chunks])
    assert {c.sample_rate for c in chunks} == {8000} and len(got) == len(talker)
    assert np.abs(got - talker).max() < 0.01  # G.711's quantisation step at this level


CONNECT_S = 0.3  # the clients' connect_timeout in the tests below (the default is CONNECT_TIMEOUT_S)
LONG_S = 30.0  # their request timeout: what a chat on a hung engine waited before


@pytest.fixture(scope="module")
def hung_ports():
    """(a port that accepts connections and never answers a byte, the URL of a websocket server that completes the
    handshake and then never sends the session's first event): two ways an engine hangs."""
    from websockets.sync.server import serve

    release = threading.Event()
    silent = serve(lambda ws: release.wait(), "127.0.0.1", 0)
    threading.Thread(target=silent.serve_forever, daemon=True).start()
    with socket.socket() as backlog:
        backlog.bind(("127.0.0.1", 0))
        backlog.listen(16)
        yield backlog.getsockname()[1], silent.socket.getsockname()[1]
    release.set()
    silent.shutdown()


@pytest.mark.parametrize("hang", ["no handshake", "no session event"])
def test_a_chat_on_a_hung_engine_says_so_within_the_connect_timeout(hung_ports, hang):
    """A chat's realtime session to a hung engine waited the client's whole timeout (60 s), its Stop unheard, and said
    'could not reach the engine server ... TimeoutError'; a handshake answered without a session event raised a bare
    TimeoutError out of chat()."""
    port = hung_ports[0] if hang == "no handshake" else hung_ports[1]
    client = EngineClient(f"ws://127.0.0.1:{port}", timeout=LONG_S, connect_timeout=CONNECT_S)
    t0 = time.monotonic()
    events = list(client.chat([{"role": "user", "content": "hi"}]))
    assert time.monotonic() - t0 < CONNECT_S + 2.0
    assert len(events) == 1 and isinstance(events[0], Error) and events[0].code == "timeout", events
    assert f"did not answer within {CONNECT_S:g} s" in events[0].message


def test_a_spoken_chat_on_a_hung_engine_says_so_within_the_connect_timeout(hung_ports):
    """A chat asking for speech first reads the talker's rate from the model card: on a hung engine that read waited
    the client's whole timeout (60 s) before the chat even tried its session."""
    client = EngineClient(f"http://127.0.0.1:{hung_ports[0]}", timeout=LONG_S, connect_timeout=CONNECT_S)
    t0 = time.monotonic()
    events = list(client.chat([{"role": "user", "content": "hi"}], modalities=("text", "audio")))
    assert time.monotonic() - t0 < CONNECT_S + 2.0
    assert len(events) == 1 and events[0].code == "timeout", events


def test_a_request_to_a_hung_openai_compatible_backend_says_so_within_the_connect_timeout(hung_ports):
    """openai+http://: a request first reads which model to ask for (the backend's /v1/models, once): on a hung backend
    that read waited the client's whole timeout (60 s)."""
    client = EngineClient(f"openai+http://127.0.0.1:{hung_ports[0]}", timeout=LONG_S, connect_timeout=CONNECT_S)
    t0 = time.monotonic()
    events = list(client.speak("hello"))
    assert time.monotonic() - t0 < CONNECT_S + 2.0
    assert len(events) == 1 and events[0].code == "timeout", events


def test_an_async_realtime_session_on_a_hung_engine_says_so_within_the_connect_timeout(hung_ports):
    async def connect():
        rt = AsyncRealtimeClient(f"ws://127.0.0.1:{hung_ports[1]}", timeout=LONG_S, connect_timeout=CONNECT_S)
        with pytest.raises(ServerError) as refused:
            await rt.connect()
        return refused.value

    t0 = time.monotonic()
    refused = asyncio.run(connect())
    assert time.monotonic() - t0 < CONNECT_S + 2.0 and refused.code == "timeout"


def test_a_stream_the_engine_never_answers_is_said_as_no_answer_not_as_unreachable(hung_ports):
    """speak() / imagine() / transcribe() on a hung engine said 'could not reach the engine server ... ReadTimeout'
    (code connect_failed), sending the user to look at the address of an engine that took the connection."""
    events = list(EngineClient(f"http://127.0.0.1:{hung_ports[0]}", timeout=CONNECT_S).speak("hello"))
    assert len(events) == 1 and events[0].code == "timeout", events
    assert f"did not answer within {CONNECT_S:g} s" in events[0].message


class CannedServer:
    """A server that answers every request, whatever its path or method (a websocket handshake too), with the same
    bytes (`answer`, which a test may change; or a function of the request's bytes that returns them), then closes the
    connection (`hold_s` later: a stalled answer). `dribble_s`: the answer is sent a byte at a time, each in its own TCP
    segment, this long apart."""

    def __init__(self, answer: bytes = b"", hold_s: float = 0.0, dribble_s: float | None = None):
        self.answer, self.hold_s, self.dribble_s = answer, hold_s, dribble_s
        self.hung_up = threading.Event()  # set when the client closed a dribbled answer's connection
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the module's tests are done
                return
            with conn:
                request = read_request(conn)
                self._send(conn, self.answer(request) if callable(self.answer) else self.answer)
                time.sleep(self.hold_s)

    def _send(self, conn: socket.socket, answer: bytes) -> None:
        try:
            if self.dribble_s is None:
                conn.sendall(answer)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(answer)):
                conn.sendall(answer[i:i + 1])
                time.sleep(self.dribble_s)
        except OSError:  # (the client gave up on it)
            self.hung_up.set()


def read_request(conn: socket.socket) -> bytes:
    """A request read whole (its head, then its Content-Length body): a server that closes with part of it unread
    makes the kernel send a reset, which the client sees as a lost connection, not as the answer that was sent."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


def canned_answer(status: str, content_type: str, body: bytes, headers: str = "") -> bytes:
    """`headers`: more header lines, each ending with CRLF."""
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nConnection: close\r\n{headers}".encode()
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


@pytest.fixture(scope="module")
def captive_portal():
    """A network's sign-in page: every request is answered 200 with the same web page, as a hotel's or a company's
    captive portal answers."""
    page = b"<!DOCTYPE html><html><head><title>Sign in to Hotel WiFi</title></head><body>Log in</body></html>"
    portal = CannedServer(canned_answer("200 OK", "text/html; charset=utf-8", page))
    yield portal.port
    portal.sock.close()


@pytest.fixture(scope="module")
def canned_server():
    server = CannedServer()
    yield server
    server.sock.close()


@pytest.mark.parametrize("status, content_type, body, words", [
    ("500 Internal Server Error", "application/json", b'{"detail": "CUDA out of memory"}', "CUDA out of memory"),
    ("503 Service Unavailable", "text/plain", b"upstream connect error or disconnect/reset before headers",
     "upstream connect error or disconnect/reset before headers"),
    ("400 Bad Request", "application/json", b'{"error": {"message": 5, "code": ["x"]}}', '"message": 5')])
def test_an_error_answer_not_in_the_engines_shape_names_its_status_where_and_words(canned_server, status,
                                                                                  content_type, body, words):
    """Another server's error answer (FastAPI's {"detail": ...}, a load balancer's text, an error object whose code is
    a list) was said as its raw body alone, 'server_error: {"detail": ...}', or with the code "['x']": neither the
    HTTP status nor which address answered. Each now names the status, the URL and the answer's own words."""
    canned_server.answer = canned_answer(status, content_type, body)
    code = status.split()[0]
    client = EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5)
    try:
        with pytest.raises(ServerError) as checked:
            client.info()
        chatted = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))[-1]
        realtime = list(client.chat([{"role": "user", "content": "hi"}]))[-1]  # (its websocket handshake refused)
    finally:
        client.close()
    assert checked.value.code in ("server_error", "http_error") and checked.value.status == int(code)
    url = f"http://127.0.0.1:{canned_server.port}"
    for said, path in ((checked.value.message, "/v1/models"), (chatted.message, "/v1/chat/completions"),
                       (realtime.message, "/v1/realtime")):
        assert f"HTTP {code} from " in said and path in said and words in said, said
    assert url in checked.value.message and isinstance(chatted, Error) and chatted.code == checked.value.code


def test_a_realtime_handshake_refused_with_an_empty_body_says_its_status_once(canned_server):
    """A websocket handshake refused with a 4xx and no body was said 'HTTP 400 from ...: server rejected WebSocket
    connection: HTTP 400', the status twice; it is now said once, with the answer's reason phrase."""
    canned_server.answer = canned_answer("400 Bad Request", "text/plain", b"")
    client = EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5)
    try:
        refused = list(client.chat([{"role": "user", "content": "hi"}]))[-1]
    finally:
        client.close()
    assert isinstance(refused, Error) and refused.code == "http_error", refused
    assert refused.message.count("400") == 1 and "/v1/realtime: Bad Request" in refused.message, refused.message


@pytest.mark.parametrize("status, error, code", [
    ("400 Bad Request", {"message": "no such model", "type": "invalid_request_error", "code": None},
     "invalid_request_error"),
    ("404 Not Found", {"message": "no such route", "code": None}, "http_error"),
    ("503 Service Unavailable", {"message": "overloaded", "code": None}, "server_error")])
def test_an_openai_error_with_a_null_code_is_named_by_its_type_or_status(canned_server, status, error, code):
    """An OpenAI-style error with `code: null` became server_error, a 4xx too, and its `type` was ignored: it is now
    named by its type, else by the HTTP status (http_error for a 4xx, server_error for a 5xx)."""
    canned_server.answer = canned_answer(status, "application/json", json.dumps({"error": error}).encode())
    client = EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5)
    try:
        with pytest.raises(ServerError) as checked:
            client.info()
        chatted = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))[-1]
    finally:
        client.close()
    assert (checked.value.code, checked.value.message, chatted.code) == (code, error["message"], code)


@pytest.mark.parametrize("rate_header, rate, assumed", [("X-Sample-Rate: 16000\r\n", 16000, False),
                                                        ("", 24000, True)])
def test_speech_without_a_sample_rate_plays_at_the_answers_own_rate_or_says_it_was_assumed(
        canned_server, rate_header, rate, assumed):
    """Speech deltas without a sample_rate were taken as 24 kHz even when the answer's X-Sample-Rate header said
    16 kHz (a 16 kHz voice played 1.5x fast), and nothing said the rate was a guess. The header's rate is now used;
    when nothing says one, Done's result says 24 kHz was assumed."""
    pcm = b"\x00\x01" * 1600
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in (
        {"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()},
        {"type": "speech.audio.done", "usage": {}})) + "data: [DONE]\n\n"
    canned_server.answer = canned_answer("200 OK", "text/event-stream", stream.encode(), rate_header)
    url = f"http://127.0.0.1:{canned_server.port}"

    async def spoken_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            return [ev async for ev in client.speak("hello")]

    with EngineClient(url, timeout=5) as client:
        spoken = list(client.speak("hello"))
    for chunk, done in (spoken, asyncio.run(spoken_async())):
        assert isinstance(done, Done) and chunk.sample_rate == rate and chunk.seconds == pytest.approx(1600 / rate)
        note = (done.result or {}).get("sample_rate_note", "")
        assert ("24000 Hz" in note and done.result["sample_rate"] == 24000) if assumed else not note, done.result


@pytest.mark.parametrize("content_type, samples, rate, assumed", [
    ("audio/pcm;rate=16000", np.array([1000, -1000], "<i2"), 16000, False),
    ("audio/L16; rate=16000; channels=2", np.array([[1000, 3000], [-1000, -3000]], ">i2"), 16000, False),
    ("audio/pcm", np.array([1000, -1000], "<i2"), 24000, True)])
def test_speech_answered_as_raw_pcm_plays_at_the_rate_its_content_type_says_or_says_it_was_assumed(
        canned_server, content_type, samples, rate, assumed):
    """An OpenAI-compatible server that answered speech as raw PCM, its rate only in the Content-Type
    (audio/pcm;rate=16000, audio/L16;rate=16000, big-endian), was refused as 'not a WAV file': it is read at that rate
    (L16 in its byte order, channels averaged), and at OpenAI's 24 kHz, said as assumed, when no rate is given."""
    models = canned_answer("200 OK", "application/json", b'{"data": [{"id": "tts-model"}]}')
    speech = canned_answer("200 OK", content_type, np.tile(samples, (800,) + (1,) * (samples.ndim - 1)).tobytes())
    canned_server.answer = lambda request: models if b" /v1/models " in request.split(b"\r\n", 1)[0] else speech
    with EngineClient(f"openai+http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        *chunks, done = list(client.speak("hello"))
    pcm = np.frombuffer(b"".join(c.pcm for c in chunks), "<i2")
    assert isinstance(done, Done) and {c.sample_rate for c in chunks} == {rate}, done
    assert pcm.tolist() == [2000, -2000] * 800 if samples.ndim == 2 else pcm.tolist() == [1000, -1000] * 800
    note = done.result.get("sample_rate_note", "")
    assert ("24000 Hz" in note and "Content-Type" in note) if assumed else not note, done.result


def test_a_captive_portals_page_is_said_as_a_web_page_not_a_json_or_stream_error(captive_portal):
    """A studio (or script) on a network with a sign-in page got 'the server's answer is not JSON' from the model
    check and "unexpected stream line '<!DOCTYPE html><html><head><title>Sign in...'" from every streamed request:
    neither said that a web page, not the engine, had answered. The realtime handshake said only 'HTTP 200'."""
    client = EngineClient(f"http://127.0.0.1:{captive_portal}", timeout=5)
    with pytest.raises(ServerError) as checked:
        client.info()
    spoken = list(client.speak("hello"))
    chatted = list(client.chat([{"role": "user", "content": "hi"}]))  # (the realtime transport)
    for said in (str(checked.value), spoken[-1].message, chatted[-1].message):
        assert "Sign in to Hotel WiFi" in said and "<" not in said, said
    assert "captive portal" in str(checked.value) and "captive portal" in spoken[-1].message
    assert len(spoken) == 1 and spoken[0].code == "protocol_error"


def test_an_ipv6_engine_address_is_reached_in_brackets_and_said_so_without():
    """ws://::1:8000 was refused as not looking like ws://HOST:PORT, which it does to a reader; the refusal now says an
    IPv6 address goes in brackets, and the bracketed form keeps its brackets in both transports."""
    with pytest.raises(ValueError, match=r"IPv6 address goes in brackets: ws://\[2001:db8::1\]:8000"):
        EngineClient("ws://2001:db8::1:8000")
    bracketed = Endpoints.parse("wss://[2001:db8::1]:8443/ming", "T")
    assert bracketed.http == "https://[2001:db8::1]:8443/ming"
    assert bracketed.ws == "wss://[2001:db8::1]:8443/ming/v1/realtime"


@pytest.mark.parametrize("verify_message, clock", [("certificate has expired", True),
                                                   ("certificate is not yet valid", True),
                                                   ("self-signed certificate", False)])
def test_a_certificate_refused_for_its_dates_names_the_clock(verify_message, clock):
    """A studio whose clock is off (a VM resumed from a snapshot, a board without a battery) finds a valid certificate
    'expired' or 'not yet valid': the message says to check this machine's clock too."""
    import ssl

    from engine.client.core import connect_error

    refused = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {verify_message}")
    refused.verify_message = verify_message
    try:
        raise ConnectionError("wrapped, as httpx and websockets raise it") from refused
    except ConnectionError as e:
        said = str(connect_error("https://box.example.org", e))
    assert verify_message in said and "does not trust" in said and ("clock" in said) == clock


STALL_TIMEOUT_S = 2.0  # (a stalled stream's client timeout: long enough for its connection and first event on a
#                        machine running two test suites at once, where 0.8 s failed now and then)


def test_a_stream_cut_off_or_stalled_says_where_and_what_happened():
    """A chat whose answer stopped mid-way ended with 'the stream ended without a result' (closed without its last
    event or [DONE]) or 'the connection to the server was lost: ReadTimeout: timed out' (nothing more came): neither
    said which address, nor, for the stall, how long the client had waited. Both now say both."""
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    server = CannedServer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + chunk)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    ask = [{"role": "user", "content": "hi"}]
    client, impatient = (EngineClient(f"http://127.0.0.1:{server.port}", timeout=t) for t in (10, STALL_TIMEOUT_S))
    try:
        cut = list(client.chat(ask, transport="http"))
        server.hold_s = 3 * STALL_TIMEOUT_S  # (the client's timeout passes with nothing more)
        stalled = list(impatient.chat(ask, transport="http"))
    finally:
        client.close()
        impatient.close()
        server.sock.close()
    assert text_of(cut) == "hi" == text_of(stalled)
    assert cut[-1].code == "protocol_error" and url in cut[-1].message and "[DONE]" in cut[-1].message, cut[-1]
    assert stalled[-1].code == "connection_lost" and url in stalled[-1].message, stalled[-1]
    assert f"nothing came for {STALL_TIMEOUT_S:g} s" in stalled[-1].message


def test_a_stream_event_with_a_field_of_another_type_ends_the_stream_with_a_protocol_error():
    """An engine of another version (or another server) whose chunk had `"sample_rate": null` in its audio, an image
    preview's `"step": "x"`, or `"choices": "..."` made chat() raise a bare TypeError / ValueError / AttributeError out
    of the caller's loop (a tab's whole request lost). The stream now ends with an Error (protocol_error) naming the
    address, as for any answer the client does not understand."""
    chunk = '{"object": "chat.completion.chunk", "choices": %s}'
    odd_chunks = [chunk % '[{"index": 0, "delta": {"audio": {"data": "AAAA", "sample_rate": null}}}]',
                  chunk % '[{"index": 0, "delta": {"image_preview": {"image": "AAAA", "step": "x"}}}]',
                  chunk % '"none"']
    server = CannedServer()
    client = EngineClient(f"http://127.0.0.1:{server.port}", timeout=5)
    try:
        for chunk in odd_chunks:
            server.answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                             b"data: " + chunk.encode() + b"\n\ndata: [DONE]\n\n")
            events = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))
            assert isinstance(events[-1], Error) and events[-1].code == "protocol_error", (chunk, events)
            assert f"127.0.0.1:{server.port}/v1/chat/completions" in events[-1].message, events[-1]
    finally:
        client.close()
        server.sock.close()


def test_a_realtime_server_of_another_shape_ends_a_chat_with_a_protocol_error():
    """A realtime server of another version (a session.created without its session, an event that is a JSON list, an
    error that is a bare string) raised KeyError 'session' or AttributeError out of chat() and RealtimeClient; each
    is now a protocol_error (an Error ending the chat, a ServerError from the session's requests)."""
    from websockets.sync.server import serve

    first = {"event": ""}

    def answer(ws):  # its first event, then a bare-string error for whatever is asked
        ws.send(first["event"])
        for _ in ws:
            ws.send(json.dumps({"type": "error", "error": "not understood"}))

    server = serve(answer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
    client = EngineClient(url, timeout=5)
    said = []
    try:
        for event in ({"type": "session.created"}, [1, 2]):
            first["event"] = json.dumps(event)
            ended = list(client.chat([{"role": "user", "content": "hi"}]))[-1]
            assert isinstance(ended, Error) and ended.code == "protocol_error", (event, ended)
            said.append(ended.message)
        first["event"] = json.dumps({"type": "session.created", "session": {"id": "s"}})
        with RealtimeClient(url, timeout=5) as rt, pytest.raises(ServerError) as refused:
            rt.update_session(instructions="hi")
        assert refused.value.code == "protocol_error" and "not understood" in refused.value.message
    finally:
        client.close()
        server.shutdown()
    assert f"{url}/v1/realtime sent a session.created without a session object" in said[0], said
    assert "not a JSON object: [1, 2]" in said[1], said


@pytest.mark.parametrize("response", ["x", {"output": [1]}, {"output": [{"content": "abc"}]}])
def test_a_response_done_of_another_shape_ends_the_reply_with_a_protocol_error(response):
    """A realtime reply whose response.done held a response of another shape (a string, an output that is a list of
    numbers, content that is a string) raised AttributeError out of respond() and chat(), from the session's log of
    the conversation; the log skips what it cannot read and the reply ends with a protocol_error naming the session."""
    from websockets.sync.server import serve

    def answer(ws):
        ws.send(json.dumps({"type": "session.created", "session": {"id": "s"}}))
        for message in ws:
            if json.loads(message).get("type") == "response.create":
                ws.send(json.dumps({"type": "response.done", "response": response}))

    server = serve(answer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
    try:
        with RealtimeClient(url, timeout=5) as rt:
            ended = list(rt.respond())[-1]
    finally:
        server.shutdown()
    assert isinstance(ended, Error) and ended.code == "protocol_error", ended
    assert f"{url}/v1/realtime" in ended.message, ended


class BufferingProxy:
    """A reverse proxy that buffers answers, as nginx does with proxy_buffering on (and the engine's X-Accel-Buffering
    header dropped): each answer's headers are passed on at once, its body only once the engine has sent all of it,
    `hold_s` later (the time a real engine's reply would have taken). `hold_s` None: the body is passed on as it
    comes, at once (no buffering). `whole`: the headers are held with the body (each answer passed on whole, at once,
    when the engine has sent all of it), as a proxy that buffers whole responses does."""

    def __init__(self, upstream_port: int, hold_s: float | None, whole: bool = False):
        self.upstream_port, self.hold_s, self.whole = upstream_port, hold_s, whole
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._copy, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._answers, args=(up, conn), daemon=True).start()

    @staticmethod
    def _copy(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def _answers(self, up, conn):
        """Each answer on the connection: its headers at once, then its body (held, when buffering)."""
        pending = b""
        try:
            while True:
                while b"\r\n\r\n" not in pending:
                    pending += up.recv(65536) or b""
                head, _, pending = pending.partition(b"\r\n\r\n")
                if not self.whole:
                    conn.sendall(head + b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                end = (lambda body: len(body) >= int(length.group(1))) if length else (
                    lambda body: b"0\r\n\r\n" in body)
                if self.hold_s is None:
                    conn.sendall(pending)
                    self._copy(up, conn)
                    return
                while not end(pending):
                    pending += up.recv(65536)
                body_len = int(length.group(1)) if length else pending.index(b"0\r\n\r\n") + 5
                time.sleep(self.hold_s if not length and not self.whole else 0)
                conn.sendall((head + b"\r\n\r\n" if self.whole else b"") + pending[:body_len])
                pending = pending[body_len:]
        except (OSError, ValueError):
            conn.close()


HELD_BACK_WAIT_S = 0.2  # (the test's HeldBackCheck.wait_s: a held-back stream shows within a second)


def test_a_proxy_that_holds_streams_back_is_said_with_the_fix_until_streams_come_as_made():
    """An engine behind nginx with proxy_buffering on: the Speech tab's progress, a transcript's words and the Image
    previews all came at the end of each request, and nothing said why (the engine seemed to hang, then be done).
    Such a stream (its headers at once, then every line at its end) is now noted, with the proxy setting to change;
    once the proxy passes streams on as they come, the note goes."""
    from engine.client.core import HeldBackCheck

    script = [TextDelta(f"{i} ") for i in range(5)] + [Done("0 1 2 3 4 ", "stop")]
    engine = FakeEngine(script=script)
    with fake_server(engine) as srv:
        proxy = BufferingProxy(int(srv.url.rsplit(":", 1)[1]), hold_s=HELD_BACK_WAIT_S * 2)
        client = EngineClient(proxy.url, timeout=10)
        client.held_back_check = HeldBackCheck(wait_s=HELD_BACK_WAIT_S)
        said = []
        try:
            for hold_s, step_s in ((HELD_BACK_WAIT_S * 2, 0.0), (None, HELD_BACK_WAIT_S / 3)):
                proxy.hold_s, engine.step_s = hold_s, step_s  # (the second: set right, the engine taking its time)
                events = list(client.chat([{"role": "user", "content": "count"}], transport="http"))
                assert text_of(events) == "0 1 2 3 4 " and isinstance(events[-1], Done), events
                said.append(client.held_back)
            assert client.info().id == "fake-omni"  # (a plain answer through the same proxy is not a stream)
        finally:
            client.close()
            proxy.sock.close()
    assert said[0] is not None and "proxy_buffering off" in said[0] and "X-Accel-Buffering" in said[0], said
    assert said[1] is None


class TimedEngine(FakeEngine):
    """A FakeEngine whose Done says how long it took to make the reply (total_s), as a real engine's figures do."""

    def chat(self, *args, **kwargs):
        started = time.monotonic()
        for ev in super().chat(*args, **kwargs):
            yield replace(ev, stats=GenerationStats(total_s=time.monotonic() - started)) if isinstance(ev, Done) else ev


def test_a_proxy_that_holds_back_the_headers_too_is_said_with_the_fix_until_streams_come_as_made():
    """A proxy that passes each answer on whole, headers included, once the engine has sent all of it: the check saw
    the headers and every line arrive together (no wait after the headers) and said nothing, while the Speech tab's
    progress and a chat's words all came at the end. The engine's own figures (its Done's time making the reply)
    against the answer arriving at once now tell it, with the fix said; once the proxy streams, the note goes."""
    from engine.client.core import HeldBackCheck

    engine = TimedEngine(script=[TextDelta(f"{i} ") for i in range(5)] + [Done("0 1 2 3 4 ", "stop")],
                         step_s=HELD_BACK_WAIT_S / 4)  # (6 steps: the engine takes 1.5x the check's wait)
    with fake_server(engine) as srv:
        proxy = BufferingProxy(int(srv.url.rsplit(":", 1)[1]), hold_s=0.0, whole=True)
        client = EngineClient(proxy.url, timeout=10)  # (a loose burst: an answer passed on whole arrives in ~1 ms)
        client.held_back_check = HeldBackCheck(wait_s=HELD_BACK_WAIT_S, burst_share=0.5)
        said = []
        try:
            for whole, hold_s in ((True, 0.0), (False, None)):
                proxy.whole, proxy.hold_s = whole, hold_s
                events = list(client.chat([{"role": "user", "content": "count"}], transport="http"))
                assert text_of(events) == "0 1 2 3 4 " and events[-1].stats.total_s >= HELD_BACK_WAIT_S, events
                said.append(client.held_back)
        finally:
            client.close()
            proxy.sock.close()
    assert said[0] is not None and "proxy_buffering off" in said[0], said
    assert said[1] is None


class BusyEngine:
    """An engine with `streams` requests waiting in its line: each streamed request gets its answer's headers and then
    nothing yet (held open); its model card is answered at once."""

    CARD = b'{"object": "list", "data": [{"id": "m", "name": "busy"}]}'

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.streams: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        head = b""
        while b"\r\n\r\n" not in head:
            more = conn.recv(65536)
            if not more:  # (closed before asking anything)
                conn.close()
                return
            head += more
        if head.startswith(b"GET /v1/models"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(self.CARD), self.CARD))
            conn.close()
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.streams.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.streams:
            conn.close()


def test_a_studio_with_a_hundred_streams_in_flight_still_reaches_the_engine():
    """A busy Space: 100 visitors' requests waiting in the engine's line held all of httpx's 100 pooled connections,
    so the studio's engine check said the engine 'did not answer within 10 s' (the banner: ENGINE UNAVAILABLE) and
    every new request waited for a free connection. The pool has no cap now; the engine refuses what it cannot take."""
    engine = BusyEngine()
    client = EngineClient(engine.url, timeout=30)  # (longer than the test: no stream gives up its connection)
    waiting = 101  # (one more than httpx's default cap)
    try:
        for _ in range(waiting):
            threading.Thread(target=lambda: list(client.speak("hi")), daemon=True).start()
        assert wait_for(lambda: len(engine.streams) >= waiting, 5), len(engine.streams)
        t0 = time.monotonic()
        assert client.info(timeout=2.0).name == "busy"
        assert time.monotonic() - t0 < 1.0
    finally:
        engine.close()
        client.close()


def test_a_chat_does_not_take_a_pooled_session_near_the_end_of_its_life():
    """A chat on a realtime session the studio had kept in its pool for most of the engine's session life (60 minutes)
    was cut mid-reply with "Your session hit the maximum duration of 60 minutes.", said to a visitor who never opened
    a session; a pooled session is given out only while younger than half that life (here scaled down to 1 s)."""
    life_s = 1.0
    engine = FakeEngine(script=[TextDelta("a ")] * 10 + [Done("a " * 10, "stop")])
    with fake_server(engine, max_session_s=life_s) as srv, EngineClient(srv.url, timeout=10) as client:
        client._sessions.max_age_s = life_s / 2
        assert isinstance(list(client.chat([{"role": "user", "content": "hi"}]))[-1], Done)  # (its session: pooled)
        time.sleep(life_s * 0.7)
        engine.step_s = life_s / 20  # a reply of 0.5 s: past the pooled session's life, well within a fresh one's
        events = list(client.chat([{"role": "user", "content": "hi"}]))
    assert isinstance(events[-1], Done) and text_of(events) == "a " * 10, events[-1]


def test_a_chat_on_an_engine_with_every_session_taken_goes_over_http():
    """An engine with all its realtime sessions open (Live calls, other visitors' chats: 64 by default) refused each
    studio chat with 'too many realtime sessions ...; try again later' though its line had room; the chat is now sent
    over HTTP, where it waits its turn, with the same events (sync and async clients)."""
    engine = FakeEngine(script=[TextDelta("over "), TextDelta("http"), Done("over http", "stop")])
    with fake_server(engine, max_sessions=1) as srv, RealtimeClient(srv.ws_url) as taken:  # (the one session)
        assert taken.session is not None
        events = list(EngineClient(srv.url, timeout=10).chat([{"role": "user", "content": "hi"}]))

        async def async_chat():
            async with AsyncEngineClient(srv.url, timeout=10) as client:
                return [ev async for ev in client.chat([{"role": "user", "content": "hi"}])]
        async_events = asyncio.run(async_chat())
    for got in (events, async_events):
        assert isinstance(got[-1], Done) and text_of(got) == "over http", got[-1]


@pytest.mark.parametrize("status, headers, body, says", [
    ("429 Too Many Requests", "Retry-After: 30\r\n",
     b'{"error": {"message": "rate limited", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}',
     ["rate limited", "try again in 30 s"]),
    ("429 Too Many Requests", "Retry-After: 30\r\n", b"", ["HTTP 429", "Too Many Requests", "try again in 30 s"]),
    ("503 Service Unavailable", "Retry-After: Wed, 21 Oct 2026 07:28:00 GMT\r\n", b'{"detail": "model is loading"}',
     ["HTTP 503", "model is loading", "try again after Wed, 21 Oct 2026 07:28:00 GMT"])])
def test_a_refusal_with_retry_after_says_when_to_try_again(canned_server, status, headers, body, says):
    """A 429 (rate limited) or a 503 while the engine starts, with Retry-After, was said without it ('rate limited',
    'HTTP 429 from ...' with an empty body naming not even the status): the message says when the server asks to be
    tried again, and an empty answer is named by its status's name, for the model check, a stream and a realtime
    session's handshake."""
    canned_server.answer = canned_answer(status, "application/json", body, headers)
    with EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        with pytest.raises(ServerError) as checked:
            client.info()
        spoken = list(client.speak("hello"))[-1]
        chatted = list(client.chat([{"role": "user", "content": "hi"}]))[-1]  # (a realtime handshake refused)
    for message in (checked.value.message, spoken.message, chatted.message):
        assert all(s in message for s in says), message


CHAT_CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
CHAT_END = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
            b'\n\ndata: [DONE]\n\n')
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def test_a_streams_own_comment_retry_event_and_id_lines_are_passed_by(canned_server):
    """A stream with an SSE comment this client does not know (': ping' from a proxy, ':' alone) ended in a
    protocol_error 'unknown stream comment', as if the engine were of another version: SSE says a comment is for the
    reader to ignore. It is passed by, as retry:, event: and id: lines are, and the reply is read whole."""
    canned_server.answer = (SSE_HEAD + b"retry: 3000\n\n: ping\n\n:\n\n" + CHAT_CHUNK + b"event: message\nid: 5\n"
                            + CHAT_END)
    with EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        events = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))
    assert isinstance(events[-1], Done) and text_of(events) == "hi", events[-1]


def test_a_stream_cut_mid_line_says_it_ended_without_its_result_and_one_sent_a_byte_at_a_time_is_read_whole():
    """A chat stream cut in the middle of a line (the connection closed there) ended with 'malformed stream data ...
    is it an engine server of another version?': the unfinished line was read as a line. It is dropped, as SSE says,
    and the error says that the stream ended without its result. A stream sent one byte per TCP segment (a character
    of several bytes split between them) reads whole."""
    utf8_chunk = CHAT_CHUNK.replace(b'"hi"', '"hé 你"'.encode())
    ask = [{"role": "user", "content": "hi"}]
    cut = CannedServer(SSE_HEAD + CHAT_CHUNK + CHAT_END[:40])
    dribbled = CannedServer(SSE_HEAD.replace(b"\r\n\r\n", b"\r\n\r\n: keepalive\r") + utf8_chunk + CHAT_END,
                            dribble_s=0.0002)
    try:
        with EngineClient(f"http://127.0.0.1:{cut.port}", timeout=5) as client:
            ended = list(client.chat(ask, transport="http"))

        async def ended_async():
            async with AsyncEngineClient(f"http://127.0.0.1:{cut.port}", timeout=5) as client:
                return [ev async for ev in client.chat(ask, transport="http")]

        ended_too = asyncio.run(ended_async())
        with EngineClient(f"http://127.0.0.1:{dribbled.port}", timeout=5) as client:
            whole = list(client.chat(ask, transport="http"))
    finally:
        cut.sock.close()
        dribbled.sock.close()
    assert text_of(ended) == "hi" and ended[-1].code == "protocol_error" and "[DONE]" in ended[-1].message, ended[-1]
    assert "another version" not in ended[-1].message and ended_too[-1].message == ended[-1].message
    assert isinstance(whole[-1], Done) and text_of(whole) == "hé 你", whole[-1]


@pytest.mark.parametrize("encoding, says", [("gzip", "does not decompress"), ("zstd", "did not ask for")])
def test_an_answer_compressed_so_that_the_client_cannot_read_it_is_said_so(canned_server, encoding, says):
    """An answer whose gzip bytes were broken was said as 'the connection to the server was lost' (a stream) or
    'could not reach the engine server' (the model check), and one compressed with a coding the client never asked for
    (zstd) was read as its raw bytes. Each is now a protocol_error naming the compression and what went wrong."""
    canned_server.answer = canned_answer("200 OK", "text/event-stream", b"not compressed at all\n\n",
                                         f"Content-Encoding: {encoding}\r\n")
    with EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        with pytest.raises(ServerError) as checked:
            client.info()
        chatted = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))[-1]
    for failed in (checked.value, chatted):
        assert failed.code == "protocol_error" and "Content-Encoding" in failed.message and says in failed.message, \
            failed.message


def test_a_realtime_handshake_redirected_is_said_with_where_it_points_and_never_followed():
    """The realtime socket followed a redirect the HTTP calls never follow: to another host (ws://), its token stripped,
    where that host's answer was said instead ('HTTP 404 from ...'), or round a loop ('SecurityError: more than 10
    redirects'). Each redirect is now said as one, with the address it points to, and nothing is sent there."""
    asked_elsewhere = []
    elsewhere = CannedServer(lambda request: (asked_elsewhere.append(request), canned_answer("404 Not Found",
                                                                                              "text/plain", b""))[1])
    moved = CannedServer()
    ask = [{"role": "user", "content": "hi"}]

    async def chat_async(url):
        async with AsyncEngineClient(url, token="T", timeout=5) as client:
            return [ev async for ev in client.chat(ask)]

    try:
        for location in (f"ws://localhost:{elsewhere.port}/v1/realtime", "/v1/realtime"):
            moved.answer = canned_answer("307 Temporary Redirect", "text/plain", b"", f"Location: {location}\r\n")
            url = f"http://127.0.0.1:{moved.port}"
            with EngineClient(url, token="T", timeout=5) as client:
                said = [list(client.chat(ask))[-1], asyncio.run(chat_async(url))[-1]]
            for refused in said:
                assert refused.code == "http_error" and "redirects (HTTP 307)" in refused.message, refused.message
                assert location.split("/v1")[0] in refused.message, refused.message
    finally:
        moved.sock.close()
        elsewhere.sock.close()
    assert asked_elsewhere == []


def test_an_answer_trickled_a_byte_at_a_time_is_given_up_at_the_clients_timeout():
    """httpx's timeout is for each read: a server answering the model check a byte at a time (a byte every 0.1 s here,
    over 10 s in all) held info(timeout=0.3) as long as it trickled, and the studio's engine check (10 s at most) for
    minutes; a stream's head trickled so held a tab's request. The answer (a stream's head) must be whole within the
    timeout, else it is said as not answering within it."""
    card = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
    trickle = CannedServer(canned_answer("200 OK", "application/json", card), dribble_s=0.1)
    url = f"http://127.0.0.1:{trickle.port}"

    async def checked_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            with pytest.raises(ServerError) as checked:
                await client.info(timeout=0.3)
            return checked.value

    async def spoken_async():
        async with AsyncEngineClient(url, timeout=0.3) as client:
            return [ev async for ev in client.speak("hello")][-1]

    try:
        started = time.monotonic()
        with EngineClient(url, timeout=5) as client:
            with pytest.raises(ServerError) as checked:
                client.info(timeout=0.3)
        given_up = [checked.value, asyncio.run(checked_async())]
        trickle.answer = SSE_HEAD  # (a stream's head, trickled)
        with EngineClient(url, timeout=0.3) as client:
            given_up += [list(client.speak("hello"))[-1], asyncio.run(spoken_async())]
        took = time.monotonic() - started
    finally:
        trickle.sock.close()
    assert took < 5, took
    for failed in given_up:
        assert failed.code == "timeout" and "within 0.3 s" in failed.message, failed.message


FOREVER_PAD = b" " * 100_000  # (dribbled at TRICKLE_S: an answer that takes about an hour to come)
TRICKLE_S = 0.03
STOPPED_WITHIN_S = 5.0  # (a Stop heard at once, on a machine running two test suites; it was heard after LONG_S)


def request_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "engine-client-request"}


@pytest.mark.parametrize("route", ["direct", "through the environment's HTTP_PROXY"])
def test_a_request_given_up_at_its_timeout_leaves_no_thread_reading_its_answer(route, monkeypatch):
    """The sync client reads each answer on a thread of its own (to bound a trickled answer's whole time): past the
    timeout the thread was left reading the answer for as long as it trickled, one more for every engine check of a
    studio whose engine trickles forever. The request's connection is now hung up there, and its thread ends; through
    a proxy from the environment too (which the client still goes through)."""
    trickle = CannedServer(canned_answer("200 OK", "application/json", b'{"data": []' + FOREVER_PAD + b"}"),
                           dribble_s=TRICKLE_S)
    url = f"http://127.0.0.1:{trickle.port}"
    if route != "direct":  # (the trickling server is the proxy: the engine's own address is never reached)
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", url)
        url = "http://engine.invalid:8000"
    before = request_threads()
    try:
        with EngineClient(url, timeout=5) as client:
            with pytest.raises(ServerError) as checked:
                client.info(timeout=0.2)
            wait_for(lambda: not request_threads() - before, timeout=1.0)  # (its own thread ended)
            assert trickle.hung_up.wait(1.0)  # (the server saw the connection closed)
    finally:
        trickle.sock.close()
    assert checked.value.code == "timeout", checked.value


def test_stop_while_a_streams_head_is_arriving_ends_it_at_once():
    """Stop pressed while a stream's response head was still arriving (a slow proxy, a trickling server) was heard only
    when the client's whole timeout (60 s) had passed. It now ends the request at once, as stopped (Done, cancelled),
    and closes its connection, in the sync and async clients."""
    unfinished_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Pad: " + FOREVER_PAD
    trickle = CannedServer(unfinished_head, dribble_s=TRICKLE_S)
    url = f"http://127.0.0.1:{trickle.port}"

    def stop_soon() -> threading.Event:
        stop = threading.Event()
        threading.Timer(0.1, stop.set).start()
        return stop

    def spoken():
        with EngineClient(url, timeout=LONG_S) as client:
            return list(client.speak("hello", cancel=stop_soon()))

    async def spoken_async():
        async with AsyncEngineClient(url, timeout=LONG_S) as client:
            return [ev async for ev in client.speak("hello", cancel=stop_soon())]

    try:
        ended = []
        for speak in (spoken, lambda: asyncio.run(spoken_async())):
            trickle.hung_up.clear()
            started = time.monotonic()
            ended.append((speak(), time.monotonic() - started))
            assert trickle.hung_up.wait(1.0)
    finally:
        trickle.sock.close()
    for events, took in ended:
        assert took < STOPPED_WITHIN_S, took
        assert len(events) == 1 and isinstance(events[0], Done) and events[0].finish_reason == "cancelled", events


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_the_client_asks_for_the_compressions_it_reads_reads_each_and_names_one_it_did_not_ask_for(canned_server,
                                                                                                  encoding):
    """The studio asks for gzip or deflate (Accept-Encoding) and must read either, whichever client (sync, async) asked;
    an answer compressed otherwise (br, which a server or proxy may send without being asked) is refused naming it."""
    import gzip
    import zlib

    card = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
    compressed = {"gzip": gzip.compress(card), "deflate": zlib.compress(card), "br": card}[encoding]
    asked = []

    def answer(request: bytes) -> bytes:
        asked.append(re.search(rb"(?im)^accept-encoding:\s*(.*?)\r$", request).group(1).decode())
        return canned_answer("200 OK", "application/json", compressed, f"Content-Encoding: {encoding}\r\n")

    async def model_async(url):
        async with AsyncEngineClient(url, timeout=5) as client:
            try:
                return (await client.info()).id
            except ServerError as e:
                return e

    canned_server.answer = answer
    url = f"http://127.0.0.1:{canned_server.port}"
    with EngineClient(url, timeout=5) as client:
        try:
            read = [client.info().id]
        except ServerError as e:
            read = [e]
    read.append(asyncio.run(model_async(url)))
    assert asked == ["gzip, deflate"] * 2
    if encoding == "br":
        assert all(isinstance(r, ServerError) and r.code == "protocol_error" and "'br'" in r.message for r in read), read
    else:
        assert read == ["m", "m"]


def test_json_nested_deeper_than_python_reads_is_said_as_unreadable_not_raised(canned_server):
    """A server answering JSON nested 100 000 deep ([[[...]]]: a hostile or broken one) raised RecursionError out of
    info() (the studio's engine check) and out of a chat's stream (a tab's whole request lost): each is now a
    protocol_error saying the JSON is nested too deeply to read."""
    nested = b"[" * 100_000 + b"]" * 100_000
    url = f"http://127.0.0.1:{canned_server.port}"

    async def checked_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            with pytest.raises(ServerError) as checked:
                await client.info()
            return checked.value

    canned_server.answer = canned_answer("200 OK", "application/json", b'{"object": "list", "data": ' + nested + b"}")
    with EngineClient(url, timeout=5) as client:
        with pytest.raises(ServerError) as checked:
            client.info()
        said = [checked.value, asyncio.run(checked_async())]
        canned_server.answer = SSE_HEAD + b'data: {"choices": ' + nested + b"}\n\n" + CHAT_END
        said.append(list(client.chat([{"role": "user", "content": "hi"}], transport="http"))[-1])
    for failed in said:
        assert failed.code == "protocol_error" and "nested too deeply" in failed.message, failed


def test_a_stream_line_of_megabytes_is_read_at_once_and_one_over_the_clients_bound_is_refused_naming_it(
        canned_server, monkeypatch):
    """An SSE event with a 10 MB data line took 30 s to read (each piece of it searched and copied with all the line
    before it) and no line was too long. It is read in well under a second, and a line longer than the largest event
    the client accepts (core.MAX_MESSAGE_BYTES, 1 MB here) ends the stream with a protocol_error naming that bound."""
    from engine.client import core

    words = "ab " * 3_500_000  # (10.5 MB of text in one event)
    line = CHAT_CHUNK.replace(b'"hi"', json.dumps(words).encode())
    canned_server.answer = SSE_HEAD + line + CHAT_END
    url = f"http://127.0.0.1:{canned_server.port}"
    ask = [{"role": "user", "content": "hi"}]

    async def chat_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            return [ev async for ev in client.chat(ask, transport="http")][-1]

    with EngineClient(url, timeout=5) as client:
        started = time.monotonic()
        read = list(client.chat(ask, transport="http"))
        took = time.monotonic() - started
        monkeypatch.setattr(core, "MAX_MESSAGE_BYTES", 2**20)
        refused = [list(client.chat(ask, transport="http"))[-1], asyncio.run(chat_async())]
    assert isinstance(read[-1], Done) and text_of(read) == words and took < 2.0, (read[-1], took)
    for failed in refused:
        assert failed.code == "protocol_error" and "a line longer than 1 MB" in failed.message, failed
        assert f"127.0.0.1:{canned_server.port}/v1/chat/completions" in failed.message, failed


def test_a_whole_answer_past_the_clients_bound_is_refused_not_read_into_memory(canned_server, monkeypatch):
    """A whole (not streamed) answer had no bound: a hostile or broken server's endless body, or a small gzip inflating
    to gigabytes, grew the studio's memory until it was killed (its engine check reads the model card). Past
    core.MAX_ANSWER_BYTES (1 MB here), by its Content-Length or as it is read and decompressed, it is a protocol_error
    naming the bound, in both clients; an answer within it is read as before."""
    import gzip

    from engine.client import core

    monkeypatch.setattr(core, "MAX_ANSWER_BYTES", 2**20)
    url = f"http://127.0.0.1:{canned_server.port}"
    card = json.dumps({"object": "list", "data": [{"id": "m", "pad": " " * 900_000}]}).encode()  # (within)
    big = json.dumps({"object": "list", "data": [{"id": "m", "pad": " " * 1_100_000}]}).encode()
    json_head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    chunked = (json_head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (big[i:i + 65536] for i in range(0, len(big), 65536)))
    answers = {"length": canned_answer("200 OK", "application/json", big),
               "chunked": chunked + b"0\r\n\r\n",
               "gzip": canned_answer("200 OK", "application/json", gzip.compress(big), "Content-Encoding: gzip\r\n")}

    async def info_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            try:
                return await client.info()
            except ServerError as e:
                return e

    canned_server.answer = canned_answer("200 OK", "application/json", card)
    with EngineClient(url, timeout=5) as client:
        assert client.info().id == "m"
        said = {}
        for name, answer in answers.items():
            canned_server.answer = answer
            try:
                said[name] = client.info()
            except ServerError as e:
                said[name] = e
        said["async gzip"] = asyncio.run(info_async())
    for name, failed in said.items():
        assert isinstance(failed, ServerError) and failed.code == "protocol_error", (name, failed)
        assert "larger than the 1 MB this client reads whole" in failed.message, (name, failed.message)
    assert "Content-Length says" in said["length"].message and "decompressed" in said["gzip"].message


def test_a_stream_with_bytes_that_are_not_utf8_is_refused_naming_them(canned_server):
    """A stream with bytes that are not UTF-8 in a reply's text was read with U+FFFD in their place: the reply showed
    'h��i' as if the model had written it. The stream now ends with a protocol_error naming the bytes (the SSE reader
    both clients use)."""
    canned_server.answer = SSE_HEAD + CHAT_CHUNK.replace(b'"hi"', b'"h\xff\xfei"') + CHAT_END
    with EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        events = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))
    assert "\ufffd" not in text_of(events) and events[-1].code == "protocol_error", events
    assert "not UTF-8" in events[-1].message and r"b'\xff'" in events[-1].message, events[-1]


def test_a_web_page_answering_a_stream_without_saying_it_is_one_is_said_as_a_web_page(canned_server):
    """A proxy's login page answering a stream with no Content-Type (or as text/plain) was read as a stream: it ended
    with 'the stream ended without a result: ... cut off before its last event' or 'unexpected stream line
    <!DOCTYPE html>', sending the user to the engine. It is now said as a web page answering instead of the engine,
    with its title (the SSE reader both clients use)."""
    page = b"<!DOCTYPE html>\n<html><head><title>Proxy login</title></head>\n<body>Log in</body></html>\n"
    canned_server.answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(page) + page
    with EngineClient(f"http://127.0.0.1:{canned_server.port}", timeout=5) as client:
        failed = list(client.chat([{"role": "user", "content": "hi"}], transport="http"))[-1]
    assert failed.code == "protocol_error" and "a web page ('Proxy login') answered" in failed.message, failed


def realtime_chat_endings(url: str) -> list:
    """The last event of a realtime chat with the engine at `url`, through the sync client, then the async one."""
    async def chatted_async():
        async with AsyncEngineClient(url, timeout=5) as client:
            return [ev async for ev in client.chat([{"role": "user", "content": "hi"}])][-1]

    with EngineClient(url, timeout=5) as client:
        return [list(client.chat([{"role": "user", "content": "hi"}]))[-1], asyncio.run(chatted_async())]


def test_a_realtime_handshake_answered_with_200_is_said_as_no_websocket_opened(canned_server):
    """A websocket handshake answered 200 with a body (a proxy that does not pass websockets on, or another server) was
    said as 'HTTP 200 from ws://...: {"ok": true}', a success status as the whole error. It now says that the handshake
    was answered without opening a websocket, and what usually does that (sync and async)."""
    canned_server.answer = canned_answer("200 OK", "application/json", b'{"ok": true}')
    said = realtime_chat_endings(f"ws://127.0.0.1:{canned_server.port}")
    for failed in said:
        assert failed.code == "protocol_error" and '{"ok": true}' in failed.message, failed
        assert "answered without opening a websocket" in failed.message and "Upgrade" in failed.message, failed


@pytest.mark.parametrize("answer, says", [
    (b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<p>hi</p>", "expected HTTP/1.1: HTTP/1.0 200 OK"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH-2.0-OpenSSH_9.6"),
    (b"", "closed it without answering the realtime (websocket) handshake")])
def test_a_realtime_handshake_answered_with_no_http_11_answer_is_said_as_answered_not_unreachable(canned_server,
                                                                                                   answer, says):
    """A realtime handshake answered by an HTTP/1.0 server, by another protocol's greeting (an SSH port), or by a
    connection closed at once was said as 'could not reach the engine server ... InvalidMessage: did not receive a
    valid HTTP response': the address was reached. Each says what came (or that nothing did, which may be an engine
    restarting: still connect_failed), sync and async."""
    canned_server.answer = answer
    said = realtime_chat_endings(f"ws://127.0.0.1:{canned_server.port}")
    for failed in said:  # (a connection closed unanswered is still connect_failed: an engine restarting may do it)
        assert failed.code == ("protocol_error" if answer else "connect_failed") and says in failed.message, failed
        assert "could not reach" not in failed.message and "InvalidMessage" not in failed.message, failed


@pytest.mark.parametrize("hang", ["no handshake", "no session event"])
def test_stop_while_a_chats_session_opens_on_a_hung_engine_ends_it_at_once(hung_ports, hang):
    """A chat's realtime session opening on a hung engine (its handshake, or the session's first event, never coming)
    heard Stop only when the connect timeout (10 s) had passed. Stop now ends the chat at once, as stopped (Done,
    cancelled), in the sync and async clients."""
    url = f"ws://127.0.0.1:{hung_ports[0] if hang == 'no handshake' else hung_ports[1]}"
    ask = [{"role": "user", "content": "hi"}]

    def stop_soon() -> threading.Event:
        stop = threading.Event()
        threading.Timer(0.1, stop.set).start()
        return stop

    def chatted():
        with EngineClient(url, timeout=LONG_S, connect_timeout=LONG_S) as client:
            return list(client.chat(ask, cancel=stop_soon()))

    async def chatted_async():
        async with AsyncEngineClient(url, timeout=LONG_S, connect_timeout=LONG_S) as client:
            return [ev async for ev in client.chat(ask, cancel=stop_soon())]

    for chat in (chatted, lambda: asyncio.run(chatted_async())):
        started = time.monotonic()
        events = chat()
        took = time.monotonic() - started
        assert took < STOPPED_WITHIN_S and len(events) == 1 and events[0].finish_reason == "cancelled", (took, events)
