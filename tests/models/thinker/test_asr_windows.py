"""A long recording's ASR windows: cuts fall in quiet moments, never past the window, cover the clip exactly; the
windows' transcripts are joined as the script writes (spaces between English words, none between Chinese
characters) and a cut, cancelled or failed window says so."""

from __future__ import annotations

import numpy as np
import pytest

from engine.events import Done, Error, GenerationStats, Progress, TextDelta
from engine.models.thinker.asr_windows import Joined, Windowing, transcribe_windows, window_bounds

RATE = 1000
WINDOWING = Windowing(window_s=3.0, search_s=1.0, quiet_frame_s=0.05)


def speech_with_pauses(seconds: float, pauses_at: list[float]) -> np.ndarray:
    """A loud tone with 0.1 s silences starting at `pauses_at` (seconds)."""
    x = 0.5 * np.sin(2 * np.pi * 100 * np.arange(int(seconds * RATE)) / RATE)
    for at in pauses_at:
        x[int(at * RATE):int((at + 0.1) * RATE)] = 0.0
    return x.astype(np.float32)


def test_cuts_fall_in_the_pauses_and_cover_the_clip():
    samples = speech_with_pauses(8.0, [2.4, 5.0])
    bounds = window_bounds(samples, RATE, WINDOWING)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # no gap, no overlap
    assert all(end - start <= 3 * RATE for start, end in bounds)
    cuts = [end / RATE for _, end in bounds[:-1]]
    assert cuts == [pytest.approx(2.45, abs=0.03), pytest.approx(5.05, abs=0.03)]  # the middle of each pause


def test_a_clip_within_one_window_is_one_window():
    assert window_bounds(np.zeros(3 * RATE, np.float32), RATE, WINDOWING) == [(0, 3 * RATE)]


@pytest.mark.parametrize("before, after, joined", [("hello", "world", "hello world"), ("你好", "世界", "你好世界"),
                                                   ("end.", "下一句", "end.下一句"), ("with space ", "x", "with space x")])
def test_window_transcripts_join_as_their_script_is_written(before, after, joined):
    text = Joined(text=before)
    assert before + text.separator(after) + after == joined


def scripted(texts: list[str], reasons: list[str]):
    """One clip's ASR that writes texts[i] and ends with reasons[i] on the i-th window."""
    calls = iter(zip(texts, reasons))

    def transcribe(clip):
        text, reason = next(calls)
        if reason == "error":
            yield Error("the encoder failed", "engine_error")
            return
        yield TextDelta(text)
        yield Done(text, reason, GenerationStats(prompt_tokens=10, new_tokens=2, decode_tokens_per_s=4.0),
                   result={"language": "English", "text": text})
    return transcribe


def run(texts, reasons, seconds=8.0):
    return list(transcribe_windows(scripted(texts, reasons), speech_with_pauses(seconds, [2.4, 5.0]), RATE, WINDOWING))


def test_the_windows_make_one_transcript_with_its_segments_and_figures():
    events = run(["one", "two", "three"], ["stop"] * 3)
    done = events[-1]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.result["text"] == "one two three"
    assert [s["text"] for s in done.result["segments"]] == ["one", "two", "three"]
    assert done.result["segments"][-1]["end"] == 8.0 and done.result["language"] == "English"
    assert done.finish_reason == "stop" and done.stats.prompt_tokens == 30 and done.stats.new_tokens == 6
    assert done.stats.decode_tokens_per_s == pytest.approx(4.0)
    assert [(p.done, p.total) for p in events if isinstance(p, Progress)] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_a_window_cut_at_the_token_limit_marks_the_whole_transcript_cut():
    assert run(["one", "two", "three"], ["stop", "length", "stop"])[-1].finish_reason == "length"


def test_a_cancelled_window_ends_it_keeping_what_was_transcribed():
    done = run(["one", "two", "three"], ["stop", "cancelled", "stop"])[-1]
    assert done.finish_reason == "cancelled" and done.result["text"] == "one two"
    assert done.stats.new_tokens == 4  # the cancelled window's tokens were generated too (they were left out)


def test_a_failed_window_ends_it_with_the_error():
    events = run(["one", "two", "three"], ["stop", "error", "stop"])
    assert isinstance(events[-1], Error) and not any(isinstance(e, Done) for e in events)
