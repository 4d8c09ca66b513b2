"""The one mapping between engine events (engine.events) and the wire, for the HTTP API, the realtime
server and the client alike: error codes and error bodies, usage, metrics, the realtime server
events (OpenAI Realtime GA names plus our documented extensions) and the HTTP SSE chunks.

Each direction sits next to its inverse: the server encodes engine events into wire events
(`RealtimeResponseEncoder`, `ChatChunkEncoder`), the client decodes them back into the same engine
events (`RealtimeResponseDecoder`, `SseDecoder`). Every event kind is handled explicitly; a kind
that is not known here is an error (UnknownEventError), never the end of a stream.

This module imports neither torch nor the server's web stack (a UI-only studio imports it through
engine.client).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.events import (AudioChunk, Done, Error, Event, GenerationStats, ImageDone, ImagePreview, Progress,
                           QueuePosition, TextDelta, TokenLogprob, UnknownEventError)
from engine.events import _b64, _unb64  # bytes <-> base64 exactly as the events' own JSON form

# =========================================================================== error codes and bodies

# Every code the server sends, with the HTTP status it answers with when it refuses a request.
ERROR_CODES: dict[str, int] = {
    # the request itself
    "invalid_json": 400, "invalid_event": 400, "unknown_event": 400, "invalid_type": 400, "invalid_value": 400,
    "missing_field": 400, "unknown_parameter": 400, "unsupported_parameter": 400,
    "unsupported_content_type": 400,  # a content part's type; a body's Content-Type: sent with status 415
    "invalid_multipart": 400, "invalid_request": 400, "http_error": 400,
    "unsupported_content_encoding": 415, "invalid_content_encoding": 400,  # a body's Content-Encoding
    "invalid_text": 400,  # text that is not valid Unicode (engine.server.text)
    "invalid_http_request": 400,  # a request that is not valid HTTP/1.1 (engine.server.http_protocol)
    "request_header_fields_too_large": 431,  # its request line and headers past the parser's buffer
    "request_timeout": 408,  # a request body that stopped arriving (Limits.body_idle_timeout_s)
    "chunks_too_small": 400,  # a chunked body whose chunks average under Limits.min_chunk_bytes
    "body_pieces_too_small": 400,  # a body whose reads average under Limits.min_read_bytes
    # media
    "invalid_base64": 400, "invalid_url": 400, "url_not_supported": 400, "invalid_audio": 400,
    "invalid_audio_format": 400, "invalid_image": 400, "invalid_video": 400, "invalid_media": 400,
    "sample_rate_mismatch": 400,
    # limits
    "message_too_large": 413, "payload_too_large": 413, "too_many_json_values": 413, "audio_too_long": 400,
    "image_too_large": 400, "video_too_long": 400, "too_many_parts": 400, "too_many_messages": 400,
    "max_tokens_exceeded": 400,
    "context_length_exceeded": 400, "conversation_too_long": 400, "session_media_limit": 400, "media_too_large": 400,
    "server_media_limit": 503,
    "session_text_limit": 400,
    "modality_not_supported": 400, "voice_not_found": 400, "voice_exists": 409,
    # realtime session state
    "conversation_empty": 400, "invalid_state": 400, "input_audio_buffer_commit_empty": 400,
    "input_video_buffer_commit_empty": 400, "item_not_found": 400, "conversation_already_has_active_response": 400,
    "response_cancel_not_active": 400,
    # what this server lacks
    "turn_detection_unavailable": 500,
    # who and where
    "unauthorized": 401, "model_not_found": 404, "not_found": 404, "method_not_allowed": 405,
    "upgrade_required": 426,  # a plain HTTP request to the websocket route
    # load
    "queue_full": 429, "transcription_backlog": 429, "session_limit_reached": 503, "server_shutting_down": 503,
    "too_many_connections": 503,  # every one of the server's Limits.max_connections connections busy
    "session_expired": 400,  # a realtime session past its longest life (OpenAI's 60 minutes)
    "session_idle_timeout": 400,  # a realtime session whose client sent nothing for Limits.realtime_idle_s
    # faults
    "engine_error": 500, "server_error": 500,
}

# Codes the engine's own errors carry (engine.errors.MingError.code and the engine's Error events) that
# the wire names differently; every other engine code is sent as it is (its status from ERROR_CODES,
# 500 for a code not listed there: an engine fault).
ENGINE_CODES: dict[str, str] = {
    "talker_unavailable": "modality_not_supported",  # the checkpoint has no (usable) talker
    "unsupported_model": "modality_not_supported",   # ... no image generator
    "talker_error": "engine_error", "checkpoint_error": "engine_error", "tokenizer_error": "engine_error",
    "invalid_config": "engine_error",
}

# Codes the client gives its own Error events (never sent by the server).
CLIENT_ERROR_CODES: dict[str, str] = {
    "connection_lost": "the connection to the server dropped (or the server stopped answering)",
    "connect_failed": "the server could not be reached, or refused the connection",
    "protocol_error": "the server sent something this client does not understand",
    "timeout": "the server did not answer in time",
    "not_supported_by_engine": "the engine behind an openai+http(s):// URL has no route for this request",
}


def read_json(text: str | bytes) -> Any:
    """json.loads, JSON nested deeper than Python's recursion limit raised as the ValueError of any other JSON it cannot
    read (its RecursionError escaped the readers of an answer: [[[...]]] 100 000 deep from a server crashed the studio's
    engine check and a chat's stream)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header, request's or answer's: 'audio/L16; rate=16000' -> ('audio/l16', {'rate': '16000'}), the
    type in lower case and its parameters ("" for a header that is absent)."""
    kind, *params = content_type.split(";")
    options = {}
    for param in params:
        name, _, value = param.partition("=")
        options[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), options


def error_kind(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# an error echoes what the client sent (a field's name in `param`, a value in its message) at most this long: a
# realtime session.update naming an unknown field of 2 MB had the whole name sent back in `param`
MAX_PARAM_CHARS = 256
MAX_MESSAGE_CHARS = 4096


def error_object(code: str, message: str, param: str | None = None, status: int | None = None) -> dict:
    """The OpenAI error object: HTTP bodies ({"error": ...}), realtime `error` events and failed responses."""
    status = ERROR_CODES.get(code, 500) if status is None else status
    return {"type": error_kind(status), "code": code, "message": cut(message, MAX_MESSAGE_CHARS),
            "param": None if param is None else cut(str(param), MAX_PARAM_CHARS)}


def cut(text: str, max_chars: int) -> str:
    """`text`, or its first `max_chars` characters and '…' when it is longer."""
    return text if len(text) <= max_chars else text[:max_chars] + "…"


class ApiError(Exception):
    """A refused request. `code` is the stable machine-readable code (ERROR_CODES); `status` the HTTP
    status (by default the code's); `kind` the OpenAI error type."""

    def __init__(self, message: str, code: str = "invalid_request", status: int | None = None,
                 kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = ERROR_CODES.get(code, 400) if status is None else status
        self.param = param
        self.kind = kind or error_kind(self.status)

    def to_openai(self) -> dict:
        return {**error_object(self.code, self.message, self.param, self.status), "type": self.kind}


def wire_code(code: str) -> str:
    """The wire's name for an engine error code (ENGINE_CODES; the code itself otherwise)."""
    return ENGINE_CODES.get(code, code)


def engine_error(err: Error) -> ApiError:
    """An engine Error event as the server reports it (its code's status; unknown codes are faults)."""
    code = wire_code(err.code)
    return ApiError(err.message, code=code, status=ERROR_CODES.get(code, 500))


def error_event(obj: Any, status: int | None = None) -> Error:
    """A wire error object -> the engine's Error event (client side). Its code names the class of error; an OpenAI
    error with `code: null` by its `type` (invalid_request_error ...), else by the HTTP `status` (when there was one):
    server_error for a 5xx (or no status), http_error for any other."""
    if not isinstance(obj, dict):
        return Error(f"the server reported an error without details: {str(obj)[:200]}", "protocol_error")
    # (a code that is not a string, another server's number or list, is no code of ours)
    named = next((obj[k] for k in ("code", "type") if isinstance(obj.get(k), str) and obj[k].strip()), None)
    return Error(str(obj.get("message") or "the server reported an error"), named or status_error_code(status))


def status_error_code(status: int | None) -> str:
    """The code of an error answer that names none: server_error for a 5xx (or no HTTP status), http_error else."""
    return "server_error" if status is None or status >= 500 else "http_error"


# =========================================================================== usage and metrics

USAGE_STYLES = {  # field names of (prompt, output, total) tokens per endpoint (chat and realtime: their own functions)
    "transcription": ("input_tokens", "output_tokens", "total_tokens"),
}


def usage(stats: GenerationStats, style: str) -> dict:
    if style == "realtime":
        return realtime_usage(stats)
    if style == "chat":
        return chat_usage(stats)
    prompt, output, total = USAGE_STYLES[style]
    out = {prompt: stats.prompt_tokens, output: stats.new_tokens, total: stats.prompt_tokens + stats.new_tokens}
    return {"type": "tokens", **out} if style == "transcription" else out


def realtime_usage(stats: GenerationStats) -> dict:
    """A realtime response's usage as OpenAI's: the prompt's tokens by modality (text: everything that is
    not an image, video or audio token, the chat template included; cached: none, the engine reuses no
    prompt prefix) and the output's: the thinker's text tokens and the talker's latent patches."""
    text_in, output = _prompt_text_tokens(stats), _output_tokens(stats)
    return {"input_tokens": stats.prompt_tokens, "output_tokens": output, "total_tokens": stats.prompt_tokens + output,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": stats.prompt_audio_tokens,
                                    "image_tokens": stats.prompt_image_tokens, "cached_tokens": 0,
                                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}},
            "output_token_details": {"text_tokens": stats.new_tokens, "audio_tokens": stats.audio_tokens}}


def chat_usage(stats: GenerationStats) -> dict:
    """A chat completion's usage as OpenAI's CompletionUsage: completion_tokens counts the thinker's text tokens and,
    for a spoken reply, the talker's latent patches (its `audio_tokens`), as realtime's output_tokens does; the
    prompt's tokens by modality as realtime's. `reasoning_tokens` is always 0: the engine does not separate a
    thinking part from the answer ('thinking': true only changes the prompt), so it cannot count one; no prompt
    prefix is cached and there are no predicted outputs."""
    output = _output_tokens(stats)
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": output,
            "total_tokens": stats.prompt_tokens + output,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": stats.prompt_audio_tokens,
                                      "image_tokens": stats.prompt_image_tokens,
                                      "text_tokens": _prompt_text_tokens(stats)},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": stats.audio_tokens,
                                          "text_tokens": stats.new_tokens, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _prompt_text_tokens(stats: GenerationStats) -> int:
    """The prompt's text tokens: everything that is not an image, video or audio token, the chat template included."""
    return stats.prompt_tokens - stats.prompt_image_tokens - stats.prompt_audio_tokens


