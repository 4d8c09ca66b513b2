"""Server-side turn detection (engine/server/turns.py) on speech our own script made (espeak-ng,
app/assets/speech): turns start and stop where the speech does, at any input rate and chunking,
the turn's audio includes the prefix padding, and memory stays bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.media.audio import load_audio, resample
from engine.server.turns import ServerVad, SpeechStarted, SpeechStopped, TurnDetectionError, TurnDetector
from tests.paths import REPO

pytest.importorskip("silero_vad")

RATE = 16000
SPEECH = REPO / "app/assets/speech"


def question(name: str = "what_do_you_see_en.wav") -> np.ndarray:
    return load_audio(SPEECH / name).numpy()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def pcm16(x: np.ndarray, rate: int = RATE) -> np.ndarray:
    if rate != RATE:
        x = resample(torch.from_numpy(x), RATE, rate).numpy()
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def stream(detector: TurnDetector, pcm: np.ndarray, rate: int, chunk: int) -> list:
    events = []
    for i in range(0, len(pcm), chunk):
        events += detector.feed(pcm[i:i + chunk], rate)
    return events


def speech_span_ms(x: np.ndarray) -> tuple[float, float]:
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return 1000 * loud[0] / RATE, 1000 * loud[-1] / RATE


# --------------------------------------------------------------------------- settings


def test_turn_detection_settings_follow_openai_server_vad():
    assert ServerVad.from_wire(None) is None  # push-to-talk
    vad = ServerVad.from_wire({"type": "server_vad"})
    assert (vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms) == (0.5, 300, 500)
    vad = ServerVad.from_wire({"type": "server_vad", "threshold": 0.8, "prefix_padding_ms": 100,
                               "silence_duration_ms": 1200, "create_response": False, "idle_timeout_ms": None})
    assert (vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms, vad.create_response) == (0.8, 100, 1200,
                                                                                                      False)
    assert ServerVad.from_wire(vad.to_wire()) == vad
    vad = ServerVad.from_wire({"type": "server_vad", "idle_timeout_ms": 6000})
    assert vad.idle_timeout_ms == 6000 and vad.to_wire()["idle_timeout_ms"] == 6000


def test_null_turn_detection_fields_take_their_defaults():
    """A typed client sends null for the fields it leaves unset: threshold / padding / silence null
    took the defaults but create_response or interrupt_response null was refused ('must be true or
    false') and type null was 'None is not supported'; every null field now means 'left out'."""
    nulls = {"type": None, "threshold": None, "prefix_padding_ms": None, "silence_duration_ms": None,
             "create_response": None, "interrupt_response": None, "idle_timeout_ms": None}
    assert ServerVad.from_wire(nulls) == ServerVad()
    assert ServerVad.from_wire({**nulls, "interrupt_response": False}) == ServerVad(interrupt_response=False)


@pytest.mark.parametrize("spec, code, param", [
    ({"type": "semantic_vad"}, "unsupported_parameter", "session.turn_detection.type"),
    ({"type": "server_vad", "threshold": 1.5}, "invalid_value", "session.turn_detection.threshold"),
    ({"threshold": "high"}, "invalid_type", "session.turn_detection.threshold"),
    ({"silence_duration_ms": 250.5}, "invalid_type", "session.turn_detection.silence_duration_ms"),
    ({"prefix_padding_ms": -1}, "invalid_value", "session.turn_detection.prefix_padding_ms"),
    ({"eagerness": "high"}, "unknown_parameter", "session.turn_detection.eagerness"),
    ({"idle_timeout_ms": 1000}, "invalid_value", "session.turn_detection.idle_timeout_ms"),  # OpenAI's: 5-30 s
    ({"idle_timeout_ms": 7500.5}, "invalid_type", "session.turn_detection.idle_timeout_ms"),
    ({"interrupt_response": 1}, "invalid_type", "session.turn_detection.interrupt_response"),
    ("server_vad", "invalid_type", "session.turn_detection"),
])
def test_bad_turn_detection_settings_are_refused_with_the_field_named(spec, code, param):
    with pytest.raises(TurnDetectionError) as e:
        ServerVad.from_wire(spec)
    assert (e.value.code, e.value.param) == (code, param)


# --------------------------------------------------------------------------- turns


def test_a_spoken_question_is_one_turn_with_its_prefix_padding():
    q = question()
    audio = np.concatenate([silence(1.0), q, silence(1.0)])
    on, off = speech_span_ms(audio)
    detector = TurnDetector(ServerVad(prefix_padding_ms=300, silence_duration_ms=500))
    events = stream(detector, pcm16(audio, 48000), 48000, 960)  # a browser's 20 ms chunks at 48 kHz
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    started, stopped = events
    assert on - 300 - 100 <= started.audio_start_ms <= on - 300 + 100
    assert off + 500 <= stopped.audio_end_ms <= off + 500 + 250  # the silence wait, a few windows late at most
    assert stopped.audio_start_ms == started.audio_start_ms and stopped.reason == "silence"
    assert len(stopped.audio) == (stopped.audio_end_ms - stopped.audio_start_ms) * RATE // 1000
    assert stopped.sample_rate == RATE and stopped.audio.dtype == np.int16
    # the turn's audio is the question itself (resampled there and back): same loudness profile
    start = stopped.audio_start_ms * RATE // 1000
    original = pcm16(audio)[start:start + len(stopped.audio)].astype(np.float64)
    corr = np.corrcoef(original, stopped.audio.astype(np.float64))[0, 1]
    assert corr > 0.95
    assert not detector.in_speech


@pytest.mark.parametrize("rate, chunk", [(16000, 512), (44100, 441), (24000, 2400), (8000, 37)])
def test_any_input_rate_and_chunking_gives_the_same_turn(rate, chunk):
    audio = np.concatenate([silence(0.8), question(), silence(0.9)])
    reference = stream(TurnDetector(ServerVad()), pcm16(audio), RATE, 320)
    events = stream(TurnDetector(ServerVad()), pcm16(audio, rate), rate, chunk)
    assert [type(e) for e in events] == [type(e) for e in reference] == [SpeechStarted, SpeechStopped]
    assert abs(events[0].audio_start_ms - reference[0].audio_start_ms) <= 64
    assert abs(events[1].audio_end_ms - reference[1].audio_end_ms) <= 64


def test_silence_duration_decides_whether_a_pause_ends_the_turn():
    audio = np.concatenate([silence(0.5), question(), silence(0.8), question("describe_picture_en.wav"),
                            silence(1.5)])
    pcm = pcm16(audio)
    short = [e for e in stream(TurnDetector(ServerVad(silence_duration_ms=400)), pcm, RATE, 1600)
             if isinstance(e, SpeechStopped)]
    long = [e for e in stream(TurnDetector(ServerVad(silence_duration_ms=1200)), pcm, RATE, 1600)
            if isinstance(e, SpeechStopped)]
    assert len(short) == 2 and len(long) == 1
    assert long[0].seconds > short[0].seconds + short[1].seconds


def test_silence_and_quiet_noise_never_start_a_turn_and_hold_only_the_padding():
    rng = np.random.default_rng(0)
    noise = (0.003 * rng.standard_normal(5 * RATE)).astype(np.float32)
    detector = TurnDetector(ServerVad(prefix_padding_ms=300))
    assert stream(detector, pcm16(np.concatenate([silence(2.0), noise])), RATE, 800) == []
    assert detector.audio_ms == 7000 // 32 * 32
    assert detector.held_bytes <= 2 * (300 * RATE // 1000) + 4 * 512 + 1024


def test_a_speaker_who_never_stops_is_cut_at_the_turn_limit():
    talk = np.concatenate([question("what_is_this_zh.wav")] * 2)  # ~10 s of speech with short pauses
    detector = TurnDetector(ServerVad(silence_duration_ms=2000), max_turn_seconds=2.0)
    events = stream(detector, pcm16(talk), RATE, 1600)
    stopped = [e for e in events if isinstance(e, SpeechStopped)]
    assert stopped and all(e.reason == "max_duration" for e in stopped)
    assert all(e.seconds <= 2.0 + 0.032 for e in stopped)
    assert detector.held_bytes <= 2 * 2 * RATE + 4 * 1600 + 2048  # one capped turn plus a chunk


def test_clear_drops_the_turn_in_progress_but_the_clock_goes_on():
    q = question()
    detector = TurnDetector(ServerVad())
    events = stream(detector, pcm16(np.concatenate([silence(0.5), q[: len(q) // 2]])), RATE, 1600)
    assert [type(e) for e in events] == [SpeechStarted] and detector.in_speech
    before = detector.audio_ms
    detector.clear()
    assert not detector.in_speech
    events = stream(detector, pcm16(np.concatenate([silence(1.0), q, silence(1.0)])), RATE, 1600)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert events[0].audio_start_ms >= before + 1000 - 300 - 100  # on the session's clock: silence, then padding


def test_a_cough_is_no_turn_but_a_word_is():
    """A burst of voice shorter than silero's shortest speech (250 ms: a cough, a click, the first 120 ms of a
    word) reached the threshold, so it started a turn: over a reply that was a barge-in, and the burst was
    committed and answered. It now ends without any event; the spoken question is still one turn."""
    q = question()
    on = np.flatnonzero(np.abs(q) > 0.02)[0]
    for burst_ms in (120, 200):
        cough = q[on:on + burst_ms * RATE // 1000]
        detector = TurnDetector(ServerVad(threshold=0.5, silence_duration_ms=500))
        pcm, events, loudest = pcm16(np.concatenate([silence(1.0), cough, silence(1.5)])), [], 0.0
        for i in range(0, len(pcm), 512):
            events += detector.feed(pcm[i:i + 512], RATE)
            loudest = max(loudest, detector.probability)
        assert loudest >= 0.9, loudest  # the burst is voice, well over the threshold
        assert events == [] and not detector.in_speech, burst_ms
        assert detector.end_turn() is None
    detector = TurnDetector(ServerVad(threshold=0.5, silence_duration_ms=500))
    events = stream(detector, pcm16(np.concatenate([silence(1.0), q[on:on + 120 * RATE // 1000], silence(0.6), q,
                                                    silence(1.0)])), RATE, 640)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]  # the question after the cough: its turn
    assert events[0].audio_start_ms >= 1000 + 120 + 600 - 300 - 100
