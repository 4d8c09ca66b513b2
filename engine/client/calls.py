"""The client's HTTP calls for speech, the voice library and images, decided here once for the sync
and async shells (I/O-free, like core.py): what each request sends and how its answer is read, for
our server and for any OpenAI-compatible backend (an `openai+http(s)://` URL: vLLM-Omni, SGLang-Omni,
or our server with --openai-only), which gets OpenAI's standard routes and fields only. What such a
backend cannot be asked for ends the call with `Error(code="not_supported_by_engine")`.

An `HttpCall` names the method, path and httpx arguments, and how the answer is read:
  "sse"   — an SSE stream, lines fed to `decoder` (engine.server.protocol: SpeechSseDecoder, ImageSseDecoder);
  "bytes" — a byte stream fed to `decoder` (WavStreamDecoder: OpenAI's streamed WAV speech);
  "json"  — one JSON body turned into events by `parse`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.client.core import (AudioPayload, ModelInfo, audio_payload, b64, image_bytes, json_answer,
                               transcription_request, wav_file)
from engine.events import AudioChunk, Done, Error, Event, GenerationStats, UnknownEventError
from engine.server import protocol as wire

SPEECH_PATH = "/v1/audio/speech"
VOICES_PATH = "/v1/audio/voices"
SPEECH_OPTIONS_PATH = "/v1/audio/speech/options"
IMAGE_PATHS = {"generate": "/v1/images/generations", "edit": "/v1/images/edits",
               "segment": "/v1/images/segmentations"}
IMAGE_TASKS = tuple(IMAGE_PATHS)
# what an OpenAI-compatible backend is asked to show it has (a route that answers anything but 404/405,
# or our modality_not_supported, is there)
OPENAI_PROBES = {"transcription": "/v1/audio/transcriptions", "speech_out": SPEECH_PATH,
                 "image_out": IMAGE_PATHS["generate"]}
# assumed of an omni model behind an OpenAI-compatible server (its chat route takes them or says no)
OPENAI_ASSUMED = {"text", "image_in", "audio_in", "video_in"}


@dataclass
class HttpCall:
    method: str
    path: str
    kwargs: dict = field(default_factory=dict)  # httpx arguments: json=..., or files=... and data=...
    read: str = "sse"                           # "sse" | "bytes" | "json"
    decoder: Any = None                         # "sse" / "bytes": fed what arrives
    parse: Callable[[Any], list[Event]] | None = None  # "json": the body -> events


def not_supported(what: str) -> Error:
    return Error(f"{what} is not supported by this engine: it is an OpenAI-compatible server, which this client "
                 "drives with OpenAI's standard routes and fields only", "not_supported_by_engine")


def _extras(**named) -> list[str]:
    return [name for name, value in named.items() if value not in (None, False)]


# =========================================================================== speech


def _clip_url(source: Any) -> str:
    """A reference clip (an audio file as bytes / a path / a data: URL, or (samples, sample_rate)) as a
    data: URL."""
    if isinstance(source, tuple) and len(source) == 2:
        payload = AudioPayload(wav_file(source[0], source[1]), "wav")
    else:
        payload = audio_payload(source, None)
    return f"data:audio/{payload.format};base64,{b64(payload.data)}"


def speech_call(text: str, task: str, voice: str | None, reference_audio: Any, reference_text: str | None,
                instruct: dict | str | None, music: dict | None, seed: int | None, max_seconds: float | None,
                openai_model: str | None = None) -> HttpCall | Error:
    """POST /v1/audio/speech: ours streams PCM16 as SSE (every delta names its rate and the text span
    it speaks); an OpenAI-compatible backend streams a WAV file (`stream_format: "audio"`), whose
    header says the rate."""
    if openai_model is not None:
        extras = _extras(reference_audio=reference_audio, reference_text=reference_text, music=music, seed=seed,
                         max_seconds=max_seconds, task=None if task == "tts" else task,
                         instruct=None if instruct is None or isinstance(instruct, str) else instruct)
        if extras:
            return not_supported(f"speech with {', '.join(extras)}")
        body = {"model": openai_model, "input": text, "response_format": "wav", "stream_format": "audio"}
        if voice is not None:
            body["voice"] = voice
        if instruct:
            body["instructions"] = instruct
        return HttpCall("POST", SPEECH_PATH, {"json": body}, "bytes", WavStreamDecoder())
    try:
        clips = None
        if reference_audio is not None:
            many = isinstance(reference_audio, list)
            clips = [_clip_url(c) for c in reference_audio] if many else _clip_url(reference_audio)
    except (ValueError, TypeError) as e:
        return Error(f"reference_audio: {e}", "invalid_request")
    body = {"input": text, "task": task, "voice": voice, "reference_audio": clips, "reference_text": reference_text,
            "instruct": instruct, "music": music, "seed": seed, "max_seconds": max_seconds,
            "response_format": "pcm", "stream_format": "sse"}
    return HttpCall("POST", SPEECH_PATH, {"json": {k: v for k, v in body.items() if v is not None}}, "sse",
                    wire.SpeechSseDecoder())


def voice_upload(name: str, reference_audio: Any, reference_text: str | None, replace: bool = False) -> dict:
    """httpx arguments of POST /v1/audio/voices (multipart: name, file, reference_text, replace)."""
    if isinstance(reference_audio, tuple) and len(reference_audio) == 2:
        payload = AudioPayload(wav_file(reference_audio[0], reference_audio[1]), "wav")
    else:
        payload = audio_payload(reference_audio, None)
    data = {"name": name}
    if reference_text is not None:
        data["reference_text"] = reference_text
    if replace:
        data["replace"] = "true"
    return {"files": {"file": (f"reference.{payload.format}", payload.data)}, "data": data}


# Raw PCM16 answers a speech server may give instead of a WAV file (their media type -> numpy sample type):
# OpenAI's audio/pcm (little-endian) and RFC 2586's audio/L16 (network byte order); each may say its rate and
# channels as parameters (audio/pcm;rate=24000, audio/L16;rate=16000;channels=2).
RAW_PCM_TYPES = {"audio/pcm": "<i2", "audio/l16": ">i2"}


def note_answer_rate(decoder: Any, headers: Any) -> None:
    """Tell a speech stream's decoder what the answer's head says of its audio: its sample rate (answer_rate), for
    deltas that do not name theirs; a WAV stream's decoder also whether the answer is raw PCM instead."""
    if isinstance(decoder, wire.SpeechSseDecoder):
        decoder.answer_rate = answer_rate(headers)
    elif isinstance(decoder, WavStreamDecoder):
        kind, params = wire.media_type(headers.get("content-type") or "")
        if kind in RAW_PCM_TYPES:
            decoder.raw_pcm(RAW_PCM_TYPES[kind], answer_rate(headers), _whole_number(params.get("channels")))


