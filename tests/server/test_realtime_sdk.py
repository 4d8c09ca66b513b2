"""The realtime endpoint driven by OpenAI's own Python SDK (`client.realtime.connect`), as any
OpenAI-shaped application drives it: its typed events parse, and what it assumes without saying
(the formats a session starts with) is what the server does."""

from __future__ import annotations

import base64
from contextlib import ExitStack

import numpy as np
import openai
import torch
import pytest

from tests.server import FakeEngine, fake_server, follows_response_done, tone_pcm16, wait_for
from tests.server.test_realtime_live import spoken_reply_script


def sdk(srv) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused-on-loopback", base_url=srv.url + "/v1", max_retries=0,
                         websocket_base_url=srv.ws_url.rsplit("/realtime", 1)[0])


def recv_until(conn, kind: str) -> list:
    """Events up to and including the first of type `kind` (after response.done, the rate_limits.updated
    that follows it is read and checked, not returned)."""
    out = []
    while not out or out[-1].type != kind:
        out.append(conn.recv())
        assert out[-1].type != "error", out[-1]
    if kind == "response.done":
        follows_response_done(conn.recv().model_dump())
    return out


def test_a_session_naming_no_format_speaks_openais_pcm16_at_24_khz_both_ways():
    """OpenAI's SDK never names a rate: its session starts as PCM16 at 24 kHz in and out ('rate':
    always 24000), so it appends 24 kHz microphone audio and plays every delta at 24 kHz. The server
    took the audio as 16 kHz (0.5 s became 0.75 s, pitched down) and sent the talker's 44.1 kHz
    (played 1.8x slow), and its session object said so in a shape the SDK flags (rate 16000)."""
    engine = FakeEngine(script=spoken_reply_script(words=6, chunk_s=0.2, rate=44100), has_talker=True)
    pcm = tone_pcm16(0.5, rate=24000)
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        created = conn.recv()
        assert created.type == "session.created"
        audio = created.session.audio
        assert (audio.input.format.type, audio.input.format.rate) == ("audio/pcm", 24000)
        assert (audio.output.format.type, audio.output.format.rate) == ("audio/pcm", 24000)
        conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
        recv_until(conn, "session.updated")
        for chunk in np.array_split(pcm, 4):
            conn.input_audio_buffer.append(audio=base64.b64encode(chunk.tobytes()).decode())
        conn.input_audio_buffer.commit()
        item = recv_until(conn, "conversation.item.done")[-1].item
        assert item.content[0].model_extra["seconds"] == pytest.approx(0.5)
        conn.response.create()
        events = recv_until(conn, "response.done")
    heard = engine.calls[0]["messages"][-1]["content"][-1]
    assert heard["sample_rate"] == 24000 and np.array_equal(heard["audio"], pcm)
    deltas = [base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"]
    seconds = sum(len(d) // 2 for d in deltas) / 24000  # as the SDK's user plays them
    assert seconds == pytest.approx(1.2, abs=0.001)


def test_a_client_naming_the_beta_protocol_still_gets_a_session():
    """Browser clients written from OpenAI's docs offer the subprotocol openai-beta.realtime-v1 beside the key, and
    copied code sends OpenAI-Beta: realtime=v1: this server speaks the GA events and does not turn them away (the
    events both protocols share, session.*, response.created / .done and error, read the same)."""
    from websockets.sync.client import connect

    with fake_server() as srv:
        with connect(srv.ws_url, subprotocols=["realtime", "openai-beta.realtime-v1"]) as ws:
            assert '"session.created"' in ws.recv(timeout=10)
        with connect(srv.ws_url, subprotocols=["realtime"], additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
            assert '"session.created"' in ws.recv(timeout=10)
        assert srv.ctx.sessions.created == 2


def test_an_out_of_band_response_reads_its_own_input_and_leaves_the_conversation_alone():
    """response.create with conversation "none" and `input` (OpenAI's out-of-band response: a
    classification or summary beside the conversation, told apart by its `metadata`) was refused
    ('unsupported_parameter') and metadata dropped. The reply reads only its input (an item by
    reference and a new message), is announced to no conversation, and the conversation is as it was."""
    from engine.events import Done, TextDelta

    engine = FakeEngine(script=[TextDelta("positive"), Done("positive", "stop")])
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "I love it"}]})
        first = recv_until(conn, "conversation.item.done")[-1].item
        conn.response.create(response={
            "conversation": "none", "metadata": {"topic": "sentiment"}, "output_modalities": ["text"],
            "input": [{"type": "item_reference", "id": first.id},
                      {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "Positive or negative?"}]}]})
        events = recv_until(conn, "response.done")
        assert events[0].type == "response.created" and events[0].response.metadata == {"topic": "sentiment"}
        assert events[0].response.conversation_id is None
        done = events[-1].response
        assert done.metadata == {"topic": "sentiment"} and done.conversation_id is None
        assert done.output[0].content[0].text == "positive"
        assert not [e.type for e in events if e.type.startswith("conversation.item.")]
        # the conversation still holds the one item; a reply in it follows that item
        conn.response.create(response={"metadata": {"topic": "chat"}})
        events = recv_until(conn, "response.done")
        added = next(e for e in events if e.type == "conversation.item.added")
        assert added.previous_item_id == first.id and events[-1].response.conversation_id is not None
        items = next(iter(srv.ctx.sessions.open.values())).items
        wait_for(lambda: len(items) == 2)
        assert [it.id for it in items] == [first.id, added.item.id]
    oob, chat = engine.calls
    assert [m["role"] for m in oob["messages"]] == ["user", "user"]
    assert oob["messages"][1]["content"] == [{"type": "text", "text": "Positive or negative?"}]
    assert [m["role"] for m in chat["messages"]] == ["user"]


