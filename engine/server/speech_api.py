"""Speech, sound and music out over HTTP: POST /v1/audio/speech (OpenAI's shape plus our fields), and
our voice library and options: GET/POST /v1/audio/voices, DELETE /v1/audio/voices/{name},
GET /v1/audio/speech/options.

`/v1/audio/speech` answers with the whole file (mp3 unless another format is named, as OpenAI's; wav, flac, mp3,
aac, opus: every header states the true rate;
pcm, which has none, at OpenAI's 24 kHz), with raw bytes as they are made (`stream_format: "audio"`: wav with a streaming header,
or pcm), or with SSE (`stream_format: "sse"`: `speech.audio.delta` ... `speech.audio.done`). Every
request runs through the server's one scheduler (queue positions, cancellation when the client goes
away, limits). The talker's errors (unknown voice, dialect or emotion, empty text, a bad reference
clip ...) come back as 400s whose message lists what is valid.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.errors import MingError
from engine.events import AudioChunk, Done, Error, Event, Progress
from engine.runtime import no_audio_after_cancel
from engine.server import codec, fields
from engine.server import protocol as wire
from engine.server.audio_out import (DEFAULT_FORMAT, FORMATS, OPENAI_PCM_RATE, RATE_HEADER, STREAMABLE, coded_rate,
                                     encode_audio, resampled, wav_header)
from engine.server.bodies import JSON, MULTIPART, body_kind, form_body, form_file, form_flag, form_text, json_body
from engine.server.codec import bad, need_dict, need_number
from engine.server.context import ServerContext
from engine.server.http_api import (SSE_HEADERS, collect, ctx_of, error_response, first_events, job_metrics,
                                    json_request, left_early, refused_at_once, stream_response, text_field)
from engine.server.params import DEFAULT_VOICE, MAX_VOICE_NAME_CHARS, flag, voice_name
from engine.server.protocol import ApiError
from engine.server.scheduler import Job

router = APIRouter()            # OpenAI's route
extension_router = APIRouter()  # ours (absent with --openai-only)

MAX_INPUT_CHARS = 10_000        # the talker's own per-request limit (engine.models.talker.text.MAX_TEXT_CHARS)
MAX_FIELD_CHARS = 2_000
MAX_SECONDS = 600.0
# OpenAI's speed (0.25-4.0) -> the talker's speed label; 0.9-1.1 leaves the speed alone
SPEED_RANGE, SLOW_BELOW, FAST_ABOVE = (0.25, 4.0), 0.9, 1.1
STREAM_FORMATS = ("sse", "audio")
WARNING_HEADER = "X-Reference-Warning"  # a reference clip cloned as asked that will not clone well (a clipped one)


def talker_of(ctx: ServerContext):
    """The engine, when it can speak; else modality_not_supported saying why."""
    engine = ctx.engine
    if not getattr(engine, "has_talker", False):
        why = getattr(engine, "talker_error", None) or "the loaded model has no talker"
        raise ApiError(f"speech output is not available: {why}", code="modality_not_supported")
    return engine


def instruction_from(body: dict, with_voice: bool = False) -> dict | str | None:
    """The talker's instruction from OpenAI's `instructions` (free text = voice design, 风格; or
    "key=value,..." in the talker's keys), `speed`, and our fields (dialect, emotion, pitch, volume,
    style, ip, bgm, instruct); the talker's own check of each value runs here, so a value it refuses
    (an unknown emotion or speed label ...) is a 400 naming the field it came from, listing the valid ones.
    `with_voice`: a saved voice or a reference clip is given, which a voice design cannot go with."""
    spec: dict = {}
    origin: dict[str, str] = {}  # instruction key -> the request field that gave it

    def put(values: dict, field: str) -> None:
        spec.update(values)
        origin.update({str(k): field for k in values})

    inst = body.get("instruct")
    if isinstance(inst, str):
        inst = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in inst.split(",") if p.strip())}
    if inst is not None:
        put(need_dict(inst, "instruct"), "instruct")
    for name in fields.SPEECH_INSTRUCTION_FIELDS:
        if body.get(name) is not None:
            put({name: text_field(body[name], name, MAX_FIELD_CHARS)}, name)
    if body.get("bgm") is not None:
        bgm = need_dict(body["bgm"], "bgm")
        for key, value in bgm.items():
            if str(key).lower() == "snr" and value is not None:
                need_number(value, f"bgm.{key}")
        put({"bgm": bgm}, "bgm")
    instructions = text_field(body.get("instructions"), "instructions", MAX_FIELD_CHARS, required=False)
    if instructions and instructions.strip():
        parts = [p.partition("=") for p in instructions.split(",") if p.strip()]
        if all(sep for _, sep, _ in parts):
            put({k.strip(): v.strip() for k, _, v in parts}, "instructions")
        elif "style" not in spec:
            put({"style": instructions}, "instructions")
    speed = body.get("speed")
    if isinstance(speed, str):
        not_number_text(speed, "speed")
        put({"speed": text_field(speed, "speed", 32)}, "speed")
    elif speed is not None:
        value = need_number(speed, "speed", *SPEED_RANGE)
        if value < SLOW_BELOW:
            put({"speed": "slow"}, "speed")
        elif value > FAST_ABOVE:
            put({"speed": "fast"}, "speed")
    check_instruction(spec, origin)
    if with_voice and spec.get("style") is not None:  # (the talker's refusal came back naming no field)
        field = origin["style"]
        raise bad(f"'{field}' as free text describes a new voice (voice design), which cannot go with a saved 'voice' "
                  "or a 'reference_audio' clip: leave those out, or give the voice's manner as key=value pairs "
                  "(e.g. 'emotion=happy, speed=fast')", "invalid_request", field)
    return spec or None


def not_number_text(value: str, name: str) -> None:
    """A field that takes a number or a label, given a number as text ("1.0"): invalid_type, as a number sent as a
    string is on every other route (it was read as an unknown label); other text is left to the label's check."""
    try:
        float(value)
    except ValueError:
        return
    raise bad(f"'{name}' must be a number or one of its labels; {codec.shown(value)} is a number sent as text: send "
              "it without quotes", "invalid_type", name)


