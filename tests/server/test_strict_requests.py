"""What the server no longer lets through (issue 9 §7): bodies of a content type an endpoint does not
take, media of the wrong kind (told by its bytes, not by its label), contradicting token limits,
OpenAI parameters that would be silently ignored, and model ids; plus the OpenAI model aliases a
drop-in client may send, per endpoint."""

from __future__ import annotations

import json

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.server import (b64, image_array, png_bytes, recv_item, recv_json, recv_until, reference_chat,
                          running_server, tone_pcm16, wav_bytes)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
PNG = png_bytes(image_array(24, 32))
WAV = wav_bytes(tone_pcm16(1.0))


def mp4_bytes(tmp_path, width: int = 64, height: int = 48) -> bytes:
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4, (width, height))
    for i in range(6):
        writer.write(np.full((height, width, 3), 20 * i, np.uint8))
    writer.release()
    return path.read_bytes()


def recording_with_sound() -> bytes:
    """An mp4 with a video stream and a 1 s tone: a phone recording."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        video, audio = c.add_stream("mpeg4", rate=4), c.add_stream("aac", rate=16000)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            c.mux(video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")))
        c.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(tone_pcm16(1.0).astype(np.float32)[None, :] / 32768, format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        c.mux(audio.encode(frame))
        c.mux(audio.encode())
    return buf.getvalue()


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --------------------------------------------------------------------------- content types

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/audio/speech", {"input": "hello"}),
    ("/v1/images/generations", {"prompt": "a teapot", "steps": 1}),
    ("/v1/images/edits", {"prompt": "a teapot", "image": b64(PNG), "steps": 1}),
    ("/v1/audio/voices", {"name": "me", "reference_audio": b64(WAV)}),
])
@pytest.mark.parametrize("ctype", ["text/plain", None, "application/x-www-form-urlencoded",
                                   "application/json; charset=latin-1"])
def test_a_json_body_needs_a_json_content_type(http, path, body, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = http.post(path, content=json.dumps(body).encode(), headers=headers)
    err = error_of(r, 415)
    assert err["code"] == "unsupported_content_type" and "application/json" in err["message"], err


def test_json_with_its_charset_or_a_json_suffix_is_taken(http):
    for ctype in ("application/json; charset=utf-8", "application/json;charset=UTF-8", "application/vnd.api+json"):
        r = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers={"content-type": ctype})
        assert r.status_code == 200, (ctype, r.text)


def test_transcriptions_take_multipart_only(http):
    err = error_of(http.post("/v1/audio/transcriptions", json={"file": "x"}), 415)
    assert err["code"] == "unsupported_content_type" and "multipart/form-data" in err["message"]



@pytest.mark.parametrize("path, field", [("/v1/audio/transcriptions", "model"), ("/v1/images/edits", "prompt"),
                                         ("/v1/audio/voices", "name")])
def test_a_form_whose_charset_is_not_utf8_is_refused_naming_it(http, path, field):
    """A UTF-8 form sent as 'multipart/form-data; charset=utf-16' had its field names decoded as UTF-16: the answer
    named a field '牰浯瑰' nobody sent. Such a charset is refused (415) naming it; UTF-8 named is taken."""
    form = f'--B\r\nContent-Disposition: form-data; name="{field}"\r\n\r\nwhisper-1\r\n--B--\r\n'.encode()
    for charset in ("utf-16", "latin-1"):
        r = http.post(path, content=form, headers={"content-type": f"multipart/form-data; charset={charset}; boundary=B"})
        err = error_of(r, 415)
        assert err["code"] == "unsupported_content_type" and f"charset={charset}" in err["message"], err
    r = http.post(path, content=form, headers={"content-type": "multipart/form-data; charset=UTF-8; boundary=B"})
    assert error_of(r)["code"] == "missing_field"  # (read: its one field taken, the upload it lacks named)


def test_a_multipart_body_cut_before_its_closing_boundary_is_called_cut(http):
    """It was "'file' (the audio file upload) is required": the parser drops an unfinished part."""
    part = (b'--B\r\nContent-Disposition: form-data; name="max_tokens"\r\n\r\n1\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + WAV)
    for body in (part, part + b"\r\n--B"):
        err = error_of(http.post("/v1/audio/transcriptions", content=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=B"}))
        assert err["code"] == "invalid_multipart" and "closing boundary" in err["message"], err
    r = http.post("/v1/audio/transcriptions", content=part + b"\r\n--B--\r\n",
                  headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, files, field, values", [
    ("/v1/audio/transcriptions", {"file": ("a.wav", WAV)}, "response_format", ["json", "text"]),
    ("/v1/audio/transcriptions", {"file": ("a.wav", WAV)}, "language", ["en", "en"]),
    ("/v1/audio/voices", {"file": ("a.wav", WAV)}, "name", ["one", "two"]),
    ("/v1/images/edits", {"image": ("a.png", PNG)}, "prompt", ["a teapot", "a kettle"]),
    ("/v1/images/edits", {"image": ("a.png", PNG)}, "steps", ["1", "2"]),
])
def test_a_form_field_sent_twice_is_refused_naming_it(http, path, files, field, values):
    """The parser kept the last value of a field sent twice, and the request ran on it silently."""
    err = error_of(http.post(path, files=files, data={field: values}))
    assert (err["code"], err["param"]) == ("invalid_value", field), err
    assert "2 times" in err["message"]


# --------------------------------------------------------------------------- media of the wrong kind

def chat_part(part: dict) -> dict:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], "max_tokens": 1}


@pytest.mark.parametrize("part, code", [
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(PNG)}}, "invalid_video"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(WAV)}}, "invalid_video"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(WAV)}}, "invalid_image"),
    ({"type": "image_url", "image_url": {"url": "data:audio/wav;base64," + b64(PNG)}}, "invalid_image"),
    ({"type": "input_audio", "input_audio": {"data": b64(PNG), "format": "wav"}}, "invalid_audio"),
])
def test_media_of_the_wrong_kind_is_refused_by_its_bytes(http, part, code):
    err = error_of(http.post("/v1/chat/completions", json=chat_part(part)))
    assert err["code"] == code, err
    assert err["param"].startswith("messages[0].content[0]")


def test_a_video_is_taken_as_video_and_only_as_video(http, tmp_path):
    mp4 = mp4_bytes(tmp_path)
    ok = http.post("/v1/chat/completions", json=chat_part(
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(mp4)}}))
    assert ok.status_code == 200, ok.text
    for part in ({"type": "video_url", "video_url": {"url": "data:image/png;base64," + b64(mp4)}},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(mp4)}},
                 {"type": "input_audio", "input_audio": {"data": b64(mp4), "format": "mp3"}}):
        err = error_of(http.post("/v1/chat/completions", json=chat_part(part)))
        assert err["code"] in ("invalid_video", "invalid_image", "invalid_audio"), err
        assert "video" in err["message"], err


def test_an_upload_of_a_recording_is_transcribed_from_its_audio_track_but_an_audio_part_refuses_it(http):
    mp4 = recording_with_sound()
    r = http.post("/v1/audio/transcriptions", files={"file": ("clip.mp4", mp4)}, data={"max_tokens": "2"})
    assert r.status_code == 200, r.text  # as OpenAI's endpoint does (mp4, webm)
    err = error_of(http.post("/v1/chat/completions", json=chat_part(
        {"type": "input_audio", "input_audio": {"data": b64(mp4), "format": "m4a"}})))
    assert err["code"] == "invalid_audio" and "video" in err["message"], err
    err = error_of(http.post("/v1/audio/transcriptions", files={"file": ("a.png", PNG)}))
    assert err["code"] == "invalid_audio" and "PNG image" in err["message"], err


def test_realtime_media_of_the_wrong_kind_is_refused(server):
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for part, code in (({"type": "input_video", "video": b64(PNG)}, "invalid_video"),
                           ({"type": "input_image", "image": b64(WAV)}, "invalid_image"),
                           ({"type": "input_audio", "audio": b64(PNG), "format": "wav"}, "invalid_audio")):
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": [part]}}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["code"] == code, ev
        ws.send(json.dumps({"type": "input_video_buffer.append", "image": b64(WAV), "capture_time": 1.0}))
        assert recv_json(ws)["error"]["code"] == "invalid_image"


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def pcx_bytes() -> bytes:
    """A picture Pillow reads (PCX) that the engine's decoder does not take: it is refused as the message says."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_array(8, 8)).save(buf, "PCX")
    return buf.getvalue()


