"""The OpenAI-compatible HTTP API, driven by the official `openai` package against a real server on
loopback: streaming chat (one delta per chunk, [DONE]), media content parts, transcription
(context, hotwords, dialect, streaming), models, health, limits and errors, and a client that
goes away mid-stream."""

import json
import time

import httpx
import numpy as np
import openai
import pytest

from engine.events import Done
from tests.server import (SYSTEM, opus_bytes, b64, image_array, long_prompt, png_bytes, reference_chat, running_server,
                          tone_pcm16, wait_for, wav_bytes)


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(tiny_engine, max_upload_bytes=400_000, max_audio_seconds=5.0, max_transcription_seconds=8.0,
                        max_image_pixels=200_000, max_request_bytes=1_000_000, max_new_tokens=1000,
                        max_sessions=7) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60) as c:
        yield c


def test_streaming_chat_with_the_openai_client(client, server, tiny_engine):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story."}]
    expected = reference_chat(tiny_engine, [msgs[1]], 8, system_prompt=SYSTEM)
    stream = client.chat.completions.create(model=server.ctx.model_id, messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == expected.text
    assert len(content) >= 2  # streamed piece by piece, not in one go
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if expected.finish_reason == "length" else "stop"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == expected.stats.prompt_tokens and usage.completion_tokens == expected.stats.new_tokens
    assert all(c.model == server.ctx.model_id for c in chunks)


def test_non_streaming_chat_with_image_and_audio_parts(client, tiny_engine):
    img, pcm = image_array(30, 44, seed=3), tone_pcm16(0.5)
    content = [{"type": "text", "text": "What do you see and hear?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes(img))}},
               {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(pcm)), "format": "wav"}}]
    resp = client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                          max_tokens=4)
    engine_msgs = [{"role": "user", "content": [{"type": "text", "text": "What do you see and hear?"},
                                                {"type": "image", "image": img},
                                                {"type": "audio", "audio": pcm.astype(np.float32) / 32768,
                                                 "sample_rate": 16000}]}]
    expected = reference_chat(tiny_engine, engine_msgs, 4)
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.prompt_tokens == expected.stats.prompt_tokens > 60  # media tokens are in the prompt
    assert resp.model_extra["metrics"]["media_encode_ms"] > 0


def test_a_chat_ending_with_an_assistant_message_is_answered_by_continuing_it(client, tiny_engine):
    """Messages ending with an assistant message were refused ('the last message must come from the user'); OpenAI
    answers them. The reply continues that message (the in-process engine's assistant_prefix); messages with no user
    message at all are still refused, naming 'messages'."""
    from engine.sampling import GenerationParams
    from tests.server import torch_threads

    question, start = "Name a city.", "The city is"
    resp = client.chat.completions.create(model="default", max_tokens=4, messages=[
        {"role": "user", "content": question}, {"role": "assistant", "content": start}])
    with torch_threads(1):
        expected = list(tiny_engine.chat([{"role": "user", "content": question}], GenerationParams(max_new_tokens=4),
                                         assistant_prefix=start))[-1]
    assert isinstance(expected, Done) and resp.choices[0].message.content == expected.text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=[{"role": "assistant", "content": start}])
    assert info.value.code == "invalid_value" and info.value.param == "messages" and "no user" in info.value.message


def test_media_urls_are_refused_because_the_server_never_fetches(client):
    content = [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}, {"type": "text", "text": "?"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}])
    assert info.value.code == "url_not_supported" and "does not fetch" in info.value.message


