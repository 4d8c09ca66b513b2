"""Hostile input: over a thousand malformed or out-of-order realtime messages (bad JSON, wrong
types, huge payloads, bad base64, unknown events, events in the wrong state) and a few hundred bad
HTTP requests. Each must be answered with exactly one structured error, and the server must keep
serving (the same session answers a real request afterwards, and new sessions open).

Run as a script for the summary alone: python tests/server/test_fuzz.py
"""

from __future__ import annotations

import json
import logging
import random
import struct
import sys
import zlib
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402
import pytest  # noqa: E402

from tests.server import b64, image_array, png_bytes, tone_pcm16  # noqa: E402

LIMITS = {"max_message_bytes": 64 * 1024, "max_audio_seconds": 2.0, "max_image_pixels": 1_000_000,
          "max_request_bytes": 256 * 1024, "max_upload_bytes": 128 * 1024}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _bad_values():
    return [None, True, -1, 0, 1.5, 1e308, "x", "", [], {}, [1, 2], {"a": 1}, "\ud800", "😀" * 3]


def hostile_messages(seed: int = 1234) -> list[tuple[str, str | bytes]]:
    """(label, frame) pairs; every one of them must draw one error event in a fresh session that
    has never received a valid item (so nothing in it can succeed)."""
    rng = random.Random(seed)
    out: list[tuple[str, str | bytes]] = []

    def add(label, event):
        out.append((label, event if isinstance(event, (str, bytes)) else json.dumps(event)))

    # --- not JSON at all, or not an object
    for text in ["", " ", "{", "}", "[1,2", "nul", "{'type': 'x'}", '{"type":', "\x00", "tru", "{]", "[" * 50_000,
                 '{"type": "session.update", "session": {}', "0x10", "NaN garbage", "\ufeff{}"]:
        add("bad json", text)
    for value in [1, "str", [], None, True, 1.5, [{"type": "response.create"}], "NaN"]:
        add("not an object", json.dumps(value))
    # random prefixes of valid events are never valid JSON objects
    valid = [{"type": "session.update", "session": {"instructions": "hi", "temperature": 0.5}},
             {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "hello"}},
             {"type": "input_audio_buffer.append", "audio": b64(tone_pcm16(0.05).tobytes())}]
    for _ in range(220):
        text = json.dumps(rng.choice(valid))
        add("truncated", text[: rng.randrange(1, len(text))])
    for _ in range(60):
        add("random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))).decode("latin-1"))
    # --- binary frames
    for _ in range(10):
        add("binary", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32))))
    # --- type missing, wrong, unknown
    for value in _bad_values():
        add("bad type", {"type": value, "event_id": "t"} if value is not None else {"event_id": "t"})
    for _ in range(80):
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz._") for _ in range(rng.randrange(1, 30)))
        add("unknown type", {"type": name, "event_id": f"u{_}"})
    for name in ["session.created", "response.text.delta", "response.done", "error", "conversation.item.created",
                 "RESPONSE.CREATE", "response.create ", "input_audio_buffer.speech_started", "transcription_session.update"]:
        add("server event from client", {"type": name})
    add("bad event_id", {"type": "response.cancel", "event_id": 5})
    add("bad event_id", {"type": "response.cancel", "event_id": ["x"]})
    # --- session.update
    session_bad = [None, 1, "x", [], True]  # not an object
    fields = {"temperature": ["hot", -1, 3, [0.5]], "max_output_tokens": [0, -5, 10 ** 9, "many", 1.5, True],
              "max_response_output_tokens": ["infinite", -1, 0], "top_p": [-0.5, 2, "x"], "top_k": [-1, 1.5, "x"],
              "repetition_penalty": [0, -1, "x", 100], "seed": ["x", 1.5, 2 ** 70], "stop": [5, [""], [1], ["a"] * 9],
              "instructions": [5, [], {}], "thinking": ["yes", 1, []],
              # (the tiny engine has a talker: "audio" is valid, "image" is never a chat output)
              "output_modalities": [["audio", "smell"], ["image"], [], "text", [1], ["video"], ["text", "image"]],
              "modalities": [["audio", "text", 5], ["speech"]],
              "input_audio_format": ["g711_xlaw", {"type": "audio/pcmu", "rate": 8000}, {"type": "audio/pcm", "rate": 0},
                                     {"type": "audio/ogg"}, 5, {"type": "audio/pcm", "rate": "x"}],
              "input_audio_sample_rate": [0, -16000, "x", 10 ** 9, 1.5],
              "turn_detection": [{"type": "server_vad"}, "auto"], "tools": [[{"type": "function"}]],
              "audio": [{"output": {"format": {"type": "audio/mp3"}}}, 5,
                        {"input": {"turn_detection": {"type": "server_vad"}}},
                        {"input": {"format": "mp3"}}],
              "not_a_field": [1], "temperatur": [0.5]}
    # server_vad turn detection is valid: bad turn detection and video settings are refused
    fields["turn_detection"] = [{"type": "semantic_vad"}, "auto", {"type": "server_vad", "threshold": 2},
                                {"type": "server_vad", "idle_timeout_ms": 1000}, {"silence_ms": 1}]
    fields["audio"] = [a for a in fields["audio"]
                       if not (isinstance(a, dict) and "turn_detection" in a.get("input", {}))]
    fields["audio"].append({"input": {"turn_detection": {"prefix_padding_ms": -1}}})
    fields["video"] = [5, {"fps": 30}, {"window_seconds": "long"}, {"max_bytes": 1}]
    for name, values in fields.items():
        session_bad += [{name: v} for v in values]
    for v in session_bad:
        add("session.update", {"type": "session.update", "event_id": "s", "session": v})
    # --- audio buffer
    for v in _bad_values():
        add("audio.append bad audio", {"type": "input_audio_buffer.append", "audio": v})
    for text in ["!!!notbase64", "AA==", "A", "====", "QUJD\n!!", "AAA" * 3 + "@"]:
        add("audio.append bad base64", {"type": "input_audio_buffer.append", "audio": text})
    for rate in [0, -1, "x", 10 ** 9, 1.5, True, [16000]]:
        add("audio.append bad rate", {"type": "input_audio_buffer.append", "audio": "AAAA", "sample_rate": rate})
    add("audio.append too long", {"type": "input_audio_buffer.append", "audio": b64(tone_pcm16(2.5, 8000).tobytes()),
                                  "sample_rate": 8000})
    for _ in range(3):
        add("commit empty", {"type": "input_audio_buffer.commit", "event_id": "c"})
    # --- video frames
    good_png = b64(png_bytes(image_array(8, 8)))
    for v in _bad_values():
        add("frame bad image", {"type": "input_video_buffer.append", "image": v, "capture_time": 1.0})
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            add("frame bad time", {"type": "input_video_buffer.append", "image": good_png, "capture_time": v})
    for t in [-1, 1e300, float("nan"), float("inf")]:
        add("frame bad time", {"type": "input_video_buffer.append", "image": good_png, "capture_time": t})
    for raw in [b"not an image", png_bytes(image_array(8, 8))[:40], png_claiming(100_000, 100_000),
                png_claiming(2000, 2000), b"GIF89a" + b"\0" * 10, b"\xff\xd8\xff" + b"\0" * 20]:
        add("frame bad bytes", {"type": "input_video_buffer.append", "image": b64(raw), "capture_time": 1.0})
    add("frame http url", {"type": "input_video_buffer.append", "image": "data:image/png;base64,!!", "capture_time": 1})
    add("video commit empty", {"type": "input_video_buffer.commit"})
    # --- conversation items
    items = [None, 5, "x", [], {"type": "function_call", "role": "user", "content": "x"},
             {"type": "message", "role": "tool", "content": "x"}, {"type": "message", "content": "x"},
             {"type": "message", "role": "user"}, {"type": "message", "role": "user", "content": 5},
             {"type": "message", "role": "user", "content": [5]},
             {"type": "message", "role": "user", "content": [{"type": "input_file", "file": "x"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]},
             {"type": "message", "role": "user", "content": [{"text": "no type"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image",
                                                             "image_url": "https://example.com/a.png"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "file:///etc/passwd"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image",
                                                             "image_url": "data:text/plain;base64,QUJD"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image", "image": "%%%"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_image",
                                                             "image": b64(png_claiming(50_000, 50_000))}]},
             {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "%%%"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AA=="}]},
             {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA", "format": "aiff"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA", "format": "wav"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_video", "video": "AAAA"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_video",
                                                             "video": b64(b"\0\0\0\x18ftypmp42" + b"\0" * 50)}]},
             {"type": "message", "role": "assistant", "content": [{"type": "input_image", "image": good_png}]},
             {"type": "message", "role": "system", "content": [{"type": "input_image", "image": good_png}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}] * 65},
             {"type": "message", "role": "user", "content": "x", "id": 5},
             {"type": "message", "role": "user", "content": "x", "id": "i" * 65}]
    for item in items:
        add("item.create", {"type": "conversation.item.create", "event_id": "i", "item": item})
    add("item.create bad previous", {"type": "conversation.item.create", "previous_item_id": "nope",
                                     "item": {"type": "message", "role": "user", "content": "x"}})
    for v in [None, 5, "unknown-item"]:
        add("item.delete", {"type": "conversation.item.delete", "item_id": v})
    # --- responses in the wrong state or with bad settings
    for resp in [None, {}, {"max_output_tokens": 5}, 5, "x", {"modalities": ["audio"]},
                 {"output_modalities": ["image"]}, {"max_output_tokens": -1}, {"input": []},
                 {"conversation": "none"}, {"temperature": "x"}, {"instructions": 5}]:
        add("response.create", {"type": "response.create", "event_id": "r",
                                **({} if resp is None else {"response": resp})})
    for rid in [None, "resp_x", 5]:
        add("response.cancel", {"type": "response.cancel", **({} if rid is None else {"response_id": rid})})
    # --- huge payloads (over the per-event limit)
    for n in [65 * 1024, 100 * 1024, 200 * 1024]:
        add("huge", json.dumps({"type": "input_audio_buffer.append", "audio": "A" * n}))
        add("huge", "x" * n)
    # --- issue 9: text that is not valid Unicode, fields no event has, limits that disagree, media of
    # the wrong kind, other models (written by hand: json.dumps would escape what must stay raw)
    for text in ['{"type": "session.update", "session": {"instructions": "a\\ud800"}}',
                 '{"type": "session.update", "session": {"voice": "\\udfff"}}',
                 '{"type": "session.update", "session": {"stop": ["\\ud83d"]}}',
                 '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "\\ud800"}}',
                 '{"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": '
                 '[{"type": "input_text", "text": "\\udc00"}]}}',
                 '{"type": "conversation.item.create", "item": {"id": "\\ud800", "type": "message", "role": "user", '
                 '"content": "x"}}',
                 '{"type": "response.create", "response": {"instructions": "\\ud800"}}',
                 '{"type": "response.create", "event_id": "\\ud800"}',
                 '{"type": "conversation.item.delete", "item_id": "\\udbff"}',
                 '{"type": "input_audio_buffer.append", "audio": "\\ud800"}',
                 '{"type": "\\ud800"}', '{"\\ud800": 1, "type": "response.cancel"}']:
        add("invalid text", text)
    for event in [{"type": "response.cancel", "colour": 1}, {"type": "input_audio_buffer.commit", "audio": "AAAA"},
                  {"type": "input_audio_buffer.append", "audio": "AAAA", "rate": 16000},
                  {"type": "response.create", "response": {"tools": [{"type": "function"}]}},
                  {"type": "response.create", "response": {"frobnicate": 1}},
                  {"type": "response.create", "response": {"max_output_tokens": 5, "max_response_output_tokens": 6}},
                  {"type": "session.update", "session": {"max_output_tokens": 5, "max_response_output_tokens": 6}},
                  {"type": "session.update", "session": {"model": "whisper-1"}},
                  {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "x",
                                                                "colour": "red"}}]:
        add("fields", event)
    wav = b64(__import__("tests.server", fromlist=["wav_bytes"]).wav_bytes(tone_pcm16(0.2)))
    for part in [{"type": "input_video", "video": good_png}, {"type": "input_image", "image": wav},
                 {"type": "input_audio", "audio": good_png, "format": "wav"},
                 {"type": "input_video", "video": wav},
                 {"type": "input_image", "image_url": "data:audio/wav;base64," + good_png}]:
        add("wrong media kind", {"type": "conversation.item.create",
                                 "item": {"type": "message", "role": "user", "content": [part]}})
    add("wrong media kind", {"type": "input_video_buffer.append", "image": wav, "capture_time": 2.0})
    # --- mutations: valid-looking events with one field made hostile
    templates = [("input_audio_buffer.append", "audio"), ("input_video_buffer.append", "image"),
                 ("conversation.item.create", "item"), ("session.update", "session"), ("response.cancel", "response_id"),
                 ("conversation.item.delete", "item_id")]
    while len(out) < 1100:
        kind, field = rng.choice(templates)
        value = rng.choice(_bad_values() + ["%" * rng.randrange(1, 20), rng.random() * 1e6, -rng.randrange(10 ** 6)])
        event = {"type": kind, field: value, "event_id": f"m{len(out)}"}
        if kind == "input_video_buffer.append":
            event["capture_time"] = rng.choice([1.0, "x", -5])
        if kind == "session.update" and isinstance(value, dict):
            event[field] = {"temperature": "bad"}  # an empty update would succeed
        add(f"mutated {kind}", event)
    return out