@pytest.mark.parametrize("response, param", [
    ({"conversation": "conv_other"}, "response.conversation"),
    ({"metadata": {"k": 1}}, "response.metadata.k"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "response.metadata"),
    ({"input": [{"type": "item_reference", "id": "item_missing"}]}, "response.input[0].id"),
    ({"input": [{"type": "message", "role": "user"}]}, "response.input[0].content"),
    ({"input": [{"type": "message", "role": "assistant", "content": "hi"}]}, "response.input"),  # (no user item)
    ({"input": []}, "response.input"),
])
def test_out_of_band_fields_that_cannot_be_honoured_are_refused_naming_them(response, param):
    with fake_server() as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hello"}]})
        recv_until(conn, "conversation.item.done")
        conn.send({"type": "response.create", "event_id": "oob", "response": response})
        err = conn.recv()
        assert err.type == "error" and err.error.event_id == "oob" and err.error.param == param, err


def test_a_transcription_session_is_refused_not_served_as_a_realtime_one():
    """session.update {"type": "transcription"} (OpenAI's transcription-only session: no responses, turns
    transcribed) was accepted and ignored: the client's session went on answering every turn. It is refused
    naming session.type, and the session is unchanged; {"type": "realtime"} is taken."""
    with fake_server() as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.send({"type": "session.update", "event_id": "t",
                   "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}})
        err = conn.recv()
        assert err.type == "error" and err.error.code == "unsupported_parameter" and err.error.param == "session.type"
        conn.send({"type": "session.update", "event_id": "x", "session": {"type": "realtime_v2"}})
        assert conn.recv().error.param == "session.type"
        conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        assert recv_until(conn, "session.updated")[-1].session.instructions == "Be brief."


def test_a_spoken_reply_can_be_replayed_as_conversation_item_added_showed_it():
    """A client rebuilding a conversation (after a reconnect, or from another session) sends the
    assistant's spoken replies back as the server showed them: {"type": "output_audio", "transcript"}
    (with the audio, as OpenAI's assistant content allows). They were refused ('assistant messages may
    hold text only'); the model reads the transcript, and the item shows the part as sent."""
    engine = FakeEngine()
    spoken = {"type": "output_audio", "transcript": "It is a cup.",
              "audio": base64.b64encode(tone_pcm16(0.2, rate=24000).tobytes()).decode()}
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        items = []
        for role, content in (("user", [{"type": "input_text", "text": "What is it?"}]),
                              ("assistant", [spoken]), ("user", [{"type": "input_text", "text": "Sure?"}])):
            conn.conversation.item.create(item={"type": "message", "role": role, "content": content})
            items.append(recv_until(conn, "conversation.item.done")[-1].item)
        shown = items[1].content[0]
        assert (shown.type, shown.transcript) == ("output_audio", "It is a cup.")
        conn.response.create(response={"output_modalities": ["text"]})
        recv_until(conn, "response.done")
        conn.send({"type": "conversation.item.create", "event_id": "bad", "item": {
            "type": "message", "role": "assistant", "content": [{"type": "output_audio", "audio": spoken["audio"]}]}})
        while (err := conn.recv()).type != "error":
            pass
        assert err.error.param == "item.content[0].transcript" and err.error.event_id == "bad"
    replayed = engine.calls[0]["messages"][1]
    assert replayed == {"role": "assistant", "content": [{"type": "text", "text": "It is a cup."}]}


def test_the_response_object_states_the_settings_it_runs_with():
    """response.created / .done said max_output_tokens and audio null: a client reading the response
    object for the format to play its deltas at (or the token cap it runs under) found nothing. They state
    this response's own values (its overrides, else the session's)."""
    engine = FakeEngine(script=spoken_reply_script(words=2, chunk_s=0.1, rate=44100), has_talker=True)
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "max_output_tokens": 40, "output_modalities": ["audio"]})
        recv_until(conn, "session.updated")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hi"}]})
        recv_until(conn, "conversation.item.done")
        conn.response.create()
        events = recv_until(conn, "response.done")
        for response in (events[0].response, events[-1].response):
            assert response.max_output_tokens == 40
            assert (response.audio.output.format.type, response.audio.output.format.rate) == ("audio/pcm", 24000)
        conn.response.create(response={"max_output_tokens": 7, "conversation": "none", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "again"}]}],
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": 44100}}}})
        events = recv_until(conn, "response.done")
        created = events[0].response.model_dump()
        assert created["max_output_tokens"] == 7 and created["audio"]["output"]["format"]["rate"] == 44100
        assert {e.model_extra["sample_rate"] for e in events if e.type == "response.output_audio.delta"} == {44100}


