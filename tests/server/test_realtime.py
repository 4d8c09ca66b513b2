"""The realtime protocol through a plain `websockets` client against a real server on loopback:
a whole session (text, image, audio buffer, webcam frames, two responses) whose output equals the
in-process engine's, cancellation and disconnects (within one decode step, KV cache freed),
session isolation, FIFO queue positions and the session limit."""

import base64
import json
import time
from contextlib import ExitStack

import numpy as np
import pytest
from websockets.sync.client import connect

from engine.media.video import WebcamClip
from tests.server import (SYSTEM, b64, fake_server, image_array, long_prompt, png_bytes, recv_item, recv_json,
                          recv_until, reference_chat, running_server, tone_pcm16, wait_for)


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_sessions=16) as srv:
        yield srv


def send(ws, **event):
    ws.send(json.dumps(event))


def opened(ws) -> dict:
    ev = recv_json(ws)
    assert ev["type"] == "session.created", ev
    return ev["session"]


def test_whole_session_matches_the_in_process_engine(server, tiny_engine):
    img = image_array(40, 56, seed=1)
    pcm = tone_pcm16(0.6, rate=24000)
    frames = [image_array(36, 48, seed=10 + i) for i in range(4)]
    with connect(server.ws_url) as ws:
        session = opened(ws)
        assert session["output_modalities"] == ["text"] and session["instructions"] is None
        send(ws, type="session.update", event_id="u1",
             session={"instructions": SYSTEM, "max_output_tokens": 5,
                      "input_audio_format": {"type": "audio/pcm", "rate": 24000}})
        upd = recv_json(ws)
        assert upd["type"] == "session.updated" and upd["session"]["max_output_tokens"] == 5
        assert upd["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Look:"},
            {"type": "input_image", "image_url": "data:image/png;base64," + b64(png_bytes(img))}]})
        ev = recv_item(ws)
        assert ev["previous_item_id"] is None
        assert ev["item"]["content"][1] == {"type": "input_image", "width": 56, "height": 40}
        for chunk in np.array_split(pcm, 5):
            send(ws, type="input_audio_buffer.append", audio=b64(chunk.tobytes()))
        send(ws, type="input_audio_buffer.commit")
        committed, created = recv_json(ws), recv_item(ws)
        assert committed["type"] == "input_audio_buffer.committed" and committed["previous_item_id"] == ev["item"]["id"]
        assert created["item"]["content"][0]["seconds"] == 0.6 and created["item"]["content"][0]["sample_rate"] == 24000
        for i, f in enumerate(frames):
            send(ws, type="input_video_buffer.append", image=b64(png_bytes(f)), capture_time=10 + 0.5 * i)
        send(ws, type="input_video_buffer.commit")
        vc, vitem = recv_json(ws), recv_item(ws)
        assert vc["type"] == "input_video_buffer.committed" and vc["frames"] == 4
        assert vitem["item"]["content"][0] == {"type": "input_video", "frames": 4, "seconds": 1.5}
        send(ws, type="response.create", event_id="r1")
        events = recv_until(ws, "rate_limits.updated")  # after each response.done
        limits = events.pop()
        # second turn: the assistant's reply is now part of the conversation
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user",
                                                        "content": [{"type": "input_text", "text": "More?"}]})
        recv_item(ws)
        send(ws, type="response.create", response={"max_output_tokens": 3})
        events2 = recv_until(ws, "response.done")

    clip = WebcamClip()
    for i, f in enumerate(frames):
        clip.add_frame(f, 10 + 0.5 * i)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": img}]},
                {"role": "user", "content": [{"type": "audio", "audio": pcm, "sample_rate": 24000}]},
                {"role": "user", "content": [{"type": "video", "video": clip}]}]
    expected = reference_chat(tiny_engine, messages, 5, system_prompt=SYSTEM)

    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.queue_position"]
    assert events[1]["position"] == 0
    assert types[-5:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "conversation.item.done", "response.done"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert deltas == expected.text == events[-5]["text"]
    assert done["status"] == ("incomplete" if expected.finish_reason == "length" else "completed")
    assert done["output"][0]["content"][0]["text"] == expected.text
    # usage by modality: the prompt's patch tokens, counted here from the prompt the engine builds
    prompt = tiny_engine.processor.build(messages, system_prompt=SYSTEM)
    patches = {name: prompt.ids.count(tiny_engine.tokenizer.token_id(name))
               for name in ("<imagePatch>", "<framePatch>", "<audioPatch>")}
    assert all(patches.values()), patches
    n_in, n_out = expected.stats.prompt_tokens, expected.stats.new_tokens
    assert done["usage"] == {
        "input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
        "input_token_details": {"text_tokens": n_in - sum(patches.values()), "audio_tokens": patches["<audioPatch>"],
                                "image_tokens": patches["<imagePatch>"] + patches["<framePatch>"], "cached_tokens": 0,
                                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}},
        "output_token_details": {"text_tokens": n_out, "audio_tokens": 0}}
    # what is left of the server's limits: its whole line (nothing waits), and the context less this response
    context = server.ctx.prompt_bound.context_tokens
    assert limits == {"type": "rate_limits.updated", "event_id": limits["event_id"], "rate_limits": [
        {"name": "requests", "limit": server.ctx.limits.max_queue, "remaining": server.ctx.limits.max_queue},
        {"name": "tokens", "limit": context, "remaining": context - n_in - n_out}]}
    m = done["metrics"]
    assert m["queue_wait_ms"] >= 0 and m["time_to_first_token_ms"] > 0 and m["media_encode_ms"] > 0
    assert "tokens_per_s" in m and m["engine_time_to_first_token_ms"] > 0

    messages += [{"role": "assistant", "content": expected.text}, {"role": "user", "content": "More?"}]
    expected2 = reference_chat(tiny_engine, messages, 3, system_prompt=SYSTEM)
    assert "".join(e["delta"] for e in events2 if e["type"] == "response.output_text.delta") == expected2.text
    assert events2[-1]["response"]["usage"]["input_tokens"] == expected2.stats.prompt_tokens