def test_a_picture_in_a_format_not_read_is_refused_naming_the_formats_that_are(http, server):
    """An SVG or a PDF sent as a chat picture said "not a recognised image" and named no format that is read."""
    from engine.errors import image_formats_named
    for raw, mime in ((SVG, "image/svg+xml"), (PDF, "application/pdf"), (pcx_bytes(), "image/x-pcx")):
        err = error_of(http.post("/v1/chat/completions", json=chat_part(
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + b64(raw)}})))
        assert (err["code"], err["param"]) == ("invalid_image", "messages[0].content[0]"), err
        assert image_formats_named() in err["message"] and "PNG, JPEG" in err["message"], err
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_image", "image": b64(SVG)}]}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "invalid_image", ev
        assert image_formats_named() in ev["error"]["message"], ev

def test_speech_and_voices_refuse_a_picture_as_their_reference_clip(http):
    err = error_of(http.post("/v1/audio/speech", json={"input": "hello", "reference_audio": b64(PNG)}))
    assert err["code"] == "invalid_audio", err
    err = error_of(http.post("/v1/audio/voices", files={"file": ("me.wav", PNG)}, data={"name": "me"}))
    assert err["code"] == "invalid_audio", err



# --------------------------------------------------------------------------- media the model cannot take

def audio_part(raw: bytes, fmt: str = "wav", **spec) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(raw), "format": fmt, **spec}}


UNUSABLE_AUDIO = [  # each was let through and failed in the engine with param null (in realtime: every response)
    (audio_part(wav_bytes(tone_pcm16(0.003))), "invalid_audio", ".input_audio.data", "too short"),
    (audio_part(wav_bytes(tone_pcm16(0.5, rate=16001), rate=16001)), "invalid_audio", ".input_audio.data",
     "cannot resample"),
    (audio_part(wav_bytes(tone_pcm16(0.01, rate=8000), rate=1_000_000_000)), "invalid_audio", ".input_audio.data",
     "sample rate"),
    (audio_part(tone_pcm16(0.5, rate=16001).tobytes(), "pcm16", sample_rate=16001), "invalid_value",
     ".input_audio.sample_rate", "cannot resample"),
]


@pytest.mark.parametrize("part, code, field, message", UNUSABLE_AUDIO)
def test_audio_the_model_cannot_take_is_refused_naming_the_part(http, part, code, field, message):
    err = error_of(http.post("/v1/chat/completions", json=chat_part(part)))
    assert (err["code"], err["param"]) == (code, "messages[0].content[0]" + field), err
    assert message in err["message"], err


def test_an_upload_too_short_for_the_model_is_refused_naming_the_file(http):
    err = error_of(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(tone_pcm16(0.003)))}))
    assert (err["code"], err["param"]) == ("invalid_audio", "file") and "too short" in err["message"], err


def test_pictures_too_elongated_for_the_model_are_refused_naming_the_part(http, tmp_path):
    """Pictures and video frames beyond 200:1 (engine.media.image.MAX_ASPECT_RATIO), here 300:1 and 250:1."""
    thin = png_bytes(image_array(300, 1))
    err = error_of(http.post("/v1/chat/completions", json=chat_part(
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(thin)}})))
    assert (err["code"], err["param"]) == ("invalid_image", "messages[0].content[0]"), err
    assert "aspect ratio" in err["message"], err
    err = error_of(http.post("/v1/images/edits", json={"prompt": "a teapot", "image": b64(thin), "steps": 1}))
    assert (err["code"], err["param"]) == ("invalid_image", "image[0]"), err
    err = error_of(http.post("/v1/chat/completions", json=chat_part(
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(mp4_bytes(tmp_path, 4, 1000))}})))
    assert (err["code"], err["param"]) == ("invalid_video", "messages[0].content[0]"), err


def test_a_voice_name_no_voice_can_have_is_refused_where_it_is_set(http, server):
    """Chat's audio.voice, a realtime session's or response's voice: '../x' was taken and every spoken
    response then failed (param null)."""
    r = http.post("/v1/chat/completions", json={**CHAT, "modalities": ["text", "audio"], "audio": {"voice": "../x"}})
    assert error_of(r)["param"] == "audio.voice"
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event in ({"type": "session.update", "session": {"audio": {"output": {"voice": "a/b"}}}},
                      {"type": "session.update", "session": {"voice": ".x"}},
                      {"type": "response.create", "response": {"audio": {"output": {"voice": "a\u0000b"}}}}):
            ws.send(json.dumps(event))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["param"].endswith("voice"), ev


def test_a_voice_that_is_not_saved_is_refused_where_it_is_set_naming_the_field(http, server):
    """'nobody' as chat audio.voice or a realtime session's or response's voice was taken and every
    spoken response then failed with voice_not_found (param null); /v1/audio/speech named no field."""
    r = http.post("/v1/chat/completions", json={**CHAT, "modalities": ["text", "audio"], "audio": {"voice": "nobody"}})
    err = error_of(r)
    assert (r.status_code, err["code"], err["param"]) == (400, "voice_not_found", "audio.voice"), err
    assert "saved voices" in err["message"], err
    err = error_of(http.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"}))
    assert (err["code"], err["param"]) == ("voice_not_found", "voice"), err
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event, param in (({"type": "session.update", "session": {"voice": "nobody"}}, "session.voice"),
                             ({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}},
                              "session.audio.output.voice"),
                             ({"type": "response.create", "response": {"audio": {"output": {"voice": "nobody"}}}},
                              "response.audio.output.voice")):
            ws.send(json.dumps(event))
            ev = recv_json(ws)
            assert ev["type"] == "error" and (ev["error"]["code"], ev["error"]["param"]) == ("voice_not_found", param), ev
        ws.send(json.dumps({"type": "session.update", "session": {"voice": "default"}}))
        assert recv_json(ws)["session"]["audio"]["output"]["voice"] == "default"