def run_realtime_fuzz(ws_url: str) -> dict:
    """Sends every hostile message on one session; returns counts. Each must draw one error."""
    from websockets.sync.client import connect

    messages = hostile_messages()
    counts = {"messages": len(messages), "errors": 0, "other_replies": 0, "missing": 0, "crashes": 0,
              "codes": {}}
    failures = []
    with connect(ws_url, max_size=None, compression=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        for label, frame in messages:
            ws.send(frame)
            try:
                reply = json.loads(ws.recv(timeout=10))
            except TimeoutError:
                counts["missing"] += 1
                failures.append((label, "no reply"))
                continue
            if reply.get("type") != "error":
                counts["other_replies"] += 1
                failures.append((label, reply.get("type")))
                continue
            err = reply["error"]
            if err.get("type") == "server_error":
                counts["crashes"] += 1
                failures.append((label, err))
            if not (isinstance(err.get("code"), str) and isinstance(err.get("message"), str) and err["message"]):
                failures.append((label, "unstructured", err))
            counts["errors"] += 1
            counts["codes"][err["code"]] = counts["codes"].get(err["code"], 0) + 1
            try:
                sent = json.loads(frame) if isinstance(frame, str) else None
            except (ValueError, RecursionError):
                sent = None
            echoable = isinstance(sent, dict) and isinstance(sent.get("event_id"), str) and not any(
                0xD800 <= ord(c) <= 0xDFFF for c in sent["event_id"])  # (an id that is not valid text is not echoed)
            if echoable:
                if err.get("event_id") != sent["event_id"]:
                    failures.append((label, "event_id not echoed", err))
        # the same session still serves a real request
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "still there?"}}))
        assert [json.loads(ws.recv(timeout=10))["type"] for _ in range(2)] == ["conversation.item.added",
                                                                           "conversation.item.done"]
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
        while True:
            ev = json.loads(ws.recv(timeout=60))
            if ev["type"] == "response.done":
                counts["final_response_status"] = ev["response"]["status"]
                break
    counts["failures"] = failures
    return counts