def check_instruction(spec: dict, origin: dict[str, str]) -> None:
    """Each entry of an instruction as the talker parses it (engine.models.talker.prompt.Instruction), one
    at a time so that a refusal names the request field the entry came from."""
    from engine.models.talker.prompt import Instruction  # noqa: PLC0415

    for key, value in spec.items():
        try:
            Instruction.parse({key: value})
        except MingError as e:
            raise bad(str(e), wire.wire_code(e.code), origin.get(str(key), "instruct")) from None


def reference_clips(body: dict, ctx: ServerContext) -> tuple[list[bytes] | None, list[str]]:
    """(clips, warnings) of `reference_audio`: an audio file (wav, flac, mp3, ogg, ...) as base64 or a data: URL, or a
    list of them (podcast: one per speaker); each checked (decodable, within the length limit) here, and what to tell
    of each that will not clone well (check_reference_clip)."""
    value = body.get("reference_audio")
    if value is None:
        return None, []
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > 8:
        raise bad("'reference_audio' must be one clip or a list of 1-8 clips", "invalid_value", "reference_audio")
    clips, warnings = [], []
    for i, v in enumerate(values):
        name = "reference_audio" if len(values) == 1 else f"reference_audio[{i}]"
        raw = codec.data_url(v, name, ctx.limits.max_request_bytes)[1] if isinstance(v, str) and v.startswith(
            "data:") else codec.b64decode(v, name, ctx.limits.max_request_bytes)
        if (warning := check_reference_clip(raw, ctx, name)) is not None:
            warnings.append(warning)
        clips.append(raw)
    return clips, warnings


def check_reference_clip(raw: bytes, ctx: ServerContext, name: str) -> str | None:
    """A clip the talker can clone a voice from, else a 400 naming `name`: decodable and within the limits
    (codec.audio_file: a recording's audio track too), 0.5-30 s and not silent (the talker's own check). Returns what
    to tell of one that is cloned but will not clone well (a clipped one: talker.audio.clipping_warning)."""
    import torch  # noqa: PLC0415

    from engine.media.errors import MediaError  # noqa: PLC0415
    from engine.models.talker.audio import check_reference, clipping_warning  # noqa: PLC0415

    audio = codec.audio_file(raw, ctx.limits, name, video_ok=True, mix_channels=True)  # (as the talker reads it)
    samples = torch.from_numpy(audio.samples)
    try:
        check_reference(samples, audio.sample_rate)
    except MediaError as e:
        raise bad(f"'{name}': {e}", "invalid_media", name) from None
    return clipping_warning(samples, f"'{name}'")