@pytest.mark.parametrize("kwargs, status, code", [
    ({"model": "gpt-9"}, 404, "model_not_found"),
    ({"n": 9}, 400, "invalid_value"),  # beyond MAX_CHOICES
    ({"n": 0}, 400, "invalid_value"),
    ({"n": 2, "modalities": ["text", "audio"]}, 400, "unsupported_parameter"),  # a spoken reply: one choice
    ({"top_p": -0.1}, 400, "invalid_value"),
    ({"max_tokens": 10 ** 6}, 400, "max_tokens_exceeded"),
    ({"temperature": "hot"}, 400, "invalid_type"),
    ({"modalities": ["text", "image"]}, 400, "modality_not_supported"),  # chat never draws
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                    "!!!"}}]}]}, 400, "invalid_base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + b64(png_bytes(np.zeros((500, 500, 3), np.uint8)))}}]}]}, 400, "image_too_large"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": b64(wav_bytes(tone_pcm16(6.0))), "format": "wav"}}]}]}, 400, "audio_too_long"),
    ({"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, "payload_too_large"),
])
def test_limits_and_bad_requests_get_clear_errors(server, kwargs, status, code):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    if "n" in kwargs or "top_p" in kwargs:
        assert err["param"] == ("n" if "n" in kwargs else "top_p"), err


HELLO = [{"role": "user", "content": "Hello"}]


def test_top_p_zero_keeps_the_most_likely_token_only(client, tiny_engine):
    """OpenAI takes top_p 0: the best token alone (HF's min_tokens_to_keep=1), the greedy reply even at
    temperature 1."""
    expected = reference_chat(tiny_engine, HELLO, 6)
    resp = client.chat.completions.create(model="default", messages=HELLO, max_tokens=6, temperature=1, top_p=0,
                                          seed=4)
    assert resp.choices[0].message.content == expected.text


def test_n_choices_come_one_per_seed_with_their_index(client, tiny_engine):
    """n choices, each its own draw (seed + index), index 0..n-1, the usage counting the prompt once and every
    choice's tokens; the stream's chunks carry their choice's index, each choice ending with its own finish_reason,
    and the same texts as the whole answer."""
    sampling = {"temperature": 1.0, "top_k": 40}
    expected = [reference_chat(tiny_engine, HELLO, 6, seed=11 + i, **sampling) for i in range(3)]
    assert len({e.text for e in expected}) > 1  # (the seeds draw different replies, or the test proves nothing)
    resp = client.chat.completions.create(model="default", messages=HELLO, max_tokens=6, n=3, seed=11,
                                          temperature=1, extra_body={"top_k": 40})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in resp.choices] == ["length" if e.finish_reason == "length" else "stop"
                                                       for e in expected]
    assert resp.usage.prompt_tokens == expected[0].stats.prompt_tokens
    assert resp.usage.completion_tokens == sum(e.stats.new_tokens for e in expected)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert all(c.model_extra["metrics"]["total_ms"] > 0 for c in resp.choices)

    chunks = list(client.chat.completions.create(model="default", messages=HELLO, max_tokens=6, n=3, seed=11,
                                                 temperature=1, extra_body={"top_k": 40}, stream=True,
                                                 stream_options={"include_usage": True}))
    texts, finishes, roles = ["", "", ""], [[], [], []], [0, 0, 0]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role == "assistant"
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == [c.message.content for c in resp.choices] and roles == [1, 1, 1]
    assert finishes == [[c.finish_reason] for c in resp.choices]
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_a_reply_cut_inside_a_character_reads_the_same_streamed_or_whole(client, tiny_engine, scripted_tokens):
    """Cut by max_tokens between the bytes of one character, the reply drops that character, in a stream as in a
    whole answer (it ended with U+FFFD)."""
    tok = tiny_engine.tokenizer
    scripted_tokens(tok.encode_plain("a") + tok.encode_plain("中")[:2])
    whole = client.chat.completions.create(model="default", messages=HELLO, max_tokens=3)
    scripted_tokens(tok.encode_plain("a") + tok.encode_plain("中")[:2])
    chunks = list(client.chat.completions.create(model="default", messages=HELLO, max_tokens=3, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == "a"
    assert whole.choices[0].finish_reason == "length" and chunks[-1].choices[0].finish_reason == "length"


def test_a_client_leaving_stops_the_remaining_choices(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    before, submitted = len(server.ctx.scheduler.history), server.ctx.scheduler.counts["submitted"]
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": 400, "stream": True, "n": 3}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    break  # the first choice has a token: hang up
    rec = wait_for(lambda: next((r for r in list(server.ctx.scheduler.history)[before:]
                                 if r.label == "chat.completions"), None), 20)
    assert rec.finish_reason == "cancelled" and rec.new_tokens < 400
    time.sleep(0.5)  # (a second choice would have been put in line at once)
    assert server.ctx.scheduler.counts["submitted"] == submitted + 1 and server.ctx.scheduler.running == 0


def test_transcription_with_context_hotwords_and_dialect(client, tiny_engine):
    pcm = tone_pcm16(0.8)
    audio = wav_bytes(pcm)
    resp = client.audio.transcriptions.create(model="default", file=("clip.wav", audio), prompt="A talk about Ming.",
                                              extra_body={"hotwords": "Ming,Omni", "dialect": "上海",
                                                          "max_tokens": 6})
    events = list(tiny_engine.transcribe(pcm.astype(np.float32) / 32768, context="A talk about Ming.",
                                         hotwords=["Ming", "Omni"], dialect="上海",
                                         params=__import__("engine.sampling").sampling.GenerationParams(max_new_tokens=6),
                                         sample_rate=16000))
    done = events[-1]
    assert isinstance(done, Done)
    assert resp.text == done.result["text"]
    assert resp.model_extra["language"] == "上海" == done.result["language"]
    assert resp.usage.input_tokens == done.stats.prompt_tokens
    # cut at max_tokens: said so (the wire had no finish reason and a cut transcript read as complete)
    assert resp.model_extra["finish_reason"] == done.finish_reason == "length"


@pytest.mark.parametrize("field, language, tag", [("language", "en", "English"), ("language", "zh-CN", "Chinese"),
                                                  ("language", "上海", "上海"), ("dialect", "en", "English")])
def test_an_iso_language_code_is_forced_as_the_models_tag(client, field, language, tag):
    """`language=en`, what OpenAI's clients send, was forced as the tag "en\t", one the model never writes (its tags
    are language names: "Chinese", spec §6.3); a dialect tag is forced as given. Our `dialect` field (what the Speech
    tab's typed-in choice sends) maps a code too."""
    got = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav_bytes(tone_pcm16(0.3))),
                                             extra_body={"max_tokens": 1, field: language})
    assert got.model_extra["language"] == tag


def test_a_language_code_the_model_has_no_tag_for_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:  # (it was forced as "xx\t" and transcribed as if known)
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav_bytes(tone_pcm16(0.3))), language="xx")
    assert (info.value.code, info.value.param) == ("invalid_value", "language")
    assert "'en', 'zh' or 'ja'" in info.value.message