def hostile_http_requests() -> list[tuple[str, str, dict]]:
    """(method, path, httpx kwargs); each must get a 4xx JSON error."""
    rng = random.Random(99)
    reqs: list[tuple[str, str, dict]] = []
    chat = "/v1/chat/completions"
    for body in [b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe", b"[" * 50_000, b'{"messages": }']:
        reqs.append(("POST", chat, {"content": body, "headers": {"content-type": "application/json"}}))
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    mutations = {"messages": _bad_values() + [[{"role": "tool", "content": "x"}], [{"role": "user"}],
                                              [{"role": "user", "content": [{"type": "video_url",
                                                                             "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}],
                                              [{"role": "user", "content": [{"type": "input_audio",
                                                                             "input_audio": {"data": "AAAA"}}]}],
                                              [{"role": "user", "content": [{"type": "image_url",
                                                                             "image_url": {"url": "ftp://x/y.png"}}]}]],
                 "max_tokens": [0, -1, "x", 1.5, 10 ** 9, True], "temperature": ["x", -1, 5, []], "top_p": [-0.1, 2, "x"],
                 "stream": ["yes", 1, []], "n": [9, 0, "x"], "stop": [5, [""], ["a"] * 9], "seed": ["x", 1.5],
                 "tools": [[{"type": "function"}]], "logprobs": ["yes", 1],
                 "top_logprobs": [21, -1, "x", 2], "response_format": [{"type": "json_object"}],
                 "model": [5, "other-model"], "frequency_penalty": [2.5, "x"],
                 "modalities": [["audio", "smell"], "text"],
                 "audio": [{"voice": "x"}], "thinking": ["yes"]}
    for name, values in mutations.items():
        for v in values:
            if v is None and name != "messages":
                continue
            reqs.append(("POST", chat, {"json": {**base, name: v}}))
    while len(reqs) < 200:
        name = rng.choice(list(mutations))
        v = rng.choice(mutations[name])
        if v is None:
            continue
        reqs.append(("POST", chat, {"json": {**base, name: v}}))
    reqs += issue9_http_requests()
    tr = "/v1/audio/transcriptions"
    reqs += [("POST", tr, {"content": b"x", "headers": {"content-type": "multipart/form-data; boundary=zz"}}),
             ("POST", tr, {"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}}),
             ("POST", tr, {"json": {"file": "x"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"")}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"RIFF0000WAVEjunk")}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"\0" * 200_000)}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc")}, "data": {"temperature": "hot"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc")}, "data": {"response_format": "srt"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc")}, "data": {"stream": "maybe"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc")}, "data": {"language": "x", "dialect": "y"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc")}, "data": {"model": "whisper-1"}}),
             ("POST", tr, {"files": {"file": ("a.wav", b"abc"), "prompt": ("p.txt", b"x")}}),
             ("GET", tr, {}), ("GET", chat, {}), ("DELETE", "/v1/models", {}), ("GET", "/v1/models/other", {}),
             ("GET", "/nothing", {}), ("POST", "/health", {}), ("GET", "/v1/realtime", {})]
    return reqs


def issue9_http_requests() -> list[tuple[str, str, dict]]:
    """Issue 9's classes on every JSON and upload endpoint: text that is not valid Unicode, bodies of
    the wrong content type, media of the wrong kind, limits that disagree, fields the endpoint does
    not take, and other models."""
    chat, png = "/v1/chat/completions", png_bytes(image_array(8, 8))
    wav = __import__("tests.server", fromlist=["wav_bytes"]).wav_bytes(tone_pcm16(0.2))
    json_bodies = {chat: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   "/v1/audio/speech": {"input": "hi"}, "/v1/images/generations": {"prompt": "a cat", "steps": 1},
                   "/v1/images/edits": {"prompt": "a cat", "image": b64(png), "steps": 1},
                   "/v1/images/segmentations": {"prompt": "the cat", "image": b64(png), "steps": 1},
                   "/v1/audio/voices": {"name": "me", "reference_audio": b64(wav)}}
    reqs: list[tuple[str, str, dict]] = []

    def raw(path: str, body: bytes, ctype: str | None = "application/json") -> None:
        reqs.append(("POST", path, {"content": body, "headers": {"content-type": ctype} if ctype else {}}))

    texts = {chat: "hi", "/v1/audio/speech": "hi", "/v1/images/generations": "a cat", "/v1/images/edits": "a cat",
             "/v1/images/segmentations": "the cat", "/v1/audio/voices": "me"}
    for path, body in json_bodies.items():
        text = json.dumps(body).encode()
        value = json.dumps(texts[path]).encode()
        raw(path, text.replace(value, b'"x\\ud800"', 1))  # a lone surrogate, escaped
        raw(path, text.replace(value, b'"x\xed\xa0\x80"', 1))  # the same as raw CESU-8 bytes
        raw(path, text.replace(value, b'"caf\xe9"', 1))  # Latin-1
        raw(path, text[:-1] + b', "\\udc00": 1}')
        for ctype in ("text/plain", None, "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
            raw(path, text, ctype)
        reqs.append(("POST", path, {"json": {**body, "frobnicate": 1}}))
        reqs.append(("POST", path, {"json": {**body, "model": "some-other-model"}}))
    for part in [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(png)}},
                 {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(wav)}},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(wav)}},
                 {"type": "input_audio", "input_audio": {"data": b64(png), "format": "wav"}}]:
        reqs.append(("POST", chat, {"json": {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}}))
    for extra in [{"max_tokens": 10 ** 9, "max_completion_tokens": 2}, {"logit_bias": {"1": 500}},
                  {"reasoning_effort": "high"}, {"service_tier": "flex"}, {"store": True}, {"model": "whisper-1"},
                  {"tool_choice": "required"}, {"top_logprobs": 2}]:
        reqs.append(("POST", chat, {"json": {**json_bodies[chat], **extra}}))
    reqs.append(("POST", "/v1/audio/speech", {"json": {"input": "hi", "reference_audio": b64(png)}}))
    reqs.append(("POST", "/v1/images/edits", {"json": {"prompt": "x", "image": b64(wav)}}))
    for field, value in [(b"prompt", b"a\xed\xa0\x80"), (b"language", b"\xff"), (b"\xff", b"x"),
                         (b"timestamp_granularities[]", b"word"), (b"frobnicate", b"1"), (b"model", b"tts-1")]:
        form = (b'--zz\r\nContent-Disposition: form-data; name="' + field + b'"\r\n\r\n' + value + b"\r\n--zz\r\n"
                b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + wav + b"\r\n--zz--\r\n")
        raw("/v1/audio/transcriptions", form, "multipart/form-data; boundary=zz")
    reqs.append(("POST", "/v1/audio/transcriptions", {"files": {"file": ("a.png", png)}}))
    reqs += [("DELETE", "/v1/audio/voices/me%ED%A0%80", {}), ("GET", "/v1/models/%FF%FE", {}),
             ("GET", "/v1/models?token=%C0%AF", {}), ("POST", chat + "?x=%ED%B0%80", {"json": json_bodies[chat]})]
    return reqs


