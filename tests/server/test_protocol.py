"""engine/server/protocol.py: every engine event kind crosses the wire and comes back as the same event,
over the realtime websocket (OpenAI Realtime GA names) and the chat-completions SSE stream; an event
kind the server does not know fails the response (never ends it quietly); the client's decoders refuse
what they do not know; error codes and event names are written once and docs/protocol.md lists them.
The server runs around FakeEngine, whose script holds every kind of event."""

from __future__ import annotations

import ast
import base64
import json
import re
from types import SimpleNamespace

import httpx
import openai
import pytest
from websockets.sync.client import connect

from engine.events import Done, GenerationStats, QueuePosition, TextDelta, TokenLogprob, UnknownEventError
from engine.server import protocol as wire
from engine.server.limits import Limits
from engine.server.realtime import RealtimeConnection
from tests.paths import REPO
from tests.server import FakeEngine, every_kind_script, fake_server, recv_item, recv_json, recv_until

DOC = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")

REALTIME_ORDER = [
    "response.created", "response.queue_position", "response.progress",
    "response.output_item.added", "conversation.item.added",
    "response.content_part.added", "response.output_text.delta",
    "response.content_part.added", "response.output_audio_transcript.delta", "response.output_audio.delta",
    "response.output_text.delta", "response.output_audio.delta",
    "response.content_part.added", "response.image.preview", "response.image.done",
    "response.output_text.done", "response.content_part.done",
    "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
    "response.content_part.done",
    "response.output_item.done", "conversation.item.done", "response.done"]


def assert_done_carries_the_engine_figures(done, expected: Done):
    assert isinstance(done, Done) and (done.text, done.finish_reason) == (expected.text, expected.finish_reason)
    got, want = done.stats, expected.stats
    for name in ("prompt_tokens", "new_tokens", "image_steps", "images"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("time_to_first_token_s", "decode_tokens_per_s", "total_s", "media_encode_s", "time_to_first_audio_s",
                 "audio_seconds", "audio_real_time_factor", "time_to_first_preview_s", "image_step_s"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-6), name


def test_every_kind_crosses_the_realtime_wire_with_ga_names():
    script = every_kind_script()
    with fake_server() as srv, connect(srv.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "draw and say hello"}}))
        recv_item(ws)
        ws.send(json.dumps({"type": "response.create"}))
        events = recv_until(ws, "response.done")
    assert [e["type"] for e in events] == REALTIME_ORDER
    audio = [e for e in events if e["type"] == "response.output_audio.delta"]
    assert [base64.b64decode(e["delta"]) for e in audio] == [script[2].pcm, script[4].pcm]
    assert {e["sample_rate"] for e in audio} == {24000} and audio[1]["start_s"] == 0.02
    added = [e for e in events if e["type"] == "response.content_part.added"]
    assert [(e["content_index"], e["part"]["type"]) for e in added] == [(0, "text"), (1, "audio"), (2, "image")]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"] == {
        "input_tokens": 7, "output_tokens": 2, "total_tokens": 9,
        "input_token_details": {"text_tokens": 7, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0,
                                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}},
        "output_token_details": {"text_tokens": 2, "audio_tokens": 0}}
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "Hello world"},
                                            {"type": "output_audio", "transcript": "Hello"},
                                            {"type": "output_image", "index": 0, "width": 16, "height": 16}]
    m = done["metrics"]
    assert (m["time_to_first_audio_ms"], m["time_to_first_preview_ms"], m["image_step_ms"]) == (45.6, 78.9, 50.0)

    decoder = wire.RealtimeResponseDecoder()
    decoded = [ev for raw in events for ev in decoder.feed(raw)]
    assert decoded[:-1] == [QueuePosition(0, 0)] + script[:-1]
    assert_done_carries_the_engine_figures(decoded[-1], script[-1])