def answer_rate(headers: Any) -> int | None:
    """The sample rate an answer's head says: its X-Sample-Rate header, else its Content-Type's rate parameter
    (audio/pcm;rate=24000); None when it says none (or something that is not a positive whole number)."""
    return (_whole_number(headers.get("x-sample-rate"))
            or _whole_number(wire.media_type(headers.get("content-type") or "")[1].get("rate")))


def _whole_number(text: Any) -> int | None:
    said = str(text or "").strip()
    return int(said) if said.isdigit() and int(said) > 0 else None


class WavStreamDecoder:
    """A WAV file arriving in pieces (OpenAI's streamed speech) -> AudioChunk events (mono PCM16 at the
    header's rate; more channels are averaged), then Done when the stream ends. An answer that is raw PCM16
    (RAW_PCM_TYPES, raw_pcm) is read at the rate its head says, else at OpenAI's 24 kHz, which Done's result then says
    was assumed (`sample_rate_note`)."""

    def __init__(self) -> None:
        self.finished = False
        self.text: list[str] = []
        self.buf = b""
        self.rate: int | None = None
        self.rate_assumed = False
        self.channels = 1
        self.sample_type = "<i2"
        self.in_data = False
        self.audio_s = 0.0
        self.t0 = time.perf_counter()
        self.first: float | None = None

    def raw_pcm(self, sample_type: str, rate: int | None, channels: int | None) -> None:
        """The answer is raw PCM16 samples of `sample_type` (no WAV header), at `rate` (None: its head said none)."""
        self.in_data, self.sample_type, self.channels = True, sample_type, channels or 1
        self.rate, self.rate_assumed = rate or wire.OPENAI_PCM_RATE, rate is None

    def _header(self) -> bool:
        """Reads RIFF chunks up to 'data'; False while more bytes are needed."""
        if len(self.buf) < 12:
            return False
        if self.buf[:4] != b"RIFF" or self.buf[8:12] != b"WAVE":
            raise UnknownEventError("the speech stream is not a WAV file")
        pos = 12
        while len(self.buf) >= pos + 8:
            kind, size = self.buf[pos:pos + 4], struct.unpack("<I", self.buf[pos + 4:pos + 8])[0]
            if kind == b"data":
                self.buf, self.in_data = self.buf[pos + 8:], True
                return True
            if len(self.buf) < pos + 8 + size:
                return False
            if kind == b"fmt ":
                tag, self.channels, self.rate, _, _, bits = struct.unpack("<HHIIHH", self.buf[pos + 8:pos + 24])
                if tag != 1 or bits != 16:
                    raise UnknownEventError(f"the speech stream is not 16-bit PCM WAV (format {tag}, {bits} bits)")
            pos += 8 + size + (size & 1)
        return False

    def feed_bytes(self, data: bytes) -> list[Event]:
        if self.finished:
            return []
        self.buf += data
        if not self.in_data and not self._header():
            return []
        if not self.rate:
            raise UnknownEventError("the WAV stream has no 'fmt ' chunk before its data")
        frame = 2 * self.channels
        n = len(self.buf) // frame * frame
        pcm, self.buf = self.buf[:n], self.buf[n:]
        if not pcm:
            return []
        if self.channels > 1 or self.sample_type != "<i2":
            x = np.frombuffer(pcm, self.sample_type).reshape(-1, self.channels).astype(np.int32).mean(axis=1)
            pcm = np.round(x).astype("<i2").tobytes()
        ev = AudioChunk(pcm, int(self.rate), "", self.audio_s)
        self.audio_s += ev.seconds
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        return [ev]

    def feed_end(self) -> list[Event]:
        if self.finished:
            return []
        self.finished = True
        if not self.in_data:
            return [Error("the speech stream ended before any audio", "protocol_error")]
        total = time.perf_counter() - self.t0
        stats = GenerationStats(time_to_first_audio_s=self.first or 0.0, audio_seconds=self.audio_s, total_s=total,
                                audio_real_time_factor=total / self.audio_s if self.audio_s else 0.0)
        result = {"sample_rate": self.rate}
        if self.rate_assumed:
            result["sample_rate_note"] = wire.ASSUMED_RATE_NOTE
        return [Done(text="", finish_reason="stop", stats=stats, result=result)]