def test_the_media_of_an_out_of_band_input_count_together():
    """response.input's new items are decoded for the response: each was given the whole per-item media
    budget, so one event of many small, highly compressed pictures held many times the session's limit.
    They share one budget (max_session_media_bytes), refused naming the part that passes it."""
    from tests.server import b64, png_bytes

    picture = "data:image/png;base64," + b64(png_bytes(np.zeros((200, 200, 3), np.uint8)))  # 120 000 bytes decoded
    item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": picture}]}
    engine = FakeEngine()
    with fake_server(engine, max_session_media_bytes=300_000) as srv, \
            sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.send({"type": "response.create", "event_id": "ok", "response": {"conversation": "none",
                                                                             "input": [item, item]}})
        recv_until(conn, "response.done")
        conn.send({"type": "response.create", "event_id": "big", "response": {"conversation": "none",
                                                                              "input": [item, item, item]}})
        err = conn.recv()
        assert err.type == "error" and err.error.code == "media_too_large" and err.error.event_id == "big"
        assert err.error.param == "response.input[2].content[0]"
    assert len(engine.calls) == 1


def test_an_out_of_band_inputs_media_counts_in_the_servers_media_limit():
    """The server-wide media limit (max_total_media_bytes) counted conversations and HTTP requests, not the new items
    of an out-of-band response's `input`: sessions could hold any amount beside it that way. They count while the
    response runs, as an item in a conversation would: past the limit it is refused (server_media_limit, 503) and
    the session goes on; while one runs, another session's picture that would pass the limit is refused."""
    from engine.events import Done, TextDelta
    from tests.server import b64, png_bytes

    picture = "data:image/png;base64," + b64(png_bytes(np.zeros((200, 200, 3), np.uint8)))  # 120 000 bytes decoded
    item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": picture}]}
    engine = FakeEngine(script=[TextDelta("x")] * 100 + [Done("x" * 100, "stop")], step_s=0.02)
    with fake_server(engine, max_session_media_bytes=300_000, max_total_media_bytes=200_000) as srv, \
            sdk(srv).realtime.connect(model="gpt-realtime") as conn, \
            sdk(srv).realtime.connect(model="gpt-realtime") as other:
        recv_until(conn, "session.created")
        recv_until(other, "session.created")
        conn.send({"type": "response.create", "event_id": "big", "response": {"conversation": "none",
                                                                              "input": [item, item]}})
        err = conn.recv()
        assert err.type == "error" and err.error.event_id == "big", err
        assert (err.error.code, err.error.type) == ("server_media_limit", "server_error")
        assert srv.ctx.scheduler.media_bytes == 0 and not engine.calls
        conn.response.create(response={"conversation": "none", "input": [item]})  # the session goes on
        recv_until(conn, "response.output_text.delta")
        assert srv.ctx.scheduler.media_bytes == 120_000  # held while it runs
        other.send({"type": "conversation.item.create", "event_id": "pic", "item": item})
        err = other.recv()
        assert (err.type, err.error.code, err.error.event_id) == ("error", "server_media_limit", "pic"), err
        assert recv_until(conn, "response.done")[-1].response.status == "completed"
        wait_for(lambda: srv.ctx.scheduler.media_bytes == 0)  # let go when it ends
        other.conversation.item.create(item=item)
        recv_until(other, "conversation.item.done")


