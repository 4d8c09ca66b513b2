"""/v1/audio/speech, the voice library and the speech options against the tiny engine: every file
format's header read back (true rate), the SSE and raw streams, OpenAI's own client, cancellation,
and bad input (each a 400 with a stable code, never a 500 or a hung stream)."""

from __future__ import annotations

import base64
import io
import json
import re
import time
import wave

import av
import httpx
import numpy as np
import openai
import pytest

from engine.server.audio_out import read_wav_header
from tests.server import (FakeEngine, draw_until_cancelled, fake_server, leave_stream_at, running_server, sse_events,
                          wav_bytes)

RATE = 44100
TEXT = "Hello world, this is Ming speaking."


def wav_clip(seconds: float, rate: int, channels: int = 1, level: float = 0.3) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = level * np.sin(2 * np.pi * 220 * t)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.repeat(x[:, None], channels, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_request_bytes=4_000_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "aac", "opus"])
def test_every_file_format_states_the_true_rate(http, fmt):
    body = {"input": TEXT, "seed": 1, "max_seconds": 1.5}
    pcm = np.frombuffer(http.post("/v1/audio/speech", json={**body, "response_format": "wav"}).content[44:], "<i2")
    r = http.post("/v1/audio/speech", json={**body, "response_format": fmt})
    assert r.status_code == 200, r.text
    with av.open(io.BytesIO(r.content)) as f:
        stream = f.streams.audio[0]
        decoded = np.concatenate([frame.to_ndarray().reshape(-1) for frame in f.decode(stream)])
        rate = stream.codec_context.sample_rate
    assert rate == (48000 if fmt == "opus" else RATE)  # Opus codes 48 kHz only (documented)
    assert r.headers["x-sample-rate"] == str(rate)
    assert len(decoded) / rate == pytest.approx(len(pcm) / RATE, abs=0.06)  # codec padding at most
    if fmt in ("wav", "flac"):  # lossless: the very samples
        assert np.array_equal(decoded, pcm)
    assert r.headers["content-type"] == {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg",
                                         "aac": "audio/aac", "opus": "audio/ogg"}[fmt]
    if fmt == "wav":
        h = read_wav_header(r.content)
        assert (h["sample_rate"], h["channels"], h["bits"], h["byte_rate"]) == (RATE, 1, 16, 2 * RATE)
        assert h["data_len"] == len(r.content) - 44 and h["riff_size"] == len(r.content) - 8


def test_pcm_is_openais_24_khz_and_the_answer_says_its_rate(http):
    """OpenAI's `pcm` is 24 kHz 16-bit mono, and raw samples have no header to say so: a client could only guess
    (the talker's own rate is 44.1 kHz). The pcm answer, whole or streamed, is at 24 kHz, as long as the wav made
    at the talker's rate, and its X-Sample-Rate header says 24000."""
    body = {"input": TEXT, "seed": 1, "max_seconds": 1.0}
    wav = http.post("/v1/audio/speech", json={**body, "response_format": "wav"})
    whole = http.post("/v1/audio/speech", json={**body, "response_format": "pcm"})
    streaming = {**body, "response_format": "pcm", "stream_format": "audio"}
    with http.stream("POST", "/v1/audio/speech", json=streaming) as s:
        streamed, head = s.read(), s.headers
    assert wav.headers["x-sample-rate"] == str(RATE)
    assert whole.headers["x-sample-rate"] == head["x-sample-rate"] == "24000" and streamed == whole.content
    assert len(whole.content) / 2 / 24000 == pytest.approx((len(wav.content) - 44) / 2 / RATE, abs=0.01)