def test_a_response_after_an_assistant_item_continues_that_item(server, tiny_engine):
    """response.create right after an assistant item (conversation.item.create role=assistant) was refused ('the last
    item must come from the user'); OpenAI answers the conversation as it is: the model continues that item (its
    text starts the reply, as the in-process engine's assistant_prefix), and the reply joins after it. Input with no
    user item at all is refused naming response.input."""
    from engine.events import Done
    from engine.sampling import GenerationParams
    from tests.server import torch_threads

    question, start = "Name a city.", "The city is"
    with connect(server.ws_url) as ws:
        opened(ws)
        send(ws, type="session.update", session={"instructions": SYSTEM})
        recv_until(ws, "session.updated")
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": question})
        recv_item(ws)
        send(ws, type="conversation.item.create", item={"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": start}]})
        said = recv_item(ws)["item"]["id"]
        send(ws, type="response.create", response={"max_output_tokens": 4})
        events = recv_until(ws, "response.done")
        send(ws, type="response.create", event_id="only-assistant", response={"input": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": start}]}]})
        refused = recv_json(ws)
    assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]  # (incomplete: at 4 tokens)
    assert next(e for e in events if e["type"] == "conversation.item.added")["previous_item_id"] == said
    with torch_threads(1):
        expected = list(tiny_engine.chat([{"role": "user", "content": question}], GenerationParams(max_new_tokens=4),
                                         system_prompt=SYSTEM, assistant_prefix=start))[-1]
    assert isinstance(expected, Done)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == expected.text
    assert refused["type"] == "error" and refused["error"]["code"] == "conversation_empty", refused
    assert refused["error"]["param"] == "response.input" and refused["error"]["event_id"] == "only-assistant"


def test_null_for_an_optional_setting_leaves_it_as_it_is(server):
    """session.update with output_modalities, modalities, audio, audio.input, audio.input.format, input_audio_format
    or input_audio_sample_rate null was refused (invalid_type, invalid_value), where null for the other optional
    fields is taken (OpenAI's SDK sends the whole session object, unset fields as null); it now leaves the setting
    as it is, as leaving the field out does. A response's output_modalities null is the session's."""
    with connect(server.ws_url) as ws:
        before = opened(ws)
        for session in ({"output_modalities": None}, {"modalities": None}, {"audio": None}, {"audio": {"input": None}},
                        {"audio": {"input": {"format": None}}}, {"input_audio_format": None},
                        {"input_audio_sample_rate": None}):
            send(ws, type="session.update", session=session)
            updated = recv_json(ws)
            assert updated["type"] == "session.updated", (session, updated)
            assert updated["session"] == before, session
        send(ws, type="response.create", response={"output_modalities": None, "max_output_tokens": 1,
                                                    "input": [{"type": "message", "role": "user", "content": "hi"}]})
        created = recv_json(ws)
        assert created["type"] == "response.created" and created["response"]["output_modalities"] == ["text"], created
        recv_until(ws, "response.done")


def test_image_output_is_refused_and_audio_is_spoken(server):
    with connect(server.ws_url) as ws:
        opened(ws)
        for modalities in (["image"], ["text", "image"]):
            send(ws, type="session.update", event_id="m", session={"output_modalities": modalities})
            err = recv_json(ws)
            assert err["type"] == "error" and err["error"]["code"] == "modality_not_supported"
            assert "/v1/images/generations" in err["error"]["message"] and err["error"]["event_id"] == "m"
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "hi"})
        recv_item(ws)
        send(ws, type="response.create", event_id="r", response={"modalities": ["image", "text"]})
        err = recv_json(ws)
        assert err["type"] == "error" and err["error"]["code"] == "modality_not_supported"
        send(ws, type="session.update", session={})  # the session is unchanged and still serving
        assert recv_json(ws)["session"]["output_modalities"] == ["text"]
        # the tiny engine has a talker: a response asked for audio speaks, end to end
        send(ws, type="response.create", response={"output_modalities": ["text", "audio"], "max_output_tokens": 12,
                                                   "audio": {"output": {"voice": "default"}}})
        events = recv_until(ws, "response.done", 120)
    kinds = [e["type"] for e in events]
    audio = [e for e in events if e["type"] == "response.output_audio.delta"]
    transcript = [e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"]
    assert audio and all(e["sample_rate"] == 24000 and base64.b64decode(e["delta"]) for e in audio)  # OpenAI's rate
    assert "response.output_text.delta" in kinds and transcript
    assert kinds.index("response.output_audio_transcript.delta") < kinds.index("response.output_audio.delta")
    parts = [e["part"]["type"] for e in events if e["type"] == "response.content_part.added"]
    assert parts == ["text", "audio"]
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete")  # incomplete: max_output_tokens reached
    spoken = [c for c in done["output"][0]["content"] if c["type"] == "output_audio"][0]["transcript"]
    assert spoken == "".join(transcript) and spoken.strip()
    usage = done["usage"]  # the thinker's text tokens and the talker's latent patches, each counted
    out, inp = usage["output_token_details"], usage["input_token_details"]
    assert out["text_tokens"] > 0 and out["audio_tokens"] > 0
    assert usage["output_tokens"] == out["text_tokens"] + out["audio_tokens"]
    assert usage["input_tokens"] == inp["text_tokens"] + inp["audio_tokens"] + inp["image_tokens"] == inp["text_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    m = done["metrics"]
    seconds = sum(len(base64.b64decode(e["delta"])) // 2 for e in audio) / 24000
    assert m["audio_seconds"] == pytest.approx(seconds, abs=1e-3) and m["time_to_first_audio_ms"] > 0
    assert m["time_to_first_token_ms"] > 0 and m["audio_real_time_factor"] > 0


def _record_for(server, session_id, timeout=20.0):
    return wait_for(lambda: next((r for r in server.ctx.scheduler.history if r.label.endswith(session_id)), None),
                    timeout)


def test_response_cancel_stops_within_one_decode_step(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    with connect(server.ws_url) as ws:
        sid = opened(ws)["id"]
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": prompt})
        recv_item(ws)
        send(ws, type="response.create", response={"max_output_tokens": 400, "instructions": SYSTEM})
        recv_until(ws, "response.output_text.delta")
        send(ws, type="response.cancel")
        events = recv_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        assert done["usage"]["output_tokens"] < 400
        send(ws, type="response.cancel", event_id="late")  # nothing active any more
        err = recv_json(ws)
        assert err["error"]["code"] == "response_cancel_not_active" and err["error"]["event_id"] == "late"
    rec = _record_for(server, sid)
    assert rec.finish_reason == "cancelled"
    assert rec.steps_after_cancel is not None and rec.steps_after_cancel <= 1
    assert rec.cancel_latency_s is not None and rec.cancel_latency_s < 5.0
    print(f"\n[cancel via response.cancel] decode steps after cancel: {rec.steps_after_cancel}, "
          f"latency {1000 * rec.cancel_latency_s:.1f} ms")


def test_disconnect_mid_stream_cancels_and_frees_the_kv_cache(server, tiny_engine, monkeypatch):
    llm = tiny_engine.model.llm
    made = []
    original = llm.new_cache

    def tracking_new_cache(*args, **kwargs):
        cache = original(*args, **kwargs)
        made.append(cache)
        return cache

    monkeypatch.setattr(llm, "new_cache", tracking_new_cache)
    prompt = long_prompt(tiny_engine)
    with connect(server.ws_url) as ws:
        sid = opened(ws)["id"]
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": prompt})
        recv_item(ws)
        send(ws, type="response.create", response={"max_output_tokens": 400, "instructions": SYSTEM})
        recv_until(ws, "response.output_text.delta")
        assert made and made[-1].capacity > 0  # generating, with its cache allocated
        ws.close()  # the client goes away mid-stream
    rec = _record_for(server, sid)
    assert rec.finish_reason == "cancelled" and rec.new_tokens < 400
    assert rec.steps_after_cancel is not None and rec.steps_after_cancel <= 1
    assert made[-1].capacity == 0 and made[-1].k == [] and made[-1].v == []  # KV cache freed
    assert tiny_engine._lock.acquire(timeout=5)  # the engine is free for the next request
    tiny_engine._lock.release()
    wait_for(lambda: sid not in server.ctx.sessions.open)
    print(f"\n[cancel via disconnect] decode steps after cancel: {rec.steps_after_cancel}, "
          f"latency {1000 * rec.cancel_latency_s:.1f} ms")


def test_sessions_are_isolated(server):
    with connect(server.ws_url) as a, connect(server.ws_url) as b:
        sa, sb = opened(a), opened(b)
        assert sa["id"] != sb["id"]
        send(a, type="session.update", session={"instructions": "secret A", "max_output_tokens": 7})
        recv_json(a)  # session.updated
        send(a, type="input_audio_buffer.append", audio=b64(tone_pcm16(0.5).tobytes()))
        for i in range(2):
            send(a, type="input_video_buffer.append", image=b64(png_bytes(image_array(seed=i))), capture_time=i)
        send(a, type="conversation.item.create", item={"type": "message", "role": "user", "content": "A only"})
        recv_item(a)
        # nothing of A is visible in B
        for event, code in (("input_audio_buffer.commit", "input_audio_buffer_commit_empty"),
                            ("input_video_buffer.commit", "input_video_buffer_commit_empty"),
                            ("response.create", "conversation_empty")):
            send(b, type=event, event_id=event)
            err = recv_json(b)
            assert err["type"] == "error" and err["error"]["code"] == code and err["error"]["event_id"] == event
        send(b, type="session.update", session={})
        s = recv_json(b)["session"]
        assert s["instructions"] is None and s["max_output_tokens"] != 7
        # A still has all of it
        send(a, type="input_audio_buffer.commit")
        assert recv_json(a)["type"] == "input_audio_buffer.committed"
        recv_item(a)
        send(a, type="input_video_buffer.commit")
        assert recv_json(a)["frames"] == 2


def test_queue_positions_are_reported_in_fair_fifo_order(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(server.ws_url)) for _ in range(4)]
        ids = []
        for ws in sockets:
            ids.append(opened(ws)["id"])
            send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": prompt})
            recv_item(ws)
        first = []
        for i, ws in enumerate(sockets):  # the first runs long so the others queue behind it
            send(ws, type="response.create", response={"max_output_tokens": 40 if i == 0 else 2,
                                                        "instructions": SYSTEM})
            first.append(recv_until(ws, "response.queue_position"))  # in line before the next one asks
        positions = []
        for ws, pre in zip(sockets, first):
            events = pre + recv_until(ws, "response.done")
            positions.append([e["position"] for e in events if e["type"] == "response.queue_position"])
            assert events[-1]["response"]["status"] in ("completed", "incomplete")
            assert events[-1]["response"]["metrics"]["queue_wait_ms"] >= 0
    assert positions == [[0], [1, 0], [2, 1, 0], [3, 2, 1, 0]]
    finished = [r.label.split()[-1] for r in server.ctx.scheduler.history if r.label.split()[-1] in ids]
    assert finished == ids  # served in arrival order


def test_session_limit_refuses_the_handshake_with_a_clear_error(tiny_engine):
    """A session past the limit is refused before the upgrade (503, OpenAI's error body, Retry-After): it was
    accepted and then sent an error event, so a client first thought it was connected."""
    from websockets.exceptions import InvalidStatus

    with running_server(tiny_engine, max_sessions=2) as srv:
        with connect(srv.ws_url) as a, connect(srv.ws_url) as b:
            opened(a), opened(b)
            with pytest.raises(InvalidStatus) as info:
                connect(srv.ws_url)
            answer = info.value.response
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
            error = json.loads(answer.body)["error"]
            assert error["code"] == "session_limit_reached" and "2 are open" in error["message"], error
            assert len(srv.ctx.sessions) == 2  # the refused handshake holds no slot
        time.sleep(0.05)
        wait_for(lambda: len(srv.ctx.sessions) == 0)
        with connect(srv.ws_url) as d:  # slots are freed when sessions close
            opened(d)


def test_a_session_past_its_longest_life_is_told_and_closed_and_its_slot_freed(tiny_engine):
    """A client that answers pings held one of the server's session slots for ever; past `max_session_s` (OpenAI's
    60 minutes) it gets session_expired, the socket closes normally and the slot is free again."""
    from websockets.exceptions import ConnectionClosed

    with running_server(tiny_engine, max_sessions=1, max_session_s=1.5) as srv:
        with connect(srv.ws_url) as a:
            opened(a)
            send(a, type="conversation.item.create", item={"type": "message", "role": "user",
                                                            "content": [{"type": "input_text", "text": "hi"}]})
            recv_item(a)  # the session works meanwhile
            err = recv_json(a, timeout=10)
            assert err["type"] == "error" and err["error"]["code"] == "session_expired"
            assert err["error"]["type"] == "invalid_request_error" and "maximum duration" in err["error"]["message"]
            with pytest.raises(ConnectionClosed) as info:
                a.recv(timeout=5)
            assert info.value.rcvd.code == 1000
        wait_for(lambda: len(srv.ctx.sessions) == 0)
        with connect(srv.ws_url) as b:
            opened(b)


def test_webcam_frames_waiting_for_commit_are_held_within_the_media_budget():
    """600 frames of 4000x4000 (black PNGs of 47 KB each) would have been held decoded: 28 GiB. The
    push-to-talk clip drops its oldest frames beyond the session's media budget, as beyond its frame cap."""
    from engine.server.limits import Limits
    from engine.server.sessions import Session

    session = Session(Limits(max_session_media_bytes=3 * 1024 * 1024))
    for i in range(4):
        session.clip.add_frame(np.zeros((600, 800, 3), np.uint8), float(i))  # 1.4 MiB each
    assert len(session.clip) == 2 and session.clip.nbytes <= 3 * 1024 * 1024


def test_making_room_in_a_full_conversation_never_drops_the_item_a_running_reply_answers():
    """A hands-free turn whose audio passes the session's media budget with the turn a running reply answers made
    room by dropping that turn (the reply then joined after an item the client had been told was deleted); the
    answered item, and the turns after it, stay (adding the new turn is then refused by the budget, by name)."""
    from engine.server.limits import Limits
    from engine.server.sessions import Item, Session

    session = Session(Limits(max_session_media_bytes=3 * 1024 * 1024))

    def turn(name: str) -> Item:
        return Item(name, "user", [{"type": "audio", "audio": np.zeros(1024 * 1024, np.int16)}], [])  # 2 MiB

    session.add_item(turn("old"))
    assert session.make_room(turn("answered")) == ["old"]
    session.add_item(turn("answered"))
    assert session.make_room(turn("new"), keep="answered") == []
    assert [it.id for it in session.items] == ["answered"]
    assert session.make_room(turn("new")) == ["answered"]  # (what it did)


def test_session_media_budget_and_audio_buffer_limits(tiny_engine):
    pcm = tone_pcm16(1.0, rate=24000)  # 48 000 bytes of PCM16 at the session's rate (OpenAI's default, 24 kHz)
    with running_server(tiny_engine, max_session_media_bytes=150_000, max_audio_seconds=1.5) as srv:
        with connect(srv.ws_url) as ws:
            opened(ws)
            for i in range(3):
                send(ws, type="input_audio_buffer.append", audio=b64(pcm.tobytes()))
                send(ws, type="input_audio_buffer.commit")
                assert recv_json(ws)["type"] == "input_audio_buffer.committed"
                recv_item(ws)
            send(ws, type="input_audio_buffer.append", audio=b64(pcm.tobytes()))
            send(ws, type="input_audio_buffer.commit", event_id="c4")
            err = recv_json(ws)
            assert err["error"]["code"] == "session_media_limit" and err["error"]["event_id"] == "c4"
            send(ws, type="input_audio_buffer.clear")
            assert recv_json(ws)["type"] == "input_audio_buffer.cleared"
            send(ws, type="input_audio_buffer.append", audio=b64(pcm.tobytes()))
            send(ws, type="input_audio_buffer.append", event_id="a2", audio=b64(pcm.tobytes()))
            err = recv_json(ws)
            assert err["error"]["code"] == "audio_too_long" and "1.5 s" in err["error"]["message"]


def test_the_reply_being_written_can_be_retrieved_and_is_not_called_missing():
    """The assistant item of a running response is announced (conversation.item.added) before it joins
    the conversation (at response.done): retrieving it then used to answer item_not_found and deleting
    it 'no item with id ... in this session', of an id the server had just sent. It is retrieved as it
    stands (in_progress), a delete says to cancel or wait, and it joins the conversation whole."""
    from engine.events import Done, TextDelta
    from tests.server import FakeEngine, fake_server

    script = [TextDelta(w) for w in ("one ", "two ", "three ", "four ", "five ")] + [Done("one two three four five ",
                                                                                        "stop")]
    with fake_server(FakeEngine(script, step_s=0.25)) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "count"})
        recv_item(ws)
        send(ws, type="response.create")
        item_id = recv_until(ws, "response.output_item.added")[-1]["item"]["id"]
        send(ws, type="conversation.item.retrieve", item_id=item_id, event_id="get")
        send(ws, type="conversation.item.delete", item_id=item_id, event_id="del")
        events = recv_until(ws, "response.done")
        retrieved = [ev["item"] for ev in events if ev["type"] == "conversation.item.retrieved"]
        assert retrieved and retrieved[0]["id"] == item_id and retrieved[0]["status"] == "in_progress", events
        assert retrieved[0]["role"] == "assistant"
        errors = [ev["error"] for ev in events if ev["type"] == "error"]
        assert len(errors) == 1 and errors[0]["event_id"] == "del" and errors[0]["code"] == "invalid_state", errors
        assert errors[0]["param"] == "item_id" and "response.cancel" in errors[0]["message"]
        assert events[-1]["response"]["status"] == "completed"
        send(ws, type="conversation.item.retrieve", item_id=item_id)
        after = recv_json(ws)
        assert after["type"] == "conversation.item.retrieved", after
        assert after["item"]["content"][0]["text"] == "one two three four five "


def test_an_item_cannot_take_the_id_of_the_reply_being_written():
    """A user item created with the id of the assistant reply still being written was taken: once the reply joined
    at response.done the conversation held two items of one id (retrieve, delete and truncate then acted on the
    first, whichever that was)."""
    from engine.events import Done, TextDelta
    from tests.server import FakeEngine, fake_server

    script = [TextDelta(w) for w in ("one ", "two ", "three ")] + [Done("one two three ", "stop")]
    with fake_server(FakeEngine(script, step_s=0.25)) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "count"})
        recv_item(ws)
        send(ws, type="response.create")
        reply_id = recv_until(ws, "response.output_item.added")[-1]["item"]["id"]
        send(ws, type="conversation.item.create", event_id="twin",
             item={"id": reply_id, "type": "message", "role": "user", "content": "same id"})
        events = recv_until(ws, "response.done")
        errors = [ev["error"] for ev in events if ev["type"] == "error"]
        assert [(e["event_id"], e["code"], e["param"]) for e in errors] == [("twin", "invalid_value", "item.id")], events
        assert not [ev for ev in events if ev["type"] == "conversation.item.added" and ev["item"]["role"] == "user"]