@pytest.mark.parametrize("session, law", [
    ({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, "pcmu"),
    ({"output_audio_format": "g711_alaw"}, "pcma")])
def test_g711_output_is_sent_as_g711_at_8_khz(session, law):
    """A telephony client (a phone bridge) asks for its replies in G.711, as OpenAI's audio/pcmu /
    audio/pcma (beta: g711_ulaw / g711_alaw) output formats give them: the session.update was refused
    whole ('G.711 output is not supported'), instructions and turn settings with it. The talker's audio is
    resampled to 8 kHz as it streams and sent a byte a sample; the session says the format it sends."""
    from engine.media.audio import resample, resampled_length
    from engine.server.codec import G711

    script = spoken_reply_script(words=6, chunk_s=0.2, rate=44100)
    engine = FakeEngine(script=script, has_talker=True)
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.send({"type": "session.update", "session": {"output_modalities": ["audio"], **session}})
        assert recv_until(conn, "session.updated")[-1].session.audio.output.format.type == f"audio/{law}"
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": "Say something."})
        recv_until(conn, "conversation.item.done")
        conn.response.create()
        events = recv_until(conn, "response.done")
    deltas = [e for e in events if e.type == "response.output_audio.delta"]
    assert {e.model_extra["sample_rate"] for e in deltas} == {8000}
    sent = np.frombuffer(b"".join(base64.b64decode(e.delta) for e in deltas), np.uint8)
    talker = np.concatenate([ev.samples() for ev in script if hasattr(ev, "samples")])
    assert len(sent) == resampled_length(len(talker), 44100, 8000)  # one byte a sample
    heard = G711[law][sent] / 32768
    expected = np.clip(resample(torch.from_numpy(talker), 44100, 8000).numpy(), -1, 1)
    assert np.abs(heard - expected).max() < 0.01  # G.711's quantisation step at this level, and no more


def test_g711_encoding_is_the_inverse_of_its_decoding():
    """Every G.711 byte's value is encoded back to that byte (mu-law's negative zero to its positive one)."""
    from engine.server.codec import G711, g711_bytes

    for law in ("pcmu", "pcma"):
        codes = np.arange(256, dtype=np.uint8)
        back = np.frombuffer(g711_bytes(G711[law][codes].astype("<i2").tobytes(), law), np.uint8)
        assert np.array_equal(back, np.where(codes == 0x7F, 0xFF, codes) if law == "pcmu" else codes)


def test_a_response_takes_voice_and_output_audio_format_in_their_beta_shape_too():
    """The session takes the beta names of its settings (voice, output_audio_format); response.create
    refused them ('unknown_parameter'), so a client overriding one reply's voice or format the way it set
    the session's got no reply. They are taken as their GA twins (audio.output.voice / .format) are."""
    engine = FakeEngine(script=spoken_reply_script(words=2, chunk_s=0.1, rate=44100), has_talker=True,
                        voices=["narrator"])
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": "Say something."})
        recv_until(conn, "conversation.item.done")
        conn.send({"type": "response.create", "response": {"modalities": ["audio"], "voice": "narrator",
                                                           "output_audio_format": "g711_ulaw"}})
        events = recv_until(conn, "response.done")
        assert events[0].response.audio.output.voice == "narrator"
        assert {e.model_extra["sample_rate"] for e in events if e.type == "response.output_audio.delta"} == {8000}
        conn.send({"type": "response.create", "event_id": "both", "response": {
            "output_audio_format": "pcm16", "audio": {"output": {"format": {"type": "audio/pcmu"}}}}})
        err = conn.recv()
        assert err.type == "error" and err.error.param == "response.output_audio_format"
    assert engine.calls[0]["voice"] == "narrator"


def test_a_bound_on_one_side_is_said_as_such():
    """max_output_tokens 0 was refused as "must be in [1, None]": the missing bound was printed as None."""
    with fake_server() as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.send({"type": "session.update", "event_id": "m", "session": {"max_output_tokens": 0}})
        err = conn.recv()
        assert err.error.param == "session.max_output_tokens" and "None" not in err.error.message
        assert "at least 1, got 0" in err.error.message


def test_a_talkerless_engine_stores_the_output_audio_format_and_refuses_only_audio_output():
    """An application sends the whole session object, OpenAI's audio defaults included (an output format and
    a voice), whatever the engine can say: a server without a talker refused the update for naming an output
    format at all, so the client could not start. The format and voice are stored; what cannot be done,
    audio in output_modalities, is refused naming that field, and the session still answers in text."""
    from engine.events import Done, TextDelta

    engine = FakeEngine(script=[TextDelta("hi"), Done("hi", "stop")])  # has_talker=False
    session = {"type": "realtime", "output_modalities": ["text"], "instructions": "Be brief.",
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                         "output": {"format": {"type": "audio/pcm", "rate": 16000}, "voice": "marin", "speed": 1.0}}}
    with fake_server(engine) as srv, sdk(srv).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.session.update(session=session)
        output = recv_until(conn, "session.updated")[-1].session.audio.output
        assert (output.format.type, output.format.rate, output.voice) == ("audio/pcm", 16000, "marin")
        conn.session.update(session={"type": "realtime", "output_audio_format": "g711_ulaw"})  # the beta shape too
        assert recv_until(conn, "session.updated")[-1].session.audio.output.format.type == "audio/pcmu"
        for field in ("output_modalities", "modalities"):
            conn.send({"type": "session.update", "event_id": "speak", "session": {field: ["text", "audio"]}})
            err = conn.recv()
            assert err.type == "error" and err.error.event_id == "speak", err
            assert (err.error.code, err.error.param) == ("modality_not_supported", f"session.{field}")
            assert "talker" in err.error.message
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hello"}]})
        recv_until(conn, "conversation.item.done")
        conn.response.create(response={"audio": {"output": {"voice": "marin"}}})
        done = recv_until(conn, "response.done")[-1].response
    assert done.status == "completed" and done.output_modalities == ["text"]
    assert done.output[0].content[0].text == "hi"
    assert "modalities" not in engine.calls[0]  # asked for text alone


