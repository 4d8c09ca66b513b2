"""The event stream every engine call returns: the one vocabulary shared by the runtime, the server's
wire mapping (engine.server.protocol), the client and the studio. It imports neither torch nor the
engine, so a UI-only studio can use it.

A response is a stream of:

  * `TextDelta`      — the next piece of text (`text.delta`), with the log probabilities of the tokens that
                       made it when they were asked for (`TokenLogprob`);
  * `AudioChunk`     — a chunk of speech / sound / music: PCM16 mono at `sample_rate`, with the text span
                       it speaks (`audio.delta`);
  * `ImagePreview`   — a cheap preview of an image being denoised, at `step` of `total_steps` (`image.preview`);
  * `ImageDone`      — a finished image (PNG), with a mask and overlay for segmentation (`image.done`);
  * `Progress`       — what a long step is doing (`progress`);
  * `QueuePosition`  — the request's place in the server's line, 0 = running (`queue.position`);

ending with exactly one `Done` (with per-modality figures) or one `Error`. A consumer handles every
kind explicitly; a dict of an unknown kind is refused by `event_from_dict` (UnknownEventError) and
must be treated as an error, never as the end of the stream.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np


@dataclass
class GenerationStats:
    """Figures of one response. Times in seconds from the request's start (time to first ...) or
    durations; 0 where the response had nothing of that modality."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prompt_image_tokens: int = 0  # of prompt_tokens: image and video patch tokens
    prompt_audio_tokens: int = 0  # of prompt_tokens: audio tokens (the rest is text and the chat template)
    audio_tokens: int = 0  # speech out: the talker's latent patches (beside new_tokens, the thinker's text)
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    queue_wait_s: float = 0.0
    media_encode_s: float = 0.0
    # speech / sound / music out
    time_to_first_audio_s: float = 0.0
    audio_seconds: float = 0.0          # duration of the audio produced
    audio_real_time_factor: float = 0.0  # synthesis time / audio duration (< 1: faster than real time)
    # images out
    time_to_first_preview_s: float = 0.0
    image_steps: int = 0
    image_step_s: float = 0.0           # seconds per denoising step
    images: int = 0

    def summary(self) -> str:
        parts = []
        if self.new_tokens or not (self.audio_seconds or self.images):
            parts += [f"prompt tokens {self.prompt_tokens}", f"new tokens {self.new_tokens}",
                      f"time to first token {self.time_to_first_token_s * 1000:.1f} ms",
                      f"{self.decode_tokens_per_s:.1f} tokens/s"]
        if self.audio_seconds:
            parts += [f"time to first audio {self.time_to_first_audio_s * 1000:.0f} ms",
                      f"{self.audio_seconds:.2f} s of audio", f"real-time factor {self.audio_real_time_factor:.2f}"]
        if self.images:
            if self.time_to_first_preview_s:
                parts.append(f"time to first preview {self.time_to_first_preview_s * 1000:.0f} ms")
            parts += [f"{self.image_steps} steps", f"{self.image_step_s:.2f} s/step"]
        return ", ".join(parts)

    @classmethod
    def from_dict(cls, d: dict | None) -> "GenerationStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


class UnknownEventError(ValueError):
    """A dict whose `type` is not an event of this vocabulary (or is malformed)."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(data: str | None, name: str) -> bytes | None:
    if data is None:
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as e:
        raise UnknownEventError(f"'{name}' is not valid base64: {e}") from None


class _Event:
    type: ClassVar[str]
    _BYTES: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        """JSON-ready: bytes fields are base64 strings, nested figures plain dicts."""
        d = asdict(self)  # type: ignore[call-overload]
        for name in self._BYTES:
            d[name] = _b64(d[name])
        return {"type": self.type, **d}

    @classmethod
    def _from(cls, d: dict):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kw = {k: v for k, v in d.items() if k in names}
        for name in cls._BYTES:
            if name in kw:
                kw[name] = _unb64(kw[name], name)
        try:
            return cls(**kw)
        except TypeError as e:
            raise UnknownEventError(f"malformed '{cls.type}' event: {e}") from None


@dataclass
class TokenLogprob:
    """One generated token's log probability (natural log, of the model's own distribution), as OpenAI's
    `logprobs.content` entry: `token` is its text (its `bytes` decoded; a token holding part of a multibyte
    character shows U+FFFD there, its bytes are its own), `top_logprobs` its best alternatives, most likely
    first (an alternative's own list is empty)."""

    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any) -> "TokenLogprob":
        try:
            return cls(token=str(d["token"]), bytes=[int(b) for b in d["bytes"]], logprob=float(d["logprob"]),
                       top_logprobs=[cls.from_dict(t) for t in d.get("top_logprobs") or []])
        except (KeyError, TypeError, ValueError) as e:
            raise UnknownEventError(f"malformed token logprob: {e}") from None