def test_streaming_transcription_with_the_openai_client(client):
    stream = client.audio.transcriptions.create(model="default", file=("clip.wav", wav_bytes(tone_pcm16(0.5))),
                                                stream=True, extra_body={"max_tokens": 6, "dialect": "上海"})
    events = list(stream)
    assert events[-1].type == "transcript.text.done"
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    # with a forced dialect the transcript streams from the first token (otherwise the engine holds
    # text back until the model's language tag is complete)
    assert deltas and "".join(deltas).strip() == events[-1].text
    assert events[-1].model_extra["language"] == "上海" and events[-1].model_extra["finish_reason"] == "length"


def pauses(seconds: float, rate: int = 8000) -> np.ndarray:
    """PCM16 speech stand-in: a tone broken by a 0.1 s pause each second."""
    pcm = tone_pcm16(seconds, rate=rate)
    pcm[(np.arange(len(pcm)) % rate) >= int(0.9 * rate)] = 0
    return pcm


def test_a_recording_longer_than_a_clip_is_transcribed_in_windows(server, tiny_engine, monkeypatch):
    """Past the encoder's clip (max_audio_seconds, 5 s here) a recording is transcribed a window at a time, up to the
    transcription limit (8 s here); it was refused at the clip limit, so a 30-minute lecture could not be transcribed."""
    from engine.models.thinker.asr_windows import Windowing

    monkeypatch.setattr(tiny_engine, "asr_windowing", Windowing(window_s=3.0, search_s=1.0))
    url, clip = server.url + "/v1/audio/transcriptions", wav_bytes(pauses(5.5), rate=8000)
    r = httpx.post(url, files={"file": ("talk.wav", clip)}, data={"response_format": "srt", "max_tokens": "2"},
                   timeout=60)
    cues = r.text.strip().split("\n\n")
    assert r.status_code == 200 and [c.split("\n")[0] for c in cues] == ["1", "2"]  # a cue per window
    times = [c.split("\n")[1] for c in cues]  # cut in the pauses (.9-1 s of each second), the last at the clip's end
    assert times == ["00:00:00,000 --> 00:00:02,975", "00:00:02,975 --> 00:00:05,500"]
    verbose = httpx.post(url, files={"file": ("talk.wav", clip)},
                         data={"response_format": "verbose_json", "max_tokens": "2"}, timeout=60).json()
    segments = verbose["segments"]  # OpenAI's, one per cue (they were our own `windows`)
    assert [(s["id"], s["seek"], s["start"], s["end"]) for s in segments] == [(0, 0, 0.0, 2.975), (1, 298, 2.975, 5.5)]
    assert [s["text"] for s in segments] == [c.split("\n", 2)[2] for c in cues] and "windows" not in verbose
    assert all(s["tokens"] and s["avg_logprob"] < 0 and s["temperature"] == 0 for s in segments)
    r = httpx.post(url, files={"file": ("talk.wav", clip)}, data={"stream": "true", "max_tokens": "2"}, timeout=60)
    assert r.text.count(": progress {\"stage\":\"transcribing\"") == 3  # before each window, and at the end
    done = json.loads(r.text.split("data: ")[-2])
    assert done["type"] == "transcript.text.done" and len(done["text"].split()) >= 2
    assert [w["start"] for w in done["windows"]] == [0.0, 2.975] and done["windows"][-1]["end"] == 5.5