def test_pictures_that_would_decode_past_the_media_budget_are_refused_before_decoding(tiny_engine, monkeypatch):
    """20 black 4000x4000 PNGs are a 1 MiB request that decoded to 915 MiB (and 550 of them, within the
    body limit, to 25 GiB: the server was killed). The request's (or realtime item's) decoded media now has
    the session's budget, charged from each picture's header before it is decoded."""
    from engine.server import codec

    black = png_bytes(np.zeros((600, 800, 3), np.uint8))  # 1.4 MiB decoded each
    decoded = []
    real = codec.load_image
    monkeypatch.setattr(codec, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(black)}}] * 3
    with running_server(tiny_engine, max_session_media_bytes=3 * 1024 * 1024) as srv:
        body = {"messages": [{"role": "user", "content": parts[:1]}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": parts}], "max_tokens": 1}
        err = error_of(httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60))
        assert (err["code"], err["param"]) == ("media_too_large", "messages[2].content[1]"), err
        assert len(decoded) == 2  # the third picture was refused from its header
        with connect(srv.ws_url) as ws:
            assert recv_json(ws)["type"] == "session.created"
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_image", "image": b64(black)}] * 3}}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["code"] == "media_too_large", ev


def test_a_video_is_charged_to_the_media_budget_by_its_decoded_size(tiny_engine, tmp_path):
    """A video was charged by its encoded bytes (a 2.2 MB mp4 decodes to ~75 MiB of frames at the
    model's size, and its 170 frames were decoded at full size): it is now charged, from its
    container, by the frames the engine decodes it into."""
    big = mp4_bytes(tmp_path, 640, 480)  # a few KB: 3 sampled frames, padded to 4, of 640x480 (3.5 MiB)
    small = mp4_bytes(tmp_path, 64, 48)  # ... enlarged to the model's least size (1.5 MiB)

    def video(raw):
        return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(raw)}}
    with running_server(tiny_engine, max_session_media_bytes=3 * 1024 * 1024) as srv:
        ok = httpx.post(srv.url + "/v1/chat/completions", json=chat_part(video(small)), timeout=60)
        assert ok.status_code == 200, ok.text
        err = error_of(httpx.post(srv.url + "/v1/chat/completions", json=chat_part(video(big)), timeout=60))
        assert (err["code"], err["param"]) == ("media_too_large", "messages[0].content[0]"), err
        two = {"messages": [{"role": "user", "content": [video(small), video(small)]}], "max_tokens": 1}
        err = error_of(httpx.post(srv.url + "/v1/chat/completions", json=two, timeout=60))
        assert (err["code"], err["param"]) == ("media_too_large", "messages[0].content[1]"), err


def test_realtime_refuses_media_the_model_cannot_take_and_the_conversation_keeps_working(server):
    """Such an item used to join the conversation and fail every later response.create."""
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        thin = {"type": "input_image", "image": b64(png_bytes(image_array(300, 1)))}
        short = {"type": "input_audio", "audio": b64(wav_bytes(tone_pcm16(0.003))), "format": "wav"}
        odd_rate = {"type": "input_audio", "audio": b64(tone_pcm16(0.3, rate=16001).tobytes()), "sample_rate": 16001}
        for part, code, param in ((thin, "invalid_image", "item.content[0]"),
                                  (short, "invalid_audio", "item.content[0].audio"),
                                  (odd_rate, "invalid_value", "item.content[0].sample_rate")):
            ws.send(json.dumps({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": [part]}}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and (ev["error"]["code"], ev["error"]["param"]) == (code, param), ev
        ws.send(json.dumps({"type": "session.update", "session": {"input_audio_sample_rate": 16001}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["param"] == "session.input_audio_sample_rate", ev
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        assert recv_json(ws)["type"] == "conversation.item.added"
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 1}}))
        events = recv_until(ws, "response.done")
        assert not [ev for ev in events if ev["type"] == "error"], events
        assert events[-1]["response"]["status"] != "failed", events[-1]


# --------------------------------------------------------------------------- token limits that disagree

def test_max_tokens_and_max_completion_tokens_must_agree(http):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10 ** 9,
                                                           "max_completion_tokens": 2}))
    assert err["code"] == "invalid_value" and "max_tokens" in err["message"] and \
        "max_completion_tokens" in err["message"], err
    r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "max_completion_tokens": 1})
    assert r.status_code == 200, r.text


def test_realtime_token_limits_must_agree(server):
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update",
                            "session": {"max_output_tokens": 5, "max_response_output_tokens": 7}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "invalid_value", ev
        assert ev["error"]["param"] == "session.max_output_tokens", ev
        ws.send(json.dumps({"type": "response.create",
                            "response": {"max_output_tokens": 5, "max_response_output_tokens": "inf"}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "invalid_value", ev
        assert ev["error"]["param"] == "response.max_output_tokens", ev


def test_realtime_sampling_errors_name_the_field_by_its_path(server):
    """A session's or a response's sampling setting out of range names session.<field> / response.<field>, as
    the other settings' errors do (the HTTP body's own fields go unprefixed)."""
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event, field, value in (("session.update", "temperature", 1e308), ("session.update", "top_p", -0.5),
                                    ("response.create", "stop", ["a"] * 50), ("response.create", "top_k", "x")):
            key = event.split(".")[0]
            ws.send(json.dumps({"type": event, key: {field: value}}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["param"] == f"{key}.{field}", ev


def test_realtime_takes_top_p_zero_as_openai_does(server):
    """top_p 0 (the most likely token only) is a setting a session keeps, and a response runs with it."""
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"top_p": 0, "temperature": 1}}))
        ev = recv_json(ws)
        assert ev["type"] == "session.updated" and ev["session"]["top_p"] == 0, ev
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        ws.send(json.dumps({"type": "response.create", "response": {"top_p": 0, "max_output_tokens": 2}}))
        done = recv_until(ws, "response.done")[-1]
        assert done["response"]["status"] in ("completed", "incomplete"), done


HUGE = 10 ** 4000  # JSON allows any number of digits; past float's range math.isfinite raised OverflowError


@pytest.mark.parametrize("field, code", [("temperature", "invalid_value"), ("top_p", "invalid_value"),
                                         ("max_tokens", "max_tokens_exceeded"), ("seed", "invalid_value"),
                                         ("repetition_penalty", "invalid_value")])
def test_a_number_too_large_for_a_float_is_a_bad_value_named_and_cut(http, field, code):
    """A 4001-digit integer in a numeric field was a 500 (OverflowError), after which the server dropped the
    connection; it is a bad value like 1e308, named, and not echoed whole."""
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, field: HUGE}))
    assert err["code"] == code and err["param"] == field, str(err)[:300]
    assert len(err["message"]) < 300 and "4,001 characters" in err["message"], err["message"][:300]
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/images/generations", {"prompt": "a", "steps": 1, "guidance": HUGE}, "guidance"),
    ("/v1/images/generations", {"prompt": "a", "steps": 1, "aspect": HUGE}, "aspect"),
    ("/v1/audio/speech", {"input": "", "task": "music", "music": {"genre": "a", "mood": "b", "instrument": "c",
                                                                  "theme": "d", "duration": HUGE}}, "music"),
])
def test_the_engines_own_refusals_of_a_huge_number_cut_it_too(http, path, body, param):
    """The image generator's and talker's checks (run up front by the server) quoted such a number whole: a
    4,000-digit error message. They cut it as the server's own refusals do."""
    err = error_of(http.post(path, json=body))
    assert err["param"] == param and len(err["message"]) < 300 and "4,001 characters" in err["message"], \
        (err["param"], err["message"][:300])