def speech_request(body: dict, ctx: ServerContext) -> tuple[dict, list[str]]:
    """(engine.speak keyword arguments, warnings on the reference clips) from a /v1/audio/speech body (types and
    limits checked here)."""
    from engine.models.talker.pipeline import TASKS  # noqa: PLC0415
    from engine.models.talker.text import check_text as check_speakable  # noqa: PLC0415

    task = body.get("task", "tts")
    codec.need_str(task, "task")
    if task not in TASKS:
        raise bad(f"unknown task {codec.shown(task)}; valid tasks: {', '.join(TASKS)}", "invalid_value", "task")
    music = body.get("music")
    given_music = task == "music" and music is not None  # (an empty {} too: its refusal names 'music', not 'input')
    text = text_field(body.get("input"), "input", MAX_INPUT_CHARS, required=not given_music)
    if not given_music:  # what the talker speaks (or describes): checked as it checks it
        try:
            check_speakable(text, "'input'")
        except MingError as e:
            raise bad(f"{e} (the text to {'speak' if task in ('tts', 'podcast') else 'describe the ' + task})",
                      wire.wire_code(e.code), "input") from None
    voice = body.get("voice")
    if voice is not None:
        voice = voice_name(voice, "voice", ctx.engine)
        if voice != DEFAULT_VOICE and body.get("reference_audio") is not None:
            raise bad("give either a saved 'voice' or a 'reference_audio' clip, not both", "invalid_value", "voice")
    seed = body.get("seed")
    if seed is not None:
        seed = int(need_number(seed, "seed", 0, 2 ** 63 - 1, integer=True))
    max_seconds = body.get("max_seconds")
    if max_seconds is not None:
        max_seconds = float(need_number(max_seconds, "max_seconds", 0.1, MAX_SECONDS))
    instruct = instruction_from(body, (voice is not None and voice != DEFAULT_VOICE)
                                or body.get("reference_audio") is not None)
    check_task_inputs(task, text, music, voice, body)
    check_talker_takes(getattr(ctx.engine, "talker", None), task, instruct, body)
    if task in ("sound", "music"):  # (the talker's own rule, named by the field that broke it)
        given = [f for f in ("voice", "reference_audio", "instructions", "instruct", "speed", "bgm")
                 + fields.SPEECH_INSTRUCTION_FIELDS if body.get(f) is not None and (f != "voice" or voice is not None)]
        if given and (instruct or (voice is not None and voice != DEFAULT_VOICE) or "reference_audio" in given):
            raise bad(f"task {task!r} takes a description only: no voice, reference clip or instruction "
                      f"({', '.join(given)} given)", "invalid_request", given[0])
    clips, warnings = reference_clips(body, ctx)
    return {"text": text or "", "task": task, "voice": None if voice == DEFAULT_VOICE else voice,
            "ref_audio": clips, "ref_text": reference_transcript(body.get("reference_text")),
            "instruct": instruct, "music": None if music is None else need_dict(music, "music"),
            "seed": seed, "max_seconds": max_seconds}, warnings


def reference_transcript(value) -> str | None:
    """`reference_text`: what the reference clip says, checked as the talker checks it (a refusal names the field);
    left out or blank (an empty form field), our ASR transcribes the clip (`ref_text_from_asr` says what it heard)."""
    from engine.models.talker.text import check_text as check_speakable  # noqa: PLC0415

    text = text_field(value, "reference_text", MAX_INPUT_CHARS, required=False)
    if text is None or not text.strip():
        return None
    try:
        check_speakable(text, "'reference_text'")
    except MingError as e:
        raise bad(f"{e} (what the reference clip says; leave it out to have it transcribed)", wire.wire_code(e.code),
                  "reference_text") from None
    return text