# =========================================================================== speech in


TRANSLATIONS_PATH = "/v1/audio/translations"
TRANSLATION_LANGUAGE = "English"  # what a translation is written in (OpenAI's translations: into English only)


def translation_call(audio: Any, sample_rate: int | None, context: str | None, max_tokens: int | None,
                     openai_model: str | None = None, hotwords: list[str] | None = None) -> HttpCall | Error:
    """POST /v1/audio/translations: the speech in `audio` as English text, sent as a transcription is (its context
    and hotwords too); one JSON answer (OpenAI's translations are not streamed), read as one Done whose `result`
    holds {"language", "text"}."""
    request = transcription_request(audio, sample_rate, context, hotwords, None, max_tokens, openai_model)
    if isinstance(request, Error):
        return request
    request["data"].pop("stream")
    return HttpCall("POST", TRANSLATIONS_PATH, request, "json", parse=translation_events)


def translation_events(body: Any) -> list[Event]:
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise UnknownEventError("a translation's answer without its 'text'")
    result = {"language": body.get("language") or TRANSLATION_LANGUAGE, "text": body["text"]}
    stats = wire.stats_from_wire(body.get("usage"), body.get("metrics"))
    return [Done(text=body["text"], finish_reason=body.get("finish_reason") or "stop", stats=stats, result=result)]


# =========================================================================== images