def test_chunking_strategy_auto_is_taken_and_a_vad_one_refused_saying_what_the_server_does(client):
    """`chunking_strategy` was refused whatever its value, "the whole clip is transcribed at once", no longer true."""
    got = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav_bytes(tone_pcm16(0.3))),
                                             chunking_strategy="auto", extra_body={"max_tokens": 1})
    assert got.text is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav_bytes(tone_pcm16(0.3))),
                                           chunking_strategy={"type": "server_vad", "threshold": 0.5})
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "chunking_strategy")
    assert "30 s windows" in info.value.message


def test_a_client_leaving_while_its_upload_is_decoded_stops_the_decode(server, monkeypatch):
    """A long compressed upload was decoded to its end after its client had gone, then queued for the engine and only
    cancelled there: the decode now stops within a frame of the client leaving, and nothing is queued."""
    import engine.media.audio as media_audio

    frame_times, frame_samples = [], media_audio._frame_samples

    def slow_frame(frame, mix=False):  # (a long recording's decode, in slow motion: 5 ms a 20 ms frame)
        frame_times.append(time.perf_counter())
        time.sleep(0.005)
        return frame_samples(frame, mix)

    monkeypatch.setattr(media_audio, "_frame_samples", slow_frame)
    jobs, aborts = len(server.ctx.scheduler.history), server.ctx.client_aborts["left_mid_response"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up 0.3 s in, about 60 of the 350 frames decoded
        httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("talk.opus", opus_bytes(7.0))},
                   timeout=httpx.Timeout(30, read=0.3))
    left = time.perf_counter()
    wait_for(lambda: server.ctx.client_aborts["left_mid_response"] == aborts + 1)
    time.sleep(0.1)
    assert 0 < len(frame_times) < 200 and max(frame_times) < left + 0.05, (len(frame_times), max(frame_times) - left)
    assert len(server.ctx.scheduler.history) == jobs and server.ctx.scheduler.running == 0


@pytest.mark.parametrize("fmt", ["srt", "vtt", "verbose_json"])
def test_a_streamed_transcription_refuses_a_format_that_comes_whole(server, fmt):
    """stream=true with response_format srt was answered with json SSE events, the format silently dropped."""
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(tone_pcm16(0.3)))},
                   data={"stream": "true", "response_format": fmt}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("unsupported_parameter", "response_format"), err


