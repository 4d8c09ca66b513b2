"""Server limits. Each limit has a clear error (an ApiError, engine.server.protocol): the code names
it and the message says the limit and what was asked for, so a client can show it to a user as is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.server.protocol import ApiError  # noqa: F401  (re-exported: every layer raises it)

# the pieces of a chunked body or of a fragmented realtime message that may come before their average size is
# held to Limits.min_chunk_bytes (HTTP: engine/server/http_protocol.py, realtime: engine/server/ws_protocol.py)
CHUNKS_BEFORE_AVERAGE = 1024
# the reads (what one arrival of data on the socket brings) of a request body that may come before their average size
# is held to Limits.min_read_bytes (engine/server/http_protocol.py)
READS_BEFORE_AVERAGE = 1024
SMALL_READ_PAUSE_S = 0.01  # how long reading a request body or realtime frame pauses after a read under
#                            Limits.min_read_bytes (engine/server/small_reads.py)

MiB = 1024 * 1024
OPENAI_MAX_EVENT_BYTES = 15 * MiB  # OpenAI's largest input_audio_buffer.append (its realtime API reference)


@dataclass
class Limits:
    max_message_bytes: int = 4 * MiB  # one realtime websocket message (JSON text)
    max_request_bytes: int = 32 * MiB  # one HTTP JSON body (chat completions with base64 media)
    max_upload_bytes: int = 25 * MiB  # one multipart upload (transcriptions)
    max_json_values: int = 200_000  # values (counted by commas) in one JSON body or event: parsing holds the
    #                                 event loop (2.5 M values took 2.5 s); text with more cannot fit the context
    max_audio_seconds: float = 300.0  # one clip, and the realtime input audio buffer
    max_transcription_seconds: float = 1800.0  # one recording to transcribe (in windows: asr_windows)
    max_image_pixels: int = 16_000_000  # one image, webcam frame or video frame (width*height)
    max_video_frames: int = 600  # frames buffered per realtime session
    max_sessions: int = 64  # concurrent realtime sessions
    max_session_s: float = 3600.0  # one realtime session's life (OpenAI's 60 minutes): then session_expired
    realtime_idle_s: float = 600.0  # a realtime session whose client sends nothing (no event, no audio) this long,
    #                                 with no response running, is closed (session_idle_timeout, then close code 1000)
    max_queue: int = 256  # requests waiting for the engine (beyond this: queue_full)
    concurrency: int = 1  # requests generating at once (the engine runs one at a time)
    max_new_tokens: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request names none
    max_conversation_items: int = 256  # items per realtime session
    max_session_media_bytes: int = 512 * MiB  # decoded media held by one session's conversation
    max_total_media_bytes: int = 4096 * MiB  # ... by all sessions (conversations, buffers) and HTTP requests in line
    max_stop_strings: int = 4
    stream_buffer: int = 32  # events buffered between a generation thread and its reader
    outgoing_buffer: int = 64  # server events buffered per realtime socket
    slow_reader_timeout_s: float = 30.0  # a reader that takes nothing for this long is cut off
    keepalive_s: float = 15.0  # an SSE stream with no news for this long gets a keepalive comment
    body_idle_timeout_s: float = 10.0  # an HTTP request body that sends no byte for this long is refused (408)
    body_rate_grace_s: float = 10.0  # after this long, an HTTP request body arriving at under min_body_bytes_per_s
    min_body_bytes_per_s: float = 1024.0  # on average is refused (408): a trickle held its connection for ever
    max_connections: int = 512  # open HTTP and websocket connections: past it the one idle longest is closed, or
    #                             with none idle the new one is refused (503, too_many_connections)
    refusal_linger_s: float = 5.0  # after a refusal that closes the connection (503 too_many_connections, 408, a
    #                                request that does not parse), what the client still sends is read and dropped
    #                                for this long (at most an HTTP body's limit) so that it gets the answer, not a reset
    min_chunk_bytes: int = 256  # a chunked request body whose chunks average fewer bytes (once 1024 have come) is
    #                             refused (400 chunks_too_small), a realtime message so fragmented closes its session
    #                             (1008): each piece costs the event loop its parsing
    min_read_bytes: int = 256  # a request body (with a Content-Length or chunked) whose reads average fewer bytes
    #                            (once 1024 have come) is refused (400 body_pieces_too_small): each read costs the event
    #                            loop a wake-up (a real client's packets carry ~1.4 KB, a trickle one byte)
    keep_alive_s: float = 5.0  # a kept-alive HTTP connection idle this long after an answer (or after the body
    #                            that came after an early answer) is closed
    head_timeout_s: float = 10.0  # an HTTP request head not whole this long after the connection opened (or the
    #                               previous answer) is refused (408); a connection that sent nothing is closed

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def max_frame_bytes(self) -> int:
        """The largest websocket message read whole (past it the connection closes with code 1009): twice the
        event limit and 1 MiB more, and at least OpenAI's largest event and 1 MiB more, so an event a client may send
        OpenAI (a 10 MB input_audio_buffer.append) is answered message_too_large and its session goes on."""
        return max(2 * self.max_message_bytes, OPENAI_MAX_EVENT_BYTES) + MiB


def human_bytes(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"