def image_call(prompt: str, task: str, images: list | None, size: str | None, aspect: str | None, steps: int | None,
               guidance: float | None, seed: int | None, preview_every: int | None, preset: str | None,
               mask_color: str | None, n: int, openai_model: str | None = None, cfg_truncation: float | None = None,
               cfg_normalization: bool | float | None = None, image_guidance: float | None = None,
               negative_prompt: str | None = None, mask=None) -> HttpCall | Error:
    """POST /v1/images/generations (JSON), /edits or /segmentations (multipart: the images as `image[]`
    files, the first being the reference). Ours stream (`stream: true`, a preview every
    `preview_every` steps); an OpenAI-compatible backend answers one JSON body. `image_guidance` (the
    Preview's reference-picture guidance) goes with edits and segmentations; the server refuses it elsewhere.
    `negative_prompt`: what the picture should not show (a Preview engine; a 2.0 engine refuses it). `mask`: an edit's
    mask (OpenAI's: a picture of the first one's size, transparent where to edit), sent as the `mask` file."""
    if task not in IMAGE_TASKS:
        return Error(f"task must be one of {', '.join(IMAGE_TASKS)}, got {task!r}", "invalid_request")
    sources = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    if task != "generate" and not sources:
        return Error(f"'{task}' needs an input image (images=[...])", "invalid_request")
    try:
        files = [("image[]", (f"image{i}.{mime.split('/')[-1]}", raw, mime))
                 for i, (raw, mime) in enumerate(image_bytes(src) for src in sources)]
        if mask is not None:
            files.append(("mask", ("mask.png", *image_bytes(mask))))
    except (ValueError, TypeError, OSError) as e:
        return Error(f"images: {e}", "invalid_request")
    if files and task == "generate":
        task = "edit"  # images given: an edit (the first is the reference), as the engine does
    fields = {"prompt": prompt, "n": n, "size": size}
    ours = {"aspect": aspect, "steps": steps, "guidance": guidance, "seed": seed, "preview_every": preview_every,
            "preset": preset, "mask_color": mask_color, "cfg_truncation": cfg_truncation,
            "cfg_normalization": cfg_normalization, "image_guidance": image_guidance,
            "negative_prompt": negative_prompt}
    if openai_model is not None:
        extras = _extras(**ours, segment=task == "segment")
        if extras:
            return not_supported(f"images with {', '.join(extras)}")
        fields.update(model=openai_model, response_format="b64_json")
        parse = wire.images_body_events
        if not files:
            return HttpCall("POST", IMAGE_PATHS[task], {"json": _present(fields)}, "json", parse=parse)
        return HttpCall("POST", IMAGE_PATHS[task], {"files": files, "data": _form(fields)}, "json", parse=parse)
    fields.update(ours, stream=True)
    if not files:
        return HttpCall("POST", IMAGE_PATHS[task], {"json": _present(fields)}, "sse", wire.ImageSseDecoder())
    return HttpCall("POST", IMAGE_PATHS[task], {"files": files, "data": _form(fields)}, "sse",
                    wire.ImageSseDecoder())


def _present(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _form(fields: dict) -> dict:
    """Multipart text fields (booleans as true/false)."""
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in _present(fields).items()}


# =========================================================================== an OpenAI-compatible backend


def probe_found(status: int, content: bytes) -> bool:
    """Whether a probed route (POSTed an empty JSON object) is there: anything but 404/405, or our
    modality_not_supported refusal. A refused token raises ServerError (unauthorized)."""
    if status == 401:
        json_answer(status, content)
    if status in (404, 405):
        return False
    try:
        body = wire.read_json(content)
    except ValueError:
        return True
    err = body.get("error") if isinstance(body, dict) else None
    return not (isinstance(err, dict) and err.get("code") == "modality_not_supported")


def openai_info(models_body: Any, found: dict[str, bool]) -> ModelInfo:
    """ModelInfo of an OpenAI-compatible backend: its first /v1/models entry; capabilities assumed
    (OPENAI_ASSUMED) plus the probed routes that answered."""
    from engine.client.core import models_info  # noqa: PLC0415

    info = models_info(models_body)
    info.capabilities = set(OPENAI_ASSUMED) | {cap for cap, ok in found.items() if ok}
    info.input_modalities = ["text", "image", "video", "audio"]
    info.output_modalities = ["text"] + [m for m, c in (("audio", "speech_out"), ("image", "image_out"))
                                         if c in info.capabilities]
    return info


def speech_options_unknown() -> Error:
    return not_supported("the speech options (dialects, emotions, BGM fields)")