def _output_tokens(stats: GenerationStats) -> int:
    """A reply's tokens: the thinker's text and the talker's latent patches."""
    return stats.new_tokens + stats.audio_tokens


# (wire name, GenerationStats field, scale): the figures every response reports, both directions.
METRICS: tuple[tuple[str, str, int], ...] = (
    ("queue_wait_ms", "queue_wait_s", 1000),
    ("engine_time_to_first_token_ms", "time_to_first_token_s", 1000),
    ("tokens_per_s", "decode_tokens_per_s", 1),
    ("total_ms", "total_s", 1000),
    ("media_encode_ms", "media_encode_s", 1000),
    ("time_to_first_audio_ms", "time_to_first_audio_s", 1000),
    ("audio_seconds", "audio_seconds", 1),
    ("audio_real_time_factor", "audio_real_time_factor", 1),
    ("time_to_first_preview_ms", "time_to_first_preview_s", 1000),
    ("image_steps", "image_steps", 1),
    ("image_step_ms", "image_step_s", 1000),
    ("images", "images", 1),
)
_INT_STATS = {"image_steps", "images", "prompt_tokens", "new_tokens"}


def metrics(stats: GenerationStats | None, queue_wait_s: float, time_to_first_token_s: float | None) -> dict:
    """`queue_wait_s`: time in the server's line; `time_to_first_token_s`: from the server receiving
    the request to the first token (None before any). `stats`: the engine's figures (None when the
    response failed)."""
    m = {"queue_wait_ms": round(1000 * queue_wait_s, 3)}
    if time_to_first_token_s is not None:
        m["time_to_first_token_ms"] = round(1000 * time_to_first_token_s, 3)
    if stats is not None:
        for name, attr, scale in METRICS[1:]:
            value = getattr(stats, attr)
            m[name] = value if attr in _INT_STATS else round(scale * value, 3)
    return m


def stats_from_wire(usage_obj: dict | None, metrics_obj: dict | None) -> GenerationStats:
    """usage + metrics (any usage style) -> GenerationStats (client side)."""
    u, m = usage_obj or {}, metrics_obj or {}
    stats = GenerationStats(prompt_tokens=int(u.get("prompt_tokens", u.get("input_tokens", 0)) or 0),
                            new_tokens=int(u.get("completion_tokens", u.get("output_tokens", 0)) or 0))
    details_in = u.get("input_token_details", u.get("prompt_tokens_details"))
    details_out = u.get("output_token_details", u.get("completion_tokens_details"))
    if isinstance(details_in, dict):  # realtime and chat: the prompt's media tokens
        stats.prompt_image_tokens = int(details_in.get("image_tokens") or 0)
        stats.prompt_audio_tokens = int(details_in.get("audio_tokens") or 0)
    if isinstance(details_out, dict):  # ... and output_tokens as the thinker's text and the talker's patches
        stats.audio_tokens = int(details_out.get("audio_tokens") or 0)
        stats.new_tokens = int(details_out.get("text_tokens", stats.new_tokens - stats.audio_tokens) or 0)
    for name, attr, scale in METRICS:
        value = m.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(stats, attr, int(value) if attr in _INT_STATS else value / scale)
    return stats


def _need(obj: dict, *names: str) -> list:
    try:
        return [obj[n] for n in names]
    except (KeyError, TypeError) as e:
        raise UnknownEventError(f"malformed {obj.get('type') if isinstance(obj, dict) else 'event'!r}: "
                                f"missing {e}") from None


# image events share their fields over both transports
def _image_preview_fields(ev: ImagePreview) -> dict:
    return {"index": ev.index, "step": ev.step, "total_steps": ev.total_steps, "width": ev.width,
            "height": ev.height, "image": _b64(ev.image)}


def _image_done_fields(ev: ImageDone) -> dict:
    return {"index": ev.index, "width": ev.width, "height": ev.height, "seed": ev.seed, "image": _b64(ev.image),
            "mask": _b64(ev.mask), "overlay": _b64(ev.overlay), "note": ev.note}


def _image_preview(d: dict) -> ImagePreview:
    image, step, total = _need(d, "image", "step", "total_steps")
    return ImagePreview(_unb64(image, "image"), int(step), int(total), int(d.get("width", 0)),
                        int(d.get("height", 0)), int(d.get("index", 0)))


def _image_done(d: dict) -> ImageDone:
    image, width, height = _need(d, "image", "width", "height")
    return ImageDone(_unb64(image, "image"), int(width), int(height), int(d.get("index", 0)), d.get("seed"),
                     _unb64(d.get("mask"), "mask"), _unb64(d.get("overlay"), "overlay"), str(d.get("note") or ""))