def test_previous_item_id_inserts_where_it_says():
    """conversation.item.create with previous_item_id 'root' (OpenAI: the start of the conversation) or an
    earlier item's id (right after it) was refused ('items can only be appended'), even 'root' in an empty
    conversation; it inserts there, the next response reads the conversation in that order, and an id the
    session does not hold is item_not_found naming previous_item_id."""
    from tests.server import FakeEngine, fake_server

    engine = FakeEngine()
    with fake_server(engine) as srv, connect(srv.ws_url) as ws:
        opened(ws)

        def create(text, **where):
            send(ws, type="conversation.item.create", event_id=text,
                 item={"type": "message", "role": "user", "content": text}, **where)
            ev = recv_json(ws)
            if ev["type"] == "error":
                return ev
            assert recv_json(ws)["type"] == "conversation.item.done"
            return ev

        b = create("b", previous_item_id="root")
        assert b["previous_item_id"] is None
        d = create("d")
        a = create("a", previous_item_id="root")
        c = create("c", previous_item_id=b["item"]["id"])
        assert (a["previous_item_id"], c["previous_item_id"]) == (None, b["item"]["id"])
        e = create("e", previous_item_id=d["item"]["id"])  # the last item's id: appended
        assert e["previous_item_id"] == d["item"]["id"]
        missing = create("x", previous_item_id="item_nowhere")
        assert missing["type"] == "error" and missing["error"]["code"] == "item_not_found", missing
        assert missing["error"]["param"] == "previous_item_id" and missing["error"]["event_id"] == "x"
        send(ws, type="response.create")
        assert recv_until(ws, "response.done")[-1]["response"]["status"] == "completed"
        said = [m["content"][0]["text"] for m in engine.calls[-1]["messages"]]
        assert said == ["a", "b", "c", "d", "e"], said