@pytest.mark.parametrize("voice_on, heard_peak", [(0, 0.3), (1, 0.15)])
def test_a_stereo_recording_is_heard_on_the_channel_its_voice_is_on(server, tiny_engine, monkeypatch, voice_on,
                                                                      heard_peak):
    """A stereo recording whose voice is on the right channel alone (channel 0 silent) was transcribed from channel
    0, silence; the channels' mean is transcribed then. A voice on channel 0 is read from channel 0 as the reference
    reads a file (spec §5.1), the other channel left out."""
    import io
    import wave

    heard = []
    real = tiny_engine.transcribe
    monkeypatch.setattr(tiny_engine, "transcribe", lambda audio, **kw: (heard.append(audio), real(audio, **kw))[1])
    channels = np.zeros((8000, 2), dtype="<i2")
    channels[:, voice_on] = tone_pcm16(0.5)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000), w.writeframes(channels.tobytes())
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("stereo.wav", buf.getvalue())},
                   data={"max_tokens": "1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert np.abs(heard[0]).max() == pytest.approx(heard_peak, rel=0.01)


def test_transcription_limits_and_errors(server):
    url = server.url + "/v1/audio/transcriptions"
    r = httpx.post(url, files={"file": ("big.wav", b"\0" * 500_000)}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = httpx.post(url, files={"file": ("long.wav", wav_bytes(tone_pcm16(9.0, rate=8000), rate=8000))}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_too_long"
    assert r.json()["error"]["message"] == ("'file' is too long: 9.0 s, the limit is 8 s (the server's "
                                            "max_transcription_seconds, --max-transcription-seconds)")
    # compressed audio that says it is longer is refused before it is decoded (a 25 MB upload can hold hours)
    r = httpx.post(url, files={"file": ("long.ogg", opus_bytes(12.0))}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "'file' is too long: 12.0 s (its container says), not decoded past the limit, the limit is 8 s (the server's "
        "max_transcription_seconds, --max-transcription-seconds)")
    r = httpx.post(url, files={"file": ("x.wav", b"not audio at all")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio"
    # said in words (it was "...[Errno 1094995529] Invalid data found when processing input: '<none>'")
    assert r.json()["error"]["message"] == ("'file' is not an audio file FFmpeg can read (an unknown format, "
                                            "or a corrupt or cut-off file)")
    r = httpx.post(url, data={"prompt": "no file"}, files={"other": ("a", b"b")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"
    r = httpx.post(url, json={"file": "x"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_type"


def test_models_and_health(client, server, tiny_engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.ctx.model_id]
    assert models.data[0].model_extra["limits"] == {  # what the server was started with, not the defaults
        "max_new_tokens": 1000, "default_max_tokens": 256,
        "context_tokens": tiny_engine.model.config.llm.max_position_embeddings, "max_request_bytes": 1_000_000, "max_upload_bytes": 400_000, "max_audio_seconds": 5.0, "max_transcription_seconds": 8.0,
        "max_image_pixels": 200_000, "max_sessions": 7, "realtime_idle_s": 600.0}
    assert httpx.get(server.url + "/v1/models/default").json()["limits"]["max_new_tokens"] == 1000
    encoder_s = tiny_engine.processor.settings.audio.max_duration_s  # the tiny audio encoder's positions
    assert 5.0 < encoder_s < 300.0
    with running_server(tiny_engine) as default:  # 300 s by default: the card says the model's shorter limit
        assert httpx.get(default.url + "/v1/models").json()["data"][0]["limits"]["max_audio_seconds"] == encoder_s
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == server.ctx.model_id and h["auth"] is False
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_http_client_going_away_mid_stream_cancels_generation(server, tiny_engine):
    prompt = long_prompt(tiny_engine)
    before = len(server.ctx.scheduler.history)
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    break  # got a token: now hang up
    rec = wait_for(lambda: next((r for r in list(server.ctx.scheduler.history)[before:]
                                 if r.label == "chat.completions"), None), 20)
    assert rec.finish_reason == "cancelled" and rec.new_tokens < 400
    assert rec.steps_after_cancel is not None and rec.steps_after_cancel <= 1
    print(f"\n[cancel via HTTP disconnect] decode steps after cancel: {rec.steps_after_cancel}, "
          f"latency {1000 * rec.cancel_latency_s:.1f} ms")