def _progress_fields(ev: Progress) -> dict:
    return {"stage": ev.stage, "done": ev.done, "total": ev.total, "message": ev.message}


def _progress(d: dict) -> Progress:
    (stage,) = _need(d, "stage")
    return Progress(str(stage), int(d.get("done", 0)), int(d.get("total", 0)), str(d.get("message") or ""))


def _queue_position(d: dict) -> QueuePosition:
    (position,) = _need(d, "position")
    return QueuePosition(int(position), int(d.get("waiting", 0)))


# =========================================================================== realtime (websocket)

REALTIME_CLIENT_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "input_video_buffer.append", "input_video_buffer.commit", "input_video_buffer.clear",
    "conversation.item.create", "conversation.item.delete", "conversation.item.truncate",
    "conversation.item.retrieve", "response.create", "response.cancel",
)

# Server events that carry no engine event of their own (the decoder knows them and passes them by).
REALTIME_BOOKKEEPING_EVENTS = (
    "session.created", "session.updated", "conversation.item.added", "conversation.item.done",
    "conversation.item.deleted", "conversation.item.truncated", "conversation.item.retrieved",
    "input_audio_buffer.speech_started", "input_audio_buffer.timeout_triggered",
    "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "input_audio_buffer.cleared",
    "input_video_buffer.committed", "input_video_buffer.cleared", "response.created", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.output_text.done", "response.output_audio.done", "response.output_audio_transcript.done",
    "conversation.item.input_audio_transcription.delta", "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed", "rate_limits.updated",
)
# Server events that carry engine events (see RealtimeResponseDecoder).
REALTIME_STREAM_EVENTS = (
    "response.queue_position", "response.progress", "response.output_text.delta",
    "response.output_audio_transcript.delta", "response.output_audio.delta", "response.image.preview",
    "response.image.done", "response.done", "error",
)
REALTIME_SERVER_EVENTS = REALTIME_BOOKKEEPING_EVENTS + REALTIME_STREAM_EVENTS

# Done.finish_reason <-> realtime response status
_STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}
_FINISH = {"completed": "stop", "incomplete": "length", "cancelled": "cancelled"}


@dataclass
class _Part:
    index: int
    kind: str  # "text" | "audio" | "image"
    text: list[str] = field(default_factory=list)  # text, or the audio's transcript
    image: tuple[int, int, int] | None = None  # (index, width, height) of an image part


class RealtimeResponseEncoder:
    """Server side: the engine events of one response -> realtime server events. The assistant item
    is announced with its first output; each kind of output (text, audio, each image) is one content
    part, opened when it first appears."""

    def __init__(self, response_id: str, item_id: str, conversation_id: str | None, output_modalities: list[str],
                 previous_item_id: str | None = None, metadata: dict | None = None):
        self.response_id = response_id
        self.item_id = item_id
        self.conversation_id = conversation_id  # None: an out-of-band reply (conversation "none"), announced to no
        self.in_conversation = conversation_id is not None  # conversation (no conversation.item.* events)
        self.metadata = metadata
        self.settings: dict = {}  # what the response object also states: max_output_tokens, audio.output
        self.audio_bytes: Callable[[bytes], bytes] | None = None  # PCM16 -> the bytes an audio delta sends
        self.output_modalities = list(output_modalities)
        self.previous_item_id = previous_item_id
        self.item_open = False
        self.parts: dict[Any, _Part] = {}

    # -- shapes
    def response_object(self, status: str, output: list | None = None, usage_obj: dict | None = None,
                        details: dict | None = None, metrics_obj: dict | None = None) -> dict:
        obj = {"id": self.response_id, "object": "realtime.response", "status": status, "status_details": details,
               "output": output or [], "output_modalities": self.output_modalities,
               "conversation_id": self.conversation_id, "metadata": self.metadata, **self.settings}
        if usage_obj is not None:
            obj["usage"] = usage_obj
        if metrics_obj is not None:
            obj["metrics"] = metrics_obj
        return obj

    def created(self) -> dict:
        return {"type": "response.created", "response": self.response_object("in_progress")}

    def _ids(self, part: _Part) -> dict:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0,
                "content_index": part.index}

    def item(self, status: str) -> dict:
        content = []
        for part in self.parts.values():
            if part.kind == "text":
                content.append({"type": "output_text", "text": "".join(part.text)})
            elif part.kind == "audio":
                content.append({"type": "output_audio", "transcript": "".join(part.text)})
            else:
                index, width, height = part.image
                content.append({"type": "output_image", "index": index, "width": width, "height": height})
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    @property
    def assistant_text(self) -> str:
        """What the assistant said: its text, else its audio's transcript."""
        for kind in ("text", "audio"):
            if kind in self.parts:
                return "".join(self.parts[kind].text)
        return ""

    def _open(self, key, kind: str, part_fields: dict) -> tuple[_Part, list[dict]]:
        out = []
        if not self.item_open:
            self.item_open = True
            item = self.item("in_progress")
            out.append({"type": "response.output_item.added", "response_id": self.response_id, "output_index": 0,
                        "item": item})
            if self.in_conversation:
                out.append({"type": "conversation.item.added", "previous_item_id": self.previous_item_id,
                            "item": item})
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = _Part(len(self.parts), kind)
            out.append({"type": "response.content_part.added", **self._ids(part),
                        "part": {"type": kind, **part_fields}})
        return part, out

    # -- engine events
    def encode(self, ev: Event) -> list[dict]:
        """The server events for one engine event other than Done / Error (see finish)."""
        if isinstance(ev, QueuePosition):
            return [{"type": "response.queue_position", "response_id": self.response_id, "position": ev.position,
                     "waiting": ev.waiting}]
        if isinstance(ev, Progress):
            return [{"type": "response.progress", "response_id": self.response_id, **_progress_fields(ev)}]
        if isinstance(ev, TextDelta):
            part, out = self._open("text", "text", {"text": ""})
            part.text.append(ev.text)
            return out + [{"type": "response.output_text.delta", **self._ids(part), "delta": ev.text}]
        if isinstance(ev, AudioChunk):
            part, out = self._open("audio", "audio", {"transcript": ""})
            if ev.text:  # the span this chunk speaks comes first, so a client can pair it with the audio
                part.text.append(ev.text)
                out.append({"type": "response.output_audio_transcript.delta", **self._ids(part), "delta": ev.text})
            data = ev.pcm if self.audio_bytes is None else self.audio_bytes(ev.pcm)
            return out + [{"type": "response.output_audio.delta", **self._ids(part), "delta": _b64(data),
                           "sample_rate": ev.sample_rate, "start_s": ev.start_s}]
        if isinstance(ev, ImagePreview):
            part, out = self._open(("image", ev.index), "image", {"index": ev.index})
            part.image = (ev.index, ev.width, ev.height)
            return out + [{"type": "response.image.preview", **self._ids(part), **_image_preview_fields(ev)}]
        if isinstance(ev, ImageDone):
            part, out = self._open(("image", ev.index), "image", {"index": ev.index})
            part.image = (ev.index, ev.width, ev.height)
            return out + [{"type": "response.image.done", **self._ids(part), **_image_done_fields(ev)}]
        raise UnknownEventError(f"no realtime mapping for {type(ev).__name__}")

    def finish(self, final: Done | Error, metrics_obj: dict, cancel_reason: str = "client_cancelled") -> list[dict]:
        """The closing events: each open part's .done events, the item's, then response.done."""
        if isinstance(final, Done):
            status = _STATUS.get(final.finish_reason)
            if status is None:
                raise UnknownEventError(f"unknown finish_reason {final.finish_reason!r}")
            details = {"completed": None, "incomplete": {"type": "incomplete", "reason": "max_output_tokens"},
                       "cancelled": {"type": "cancelled", "reason": cancel_reason}}[status]
            usage_obj = usage(final.stats, "realtime")
        else:
            status, usage_obj = "failed", None
            details = {"type": "failed", "error": engine_error(final).to_openai()}
        out: list[dict] = []
        for part in self.parts.values():
            ids, text = self._ids(part), "".join(part.text)
            if part.kind == "text":
                out.append({"type": "response.output_text.done", **ids, "text": text})
                done_part = {"type": "text", "text": text}
            elif part.kind == "audio":
                out += [{"type": "response.output_audio.done", **ids},
                        {"type": "response.output_audio_transcript.done", **ids, "transcript": text}]
                done_part = {"type": "audio", "transcript": text}
            else:
                index, width, height = part.image
                done_part = {"type": "image", "index": index, "width": width, "height": height}
            out.append({"type": "response.content_part.done", **ids, "part": done_part})
        output = []
        if self.item_open:
            item = self.item("completed" if status == "completed" else "incomplete")
            out.append({"type": "response.output_item.done", "response_id": self.response_id, "output_index": 0,
                        "item": item})
            if self.in_conversation:
                out.append({"type": "conversation.item.done", "previous_item_id": self.previous_item_id,
                            "item": item})
            output = [item]
        out.append({"type": "response.done", "response": self.response_object(status, output, usage_obj, details,
                                                                             metrics_obj)})
        return out