def test_realtime_numbers_too_large_for_a_float_are_bad_values_named(server):
    """The same number in a session's sampling, turn detection or video context setting was a server_error."""
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for session, param in (({"temperature": HUGE}, "session.temperature"),
                               ({"turn_detection": {"type": "server_vad", "threshold": HUGE}},
                                "session.turn_detection.threshold"),
                               ({"video": {"fps": HUGE}}, "session.video.fps")):
            ws.send(json.dumps({"type": "session.update", "event_id": "big", "session": session}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["code"] == "invalid_value", str(ev)[:300]
            assert ev["error"]["param"] == param and ev["error"]["event_id"] == "big", str(ev)[:300]
            assert len(ev["error"]["message"]) < 300, ev["error"]["message"][:300]


# --------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("field, value, code", [
    ("logit_bias", {"50256": -100}, "invalid_value"),  # (not one of the tiny model's tokens)
    ("logit_bias", {"the": -100}, "invalid_value"),
    ("reasoning_effort", "high", "unsupported_parameter"),
    ("reasoning_effort", "minimal", "unsupported_parameter"),
    ("service_tier", "flex", "unsupported_parameter"),
    ("top_logprobs", 3, "invalid_value"),  # (without logprobs: true, as OpenAI refuses it)
    ("prediction", {"type": "content", "content": "x"}, "unsupported_parameter"),
    ("web_search_options", {}, "unsupported_parameter"),
    ("verbosity", "low", "unsupported_parameter"),
    ("store", True, "unsupported_parameter"),
    ("tool_choice", "required", "unsupported_parameter"),
    ("tool_choice", 5, "invalid_type"),  # (was refused as a request for tool calling)
    ("function_call", True, "invalid_type"),
    ("frobnicate", 1, "unknown_parameter"),
    ("max_token", 5, "unknown_parameter"),
    ("max_tokens", "inf", "invalid_type"),  # realtime's "inf" (the server's cap) was taken here too
    ("max_completion_tokens", "inf", "invalid_type"),
    ("presence_penalty", 2.5, "invalid_value"),  # (OpenAI's range: -2 to 2)
    ("frequency_penalty", "x", "invalid_type"),
])
def test_chat_parameters_are_honoured_or_named_in_an_error(http, field, value, code):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, field: value}))
    assert err["code"] == code and err["param"] == field, err


@pytest.mark.parametrize("field, value, code", [
    ("functions", [{"name": "f", "parameters": {}}], "unsupported_parameter"),  # (was refused as 'tools')
    ("tools", [{"type": "function", "function": {"name": "f"}}], "unsupported_parameter"),
    ("tools", False, "invalid_type"), ("functions", {"name": "f"}, "invalid_type"),  # (false passed unread)
])
def test_a_tool_list_is_refused_naming_the_field_sent(http, field, value, code):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, field: value}))
    assert (err["code"], err["param"]) == (code, field), err
    assert http.post("/v1/chat/completions", json={**CHAT, field: []}).status_code == 200  # (asks for nothing)


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "tool_call_id": "c1", "content": "42"}, "messages[1].role"),  # (was invalid_value)
    ({"role": "function", "name": "f", "content": "42"}, "messages[1].role"),
    ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
     "messages[1].function_call"),  # (was named 'tool_calls')
])
def test_a_tool_message_is_refused_as_tool_calling(http, message, param):
    """A conversation replayed from a tool-calling client: its tool results and calls are refused as the `tools` list
    is, unsupported_parameter naming the field sent and saying there is no tool calling."""
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": [*CHAT["messages"], message]}))
    assert (err["code"], err["param"]) == ("unsupported_parameter", param) and "no tool calling" in err["message"], err


def test_a_realtime_tool_call_item_is_refused_as_tool_calling_not_as_an_unknown_field(server):
    """A function_call_output item (a conversation replayed from OpenAI) was refused as "unknown field
    'item.call_id'", which said nothing of what was wrong: this model has no tool calling. A session's or response's
    `tools: false` passed unread; it is not a list."""
    output = {"type": "function_call_output", "call_id": "c1", "output": "42"}
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event, param in (({"type": "conversation.item.create", "item": output}, "item.type"),
                             ({"type": "response.create", "response": {"conversation": "none", "input": [output]}},
                              "response.input[0].type")):
            ws.send(json.dumps(event))
            err = recv_json(ws)["error"]
            assert (err["code"], err["param"]) == ("unsupported_parameter", param) and "tool" in err["message"], err
        for tools, code in ((False, "invalid_type"), ({"type": "function"}, "invalid_type"),  # (false passed unread)
                            ([{"type": "function", "name": "f"}], "unsupported_parameter")):
            ws.send(json.dumps({"type": "session.update", "session": {"tools": tools}}))
            err = recv_json(ws)["error"]
            assert (err["code"], err["param"]) == (code, "session.tools"), err
        ws.send(json.dumps({"type": "response.create", "response": {"tools": False}}))
        assert recv_json(ws)["error"]["param"] == "response.tools"


def test_a_modality_named_twice_is_refused_naming_the_field(http, server):
    """`modalities: ["text", "text"]` was taken as ["text"]; in chat and a realtime response it is now refused."""
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "modalities": ["text", "text"]}))
    assert (err["code"], err["param"]) == ("invalid_value", "modalities") and "twice" in err["message"], err
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text", "text"]}}))
        err = recv_json(ws)["error"]
        assert (err["code"], err["param"]) == ("invalid_value", "response.output_modalities"), err


def test_reasoning_effort_none_asks_for_what_a_chat_does_and_is_accepted(http):
    """OpenAI's reasoning_effort "none" (GPT-5.1's default, which clients pass on) was refused though it asks for a
    reply without thinking, this server's default; beside our 'thinking': true it contradicts it, and says so."""
    r = http.post("/v1/chat/completions", json={**CHAT, "reasoning_effort": "none"})
    assert r.status_code == 200, r.text
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "reasoning_effort": "none", "thinking": True}))
    assert (err["code"], err["param"]) == ("invalid_value", "reasoning_effort") and "thinking" in err["message"], err