MUSIC_FIELDS = ("genre", "mood", "instrument", "theme", "duration")
INSTRUCTION_GIVERS = ("instructions", "instruct", "speed", "bgm") + fields.SPEECH_INSTRUCTION_FIELDS


def check_talker_takes(pipe, task: str, instruct, body: dict) -> None:
    """What the loaded talker does not do (the Preview's speaks text only, spec §7.11), refused naming the field that
    asked for it (the talker's own refusal named none)."""
    if task not in getattr(pipe, "tasks", (task,)):
        raise bad(f"task {task!r} is not done by the loaded talker (the Preview's speaks text only: task 'tts'); it "
                  f"does {', '.join(pipe.tasks)}", "invalid_request", "task")
    if instruct and not getattr(pipe, "takes_instructions", True):
        given = next(f for f in INSTRUCTION_GIVERS if body.get(f) is not None)
        raise bad(f"the loaded talker takes no instruction (the Preview's prompt has no place for one): leave out "
                  f"'{given}'", "invalid_request", given)


def check_task_inputs(task: str, text: str | None, music, voice: str | None, body: dict) -> None:
    """What a music or podcast task needs, checked as the talker checks it (engine.models.talker.prompt
    .music_text, pipeline), so a refusal names its field instead of coming back from the engine with none."""
    from engine.models.talker.prompt import is_music_text, music_text  # noqa: PLC0415

    if task == "music" and music is not None:
        music = need_dict(music, "music")
        codec.check_keys(music, "music", MUSIC_FIELDS)
        if music.get("duration") is not None:
            need_number(music["duration"], "music.duration")
        try:
            music_text(music.get("genre", ""), music.get("mood", ""), music.get("instrument", ""),
                       music.get("theme", ""), music.get("duration", 30))
        except MingError as e:
            raise bad(f"{e} (music takes {', '.join(MUSIC_FIELDS)})", wire.wire_code(e.code), "music") from None
    elif task == "music" and not is_music_text(text or ""):
        raise bad("music needs Genre, Mood, Instrument, Theme and Duration: give them as 'music' {genre, mood, "
                  "instrument, theme, duration} or write 'input' as ' Genre: ... Mood: ... Instrument: ... Theme: "
                  "... Duration: 30s.'", "invalid_request", "input")
    if task == "podcast" and body.get("reference_audio") is None and (voice is None or voice == DEFAULT_VOICE):
        raise bad("podcast needs one reference clip (or saved voice) per speaker: give 'reference_audio' (a list, "
                  "one clip per speaker) or a saved 'voice'", "invalid_request", "reference_audio")


def output_format(body: dict) -> tuple[str, str | None]:
    """(response_format, stream_format). Left out, the format is OpenAI's default, mp3 (a whole file); a stream
    (stream_format "audio" or "sse") carries wav or pcm as it is made, so one that names no format is wav."""
    fmt = body.get("response_format", DEFAULT_FORMAT if body.get("stream_format") is None else STREAMABLE[0])
    if not isinstance(fmt, str) or fmt not in FORMATS:  # (a list or an object cannot be looked up)
        raise bad(f"response_format {str(fmt)[:20]!r} is not supported; use one of {', '.join(FORMATS)}",
                  "unsupported_parameter", "response_format")
    stream = body.get("stream_format")
    if stream is not None and stream not in STREAM_FORMATS:
        raise bad("stream_format must be 'sse' or 'audio' (or left out for the whole file)", "invalid_value",
                  "stream_format")
    if stream == "audio" and fmt not in STREAMABLE:
        raise bad(f"stream_format 'audio' streams {' or '.join(STREAMABLE)} as it is made; {fmt} comes as a whole "
                  "file (leave stream_format out)", "unsupported_parameter", "stream_format")
    if stream == "sse" and fmt not in STREAMABLE:
        raise bad(f"stream_format 'sse' carries {' or '.join(STREAMABLE)} audio; {fmt} comes as a whole file",
                  "unsupported_parameter", "response_format")
    return fmt, stream


