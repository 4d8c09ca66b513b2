"""A realtime session's rolling video context: the webcam frames a client streams
(`input_video_buffer.append`, 1-2 fps) kept for the last `window_seconds`, and attached to the
user's next turn as one video part.

Settings come from `session.update` → `"video": {"window_seconds": 10, "fps": 1}` (our extension
of the OpenAI protocol). Frames arriving faster than `fps` are thinned before they are decoded
(`wants`), old ones are dropped, and memory is bounded in frames and bytes (engine.media.video's
WebcamClip does the bookkeeping). Frames of mixed sizes are accepted: a turn's frames are brought
to the newest frame's size. The window ends *now* on the server's clock, so frames of a camera
that stopped sending age out instead of being passed off as the present.

A turn's video is kept compact: the uint8 frames the model will see (a small WebcamClip), not
their float pixel values (4x the bytes); the engine preprocesses them when a response runs, with
the same result. Older turns' video is dropped from the conversation after `keep_turns` newer
turns with video (the session does that), so a long hands-free session holds a bounded amount.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from engine.errors import SettingError
from engine.media.video import VideoSamplingConfig, WebcamClip
from engine.server.codec import finite_number, shown_number

MiB = 1024 * 1024


class VideoContextError(SettingError):
    """Bad `video` session settings; `code` and `param` as the server reports them."""


@dataclass(frozen=True)
class VideoContextConfig:
    window_seconds: float = 10.0  # how far back the frames attached to a turn reach
    fps: float = 1.0  # frames kept (and sampled for the model) per second
    max_bytes: int = 64 * MiB  # decoded frames held per session (server setting, not on the wire)
    keep_turns: int = 4  # the newest user turns that keep their video in the conversation (server setting)

    WIRE_FIELDS = ("window_seconds", "fps")
    WINDOW_RANGE = (1.0, 60.0)
    FPS_RANGE = (0.25, 2.0)  # the model's video path samples at most 2 frames per second

    @classmethod
    def from_wire(cls, spec: Any, base: "VideoContextConfig | None" = None,
                  param: str = "session.video") -> "VideoContextConfig":
        """`session.video` of a session.update; fields left out keep `base`'s values."""
        base = base or cls()
        if not isinstance(spec, dict):
            raise VideoContextError(f"'{param}' must be an object such as {{\"window_seconds\": 10, \"fps\": 1}}",
                                    "invalid_type", param)
        for key in spec:
            if key not in cls.WIRE_FIELDS:
                raise VideoContextError(f"unknown field {str(key)[:60]!r} in '{param}' (known: "
                                        f"{', '.join(cls.WIRE_FIELDS)})", "unknown_parameter", f"{param}.{key}")
        values = {}
        for name, (lo, hi) in (("window_seconds", cls.WINDOW_RANGE), ("fps", cls.FPS_RANGE)):
            value = spec.get(name, getattr(base, name))
            if not finite_number(value):
                raise VideoContextError(f"'{param}.{name}' must be a number", "invalid_type", f"{param}.{name}")
            if not lo <= value <= hi:
                raise VideoContextError(f"'{param}.{name}' must be between {lo:g} and {hi:g}, got {shown_number(value)}",
                                        "invalid_value", f"{param}.{name}")
            values[name] = float(value)
        return replace(base, **values)

    def to_wire(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in self.WIRE_FIELDS}

    @property
    def max_frames(self) -> int:
        """Most frames the window can hold after thinning."""
        return math.ceil(self.window_seconds * self.fps / WebcamClip.MIN_INTERVAL_FRACTION) + 1


class VideoContext:
    """One session's rolling frames. `clock` is the server's steady clock (time.monotonic)."""

    def __init__(self, config: VideoContextConfig | None = None, max_frames: int | None = None, clock=time.monotonic):
        self.config = config or VideoContextConfig()
        self.frame_cap = max_frames  # the server's limit (Limits.max_video_frames), if lower
        self.clock = clock
        self.clip = WebcamClip()
        self._arrived: float | None = None  # server time the newest frame arrived
        self.configure(self.config)

    def configure(self, config: VideoContextConfig) -> None:
        """Apply new settings; frames already held are kept if they still fit."""
        self.config = config
        clip = self.clip
        clip.sampling = replace(VideoSamplingConfig(), fps=config.fps)
        clip.history_seconds = config.window_seconds
        clip.max_fps = config.fps
        clip.max_buffer_frames = min(config.max_frames, self.frame_cap or config.max_frames)
        clip.max_buffer_bytes = config.max_bytes

    # -- frames in
    def wants(self, capture_time: float) -> bool:
        """Ask before decoding a frame: False when it would be thinned out."""
        return self.clip.wants(capture_time)

    def add(self, frame, capture_time: float) -> bool:
        kept = self.clip.add_frame(frame, capture_time)
        if kept:
            self._arrived = self.clock()
        return kept

    def clear(self) -> None:
        self.clip.clear()
        self._arrived = None

    def __len__(self) -> int:
        return len(self.clip)

    @property
    def nbytes(self) -> int:
        return self.clip.nbytes

    # -- frames out
    def _expire(self) -> None:
        """Drop frames older than the window, measured back from now (in capture-time units)."""
        span = self.clip.time_span
        if span is None or self._arrived is None:
            return
        now_in_capture_time = span[1] + (self.clock() - self._arrived)
        self.clip.drop_before(now_in_capture_time - self.config.window_seconds)

    def take_turn_video(self) -> tuple[dict, dict] | None:
        """The frames of the last `window_seconds` as (engine part, public content part) for the
        user's turn, or None when there are none; the frames are consumed (the next turn gets the
        frames that come after). The part's video is a compact clip (see `compact_clip`)."""
        self._expire()
        if len(self.clip) == 0:
            return None
        span, held = self.clip.time_span, len(self.clip)
        turn = compact_clip(self.clip)
        self.clip.clear()
        public = {"type": "input_video", "frames": held, "seconds": round(span[1] - span[0], 3)}
        return {"type": "video", "video": turn}, public


def compact_clip(clip: WebcamClip) -> WebcamClip:
    """Only the frames `clip` would give the model (its sampling picks, brought to one size), as
    uint8 in a clip of their own: it turns into the same VideoInputs as `clip` itself (its n frames,
    the window's first and last among them, resample to all n at their capture times), in a
    quarter of the bytes of the pixel values, and is preprocessed only when a response runs."""
    sampled = clip.sample()
    out = WebcamClip(sampling=clip.sampling, history_seconds=float("inf"), max_buffer_frames=len(sampled.frames))
    last = None
    for frame, t in zip(sampled.frames, sampled.timestamps):
        if t != last:  # a frame picked twice (fewer frames than sample times) is kept once
            out.add_frame(frame, float(t))
            last = t
    return out
