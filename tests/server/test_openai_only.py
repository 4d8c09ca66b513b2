"""`python -m engine.server --openai-only`: OpenAI's routes and shapes only, and our client driving it
as it would drive any OpenAI-compatible backend (an `openai+http://` URL: vLLM-Omni, SGLang-Omni):
chat (with speech), transcription, speech and images through the standard routes, and a clear
`not_supported_by_engine` for everything else."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from engine.client import AsyncEngineClient, EngineClient, ServerError
from engine.events import AudioChunk, Done, Error, ImageDone, TextDelta
from engine.server.audio_out import read_wav_header
from tests.server import FakeEngine, image_array, png_bytes, tone_pcm16, torch_threads, wav_bytes


@pytest.fixture(scope="module")
def server(tiny_engine):
    from engine.server import Limits, ServerHandle, create_app

    app = create_app(tiny_engine, Limits(), openai_only=True)
    with torch_threads(1), ServerHandle(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    with EngineClient("openai+" + server.url) as c:
        yield c


def test_only_openais_routes_and_fields(server, http):
    with pytest.raises(Exception):
        with connect(server.ws_url, open_timeout=5):
            pass
    assert http.get("/v1/audio/voices").status_code == 404
    assert http.post("/v1/images/segmentations", json={"prompt": "x"}).status_code == 404
    assert set(http.get("/v1/models").json()["data"][0]) == {"id", "object", "created", "owned_by"}
    for path, body, field in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "thinking": True}, "thinking"),
                              ("/v1/audio/speech", {"input": "hi", "task": "music"}, "task"),
                              ("/v1/images/generations", {"prompt": "a", "steps": 2}, "steps")):
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "stream": True, "max_tokens": 4,
                                                           "modalities": ["text", "audio"],
                                                           "audio": {"format": "pcm16"}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert not any(line.startswith(":") for line in lines)  # no queue / progress comment lines
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert all("metrics" not in c for c in chunks)
    audio = [c["choices"][0]["delta"]["audio"] for c in chunks if c["choices"] and "audio" in c["choices"][0]["delta"]]
    assert audio and all(set(a) == {"id", "data", "transcript"} for a in audio)


class ToneEngine(FakeEngine):
    """A fake talker: one second of 441 Hz at 44.1 kHz, in 0.25 s chunks."""

    def speak(self, text="", cancel=None, **kwargs):
        t = np.arange(44100) / 44100
        tone = 0.5 * np.sin(2 * np.pi * 441 * t)
        for i in range(4):
            yield AudioChunk.from_samples(tone[i * 11025:(i + 1) * 11025], 44100, text=text if i == 0 else "")
        yield Done(text, "stop", result={"sample_rate": 44100, "patches": 4})


def test_pcm_is_openais_24_khz_and_files_state_their_rate():
    from engine.server import Limits, ServerHandle, create_app

    with ServerHandle(create_app(ToneEngine(has_talker=True), Limits(), openai_only=True)) as srv:
        pcm, wav = (httpx.post(srv.url + "/v1/audio/speech", json={"input": "hi", "response_format": fmt},
                               timeout=30).content for fmt in ("pcm", "wav"))
    assert read_wav_header(wav)["sample_rate"] == 44100 and len(wav) == 44 + 2 * 44100  # a file states its rate
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    assert len(x) == 24000  # pcm: OpenAI's 24 kHz, resampled (one second stays one second)
    assert np.argmax(np.abs(np.fft.rfft(x))) == 441  # bin width 1 Hz: the tone's pitch is kept


def test_the_openai_client_drives_the_standard_routes(client):
    info = client.info()
    assert {"text", "transcription", "speech_out", "image_out"} <= info.capabilities
    assert info.limits == {} and info.max_new_tokens is None  # its card says no limits: a studio falls back
    events = list(client.chat([{"role": "user", "content": "Hi"}], max_tokens=6))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert isinstance(events[-1], Done) and text == events[-1].text
    events = list(client.chat([{"role": "user", "content": "Hi"}], max_tokens=6, modalities=("text", "audio")))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert isinstance(events[-1], Done) and chunks and {c.sample_rate for c in chunks} == {24000}
    events = list(client.transcribe(wav_bytes(tone_pcm16(0.5), 16000), max_tokens=8))
    assert isinstance(events[-1], Done) and "text" in events[-1].result
    events = list(client.speak("Hello world, this is a test."))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    done = events[-1]
    assert isinstance(done, Done) and chunks and {c.sample_rate for c in chunks} == {44100}  # the WAV header's rate
    assert done.stats.audio_seconds == pytest.approx(sum(c.seconds for c in chunks))
    events = list(client.imagine("a lighthouse", size="32x32", n=2))
    assert [type(e) for e in events] == [ImageDone, ImageDone, Done] and events[1].index == 1
    events = list(client.imagine("make it red", task="edit", images=[png_bytes(image_array(32, 32))], size="32x32"))
    assert isinstance(events[-1], Done) and isinstance(events[0], ImageDone) and events[0].width == 32


@pytest.mark.parametrize("call", [
    lambda c: c.speak("hi", seed=3), lambda c: c.speak("hi", task="music"), lambda c: c.speak("hi", instruct={"x": 1}),
    lambda c: c.imagine("a", steps=3), lambda c: c.imagine("the cup", task="segment", images=[b"x"]),
    lambda c: c.chat([{"role": "user", "content": "hi"}], top_k=5), lambda c: c.transcribe(b"RIFF", hotwords=["x"]),
    lambda c: c.translate(b"RIFF", hotwords=["x"]),
])
def test_what_a_backend_cannot_do_is_a_clear_error(client, call):
    (err,) = list(call(client))
    assert isinstance(err, Error) and err.code == "not_supported_by_engine" and "OpenAI-compatible" in err.message


def test_extension_routes_raise_not_supported(client):
    for call in (client.voices, client.speech_options, lambda: client.delete_voice("x"),
                 lambda: client.save_voice("x", b"RIFF")):
        with pytest.raises(ServerError) as info:
            call()
        assert info.value.code == "not_supported_by_engine"


def test_the_async_client_does_the_same(server):
    async def run():
        async with AsyncEngineClient("openai+" + server.url) as c:
            speech = [e async for e in c.speak("Hello there.")]
            images = [e async for e in c.imagine("a dog", size="32x32")]
            refused = [e async for e in c.imagine("a dog", seed=1)]
            return speech, images, refused

    speech, images, refused = asyncio.run(run())
    assert isinstance(speech[-1], Done) and any(isinstance(e, AudioChunk) for e in speech)
    assert isinstance(images[0], ImageDone) and isinstance(images[-1], Done)
    assert refused[0].code == "not_supported_by_engine"