@pytest.mark.parametrize("message, code, param", [
    ({"role": "system", "content": "Be brief.", "colour": "red"}, "unknown_parameter", "messages[0].colour"),
    ({"role": "developer", "content": "Be brief.", "colour": "red"}, "unknown_parameter", "messages[0].colour"),
    ({"role": "system", "content": "Be brief.", "name": 5}, "invalid_type", "messages[0].name"),
    ({"role": "user", "content": "hi", "name": ["bob"]}, "invalid_type", "messages[0].name"),
    ({"role": "user", "content": []}, "invalid_value", "messages[0].content"),  # (was answered as an empty message)
    ({"role": "system", "content": []}, "invalid_value", "messages[0].content"),
])
def test_a_system_message_and_a_name_are_checked_as_a_user_message_is(http, message, code, param):
    """A system or developer message passed any field unread (a user message's unknown field was refused), a
    message's `name` (OpenAI's participant name, a string) passed whatever it was, and an empty list of parts was
    an empty message (OpenAI: "empty array"): each now a 400 naming the field."""
    messages = [message] + ([] if message["role"] == "user" else CHAT["messages"])
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}))
    assert (err["code"], err["param"]) == (code, param), err
    named = [{"role": "system", "content": "Be brief.", "name": "rules"}, {**CHAT["messages"][0], "name": "bob"}]
    assert http.post("/v1/chat/completions", json={**CHAT, "messages": named}).status_code == 200


@pytest.mark.parametrize("options, field", [
    ("usage", "stream_options"), ([True], "stream_options"),
    ({"include_usage": "false"}, "stream_options.include_usage"),
    ({"include_usage": 1}, "stream_options.include_usage")])
def test_stream_options_are_typed(http, options, field):
    """A string "false" for include_usage would be read as true: refused, naming the field."""
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options}))
    assert err["code"] == "invalid_type" and err["param"] == field, err


@pytest.mark.parametrize("fmt, code, param", [
    ({}, "missing_field", "response_format.type"),  # (was "must be one of ..., got 'None'")
    ({"type": "text", "json_schema": {"name": "x", "schema": {}}}, "unknown_parameter", "response_format.json_schema")])
def test_a_response_format_without_its_type_or_with_a_field_text_ignores_is_refused_naming_it(http, fmt, code, param):
    """{"type": "text", "json_schema": ...} was answered as if the schema held (it was dropped without a word)."""
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "response_format": fmt}))
    assert (err["code"], err["param"]) == (code, param), err


@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_a_stream_are_refused_as_openai_refuses_them(http, stream):
    """stream_options sent with stream false (or no stream) was taken and ignored; OpenAI answers 400 naming it."""
    body = {**CHAT, "stream_options": {"include_usage": True}} | ({} if stream is None else {"stream": stream})
    err = error_of(http.post("/v1/chat/completions", json=body))
    assert err["param"] == "stream_options" and "stream" in err["message"], err
    assert http.post("/v1/chat/completions", json={**CHAT, "stream": False, "stream_options": None}).status_code == 200


def test_openais_presence_and_frequency_penalties_are_honoured(http, tiny_engine):
    """They were refused when not 0 (unsupported_parameter), so an OpenAI client that sends them could not chat;
    the reply is the engine's with the same penalties (a negative presence penalty makes greedy repeat itself)."""
    msgs = CHAT["messages"]
    penalised = reference_chat(tiny_engine, msgs, 6, presence_penalty=-2.0, frequency_penalty=0.0)
    assert penalised.text != reference_chat(tiny_engine, msgs, 6).text
    r = http.post("/v1/chat/completions",
                  json={**CHAT, "max_tokens": 6, "presence_penalty": -2, "frequency_penalty": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == penalised.text


def test_logit_bias_is_honoured_and_its_token_ids_and_values_checked(http, tiny_engine):
    """OpenAI's logit_bias was refused unless empty; it is added to the named tokens' logits (100 forces a token,
    as OpenAI's does, greedy or not), and an id that is not one of the model's tokens or a bias past [-100, 100]
    is a 400 naming it."""
    _, second = reference_chat(tiny_engine, CHAT["messages"], 2).token_ids  # (greedy: `second` never first)
    r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "logit_bias": {str(second): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == tiny_engine.tokenizer.decode([second] * 3) != ""
    vocab = tiny_engine.tokenizer.vocab_size
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(vocab): 1}}))
    assert err["code"] == "invalid_value" and f"tokens are 0 to {vocab - 1}" in err["message"], err
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"5": 101}}))
    assert err["code"] == "invalid_value" and err["param"] == "logit_bias.5", err


def test_chat_parameters_that_have_no_effect_here_are_accepted(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "user": "u1", "metadata": {"a": "b"}, "store": False,
                                                "service_tier": "auto", "logit_bias": {}, "parallel_tool_calls": False,
                                                "tool_choice": "none", "safety_identifier": "x",
                                                "prompt_cache_key": "k"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, field, code", [
    ("/v1/audio/speech", {"input": "hello", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ("/v1/images/generations", {"prompt": "a teapot", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ("/v1/images/edits", {"prompt": "a teapot", "image": b64(PNG), "frobnicate": 1}, "frobnicate",
     "unknown_parameter"),
    ("/v1/audio/voices", {"name": "me", "reference_audio": b64(WAV), "frobnicate": 1}, "frobnicate",
     "unknown_parameter"),
])
def test_every_json_endpoint_names_fields_it_does_not_know(http, path, body, field, code):
    err = error_of(http.post(path, json=body))
    assert err["code"] == code and err["param"] == field, err


@pytest.mark.parametrize("data, field, code", [
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]", "unsupported_parameter"),
    ({"include[]": "segments"}, "include", "invalid_value"),  # (logprobs, its one value, is honoured)
    ({"include[]": "logprobs", "response_format": "text"}, "include", "unsupported_parameter"),
    ({"frobnicate": "1"}, "frobnicate", "unknown_parameter"),
    ({"language": "en\tfr"}, "language", "invalid_value"),  # (was a 400 from the engine, param null, after queueing)
    ({"language": "en\n"}, "language", "invalid_value"),
    ({"dialect": "上海\r\nx"}, "dialect", "invalid_value"),
])
def test_transcription_form_fields_are_honoured_or_named(http, data, field, code):
    err = error_of(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, data=data))
    assert err["code"] == code and err["param"] == field, err


def test_asking_for_timestamps_says_where_the_windows_times_are(http):
    """timestamp_granularities was refused with 'no timestamps are produced', while srt and vtt give a cue per 30 s
    window of a long recording: the refusal of word timestamps now says so. Segment timestamps, what Whisper clients
    ask verbose_json for, were refused too though verbose_json has a segment per window: they are taken there."""
    url, wav = "/v1/audio/transcriptions", {"file": ("a.wav", WAV)}
    for asked in (["word"], ["segment", "word"]):  # (each value is read, not the first only)
        err = error_of(http.post(url, files=wav, data={"timestamp_granularities[]": asked,
                                                        "response_format": "verbose_json"}))
        assert err["param"] == "timestamp_granularities[]" and "srt or vtt gives a cue per window" in err["message"]
    got = http.post(url, files=wav, data={"timestamp_granularities[]": "segment", "response_format": "verbose_json",
                                          "max_tokens": "2"})
    assert got.status_code == 200 and got.json()["segments"][0]["start"] == 0.0, got.text
    err = error_of(http.post(url, files=wav, data={"timestamp_granularities[]": "segment"}))  # json: no segments
    assert (err["code"], err["param"]) == ("invalid_value", "timestamp_granularities[]") and "verbose_json" in err[
        "message"]


def test_a_transcription_prompt_past_the_field_limit_is_refused_naming_the_limit(http):
    """A context pasted whole as `prompt` came back as "'prompt' is too long (200000 characters)": no limit said."""
    err = error_of(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, data={"prompt": "x" * 200_000}))
    assert err["param"] == "prompt" and err["message"] == "'prompt' is too long (200,000 characters; at most 100,000)"