def test_a_reply_with_no_room_in_the_conversation_is_refused_up_front_not_lost():
    """With the conversation at its item limit, response.create used to run, stream a reply and announce
    it (conversation.item.done), then drop it silently: a retrieve of its id said item_not_found and the
    next response never saw it. It is refused before it starts; a reply that loses its room while it
    runs (items created meanwhile) is followed by an error saying it was not kept."""
    from engine.events import Done, TextDelta
    from tests.server import FakeEngine, fake_server

    script = [TextDelta("a "), TextDelta("b"), Done("a b", "stop")]
    with fake_server(FakeEngine(script, step_s=0.3), max_conversation_items=3) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        ids = []
        for text in ("one", "two", "three"):
            send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": text})
            ids.append(recv_item(ws)["item"]["id"])
        send(ws, type="response.create", event_id="full")
        err = recv_json(ws)
        assert err["type"] == "error" and err["error"]["code"] == "conversation_too_long", err
        assert err["error"]["event_id"] == "full" and "delete items" in err["error"]["message"]
        send(ws, type="conversation.item.delete", item_id=ids[0])
        assert recv_json(ws)["type"] == "conversation.item.deleted"
        send(ws, type="response.create", event_id="last-slot")
        recv_until(ws, "response.created")
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "four"})
        events = recv_until(ws, "response.done")
        events.append(recv_json(ws))
        errors = [ev["error"] for ev in events if ev["type"] == "error"]
        assert [e["code"] for e in errors] == ["conversation_too_long"], events
        assert errors[0]["event_id"] == "last-slot" and "not kept" in errors[0]["message"]