def test_rate_limits_follow_each_response_done_with_what_is_left_of_the_line():
    """OpenAI's server sends rate_limits.updated after each response.done; this one sent none. It now sends the
    limit it enforces in OpenAI's terms, `requests` (the line in front of the engine: queue_full past it), with
    what is left of it when the response ends: here one session's request still waits behind a running one."""
    from openai.types.realtime import RateLimitsUpdatedEvent

    from engine.events import Done, TextDelta

    engine = FakeEngine(script=[TextDelta("x")] * 400 + [Done("x" * 400, "stop")], step_s=0.05)
    with fake_server(engine, max_queue=5) as srv, ExitStack() as stack:
        conns = [stack.enter_context(sdk(srv).realtime.connect(model="gpt-realtime")) for _ in range(3)]
        for conn in conns:
            recv_until(conn, "session.created")
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_text", "text": "hello"}]})
            recv_until(conn, "conversation.item.done")
        running, cancelled, waiting = conns
        running.response.create()
        recv_until(running, "response.output_text.delta")  # it holds the engine
        for conn in (cancelled, waiting):
            conn.response.create()
            recv_until(conn, "response.queue_position")
        wait_for(lambda: srv.ctx.scheduler.waiting == 2)
        cancelled.response.cancel()  # it leaves the line at once
        *_, done, limits = recv_until(cancelled, "rate_limits.updated")
        assert done.type == "response.done" and done.response.status == "cancelled"
        assert isinstance(limits, RateLimitsUpdatedEvent), limits
        assert [(r.name, r.limit, r.remaining, r.reset_seconds) for r in limits.rate_limits] == [
            ("requests", 5, 4, None)]  # (no tokens: this engine does not say its context)