def run_http_fuzz(base_url: str) -> dict:
    counts = {"requests": 0, "errors": 0, "accepted": 0, "crashes": 0, "non_json": 0, "codes": {}}
    failures = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for method, path, kwargs in hostile_http_requests():
            counts["requests"] += 1
            if "json" in kwargs:  # encoded here: json.dumps escapes lone surrogates, httpx refuses them
                kwargs = {"content": json.dumps(kwargs["json"]).encode(),
                          "headers": {"content-type": "application/json"}}
            try:
                r = http.request(method, path, **kwargs)
            except httpx.HTTPError as e:
                counts["crashes"] += 1
                failures.append((method, path, repr(e)))
                continue
            if r.status_code >= 500:
                counts["crashes"] += 1
            try:
                data = r.json()
            except ValueError:
                data = None
            err = data.get("error") if isinstance(data, dict) else None
            if r.status_code < 400:
                counts["accepted"] += 1
            elif not isinstance(err, dict):
                counts["non_json"] += 1
            ok = (400 <= r.status_code < 500 and isinstance(err, dict) and isinstance(err.get("code"), str)
                  and bool(err.get("message")))
            if ok:
                counts["errors"] += 1
                counts["codes"][err["code"]] = counts["codes"].get(err["code"], 0) + 1
            else:
                failures.append((method, path, str(kwargs)[:100], r.status_code, r.text[:200]))
        assert http.get("/health").json()["status"] == "ok"
    counts["failures"] = failures
    return counts