class RealtimeResponseDecoder:
    """Client side: realtime server events -> engine events for one response, ending with exactly one
    Done or Error. `final_error_ids`: the client event ids whose `error` ends the response (an error
    naming another event is kept in `other_errors`); None = every error ends it."""

    def __init__(self, final_error_ids: set[str] | None = None):
        self.final_error_ids = final_error_ids
        self.response_id: str | None = None
        self.finished = False
        self.text: list[str] = []
        self.transcript: list[str] = []
        self._pending_transcript: list[str] = []
        self.other_errors: list[dict] = []
        self.g711: str | None = None  # 'pcmu' / 'pcma': the response's audio deltas are G.711 bytes

    def _end(self, ev: Done | Error) -> list[Event]:
        self.finished = True
        return [ev]

    def feed(self, wire: Any) -> list[Event]:
        """The engine events one server event carries. Raises UnknownEventError for an unknown or
        malformed event (the caller ends the response with an Error)."""
        if self.finished:
            return []
        if not isinstance(wire, dict) or not isinstance(wire.get("type"), str):
            raise UnknownEventError("a server event must be an object with a string 'type'")
        kind = wire["type"]
        if kind == "error":
            err = wire.get("error") or {}
            eid = err.get("event_id") if isinstance(err, dict) else None
            if self.final_error_ids is None or eid is None or eid in self.final_error_ids:
                return self._end(error_event(err))
            self.other_errors.append(wire)
            return []
        if kind == "response.created":
            response = wire.get("response") or {}
            self.response_id = response.get("id")
            fmt = ((response.get("audio") or {}).get("output") or {}).get("format") or {}
            self.g711 = {"audio/pcmu": "pcmu", "audio/pcma": "pcma"}.get(fmt.get("type"))
            return []
        if kind in REALTIME_BOOKKEEPING_EVENTS:
            return []
        if kind == "response.queue_position":
            return [_queue_position(wire)]
        if kind == "response.progress":
            return [_progress(wire)]
        if kind == "response.output_text.delta":
            (delta,) = _need(wire, "delta")
            self.text.append(str(delta))
            return [TextDelta(str(delta))]
        if kind == "response.output_audio_transcript.delta":
            (delta,) = _need(wire, "delta")
            self._pending_transcript.append(str(delta))
            self.transcript.append(str(delta))
            return []
        if kind == "response.output_audio.delta":
            data, rate = _need(wire, "delta", "sample_rate")
            text, self._pending_transcript = "".join(self._pending_transcript), []
            pcm = _unb64(data, "delta")
            if self.g711 is not None:  # a byte a sample -> PCM16, as the server's G.711 input is read
                from engine.server.codec import G711  # noqa: PLC0415  (codec imports this module)
                pcm = G711[self.g711][np.frombuffer(pcm, np.uint8)].tobytes()
            return [AudioChunk(pcm, int(rate), text, float(wire.get("start_s", 0.0)))]
        if kind == "response.image.preview":
            return [_image_preview(wire)]
        if kind == "response.image.done":
            return [_image_done(wire)]
        if kind == "response.done":
            return self._end(self._final(wire.get("response")))
        raise UnknownEventError(f"unknown server event type {kind[:80]!r}")

    def _final(self, resp: Any) -> Done | Error:
        if not isinstance(resp, dict):
            raise UnknownEventError("response.done without a response object")
        status = resp.get("status")
        if status == "failed":
            return error_event((resp.get("status_details") or {}).get("error"))
        if status not in _FINISH:
            raise UnknownEventError(f"unknown response status {status!r}")
        return Done(text="".join(self.text) or "".join(self.transcript), finish_reason=_FINISH[status],
                    stats=stats_from_wire(resp.get("usage"), resp.get("metrics")))


# =========================================================================== HTTP: SSE streams

def sse_data(obj: Any) -> bytes:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sse_comment(name: str, obj: dict | None = None) -> bytes:
    """Our extension events in an SSE stream: comment lines, which OpenAI's clients ignore."""
    return (f": {name}\n\n" if obj is None else f": {name} {json.dumps(obj, separators=(',', ':'))}\n\n").encode()


SSE_DONE = sse_data("[DONE]")
SSE_KEEPALIVE = sse_comment("keepalive")  # sent while a request waits without news, so readers can time out
SSE_COMMENTS = ("queue_position", "progress", "keepalive")


def finish_reason_http(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def progress_comments(ev: Event, extensions: bool) -> list[bytes] | None:
    """The SSE comment lines of a QueuePosition / Progress (none without our extensions); None for
    any other event."""
    if isinstance(ev, QueuePosition):
        return [sse_comment("queue_position", {"position": ev.position, "waiting": ev.waiting})] if extensions else []
    if isinstance(ev, Progress):
        return [sse_comment("progress", _progress_fields(ev))] if extensions else []
    return None


def token_logprob_wire(entry: TokenLogprob, alternatives: bool = True) -> dict:
    """OpenAI's `ChatCompletionTokenLogprob` of an entry (`alternatives` False: the shape of one of its
    `top_logprobs`)."""
    out: dict = {"token": entry.token, "bytes": entry.bytes, "logprob": entry.logprob}
    if alternatives:
        out["top_logprobs"] = [token_logprob_wire(t, alternatives=False) for t in entry.top_logprobs]
    return out


def choice_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """A choice's `logprobs` (OpenAI's `ChoiceLogprobs`): its tokens' entries; None when they were not asked for."""
    return None if entries is None else {"content": [token_logprob_wire(e) for e in entries], "refusal": None}


class ChatChunkEncoder:
    """Server side: engine events -> /v1/chat/completions stream chunks (`chat.completion.chunk`).
    Text is `delta.content`, with its tokens' `logprobs` on the choice when they were asked for; audio is
    OpenAI's `delta.audio` ({id, data, transcript}) plus our `sample_rate` and `start_s`; images are our `delta.image_preview` / `delta.image`; queue
    positions and progress are comment lines. `extensions` False (--openai-only): OpenAI's shapes
    only (no comment lines, no extra fields, no metrics)."""

    def __init__(self, completion_id: str, created: int, model: str, extensions: bool = True):
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.extensions = extensions
        self.index = 0  # the choice being streamed (a request's `n` choices come one after another)
        self.role_sent = False
        self.finished: list[GenerationStats] = []  # the figures of the choices ended so far
        self.audio_id = "audio_" + completion_id.rsplit("-", 1)[-1]

    def next_choice(self) -> None:
        """What follows belongs to the next choice (its chunks carry its `index`, its first one the role)."""
        self.index += 1
        self.role_sent = False

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None, **extra) -> dict:
        return {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": self.index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": finish}], **extra}

    def _delta(self, delta: dict, logprobs: dict | None = None) -> list[bytes]:
        out = []
        if not self.role_sent:
            self.role_sent = True
            out.append(sse_data(self._chunk({"role": "assistant", "content": ""})))
        return out + [sse_data(self._chunk(delta, logprobs=logprobs))]

    def encode(self, ev: Event) -> list[bytes]:
        comments = progress_comments(ev, self.extensions)
        if comments is not None:
            return comments
        if isinstance(ev, TextDelta):
            return self._delta({"content": ev.text}, choice_logprobs(ev.logprobs))
        if isinstance(ev, AudioChunk):
            audio = {"id": self.audio_id, "data": _b64(ev.pcm), "transcript": ev.text}
            if self.extensions:
                audio.update(sample_rate=ev.sample_rate, start_s=ev.start_s)
            return self._delta({"audio": audio})
        if isinstance(ev, ImagePreview):
            return self._delta({"image_preview": _image_preview_fields(ev)})
        if isinstance(ev, ImageDone):
            return self._delta({"image": _image_done_fields(ev)})
        raise UnknownEventError(f"no chat-completions mapping for {type(ev).__name__}")

    def finish(self, final: Done | Error, metrics_obj: dict, include_usage: bool, last: bool = True) -> list[bytes]:
        """The end of the current choice (its finish_reason, our metrics); `last`: of the response too (the usage
        of every choice so far, as `choices_usage` counts it, then [DONE]). An Error ends the response."""
        if isinstance(final, Error):
            return [sse_data({"error": engine_error(final).to_openai()}), SSE_DONE]
        out = [] if self.role_sent else [sse_data(self._chunk({"role": "assistant", "content": ""}))]
        extra = {"metrics": metrics_obj} if self.extensions else {}
        out.append(sse_data(self._chunk({}, finish_reason_http(final), **extra)))
        self.finished.append(final.stats)
        if not last:
            return out
        if include_usage:
            out.append(sse_data({"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": [], "usage": choices_usage(self.finished)}))
        return out + [SSE_DONE]