def test_input_transcription_logprobs_come_when_the_session_includes_them(server):
    """session `include: ["item.input_audio_transcription.logprobs"]` was accepted and ignored: a client asking for
    the transcription's confidence got none. Each transcription delta now carries its tokens' logprobs and the
    completed event all of them (OpenAI's LogProbProperties); an include OpenAI has not is refused by name."""
    pcm = tone_pcm16(0.6, rate=24000)
    with sdk(server).realtime.connect(model="gpt-realtime") as conn:
        recv_until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "include": ["item.input_audio_transcription.logprobs"],
                                     "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}})
        assert recv_until(conn, "session.updated")[-1].session.include == ["item.input_audio_transcription.logprobs"]
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm.tobytes()).decode())
        conn.input_audio_buffer.commit()
        events = recv_until(conn, "conversation.item.input_audio_transcription.completed")
        done = events[-1]
        deltas = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
        assert done.transcript and done.logprobs and all(lp.logprob <= 0 for lp in done.logprobs)
        assert [lp.token for d in deltas for lp in d.logprobs] == [lp.token for lp in done.logprobs]
        tokenizer = server.ctx.engine.tokenizer  # (a special token the random model draws is reported, by its name,
        special = {tokenizer.piece_bytes(i) for i in tokenizer.special_ids}  # though the text skips it)
        spelled = b"".join(bytes(lp.bytes) for lp in done.logprobs if bytes(lp.bytes) not in special)
        assert spelled.decode("utf-8", errors="replace").strip() == done.transcript
        wait_for(lambda: server.ctx.scheduler.running == 0 and server.ctx.scheduler.waiting == 0)
        conn.session.update(session={"type": "realtime", "include": ["item.output_audio.logprobs"]})
        err = conn.recv()
        assert (err.type, err.error.code, err.error.param) == ("error", "invalid_value", "session.include")