def speech_job(ctx: ServerContext, engine, kwargs: dict, pcm_rate: int | None, progress: bool = True) -> Job:
    """The synthesis as a scheduler job; `pcm_rate`: resample the audio to it (OpenAI's 24 kHz pcm); `progress` False:
    without the engine's Progress events (a raw audio stream, which cannot carry them, then starts with its first sound,
    and a refusal before it is still a 4xx, not a stream cut short before any byte)."""

    def run(cancel) -> Iterator[Event]:
        events = no_audio_after_cancel(engine.speak(cancel=cancel, **kwargs), cancel)
        events = events if progress else (ev for ev in events if not isinstance(ev, Progress))
        return resampled(events, pcm_rate) if pcm_rate else events

    job = Job(run, label="audio.speech")
    job.media_bytes = sum(len(clip) for clip in kwargs.get("ref_audio") or ())  # held until the talker decodes them
    ctx.scheduler.submit(job)
    return job


@router.post("/v1/audio/speech")
async def speech(request: Request):
    received, arrived = time.perf_counter(), time.time()
    ctx, body = await json_request(request, fields.SPEECH, "speech", fields.SPEECH_EXTENSIONS)
    engine = talker_of(ctx)
    fmt, stream = output_format(body)
    kwargs, warnings = await asyncio.to_thread(speech_request, body, ctx)  # decodes reference clips
    warned = {WARNING_HEADER: "; ".join(warnings)} if warnings else {}
    # raw pcm has no header to state a rate: OpenAI's 24 kHz (an SSE delta names its rate, ours: the true one)
    pcm_rate = OPENAI_PCM_RATE if fmt == "pcm" and (ctx.openai_only or stream != "sse") else None
    job = speech_job(ctx, engine, kwargs, pcm_rate, progress=stream != "audio")
    refusal = lambda final: speech_error(final, ctx, kwargs.get("voice"), arrived)  # noqa: E731
    if stream is None:
        got, final = await collect(request, ctx, job)
        if isinstance(final, Error):
            return error_response(refusal(final))
        rate = got.audio[0].sample_rate if got.audio else (pcm_rate or engine.talker.sample_rate)
        data = await asyncio.to_thread(encode_audio, b"".join(c.pcm for c in got.audio), rate, fmt)
        return Response(data, media_type=FORMATS[fmt][0], headers={RATE_HEADER: str(coded_rate(fmt, rate)), **warned})
    head, events = await first_events(job)
    refused = refused_at_once(head)
    if refused is not None:
        return error_response(refusal(refused))
    rate = pcm_rate or engine.talker.sample_rate
    if stream == "audio":
        answer = raw_audio_stream(ctx, job, events, fmt, rate)
    else:
        header = wav_header(rate) if fmt == "wav" else b""
        enc = wire.SpeechSseEncoder(extensions=not ctx.openai_only, wav_header=header)
        answer = stream_response(ctx, job, enc.encode, lambda final: enc.finish(
            refusal(final) if isinstance(final, Error) else final, job_metrics(job, received, final)), events)
    answer.headers.update(warned)
    return answer


# The most deleted voices a server remembers the time of (ServerContext.voices_deleted)
REMEMBERED_DELETIONS = 256


def speech_error(final: Error, ctx: ServerContext, voice: str | None, arrived: float) -> ApiError:
    """The engine's refusal of a speech request (which came at `arrived`, time.time()) as its 4xx, or its stream's
    error event: a saved `voice` deleted while the request waited its turn (checked, and named 'voice', when it came)
    names 'voice' too (it said param null), and says so, with when this server deleted it (a stream already started
    said only "unknown voice 'x'; saved voices: ...")."""
    err = wire.engine_error(final)
    if err.code == "voice_not_found":
        err.param = "voice"
        if voice is not None:
            err.message = deleted_voice_message(voice, arrived, ctx.voices_deleted.get(voice))
    return err


def deleted_voice_message(voice: str, arrived: float, deleted: float | None) -> str:
    """What a request for the saved voice `voice`, there when the request came at `arrived`, is told when the voice is
    gone once its turn comes; `deleted`: when this server deleted it (None: it does not know, another process did)."""
    when = (f" at {time.strftime('%H:%M:%S', time.gmtime(deleted))} UTC ({deleted - arrived:.1f} s after this request "
            "came)" if deleted is not None and deleted >= arrived else "")
    return (f"the saved voice {voice!r} was deleted{when} while this request waited its turn: choose another voice, or "
            "save that one again")


