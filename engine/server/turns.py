"""Server-side turn detection for the realtime protocol (`session.update` with
`turn_detection: {"type": "server_vad", "threshold", "prefix_padding_ms", "silence_duration_ms"}`):
a streaming voice activity detector over a session's input audio, built on the silero-vad model
(shipped inside the `silero-vad` package: it is loaded from there, never downloaded).

`TurnDetector.feed` takes PCM pieces at any rate (resampled to 16 kHz as they come), runs the model
(engine.models.vad, numpy) on 32 ms windows and reports

* `SpeechStarted(audio_start_ms)` once the windows whose speech probability reaches `threshold` span
  `min_speech_ms` (250 ms, silero's own shortest speech): a cough or a click over a reply is no turn,
  so it neither interrupts the reply nor gets one; `audio_start_ms` is the first such window's start
  minus `prefix_padding_ms` (OpenAI's meaning: the start of the audio the turn will hold);
* `SpeechStopped(audio_end_ms, audio)` once the probability has stayed below `threshold - 0.15`
  (silero's hysteresis, at least 0.01) for `silence_duration_ms`; `audio` is the turn, 16 kHz PCM16, from
  `audio_start_ms` to `audio_end_ms` (prefix padding and the trailing silence included). A sound that
  falls silent before it spans `min_speech_ms` ends without any event.

Times count milliseconds of all audio fed during the session (they keep counting across `clear`;
`start_ms`: the session's audio before this detector, written while turn detection was off).
Memory is bounded: before speech only the prefix padding (RECENT_AUDIO_MS at least) is kept; a turn
that reaches `max_turn_seconds` (the server's audio limit) is ended there (`reason="max_duration"`)
and a new one starts if the speaker goes on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.errors import SettingError
from engine.media.audio import StreamingResampler
from engine.server.codec import finite_number, shown_number
from engine.models.vad.silero import CONTEXT, SAMPLE_RATE as VAD_RATE, WINDOW, SileroVad, VadUnavailable

WINDOW_MS = 1000 * WINDOW // VAD_RATE  # 32
HYSTERESIS = 0.15  # speech goes on while the probability stays above threshold - this (silero's rule)
MAX_PADDING_MS = 10_000
MAX_SILENCE_MS = 10_000
MIN_IDLE_TIMEOUT_MS, MAX_IDLE_TIMEOUT_MS = 5_000, 30_000  # OpenAI's range for idle_timeout_ms
RECENT_AUDIO_MS = 300  # audio kept before a turn at least (OpenAI's default padding): an idle timeout commits it
MIN_SPEECH_MS = 250  # silero-vad's min_speech_duration_ms: shorter sounds (a cough, a click) are not speech

__all__ = ["VAD_RATE", "ServerVad", "SpeechStarted", "SpeechStopped", "TurnDetector", "TurnDetectionError",
           "VadUnavailable"]


class TurnDetectionError(SettingError):
    """Bad `turn_detection` settings; `code` and `param` as the server reports them."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerVad:
    """OpenAI's `server_vad` turn detection settings (defaults as OpenAI's)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True  # the server starts a response when a turn ends
    interrupt_response: bool = True  # speech starting during a response cancels it (barge-in)
    idle_timeout_ms: int | None = None  # no speech this long after a reply's audio ended: a response is made

    FIELDS = ("type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
              "interrupt_response", "idle_timeout_ms")

    @classmethod
    def from_wire(cls, spec: Any, param: str = "session.turn_detection") -> "ServerVad | None":
        """`turn_detection` of a session.update: null (push-to-talk: the client commits) or
        {"type": "server_vad", ...}; fields left out keep their defaults."""
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise TurnDetectionError(f"'{param}' must be null or an object such as {{\"type\": \"server_vad\"}}",
                                     "invalid_type", param)
        kind = spec.get("type")
        kind = "server_vad" if kind is None else kind  # (a null field is left out, as everywhere)
        if kind != "server_vad":
            raise TurnDetectionError(f"'{param}.type' {str(kind)[:40]!r} is not supported; use 'server_vad' (or null "
                                     "for push-to-talk)", "unsupported_parameter", f"{param}.type")
        for key in spec:
            if key not in cls.FIELDS:
                raise TurnDetectionError(f"unknown field {str(key)[:60]!r} in '{param}' (known: "
                                         f"{', '.join(cls.FIELDS)})", "unknown_parameter", f"{param}.{key}")
        d = cls()
        idle = spec.get("idle_timeout_ms")
        return cls(threshold=_number(spec, "threshold", d.threshold, 0.0, 1.0, param),
                   prefix_padding_ms=int(_number(spec, "prefix_padding_ms", d.prefix_padding_ms, 0, MAX_PADDING_MS,
                                                 param, integer=True)),
                   silence_duration_ms=int(_number(spec, "silence_duration_ms", d.silence_duration_ms, 0,
                                                   MAX_SILENCE_MS, param, integer=True)),
                   create_response=_flag(spec, "create_response", d.create_response, param),
                   interrupt_response=_flag(spec, "interrupt_response", d.interrupt_response, param),
                   idle_timeout_ms=None if idle is None else int(_number(
                       spec, "idle_timeout_ms", None, MIN_IDLE_TIMEOUT_MS, MAX_IDLE_TIMEOUT_MS, param, integer=True)))

    def to_wire(self) -> dict:
        return {"type": "server_vad", **asdict(self)}


def _number(spec: dict, name: str, default, lo, hi, param: str, integer: bool = False) -> float:
    value = spec.get(name, default)
    if value is None:
        return default
    ok = finite_number(value)
    if not ok or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise TurnDetectionError(f"'{param}.{name}' must be {kind}, got {str(value)[:40]!r}", "invalid_type",
                                 f"{param}.{name}")
    if not lo <= value <= hi:
        raise TurnDetectionError(f"'{param}.{name}' must be between {lo} and {hi}, got {shown_number(value)}", "invalid_value",
                                 f"{param}.{name}")
    return value


def _flag(spec: dict, name: str, default: bool, param: str) -> bool:
    value = spec.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TurnDetectionError(f"'{param}.{name}' must be true or false", "invalid_type", f"{param}.{name}")
    return value


# --------------------------------------------------------------------------- events


@dataclass
class SpeechStarted:
    audio_start_ms: int


@dataclass
class SpeechStopped:
    audio_start_ms: int
    audio_end_ms: int
    audio: np.ndarray  # int16 PCM at `sample_rate`, from audio_start_ms to audio_end_ms
    reason: str = "silence"  # or "max_duration"
    sample_rate: int = VAD_RATE

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


# --------------------------------------------------------------------------- detector


class TurnDetector:
    """One session's streaming turn detector (not thread-safe: one feeder at a time)."""

    def __init__(self, config: ServerVad, max_turn_seconds: float = 300.0, model: SileroVad | None = None,
                 start_ms: int = 0, min_speech_ms: int = MIN_SPEECH_MS):
        if max_turn_seconds <= 0:
            raise ValueError("max_turn_seconds must be positive")
        self.config = config
        self.min_speech_ms = min_speech_ms
        self.max_turn_samples = int(max_turn_seconds * VAD_RATE)
        self.model = model or SileroVad.from_package()
        self._resampler: StreamingResampler | None = None
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet a whole window
        self._h, self._c = self.model.initial_state()
        self._context = np.zeros(CONTEXT, np.float32)
        self._windows = 0  # windows run since the detector started (the clock, from start_ms)
        self._start_ms = int(start_ms)  # the session's audio before this detector (push-to-talk turns)
        self._before = np.zeros(0, np.int16)  # recent audio before the turn (prefix padding)
        self._turn: list[np.ndarray] = []
        self._turn_samples = 0
        self._turn_start_ms = 0
        self._speech_from_ms = 0  # the turn's first and latest windows at the threshold
        self._speech_until_ms = 0
        self._announced = False  # SpeechStarted was reported (the turn has min_speech_ms of speech)
        self._silence_since_ms: int | None = None
        self.probability = 0.0  # of the latest window

    # -- state
    @property
    def in_speech(self) -> bool:
        """A turn is under way (its SpeechStarted was reported)."""
        return self._announced

    @property
    def turn_samples(self) -> int:
        """16 kHz samples of the turn under way (0 when none is)."""
        return self._turn_samples

    def turn_audio(self, start: int = 0) -> np.ndarray:
        """The turn under way from its sample `start` on (16 kHz PCM16; only the pieces past `start` are copied):
        the samples its SpeechStopped will hold from there."""
        pieces, held = [], self._turn_samples
        for piece in reversed(self._turn):
            if held <= start:
                break
            pieces.append(piece[max(0, start - (held - len(piece))):])
            held -= len(piece)
        return np.concatenate(pieces[::-1]) if pieces else np.zeros(0, np.int16)

    @property
    def audio_ms(self) -> int:
        """Milliseconds of audio analysed so far in the session."""
        return self._start_ms + self._windows * WINDOW_MS

    @property
    def held_bytes(self) -> int:
        resampler = 4 * self._resampler.buffered if self._resampler is not None else 0
        return self._pending.nbytes + self._before.nbytes + 2 * self._turn_samples + resampler

    @property
    def silence_below(self) -> float:
        """Probability under which a window counts as silence (silero's hysteresis, floored)."""
        return min(self.config.threshold, max(self.config.threshold - HYSTERESIS, 0.01))

    def update(self, config: ServerVad) -> None:
        """New settings mid-session (a session.update); a turn in progress carries on."""
        self.config = config

    def clear(self) -> None:
        """Forget buffered audio, any turn in progress and the model's memory of the stream
        (input_audio_buffer.clear); the clock goes on."""
        self._h, self._c = self.model.initial_state()
        self._context = np.zeros(CONTEXT, np.float32)
        self._before = np.zeros(0, np.int16)
        self._turn, self._turn_samples, self._silence_since_ms, self._announced = [], 0, None, False

    # -- audio in
    def feed(self, samples: np.ndarray, sample_rate: int) -> list[SpeechStarted | SpeechStopped]:
        """Take the next piece of audio (int16 PCM or float in [-1, 1], mono); return the turn
        events it completes, in order."""
        pcm = np.asarray(samples).reshape(-1)
        x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        if self._resampler is None or self._resampler.orig_freq != int(sample_rate):
            self._resampler = StreamingResampler(int(sample_rate), VAD_RATE)
        y = self._resampler.feed(x)
        self._pending = np.concatenate([self._pending, y]) if self._pending.size else y
        events: list[SpeechStarted | SpeechStopped] = []
        n = self._pending.size // WINDOW
        for i in range(n):
            events += self._window(self._pending[i * WINDOW:(i + 1) * WINDOW])
        self._pending = self._pending[n * WINDOW:].copy()
        return events

    def _window(self, window: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        prob, self._h, self._c = self.model.probability(np.concatenate([self._context, window]), self._h, self._c)
        self._context = window[-CONTEXT:]
        self.probability = prob
        start_ms = self.audio_ms
        self._windows += 1
        end_ms = self.audio_ms
        pcm = np.clip(np.round(window * 32767.0), -32768, 32767).astype(np.int16)
        cfg = self.config
        events: list[SpeechStarted | SpeechStopped] = []
        if not self._turn:
            if prob >= cfg.threshold:
                pad = min(len(self._before), cfg.prefix_padding_ms * VAD_RATE // 1000)
                prefix = self._before[len(self._before) - pad:]
                self._turn, self._turn_samples = [prefix, pcm], len(prefix) + len(pcm)
                self._turn_start_ms = start_ms - 1000 * pad // VAD_RATE
                self._speech_from_ms = self._speech_until_ms = start_ms
                self._silence_since_ms = None
                self._before = np.zeros(0, np.int16)
            else:
                self._keep_before(pcm)
                return events
        else:
            self._turn.append(pcm)
            self._turn_samples += len(pcm)
        if prob >= cfg.threshold:
            self._silence_since_ms = None
            self._speech_until_ms = end_ms
        elif prob < self.silence_below and self._silence_since_ms is None:
            self._silence_since_ms = start_ms
        if not self._announced and self._speech_until_ms - self._speech_from_ms >= self.min_speech_ms:
            self._announced = True
            events.append(SpeechStarted(self._turn_start_ms))
        if self._silence_since_ms is not None and end_ms - self._silence_since_ms >= cfg.silence_duration_ms:
            events += self._end(end_ms, "silence")
        elif self._turn_samples >= self.max_turn_samples:
            events += self._end(end_ms, "max_duration")
        return events

    def _keep_before(self, pcm: np.ndarray) -> None:
        """Audio outside any turn: only the prefix padding's worth of it is kept (RECENT_AUDIO_MS at least)."""
        keep = max(self.config.prefix_padding_ms, RECENT_AUDIO_MS) * VAD_RATE // 1000
        self._before = np.concatenate([self._before, pcm])[-keep:]

    def recent_audio(self) -> np.ndarray:
        """The latest audio heard outside any turn (RECENT_AUDIO_MS or the prefix padding), 16 kHz PCM16: what
        an idle timeout commits."""
        return self._before.copy()

    def end_turn(self, reason: str = "commit") -> SpeechStopped | None:
        """End the turn in progress now (a client's input_audio_buffer.commit in server_vad mode);
        None when no one is speaking (a sound too short to be speech is dropped)."""
        if not self._turn:
            return None
        ended = self._end(self.audio_ms, reason)
        return ended[0] if ended else None

    def _end(self, end_ms: int, reason: str) -> list[SpeechStopped]:
        """The turn's SpeechStopped; none for a sound that never spanned min_speech_ms (its audio becomes
        the padding before the next turn)."""
        audio = np.concatenate(self._turn)
        announced = self._announced
        self._turn, self._turn_samples, self._silence_since_ms, self._announced = [], 0, None, False
        if not announced:
            self._keep_before(audio)
            return []
        return [SpeechStopped(self._turn_start_ms, end_ms, audio, reason)]
