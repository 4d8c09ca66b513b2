"""The Speech tab's live recording (app.ui.speech_live): partial transcripts send only the audio after the windows
they finished, and those windows joined with the rest are what a transcription of the whole recording gives."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gradio")

from app.engine_link import EngineLink  # noqa: E402
from app.ui import speech  # noqa: E402
from app.ui.speech import SpeechController  # noqa: E402
from engine.events import Done, TextDelta  # noqa: E402
from engine.media.audio import decode_audio  # noqa: E402
from engine.models.thinker.asr_windows import transcribe_windows  # noqa: E402

RATE = 16000


class WindowingTranscriber:
    """An engine client that cuts a recording into windows as the engine does (asr_windows, for real) and writes
    for each window a text that changes with its audio (its length and a checksum of its samples); it notes how many
    seconds of audio each request sent."""
    endpoints = SimpleNamespace(http="http://stub")

    def __init__(self):
        self.sent_s: list[float] = []

    def info(self):
        raise ConnectionError("no model card here")

    def transcribe(self, audio, **kwargs):
        samples, rate = decode_audio(audio)
        self.sent_s.append(len(samples) / rate)
        yield from transcribe_windows(self.window, samples, rate)

    @staticmethod
    def window(clip: np.ndarray):
        text = f"w{len(clip)}:{int(np.abs(clip * 32767).sum()) % 9973}"
        yield TextDelta(text)
        yield Done(text=text, finish_reason="stop", result={"language": "English", "text": text})


def recording(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with a quiet stretch every 7 s (somewhere for each window's cut to go), as PCM16 (a microphone's)."""
    x = np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.2
    for t in range(7, int(seconds), 7):
        x[t * RATE:t * RATE + RATE // 10] *= 0.01
    return (x * 32767).astype(np.int16)


def record(controller, audio: np.ndarray, every_s: float, chunk_s: float = 1.0):
    """The microphone's chunks through the tab's stream handler (a partial every `every_s`), then Stop."""
    state, partials = None, []
    step = int(chunk_s * RATE)
    speech_every, speech.PARTIAL_EVERY_S = speech.PARTIAL_EVERY_S, every_s
    try:
        for i in range(0, len(audio), step):
            state, text, status = controller.stream(state, (RATE, audio[i:i + step]), "", "", None)
            if status.startswith("partial"):
                partials.append(text)
    finally:
        speech.PARTIAL_EVERY_S = speech_every
    return partials, controller.finish(state, "", "", None)


def test_live_partials_send_only_the_open_window_and_end_as_the_whole_recording_transcribed():
    """Each partial transcript re-sent the whole recording: past 30 s the engine transcribed every window again each
    few seconds (120 s: four windows' time per partial). The windows a partial finished are kept; later partials send
    only the audio after them (at most about a window plus the time between partials), and the final transcript
    (the kept windows joined with the rest) is the whole recording's: the same text, the same windows."""
    audio = recording(100.0)
    client = WindowingTranscriber()
    partials, (_, final_text, status, txt, srt) = record(SpeechController(EngineLink(client)), audio, every_s=10.0)
    sent_while_recording = client.sent_s[:-1]
    assert len(sent_while_recording) == 10 and max(sent_while_recording) <= 30.0 + 10.0, client.sent_s
    assert client.sent_s[-1] < 30.0, client.sent_s  # Stop: only the open window is transcribed

    whole = WindowingTranscriber()
    *_, done = whole.transcribe(speech.wav_bytes(RATE, audio))
    assert final_text == done.result["text"] and Path(txt).read_text(encoding="utf-8") == final_text + "\n"
    cues = Path(srt).read_text(encoding="utf-8").split("\n\n")
    assert [c.splitlines()[2] for c in cues] == [s["text"] for s in done.result["segments"]], cues
    # each partial begins with the windows finished before it: the transcript grows, it is not rewritten
    assert all(later.startswith(earlier.rsplit(" ", 1)[0]) for earlier, later in zip(partials, partials[1:])
               if " " in earlier), partials
    kept_s = done.result["segments"][-1]["start"]
    assert f"the first {kept_s:.0f} s were transcribed while recording" in status, status


def test_changed_settings_transcribe_the_recording_again():
    """A context typed while recording applies to the whole transcript: the windows kept under the old settings are
    dropped and the next partial sends the whole recording again."""
    client = WindowingTranscriber()
    controller = SpeechController(EngineLink(client))
    state = None
    for i in range(0, 65 * RATE, RATE):
        state, *_ = controller.stream(state, (RATE, recording(1.0, i)), "", "", None)
    assert state["kept"].upto > 0
    speech_every, speech.PARTIAL_EVERY_S = speech.PARTIAL_EVERY_S, 1.0
    try:
        state, *_ = controller.stream(state, (RATE, recording(1.0)), "a lecture", "", None)
    finally:
        speech.PARTIAL_EVERY_S = speech_every
    assert client.sent_s[-1] == pytest.approx(66.0), client.sent_s