@dataclass
class Collected:
    """A whole response gathered for a non-streaming answer; every kind has its place (`logprobs`: the entries of
    every token reported, when they were asked for)."""

    text: list[str] = field(default_factory=list)
    audio: list[AudioChunk] = field(default_factory=list)
    images: list[ImageDone] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, ev: Event) -> None:
        if isinstance(ev, TextDelta):
            self.text.append(ev.text)
            self.logprobs += ev.logprobs or []
        elif isinstance(ev, AudioChunk):
            self.audio.append(ev)
        elif isinstance(ev, ImageDone):
            self.images.append(ev)
        elif isinstance(ev, (ImagePreview, Progress, QueuePosition)):
            pass  # what a stream shows while it runs; a whole answer has the finished outputs
        else:
            raise UnknownEventError(f"cannot collect {type(ev).__name__}")


def choices_usage(stats: list[GenerationStats]) -> dict:
    """A response's chat usage over its choices, as OpenAI counts `n`: the prompt once, every choice's tokens."""
    first = stats[0]
    return chat_usage(GenerationStats(prompt_tokens=first.prompt_tokens, prompt_image_tokens=first.prompt_image_tokens,
                                      prompt_audio_tokens=first.prompt_audio_tokens,
                                      new_tokens=sum(s.new_tokens for s in stats),
                                      audio_tokens=sum(s.audio_tokens for s in stats)))


@dataclass
class Answer:
    """One choice of a whole (non-streaming) chat answer: what it gathered, how it ended, its figures."""

    got: Collected
    done: Done
    metrics: dict


def chat_completion(completion_id: str, created: int, model: str, answers: list[Answer], extensions: bool = True,
                    audio_file: bytes | None = None, logprobs: bool = False) -> dict:
    """The non-streaming /v1/chat/completions body (`extensions` False: OpenAI's fields only): one choice per
    answer, `index` 0..n-1, with its tokens' `logprobs` when they were asked for; `metrics` (ours) is the body's
    with one choice, else each choice's own. Its audio (one choice only): the `audio_file` asked for (wav, mp3 ...; its header states its rate), else the PCM16 (at
    `sample_rate`, ours). `expires_at` is `created`: the server keeps no audio (an assistant message cannot name it
    by id later)."""
    choices = [{"index": i, "message": chat_message(completion_id, created, a.got, extensions, audio_file),
                "finish_reason": finish_reason_http(a.done),
                "logprobs": choice_logprobs(a.got.logprobs if logprobs else None)} for i, a in enumerate(answers)]
    body = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": choices_usage([a.done.stats for a in answers])}
    if not extensions:
        return body
    if len(answers) == 1:
        return {**body, "metrics": answers[0].metrics}
    for choice, a in zip(choices, answers):
        choice["metrics"] = a.metrics
    return body


def chat_message(completion_id: str, created: int, got: Collected, extensions: bool, audio_file: bytes | None) -> dict:
    message: dict = {"role": "assistant", "content": "".join(got.text)}
    if got.audio:
        message["audio"] = {"id": "audio_" + completion_id.rsplit("-", 1)[-1],
                            "data": _b64(audio_file if audio_file is not None else b"".join(c.pcm for c in got.audio)),
                            "expires_at": created, "transcript": "".join(c.text for c in got.audio)}
        if extensions and audio_file is None:
            message["audio"]["sample_rate"] = got.audio[0].sample_rate
    if got.images:
        message["images"] = [_image_done_fields(im) for im in got.images]
    return message


def transcription_body(done: Done, metrics_obj: dict | None, duration_s: float | None = None,
                       logprobs: list[TokenLogprob] | None = None, verbose: VerboseFigures | None = None,
                       task: str = "transcribe") -> dict:
    """/v1/audio/transcriptions result: json (usage in tokens, and the transcript tokens' `logprobs` when they were
    asked for), or with the clip's `duration_s` and `verbose` (what its segments are made from) verbose_json, whose
    `language` is always a string ("" when the model named none), whose `segments` are OpenAI's (verbose_segments)
    and whose usage is the clip's duration, as OpenAI's verbose body has them (`TranscriptionVerbose`; a
    translation's, `task` "translate", `TranslationVerbose`).
    Ours, beside `metrics`: `finish_reason`, "length" when the transcript was cut at max_tokens (OpenAI's has none),
    and in json a long recording's `windows` (start, end, text of each window it was transcribed in)."""
    res = done.result or {}
    out = {"text": res.get("text", ""), "language": res.get("language"), "usage": usage(done.stats, "transcription")}
    if logprobs is not None:
        out["logprobs"] = transcript_logprobs(logprobs)
    if metrics_obj is not None:  # None: OpenAI's fields only (--openai-only)
        out["metrics"] = metrics_obj
        out["finish_reason"] = finish_reason_http(done)
        if res.get("segments") and duration_s is None:  # (verbose_json has them as OpenAI's segments)
            out["windows"] = [{key: w[key] for key in ("start", "end", "text")} for w in res["segments"]]
    if duration_s is not None:
        seconds = round(duration_s, 3)
        out.update({"task": task, "language": out["language"] or "", "duration": seconds,
                    "segments": verbose_segments(done, seconds, verbose or VerboseFigures()),
                    "usage": {"type": "duration", "seconds": seconds}})
    return out


@dataclass(frozen=True)
class VerboseFigures:
    """What a verbose_json answer's segments need beside the engine's result: the sampling temperature and the
    transcript tokens' log probabilities (of a clip transcribed at once; a window's come in its segment)."""

    temperature: float = 0.0
    logprobs: tuple[float, ...] = ()


SEEK_FRAMES_PER_S = 100  # OpenAI's (Whisper's) `seek`: where a segment starts, in 10 ms frames
NO_SPEECH_PROB = 0.0     # the model makes no no-speech estimate (docs/protocol.md says so)