def test_a_request_naming_no_format_gets_mp3_as_from_openai(http, server):
    """OpenAI's speech answers mp3 when no response_format is named (its SDK's `speech.create(...)` then saves
    speech.mp3); this server answered wav. It now answers an mp3 file (audio/mpeg) at the talker's true rate; a
    stream naming no format still carries wav, the one format it can send as it is made."""
    body = {"input": TEXT, "seed": 1, "max_seconds": 1.5}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg", r.text
    with av.open(io.BytesIO(r.content)) as f:
        stream = f.streams.audio[0]
        assert (f.format.name, stream.codec_context.sample_rate) == ("mp3", RATE)
        assert stream.codec_context.name.startswith("mp3")  # (PyAV's decoder: mp3float)
        seconds = sum(frame.samples for frame in f.decode(stream)) / RATE
    wav = http.post("/v1/audio/speech", json={**body, "response_format": "wav"}).content
    assert seconds == pytest.approx((len(wav) - 44) / 2 / RATE, abs=0.06)  # the same speech (codec padding at most)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        data = client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.").content
    with av.open(io.BytesIO(data)) as f:  # what OpenAI's SDK saves as speech.mp3
        assert f.format.name == "mp3"
    with http.stream("POST", "/v1/audio/speech", json={**body, "stream_format": "audio"}) as s:
        assert s.headers["content-type"] == "audio/wav" and read_wav_header(s.read())["sample_rate"] == RATE