def test_realtime_fields_are_honoured_or_named(server):
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event, code, param in (
                ({"type": "response.create", "response": {"tools": [{"type": "function", "name": "f"}]}},
                 "unsupported_parameter", "response.tools"),
                ({"type": "response.create", "response": {"frobnicate": 1}}, "unknown_parameter",
                 "response.frobnicate"),
                ({"type": "response.cancel", "frobnicate": 1}, "unknown_parameter", "frobnicate"),
                ({"type": "input_audio_buffer.append", "audio": b64(tone_pcm16(0.1).tobytes()), "rate": 16000},
                 "unknown_parameter", "rate"),
                ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": "x", "colour": "red"}},
                 "unknown_parameter", "item.colour")):
            ws.send(json.dumps(event))
            ev = recv_json(ws)
            assert ev["type"] == "error" and (ev["error"]["code"], ev["error"]["param"]) == (code, param), ev


def test_realtime_session_fields_without_effect_still_take_only_openais_values(server):
    """tracing, truncation and the noise reduction have no effect here, and took any value (42, "sometimes", a
    ratio of 7); a stored prompt and a tool_choice naming a tool were taken silently in a session although
    response.create refuses them. OpenAI's own values still pass."""
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for session, code, param in (
                ({"tracing": 42}, "invalid_type", "session.tracing"),
                ({"tracing": "sometimes"}, "invalid_value", "session.tracing"),
                ({"tracing": {"group_id": 7}}, "invalid_type", "session.tracing.group_id"),
                ({"tracing": {"colour": "red"}}, "unknown_parameter", "session.tracing.colour"),
                ({"truncation": "sometimes"}, "invalid_value", "session.truncation"),
                ({"truncation": {"type": "retention_ratio", "retention_ratio": 7}}, "invalid_value",
                 "session.truncation.retention_ratio"),
                ({"truncation": {"type": "cut", "retention_ratio": 0.5}}, "invalid_value", "session.truncation.type"),
                ({"truncation": {"type": "retention_ratio", "retention_ratio": 0.5,
                                 "token_limits": {"post_instructions": -1}}}, "invalid_value",
                 "session.truncation.token_limits.post_instructions"),
                ({"input_audio_noise_reduction": {"type": "loud"}}, "invalid_value",
                 "session.input_audio_noise_reduction.type"),
                ({"audio": {"input": {"noise_reduction": "on"}}}, "invalid_type", "session.audio.input.noise_reduction"),
                ({"prompt": {"id": "pmpt_1"}}, "unsupported_parameter", "session.prompt"),
                ({"tool_choice": "required"}, "unsupported_parameter", "session.tool_choice"),
                ({"tool_choice": 5}, "invalid_type", "session.tool_choice")):
            ws.send(json.dumps({"type": "session.update", "session": session}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and (ev["error"]["code"], ev["error"]["param"]) == (code, param), (session, ev)
        ws.send(json.dumps({"type": "session.update", "session": {
            "tracing": {"workflow_name": "demo", "group_id": "g", "metadata": {"a": 1}}, "tool_choice": "auto",
            "truncation": {"type": "retention_ratio", "retention_ratio": 0.8, "token_limits": {"post_instructions": 5}},
            "input_audio_noise_reduction": {"type": "far_field"}, "prompt": None}}))
        assert recv_json(ws)["type"] == "session.updated"
        for session in ({"tracing": "auto", "truncation": "disabled"}, {"tracing": None, "truncation": "auto"}):
            ws.send(json.dumps({"type": "session.update", "session": session}))
            assert recv_json(ws)["type"] == "session.updated"


# --------------------------------------------------------------------------- model ids

@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4o-2024-08-06", "default"])
def test_chat_takes_the_served_model_and_openais_chat_aliases(http, server, model):
    r = http.post("/v1/chat/completions", json={**CHAT, "model": model})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == server.ctx.model_id  # the answer names what served it


@pytest.mark.parametrize("path, body, files, model", [
    ("/v1/audio/transcriptions", None, {"file": ("a.wav", WAV)}, "whisper-1"),
    ("/v1/audio/transcriptions", None, {"file": ("a.wav", WAV)}, "gpt-4o-mini-transcribe"),
    ("/v1/audio/translations", None, {"file": ("a.wav", WAV)}, "whisper-1"),
    ("/v1/audio/speech", {"input": "hi", "max_seconds": 0.5}, None, "gpt-4o-mini-tts"),
    ("/v1/audio/speech", {"input": "hi", "max_seconds": 0.5}, None, "tts-1"),
    ("/v1/images/generations", {"prompt": "a teapot", "steps": 1, "size": "16x16"}, None, "gpt-image-1"),
])
def test_each_endpoint_takes_openais_aliases_for_its_own_kind_of_model(http, path, body, files, model):
    if files:
        r = http.post(path, files=files, data={"model": model, "max_tokens": "2"})
    else:
        r = http.post(path, json={**body, "model": model})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, files, model", [
    ("/v1/chat/completions", CHAT, None, "whisper-1"),
    ("/v1/chat/completions", CHAT, None, "gpt-9"),
    ("/v1/audio/transcriptions", None, {"file": ("a.wav", WAV)}, "gpt-4o-mini"),
    ("/v1/audio/translations", None, {"file": ("a.wav", WAV)}, "gpt-9"),
    ("/v1/audio/speech", {"input": "hi"}, None, "whisper-1"),
    ("/v1/images/generations", {"prompt": "a teapot"}, None, "tts-1"),
])
def test_other_model_ids_are_refused_naming_the_served_one(http, server, path, body, files, model):
    r = http.post(path, files=files, data={"model": model}) if files else http.post(path, json={**body, "model": model})
    err = error_of(r, 404)
    assert err["code"] == "model_not_found" and server.ctx.model_id in err["message"] and model in err["message"]


LONG = "m" * 10_000


@pytest.mark.parametrize("method, path, body, param", [
    ("POST", "/v1/chat/completions", {**CHAT, "model": LONG}, "model"),
    ("GET", "/v1/models/" + LONG, None, "model"),
    ("POST", "/v1/chat/completions", {**CHAT, "modalities": [LONG]}, "modalities"),
    ("POST", "/v1/chat/completions", chat_part({"type": LONG}), "messages[0].content[0].type"),
    ("POST", "/v1/chat/completions", chat_part({"type": "input_audio", "input_audio": {"data": b64(WAV), "format": LONG}}),
     "messages[0].content[0].input_audio.data"),
    ("POST", "/v1/audio/speech", {"input": "hi", "task": LONG}, "task"),
    ("DELETE", "/v1/audio/voices/" + LONG, None, "name"),
])
def test_long_client_values_are_cut_where_an_error_echoes_them(http, method, path, body, param):
    """A 10,000-character model id, modality, part type, audio format, speech task or voice name came back
    whole in the error message (the speech task's with param null)."""
    r = http.request(method, path, json=body)
    assert r.status_code in (400, 404), r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and len(err["message"]) < 1000, (len(err["message"]), err["param"])
    assert "10,000 characters" in err["message"] or "too long" in err["message"], err["message"][:200]