def transcript_spans(text: str, seconds: float, windows: list[dict] | None) -> list[dict]:
    """A transcript's timed pieces: each window of a long recording that holds text (start, end, text, tokens
    ...), else one piece spanning the clip (the model gives no timestamps)."""
    return [w for w in windows or () if w["text"].strip()] or [{"start": 0.0, "end": seconds, "text": text}]


def verbose_segments(done: Done, seconds: float, figures: VerboseFigures) -> list[dict]:
    """OpenAI's `segments` (TranscriptionSegment): one per piece of `transcript_spans` with text, the same pieces
    srt and vtt have cues for; `tokens` the ids the model wrote, `avg_logprob` their mean log probability,
    `compression_ratio` the text's over its zlib-compressed size (Whisper's), `no_speech_prob` NO_SPEECH_PROB."""
    res = done.result or {}
    whole = {"tokens": list(done.token_ids),
             "avg_logprob": sum(figures.logprobs) / len(figures.logprobs) if figures.logprobs else None}
    spans = [span if "tokens" in span else {**whole, **span}
             for span in transcript_spans(res.get("text", ""), seconds, res.get("segments")) if span["text"].strip()]
    return [{"id": i, "seek": round(span["start"] * SEEK_FRAMES_PER_S), "start": span["start"], "end": span["end"],
             "text": span["text"].strip(), "tokens": span["tokens"], "temperature": figures.temperature,
             "avg_logprob": round(span.get("avg_logprob") or 0.0, 4),
             "compression_ratio": round(compression_ratio(span["text"].strip()), 4), "no_speech_prob": NO_SPEECH_PROB}
            for i, span in enumerate(spans)]


def compression_ratio(text: str) -> float:
    """The text's UTF-8 size over its zlib-compressed size (Whisper's repetition gauge: above 2.4, it loops)."""
    import zlib  # noqa: PLC0415

    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def transcript_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """A transcription's `logprobs` (OpenAI's `Transcription.Logprob`): token, bytes and logprob per token."""
    return [token_logprob_wire(e, alternatives=False) for e in entries]


def subtitles(text: str, seconds: float, fmt: str, segments: list[dict] | None = None) -> str:
    """A transcript as an `srt` or `vtt` file: a cue per window of a long recording (`segments`: start, end,
    text), else one cue spanning the clip (the model gives no timestamps)."""
    mark = "," if fmt == "srt" else "."  # SubRip's decimal comma, WebVTT's point

    def stamp(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"
    cues = [f"{stamp(s['start'])} --> {stamp(max(s['end'], 0.001))}\n{s['text'].strip()}\n"
            for s in transcript_spans(text, seconds, segments)]
    if fmt == "srt":
        return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)


class TranscriptionSseEncoder:
    """A streaming transcription's SSE lines: `transcript.text.delta` per text delta, then `transcript.text.done`
    with the whole body; with `logprobs` each event carries its tokens' entries (the done event all of them)."""

    def __init__(self, extensions: bool = True, logprobs: bool = False):
        self.extensions = extensions
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None

    def encode(self, ev: Event) -> list[bytes]:
        """The lines of one engine event other than Done / Error."""
        comments = progress_comments(ev, self.extensions)
        if comments is not None:
            return comments
        if not isinstance(ev, TextDelta):
            raise UnknownEventError(f"a transcription does not stream {type(ev).__name__}")
        delta = {"type": "transcript.text.delta", "delta": ev.text}
        if self.logprobs is not None:
            self.logprobs += ev.logprobs or []
            delta["logprobs"] = transcript_logprobs(ev.logprobs or [])
        return [sse_data(delta)]

    def finish(self, final: Done | Error, metrics_obj: dict | None) -> list[bytes]:
        if isinstance(final, Error):
            return [sse_data({"error": engine_error(final).to_openai()}), SSE_DONE]
        body = transcription_body(final, metrics_obj, logprobs=self.logprobs)
        return [sse_data({"type": "transcript.text.done", **body}), SSE_DONE]


_DELTA_KEYS = ("role", "content", "audio", "image_preview", "image", "refusal", "tool_calls", "function_call")
OPENAI_PCM_RATE = 24000  # the rate of OpenAI's `pcm16` / `pcm` audio, for servers that do not name theirs
ASSUMED_RATE_NOTE = (f"the server did not say its audio's sample rate (no sample_rate, X-Sample-Rate, WAV header or "
                     f"Content-Type rate): played at OpenAI's {OPENAI_PCM_RATE} Hz, which may be wrong")


class SseLines:
    """Client side, what every SSE stream of this API shares: comment lines (our queue positions and
    progress, keepalives), `data: {"error": ...}`, and the end (`data: [DONE]`, or the stream closing
    after the final event: `feed_end`). Subclasses read their own `data:` objects (`_data`) and set
    `_done` once the final event has been read. `strict` False (a backend behind openai+http(s)://):
    fields and events this client does not know are passed by instead of failing the stream."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.finished = False
        self.text: list[str] = []
        self._done: Done | None = None

    def _end(self, ev: Done | Error) -> list[Event]:
        self.finished = True
        return [ev]

    def _unknown(self, what: str) -> list[Event]:
        if self.strict:
            raise UnknownEventError(what)
        return []

    def feed_line(self, line: str) -> list[Event]:
        if self.finished or not line or line.startswith(("event:", "id:", "retry:")):
            return []
        if line.startswith(":"):
            name, _, payload = line[1:].strip().partition(" ")
            if name not in SSE_COMMENTS or name == "keepalive":  # (SSE: a comment is the reader's to ignore; a proxy
                return []                                        # may send its own, ": ping", or ":" alone)
            try:
                obj = read_json(payload)
            except ValueError as e:
                raise UnknownEventError(f"malformed {name} comment: {e}") from None
            return [_queue_position(obj) if name == "queue_position" else _progress(obj)]
        if not line.startswith("data:"):
            return self._unknown(f"unexpected stream line {line[:60]!r}")
        data = line[5:].strip()
        if data == "[DONE]":
            return self.feed_end()
        try:
            obj = read_json(data)
        except ValueError as e:
            raise UnknownEventError(f"malformed stream data: {e}") from None
        if not isinstance(obj, dict):
            raise UnknownEventError("stream data must be an object")
        if "error" in obj:
            return self._end(error_event(obj["error"]))
        return self._data(obj)

    def feed_end(self) -> list[Event]:
        """The stream is over (`[DONE]` or closed by the server): the final event, or an Error when
        the result never came."""
        if self.finished:
            return []
        if self._done is None:
            return self._end(Error("the stream ended without a result", "protocol_error"))
        return self._end(self._done)

    def _data(self, obj: dict) -> list[Event]:
        raise NotImplementedError


class SseDecoder(SseLines):
    """Client side: the lines of a chat-completions or transcription SSE stream -> engine events,
    ending with one Done (at `data: [DONE]`) or Error. Audio deltas without our `sample_rate` are
    OpenAI's `pcm16`, 24 kHz."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__(strict)
        self._metrics: dict | None = None
        self._transcript: list[str] = []  # transcript text of audio deltas that carried no data yet

    def _data(self, obj: dict) -> list[Event]:
        kind = obj.get("type")
        if kind == "transcript.text.delta":
            (delta,) = _need(obj, "delta")
            self.text.append(str(delta))
            return [TextDelta(str(delta))]
        if kind == "transcript.text.done":  # our finish_reason; an OpenAI server's transcript is complete
            reason = "length" if obj.get("finish_reason") == "length" else "stop"
            self._done = Done(text=str(obj.get("text", "")), finish_reason=reason,
                              stats=stats_from_wire(obj.get("usage"), obj.get("metrics")),
                              result={"language": obj.get("language"), "text": obj.get("text", ""),
                                      **({"segments": obj["windows"]} if isinstance(obj.get("windows"), list) else {})})
            return []
        if kind is not None or obj.get("object") != "chat.completion.chunk":
            return self._unknown(f"unknown stream event {str(kind or obj.get('object'))[:60]!r}")
        return self._chunk(obj)

    def _chunk(self, obj: dict) -> list[Event]:
        choices = obj.get("choices") or []
        if not choices:
            if self._done is not None and isinstance(obj.get("usage"), dict):
                self._done.stats = stats_from_wire(obj["usage"], self._metrics)
            return []
        choice = choices[0]
        delta = choice.get("delta") or {}
        unknown = [k for k, v in delta.items() if k not in _DELTA_KEYS and v is not None]
        if unknown and self.strict:
            raise UnknownEventError(f"unknown delta field(s) {unknown}")
        out: list[Event] = []
        if delta.get("content"):
            self.text.append(delta["content"])
            out.append(TextDelta(delta["content"], _logprobs_of(choice)))
        if delta.get("audio") is not None:
            out += self._audio(delta["audio"])
        if delta.get("image_preview") is not None:
            out.append(_image_preview(delta["image_preview"]))
        if delta.get("image") is not None:
            out.append(_image_done(delta["image"]))
        reason = choice.get("finish_reason")
        if reason:
            if reason not in ("stop", "length"):
                if self.strict:
                    raise UnknownEventError(f"unknown finish_reason {reason!r}")
                reason = "stop"
            self._metrics = obj.get("metrics")
            self._done = Done(text="".join(self.text), finish_reason=reason,
                              stats=stats_from_wire(obj.get("usage"), self._metrics))
        return out

    def _audio(self, audio: Any) -> list[Event]:
        if not isinstance(audio, dict):
            raise UnknownEventError("'delta.audio' must be an object")
        if audio.get("transcript"):
            self._transcript.append(str(audio["transcript"]))
        if not audio.get("data"):  # OpenAI may send the transcript and the audio in separate deltas
            return []
        rate = audio.get("sample_rate", OPENAI_PCM_RATE)
        text, self._transcript = "".join(self._transcript), []
        return [AudioChunk(_unb64(audio["data"], "audio.data"), int(rate), text, float(audio.get("start_s", 0.0)))]