def note_deleted(ctx: ServerContext, name: str) -> None:
    """Remember when this server deleted the saved voice `name` (the last REMEMBERED_DELETIONS)."""
    ctx.voices_deleted.pop(name, None)
    ctx.voices_deleted[name] = time.time()
    while len(ctx.voices_deleted) > REMEMBERED_DELETIONS:
        ctx.voices_deleted.pop(next(iter(ctx.voices_deleted)))


def raw_audio_stream(ctx: ServerContext, job: Job, events: AsyncIterator[Event], fmt: str,
                     rate: int) -> StreamingResponse:
    """`stream_format: "audio"`: the bytes as they are made at `rate` (wav: a streaming header first). An error
    after the first bytes can only end the stream early."""

    async def body() -> AsyncIterator[bytes]:
        header_due = fmt == "wav"
        try:
            async for ev in events:
                if isinstance(ev, AudioChunk) and ev.pcm:
                    if header_due:
                        header_due = False
                        yield wav_header(ev.sample_rate)
                    yield ev.pcm
                elif isinstance(ev, (Done, Error)):
                    return
        finally:
            left_early(ctx, job)

    # (SSE_HEADERS: not cached, and not held back by a reverse proxy that buffers responses, as the SSE streams)
    return StreamingResponse(body(), media_type=FORMATS[fmt][0], headers={**SSE_HEADERS, RATE_HEADER: str(rate)})


# --------------------------------------------------------------------------- the voice library


def voice_object(info, from_asr: bool = False) -> dict:
    """A saved voice on the wire; `ref_text_from_asr` (the transcript, as in speech results) only when
    our ASR wrote it; `reference_warning` only when its clip will not clone well (a clipped one)."""
    out = {"object": "audio.voice", "name": info.name, "reference_text": info.ref_text,
           "seconds": round(float(info.seconds), 3), "speakers": info.speakers, "created": int(info.created)}
    if info.warning:
        out["reference_warning"] = info.warning
    if from_asr:
        out["ref_text_from_asr"] = info.ref_text or ""
    return out


@extension_router.get("/v1/audio/voices")
async def list_voices(request: Request):
    engine = talker_of(ctx_of(request))
    voices = await asyncio.to_thread(engine.list_voices)
    return {"object": "list", "data": [voice_object(v) for v in voices]}


async def voice_upload(request: Request, ctx: ServerContext) -> tuple[str, bytes, str | None, bool]:
    """(name, clip bytes, transcript or None, replace) from multipart (`name`, `file`, `reference_text`,
    `replace`) or JSON (`name`, `reference_audio` base64 or data: URL, `reference_text`, `replace`)."""
    if body_kind(request, (JSON, MULTIPART)) == MULTIPART:
        form = await form_body(request, ctx.limits, max_files=1, max_fields=16)
        try:
            fields.VOICES_FORM.check({key: form.get(key) for key in form.keys()})
            raw = await form_file(form, "file", "the reference clip")
            name = form_text(form, "name", 64)
            text = form_text(form, "reference_text", MAX_INPUT_CHARS)
            replace = form_flag(form, "replace")
        finally:
            await form.close()
    else:
        body = await json_body(request, ctx.limits)
        fields.VOICES_JSON.check(body)
        name = body.get("name")
        if body.get("reference_audio") is None:
            raise bad("'reference_audio' (the clip, base64 or a data: URL) is required", "missing_field",
                      "reference_audio")
        raw = body["reference_audio"]
        text = body.get("reference_text")
        replace = flag(body, "replace")
    name = voice_name(text_field(name, "name", MAX_VOICE_NAME_CHARS), "name")
    if name == DEFAULT_VOICE:
        raise bad(f"'{DEFAULT_VOICE}' names the talker's own voice: save this one under another name", "invalid_value",
                  "name")
    text = reference_transcript(text)
    if isinstance(raw, bytes):
        await asyncio.to_thread(check_reference_clip, raw, ctx, "file")
    else:
        raw = (await asyncio.to_thread(reference_clips, {"reference_audio": raw}, ctx))[0][0]
    return name, raw, text, replace