def test_every_kind_crosses_the_chat_completions_stream():
    script = every_kind_script()
    body = {"messages": [{"role": "user", "content": "draw and say hello"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with fake_server() as srv:
        decoder, decoded = wire.SseDecoder(), []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                decoded += decoder.feed_line(line)
        assert decoder.finished
        whole = httpx.post(srv.url + "/v1/chat/completions", json={"messages": body["messages"]}, timeout=30).json()
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as client:  # OpenAI's own parser
            chunks = list(client.chat.completions.create(model="default", stream=True, messages=body["messages"]))
    assert decoded[:-1] == [QueuePosition(0, 0)] + script[:-1]
    assert_done_carries_the_engine_figures(decoded[-1], script[-1])
    msg = whole["choices"][0]["message"]
    assert msg["content"] == "Hello world" and msg["audio"]["transcript"] == "Hello"
    assert base64.b64decode(msg["audio"]["data"]) == script[2].pcm + script[4].pcm
    assert msg["audio"]["sample_rate"] == 24000
    assert [(im["width"], im["height"], im["note"]) for im in msg["images"]] == [(16, 16, "the mask is a test")]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].delta.audio.transcript for c in chunks if c.choices and c.choices[0].delta.audio] \
        == ["Hello", ""]


def test_token_logprobs_cross_the_chat_completions_stream_on_their_choice():
    """A text delta's entries are its chunk's `choices[i].logprobs.content` (OpenAI's shape: an alternative has no
    top_logprobs of its own), and the client's decoder gives them back on the same TextDelta; a delta without
    them has `logprobs` null."""
    alt = TokenLogprob(" b", [32, 98], -2.0)
    sent = [TextDelta(" a", [TokenLogprob(" a", [32, 97], -0.5, [TokenLogprob(" a", [32, 97], -0.5), alt])]),
            TextDelta("中", [TokenLogprob("\ufffd", [0xE4], -0.1), TokenLogprob("\ufffd", [0xB8, 0xAD], -0.2)])]
    enc, dec = wire.ChatChunkEncoder("chatcmpl-x", 0, "m"), wire.SseDecoder()
    lines = [line for ev in sent for raw in enc.encode(ev) for line in raw.decode().split("\n")]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert chunks[0]["choices"][0]["logprobs"] is None  # (the role's chunk)
    first = chunks[1]["choices"][0]["logprobs"]["content"][0]
    assert first == {"token": " a", "bytes": [32, 97], "logprob": -0.5, "top_logprobs": [
        {"token": " a", "bytes": [32, 97], "logprob": -0.5}, {"token": " b", "bytes": [32, 98], "logprob": -2.0}]}
    assert [ev for line in lines for ev in dec.feed_line(line)] == sent
    got = wire.Collected()
    for ev in sent:
        got.add(ev)
    body = wire.chat_completion("chatcmpl-x", 0, "m", [wire.Answer(got, Done(" a中", "stop"), {})], logprobs=True)
    assert [e["bytes"] for e in body["choices"][0]["logprobs"]["content"]] == [[32, 97], [0xE4], [0xB8, 0xAD]]
    asked_none = wire.chat_completion("chatcmpl-x", 0, "m", [wire.Answer(wire.Collected(), Done("", "stop"), {})],
                                      logprobs=True)
    assert asked_none["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def test_an_unknown_event_kind_fails_the_response_and_the_server_keeps_serving():
    engine = FakeEngine(script=[TextDelta("a"), object(), Done("a", "stop")])
    with fake_server(engine) as srv:
        with connect(srv.ws_url) as ws:
            recv_json(ws)
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": "hi"}}))
            recv_item(ws)
            ws.send(json.dumps({"type": "response.create"}))
            done = recv_until(ws, "response.done")[-1]["response"]
            assert done["status"] == "failed" and done["status_details"]["error"]["code"] == "engine_error"
            assert "not an event of engine.events" in done["status_details"]["error"]["message"]
            ws.send(json.dumps({"type": "session.update", "session": {}}))
            assert recv_json(ws)["type"] == "session.updated"
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        lines = [ln for ln in httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).text.splitlines()
                 if ln.startswith("data:")]
        assert json.loads(lines[-2][5:])["error"]["code"] == "engine_error" and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("event", [
    {"type": "response.hologram.delta", "delta": "x"},
    {"type": "response.output_audio.delta", "delta": "AAAA"},  # no sample_rate
    {"type": "response.output_audio.delta", "delta": "***", "sample_rate": 16000},
    {"type": "response.done", "response": {"status": "vanished"}},
    {"no": "type"}, ["response.done"]])
def test_the_realtime_decoder_refuses_what_it_does_not_know(event):
    with pytest.raises(UnknownEventError):
        wire.RealtimeResponseDecoder().feed(event)


@pytest.mark.parametrize("line", [
    "data: {not json", 'data: {"type": "transcript.hologram"}', "garbage line",
    'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"hologram": "x"}}]}',
    'data: {"object": "chat.completion.chunk", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]}'])
def test_the_sse_decoder_refuses_what_it_does_not_know(line):
    with pytest.raises(UnknownEventError):
        wire.SseDecoder().feed_line(line)


def test_the_sse_decoder_passes_by_comments_it_does_not_know():
    """SSE: a comment is for the reader to ignore (a proxy's ': ping'); only ours (queue_position, progress) are read."""
    assert wire.SseDecoder().feed_line(": surprise {}") == wire.SseDecoder().feed_line(":") == []


def test_a_stream_without_a_result_is_an_error_not_a_done():
    decoder = wire.SseDecoder()
    assert decoder.feed_line('data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "a"}}]}') \
        == [TextDelta("a")]
    (end,) = decoder.feed_line("data: [DONE]")
    assert end.type == "error" and end.code == "protocol_error"


def test_metrics_and_usage_round_trip():
    stats = every_kind_script()[-1].stats
    back = wire.stats_from_wire(wire.usage(stats, "chat"), wire.metrics(stats, 0.5, 0.02))
    assert back.queue_wait_s == 0.5
    assert_done_carries_the_engine_figures(Done("", "stop", back), Done("", "stop", stats))
    assert wire.stats_from_wire(wire.usage(stats, "transcription"), None).prompt_tokens == 7
    assert wire.metrics(None, 0.1, None) == {"queue_wait_ms": 100.0}  # a failed response: its wait only
    # realtime usage by modality: what a client reads back is what the engine counted
    spoken = GenerationStats(prompt_tokens=50, new_tokens=6, prompt_image_tokens=30, prompt_audio_tokens=12,
                             audio_tokens=9)
    usage = wire.usage(spoken, "realtime")
    assert (usage["input_token_details"]["text_tokens"], usage["output_tokens"], usage["total_tokens"]) == (8, 15, 65)
    chat = wire.usage(spoken, "chat")  # chat's the same figures in OpenAI's chat names
    assert (chat["prompt_tokens_details"]["text_tokens"], chat["completion_tokens"],
            chat["total_tokens"]) == (8, 15, 65)
    for counted in (usage, chat):
        back = wire.stats_from_wire(counted, None)
        assert [getattr(back, f) for f in ("prompt_tokens", "new_tokens", "prompt_image_tokens",
                                           "prompt_audio_tokens", "audio_tokens")] == [50, 6, 30, 12, 9]


def test_n_choices_usage_sums_every_choices_text_and_audio_and_counts_the_prompt_once():
    choices = [GenerationStats(prompt_tokens=20, prompt_audio_tokens=12, new_tokens=n, audio_tokens=a)
               for n, a in ((3, 5), (4, 7))]
    got = wire.choices_usage(choices)
    assert (got["prompt_tokens"], got["completion_tokens"], got["total_tokens"]) == (20, 19, 39)
    assert got["prompt_tokens_details"]["audio_tokens"] == 12
    details = got["completion_tokens_details"]
    assert (details["text_tokens"], details["audio_tokens"]) == (7, 12)


def _codes_used_in(path) -> set[str]:
    """Error codes passed as `code=...`, or as bad()'s second argument, anywhere in one file."""
    codes = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "code" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                codes.add(kw.value.value)
        name = getattr(node.func, "id", getattr(node.func, "attr", None))
        if name in ("bad", "Error", "ApiError") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            codes.add(node.args[1].value)
    return codes


def test_every_error_code_is_registered_once_and_documented():
    server_side = [p for p in (REPO / "engine").rglob("*.py") if "client" not in p.parts and p.name != "protocol.py"]
    used = set().union(*(_codes_used_in(p) for p in server_side))
    unknown = used - set(wire.ERROR_CODES) - set(wire.ENGINE_CODES)  # engine codes reach the wire through ENGINE_CODES
    assert unknown == set(), "codes in use but not in protocol.ERROR_CODES (or ENGINE_CODES)"
    assert set(wire.ENGINE_CODES.values()) <= set(wire.ERROR_CODES)
    client_side = [REPO / "engine" / "server" / "protocol.py", *(REPO / "engine" / "client").glob("*.py")]
    used_by_clients = set().union(*(_codes_used_in(p) for p in client_side))
    assert used_by_clients - set(wire.ERROR_CODES) - set(wire.CLIENT_ERROR_CODES) == set()
    documented = set(re.findall(r"`([a-z0-9_]+)`", DOC.split("Codes the server sends:")[1].split("\n\n")[0]))
    assert documented == set(wire.ERROR_CODES)
    client = set(re.findall(r"`([a-z0-9_]+)`", DOC.split("Codes the client gives its own errors:")[1].split("\n\n")[0]))
    assert client == set(wire.CLIENT_ERROR_CODES)


def _table_events(title: str) -> list[str]:
    table = DOC.split(title)[1].split("\n\n")[1]
    return [name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z_.]+)`", row.split("|")[1])]


def test_realtime_event_names_are_written_once_and_documented():
    conn = RealtimeConnection(None, SimpleNamespace(limits=Limits()), None)
    assert sorted(conn.handlers) == sorted(wire.REALTIME_CLIENT_EVENTS)
    assert sorted(_table_events("### Client events")) == sorted(wire.REALTIME_CLIENT_EVENTS)
    assert sorted(set(_table_events("### Server events"))) == sorted(wire.REALTIME_SERVER_EVENTS)


def test_audio_output_is_asked_of_an_engine_with_a_talker():
    engine = FakeEngine(script=[TextDelta("hi"), Done("hi", "stop", GenerationStats(new_tokens=1))], has_talker=True,
                        voices=("warm", "bright"))
    with fake_server(engine) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert "speech_out" in card["capabilities"] and card["output_modalities"] == ["text", "audio"]
        with connect(srv.ws_url) as ws:
            recv_json(ws)
            ws.send(json.dumps({"type": "session.update", "session": {
                "output_modalities": ["text", "audio"], "audio": {"output": {"voice": "warm"}}}}))
            session = recv_json(ws)["session"]
            assert session["output_modalities"] == ["text", "audio"] and session["audio"]["output"]["voice"] == "warm"
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": "speak"}}))
            recv_item(ws)
            ws.send(json.dumps({"type": "response.create"}))
            assert recv_until(ws, "response.done")[-1]["response"]["status"] == "completed"
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "speak"}], "modalities": ["text", "audio"],
            "audio": {"voice": "bright", "format": "pcm16"}})
        assert r.status_code == 200, r.text
    assert [(c["modalities"], c["voice"]) for c in engine.calls] == [(["text", "audio"], "warm"),
                                                                     (["text", "audio"], "bright")]


# --------------------------------------------------------------------------- speech and image streams


def _sse_lines(chunks: list[bytes]) -> list[str]:
    return [line for chunk in chunks for line in chunk.decode().split("\n") if line]


def test_speech_stream_round_trip():
    from engine.events import AudioChunk, Progress

    script = [QueuePosition(0, 0), AudioChunk(b"\x01\x00" * 10, 44100, "Hello", 0.0),
              AudioChunk(b"\x02\x00" * 6, 44100, "", 10 / 44100),
              Done("Hello", "stop", GenerationStats(time_to_first_audio_s=0.05, audio_seconds=16 / 44100),
                   result={"sample_rate": 44100, "fragments": ["Hello"], "patches": 2, "ref_text_from_asr": "hi"})]
    enc, dec = wire.SpeechSseEncoder(), wire.SpeechSseDecoder()
    lines = _sse_lines([b for ev in script[:-1] for b in enc.encode(ev)] + enc.finish(script[-1], {"x": 1}))
    back = [ev for line in lines for ev in dec.feed_line(line)]
    assert back[:3] == script[:3] and dec.finished
    done = back[-1]
    assert done.result == script[-1].result and done.text == "Hello" and done.stats.audio_seconds == 16 / 44100
    # OpenAI's shape only, as any OpenAI-compatible server sends it: the rate from a WAV header, else 24 kHz
    plain = wire.SpeechSseEncoder(extensions=False, wav_header=b"RIFF\0\0\0\0WAVEfmt " + b"\0" * 8
                                  + (16000).to_bytes(4, "little") + b"\0" * 8 + b"data\0\0\0\0")
    lines = _sse_lines(plain.encode(script[1]) + plain.encode(Progress("x")) + plain.finish(script[-1], {}))
    assert all(set(json.loads(line[6:])) <= {"type", "audio", "usage"} for line in lines if line.startswith("data: {"))
    dec = wire.SpeechSseDecoder(strict=False)
    first, end = [ev for line in lines for ev in dec.feed_line(line)]
    assert (first.sample_rate, first.pcm) == (16000, script[1].pcm) and isinstance(end, Done)
    (plain_delta,) = wire.SpeechSseDecoder().feed_line('data: {"type":"speech.audio.delta","audio":"AAAA"}')
    assert plain_delta.sample_rate == 24000
    err_lines = _sse_lines(enc.finish(wire.Error("unknown voice 'x'", "voice_not_found"), {}))
    dec = wire.SpeechSseDecoder()
    (err,) = [ev for line in err_lines for ev in dec.feed_line(line)]
    assert err.code == "voice_not_found"


def test_image_stream_round_trip_and_usage_on_the_last_image():
    from engine.events import ImageDone, ImagePreview

    png = base64.b64decode("iVBORw0KGgo=")
    script = [ImagePreview(png, 1, 4, 8, 8, 0), ImagePreview(png, 2, 4, 8, 8, 0), ImagePreview(png, 3, 4, 8, 8, 0),
              ImageDone(png, 8, 8, 0, seed=1), ImagePreview(png, 1, 4, 8, 8, 1), ImageDone(png, 8, 8, 1, seed=2,
                                                                                           mask=png, note="empty")]
    enc = wire.ImageSseEncoder("image_generation", "png", 7, lambda ev: base64.b64encode(ev.image).decode(),
                               max_partials=2)
    final = Done("", "stop", GenerationStats(prompt_tokens=12, images=2, image_steps=8))
    lines = _sse_lines([b for ev in script for b in enc.encode(ev)] + enc.finish(final, {"images": 2}))
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [d["type"].split(".")[1] for d in data] == ["partial_image", "partial_image", "completed",
                                                       "partial_image", "completed"]
    assert [d.get("partial_image_index") for d in data] == [0, 1, None, 0, None]  # at most 2 per image
    assert "usage" not in data[2] and data[4]["usage"]["input_tokens"] == 12 and data[4]["size"] == "8x8"
    dec = wire.ImageSseDecoder()
    back = [ev for line in lines for ev in dec.feed_line(line)]
    assert [type(e).__name__ for e in back] == ["ImagePreview", "ImagePreview", "ImageDone", "ImagePreview",
                                                "ImageDone", "Done"]
    assert back[4] == script[5] and back[-1].stats.prompt_tokens == 12 and back[-1].text == "empty"
    body = wire.images_body(7, [(script[3], "iVBORw0KGgo="), (script[5], "iVBORw0KGgo=")], final, "png", {})
    events = wire.images_body_events(body)
    assert events[:2] == [script[3], script[5]] and events[-1].stats.images == 2
    plain = wire.images_body(7, [(script[3], "iVBORw0KGgo=")], final, "png", {}, extensions=False)
    assert set(plain["data"][0]) == {"b64_json"} and "metrics" not in plain
    assert wire.images_body_events(plain)[0].width == 8  # the size from OpenAI's "size"
    ended = wire.ImageSseDecoder()
    assert ended.feed_end()[0].code == "protocol_error"  # a stream that ends without its image is an error


def test_engine_codes_are_mapped_to_the_wire_once():
    from engine.events import Error

    for engine_code, wire_code_ in wire.ENGINE_CODES.items():
        err = wire.engine_error(Error("x", engine_code))
        assert err.code == wire_code_ and err.status == wire.ERROR_CODES[wire_code_]
    assert wire.engine_error(Error("x", "voice_not_found")).status == 400
    assert wire.engine_error(Error("x", "something_new")).status == 500  # an unknown code is a fault
