"""The client's speech, voice-library and image methods against a real server on the tiny engine (what
the studio's Voice and Image tabs call): engine events in order, the figures and results the tabs
show, cancellation, sync and async alike."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.client import AsyncEngineClient, Endpoints, EngineClient, ServerError
from engine.events import AudioChunk, Done, Error, ImageDone, ImagePreview, Progress, QueuePosition
from tests.server import image_array, png_bytes, running_server


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with EngineClient(server.url) as c:
        yield c


def tone(seconds: float = 1.2, rate: int = 22050) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_speak_streams_audio_with_its_text_and_figures(client):
    assert {"speech_out", "image_out"} <= client.info().capabilities
    events = list(client.speak("Hello world, this is Ming speaking to you today.", seed=3))
    assert isinstance(events[0], QueuePosition) and isinstance(events[-1], Done)
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    done = events[-1]
    assert len(chunks) >= 2 and {c.sample_rate for c in chunks} == {44100} and chunks[0].text.startswith("Hello")
    assert done.stats.audio_seconds == pytest.approx(sum(c.seconds for c in chunks), abs=1e-3)
    assert done.stats.time_to_first_audio_s > 0 and done.result["sample_rate"] == 44100
    again = list(client.speak("Hello world, this is Ming speaking to you today.", seed=3))
    assert b"".join(c.pcm for c in chunks) == b"".join(e.pcm for e in again if isinstance(e, AudioChunk))


def test_speak_tasks_cloning_and_instructions(client):
    # (without reference_text our ASR fills it in and the result says so: tests/server/test_speech_api.py saves a
    # voice that way; the tiny model's ASR writes hundreds of random words, too long a prompt to speak after)
    done = list(client.speak("Speech from a clip.", reference_audio=(tone(), 22050), reference_text="hello",
                             max_seconds=1))[-1]
    assert isinstance(done, Done) and "ref_text_from_asr" not in done.result
    for kwargs in (dict(task="music", music=dict(genre="jazz", mood="calm", instrument="piano", theme="night",
                                                  duration=2)),
                   dict(text="Thunder and rain", task="sound", max_seconds=1),
                   dict(text="今天天气很好。", instruct="dialect=cantonese,emotion=happy", max_seconds=1),
                   dict(text="A designed voice.", instruct={"style": "低沉的男声"}, max_seconds=1)):
        events = list(client.speak(**kwargs))
        assert isinstance(events[-1], Done) and any(isinstance(e, AudioChunk) for e in events), kwargs
    (err,) = list(client.speak("hi", instruct={"emotion": "grumpy"}))  # refused at once: the HTTP status says so
    assert isinstance(err, Error) and err.code == "invalid_request" and "happy" in err.message


def test_the_voice_library_and_options(client):
    opts = client.speech_options()
    assert opts["sample_rate"] == 44100 and "cantonese" in opts["dialects"] and "Genre" in opts["bgm_fields"]
    saved = client.save_voice("client voice", (tone(1.5), 22050), reference_text="hello there")
    assert saved["name"] == "client voice" and "ref_text_from_asr" not in saved
    assert "client voice" in [v["name"] for v in client.voices()]
    with pytest.raises(ServerError) as info:  # the name is taken: the saved voice stays
        client.save_voice("client voice", (tone(1.0), 22050), reference_text="another")
    assert info.value.code == "voice_exists"
    again = client.save_voice("client voice", (tone(1.5), 22050), reference_text="hello again", replace=True)
    assert again["reference_text"] == "hello again"
    done = list(client.speak("With the saved voice.", voice="client voice", max_seconds=1))[-1]
    assert isinstance(done, Done) and done.result["voice"] == "client voice"
    assert client.delete_voice("client voice")["deleted"] is True
    with pytest.raises(ServerError) as info:
        client.delete_voice("client voice")
    assert info.value.code == "voice_not_found"
    (err,) = list(client.speak("hi", voice="client voice"))
    assert err.code == "voice_not_found"


def test_imagine_generates_edits_and_segments(client):
    events = list(client.imagine("a red teapot", size="32x32", steps=4, preview_every=1, n=2, seed=5))
    kinds = [type(e) for e in events]
    previews = [e for e in events if isinstance(e, ImagePreview)]
    images = [e for e in events if isinstance(e, ImageDone)]
    assert kinds[0] is QueuePosition and Progress in kinds and kinds[-1] is Done
    assert [e.index for e in images] == [0, 1] and [e.seed for e in images] == [5, 6]
    assert len(previews) == 6 and kinds.index(ImagePreview) < kinds.index(ImageDone)  # previews come first
    assert Image.open(io.BytesIO(images[0].image)).size == (32, 32) and events[-1].stats.images == 2
    edited = [e for e in client.imagine("make it blue", task="edit", images=[images[0].image], steps=1)
              if isinstance(e, ImageDone)]
    assert len(edited) == 1 and (edited[0].width, edited[0].height) != (0, 0)
    seg = list(client.imagine("the teapot", task="segment", images=[image_array(48, 64)], steps=1))
    (done_image,) = [e for e in seg if isinstance(e, ImageDone)]
    assert done_image.mask is not None and done_image.overlay is not None
    assert Image.open(io.BytesIO(done_image.mask)).size == (done_image.width, done_image.height)
    (err,) = [e for e in client.imagine("", steps=1) if isinstance(e, Error)]
    assert err.code == "invalid_value"
    (err,) = list(client.imagine("a", task="segment"))
    assert err.code == "invalid_request" and "needs an input image" in err.message


def test_cancel_stops_an_image_between_steps(client):
    cancel = threading.Event()
    events = []
    for ev in client.imagine("a slow one", size="32x32", steps=200, preview_every=1, cancel=cancel):
        events.append(ev)
        if isinstance(ev, ImagePreview):
            cancel.set()
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert not any(isinstance(e, ImageDone) for e in events)


def test_stopping_a_synthesis_frees_the_engine_for_the_next_request_at_once(server, client):
    """The Voice tab's Stop then Make it again: the stopped synthesis went on on the server (the client closed its
    stream, but the socket stayed open under the reader thread's pending read), the next request waited ~40 s behind
    it, and the first ended as a slow reader instead of cancelled. It is cancelled at once now."""
    before = len(server.ctx.scheduler.history)
    with httpx.Client(base_url=server.url, timeout=120) as other:  # (another visitor, connected before)
        cancel, chunks = threading.Event(), 0
        for ev in client.speak("A long text to read aloud for a while. " * 100, seed=3, cancel=cancel):
            chunks += isinstance(ev, AudioChunk)
            if chunks == 3:
                cancel.set()
            if isinstance(ev, Done):
                break
        started = time.monotonic()
        r = other.post("/v1/audio/speech", json={"input": "Hi.", "max_seconds": 0.3})
        waited = time.monotonic() - started
    assert r.status_code == 200 and waited < 10, waited
    reasons = [r.finish_reason for r in list(server.ctx.scheduler.history)[before:]]  # (an earlier test's may lag)
    assert reasons[-2:] == ["cancelled", "stop"] and "slow_reader" not in reasons, reasons


def test_the_async_client_gives_the_same_events(server):
    async def run():
        async with AsyncEngineClient(server.url) as c:
            speech = [e async for e in c.speak("Hello world, this is Ming.", seed=9)]
            images = [e async for e in c.imagine("a cat", size="32x32", steps=2, seed=1)]
            voices = await c.voices()
            return speech, images, voices

    speech, images, voices = asyncio.run(run())
    with EngineClient(server.url) as c:
        sync_speech = list(c.speak("Hello world, this is Ming.", seed=9))
        sync_images = list(c.imagine("a cat", size="32x32", steps=2, seed=1))
    pcm = lambda evs: b"".join(e.pcm for e in evs if isinstance(e, AudioChunk))  # noqa: E731
    assert pcm(speech) == pcm(sync_speech) and isinstance(speech[-1], Done)
    assert [e.image for e in images if isinstance(e, ImageDone)] == [e.image for e in sync_images
                                                                      if isinstance(e, ImageDone)]
    assert isinstance(voices, list)


def test_the_clients_pass_the_pipelines_cfg_options(server):
    """cfg_truncation / cfg_normalization reach the image generator from both clients, JSON (generate) and
    multipart (edit): capping the guided prediction changes the picture, the same way in both."""
    def finished(events):
        return [e.image for e in events if isinstance(e, ImageDone)]

    async def run(**cfg):
        async with AsyncEngineClient(server.url) as c:
            return finished([e async for e in c.imagine("a cat", size="32x32", steps=2, seed=1, guidance=5.0, **cfg)])
    with EngineClient(server.url) as c:
        plain = finished(c.imagine("a cat", size="32x32", steps=2, seed=1, guidance=5.0))
        capped = finished(c.imagine("a cat", size="32x32", steps=2, seed=1, guidance=5.0, cfg_normalization=0.05))
        assert capped and capped != plain
        assert asyncio.run(run(cfg_normalization=0.05)) == capped
        edit = dict(task="edit", images=[image_array(48, 64)], size="32x32", steps=2, seed=1, guidance=5.0)
        assert finished(c.imagine("blue", **edit, cfg_normalization=0.05)) != finished(c.imagine("blue", **edit))


def test_the_clients_send_an_edits_image_guidance(server, preview_engine):
    """image_guidance (the Preview's reference-picture guidance) goes from both clients with an edit: 1.0 turns the
    reference's guidance off and changes the picture, the same in both; a 2.0 engine refuses it by name."""
    def finished(events):
        return [e.image for e in events if isinstance(e, ImageDone)]

    edit = dict(task="edit", images=[image_array(48, 64)], size="32x32", steps=2, seed=1)

    async def run(url, **extra):
        async with AsyncEngineClient(url) as c:
            return finished([e async for e in c.imagine("blue", **edit, **extra)])
    with running_server(preview_engine) as preview, EngineClient(preview.url) as c:
        assert c.info().image_defaults["image_guidance"] == 2.0
        default = finished(c.imagine("blue", **edit))
        unguided = finished(c.imagine("blue", **edit, image_guidance=1.0))
        assert default and unguided and unguided != default
        assert finished(c.imagine("blue", **edit, image_guidance=2.0)) == default
        assert asyncio.run(run(preview.url, image_guidance=1.0)) == unguided
    with EngineClient(server.url) as c:
        (err,) = [e for e in c.imagine("blue", **edit, image_guidance=2.0) if isinstance(e, Error)]
        assert "image_guidance" in err.message and "2.0 pipeline has none" in err.message, err


def test_the_clients_send_a_negative_prompt(server, preview_engine):
    """negative_prompt goes from both clients, JSON (generate) and multipart (edit): on a Preview engine it changes
    the picture, the same in both; a 2.0 engine refuses it by name."""
    def finished(events):
        return [e.image for e in events if isinstance(e, ImageDone)]

    gen = dict(size="32x32", steps=2, seed=1)

    async def run(url, **extra):
        async with AsyncEngineClient(url) as c:
            return finished([e async for e in c.imagine("a cat", **gen, **extra)])
    with running_server(preview_engine) as preview, EngineClient(preview.url) as c:
        plain = finished(c.imagine("a cat", **gen))
        negative = finished(c.imagine("a cat", **gen, negative_prompt="blurry"))
        assert plain and negative and negative != plain
        assert asyncio.run(run(preview.url, negative_prompt="blurry")) == negative
        edit = dict(task="edit", images=[image_array(48, 64)], **gen)
        assert finished(c.imagine("blue", **edit, negative_prompt="red")) != finished(c.imagine("blue", **edit))
    with EngineClient(server.url) as c:
        (err,) = [e for e in c.imagine("a cat", **gen, negative_prompt="dogs") if isinstance(e, Error)]
        assert "negative_prompt" in err.message and "Preview" in err.message, err


def test_an_openai_url_is_http_only():
    ep = Endpoints.parse("openai+https://gpu.example:8000")
    assert ep.openai and ep.http == "https://gpu.example:8000"
    assert not Endpoints.parse("http://h:1").openai
    with pytest.raises(ValueError):
        Endpoints.parse("openai+ftp://h:1")


def test_images_as_arrays_files_and_pil(client, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes(image_array(32, 32, seed=2)))
    for source in (image_array(32, 32), str(path), Image.fromarray(image_array(32, 32, seed=3))):
        events = list(client.imagine("edit me", task="edit", images=[source], steps=1, size="32x32"))
        assert isinstance(events[-1], Done), events[-1]


@pytest.mark.parametrize("transport", ["realtime", "http"])
def test_a_spoken_chat_reply_comes_at_the_talkers_own_rate(server, tiny_engine, transport):
    """Realtime sessions and chat completions naming no rate send OpenAI's 24 kHz pcm16; our clients ask for the
    talker's own rate (the model card's speech_sample_rate), so the studio's Chat tab keeps the talker's whole band
    (44.1 kHz for 2.0)."""
    rate = tiny_engine.talker.sample_rate
    assert rate != 24000
    ask = dict(modalities=("text", "audio"), max_tokens=12, seed=1, transport=transport)
    messages = [{"role": "user", "content": "Say hello to the studio."}]

    async def run():
        async with AsyncEngineClient(server.url) as c:
            return [e async for e in c.chat(messages, **ask)]

    with EngineClient(server.url) as c:
        assert c.info().speech_sample_rate == rate
        events = list(c.chat(messages, **ask))
    for evs in (events, asyncio.run(run())):
        chunks = [e for e in evs if isinstance(e, AudioChunk)]
        assert isinstance(evs[-1], Done) and chunks, evs
        assert {ch.sample_rate for ch in chunks} == {rate}