def test_realtime_long_values_are_cut_where_an_error_echoes_them(server):
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for session, param in (({"model": LONG}, "model"), ({"output_modalities": [LONG]}, "session.output_modalities")):
            ws.send(json.dumps({"type": "session.update", "session": session}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["param"] == param, str(ev)[:300]
            assert len(ev["error"]["message"]) < 1000, len(ev["error"]["message"])


def test_a_realtime_event_id_is_bounded_before_any_error_echoes_it(server):
    """An event's event_id is echoed in every error event it causes: one of 3,000,000 characters came back
    whole (3 MB out per event in, held in the session's outgoing queue while the client does not read)."""
    with connect(server.ws_url, max_size=None) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for kind in ("no.such.event", "input_audio_buffer.clear"):
            ws.send(json.dumps({"type": kind, "event_id": "e" * 3_000_000}))
            raw = ws.recv(timeout=30)
            assert len(raw) < 2000, len(raw)
            ev = json.loads(raw)
            assert ev["type"] == "error" and ev["error"]["code"] == "invalid_value", ev
            assert ev["error"]["param"] == "event_id" and ev["error"]["event_id"] is None
        ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "e" * 512}))
        assert recv_json(ws)["type"] == "input_audio_buffer.cleared"  # (512 characters are fine)


def test_a_multipart_header_over_the_parser_limit_says_so(http):
    """A file name of 9,000 characters was refused as "Invalid multipart data."."""
    r = http.post("/v1/audio/transcriptions", files={"file": ("a" * 9000 + ".wav", WAV)})
    err = error_of(r)
    assert err["code"] == "invalid_multipart" and "header" in err["message"] and "file name" in err["message"], err
    assert len(err["message"]) < 300, err


def test_realtime_model_ids(server):
    with connect(server.ws_url + "?model=gpt-realtime") as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"model": "gpt-4o-realtime-preview"}}))
        assert recv_json(ws)["type"] == "session.updated"
        ws.send(json.dumps({"type": "session.update", "session": {"model": "whisper-1"}}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["error"]["code"] == "model_not_found", ev
    with pytest.raises(InvalidStatus) as info:
        connect(server.ws_url + "?model=some-other-model").close()
    assert info.value.response.status_code == 404
    assert json.loads(info.value.response.body)["error"]["code"] == "model_not_found"


IMG_URL = "data:image/png;base64," + b64(PNG)


@pytest.mark.parametrize("messages, extra, code, param", [
    ([{"role": "user", "content": "hi", "colour": "red"}], {}, "unknown_parameter", "messages[0].colour"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi", "colour": "red"}]}], {}, "unknown_parameter",
     "messages[0].content[0].colour"),
    ([{"role": "system", "content": [{"type": "text", "text": "be", "colour": "red"}]},
      {"role": "user", "content": "hi"}], {}, "unknown_parameter", "messages[0].content[0].colour"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG_URL, "detail": "ultra"}}]}], {},
     "invalid_value", "messages[0].content[0].image_url.detail"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG_URL, "colour": 1}}]}], {},
     "unknown_parameter", "messages[0].content[0].image_url.colour"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}], {},
     "missing_field", "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav",
                                                                          "colour": 1}}]}], {},
     "unknown_parameter", "messages[0].content[0].input_audio.colour"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"uri": "data:video/mp4;base64,AAAA"}}]}], {},
     "unknown_parameter", "messages[0].content[0].video_url.uri"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "audio": {"id": "audio_1"}, "content": "b"},
      {"role": "user", "content": "c"}], {}, "unsupported_parameter", "messages[1].audio"),
])
def test_nested_fields_are_honoured_or_named_too(http, messages, extra, code, param):
    """Fields inside a message, a content part, an image_url or input_audio object were silently ignored
    (a typo'd 'detail' or a misplaced field gave no sign); they are checked as the top level is."""
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": messages, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err


def test_openais_nested_fields_that_have_no_effect_here_are_accepted(http):
    messages = [{"role": "system", "content": "Be brief.", "name": "policy"},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": IMG_URL, "detail": "low"}}]},
                {"role": "assistant", "content": "a cup", "refusal": None, "tool_calls": []},
                {"role": "user", "content": [{"type": "input_audio",
                                              "input_audio": {"data": b64(WAV), "format": "wav"}}]}]
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 200, r.text


def test_an_assistant_refusal_part_is_read_as_what_the_assistant_said():
    """OpenAI's assistant content may be a refusal part ({"type": "refusal", "refusal": ...}), which a client
    replaying a conversation sends back; it was refused ('assistant messages may hold text only')."""
    from tests.server import FakeEngine, fake_server

    engine = FakeEngine()
    messages = [{"role": "user", "content": "do the thing"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't do that."}]},
                {"role": "user", "content": "why not?"}]
    with fake_server(engine) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
        assert r.status_code == 200, r.text
        assert engine.calls[-1]["messages"][1] == {"role": "assistant",
                                                   "content": [{"type": "text", "text": "I can't do that."}]}
        bad = [{**messages[1], "content": [{"type": "refusal", "refusal": 5}]}]
        err = error_of(httpx.post(srv.url + "/v1/chat/completions", json={"messages": [messages[0], *bad,
                                                                                        messages[2]]}, timeout=30))
        assert (err["code"], err["param"]) == ("invalid_type", "messages[1].content[0].refusal"), err
    from engine.server.text import text_chars

    assert text_chars(messages[1]["content"]) == len("I can't do that.")  # held to the text limits as text


def test_an_assistant_message_with_both_content_and_a_refusal_keeps_both():
    """An assistant message holding `content` and `refusal` reached the model with its content only, the refusal
    dropped silently; both are now what the assistant said, its content then the refusal as one more part (joined as
    a message's text parts are), and a refusal that is not a string is refused naming it."""
    from engine.server.codec import TEXT_PART_SEPARATOR
    from tests.server import FakeEngine, fake_server

    engine = FakeEngine()
    ask, again = {"role": "user", "content": "do two things"}, {"role": "user", "content": "why?"}
    said = [{"role": "assistant", "content": "Here is the first. ", "refusal": "I can't do the second."},
            {"role": "assistant", "content": [{"type": "text", "text": "Here is the first. "}],
             "refusal": "I can't do the second."}]
    with fake_server(engine) as srv:
        for assistant in said:
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [ask, assistant, again]}, timeout=30)
            assert r.status_code == 200, r.text
            assert engine.calls[-1]["messages"][1]["content"] == [
                {"type": "text", "text": f"Here is the first. {TEXT_PART_SEPARATOR}I can't do the second."}]
        err = error_of(httpx.post(srv.url + "/v1/chat/completions", json={"messages": [
            ask, {**said[0], "refusal": 5}, again]}, timeout=30))
        assert (err["code"], err["param"]) == ("invalid_type", "messages[1].refusal"), err


