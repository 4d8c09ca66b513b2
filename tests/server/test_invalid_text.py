"""Text that is not valid Unicode (issue 9 §1): lone UTF-16 surrogates from JSON escapes ("\\ud800"),
raw CESU-8 bytes, invalid UTF-8 in multipart form fields. One policy at the boundary, for every text
field of every endpoint and realtime event: a 400 `invalid_text` naming the field, and a realtime
session that refuses the event and keeps serving."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from engine.server.protocol import ApiError
from tests.server import b64, image_array, png_bytes, recv_item, recv_json, recv_until, tone_pcm16, wav_bytes

CESU_8 = b"\xed\xa0\x80"  # U+D800 written as if it were a character (CESU-8 / WTF-8): not UTF-8
PNG = b64(png_bytes(image_array(24, 32)))
WAV = b64(wav_bytes(tone_pcm16(1.0)))


def raw_json(text: str) -> dict:
    """httpx arguments sending `text` (a JSON document written by hand, escapes as they are) as the body."""
    return {"content": text.encode("utf-8"), "headers": {"content-type": "application/json"}}


# (path, JSON text with a lone surrogate written as a JSON escape, the field path the error must name)
ESCAPED = [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", '
                             '"content": "hi"}], "max_tokens": 2}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
                             '"x\\ud800"}, {"role": "user", "content": "again"}], "max_tokens": 2}',
     "messages[1].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}], '
                             '"max_tokens": 2}', "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "model": "\\udc00"}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', "\\ud800"),
    ("/v1/audio/speech", '{"input": "hello \\ud800"}', "input"),
    ("/v1/audio/speech", '{"input": "hello", "instructions": "calm \\udc01"}', "instructions"),
    ("/v1/audio/speech", '{"input": "hello", "voice": "\\ud800"}', "voice"),
    ("/v1/images/generations", '{"prompt": "a \\ud800 teapot", "steps": 1, "size": "16x16"}', "prompt"),
    ("/v1/images/edits", '{"prompt": "a teapot", "image": "data:image/png;base64,' + PNG + '", "preset": "\\ud800"}',
     "preset"),
    ("/v1/audio/voices", '{"name": "me\\ud800", "reference_audio": "' + WAV + '"}', "name"),
]


@pytest.mark.parametrize("path, text, param", ESCAPED, ids=[f"{p}:{q}" for p, _, q in ESCAPED])
def test_lone_surrogate_escapes_are_refused_naming_the_field(http, path, text, param):
    r = http.post(path, **raw_json(text))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_text" and err["param"] == param, err
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a' + CESU_8 + b'b"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/audio/speech", b'{"input": "x' + CESU_8 + b'"}', "input"),
    ("/v1/images/generations", b'{"prompt": "' + b"\xff\xfe" + b'", "steps": 1}', "prompt"),
])
def test_raw_bytes_that_are_not_utf8_are_refused_naming_the_field(http, path, body, param):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_text" and err["param"] == param, err


def multipart(fields: list[tuple[str, bytes]], files: list[tuple[str, str, bytes]]) -> dict:
    """A multipart body written by hand (httpx would encode text fields itself)."""
    out = b""
    for name, value in fields:
        out += b'--zz\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
    for name, filename, data in files:
        out += (b'--zz\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="'
                + filename.encode() + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n")
    return {"content": out + b"--zz--\r\n", "headers": {"content-type": "multipart/form-data; boundary=zz"}}


@pytest.mark.parametrize("path, fields, files, param", [
    ("/v1/audio/transcriptions", [("prompt", b"a lecture " + CESU_8)], [("file", "a.wav", wav_bytes(tone_pcm16()))],
     "prompt"),
    ("/v1/audio/transcriptions", [("hotwords", b"Ming,\xff")], [("file", "a.wav", wav_bytes(tone_pcm16()))],
     "hotwords"),
    ("/v1/audio/voices", [("name", b"me" + CESU_8)], [("file", "a.wav", wav_bytes(tone_pcm16(1.0)))], "name"),
    ("/v1/images/edits", [("prompt", b"caf\xe9")], [("image", "a.png", png_bytes(image_array(16, 16)))], "prompt"),
])
def test_form_fields_that_are_not_utf8_are_refused_not_read_as_latin1(http, path, fields, files, param):
    r = http.post(path, **multipart(fields, files))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_text" and err["param"] == param, err


def test_valid_non_ascii_text_still_passes(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "café 你好 😀"}],
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = http.post("/v1/audio/transcriptions", **multipart([("prompt", "café 上海".encode())],
                                                           [("file", "a.wav", wav_bytes(tone_pcm16()))]))
    assert r.status_code == 200, r.text


# realtime events with a lone surrogate, and the field each error must name
REALTIME = [
    ('{"type": "session.update", "event_id": "e1", "session": {"instructions": "a\\ud800"}}', "session.instructions"),
    ('{"type": "session.update", "event_id": "e1", "session": {"audio": {"output": {"voice": "\\udc00"}}}}',
     "session.audio.output.voice"),
    ('{"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "user", '
     '"content": [{"type": "input_text", "text": "x\\udc00"}]}}', "item.content[0].text"),
    ('{"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "user", '
     '"content": "x\\udc00"}}', "item.content"),
    ('{"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "system", '
     '"content": [{"type": "input_text", "text": "\\ud800"}]}}', "item.content[0].text"),
    ('{"type": "conversation.item.create", "event_id": "e1", "item": {"type": "message", "role": "assistant", '
     '"content": [{"type": "output_text", "text": "\\ud800"}]}}', "item.content[0].text"),
    ('{"type": "conversation.item.create", "event_id": "e1", "item": {"id": "\\ud800", "type": "message", '
     '"role": "user", "content": "x"}}', "item.id"),
    ('{"type": "response.create", "event_id": "e1", "response": {"instructions": "\\ud800"}}',
     "response.instructions"),
    ('{"type": "response.create", "event_id": "e1", "response": {"stop": ["\\ud800"]}}', "response.stop[0]"),
    ('{"type": "conversation.item.delete", "event_id": "e1", "item_id": "\\ud800"}', "item_id"),
]


def test_a_realtime_session_refuses_invalid_text_and_keeps_serving(server):
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for text, param in REALTIME:
            ws.send(text)
            ev = recv_json(ws)
            assert ev["type"] == "error", (text, ev)
            assert ev["error"]["code"] == "invalid_text" and ev["error"]["param"] == param, (text, ev["error"])
            assert ev["error"]["event_id"] == "e1"
        # the event with a bad event_id is refused too (its id cannot be echoed)
        ws.send('{"type": "input_audio_buffer.clear", "event_id": "\\ud800"}')
        ev = recv_json(ws)
        assert ev["error"]["code"] == "invalid_text" and ev["error"]["event_id"] is None
        # nothing was applied: the session is as it was, and answers
        ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 2}}))
        updated = recv_json(ws)
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] is None
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": "still fine?"}}))
        assert len(recv_item(ws)["item"]["content"]) == 1
        ws.send(json.dumps({"type": "response.create"}))
        done = recv_until(ws, "response.done")[-1]
        assert done["response"]["status"] in ("completed", "incomplete"), done


@pytest.mark.parametrize("method, url, param", [
    ("DELETE", "/v1/audio/voices/me%ED%A0%80", "path"),
    ("GET", "/v1/models/%FF", "path"),
    ("GET", "/v1/models?x=%ED%A0%80", "query"),
    ("GET", "/health?x=%C0%AF", "query"),
])
def test_urls_whose_text_is_not_utf8_are_refused(http, method, url, param):
    r = http.request(method, url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_text" and err["param"] == param, err


def test_a_percent_encoded_utf8_url_still_works_and_a_realtime_url_is_checked_too(http, server):
    r = http.delete("/v1/audio/voices/%E5%A3%B0%E9%9F%B3")  # 声音: no such voice, but valid text
    assert r.json()["error"]["code"] == "voice_not_found", r.text
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as info:
        connect(server.ws_url + "?model=%ED%A0%80").close()
    assert info.value.response.status_code == 400
    assert json.loads(info.value.response.body)["error"]["code"] == "invalid_text"


def test_a_body_of_millions_of_small_values_is_not_walked_value_by_value():
    """Every string of a JSON body is checked for lone surrogates; the check walked every value building
    its path, so a 28 MB body of 2,000,000 small objects held the event loop (every other client, /health
    included) for 15 s against 2.7 s of parsing. A body with no \\uD8xx-\\uDFxx escape and valid UTF-8
    cannot hold one (an escaped pair is a character): it is not walked; one that can is walked without
    building paths until there is one to name."""
    import time

    from engine.server.text import parse_json_text

    body = ('{"messages": [{"role": "user", "content": "hi \\u00e9\\ud83d\\ude00"}], "metadata": {"x": ['
            + ",".join(['{"a": [1, 2, "b"]}'] * 300_000) + "]}}").encode()
    def best_of_two(parse) -> tuple[float, object]:  # (a loaded machine's pauses are not the walk's cost)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            value = parse(body)
            times.append(time.perf_counter() - t0)
        return min(times), value

    parse_s, _ = best_of_two(json.loads)
    checked_s, value = best_of_two(parse_json_text)  # (an escaped pair, as json.dumps writes: a character, not walked)
    assert value["messages"][0]["content"] == "hi é😀"
    assert checked_s < 2.0 * parse_s + 0.05, (checked_s, parse_s)
    lone = body.replace(b"\\ud83d\\ude00", b"\\ud83d")  # a lone one deep in it is still found and named
    with pytest.raises(ApiError) as refused:
        parse_json_text(lone)
    assert refused.value.param == "messages[0].content"


def test_a_body_of_escaped_emoji_is_checked_in_about_its_parsing_time():
    """Telling a lone surrogate escape from an escaped pair (as json.dumps writes every emoji) took a regex over the
    body: 2.5 s of the event loop for a 30 MB body of escaped emoji against 0.13 s of parsing, every other client
    (/health too) waiting; a realtime message of 4 MiB could hold it 0.35 s, again and again."""
    import time

    from engine.server.text import parse_json_text

    body = b'{"messages": [{"role": "user", "content": "' + b"\\ud83d\\ude00" * 500_000 + b'"}]}'  # 6 MB

    def best_of_two(parse) -> float:  # (a loaded machine's pauses are not the check's cost)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            parse(body)
            times.append(time.perf_counter() - t0)
        return min(times)

    parse_s, checked_s = best_of_two(json.loads), best_of_two(parse_json_text)
    assert checked_s < 4.0 * parse_s + 0.05, (checked_s, parse_s)  # (was ~20x)
    with pytest.raises(ApiError) as refused:  # a lone one at its end is still found and named
        parse_json_text(body.replace(b'"}]}', b'\\ud83d"}]}'))
    assert refused.value.param == "messages[0].content"