def run_abort_fuzz(srv) -> dict:
    """Clients that break the wire or leave early: websocket text frames that are not UTF-8 (each
    connection must be closed with 1007), uploads cut short on every endpoint that reads a body, and
    streams whose connection is reset. Each must be counted once in /health's client_aborts."""
    from tests.server import invalid_utf8_frame, reset_mid_stream, truncated_upload, wait_for, wav_bytes

    health = lambda: httpx.get(srv.url + "/health", timeout=30).json()["client_aborts"]  # noqa: E731
    before = health()
    frames = [b'{"type": "\xff"}', b'{"type": "\xed\xa0\x80"}', b"\xc0\xaf", b'{"a": "\xe4\xbd"}', b"\x80",
              b'{"t": "\xf8\x88\x80\x80\x80"}', b'{"type": "session.update", "session": {"instructions": "\xfe"}}']
    closed_1007 = sum(b"\x88\x02\x03\xef" in invalid_utf8_frame(srv.port, payload) for payload in frames)
    multipart = (b"multipart/form-data; boundary=zz",
                 b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + wav_bytes(tone_pcm16()))
    uploads = [("/v1/chat/completions", b"application/json", b'{"messages": [{"role": "user", "content": "'),
               ("/v1/audio/speech", b"application/json", b'{"input": "hel'),
               ("/v1/images/generations", b"application/json", b'{"prompt": "a c'),
               ("/v1/images/edits", b"application/json", b'{"prompt": "x", "image": "iVBOR'),
               ("/v1/audio/voices", b"application/json", b'{"name": "me", "reference_audio": "UklG'),
               ("/v1/audio/transcriptions", *multipart), ("/v1/images/edits", *multipart),
               ("/v1/audio/voices", *multipart)]
    for path, ctype, head in uploads:
        truncated_upload(srv.port, path, ctype, head)
    resets = 3
    for _ in range(resets):
        reset_mid_stream(srv.port)
    expected = {"invalid_utf8_frame": len(frames), "truncated_upload": len(uploads), "left_mid_response": resets}
    after = wait_for(lambda: (lambda h: h if all(h[k] - before[k] >= n for k, n in expected.items()) else None)(
        health()), 30)
    return {"frames": len(frames), "closed_1007": closed_1007, "uploads": len(uploads), "resets": resets,
            "counted": {k: after[k] - before[k] for k in expected}}


