"""A scripted hands-free client for realtime tests: it streams our generated speech
(app/assets/speech, espeak-ng) as a browser does (48 kHz PCM16 in 40 ms pieces, paced against the
wall clock) with webcam frames (JPEG, `capture_time` on the audio clock), and records every server
event with the time it arrived."""

from __future__ import annotations

import base64
import functools
import inspect
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from engine.media.audio import load_audio, resample
from tests.paths import REPO

MIC_RATE = 48000
PIECE_S = 0.04
SPEECH = REPO / "app/assets/speech"


def speech(name: str = "what_do_you_see_en.wav") -> np.ndarray:
    """One of our spoken questions at the microphone's rate (float32)."""
    x = load_audio(SPEECH / name)
    return resample(x, 16000, MIC_RATE).numpy()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * MIC_RATE), np.float32)


def last_loud_s(x: np.ndarray) -> float:
    """Where the speech in `x` ends (seconds)."""
    return float(np.flatnonzero(np.abs(x) > 0.02)[-1]) / MIC_RATE


@functools.lru_cache(maxsize=32)
def webcam_jpeg(i: int, size: tuple[int, int] = (256, 192)) -> bytes:
    """Our cup picture as a webcam frame, panned a little each frame (32 positions)."""
    i %= 32
    img = Image.open(REPO / "app/assets/images/cup.png").convert("RGB").resize((size[0] + 32, size[1]))
    img = img.crop((i, 0, i + size[0], size[1]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def speaks(engine) -> bool:
    """The engine answers chat in speech (Engine.chat takes output modalities once that lands)."""
    return bool(getattr(engine, "has_talker", False)) and "modalities" in inspect.signature(engine.chat).parameters


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class LiveClient:
    """`ws`: a connected websockets.sync client. `events`: (arrival time, event) of everything
    the server sent; `audio_s`: audio sent so far (the session's audio clock)."""

    ws: object
    frame_every_s: float = 0.5
    events: list[tuple[float, dict]] = field(default_factory=list)
    audio_s: float = 0.0
    sent_at: list[tuple[float, float]] = field(default_factory=list)  # (audio_s reached, wall time)
    _next_frame: float = 0.0
    _frames: int = 0

    def send(self, **event) -> None:
        self.ws.send(json.dumps(event))

    def drain(self, timeout: float = 0.0) -> None:
        """Read what has arrived (waiting up to `timeout` for the first event)."""
        while True:
            try:
                text = self.ws.recv(timeout=timeout)
            except TimeoutError:
                return
            self.events.append((time.perf_counter(), json.loads(text)))
            timeout = 0.0

    def stream(self, x: np.ndarray, pace: float = 1.0, until=None) -> bool:
        """Send `x` in 40 ms pieces at `pace` x real time, with a frame every `frame_every_s`;
        stop early (returning True) once `until(events)` holds."""
        piece = int(PIECE_S * MIC_RATE)
        start, sent0 = time.perf_counter(), self.audio_s
        pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
        for i in range(0, len(pcm), piece):
            chunk = pcm[i:i + piece]
            self.send(type="input_audio_buffer.append", audio=b64(chunk.tobytes()), sample_rate=MIC_RATE)
            self.audio_s += len(chunk) / MIC_RATE
            self.sent_at.append((self.audio_s, time.perf_counter()))
            if self.audio_s >= self._next_frame:
                self.send(type="input_video_buffer.append", image=b64(webcam_jpeg(self._frames % 32)),
                          capture_time=round(self.audio_s, 3))
                self._frames += 1
                self._next_frame += self.frame_every_s
            wait = start + (self.audio_s - sent0) / pace - time.perf_counter()
            self.drain(max(0.0, wait))
            if until is not None and until(self.types()):
                return True
        return False

    def wait(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.types()):
            assert time.monotonic() < deadline, f"not reached in time; got {self.types()[-12:]}"
            self.drain(0.05)

    def types(self) -> list[str]:
        return [e["type"] for _, e in self.events]

    def first(self, kind: str, after: int = 0, **fields) -> tuple[int, float, dict]:
        """(index, arrival time, event) of the first `kind` event at or after `after` matching `fields`."""
        for i, (t, e) in enumerate(self.events[after:], after):
            if e["type"] == kind and all(e.get(k) == v for k, v in fields.items()):
                return i, t, e
        raise AssertionError(f"no {kind} {fields or ''} after event {after}; got {self.types()[after:][:40]}")

    def wall_time_of(self, audio_s: float) -> float:
        """When the piece holding the session's audio second `audio_s` was sent."""
        return next(t for reached, t in self.sent_at if reached >= audio_s)
