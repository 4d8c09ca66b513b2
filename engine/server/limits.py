"""Server limits and the one error type every layer raises for a request it refuses.

Each limit has a clear error: the code names it and the message says the limit and what was
asked for, so a client can show it to a user as is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1024 * 1024


@dataclass
class Limits:
    max_message_bytes: int = 4 * MiB  # one realtime websocket message (JSON text)
    max_request_bytes: int = 32 * MiB  # one HTTP JSON body (chat completions with base64 media)
    max_upload_bytes: int = 25 * MiB  # one multipart upload (transcriptions)
    max_audio_seconds: float = 300.0  # one clip, and the realtime input audio buffer
    max_image_pixels: int = 16_000_000  # one image, webcam frame or video frame (width*height)
    max_video_frames: int = 600  # frames buffered per realtime session
    max_sessions: int = 64  # concurrent realtime sessions
    max_queue: int = 256  # requests waiting for the engine (beyond this: queue_full)
    concurrency: int = 1  # requests generating at once (the engine runs one at a time)
    max_new_tokens: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request names none
    max_conversation_items: int = 256  # items per realtime session
    max_session_media_bytes: int = 512 * MiB  # decoded media held by one session's conversation
    max_stop_strings: int = 4
    stream_buffer: int = 32  # events buffered between a generation thread and its reader
    outgoing_buffer: int = 64  # server events buffered per realtime socket
    slow_reader_timeout_s: float = 30.0  # a reader that takes nothing for this long is cut off

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ApiError(Exception):
    """A refused request. `status` is the HTTP status; `code` the stable machine-readable code;
    `kind` the OpenAI error type (invalid_request_error, authentication_error, server_error, ...)."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400,
                 kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param
        self.kind = kind or _kind_for(status)

    def to_openai(self) -> dict:
        """The OpenAI error object (HTTP bodies and realtime `error` events)."""
        return {"type": self.kind, "code": self.code, "message": self.message, "param": self.param}


def _kind_for(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def human_bytes(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"
