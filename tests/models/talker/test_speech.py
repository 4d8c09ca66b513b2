"""Speech, sound and music through the engine API on the tiny checkpoint: events, streaming,
cancellation, tasks, cloning (with our ASR filling a missing transcript), the voice library,
speak-while-thinking, and bad input (always one Error event, never an exception or a hang)."""

import io
import threading
import wave

import numpy as np
import pytest
import torch

from engine.events import (TRANSCRIBING_REFERENCE, TRANSCRIBING_STAGE, AudioChunk, Done, Error, Progress,
                           TextDelta)
from engine.runtime import Engine

RATE = 44100


def run(events):
    evs = list(events)
    assert sum(isinstance(e, (Done, Error)) for e in evs) == 1 and isinstance(evs[-1], (Done, Error))
    return evs, evs[-1]


def tone(seconds=1.5, rate=22050, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([x] * channels) if channels > 1 else x


def wav_file(x: np.ndarray, rate: int, channels: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x.T if x.ndim > 1 else x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_tts_streams_chunks_at_the_true_rate(tiny_engine):
    assert tiny_engine.has_talker and tiny_engine.talker.sample_rate == RATE
    evs, done = run(tiny_engine.speak("Hello world, this is Ming speaking to you today.", seed=3))
    chunks = [e for e in evs if isinstance(e, AudioChunk)]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert len(chunks) >= 2 and all(c.sample_rate == RATE for c in chunks)
    assert chunks[0].text.startswith("Hello world") and chunks[0].seconds <= 2 * 0.32 + 1e-6  # first patches only
    s = done.stats
    assert s.audio_seconds == pytest.approx(sum(c.seconds for c in chunks))
    assert 0 < s.time_to_first_audio_s < s.total_s and s.audio_real_time_factor > 0
    assert [c.start_s for c in chunks] == pytest.approx(np.cumsum([0] + [c.seconds for c in chunks[:-1]]).tolist())
    again, _ = run(tiny_engine.speak("Hello world, this is Ming speaking to you today.", seed=3))
    assert b"".join(c.pcm for c in chunks) == b"".join(e.pcm for e in again if isinstance(e, AudioChunk))


def test_cancel_stops_within_one_patch(tiny_engine):
    cancel = threading.Event()
    seen = 0
    for ev in tiny_engine.speak("A long text. " * 20, cancel=cancel, seed=1):
        if isinstance(ev, AudioChunk):
            seen += 1
            cancel.set()
        final = ev
    assert isinstance(final, Done) and final.finish_reason == "cancelled" and seen <= 2


def test_a_spoken_reply_stopped_mid_text_ends_cancelled_not_in_an_error(tiny_engine):
    """Stop pressed on a spoken chat reply (or a barge-in, a message typed mid-reply in a Live call) ended it in
    engine_error "the thinker stream ended without a final event": the speech gave up reading the thinker at the
    cancel, before its Done."""
    cancel = threading.Event()
    deltas = 0
    for ev in tiny_engine.chat([{"role": "user", "content": "Tell me a long story."}], modalities=("text", "audio"),
                               cancel=cancel):
        deltas += isinstance(ev, TextDelta)
        if deltas == 2:
            cancel.set()
        final = ev
    assert isinstance(final, Done) and final.finish_reason == "cancelled", final


def test_a_stop_while_the_reference_clip_is_transcribed_stops_the_transcription(tiny_engine, scripted_tokens):
    """A clip cloned without its transcript is first run through our ASR (seconds before any sound; a 30 s clip on
    the real model, longer): the stream said nothing meanwhile and a stop was heard only once the transcription had
    run to its end. The stream now says it is transcribing, and a stop then ends it there, without a sound."""
    clip = wav_file(tone(3.0), 22050, 1)
    for stop_at in ("start", "mid-transcript"):
        cancel = threading.Event()
        # the transcription draws two tokens, then the stop comes (a third draw would fail: the script is spent)
        scripted_tokens(tiny_engine.tokenizer.encode_plain("hello there")[:2], after_last=cancel.set)
        events = []
        for ev in tiny_engine.speak("A long text. " * 20, ref_audio=clip, cancel=cancel, seed=1):
            events.append(ev)
            if stop_at == "start" and isinstance(ev, Progress) and ev.stage == TRANSCRIBING_STAGE:
                cancel.set()
        assert isinstance(events[0], Progress) and events[0].message == TRANSCRIBING_REFERENCE
        done = events[-1]
        assert isinstance(done, Done) and done.finish_reason == "cancelled", done
        assert not any(isinstance(e, AudioChunk) for e in events)


def test_long_text_is_segmented(tiny_engine):
    text = "今天天气很好，我们一起去公园散步吧。然后去吃饭，好不好？" * 2
    evs, done = run(tiny_engine.speak(text, seed=2))
    assert isinstance(done, Done) and len(done.result["fragments"]) >= 3
    spans = [e.text for e in evs if isinstance(e, AudioChunk) and e.text]
    assert len(spans) == len(done.result["fragments"]) and "".join(spans) == text


@pytest.mark.parametrize("kwargs", [dict(text="Thunder and gentle rain", task="sound"),
                                    dict(task="music", music=dict(genre="jazz", mood="calm", instrument="piano",
                                                                  theme="night", duration=2)),
                                    dict(text="今天天气很好。", instruct="dialect=cantonese,emotion=happy,speed=fast"),
                                    dict(text="A voice from a description.", instruct={"style": "低沉的男声，语速缓慢"}),
                                    dict(text="Speech over music.", instruct={"bgm": {"Genre": "jazz", "SNR": 10}})])
def test_tasks_produce_audio(tiny_engine, kwargs):
    evs, done = run(tiny_engine.speak(seed=4, **kwargs))
    assert isinstance(done, Done), done
    assert done.stats.audio_seconds > 0 and any(isinstance(e, AudioChunk) for e in evs)


def test_cloning_and_voice_library(tiny_engine):
    clip = tone()
    _, done = run(tiny_engine.speak("我们一起去公园散步吧。", ref_audio=clip, ref_text="感谢你的认可。",
                                    sample_rate=22050, seed=5))
    assert isinstance(done, Done) and "ref_text_from_asr" not in done.result
    _, done = run(tiny_engine.speak("我们一起去公园散步吧。", ref_audio=clip, sample_rate=22050, seed=5))
    assert isinstance(done, Done) and isinstance(done.result["ref_text_from_asr"], str)
    info = tiny_engine.save_voice("test voice", wav_file(tone(2, 48000, 2), 48000, 2), ref_text="hello there")
    assert info.name == "test voice" and "test voice" in [v.name for v in tiny_engine.list_voices()]
    evs, done = run(tiny_engine.speak("Reusing the saved voice now.", voice="test voice", seed=6))
    assert isinstance(done, Done) and done.result["voice"] == "test voice"
    _, err = run(tiny_engine.speak("x", voice="nobody"))
    assert isinstance(err, Error) and err.code == "voice_not_found" and "test voice" in err.message
    _, err = run(tiny_engine.speak("x", voice="test voice", instruct={"style": "a new voice"}))
    assert isinstance(err, Error) and "voice design" in err.message
    tiny_engine.delete_voice("test voice")
    assert "test voice" not in [v.name for v in tiny_engine.list_voices()]


@pytest.mark.parametrize("kwargs, code", [
    (dict(text=""), "invalid_request"), (dict(text="？！…… 😀"), "invalid_request"),
    (dict(text="x" * 50_000), "invalid_request"), (dict(text="hi", task="opera"), "invalid_request"),
    (dict(text="hi", instruct="emotion=grumpy"), "invalid_request"),
    (dict(text="hi", task="music"), "invalid_request"),
    (dict(text="hi", ref_audio=np.zeros(44100, np.float32), sample_rate=44100), "invalid_media"),
    (dict(text="hi", ref_audio=tone(0.2), sample_rate=22050), "invalid_media"),
    (dict(text="hi", ref_audio=tone(31.0, 8000), sample_rate=8000), "invalid_media"),
    (dict(text="hi", ref_audio=b"RIFF\x00\x00\x00\x00WAVEjunk"), "invalid_media"),
    (dict(text="hi", ref_audio=b"not audio at all"), "invalid_media"),
    (dict(text="hi", voice="../etc"), "invalid_request"),
    (dict(text="rain", task="sound", instruct="emotion=happy"), "invalid_request"),
    (dict(text="hi", max_seconds=-1), "invalid_request"), (dict(text="hi", cfg=-2), "invalid_request"),
    (dict(text="hi", ref_audio=tone(), sample_rate=22050, voice="x"), "invalid_media"),
])
def test_bad_input_is_one_clear_error(tiny_engine, kwargs, code):
    _, final = run(tiny_engine.speak(**kwargs))
    assert isinstance(final, Error) and final.code == code and final.message


def test_a_prompt_too_long_for_the_talker_names_what_to_shorten(tiny_engine):
    """A voice design within its 2 000 characters, but over the talker's room on the demo model, was refused as "(2404
    tokens with the reference; ...): shorten the text or the reference clip", though no reference was given: the
    refusal says what takes the room, and what to shorten."""
    _, err = run(tiny_engine.speak("Hello there.", instruct={"style": "a warm deep voice " * 110}))
    assert isinstance(err, Error) and err.code == "invalid_request", err
    assert "reference" not in err.message and err.message.endswith("shorten the instruction (voice design, character "
                                                                    "voice or background)"), err.message


def test_podcast_with_one_clip_per_speaker(tiny_engine):
    text = " speaker_1:Could you say that again?\n speaker_2:Sure, it is a comedy."
    ref_text = " speaker_1:We had exams.\n speaker_2:Exactly."
    evs, done = run(tiny_engine.speak(text, task="podcast", ref_audio=[tone(1.0), tone(1.2)], ref_text=ref_text,
                                      sample_rate=22050, seed=2))
    assert isinstance(done, Done) and done.result["fragments"] == [text] and done.stats.audio_seconds > 0
    _, err = run(tiny_engine.speak(text, task="podcast"))
    assert isinstance(err, Error) and "one reference clip" in err.message


def test_a_podcast_clip_given_for_two_speakers_is_transcribed_and_encoded_once(tiny_engine, monkeypatch):
    """A podcast whose two speakers share one reference clip, without a transcript, ran the thinker's ASR on it once
    per speaker; the clip is transcribed once and its speaker vector encoded once (both speakers get them)."""
    clip = wav_file(tone(1.0, 16000) * 0.9, 16000, 1)  # (a clip no other test has encoded)
    pipe = tiny_engine.talker
    heard, encoded = [], []
    asr, embed = tiny_engine._asr_text, pipe.speaker_encoder.embed
    monkeypatch.setattr(tiny_engine, "_asr_text", lambda *a: heard.append(1) or asr(*a))
    monkeypatch.setattr(pipe.speaker_encoder, "embed", lambda *a: encoded.append(1) or embed(*a))
    monkeypatch.setattr("engine.runtime.REF_TRANSCRIPT_MAX_TOKENS", 4)  # (what the demo weights say is no matter)
    _, done = run(tiny_engine.speak(" speaker_1:Hi.\n speaker_2:Hello.", task="podcast", ref_audio=[clip, clip],
                                    seed=1, max_seconds=0.2))
    assert isinstance(done, Done), done
    assert len(heard) == 1 and len(encoded) == 1
    said = done.result["ref_text_from_asr"]
    assert said.count(" speaker_") == 2 and said.split("\n")[0][len(" speaker_1:"):] == said.split("\n")[1][len(" speaker_2:"):]


def test_a_stereo_reference_with_the_voice_on_its_right_channel_is_cloned(tiny_engine):
    """The talker read channel 0 of a reference clip: a stereo recording with the voice on its right channel only was
    refused as 'silent'; its channels are mixed down."""
    voice = tone(1.0, 16000)
    clip = wav_file(np.stack([np.zeros_like(voice), voice]), 16000, 2)
    _, done = run(tiny_engine.speak("Hello again.", ref_audio=clip, ref_text="hello", seed=1, max_seconds=0.2))
    assert isinstance(done, Done), done


def test_reference_clips_of_any_rate_and_channel_count(tiny_engine):
    for rate, channels in ((8000, 1), (48000, 2), (44100, 6)):
        clip = wav_file(tone(1.0, rate, channels), rate, channels)
        _, done = run(tiny_engine.speak("Hello again.", ref_audio=clip, ref_text="hello", seed=1, max_seconds=1.0))
        assert isinstance(done, Done), done


def test_speak_while_thinking_interleaves(tiny_engine):
    first_audio = threading.Event()
    text = "Hello there my dear friend, how are you doing on this fine day? " \
           "I am doing very well, thank you so much for asking me about it."

    def thinker():
        for i, ch in enumerate(text):
            if i == len(text) // 2:
                assert first_audio.wait(30), "no audio while the thinker was still talking"
            yield TextDelta(ch)
        yield Done(text=text, finish_reason="stop")

    merged = []
    for ev in tiny_engine.speak_while_thinking(thinker(), seed=1):
        if isinstance(ev, AudioChunk):
            first_audio.set()
        merged.append(ev)
    done = merged[-1]
    assert isinstance(done, Done) and done.text == text and done.stats.time_to_first_audio_s > 0
    kinds = [type(e).__name__ for e in merged]
    assert kinds.index("AudioChunk") < max(i for i, k in enumerate(kinds) if k == "TextDelta")
    assert "".join(e.text for e in merged if isinstance(e, TextDelta)) == text
    assert done.result["audio"]["sample_rate"] == RATE and len(done.result["audio"]["fragments"]) >= 2


def test_engine_without_talker_says_so(tiny_engine, tmp_path):
    e = Engine.__new__(Engine)
    e.model = tiny_engine.model
    e._load_talker(tmp_path, "fp32", torch.device("cpu"))
    assert not e.has_talker
    _, err = run(e.speak("hello"))
    assert isinstance(err, Error) and err.code == "talker_unavailable" and "talker" in err.message


def test_podcast_reference_transcripts_follow_the_reference_layout(tiny_engine):
    """Multi-speaker prompt text is ' speaker_1:...\n speaker_2:...\n' (each line ends in a newline, so the
    target dialogue starts on its own line); two saved voices combine their transcripts that way."""
    from engine.models.talker.prompt import podcast_text

    assert podcast_text(["We had exams.", "Exactly."]) == " speaker_1:We had exams.\n speaker_2:Exactly.\n"
    tiny_engine.save_voice("pod a", wav_file(tone(1.0), 22050, 1), ref_text="We had exams.")
    tiny_engine.save_voice("pod b", wav_file(tone(1.2), 22050, 1), ref_text="Exactly.")
    try:
        cond = tiny_engine._conditioning(["pod a", "pod b"], None, None, None, None)
        assert cond.ref_text == " speaker_1:We had exams.\n speaker_2:Exactly.\n"
        text = " speaker_1:Could you say that again?\n speaker_2:Sure, it is a comedy.\n"
        _, done = run(tiny_engine.speak(text, task="podcast", voice=["pod a", "pod b"], seed=2, max_seconds=1.0))
        assert isinstance(done, Done)
    finally:
        tiny_engine.delete_voice("pod a")
        tiny_engine.delete_voice("pod b")


@pytest.mark.parametrize("max_seconds", [0.1, 0.5])
def test_max_seconds_caps_the_audio_that_comes_out(tiny_engine, max_seconds):
    """max_seconds 0.1 gave 0.96 s of audio: the patch that crossed the cap was decoded whole and the
    decoder's flush added its tail. At most max_seconds comes out now, its last samples faded to silence."""
    evs, done = run(tiny_engine.speak("A long text to say. " * 10, seed=1, max_seconds=max_seconds))
    chunks = [e for e in evs if isinstance(e, AudioChunk)]
    assert isinstance(done, Done) and chunks
    total = sum(c.seconds for c in chunks)
    assert total <= max_seconds + 1.0 / RATE and total >= max_seconds - 0.05, total
    assert done.stats.audio_seconds == pytest.approx(total)
    last = np.frombuffer(chunks[-1].pcm, dtype="<i2")
    assert abs(int(last[-1])) <= 2  # faded out, no click