def test_realtime_nested_fields_are_honoured_or_named(server):
    with connect(server.ws_url) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for event, code, param in (
                ({"type": "session.update", "session": {"audio": {"input": {"colour": 1}}}}, "unknown_parameter",
                 "session.audio.input.colour"),
                ({"type": "session.update", "session": {"audio": {"inptu": {}}}}, "unknown_parameter",
                 "session.audio.inptu"),
                ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                    {"type": "input_image", "image_url": IMG_URL, "detail": "huge"}]}}, "invalid_value",
                 "item.content[0].detail"),
                ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "hi", "colour": 1}]}}, "unknown_parameter",
                 "item.content[0].colour")):
            ws.send(json.dumps(event))
            ev = recv_json(ws)
            assert ev["type"] == "error" and (ev["error"]["code"], ev["error"]["param"]) == (code, param), ev
        ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "whisper-1"}, "noise_reduction": {"type": "near_field"}}}}}))
        assert recv_json(ws)["type"] == "session.updated"  # OpenAI's, no effect here
        ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": IMG_URL, "detail": "auto"},
            {"type": "input_audio", "audio": b64(tone_pcm16(0.3).tobytes()), "transcript": None}]}}))
        assert recv_item(ws)["item"]["role"] == "user"


def test_a_session_counts_its_videos_by_their_decoded_size(tiny_engine, tmp_path):
    """Each realtime item is charged by its decoded size, but the session's total counted a video by its
    encoded bytes (a few KB), so a session could hold any number of videos that every response decodes
    (1.5 MiB each here, 75 MiB for a real clip). The total now counts them as the engine decodes them."""
    small = mp4_bytes(tmp_path, 64, 48)  # a few KB, decoded to 1.5 MiB at the model's least size
    item = {"type": "message", "role": "user", "content": [{"type": "input_video", "video": b64(small)}]}
    with running_server(tiny_engine, max_session_media_bytes=4 * 1024 * 1024) as srv:
        with connect(srv.ws_url, max_size=None) as ws:
            assert recv_json(ws)["type"] == "session.created"
            for i in range(2):
                ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                recv_item(ws)
            ws.send(json.dumps({"type": "conversation.item.create", "item": item, "event_id": "third"}))
            err = recv_json(ws)
            assert err["type"] == "error" and err["error"]["code"] == "session_media_limit", err
            assert err["error"]["event_id"] == "third"


def test_requests_in_line_and_sessions_share_the_servers_media_limit(tiny_engine):
    """Up to 256 requests could wait in line, each holding up to 512 MiB of decoded pictures: the line
    itself could take 128 GiB. Requests waiting or running and the realtime sessions' conversations now
    share max_total_media_bytes: past it a request is refused with server_media_limit (503, Retry-After)."""
    mib = 1024 * 1024
    black = png_bytes(np.zeros((1000, 1000, 3), np.uint8))  # a few KB, 2.9 MiB decoded

    def chat(n):
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(black)}}] * n
        return {"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    with running_server(tiny_engine, max_total_media_bytes=5 * mib) as srv:
        ok = httpx.post(srv.url + "/v1/chat/completions", json=chat(1), timeout=60)
        assert ok.status_code == 200, ok.text  # 2.9 MiB: fits, and is let go when it finishes
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(2), timeout=60)
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
        assert r.json()["error"]["code"] == "server_media_limit"
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat(1), timeout=60).status_code == 200
        from engine.server.sessions import Item
        session = srv.app.state.ctx.sessions.create()  # a realtime conversation holding 2.9 MiB
        session.add_item(Item("item_x", "user", [{"type": "image", "image": np.zeros((1000, 1000, 3), np.uint8)}], []))
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(1), timeout=60)  # 2.9 + 2.9 > 5
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_media_limit", r.text


def test_image_and_speech_requests_in_line_count_against_the_servers_media_limit(tiny_engine):
    """Only chat requests were charged to max_total_media_bytes: 256 image edits of eight 16-megapixel
    pictures each could wait in line holding 98 GB of decoded pixels. An image request's decoded pictures,
    a speech request's reference clips and a transcription's decoded recording now count too (503 server_media_limit
    past it, and let go when done)."""
    mib = 1024 * 1024
    black = png_bytes(np.zeros((1000, 1000, 3), np.uint8))  # 2.9 MiB decoded
    with running_server(tiny_engine, max_total_media_bytes=5 * mib) as srv:
        def edit(n):
            return httpx.post(srv.url + "/v1/images/edits", timeout=60, data={"prompt": "red", "steps": "1"},
                              files=[("image[]", (f"{i}.png", black, "image/png")) for i in range(n)])
        assert edit(1).status_code == 200
        r = edit(2)  # 5.7 MiB
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_media_limit", r.text
        assert edit(1).status_code == 200  # the first one's pictures were let go
    clip = wav_bytes(tone_pcm16(3.0))  # 94 KiB held until the talker reads it
    with running_server(tiny_engine, max_total_media_bytes=64 * 1024) as srv:
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "hi", "reference_audio": b64(clip)}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_media_limit", r.text
        # a transcription's recording, decoded (188 KiB of float32 here; 30 minutes at 48 kHz: 330 MiB), counts too
        r = httpx.post(srv.url + "/v1/audio/transcriptions", files={"file": ("a.wav", clip)}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_media_limit", r.text


def test_a_body_or_event_of_millions_of_tiny_values_is_refused_before_it_is_parsed(tiny_engine):
    """json.loads holds the event loop for the whole parse, ~1 s per million values: one 28 MB body of
    2.5 M tiny values stalled /health, every stream and every realtime session for 2.5 s. A body or realtime
    event with more than max_json_values values (counted by commas) is refused unparsed, naming the limit;
    a body with a long text of that many commas is as refused (it would not fit the context either), and a
    large base64 picture (no commas) is not."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "metadata": {"x": [0] * 2000}}
    with running_server(tiny_engine, max_json_values=1000) as srv:
        for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/audio/speech"):
            r = httpx.post(srv.url + path, json=body, timeout=60)
            assert r.status_code == 413, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "too_many_json_values" and "1000" in err["message"], err
        picture = png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8))  # ~160 KB
        ok = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(picture)}}]}], "max_tokens": 1}
        assert httpx.post(srv.url + "/v1/chat/completions", json=ok, timeout=60).status_code == 200
        with connect(srv.ws_url) as ws:
            assert recv_json(ws)["type"] == "session.created"
            ws.send(json.dumps({"type": "session.update", "event_id": "e1", "session": {"x": [0] * 2000}}))
            ev = recv_json(ws)
            assert ev["type"] == "error" and ev["error"]["code"] == "too_many_json_values", ev
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert recv_json(ws)["type"] == "input_audio_buffer.cleared"  # the session keeps serving