def test_streams_sse_and_raw_audio_as_it_is_made(http):
    body = {"input": TEXT, "seed": 3}
    whole = http.post("/v1/audio/speech", json={**body, "response_format": "wav"}).content[44:]  # the true rate's
    with http.stream("POST", "/v1/audio/speech", json={**body, "response_format": "pcm", "stream_format": "sse"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    deltas = [e for e in events if isinstance(e, dict) and e["type"] == "speech.audio.delta"]
    done = events[-1]
    assert len(deltas) >= 2 and all(d["sample_rate"] == RATE for d in deltas) and deltas[0]["text"].startswith("Hello")
    assert b"".join(base64.b64decode(d["audio"]) for d in deltas) == whole  # same seed, same audio
    assert done["type"] == "speech.audio.done" and done["usage"]["output_tokens"] > 0
    assert done["result"]["sample_rate"] == RATE and done["metrics"]["time_to_first_audio_ms"] > 0
    assert events[0].startswith(": queue_position")
    with http.stream("POST", "/v1/audio/speech", json={**body, "stream_format": "audio"}) as r:
        pieces = list(r.iter_bytes())
    # a reverse proxy (nginx) must pass the sound on as it comes, as it passes the SSE streams
    assert r.headers["x-accel-buffering"] == "no" and r.headers["cache-control"] == "no-cache"
    data = b"".join(pieces)
    h = read_wav_header(data)
    assert h["sample_rate"] == RATE and h["data_len"] == 0xFFFFFFFF and data[44:] == whole  # a streaming header
    with http.stream("POST", "/v1/audio/speech", json={**body, "response_format": "wav", "stream_format": "sse"}) as r:
        first = base64.b64decode(next(e for e in sse_events(r) if isinstance(e, dict))["audio"])
    assert read_wav_header(first)["sample_rate"] == RATE  # wav over SSE: the deltas join into a WAV file


def test_openais_own_client_reads_it(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        wav_bytes = client.audio.speech.create(model="default", voice="default", input=TEXT,
                                               response_format="wav").content
        assert read_wav_header(wav_bytes)["sample_rate"] == RATE
        with client.audio.speech.with_streaming_response.create(model="default", voice="default", input=TEXT,
                                                                response_format="pcm", stream_format="sse") as resp:
            kinds = [json.loads(line[6:])["type"] for line in resp.iter_lines()
                     if line.startswith("data: {")]
        assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}


@pytest.mark.parametrize("body, code, words", [
    ({"input": ""}, "invalid_request", "empty"),
    ({"input": "？！…… 😀"}, "invalid_request", "nothing to speak"),
    ({"input": "x" * 50_000}, "invalid_value", "at most 10,000"),
    ({"input": "hi", "voice": "nobody"}, "voice_not_found", "saved voices"),
    ({"input": "hi", "dialect": "klingon"}, "invalid_request", "cantonese"),
    ({"input": "hi", "emotion": "grumpy", "stream_format": "sse"}, "invalid_request", "happy"),
    ({"input": "hi", "instruct": "emotion=grumpy"}, "invalid_request", "happy"),
    ({"input": "hi", "task": "opera"}, "invalid_value", "tts, sound, music, podcast"),
    ({"input": "hi", "response_format": "ogg"}, "unsupported_parameter", "wav, pcm, flac"),
    ({"input": "hi", "response_format": ["wav"]}, "unsupported_parameter", "wav, pcm, flac"),  # was a 500
    ({"input": "hi", "response_format": {"type": "wav"}}, "unsupported_parameter", "wav, pcm, flac"),
    ({"input": "hi", "response_format": "mp3", "stream_format": "audio"}, "unsupported_parameter", "whole file"),
    ({"input": "hi", "stream_format": "chunks"}, "invalid_value", "sse"),
    ({"input": "hi", "speed": 9}, "invalid_value", "speed"),
    ({"input": "hi", "reference_audio": "!!!"}, "invalid_base64", "base64"),
    ({"input": "hi", "reference_audio": b64(b"RIFF\0\0\0\0WAVEjunk")}, "invalid_audio", "corrupt"),
    ({"input": "hi", "reference_audio": b64(wav_clip(1.0, 16000, level=0.0))}, "invalid_media", "silent"),
    ({"input": "hi", "reference_audio": b64(wav_clip(0.2, 16000))}, "invalid_media", "too short"),
    ({"input": "hi", "reference_audio": b64(wav_clip(31.0, 8000))}, "invalid_media", "too long"),
    ({"input": "hi", "max_seconds": -1}, "invalid_value", "max_seconds"),
    ({"input": 5}, "invalid_type", "string"),
    ({"task": "music", "music": {"colour": "red"}}, "unknown_parameter", "music.colour"),
])
def test_bad_input_is_a_400_naming_what_is_valid(http, body, code, words):
    r = http.post("/v1/audio/speech", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == code and words in err["message"], r.text


def test_free_text_instructions_with_a_cloned_voice_are_refused_naming_the_field(http):
    """OpenAI's `instructions` as free text is a voice design here (a new voice): with a reference clip it came back
    as a 400 naming no field ('param': null). It names 'instructions' and says how to give the manner instead."""
    clip = b64(wav_clip(1.0, 16000))
    r = http.post("/v1/audio/speech", json={"input": "hi", "reference_audio": clip, "reference_text": "hello",
                                            "instructions": "Speak in a cheerful and positive tone."})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "instructions" and "emotion=happy" in err["message"], r.text


def test_a_lone_surrogate_is_refused_like_chat_text(http):
    r = http.post("/v1/audio/speech", content=b'{"input": "\\ud800abc"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]


def test_reference_clips_of_any_rate_and_channel_count_clone(http):
    for rate, channels in ((8000, 1), (48000, 2), (44100, 6)):
        clip = "data:audio/wav;base64," + b64(wav_clip(1.0, rate, channels))
        r = http.post("/v1/audio/speech", json={"input": "Hello again.", "reference_text": "hello", "max_seconds": 1,
                                                "response_format": "wav", "reference_audio": clip})
        assert r.status_code == 200 and read_wav_header(r.content)["sample_rate"] == RATE, r.text


def test_a_stereo_reference_with_the_voice_on_its_right_channel_clones(http):
    """Channel 0 of a reference was all that was read: a stereo clip with the voice on its right channel only was a
    400 'is silent'. Its channels are mixed down, at the check and in the talker."""
    pcm = np.frombuffer(wav_clip(1.0, 16000)[44:], "<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.stack([np.zeros_like(pcm), pcm], axis=1).tobytes())
    r = http.post("/v1/audio/speech", json={"input": "Hello again.", "reference_text": "hello", "max_seconds": 0.2,
                                            "response_format": "wav", "reference_audio": b64(buf.getvalue())})
    assert r.status_code == 200, r.text


def test_voice_library_round_trip(http):
    clip = wav_clip(1.5, 22050)
    r = http.post("/v1/audio/voices", files={"file": ("v.wav", clip)}, data={"name": "narrator",
                                                                            "reference_text": "hello there"})
    assert r.status_code == 201 and "ref_text_from_asr" not in r.json(), r.text
    # a transcript left blank (an empty form field) is one not given: our ASR writes it (it was a 400, param null)
    r = http.post("/v1/audio/voices", json={"name": "asr voice", "reference_audio": b64(clip), "reference_text": " "})
    assert r.status_code == 201 and r.json()["ref_text_from_asr"] == r.json()["reference_text"], r.text
    names = [v["name"] for v in http.get("/v1/audio/voices").json()["data"]]
    assert {"narrator", "asr voice"} <= set(names)
    # a name picked twice does not lose the first voice: 409 unless the request says replace
    r = http.post("/v1/audio/voices", json={"name": "narrator", "reference_audio": b64(clip), "reference_text": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "voice_exists", r.text
    r = http.post("/v1/audio/voices", files={"file": ("v.wav", clip)}, data={"name": "narrator", "reference_text": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "voice_exists", r.text
    assert [v for v in http.get("/v1/audio/voices").json()["data"] if v["name"] == "narrator"][0]["reference_text"] \
        == "hello there"
    r = http.post("/v1/audio/voices", files={"file": ("v.wav", clip)},
                  data={"name": "narrator", "reference_text": "replaced", "replace": "true"})
    assert r.status_code == 201 and r.json()["reference_text"] == "replaced", r.text
    r = http.post("/v1/audio/voices", json={"name": "narrator", "reference_audio": b64(clip), "reference_text": "again",
                                            "replace": True})
    assert r.status_code == 201 and r.json()["reference_text"] == "again", r.text
    r = http.post("/v1/audio/voices", json={"name": "narrator", "reference_audio": b64(clip), "replace": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "replace", r.text
    r = http.post("/v1/audio/speech", json={"input": "Reusing the saved voice.", "voice": "narrator", "max_seconds": 1})
    assert r.status_code == 200
    assert http.delete("/v1/audio/voices/narrator").json()["deleted"] is True
    assert http.delete("/v1/audio/voices/asr%20voice").status_code == 200
    r = http.delete("/v1/audio/voices/narrator")  # (already deleted: the resource the path names is not found)
    assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"
    r = http.post("/v1/audio/voices", json={"name": "../etc", "reference_audio": b64(clip)})
    assert r.status_code == 400 and "invalid voice name" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, body, files, param", [
    ("/v1/audio/speech", {"input": "hi", "voice": "../../etc/passwd"}, None, "voice"),
    ("/v1/audio/speech", {"input": "hi", "voice": "a\u0000b"}, None, "voice"),
    ("/v1/audio/speech", {"input": "hi", "voice": "someone", "reference_audio": b64(wav_clip(1.0, 16000))}, None,
     "voice"),
    ("/v1/audio/speech", {"input": "hi", "reference_audio": b64(wav_clip(0.2, 16000))}, None, "reference_audio"),
    ("/v1/audio/speech", {"input": "hi", "reference_audio": [b64(wav_clip(1.0, 16000)), b64(wav_clip(1.0, 8000,
                                                                                               level=0.0))]},
     None, "reference_audio[1]"),
    ("/v1/audio/voices", {"name": "../x", "reference_audio": b64(wav_clip(1.0, 16000))}, None, "name"),
    ("/v1/audio/voices", {"name": "default", "reference_audio": b64(wav_clip(1.0, 16000))}, None, "name"),
    ("/v1/audio/voices", {"name": "ok name", "reference_audio": b64(wav_clip(0.2, 16000))}, None, "reference_audio"),
    ("/v1/audio/voices", {"name": "a/b", "reference_text": "hi"}, {"file": ("v.wav", wav_clip(1.0, 16000))}, "name"),
    ("/v1/audio/voices", {"name": "ok name", "reference_text": "hi"}, {"file": ("v.wav", wav_clip(0.2, 16000))},
     "file"),
    ("/v1/audio/speech", {"input": "hi", "reference_audio": b64(wav_clip(1.0, 16000)), "reference_text": "..."}, None,
     "reference_text"),
    ("/v1/audio/voices", {"name": "ok name", "reference_text": "?!"}, {"file": ("v.wav", wav_clip(1.0, 16000))},
     "reference_text"),
])
def test_voice_names_and_reference_clips_are_refused_naming_the_field(http, path, body, files, param):
    """These were refused by the engine with param null (a voice name, a clip too short or silent, a voice and
    a clip together)."""
    r = http.post(path, data=body, files=files) if files else http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_voice_name_with_a_leading_dot_is_refused_it_would_be_saved_but_never_listed(http):
    r = http.post("/v1/audio/voices", json={"name": ".hidden", "reference_audio": b64(wav_clip(1.0, 16000)),
                                            "reference_text": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    r = http.post("/v1/audio/voices", json={"name": "twice", "reference_audio": b64(wav_clip(1.0, 16000)),
                                            "reference_text": "hi"})
    assert r.status_code == 201, r.text
    r = http.post("/v1/audio/voices", json={"name": "twice", "reference_audio": b64(wav_clip(1.0, 16000)),
                                            "reference_text": "hi"})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text
    assert http.delete("/v1/audio/voices/twice").status_code == 200


def test_options_list_what_the_voice_tab_offers(http):
    opts = http.get("/v1/audio/speech/options").json()
    assert opts["sample_rate"] == RATE and opts["tasks"] == ["tts", "sound", "music", "podcast"]
    assert opts["dialects"]["cantonese"] == "广粤话" and "happy" in opts["emotions"] and "fast" in opts["speeds"]
    assert "SNR" in opts["bgm_fields"] and "duration" in opts["music_fields"] and "flac" in opts["response_formats"]


def test_a_client_going_away_cancels_the_synthesis(server, http):
    body = {"input": "A long text to read. " * 40, "stream_format": "sse"}
    record = leave_stream_at(server, http, "/v1/audio/speech", body, "speech.audio.delta", "audio.speech")
    assert record.finish_reason == "cancelled" and record.cancel_latency_s < 5


def test_an_engine_without_a_talker_says_so():
    with fake_server(FakeEngine()) as srv:
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "hi"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "modality_not_supported"
        assert httpx.get(srv.url + "/v1/audio/voices", timeout=10).status_code == 400


def test_speed_and_instructions_map_to_the_talker(http):
    for body in ({"speed": 0.5}, {"speed": 1.6, "instructions": "emotion=happy"},
                 {"instructions": "a deep calm voice"}):
        t0 = time.perf_counter()
        r = http.post("/v1/audio/speech", json={"input": "Hi there.", "max_seconds": 1, **body})
        assert r.status_code == 200 and time.perf_counter() - t0 < 30, (body, r.text)


MUSIC = {"genre": "pop", "mood": "calm", "instrument": "piano", "theme": "sea"}


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "speed": "1.0"}, "speed"),
    ({"input": "hi", "speed": " 2 "}, "speed"),
    ({"input": "hi", "bgm": {"Genre": "pop", "SNR": "10"}}, "bgm.SNR"),
    ({"task": "music", "music": {**MUSIC, "duration": "10"}}, "music.duration"),
])
def test_a_number_sent_as_text_is_invalid_type_as_on_the_other_routes(http, body, param):
    """speed "1.0" was read as a speed label (invalid_request 'unknown speed'), a BGM SNR "10" was taken, a music
    duration "10" said 'must be between 1 and 300 seconds, got 10'; every other route answers invalid_type."""
    from engine.server.speech_api import instruction_from

    r = http.post("/v1/audio/speech", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("invalid_type", param), r.text
    assert instruction_from({"speed": "slow"}) == {"speed": "slow"}  # a label is still a label


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "empty"),
    ({"input": "   "}, "input", "empty"),
    ({"input": "？！…… 😀"}, "input", "nothing to speak"),
    ({"input": "", "task": "sound"}, "input", "empty"),
    ({"input": "hi", "dialect": "klingon"}, "dialect", "cantonese"),
    ({"input": "hi", "emotion": "grumpy", "stream_format": "sse"}, "emotion", "happy"),
    ({"input": "hi", "emotion": "grumpy", "stream_format": "audio", "response_format": "pcm"}, "emotion", "happy"),
    ({"input": "hi", "instruct": "emotion=grumpy"}, "instruct", "happy"),
    ({"input": "hi", "instruct": {"tempo": "fast"}}, "instruct", "valid keys"),
    ({"input": "hi", "instructions": "speed=warp"}, "instructions", "slow"),
    ({"input": "hi", "speed": "ludicrous"}, "speed", "slow"),
    ({"input": "hi", "pitch": "ultra"}, "pitch", "high"),
    ({"input": "hi", "bgm": {"Colour": "red"}}, "bgm", "Genre"),
    ({"input": "hi", "bgm": {"SNR": 10 ** 400}}, "bgm", "between -20 and 60"),  # float() overflowed: a 500
    ({"input": "rain on a roof", "task": "sound", "emotion": "happy"}, "emotion", "description only"),
    ({"task": "music", "music": {"genre": 5}}, "music", "genre"),
    ({"task": "music", "music": {}}, "music", "non-empty genre"),  # ('input' is required, though music was given)
    ({"task": "music", "music": {"genre": "pop", "mood": "calm", "instrument": "piano", "theme": "sea",
                                 "duration": 10 ** 9}}, "music", "duration"),
    ({"task": "music", "music": {"genre": "pop", "mood": "calm", "instrument": "piano", "theme": "sea",
                                 "duration": 10 ** 400}}, "music", "duration"),
    ({"task": "music", "input": "some music please"}, "input", "Genre"),
    ({"task": "podcast", "input": " speaker_1: hi"}, "reference_audio", "per speaker"),
])
def test_what_the_talker_refuses_is_a_400_naming_the_request_field(http, server, body, param, words):
    """The talker's refusals (empty text, an unknown label) used to come back from the engine with
    param null and after the request had queued; they are checked up front, naming the field."""
    failed = server.ctx.scheduler.counts["failed"]
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["code"] == "invalid_request"  # (the talker's code, as before)
    assert server.ctx.scheduler.counts["failed"] == failed  # refused before it reached the engine


def test_a_raw_stream_refused_once_its_clip_is_transcribed_is_still_a_4xx(http, tiny_engine, scripted_tokens):
    """A clip cloned without its transcript starts an SSE stream with a progress line (so that it can be stopped);
    a raw audio stream cannot carry one, and a refusal after the transcription came back as a 200 with no byte in it.
    It is still the refusal's 4xx."""
    scripted_tokens(tiny_engine.tokenizer.encode_plain("hi")[:1])  # (the transcription fails at its second token)
    body = {"input": "hi", "reference_audio": b64(wav_clip(1.0, 16000)), "stream_format": "audio"}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_media", (r.status_code, r.content[:200])
    assert "could not transcribe the reference clip" in r.json()["error"]["message"]


def test_an_sse_request_refused_without_its_transcript_is_a_4xx_before_any_transcribing(http, server):
    """A clip cloned without its transcript, with a background (one call) and a text far over the talker's room: the
    stream started with the "transcribing" progress line, ran our ASR, then carried the refusal in a 200. What needs no
    transcript is checked before the ASR runs: the 400 comes with no stream and no transcription."""
    body = {"input": "Hello world. " * 600, "reference_audio": b64(wav_clip(1.0, 16000)), "bgm": {"Genre": "pop"},
            "stream_format": "sse"}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 400 and "prompt is too long" in r.json()["error"]["message"], (r.status_code, r.text[:300])
    assert "transcribing" not in r.text and "shorten the text" in r.json()["error"]["message"]


def clipped_wav_clip(seconds: float, rate: int, level: float) -> tuple[bytes, float]:
    """A tone driven `level` times past full scale and clipped there, as an overloaded microphone records it, and the
    share of its samples at full scale (within 0.1 % of it)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.clip(level * np.sin(2 * np.pi * 220 * t), -1, 1) * 32767).astype("<i2")
    return wav_bytes(pcm, rate), float(np.mean(np.abs(pcm) / 32768 >= 0.999))  # (PCM16 read as x / 32768)


def clipped_share(warning: str) -> float:
    """The share of a clip at full scale that a reference warning states."""
    found = re.search(r"is clipped: ([0-9.]+)% of its samples sit at full scale", warning)
    assert found, warning
    return float(found.group(1)) / 100


def test_a_clipped_reference_clip_is_cloned_with_a_warning_saying_how_much_is_at_full_scale(http):
    """A clip recorded too loud (a third of its samples at full scale) was cloned without a word; the answer now says
    so in X-Reference-Warning (each stream format), the SSE result and a saved voice; a clean clip gets no warning."""
    clip, share = clipped_wav_clip(1.0, 16000, level=1.2)  # (about 37 % of its samples clipped)
    clipped = b64(clip)
    body = {"input": "Hi.", "reference_audio": clipped, "reference_text": "hello", "max_seconds": 0.3, "seed": 1}
    r = http.post("/v1/audio/speech", json={**body, "response_format": "wav"})
    assert r.status_code == 200 and len(r.content) > 44
    warning = r.headers["x-reference-warning"]
    assert clipped_share(warning) == pytest.approx(share, abs=0.001) and "input level lower" in warning
    r = http.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    done = [e for e in sse_events(r) if isinstance(e, dict) and e.get("type") == "speech.audio.done"][0]
    assert r.headers["x-reference-warning"] == warning
    assert clipped_share(done["result"]["reference_warning"]) == pytest.approx(share, abs=0.001)
    clean = {**body, "reference_audio": b64(wav_clip(1.0, 16000)), "stream_format": "audio"}
    r = http.post("/v1/audio/speech", json=clean)
    assert r.status_code == 200 and "x-reference-warning" not in r.headers
    r = http.post("/v1/audio/voices", json={"name": "too loud", "reference_audio": clipped, "reference_text": "hello"})
    try:
        assert r.status_code == 201 and clipped_share(r.json()["reference_warning"]) == pytest.approx(share, abs=0.001)
    finally:
        http.delete("/v1/audio/voices/too loud")


def test_a_voice_save_whose_client_leaves_while_its_clip_is_transcribed_stops_and_saves_nothing(
        http, server, tiny_engine, monkeypatch):
    """Saving a voice without its transcript ran our ASR to its end (up to 256 tokens) and saved the voice for a client
    that had gone away: the save's job was cancelled, but not its transcription. It stops there now, saving nothing."""
    import socket
    import threading
    from urllib.parse import urlsplit

    started, token = threading.Event(), tiny_engine.tokenizer.encode_plain("hi")[0]
    scheduler = server.ctx.scheduler

    draw_until_cancelled(monkeypatch, scheduler, token, started)  # (until the save's job is cancelled, or 10 s)
    before = len(scheduler.history)
    body = json.dumps({"name": "left early", "reference_audio": b64(wav_clip(1.0, 16000))}).encode()
    where = urlsplit(server.url)
    with socket.create_connection((where.hostname, where.port)) as sock:  # (a client that hangs up, for sure)
        sock.sendall(b"POST /v1/audio/voices HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert started.wait(30)
    deadline = time.monotonic() + 30

    def saves() -> list:
        return [r for r in list(scheduler.history)[before:] if r.label == "audio.voices"]
    while not saves() and time.monotonic() < deadline:
        time.sleep(0.05)
    record = saves()[0]
    assert record.finish_reason == "cancelled", record
    assert "left early" not in [v["name"] for v in http.get("/v1/audio/voices").json()["data"]]


def test_a_saved_voice_deleted_while_its_request_waits_is_refused_naming_voice(http, server):
    """A request for a saved voice that was deleted while it waited behind another came back voice_not_found with
    param null (checked when it came, the same refusal names 'voice'); a synthesis speaking with it ends whole."""
    import threading

    assert http.post("/v1/audio/voices", json={"name": "soon gone", "reference_audio": b64(wav_clip(1.0, 16000)),
                                                "reference_text": "hello"}).status_code == 201
    scheduler, answers = server.ctx.scheduler, {}

    def ask(key: str, body: dict) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            answers[key] = c.post("/v1/audio/speech", json={**body, "voice": "soon gone", "response_format": "wav"})

    speaking = threading.Thread(target=ask, args=("speaking", {"input": "A long text to say. " * 4, "max_seconds": 1.5}))
    speaking.start()
    deadline = time.monotonic() + 30
    while not scheduler._running and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = threading.Thread(target=ask, args=("waiting", {"input": "Hi."}))
    waiting.start()
    while not scheduler._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.delete("/v1/audio/voices/soon gone").status_code == 200
    speaking.join(60)
    waiting.join(60)
    assert answers["speaking"].status_code == 200 and len(answers["speaking"].content) > 44
    err = answers["waiting"].json()["error"]
    assert answers["waiting"].status_code == 400 and (err["code"], err["param"]) == ("voice_not_found", "voice"), err


def test_a_saved_voice_deleted_while_its_streamed_request_waits_says_which_and_when(http, server, tiny_engine,
                                                                                    monkeypatch):
    """A streamed request (stream_format sse) for a saved voice, waiting past the queue's grace, had started its stream
    when the voice was deleted: its error event said only "unknown voice ...; saved voices: ...", with param null. It
    says which voice was deleted, when, and that the request waited meanwhile, naming 'voice' as the 4xx does."""
    import threading

    from engine.events import Done

    assert http.post("/v1/audio/voices", json={"name": "gone mid-line", "reference_audio": b64(wav_clip(1.0, 16000)),
                                                "reference_text": "hello"}).status_code == 201
    release, speak = threading.Event(), tiny_engine.speak

    def held(**kwargs):  # "Hold." keeps the engine's one place until released
        if kwargs.get("text") != "Hold.":
            return speak(**kwargs)
        release.wait(30)
        return iter([Done(text="", finish_reason="stop")])
    monkeypatch.setattr(tiny_engine, "speak", held)
    holder = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/audio/speech", timeout=60,
                                                        json={"input": "Hold.", "response_format": "wav"}))
    holder.start()
    deadline = time.monotonic() + 30
    while not server.ctx.scheduler._running and time.monotonic() < deadline:
        time.sleep(0.01)
    asked = {"input": "Hi.", "voice": "gone mid-line", "stream_format": "sse", "response_format": "pcm"}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/audio/speech", json=asked) as r:
        assert r.status_code == 200  # (its stream started: it waited past the grace)
        assert http.delete("/v1/audio/voices/gone mid-line").status_code == 200
        release.set()
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    holder.join(30)
    error = json.loads(data[-2])["error"]
    assert (error["code"], error["param"], data[-1]) == ("voice_not_found", "voice", "[DONE]"), error
    said = re.fullmatch(r"the saved voice 'gone mid-line' was deleted at \d\d:\d\d:\d\d UTC \((\d+\.\d) s after "
                        r"this request came\) while this request waited its turn: choose another voice, or save that "
                        r"one again", error["message"])
    assert said and 0.4 <= float(said[1]) < 30, error["message"]  # (the grace is 0.5 s)


def test_what_the_preview_talker_does_not_do_is_refused_naming_the_field(preview_engine):
    """The Preview talker speaks text only: a sound task or an instruction was refused with param null."""
    asked = [({"input": "rain", "task": "sound"}, "task"), ({"input": "Hi.", "emotion": "happy"}, "emotion"),
             ({"input": "Hi.", "speed": 2.0}, "speed")]
    with running_server(preview_engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for body, param in asked:
            r = c.post("/v1/audio/speech", json={**body, "response_format": "wav"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