@extension_router.post("/v1/audio/voices")
async def save_voice(request: Request):
    """Clone a voice from a clip and keep it under a name; a missing transcript is filled in by our ASR
    (which runs the thinker, so this waits its turn in the scheduler)."""
    ctx = ctx_of(request)
    engine = talker_of(ctx)
    name, raw, text, replace = await voice_upload(request, ctx)

    def run(cancel) -> Iterator[Event]:
        from engine.errors import MingError  # noqa: PLC0415

        try:  # (`cancel`: the client went away, or the server is stopping: the transcription stops, nothing is saved)
            info = engine.save_voice(name, raw, ref_text=text, replace=replace, cancel=cancel)
        except MingError as e:
            yield Error(str(e), code=e.code)
            return
        if info is None:
            yield Done(text="", finish_reason="cancelled")
            return
        yield Done(text=info.ref_text or "", finish_reason="stop", result=voice_object(info, text is None))

    job = Job(run, label="audio.voices")
    ctx.scheduler.submit(job)
    _, final = await collect(request, ctx, job)
    if isinstance(final, Error):
        err = wire.engine_error(final)
        err.param = "name" if err.code == "voice_exists" else err.param
        return error_response(err)
    if final.finish_reason == "cancelled":  # (a client gone reads nothing: this is for a server that is stopping)
        return error_response(ApiError("the voice was not saved: the server stopped its request (it is shutting "
                                       "down)", code="server_shutting_down"))
    return JSONResponse(final.result, status_code=201)


@extension_router.delete("/v1/audio/voices/{name}")
async def delete_voice(request: Request, name: str):
    from engine.errors import MingError  # noqa: PLC0415

    ctx = ctx_of(request)
    engine = talker_of(ctx)
    name = voice_name(name, "name")
    try:
        await asyncio.to_thread(engine.delete_voice, name)
    except MingError as e:
        code = wire.wire_code(e.code)  # (a voice the path names that is not there: the resource is not found)
        raise ApiError(str(e), code=code, status=404 if code == "voice_not_found" else None, param="name") from None
    note_deleted(ctx, name)
    return {"object": "audio.voice.deleted", "name": name, "deleted": True}


# --------------------------------------------------------------------------- options


def speech_options(engine) -> dict:
    """What the Voice tab fills its controls with: tasks, the instruction aliases (English alias ->
    the label the model was trained with), the BGM and music fields, formats and limits, and the
    talker's true sample rate."""
    from engine.models.talker.audio import MAX_REFERENCE_S, MIN_REFERENCE_S  # noqa: PLC0415
    from engine.models.talker.pipeline import TASKS  # noqa: PLC0415
    from engine.models.talker.prompt import BGM_FIELDS, DIALECTS, EMOTIONS, LEVELS, SPEEDS  # noqa: PLC0415

    pipe = engine.talker
    tasks = list(getattr(pipe, "tasks", TASKS))
    inst = getattr(pipe, "takes_instructions", True)  # the Preview talker takes none (spec §7.11)
    return {"object": "audio.speech.options", "sample_rate": pipe.sample_rate, "tasks": tasks,
            "instructions": inst, "dialects": dict(DIALECTS) if inst else {},
            "emotions": dict(EMOTIONS) if inst else {}, "speeds": dict(SPEEDS) if inst else {},
            "pitches": dict(LEVELS) if inst else {}, "volumes": dict(LEVELS) if inst else {},
            "bgm_fields": list(BGM_FIELDS) if inst else [],
            "music_fields": ["genre", "mood", "instrument", "theme", "duration"] if "music" in tasks else [],
            "response_formats": list(FORMATS), "stream_formats": list(STREAM_FORMATS),
            "default_voice": DEFAULT_VOICE, "max_input_chars": MAX_INPUT_CHARS,
            "reference_seconds": [MIN_REFERENCE_S, MAX_REFERENCE_S], "max_seconds": MAX_SECONDS}


@extension_router.get("/v1/audio/speech/options")
async def options(request: Request):
    return speech_options(talker_of(ctx_of(request)))