@dataclass
class TextDelta(_Event):
    """`logprobs`: one entry per token whose text this delta completes (None when they were not asked for)."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    type: ClassVar[str] = "text.delta"

    @classmethod
    def _from(cls, d: dict) -> "TextDelta":
        entries = d.get("logprobs")
        if entries is not None and not isinstance(entries, list):
            raise UnknownEventError("malformed 'text.delta' event: 'logprobs' must be a list")
        try:
            return cls(text=d["text"],
                       logprobs=None if entries is None else [TokenLogprob.from_dict(e) for e in entries])
        except KeyError as e:
            raise UnknownEventError(f"malformed 'text.delta' event: {e}") from None


@dataclass
class AudioChunk(_Event):
    """`pcm`: little-endian int16 mono samples at `sample_rate`. `text`: the span of text this chunk
    speaks ("" for sound or music, or when it continues the previous span); `start_s`: where the
    chunk starts in the response's audio."""

    pcm: bytes
    sample_rate: int
    text: str = ""
    start_s: float = 0.0
    type: ClassVar[str] = "audio.delta"
    _BYTES: ClassVar[tuple[str, ...]] = ("pcm",)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate if self.sample_rate else 0.0

    def samples(self) -> np.ndarray:
        """float32 samples in [-1, 1)."""
        return np.frombuffer(self.pcm, dtype="<i2").astype(np.float32) / 32768.0

    @classmethod
    def from_samples(cls, samples, sample_rate: int, text: str = "", start_s: float = 0.0) -> "AudioChunk":
        """float samples in [-1, 1] (clipped) -> a chunk."""
        arr = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
        return cls(pcm=np.round(arr * 32767.0).astype("<i2").tobytes(), sample_rate=int(sample_rate),
                   text=text, start_s=float(start_s))


@dataclass
class ImagePreview(_Event):
    """A cheap preview (PNG) of image `index` after `step` of `total_steps` denoising steps."""

    image: bytes
    step: int
    total_steps: int
    width: int = 0
    height: int = 0
    index: int = 0
    type: ClassVar[str] = "image.preview"
    _BYTES: ClassVar[tuple[str, ...]] = ("image",)


@dataclass
class ImageDone(_Event):
    """A finished image (PNG). Segmentation adds the binary `mask` and the `overlay` (PNGs); `note`
    says what the user should know (e.g. "the mask is empty: the target was not found")."""

    image: bytes
    width: int
    height: int
    index: int = 0
    seed: int | None = None
    mask: bytes | None = None
    overlay: bytes | None = None
    note: str = ""
    type: ClassVar[str] = "image.done"
    _BYTES: ClassVar[tuple[str, ...]] = ("image", "mask", "overlay")


TRANSCRIBING_STAGE = "transcribing"  # a long recording's ASR: `done` of `total` windows (engine.models.thinker.asr_windows)
# (the same stage, before speech cloned from clips without a transcript: `total` clips; Engine.speak)
TRANSCRIBING_REFERENCE = "transcribing the reference clip (no transcript was given)"
PREFILL_STAGE = "prefill"  # a long prompt read by the model: `done` of `total` prompt tokens (engine.generate)
MEDIA_STAGE = "encoding media"  # a prompt's pictures, videos and clips through their encoders: `total` of them


def transcript_joint(before: str, after: str) -> str:
    """What goes between two consecutive pieces of one transcript (a long recording's windows, engine.models.thinker
    .asr_windows; the studio's live partials, which keep finished windows): a space, unless either side is empty,
    already has one, or is written without spaces (Chinese, Japanese)."""
    if not before or not after or before[-1].isspace() or after[0].isspace():
        return ""
    return "" if unspaced(before[-1]) or unspaced(after[0]) else " "


def unspaced(ch: str) -> bool:
    """A character of a script written without spaces between words (CJK ideographs, kana, their punctuation)."""
    return "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"


@dataclass
class Progress(_Event):
    """`stage` (e.g. PREFILL_STAGE, "denoising", "decoding image", TRANSCRIBING_STAGE), `done` of `total` units."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    type: ClassVar[str] = "progress"


@dataclass
class QueuePosition(_Event):
    """0 = the request is running; n >= 1 = n-th in line. `waiting`: requests in line in all."""

    position: int
    waiting: int = 0
    type: ClassVar[str] = "queue.position"


@dataclass
class Done(_Event):
    """End of a response. finish_reason: 'stop' (eos, stop string, or the audio/image is complete),
    'length', 'cancelled'. `result`: task-specific, e.g. ASR {"language", "text"}."""

    text: str
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    token_ids: list[int] = field(default_factory=list)
    result: dict | None = None
    type: ClassVar[str] = "done"

    @classmethod
    def _from(cls, d: dict) -> "Done":
        try:
            return cls(text=d.get("text", ""), finish_reason=d["finish_reason"],
                       stats=GenerationStats.from_dict(d.get("stats")), token_ids=list(d.get("token_ids") or []),
                       result=d.get("result"))
        except (KeyError, TypeError) as e:
            raise UnknownEventError(f"malformed 'done' event: {e}") from None


@dataclass
class Error(_Event):
    message: str
    code: str = "engine_error"
    type: ClassVar[str] = "error"


Event = TextDelta | AudioChunk | ImagePreview | ImageDone | Progress | QueuePosition | Done | Error
EVENT_TYPES: dict[str, type] = {c.type: c for c in (TextDelta, AudioChunk, ImagePreview, ImageDone, Progress,
                                                     QueuePosition, Done, Error)}
FINAL_TYPES = (Done, Error)


def event_from_dict(d: Any) -> Event:
    """The event a `to_dict()` dict describes. Raises UnknownEventError for an unknown `type` or a
    malformed event: the caller turns that into an error, never into the end of the stream."""
    if not isinstance(d, dict):
        raise UnknownEventError(f"an event must be an object, got {type(d).__name__}")
    kind = EVENT_TYPES.get(d.get("type"))  # type: ignore[arg-type]
    if kind is None:
        raise UnknownEventError(f"unknown event type {d.get('type')!r}")
    return kind._from(d)


def is_final(event: Event) -> bool:
    return isinstance(event, FINAL_TYPES)
