"""The event contract: every kind round-trips through its JSON form, unknown kinds are refused (never
taken for the end of a stream), and the module imports without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.events import (AudioChunk, Done, Error, GenerationStats, ImageDone, ImagePreview, Progress, QueuePosition,
                           TextDelta, TokenLogprob, UnknownEventError, event_from_dict, is_final)
from tests.paths import REPO

EVENTS = [
    TextDelta("héllo 🌍"),
    TextDelta("中", [TokenLogprob("\ufffd", [0xE4], -0.25, [TokenLogprob("\ufffd", [0xE4], -0.25),
                                                           TokenLogprob(" a", [32, 97], -1.5)]),
                    TokenLogprob("\ufffd", [0xB8, 0xAD], -0.0)]),
    AudioChunk.from_samples(np.sin(np.linspace(0, 20, 441)) * 0.5, 44100, text="Hello", start_s=0.32),
    ImagePreview(b"\x89PNG fake preview bytes", step=3, total_steps=30, width=64, height=32),
    ImageDone(b"\x89PNG image", 64, 32, seed=7, mask=b"\x89PNG mask", overlay=None, note="empty mask"),
    Progress("denoising", 3, 30, "step 3 of 30"),
    QueuePosition(2, 5),
    Done("hi", "stop", GenerationStats(prompt_tokens=3, new_tokens=2, time_to_first_audio_s=0.2,
                                       audio_seconds=1.5, image_steps=30), [1, 2], {"language": "en"}),
    Error("bad input", "invalid_request"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_kind_round_trips_through_json(event):
    wire = json.loads(json.dumps(event.to_dict()))
    assert wire["type"] == event.type
    assert event_from_dict(wire) == event


def test_audio_chunk_carries_pcm16_at_its_rate():
    chunk = AudioChunk.from_samples([0.0, 0.5, -1.0, 2.0], 44100)
    assert np.frombuffer(chunk.pcm, "<i2").tolist() == [0, 16384, -32767, 32767]  # clipped, not wrapped
    assert chunk.seconds == pytest.approx(4 / 44100)
    np.testing.assert_allclose(chunk.samples(), [0, 0.5, -1, 1], atol=1e-4)


@pytest.mark.parametrize("bad", [{"type": "response.hologram"}, {"no": "type"}, ["text.delta"],
                                 {"type": "done"}, {"type": "audio.delta", "pcm": "***", "sample_rate": 1},
                                 {"type": "text.delta", "text": "a", "logprobs": [{"token": "a"}]},
                                 {"type": "text.delta", "text": "a", "logprobs": "a"}, {"type": "text.delta"}])
def test_unknown_or_malformed_events_are_refused(bad):
    with pytest.raises(UnknownEventError):
        event_from_dict(bad)


def test_only_done_and_error_end_a_stream():
    assert [e.type for e in EVENTS if is_final(e)] == ["done", "error"]


def test_events_import_without_torch():
    code = "import sys, engine.events, engine.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