def _logprobs_of(choice: dict) -> list[TokenLogprob] | None:
    """A stream chunk's choice's token entries (`logprobs.content`), None when the chunk has none."""
    lp = choice.get("logprobs")
    if lp is None:
        return None
    if not isinstance(lp, dict) or not isinstance(lp.get("content") or [], list):
        raise UnknownEventError("'logprobs' must be an object whose 'content' is a list")
    return [TokenLogprob.from_dict(e) for e in lp.get("content") or []]


# =========================================================================== HTTP: speech (/v1/audio/speech)

def _audio_usage(done: Done) -> dict:
    """Speech usage: input tokens of the talker's prompt (0 when not counted), output tokens = latent
    patches made."""
    out = int((done.result or {}).get("patches", done.stats.new_tokens) or 0)
    return {"input_tokens": done.stats.prompt_tokens, "output_tokens": out,
            "total_tokens": done.stats.prompt_tokens + out}


class SpeechSseEncoder:
    """Server side: engine events of a synthesis -> `/v1/audio/speech` SSE (`stream_format: "sse"`):
    OpenAI's `speech.audio.delta` {audio: base64} with our `sample_rate`, `text` (the span it starts
    speaking) and `start_s`; then `speech.audio.done` {usage} with our `metrics` and `result`, and
    `data: [DONE]`. `wav_header`: bytes to put before the first delta's audio (response_format "wav":
    the deltas then join into a WAV file; "pcm": none). `extensions` False: OpenAI's fields only."""

    def __init__(self, extensions: bool = True, wav_header: bytes = b""):
        self.extensions = extensions
        self.header = wav_header

    def encode(self, ev: Event) -> list[bytes]:
        comments = progress_comments(ev, self.extensions)
        if comments is not None:
            return comments
        if not isinstance(ev, AudioChunk):
            raise UnknownEventError(f"speech does not stream {type(ev).__name__}")
        data, self.header = self.header + ev.pcm, b""
        out = {"type": "speech.audio.delta", "audio": _b64(data)}
        if self.extensions:
            out.update(sample_rate=ev.sample_rate, text=ev.text, start_s=ev.start_s)
        return [sse_data(out)]

    def finish(self, final: Done | Error | ApiError, metrics_obj: dict) -> list[bytes]:
        """The stream's last lines; an engine Error as the server reports it, or an ApiError the route made of one."""
        if isinstance(final, (Error, ApiError)):
            error = final if isinstance(final, ApiError) else engine_error(final)
            return [sse_data({"error": error.to_openai()}), SSE_DONE]
        out = {"type": "speech.audio.done", "usage": _audio_usage(final)}
        if self.extensions:
            out.update(metrics=metrics_obj, result=final.result, finish_reason=final.finish_reason)
        return [sse_data(out), SSE_DONE]


def _strip_wav_header(data: bytes) -> tuple[bytes, int | None]:
    """(PCM, rate) of audio that may start with a WAV header (the rate None when it does not)."""
    if len(data) >= 44 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        (rate,) = struct.unpack("<I", data[24:28])
        return data[44:], int(rate)
    return data, None


class SpeechSseDecoder(SseLines):
    """Client side: a `/v1/audio/speech` SSE stream -> AudioChunk events, then Done (its `result`:
    sample_rate, fragments, ref_text_from_asr when our ASR filled in a transcript ...). Deltas without
    our `sample_rate` are PCM16 at the rate of a WAV header in the first delta, else at the answer's own
    (`answer_rate`: its X-Sample-Rate header or Content-Type rate, set by the client), else OpenAI's 24 kHz, which
    Done's result then says was assumed (`sample_rate_note`)."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__(strict)
        self.rate: int | None = None
        self.answer_rate: int | None = None
        self.rate_assumed = False
        self.audio_s = 0.0

    def _data(self, obj: dict) -> list[Event]:
        kind = obj.get("type")
        if kind == "speech.audio.delta":
            (data,) = _need(obj, "audio")
            pcm, header_rate = _strip_wav_header(_unb64(data, "audio") or b"") if self.rate is None else \
                (_unb64(data, "audio") or b"", None)
            said = obj.get("sample_rate") or header_rate or self.rate or self.answer_rate
            self.rate_assumed = self.rate_assumed or not said
            self.rate = int(said or OPENAI_PCM_RATE)
            text = str(obj.get("text") or "")
            if text:
                self.text.append(text)
            ev = AudioChunk(pcm, self.rate, text, float(obj.get("start_s", self.audio_s)))
            self.audio_s += ev.seconds
            return [ev]
        if kind == "speech.audio.done":
            result = obj.get("result") if isinstance(obj.get("result"), dict) else {}
            stats = stats_from_wire(None, obj.get("metrics"))
            if not stats.audio_seconds:
                stats.audio_seconds = self.audio_s
            reason = obj.get("finish_reason") if obj.get("finish_reason") in ("stop", "cancelled") else "stop"
            text = " ".join(result.get("fragments") or []) or "".join(self.text)
            if self.rate_assumed:
                result = {"sample_rate": self.rate, **result, "sample_rate_note": ASSUMED_RATE_NOTE}
            self._done = Done(text=text, finish_reason=reason, stats=stats, result=result or None)
            return []
        return self._unknown(f"unknown speech stream event {str(kind)[:60]!r}")


# =========================================================================== HTTP: images (/v1/images/*)

IMAGE_STREAM_KINDS = ("image_generation", "image_edit", "image_segmentation")  # event name prefixes


def image_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def image_usage(stats: GenerationStats) -> dict:
    """Image usage in OpenAI's shape: the thinker's prompt tokens in (of them the input pictures' patch tokens as
    image_tokens, the rest text: the words, the chat template and the query tokens), no tokens out."""
    details = {"text_tokens": stats.prompt_tokens - stats.prompt_image_tokens, "image_tokens": stats.prompt_image_tokens}
    return {"input_tokens": stats.prompt_tokens, "output_tokens": 0, "total_tokens": stats.prompt_tokens,
            "input_tokens_details": details}


def image_data(ev: ImageDone, image_b64: str, extensions: bool) -> dict:
    """One entry of an images response's `data` (and the payload of a `.completed` event)."""
    out: dict = {"b64_json": image_b64}
    if extensions:
        out.update(index=ev.index, width=ev.width, height=ev.height, seed=ev.seed, mask=_b64(ev.mask),
                   overlay=_b64(ev.overlay), note=ev.note)
    return out