# --------------------------------------------------------------------------- input audio formats


def commit_audio(ws, raw: bytes) -> dict:
    """Append `raw` in two pieces, commit; the committed item's input_audio part."""
    send(ws, type="input_audio_buffer.append", audio=b64(raw[:len(raw) // 2]))
    send(ws, type="input_audio_buffer.append", audio=b64(raw[len(raw) // 2:]))
    send(ws, type="input_audio_buffer.commit", event_id="c")
    ev = recv_json(ws)
    assert ev["type"] == "input_audio_buffer.committed", ev
    return recv_item(ws)["item"]["content"][0]


def spoken_session(ws, rate: int) -> dict:
    """A text item and a session.update asking for audio output at `rate`: the update's answer."""
    opened(ws)
    send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "hi"})
    recv_item(ws)
    send(ws, type="session.update", session={"output_modalities": ["audio"],
                                             "audio": {"output": {"format": {"type": "audio/pcm", "rate": rate}}}})
    return recv_json(ws)


def test_an_output_rate_the_talker_cannot_be_resampled_to_is_refused_where_it_is_set():
    """audio.output.format.rate 2654 (or 24895) passed the input-rate check, but the talker's 24 kHz audio
    cannot be resampled to it: the reply stopped at its first audio chunk and never got response.done.
    It is refused naming the field, in session.update and in response.create."""
    from tests.server import FakeEngine, fake_server

    class Talking(FakeEngine):
        class talker:
            sample_rate = 24000

    with fake_server(Talking(has_talker=True)) as srv, connect(srv.ws_url) as ws:
        err = spoken_session(ws, 2654)
        assert err["type"] == "error" and err["error"]["param"] == "session.audio.output.format.rate", err
        assert "24000 Hz" in err["error"]["message"]
        send(ws, type="response.create", response={"output_modalities": ["audio"], "audio": {"output": {
            "format": {"type": "audio/pcm", "rate": 24895}}}})
        err = recv_json(ws)
        assert err["type"] == "error" and err["error"]["param"] == "response.audio.output.format.rate", err
        send(ws, type="response.create", response={"output_modalities": ["audio"], "audio": {"output": {
            "format": {"type": "audio/pcm", "rate": 44100}}}})
        assert recv_until(ws, "response.done")[-1]["response"]["status"] == "completed"


def test_a_fault_while_a_reply_streams_still_ends_it_with_response_done():
    """A reply whose streaming raised (here: audio the server cannot resample, from an engine that does not
    say its talker's rate) stopped there: no response.done, the client waited for ever. The response now
    fails (server_error) and the session goes on."""
    from tests.server import FakeEngine, fake_server

    with fake_server(FakeEngine(has_talker=True)) as srv, connect(srv.ws_url) as ws:
        assert spoken_session(ws, 2654)["type"] == "session.updated"
        send(ws, type="response.create")
        done = recv_until(ws, "response.done", timeout=20)[-1]["response"]
        assert done["status"] == "failed" and done["status_details"]["error"]["code"] == "server_error", done
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": "again"})
        recv_item(ws)
        send(ws, type="response.create", response={"audio": {"output": {"format": {"type": "audio/pcm",
                                                                                   "rate": 24000}}}})
        assert recv_until(ws, "response.done", timeout=20)[-1]["response"]["status"] == "completed"
        assert srv.ctx.scheduler.running == 0


@pytest.mark.parametrize("spec", [{"input_audio_format": "pcm16"},
                                  {"audio": {"input": {"format": {"type": "audio/pcm"}}}},
                                  {"audio": {"input": {"format": "pcm16"}}}])
def test_openai_pcm16_is_24_khz(spec):
    """OpenAI's 'pcm16' (beta) and {"type": "audio/pcm"} (GA, rate 'always 24000') are 24 kHz PCM16:
    they were read as 16 kHz, so an OpenAI client's 0.5 s turn became 0.75 s of slowed, lowered
    speech (and server_vad's audio_start_ms / audio_end_ms 1.5x too late)."""
    from tests.server import FakeEngine, fake_server

    with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        send(ws, type="session.update", session=spec)
        upd = recv_json(ws)
        assert upd["type"] == "session.updated", upd
        assert upd["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        part = commit_audio(ws, tone_pcm16(0.5, rate=24000).tobytes())
        assert (part["seconds"], part["sample_rate"]) == (0.5, 24000)


def mulaw_encode(x: np.ndarray) -> bytes:
    """G.711 mu-law (the reference encoder's rule: bias 0x84, clip 32635)."""
    x = x.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


@pytest.mark.parametrize("fmt,expected", [
    ("g711_ulaw", {"type": "audio/pcmu"}), ({"type": "audio/pcmu"}, {"type": "audio/pcmu"}),
    ("g711_alaw", {"type": "audio/pcma"}), ({"type": "audio/pcma"}, {"type": "audio/pcma"})])
def test_g711_input_audio_is_decoded(fmt, expected):
    """OpenAI's G.711 input formats (8 kHz, one byte a sample: what telephony bridges send) were
    refused ('must be pcm16'); they are decoded to PCM16 at 8 kHz as they are appended (an odd
    byte count is fine: a byte is a sample), in push-to-talk and server_vad alike."""
    from tests.server import FakeEngine, fake_server

    with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        key = "input_audio_format" if isinstance(fmt, str) else "audio"
        send(ws, type="session.update", session={key: fmt} if key == "input_audio_format" else
             {"audio": {"input": {"format": fmt}}})
        upd = recv_json(ws)
        assert upd["type"] == "session.updated", upd
        assert upd["session"]["audio"]["input"]["format"] == expected
        if expected["type"] == "audio/pcmu":
            raw = bytes([0xFF, 0x7F, 0x00, 0x80, 0x8F]) * 801  # 4005 bytes: 0.5 s and an odd count
            want = [0, 0, -32124, 32124, 16764]
        else:
            raw = bytes([0xD5, 0x55, 0x2A, 0xAA, 0xC5]) * 801
            want = [8, -8, -32256, 32256, 264]
        part = commit_audio(ws, raw)
        assert (part["seconds"], part["sample_rate"]) == (round(4005 / 8000, 3), 8000)
        session = next(iter(srv.ctx.sessions.open.values()))
        audio = session.items[-1].parts[0]["audio"]
        assert audio.dtype == np.int16 and audio[:5].tolist() == want
        # a chunk naming another rate is refused, naming the field
        send(ws, type="input_audio_buffer.append", event_id="r", audio=b64(raw[:100]), sample_rate=16000)
        err = recv_json(ws)["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("invalid_value", "sample_rate", "r"), err
    if expected["type"] == "audio/pcmu":  # the encoder here and the decoder agree on a tone
        tone = tone_pcm16(0.1, rate=8000)
        with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
            opened(ws)
            send(ws, type="session.update", session={"input_audio_format": "g711_ulaw"})
            recv_json(ws)
            commit_audio(ws, mulaw_encode(tone))
            audio = next(iter(srv.ctx.sessions.open.values())).items[-1].parts[0]["audio"]
            assert np.max(np.abs(audio.astype(np.int32) - tone)) < 0.04 * 32768


def test_a_g711_session_reads_item_audio_as_g711():
    """conversation.item.create with {"type": "input_audio", "audio": <base64>} carries audio in the
    session's input format (OpenAI's rule): in a g711_ulaw session its bytes were read as PCM16 at
    8 kHz (noise, half as long); they are decoded as the appends are, and a part may still name its
    own format."""
    from tests.server import FakeEngine, fake_server

    tone = tone_pcm16(0.5, rate=8000)
    with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        send(ws, type="session.update", session={"input_audio_format": "g711_ulaw"})
        assert recv_json(ws)["type"] == "session.updated"
        for part in ({"type": "input_audio", "audio": b64(mulaw_encode(tone))},
                     {"type": "input_audio", "audio": b64(tone_pcm16(0.5).tobytes()), "format": "pcm16",
                      "sample_rate": 16000}):
            send(ws, type="conversation.item.create", item={"type": "message", "role": "user", "content": [part]})
            ev = recv_item(ws)
            assert ev["type"] == "conversation.item.done", ev
            assert ev["item"]["content"][0]["seconds"] == 0.5, ev
        session = next(iter(srv.ctx.sessions.open.values()))
        audio = session.items[0].parts[0]["audio"]
        assert session.items[0].parts[0]["sample_rate"] == 8000
        assert np.max(np.abs(audio.astype(np.int32) - tone)) < 0.04 * 32768
        send(ws, type="conversation.item.create", event_id="x", item={"type": "message", "role": "user", "content": [
            {"type": "input_audio", "audio": b64(mulaw_encode(tone)), "sample_rate": 16000}]})
        err = recv_json(ws)["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("invalid_value", "item.content[0].sample_rate", "x")


# --------------------------------------------------------------------------- input audio transcription


def test_input_audio_transcription_transcribes_each_committed_turn(server):
    """audio.input.transcription (and the beta input_audio_transcription) was accepted and ignored:
    an OpenAI client that turns it on waits for conversation.item.input_audio_transcription.completed
    for ever, and {"model": 5} or "yes" were taken too. Each committed audio turn is now transcribed
    by our ASR: .delta events, then .completed with the whole transcript (also the item's
    `transcript`), naming the item and its input_audio part; the engine is free afterwards."""
    pcm = tone_pcm16(0.6, rate=16000)
    with connect(server.ws_url) as ws:
        opened(ws)
        send(ws, type="session.update", session={"audio": {"input": {"transcription": {
            "model": "gpt-4o-transcribe", "language": "en", "prompt": "A tone."}}}})
        upd = recv_json(ws)
        assert upd["type"] == "session.updated", upd
        assert upd["session"]["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe", "language": "en",
                                                                     "prompt": "A tone."}
        send(ws, type="input_audio_buffer.append", audio=b64(pcm.tobytes()), sample_rate=16000)
        send(ws, type="input_audio_buffer.commit")
        events = recv_until(ws, "conversation.item.input_audio_transcription.completed")
        committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
        assert [e["type"] for e in events if e["type"] == "error"] == []
        done = events[-1]
        deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert (done["item_id"], done["content_index"]) == (committed["item_id"], 0)
        assert all((d["item_id"], d["content_index"]) == (committed["item_id"], 0) for d in deltas)
        assert done["transcript"] and "".join(d["delta"] for d in deltas).strip() == done["transcript"]
        send(ws, type="conversation.item.retrieve", item_id=committed["item_id"])
        item = recv_until(ws, "conversation.item.retrieved")[-1]["item"]
        assert item["content"][0]["transcript"] == done["transcript"]
        wait_for(lambda: server.ctx.scheduler.running == 0 and server.ctx.scheduler.waiting == 0)
        # the beta field, and off again: no transcription events
        send(ws, type="session.update", session={"input_audio_transcription": None,
                                                 "audio": {"input": {"transcription": None}}})
        assert recv_json(ws)["session"]["audio"]["input"]["transcription"] is None
        send(ws, type="input_audio_buffer.append", audio=b64(pcm.tobytes()), sample_rate=16000)
        send(ws, type="input_audio_buffer.commit")
        send(ws, type="conversation.item.retrieve", item_id="item_nope")
        events = recv_until(ws, "error")
        assert not any("transcription" in e["type"] for e in events), events
        send(ws, type="session.update", session={"input_audio_transcription": {"model": "whisper-1"}})
        assert recv_json(ws)["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"


@pytest.mark.parametrize("value,code,param", [
    ("yes", "invalid_type", ""), ({"model": 5}, "invalid_type", ".model"),
    ({"model": "whisper-1", "bogus": 1}, "unknown_parameter", ".bogus"),
    ({"model": "gpt-4"}, "model_not_found", ".model"), ({"language": 5}, "invalid_type", ".language"),
    ({"language": "en\tx"}, "invalid_value", ".language"), ({"prompt": ["x"]}, "invalid_type", ".prompt")])
def test_bad_transcription_settings_are_refused_naming_the_field(server, value, code, param):
    with connect(server.ws_url) as ws:
        opened(ws)
        for spec, where in (({"audio": {"input": {"transcription": value}}}, "session.audio.input.transcription"),
                            ({"input_audio_transcription": value}, "session.input_audio_transcription")):
            send(ws, type="session.update", event_id="u", session=spec)
            err = recv_json(ws)["error"]
            assert (err["code"], err["param"], err["event_id"]) == (code, where + param, "u"), err


@pytest.mark.parametrize("session,param", [
    ({"input_audio_format": "pcm16", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 48000}}}},
     "session.input_audio_format"),
    ({"input_audio_sample_rate": 16000, "input_audio_format": "g711_ulaw"}, "session.input_audio_sample_rate"),
    ({"turn_detection": None, "audio": {"input": {"turn_detection": {"type": "server_vad"}}}},
     "session.turn_detection"),
    ({"input_audio_transcription": {"model": "whisper-1"}, "audio": {"input": {"transcription": None}}},
     "session.input_audio_transcription")])
def test_one_setting_named_twice_with_two_values_is_refused(session, param):
    """The GA field (audio.input.format / turn_detection / transcription) and its beta twin
    (input_audio_format, input_audio_sample_rate, turn_detection, input_audio_transcription) in one
    update, disagreeing: the one read last silently won (a 48 kHz stream was read as 24 kHz).
    Refused as max_output_tokens vs max_response_output_tokens are; nothing is applied."""
    from tests.server import FakeEngine, fake_server

    with fake_server(FakeEngine()) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        srv.ctx.engine.info = lambda _i=srv.ctx.engine.info: _with_audio(_i())  # (it can transcribe)
        send(ws, type="session.update", event_id="u", session=session)
        err = recv_json(ws)
        assert err["type"] == "error", err
        assert (err["error"]["code"], err["error"]["param"], err["error"]["event_id"]) == ("invalid_value", param, "u")
        agreeing = {"input_audio_format": {"type": "audio/pcm", "rate": 48000},
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 48000}}}}
        send(ws, type="session.update", session=agreeing)
        assert recv_json(ws)["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 48000}


def _with_audio(info):
    from dataclasses import replace

    return replace(info, components=[*info.components, "audio"])


def test_buffered_frames_and_audio_count_in_the_servers_media_limit():
    """The server-wide media limit counted conversations only: frames and audio a session buffers before committing
    them were bounded per session alone (512 MiB of frames each: 64 sessions could hold 32 GiB, from a few KB of PNG
    each). They count now: a frame or audio chunk that would pass the limit is refused (server_media_limit, 503) until
    another session lets its buffer go."""
    frame = b64(png_bytes(np.zeros((200, 200, 3), np.uint8)))  # 120 000 bytes decoded
    with fake_server(max_session_media_bytes=300_000, max_total_media_bytes=200_000) as srv, \
            connect(srv.ws_url) as first, connect(srv.ws_url) as second:
        opened(first), opened(second)
        send(first, type="input_video_buffer.append", image=frame, capture_time=0)
        send(first, type="input_audio_buffer.clear")  # (answered once the frame is buffered)
        assert recv_json(first)["type"] == "input_audio_buffer.cleared"
        send(second, type="input_video_buffer.append", image=frame, capture_time=0)
        send(second, type="input_audio_buffer.append", audio=b64(tone_pcm16(2.0, rate=24000).tobytes()))  # 96 KB
        for _ in range(2):
            err = recv_json(second)
            assert (err["type"], err["error"]["code"]) == ("error", "server_media_limit"), err
        send(first, type="input_video_buffer.clear")
        assert recv_json(first)["type"] == "input_video_buffer.cleared"
        send(second, type="input_video_buffer.append", image=frame, capture_time=1)
        send(second, type="input_video_buffer.commit")
        assert recv_json(second)["type"] == "input_video_buffer.committed"


def test_all_sessions_together_hold_at_most_the_servers_media_limit():
    """Each session was bounded by max_session_media_bytes alone: 64 sessions of 512 MiB could hold
    32 GiB of decoded pictures between them. The server's open sessions now share max_total_media_bytes:
    an item past it is refused (server_media_limit, 503) until another session lets its media go."""
    from engine.server.limits import ApiError, Limits
    from engine.server.sessions import Item, SessionRegistry

    mib = 1024 * 1024
    registry = SessionRegistry(Limits(max_session_media_bytes=3 * mib, max_total_media_bytes=5 * mib))
    first, second = registry.create(), registry.create()

    def picture(i):
        return Item(f"item_{i}", "user", [{"type": "image", "image": np.zeros((1024, 1024, 2), np.uint8)}], [])  # 2 MiB
    first.add_item(picture(1))
    second.add_item(picture(2))
    with pytest.raises(ApiError) as err:
        second.add_item(picture(3))  # 6 MiB in all; the session alone would hold 4 > 3 too: first check
    assert err.value.code == "session_media_limit"
    third = registry.create()
    with pytest.raises(ApiError) as err:
        third.add_item(picture(4))  # the third session holds nothing, but the server would hold 6 MiB
    assert (err.value.code, err.value.status) == ("server_media_limit", 503)
    assert "5 MiB" in str(err.value) and "try again later" in str(err.value)
    registry.close(first)
    third.add_item(picture(5))
    assert registry.media_bytes() == 4 * mib


def test_a_session_that_sends_nothing_is_closed_but_not_while_it_streams_audio_or_a_response_runs():
    """Idle sessions held every session slot for up to an hour (max_session_s). A session whose client sends nothing
    (no event, no audio) for `realtime_idle_s` while no response runs now gets session_idle_timeout, the socket closes
    normally (1000) and its slot is freed; a session streaming audio (the Live tab's call) or waiting on a response
    longer than the limit is not cut (0.3 s here, from 600 s)."""
    from websockets.exceptions import ConnectionClosed

    from tests.server import FakeEngine

    idle_s = 0.3
    silence = b64(np.zeros(960, dtype="<i2").tobytes())  # 40 ms at 24 kHz
    with fake_server(FakeEngine(step_s=0.08), realtime_idle_s=idle_s) as srv, connect(srv.ws_url) as ws:
        opened(ws)
        for _ in range(8):  # 0.6 s of audio, a piece every 75 ms, as the Live tab streams it
            send(ws, type="input_audio_buffer.append", audio=silence)
            time.sleep(0.075)
        send(ws, type="input_audio_buffer.clear")
        send(ws, type="conversation.item.create", item={"type": "message", "role": "user",
                                                        "content": [{"type": "input_text", "text": "hi"}]})
        send(ws, type="response.create")  # ~0.64 s (8 events, 80 ms apart): longer than the idle limit
        done = recv_until(ws, "response.done", timeout=10)[-1]
        assert done["response"]["status"] == "completed", done
        waited_from = time.monotonic()
        err = recv_json(ws, timeout=10)
        waited = time.monotonic() - waited_from
        assert err["type"] == "error" and err["error"]["code"] == "session_idle_timeout", err
        assert f"{idle_s:g} seconds" in err["error"]["message"] and waited < idle_s + 2, waited
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1000
        wait_for(lambda: len(srv.ctx.sessions) == 0)