def summary(rt: dict, http: dict, aborts: dict | None = None, tracebacks: int | None = None) -> str:
    out = (f"fuzz: realtime {rt['messages']} messages tried, {rt['errors']} structured errors returned, "
           f"{rt['other_replies'] + rt['missing']} unanswered or wrong replies, {rt['crashes']} crashes; "
           f"HTTP {http['requests']} requests tried, {http['errors']} structured 4xx errors, {http['accepted']} "
           f"accepted, {http['crashes']} crashes, {http['non_json']} non-JSON error bodies")
    if aborts is not None:
        out += (f"; aborts: {aborts['frames']} non-UTF-8 websocket frames ({aborts['closed_1007']} closed with 1007), "
                f"{aborts['uploads']} truncated uploads, {aborts['resets']} resets mid-stream, counted "
                f"{json.dumps(aborts['counted'], sort_keys=True)}")
    if tracebacks is not None:
        out += f"; {tracebacks} tracebacks in the log"
    return out


class LogCapture(logging.Handler):
    """Records of the server's loggers (uvicorn's and ours) while the fuzz runs."""

    LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "engine.server")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogCapture":
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    @property
    def tracebacks(self) -> list[str]:
        return [logging.Formatter().format(r)[:400] for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


def test_every_hostile_message_gets_a_structured_error_and_the_server_keeps_serving(tiny_engine):
    from tests.server import running_server

    with running_server(tiny_engine, **LIMITS) as srv, LogCapture() as log:
        rt = run_realtime_fuzz(srv.ws_url)
        http = run_http_fuzz(srv.url)
        aborts = run_abort_fuzz(srv)
        print("\n" + summary(rt, http, aborts, len(log.tracebacks)))
        assert rt["messages"] >= 1000
        assert rt["failures"] == [] and rt["errors"] == rt["messages"] and rt["crashes"] == 0
        assert rt["final_response_status"] in ("completed", "incomplete")
        assert http["failures"] == [] and http["errors"] == http["requests"] >= 280 and http["non_json"] == 0
        assert len(rt["codes"]) >= 20  # the errors name many distinct problems, not one catch-all
        assert aborts["closed_1007"] == aborts["frames"]
        assert aborts["counted"] == {"invalid_utf8_frame": aborts["frames"], "truncated_upload": aborts["uploads"],
                                     "left_mid_response": aborts["resets"]}
        from websockets.sync.client import connect
        with connect(srv.ws_url) as ws:  # new sessions still open
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    assert log.tracebacks == []


def test_an_oversized_websocket_handshake_is_answered_and_the_server_stops_cleanly(monkeypatch):
    """A realtime handshake whose request line (a 9,000-character query) or a header is too long got no
    answer at all (the client waited until it gave up) and its open connection made the server's shutdown
    fail; now 414 / 431 at once, and the server keeps serving and stops cleanly."""
    import threading

    from tests.server import FakeEngine, fake_server, handshake_answer

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    with fake_server(FakeEngine()) as srv:
        assert handshake_answer(srv.port, "/v1/realtime?x=" + "a" * 9000).startswith(b"HTTP/1.1 414")
        assert handshake_answer(srv.port, "/v1/realtime", f"X-Big: {'b' * 20000}\r\n").startswith(b"HTTP/1.1 431")
        assert handshake_answer(srv.port, "/v1/realtime?x=1").startswith(b"HTTP/1.1 101")
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    assert crashed == []


def test_an_append_as_large_as_openai_takes_is_refused_with_an_error_and_the_session_goes_on():
    """OpenAI takes input_audio_buffer.append events up to 15 MiB; one of 10 MB (past twice our 4 MiB event limit and
    1 MiB) closed the session with code 1009, the client losing its conversation. It is now a message_too_large
    error event, and the session answers its next event."""
    from websockets.sync.client import connect

    from tests.server import fake_server

    audio = "A" * (10 * 1000 * 1000)
    with fake_server() as srv, connect(srv.ws_url, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "message_too_large"
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "input_audio_buffer.cleared"


@pytest.mark.parametrize("session", [{"x" * 2_000_000: 1},
                                     {"audio": {"input": {"turn_detection": {"type": "server_vad", "x" * 2_000_000: 1}}}}])
def test_an_unknown_field_with_a_huge_name_is_not_echoed_back_whole(session):
    """A session.update naming an unknown field of 2 MB had the whole name sent back in the error's `param`: every
    error now echoes at most a few hundred characters of what the client sent."""
    from websockets.sync.client import connect

    from tests.server import fake_server

    with fake_server() as srv, connect(srv.ws_url, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": session}))
        err = json.loads(ws.recv(timeout=10))["error"]
        assert err["code"] == "unknown_parameter" and err["param"].endswith("xxx…"), err["param"][:80]
        assert len(json.dumps(err)) < 10_000  # (the 2 MB name was sent back whole)


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("MING_STUDIO_CACHE", tempfile.mkdtemp(prefix="ming-fuzz-"))
    from engine.runtime import Engine
    from tests.server import running_server

    with running_server(Engine.load(None), **LIMITS) as srv, LogCapture() as log:
        rt, http, aborts = run_realtime_fuzz(srv.ws_url), run_http_fuzz(srv.url), run_abort_fuzz(srv)
    print(summary(rt, http, aborts, len(log.tracebacks)))
    print("realtime error codes:", json.dumps(rt["codes"], sort_keys=True))
    print("HTTP error codes:", json.dumps(http["codes"], sort_keys=True))
    for f in rt["failures"] + http["failures"] + log.tracebacks:
        print("FAILURE", f)
    sys.exit(1 if rt["failures"] or http["failures"] or log.tracebacks else 0)