def images_body(created: int, images: list[tuple[ImageDone, str]], done: Done, output_format: str,
                metrics_obj: dict, extensions: bool = True) -> dict:
    """The non-streaming images response: `images` holds (ImageDone, base64 of the file in
    `output_format`) pairs in order. No `quality`: OpenAI's answer names the quality it rendered at (low ... max,
    never "auto"), and ours has no such setting (the request's `quality` has no effect)."""
    first = images[0][0] if images else None
    body = {"created": created, "data": [image_data(ev, b, extensions) for ev, b in images],
            "background": "opaque", "output_format": output_format,
            "size": image_size(first.width, first.height) if first else None, "usage": image_usage(done.stats)}
    return {**body, "metrics": metrics_obj} if extensions else body


class ImageSseEncoder:
    """Server side: engine events of an image request -> SSE. `kind` is the event prefix
    (IMAGE_STREAM_KINDS). Previews are `<kind>.partial_image` {b64_json (PNG), partial_image_index,
    size, ...} (at most `max_partials` per image; partial_image_index counts them per image), finished
    images `<kind>.completed` {b64_json, size, ..., usage on the last one}; then `data: [DONE]`. Our
    extensions: index / step / total_steps, seed / mask / overlay / note, metrics, and the queue /
    progress comment lines. `encode_image(ImageDone) -> base64` writes the final file."""

    def __init__(self, kind: str, output_format: str, created: int, encode_image, max_partials: int | None = None,
                 extensions: bool = True, quality: str = "auto"):
        if kind not in IMAGE_STREAM_KINDS:
            raise ValueError(f"unknown image stream kind {kind!r}")
        self.kind = kind
        self.output_format = output_format
        self.created = created
        self.encode_image = encode_image
        self.max_partials = max_partials
        self.extensions = extensions
        self.quality = quality  # the request's quality setting, as OpenAI's events name it
        self.partials: dict[int, int] = {}  # image index -> previews sent
        self.pending: ImageDone | None = None  # its .completed leaves with the next event (the last: with usage)

    def _common(self, size: str, fmt: str) -> dict:
        return {"created_at": self.created, "size": size, "quality": self.quality, "background": "opaque",
                "output_format": fmt}

    def _completed(self, usage_obj: dict | None = None, metrics_obj: dict | None = None) -> list[bytes]:
        if self.pending is None:
            return []
        ev, self.pending = self.pending, None
        out = {"type": f"{self.kind}.completed", **self._common(image_size(ev.width, ev.height), self.output_format),
               **image_data(ev, self.encode_image(ev), self.extensions)}
        if usage_obj is not None:
            out["usage"] = usage_obj
        if metrics_obj is not None and self.extensions:
            out["metrics"] = metrics_obj
        return [sse_data(out)]

    def encode(self, ev: Event) -> list[bytes]:
        out = self._completed()
        comments = progress_comments(ev, self.extensions)
        if comments is not None:
            return out + comments
        if isinstance(ev, ImagePreview):
            sent = self.partials.get(ev.index, 0)
            if self.max_partials is not None and sent >= self.max_partials:
                return out
            partial = {"type": f"{self.kind}.partial_image", "b64_json": _b64(ev.image),
                       **self._common(image_size(ev.width, ev.height), "png"), "partial_image_index": sent}
            if self.extensions:
                partial.update(index=ev.index, step=ev.step, total_steps=ev.total_steps)
            self.partials[ev.index] = sent + 1
            return out + [sse_data(partial)]
        if isinstance(ev, ImageDone):
            self.pending = ev
            return out
        raise UnknownEventError(f"an image stream does not carry {type(ev).__name__}")

    def finish(self, final: Done | Error, metrics_obj: dict) -> list[bytes]:
        if isinstance(final, Error):
            self.pending = None
            return [sse_data({"error": engine_error(final).to_openai()}), SSE_DONE]
        return self._completed(image_usage(final.stats), metrics_obj) + [SSE_DONE]


def _wh(obj: dict) -> tuple[int, int]:
    """(width, height) from our fields, else OpenAI's `size` "WxH" (0, 0 when neither says)."""
    if obj.get("width") and obj.get("height"):
        return int(obj["width"]), int(obj["height"])
    size = str(obj.get("size") or "")
    w, _, h = size.partition("x")
    return (int(w), int(h)) if w.isdigit() and h.isdigit() else (0, 0)


def image_done_from(obj: dict, index: int) -> ImageDone:
    """An ImageDone from a `.completed` event or one `data` entry (ours or any OpenAI-shaped server's)."""
    (image,) = _need(obj, "b64_json")
    width, height = _wh(obj)
    return ImageDone(_unb64(image, "b64_json"), width, height, int(obj.get("index", index)), obj.get("seed"),
                     _unb64(obj.get("mask"), "mask"), _unb64(obj.get("overlay"), "overlay"), str(obj.get("note") or ""))


def images_body_events(body: Any) -> list[Event]:
    """A non-streaming images response -> ImageDone per image, then Done (client side)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise UnknownEventError("an images response needs a 'data' list")
    size_w, size_h = _wh(body)
    images = []
    for i, item in enumerate(body["data"]):
        if not isinstance(item, dict):
            raise UnknownEventError("each images 'data' entry must be an object")
        if "b64_json" not in item:
            raise UnknownEventError("the images response has no b64_json (a url-only server cannot be read)")
        ev = image_done_from({"size": body.get("size"), **item}, i)
        ev.width, ev.height = ev.width or size_w, ev.height or size_h
        images.append(ev)
    stats = stats_from_wire(body.get("usage"), body.get("metrics"))
    stats.images = stats.images or len(images)
    return [*images, Done(text="\n".join(im.note for im in images if im.note), finish_reason="stop", stats=stats,
                          result={"images": len(images)})]


class ImageSseDecoder(SseLines):
    """Client side: an images SSE stream (any of IMAGE_STREAM_KINDS) -> ImagePreview / ImageDone
    events, then Done with the figures of the last `.completed` event."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__(strict)
        self.images = 0

    def _data(self, obj: dict) -> list[Event]:
        kind = str(obj.get("type") or "")
        prefix, _, suffix = kind.rpartition(".")
        if prefix not in IMAGE_STREAM_KINDS:
            return self._unknown(f"unknown image stream event {kind[:60]!r}")
        if suffix == "partial_image":
            (image,) = _need(obj, "b64_json")
            width, height = _wh(obj)
            index = int(obj.get("partial_image_index", 0))
            return [ImagePreview(_unb64(image, "b64_json"), int(obj.get("step", index + 1)),
                                 int(obj.get("total_steps", 0)), width, height, int(obj.get("index", 0)))]
        if suffix == "completed":
            ev = image_done_from(obj, self.images)
            self.images += 1
            stats = stats_from_wire(obj.get("usage"), obj.get("metrics"))
            stats.images = stats.images or self.images
            notes = [n for n in ((self._done.text if self._done else ""), ev.note) if n]
            self._done = Done(text="\n".join(notes), finish_reason="stop", stats=stats, result={"images": self.images})
            return [ev]
        return self._unknown(f"unknown image stream event {kind[:60]!r}")
