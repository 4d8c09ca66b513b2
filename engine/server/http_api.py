"""The OpenAI-compatible HTTP API: POST /v1/chat/completions (JSON or SSE stream), POST
/v1/audio/transcriptions (multipart upload; JSON, text or SSE stream) and /v1/audio/translations (the same, into
English, never streamed), GET /v1/models, GET /health,
and what the speech and image endpoints (speech_api.py, images_api.py) share with them: a JSON
request's prologue (content type, size, text, fields and model: engine.server.bodies, .text,
.fields), running a request through the scheduler, SSE responses, and a client leaving early (one
log line and a count, engine.server.logs).

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, with a fitting status.
A stream's client going away cancels its generation (the engine stops within one decode step or one
layer of a prefill chunk).
With --openai-only (`ServerContext.openai_only`) bodies carry OpenAI's fields only: our extension
fields in a request are refused (`refuse_extensions`), answers have no metrics or comment lines.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine.events import Done, Error, Event, QueuePosition
from engine.media.errors import DecodeStopped
from engine.models.thinker.prompt import DEFAULT_SYSTEM_PROMPT
from engine.sampling import MAX_TOP_LOGPROBS, GenerationParams
from engine.server import codec, fields, logs
from engine.server import protocol as wire
from engine.server.audio_out import OPENAI_PCM_RATE, encode_audio, resampled
from engine.server.bodies import (ClientGone, form_file, form_flag, form_number, form_text, read_form,
                                  read_json)
from engine.server.codec import bad, need_dict, need_number, need_str
from engine.server.context import ServerContext
from engine.server.fields import Fields
from engine.server.params import (TRANSCRIPTION_MAX_TOKENS, check_metadata, check_output_modalities, flag,
                                  generation_params, logit_bias, output_kwargs, transcription_tag, vocab_size,
                                  voice_name)
from engine.server.protocol import ApiError
from engine.server.scheduler import Job
from engine.server.sessions import continued_reply, media_nbytes, new_id
from engine.server.text import check_text, text_chars, texts_of

router = APIRouter()
log = logging.getLogger("engine.server.http_api")
T = TypeVar("T")  # what an off-loop decode returns
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


RETRY_AFTER_S = 1  # what a 429 (queue_full) or 503 (shutting down, session limit) asks a client to wait


def error_response(err: ApiError) -> JSONResponse:
    """OpenAI's error body with the error's status; a refusal for load (429, 503) says when to try again
    (Retry-After, RFC 9110 §10.2.3), as OpenAI's own 429s do. After a body that stopped arriving (408) the
    connection closes: what is left of that body could still come, and would read as the next request."""
    headers = retry_headers(err.status) | ({"Connection": "close"} if err.status == 408 else {})
    return JSONResponse({"error": err.to_openai()}, status_code=err.status, headers=headers)


def retry_headers(status: int) -> dict[str, str]:
    """When to try again: after a refusal for load (429, 503), in RETRY_AFTER_S; never after a fault of the request
    itself (a 500: an engine or server fault that the same request meets again) or a conflict (409: a voice name
    taken), which OpenAI's SDK otherwise retries twice by itself, running the whole job each time (`x-should-retry`,
    the header it obeys)."""
    if status in (429, 503):
        return {"Retry-After": str(RETRY_AFTER_S)}
    return {"x-should-retry": "false"} if status == 409 or status >= 500 else {}


async def json_request(request: Request, takes: Fields, kind: str,
                       extensions: tuple[str, ...] = ()) -> tuple[ServerContext, dict]:
    """(context, body) of a JSON request: a JSON content type, the body within the size limit and
    valid text, its fields known to this endpoint (`takes`), with --openai-only our `extensions`
    fields refused, and the model one this endpoint's `kind` answers to (engine.server.fields)."""
    ctx = ctx_of(request)
    body = await read_json(request, ctx.limits)
    takes.check(body)
    refuse_extensions(ctx, body, extensions)
    ctx.check_model(body.get("model"), kind)
    return ctx, body


def refuse_extensions(ctx: ServerContext, body, names) -> None:
    """--openai-only: a request naming one of our extension fields is refused (unknown_parameter)."""
    if not ctx.openai_only:
        return
    for name in names:
        if body.get(name) is not None:
            raise bad(f"'{name}' is an extension of this server, off in --openai-only mode (OpenAI's fields only)",
                      "unknown_parameter", name)


def text_field(value, name: str, max_chars: int, required: bool = True) -> str | None:
    """A text field of a request: a string (None when absent and not `required`), at most `max_chars`
    characters, valid Unicode (no lone surrogates, which JSON lets through)."""
    if value is None and not required:
        return None
    if value is None:
        raise bad(f"'{name}' is required", "missing_field", name)
    need_str(value, name)
    if len(value) > max_chars:
        raise bad(f"'{name}' is too long: {len(value):,} characters, at most {max_chars:,}", "invalid_value", name)
    check_text(value, name)
    return value


# --------------------------------------------------------------------------- chat completions


def replayed_words(m: dict, name: str) -> tuple[Any, str | None]:
    """What an assistant message said, as the SDK replays an answer (`messages.append(answer.choices[0].message)`):
    (its `content`, its `refusal` read after it: codec.convert_content joins it as a message's text parts are); either
    alone when the other is absent (an answer that refused has no content); else a spoken answer's
    `audio.transcript`. Its audio itself is not kept: an `audio` naming an `id` only (OpenAI's way to refer
    to an earlier reply's audio) is refused, as the server keeps no audio between requests."""
    audio = m.get("audio")
    if audio is not None:
        audio = need_dict(audio, f"{name}.audio")
        codec.check_keys(audio, f"{name}.audio", ("transcript",), ("id", "data", "expires_at", "sample_rate"))
        if audio.get("transcript") is None:
            raise bad(f"'{name}.audio' (an earlier reply's audio by id) is not supported: this server keeps no audio "
                      "between requests; send the reply's text as 'content'", "unsupported_parameter", f"{name}.audio")
    content, refusal = m.get("content"), m.get("refusal")
    if refusal is not None:
        need_str(refusal, f"{name}.refusal")
    if content is None:
        return (refusal if refusal is not None or audio is None else need_str(audio["transcript"],
                                                                              f"{name}.audio.transcript")), None
    if refusal and isinstance(content, (str, list)):  # both (the refusal was dropped): it follows the reply's parts
        return content, refusal
    return content, None


TOOL_ROLES = ("tool", "function")  # OpenAI's messages answering a tool call (function: the deprecated one)
TOOL_CALL_FIELDS = ("tool_calls", "function_call")  # an assistant message's tool calls (empty ones are taken)


def convert_messages(messages, limits) -> tuple[list[dict], str | None]:
    """OpenAI messages -> (engine messages, system prompt or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "invalid_type", "messages")
    if len(messages) > limits.max_conversation_items:
        raise bad(f"'messages' holds {len(messages)} messages; at most {limits.max_conversation_items}",
                  "too_many_messages", "messages")
    out, system = [], []
    budget = codec.MediaBudget(limits.max_session_media_bytes)
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        m = need_dict(m, name)
        role = m.get("role")
        if m.get("name") is not None:  # OpenAI's participant name: no effect here, but a string
            need_str(m["name"], f"{name}.name")
        if m.get("content") == []:  # (OpenAI's "empty array": a list of parts holds at least one)
            raise bad(f"'{name}.content' is an empty list: give a string or at least one part", "invalid_value",
                      f"{name}.content")
        if role in ("system", "developer"):
            codec.check_keys(m, name, ("role", "content"), ("name",))
            system.append(codec.text_only(m.get("content"), f"{name}.content"))
            continue
        if role in TOOL_ROLES:
            raise fields.no_tool_calling(f"{name}.role", role)
        if role not in ("user", "assistant"):
            raise bad(f"'{name}.role' must be system, developer, user or assistant", "invalid_value", f"{name}.role")
        for key in TOOL_CALL_FIELDS:
            if m.get(key):
                raise fields.no_tool_calling(f"{name}.{key}")
        replayed = ("refusal", "audio") if role == "assistant" else ()  # (a user's refusal: no effect, as before)
        codec.check_keys(m, name, ("role", "content") + TOOL_CALL_FIELDS + replayed,
                         ("name", "annotations") if replayed else ("name", "refusal"))
        content, refusal = replayed_words(m, name) if replayed else (m.get("content"), None)
        if content is None:
            raise bad(f"'{name}.content' is required", "missing_field", f"{name}.content")
        conv = codec.convert_content(content, limits, f"{name}.content", None, role, budget, refusal=refusal)
        out.append({"role": role, "content": conv.parts})
    if not any(m["role"] == "user" for m in out):  # (the model answers a user; after the last, see continued_reply)
        raise bad("'messages' holds no user message", "invalid_value", "messages")
    return out, ("\n".join(system) if system else None)


def check_prompt_text(ctx: ServerContext, messages) -> None:
    """context_length_exceeded, before anything tokenises it, for text that cannot fit the context
    (engine.server.text.PromptBound)."""
    if ctx.prompt_bound is not None and isinstance(messages, list):
        chars = sum(text_chars(m.get("content")) for m in messages if isinstance(m, dict))
        ctx.prompt_bound.check(chars, "the messages", "messages")


def has_media(messages) -> bool:
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(not isinstance(p, dict) or p.get("type") not in ("text", "input_text") for p in m["content"])
               for m in messages)


# chat's `audio.format` (OpenAI's names) -> the speech endpoint's (audio_out.FORMATS); a stream's audio is pcm16
CHAT_AUDIO_FORMATS = {"pcm16": "pcm", "wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "opus", "aac": "aac"}


def check_unsupported(body: dict, engine, openai_only: bool = False) -> tuple[list[str], str | None, str, int]:
    """Refuses what this engine does not do; returns the output modalities, the voice, the audio format
    (CHAT_AUDIO_FORMATS' key) and the rate of pcm16 audio asked for: OpenAI's 24 kHz, or our extension
    `audio.sample_rate` (our clients ask for the talker's own, the model card's speech_sample_rate)."""
    check_no_tools(body)
    check_response_format(body.get("response_format"))
    check_accepted_fields(body)
    modalities = ["text"]
    if body.get("modalities") is not None:
        modalities = check_output_modalities(body["modalities"], "modalities", engine)
    voice, fmt, rate = None, "pcm16", OPENAI_PCM_RATE
    audio = body.get("audio")
    if audio is not None:
        if "audio" not in modalities:
            check_output_modalities(["audio"], "audio", engine)  # refused without a talker
            raise bad("'audio' is set but 'modalities' does not ask for audio", "invalid_value", "audio")
        audio = need_dict(audio, "audio")
        codec.check_keys(audio, "audio", ("voice", "format") + (() if openai_only else ("sample_rate",)))
        fmt = audio.get("format", "pcm16")
        if not isinstance(fmt, str) or fmt not in CHAT_AUDIO_FORMATS:
            raise bad(f"'audio.format' must be one of {', '.join(CHAT_AUDIO_FORMATS)}", "invalid_value", "audio.format")
        if fmt != "pcm16" and flag(body, "stream"):
            raise bad(f"a stream's audio is pcm16 (as OpenAI's): {fmt!r} comes only in a whole answer (stream false)",
                      "unsupported_parameter", "audio.format")
        voice = audio.get("voice")
        if voice is not None:
            voice = voice_name(voice, "audio.voice", engine)
        if audio.get("sample_rate") is not None:
            if fmt != "pcm16":
                raise bad(f"'audio.sample_rate' sets the rate of pcm16 audio; a {fmt} file states its own",
                          "invalid_value", "audio.sample_rate")
            rate = codec.check_output_rate(audio["sample_rate"], "audio.sample_rate", engine)
    return modalities, voice, fmt, rate


TOOL_FIELDS = ("tools", "functions")  # OpenAI's tool lists (functions: the deprecated one): only empty ones are taken


def check_no_tools(body: dict) -> None:
    """`tools` / `functions` (fields.check_tool_list): a `functions` list was refused as 'tools', `tools: false`
    passed."""
    for name in TOOL_FIELDS:
        fields.check_tool_list(body.get(name), name)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")  # OpenAI's chat response_format types
NO_STRUCTURED_OUTPUT = ("this engine has no constrained decoding, so it cannot promise JSON: use {\"type\": \"text\"} "
                        "and ask for JSON in the messages")


def check_response_format(fmt) -> None:
    """`response_format`: an object whose `type` is OpenAI's; text is what every reply is, json_object (JSON mode) and
    json_schema (structured outputs) are refused by name, as the reply could not be held to them."""
    if fmt is None:
        return
    fmt = need_dict(fmt, "response_format")
    kind = fmt.get("type")
    if kind is None:
        raise bad(f"'response_format.type' is required: one of {', '.join(RESPONSE_FORMATS)}", "missing_field",
                  "response_format.type")
    if kind not in RESPONSE_FORMATS:
        raise bad(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMATS)}, got {codec.shown(str(kind))}",
                  "invalid_value", "response_format.type")
    if kind != "text":
        raise bad(f"response_format {kind!r} is not supported: {NO_STRUCTURED_OUTPUT}", "unsupported_parameter",
                  "response_format")
    codec.check_keys(fmt, "response_format", ("type",))  # (a json_schema beside type text would be ignored)


ACCEPTED_TEXT_FIELDS = ("user", "safety_identifier", "prompt_cache_key")  # OpenAI's identifiers: no effect here
# OpenAI's prompt cache settings (no effect: every prompt is prefilled anew): the values its API takes
PROMPT_CACHE_RETENTIONS = ("in_memory", "24h")
PROMPT_CACHE_MODES = ("implicit", "explicit")
PROMPT_CACHE_TTLS = ("30m",)


def check_accepted_fields(body: dict) -> None:
    """The fields accepted with no effect (engine.server.fields.CHAT's `ignored`) hold what OpenAI takes, else a 400
    naming them: identifiers are strings, `metadata` OpenAI's Metadata, `parallel_tool_calls` a boolean, the prompt
    cache settings OpenAI's values."""
    for name in ACCEPTED_TEXT_FIELDS:
        if body.get(name) is not None:
            need_str(body[name], name)
    check_metadata(body.get("metadata"), "metadata")
    flag(body, "parallel_tool_calls")
    one_of(body.get("prompt_cache_retention"), "prompt_cache_retention", PROMPT_CACHE_RETENTIONS)
    options = body.get("prompt_cache_options")
    if options is not None:
        codec.check_keys(need_dict(options, "prompt_cache_options"), "prompt_cache_options", ("mode", "ttl"))
        one_of(options.get("mode"), "prompt_cache_options.mode", PROMPT_CACHE_MODES)
        one_of(options.get("ttl"), "prompt_cache_options.ttl", PROMPT_CACHE_TTLS)


def one_of(value, name: str, choices: tuple[str, ...]) -> None:
    """A field that takes one of `choices` (None: left out): another string is invalid_value, another type
    invalid_type."""
    if value is not None and value not in choices:
        raise bad(f"'{name}' must be one of {', '.join(map(repr, choices))}, got {codec.shown(value)}",
                  "invalid_value" if isinstance(value, str) else "invalid_type", name)


def logprob_fields(body: dict, modalities: list[str]) -> tuple[bool, int]:
    """`logprobs` (true: each token's log probability is reported) and `top_logprobs` (0..MAX_TOP_LOGPROBS
    alternatives per token), as OpenAI takes them: top_logprobs needs logprobs true. A reply with audio reports
    none (its text comes through the talker's segments): logprobs with audio output is refused."""
    asked = flag(body, "logprobs")
    top = 0
    if body.get("top_logprobs") is not None:
        top = int(need_number(body["top_logprobs"], "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True))
        if not asked:
            raise bad("'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
    if asked and "audio" in modalities:
        raise bad("'logprobs' are reported for a text reply only: ask for modalities [\"text\"], or leave logprobs "
                  "out", "unsupported_parameter", "logprobs")
    return asked, top


def thinking_asked(body: dict) -> bool:
    """Our `thinking` extension; OpenAI's reasoning_effort "none" (accepted: fields.NO_REASONING) asks for a reply
    without it, so the two together are refused rather than one of them ignored."""
    thinking = flag(body, "thinking")
    if thinking and body.get("reasoning_effort") == fields.NO_REASONING:
        raise bad(f"'reasoning_effort' {fields.NO_REASONING!r} asks for no thinking and 'thinking' is true: give one "
                  "of them", "invalid_value", "reasoning_effort")
    return thinking


MAX_HOTWORDS = 256  # the most hotwords one transcription or translation may give
MAX_CHOICES = 8  # the most choices (`n`) one chat request may ask for: they are generated one after another


def choice_count(body: dict, modalities: list[str]) -> int:
    """`n`, the choices asked for (null or absent: 1), at most MAX_CHOICES; a spoken reply comes one per request."""
    if body.get("n") is None:
        return 1
    n = int(need_number(body["n"], "n", 1, MAX_CHOICES, integer=True))
    if n > 1 and "audio" in modalities:
        raise bad(f"'n' is {n}, but a reply with audio comes one choice per request: ask for n 1, or text only",
                  "unsupported_parameter", "n")
    return n


def ends_choices(final: Done | Error) -> bool:
    """Whether a choice's end ends the whole response: an error, or a cancel (the client gone, the server
    stopping), after which no further choice starts."""
    return isinstance(final, Error) or final.finish_reason == "cancelled"


def job_metrics(job: Job, received_at: float, final: Done | Error | None) -> dict:
    """A job's figures: its time in line, the server's time to first token, the engine's figures."""
    ttft = None if job.first_token_at is None else job.first_token_at - received_at
    return wire.metrics(final.stats if isinstance(final, Done) else None, job.queue_wait_s, ttft)


def left_early(ctx: ServerContext, job: Job) -> None:
    """The client of an unfinished job went away: cancel it, count and log the abort."""
    if job.state != "finished":
        ctx.scheduler.cancel(job, abandon=True)
        logs.client_aborted(ctx, "left_mid_response", f"{job.label}: the client left before the answer was complete "
                                                      "(the request was cancelled)")


async def until_client_leaves(request: Request) -> None:
    """Returns when the client of a request whose body was read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def watch_disconnect(request: Request, ctx: ServerContext, job: Job) -> None:
    """Non-streaming requests: cancel the job when the client goes away."""
    await until_client_leaves(request)
    left_early(ctx, job)


async def decoded_while_client_waits(request: Request, label: str, decode: Callable[[threading.Event], T]) -> T:
    """`decode(stop)` (an upload's decode: minutes of a long compressed recording) off the event loop, `stop` set
    when the client goes away: the decode ends there (DecodeStopped) instead of running on for no one, and the
    request ends as one whose client left (ClientGone)."""
    stop = threading.Event()
    watcher = asyncio.create_task(until_client_leaves(request))
    watcher.add_done_callback(lambda task: task.cancelled() or stop.set())
    try:
        return await asyncio.to_thread(decode, stop)
    except DecodeStopped:
        raise ClientGone("left_mid_response", f"{label}: the client left while its upload was decoded (the decode "
                                              "was stopped)") from None
    finally:
        watcher.cancel()


async def collect(request: Request, ctx: ServerContext, job: Job) -> tuple[wire.Collected, Done | Error]:
    watcher = asyncio.create_task(watch_disconnect(request, ctx, job))
    got, final = wire.Collected(), None
    try:
        async for ev in job.events():
            if isinstance(ev, (Done, Error)):
                final = ev
            else:
                got.add(ev)
    finally:
        watcher.cancel()
        if job.state != "finished":
            ctx.scheduler.cancel(job, abandon=True)
    return got, final or Error("the response ended without a result", "engine_error")


async def with_keepalive(events: AsyncIterator[Event], interval_s: float) -> AsyncIterator[Event | None]:
    """The job's events, with None whenever `interval_s` passes without one (a keepalive is due)."""
    it = events.__aiter__()
    pending = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                ev = pending.result()
            except StopAsyncIteration:
                return
            yield ev
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        pending.cancel()


QUEUE_GRACE_S = 0.5  # a request behind others is answered (streamed) after this, not when it starts


async def first_events(job: Job, bounded: bool = False,
                       grace_s: float = QUEUE_GRACE_S) -> tuple[list[Event], AsyncIterator[Event]]:
    """The job's first events, read until it produces something (or has waited QUEUE_GRACE_S behind
    others, or ends), and all its events from the first: a request the engine refuses at once still
    gets its HTTP status, and one that waits long learns its place in line from the stream. `bounded`:
    wait `grace_s` at most while it runs, too (a chat's first token may take minutes of prefill: its
    stream starts, with keepalives, and a later error comes in the stream)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    it = job.events().__aiter__()
    head: list[Event] = []
    pending: asyncio.Future | None = None
    while not head or isinstance(head[-1], QueuePosition):
        waiting = bounded or (bool(head) and head[-1].position >= 1)
        if waiting and loop.time() >= deadline:
            break
        pending = pending or asyncio.ensure_future(it.__anext__())
        done, _ = await asyncio.wait({pending}, timeout=max(0.0, deadline - loop.time()) if waiting else None)
        if not done:
            break
        try:
            head.append(pending.result())
        except StopAsyncIteration:
            pending = None
            break
        pending = None

    async def rest() -> AsyncIterator[Event]:
        for ev in head:
            yield ev
        if pending is not None:
            try:
                yield await pending
            except StopAsyncIteration:
                return
        async for ev in it:
            yield ev

    return head, rest()


def refused_at_once(head: list[Event]) -> Error | None:
    """The Error a job ended with before producing anything (see first_events), else None."""
    return head[-1] if head and isinstance(head[-1], Error) else None


def stream_response(ctx: ServerContext, job: Job, encode, finish, events: AsyncIterator[Event] | None = None,
                    current: Callable[[], Job] | None = None) -> StreamingResponse:
    """An SSE response of a job (`events`: the job's events when partly read already): `encode(event)`
    and `finish(final)` give the lines. `current`: the job running now, where the response runs several one after
    another (`events` holds them all; a chat's `n` choices), which a client going away cancels."""
    now = current or (lambda: job)

    async def lines() -> AsyncIterator[bytes]:
        failed = False
        try:
            async for ev in with_keepalive(events or job.events(), ctx.limits.keepalive_s):
                if ev is None:
                    yield wire.SSE_KEEPALIVE
                elif isinstance(ev, (Done, Error)):
                    for line in finish(ev):
                        yield line
                else:
                    for line in encode(ev):
                        yield line
        except Exception as e:  # a fault (a bug): the stream still ends as a failed one does, error then [DONE]
            failed = True
            log.exception("%s: the stream failed", job.label)
            ctx.scheduler.cancel(now(), abandon=True)
            for line in finish(Error(f"internal error while streaming the answer: {type(e).__name__}",
                                     "server_error")):
                yield line
        finally:  # the client went away (or the stream ended): stop generating
            if not failed:
                left_early(ctx, now())

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


def stream_usage(body: dict, stream: bool) -> bool:
    """stream_options.include_usage (OpenAI: a last chunk with the usage): an object's boolean, else a 400 naming
    the field (a string "false" read as true would be silently wrong). Other keys of the object are left alone
    (OpenAI adds some, e.g. include_obfuscation, that change nothing here). As OpenAI's, `stream_options` is refused
    in a request that does not stream (it would be silently ignored)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad(f"'stream_options' must be an object, got {type(opts).__name__}", "invalid_type", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true: leave it out, or stream the answer",
                  "invalid_value", "stream_options")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise bad(f"'stream_options.include_usage' must be true or false, got {type(usage).__name__}", "invalid_type",
                  "stream_options.include_usage")
    return bool(usage)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    received = time.perf_counter()
    ctx, body = await json_request(request, fields.CHAT, "chat", fields.CHAT_EXTENSIONS)
    check_prompt_text(ctx, body.get("messages"))
    modalities, voice, audio_format, pcm_rate = check_unsupported(body, ctx.engine, ctx.openai_only)
    n = choice_count(body, modalities)
    logprobs, top_logprobs = logprob_fields(body, modalities)
    stream = flag(body, "stream")
    include_usage = stream_usage(body, stream)
    params = replace(generation_params(body, ctx.limits), logprobs=logprobs, top_logprobs=top_logprobs,
                     logit_bias=logit_bias(body.get("logit_bias"), vocab_size(ctx.engine)))
    thinking = thinking_asked(body)
    raw_messages = body.get("messages")
    if has_media(raw_messages):  # decoding images/audio takes a while: off the event loop
        messages, system = await asyncio.to_thread(convert_messages, raw_messages, ctx.limits)
    else:
        messages, system = convert_messages(raw_messages, ctx.limits)
    if ctx.prompt_bound is not None:  # text that cannot fit is refused now, counted off the event loop
        texts = ([system] if system else []) + [t for m in messages for t in texts_of(m["content"])]
        await ctx.prompt_bound.check_tokens(texts, params.room_needed, "the messages", "messages")
    prompt, reply_start = continued_reply(messages)  # trailing assistant messages: the reply continues them
    engine = ctx.engine
    output = output_kwargs(modalities, voice)

    # pcm16 comes at the rate asked for (OpenAI's 24 kHz unless `audio.sample_rate` names another); a file states its
    # rate, the talker's own (OpenAI's 24 kHz with --openai-only)
    out_rate = pcm_rate if audio_format == "pcm16" else (OPENAI_PCM_RATE if ctx.openai_only else None)
    native_rate = talker_rate(engine)

    media_bytes = sum(media_nbytes(m["content"]) for m in messages if isinstance(m["content"], list))
    jobs: list[Job] = []  # one per choice, each started when the one before has ended

    def submit_choice() -> Job:
        """The next choice's job, in line: its own draw (the seed + its index when a seed is given)."""
        i = len(jobs)
        choice_params = params if params.seed is None else replace(params, seed=params.seed + i)

        def run(cancel):
            events = engine.chat(prompt, choice_params, cancel, system_prompt=system, thinking=thinking,
                                 assistant_prefix=reply_start, **output)
            if "audio" not in modalities or out_rate is None or out_rate == native_rate:
                return events
            return resampled(events, out_rate)

        job = Job(run, label="chat.completions")
        job.media_bytes = media_bytes
        ctx.scheduler.submit(job, continuing=bool(jobs))  # (the request was let in with its first choice)
        jobs.append(job)
        return job

    job = submit_choice()
    cid, created = "chatcmpl-" + new_id("c")[2:], int(time.time())
    ext = not ctx.openai_only
    if not stream:
        answers: list[wire.Answer] = []
        while True:
            got, final = await collect(request, ctx, job)
            if isinstance(final, Error):
                return error_response(wire.engine_error(final))
            answers.append(wire.Answer(got, final, job_metrics(job, received, final)))
            if len(answers) == n or ends_choices(final):
                break
            job = submit_choice()
        audio, spoken = None, answers[0].got.audio  # (a reply with audio has one choice: choice_count)
        if spoken and audio_format != "pcm16":  # a file: encoding takes a while, off the event loop
            audio = await asyncio.to_thread(encode_audio, b"".join(c.pcm for c in spoken), spoken[0].sample_rate,
                                            CHAT_AUDIO_FORMATS[audio_format])
        return JSONResponse(wire.chat_completion(cid, created, ctx.model_id, answers, extensions=ext, audio_file=audio,
                                                 logprobs=logprobs))
    # (never silent past keepalive_s, the most a streaming client is promised to wait for a first byte)
    head, events = await first_events(job, bounded=True, grace_s=min(QUEUE_GRACE_S, ctx.limits.keepalive_s))
    refused = refused_at_once(head)  # refused before any output (context, modality ...): its HTTP status, as without
    if refused is not None:          # stream, not a 200 whose stream holds the error
        return error_response(wire.engine_error(refused))
    enc = wire.ChatChunkEncoder(cid, created, ctx.model_id, extensions=ext)

    async def every_choice() -> AsyncIterator[Event]:
        """The choices' events one after another; the next choice starts when the one before has ended well."""
        choice_events = events
        while True:
            final = None
            async for ev in choice_events:
                final = ev if isinstance(ev, (Done, Error)) else final
                yield ev
            if final is None or ends_choices(final) or len(jobs) == n:
                return
            enc.next_choice()
            try:
                choice_events = submit_choice().events()
            except ApiError as e:  # the line is full, the server is stopping: the stream ends with that error
                yield Error(e.message, e.code)
                return

    def finish(final: Done | Error) -> list[bytes]:
        last = ends_choices(final) or len(enc.finished) + 1 == n
        return enc.finish(final, job_metrics(jobs[-1], received, final), include_usage, last)

    return stream_response(ctx, job, enc.encode, finish, every_choice(), current=lambda: jobs[-1])


# --------------------------------------------------------------------------- transcriptions




TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
WHOLE_TRANSCRIPTION_FORMATS = ("srt", "vtt", "verbose_json")  # not streamed: cues and duration need the whole clip
TRANSCRIPTION_INCLUDES = ("logprobs",)  # what `include[]` may ask for (OpenAI's TranscriptionInclude)


def transcription_logprobs(form, fmt: str) -> bool:
    """Whether `include[]` asks for the transcript tokens' log probabilities ("logprobs", its one value); as OpenAI's,
    they come in a json answer (a streamed one's events too) only, so another response_format is refused."""
    asked = form.getlist("include") + form.getlist("include[]")
    for value in asked:
        if value not in TRANSCRIPTION_INCLUDES:
            raise bad(f"'include' takes {', '.join(TRANSCRIPTION_INCLUDES)} only, got {codec.shown(str(value))}",
                      "invalid_value", "include")
    if asked and fmt != "json":
        raise bad(f"'include' logprobs come with response_format json only, not {fmt!r}", "unsupported_parameter",
                  "include")
    return bool(asked)


def form_hotwords(form, keys: tuple[str, ...]) -> list[str]:
    """The hotwords of a transcription or translation form, given under `keys` (each comma-separated, in any
    script's comma), at most MAX_HOTWORDS."""
    hotwords: list[str] = []
    for key in keys:
        for value in form.getlist(key):
            if not isinstance(value, str):
                raise bad(f"'{key.removesuffix('[]')}' must be text", "invalid_type", key.removesuffix("[]"))
            hotwords += [w.strip() for w in value.replace("，", ",").split(",") if w.strip()]
    if len(hotwords) > MAX_HOTWORDS:
        raise bad(f"at most {MAX_HOTWORDS} hotwords", "invalid_value", "hotwords")
    return hotwords


@dataclass(frozen=True)
class SpeechTextAsk:
    """What a transcription or translation request asks for, read from its form: the upload, the prompt text
    (context), the task ("transcribe" or "translate"), and how the answer comes."""

    raw: bytes
    context: str | None
    fmt: str
    params: GenerationParams
    task: str = "transcribe"
    hotwords: tuple[str, ...] = ()
    tag: str | None = None  # a forced language / dialect (transcriptions only)
    stream: bool = False
    logprobs: bool = False

    @property
    def label(self) -> str:
        return "audio.translations" if self.task == "translate" else "audio.transcriptions"


def speech_text_format(form) -> str:
    fmt = form_text(form, "response_format", 32) or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise bad(f"response_format {fmt!r} is not supported ({', '.join(TRANSCRIPTION_FORMATS)})",
                  "unsupported_parameter", "response_format")
    return fmt


def speech_text_params(form, limits, fmt: str, logprobs: bool) -> GenerationParams:
    """The sampling of a transcription or translation: its `temperature` (and `max_tokens`, where taken), greedy
    and TRANSCRIPTION_MAX_TOKENS by default; token log probabilities when asked for or verbose_json's segments need
    them (avg_logprob)."""
    numbers = {"temperature": form_number(form, "temperature"), "max_tokens": form_number(form, "max_tokens")}
    base = GenerationParams(max_new_tokens=min(TRANSCRIPTION_MAX_TOKENS, limits.max_new_tokens), fit_context=True)
    params = generation_params({k: v for k, v in numbers.items() if v is not None}, limits, base=base)
    return replace(params, logprobs=logprobs or fmt == "verbose_json")


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    received = time.perf_counter()
    ctx = ctx_of(request)
    limits = ctx.limits
    form = await read_form(request, limits, max_files=1)
    try:
        raw = await form_file(form, "file", "the audio file upload")
        fields.TRANSCRIPTION.check({key: form.getlist(key) if key.endswith("[]") else form.get(key)
                                    for key in form.keys()})
        ctx.check_model(form_text(form, "model"), "transcription")
        refuse_extensions(ctx, {k: form.get(k) for k in fields.TRANSCRIPTION_EXTENSIONS},
                          fields.TRANSCRIPTION_EXTENSIONS)
        context = form_text(form, "prompt")
        hotwords = form_hotwords(form, fields.HOTWORDS + fields.TRANSCRIPTION_KEYWORDS)
        language, dialect = form_text(form, "language", 64), form_text(form, "dialect", 64)
        language = transcription_tag(language, "language")
        dialect = transcription_tag(dialect, "dialect")
        if language and dialect and language != dialect:
            raise bad("'language' and 'dialect' disagree; give one", "invalid_value", "dialect")
        fmt = speech_text_format(form)
        granularity = next((k for k in ("timestamp_granularities", "timestamp_granularities[]") if k in form), None)
        if granularity and fmt != "verbose_json":  # (as OpenAI's: the segments are verbose_json's)
            raise bad(f"'{granularity}' segment timestamps come as response_format verbose_json's segments, not in "
                      f"{fmt!r}", "invalid_value", granularity)
        stream = form_flag(form, "stream")
        if stream and fmt in WHOLE_TRANSCRIPTION_FORMATS:
            raise bad(f"response_format {fmt!r} comes as a whole answer; a stream carries transcript.text events "
                      "(response_format json or text, or leave stream out)", "unsupported_parameter", "response_format")
        logprobs = transcription_logprobs(form, fmt)
        ask = SpeechTextAsk(raw, context, fmt, speech_text_params(form, limits, fmt, logprobs), "transcribe",
                            tuple(hotwords), dialect or language, stream, logprobs)
    finally:
        await form.close()
    return await answer_speech_text(request, ctx, received, ask)


@router.post("/v1/audio/translations")
async def translations(request: Request):
    """OpenAI's translations: speech in any language, English text out (fields.TRANSLATION: file, model, prompt,
    response_format, temperature; ours max_tokens and hotwords; never streamed). The same path as a transcription
    (the prompt and hotwords go with the instruction as a transcription's do), the model told to translate."""
    received = time.perf_counter()
    ctx = ctx_of(request)
    form = await read_form(request, ctx.limits, max_files=1)
    try:
        raw = await form_file(form, "file", "the audio file upload")
        fields.TRANSLATION.check({key: form.getlist(key) if key.endswith("[]") else form.get(key)
                                  for key in form.keys()})
        ctx.check_model(form_text(form, "model"), "transcription")
        refuse_extensions(ctx, {k: form.get(k) for k in fields.HOTWORDS}, fields.HOTWORDS)
        fmt = speech_text_format(form)
        ask = SpeechTextAsk(raw, form_text(form, "prompt"), fmt, speech_text_params(form, ctx.limits, fmt, False),
                            "translate", tuple(form_hotwords(form, fields.HOTWORDS)))
    finally:
        await form.close()
    return await answer_speech_text(request, ctx, received, ask)


async def answer_speech_text(request: Request, ctx: ServerContext, received: float, ask: SpeechTextAsk):
    """A transcription's or translation's upload decoded, run through the scheduler and answered in its format."""
    limits, context, hotwords, params, fmt = ctx.limits, ask.context, list(ask.hotwords), ask.params, ask.fmt
    if ctx.prompt_bound is not None and (context or hotwords):  # text that cannot fit: refused before it queues
        texts, param = [context or "", *hotwords], "prompt" if context else "hotwords"
        ctx.prompt_bound.check(sum(map(len, texts)), f"the {param}", param)
        await ctx.prompt_bound.check_tokens(texts, params.room_needed, f"the {param}", param)
    audio = await decoded_while_client_waits(  # (a recording's audio track too)
        request, ask.label,
        lambda stop: codec.recording_file(ask.raw, limits, "file", stop=stop))
    engine = ctx.engine

    def run(cancel):
        return engine.transcribe(audio.samples, context=context, hotwords=hotwords or None, dialect=ask.tag,
                                 params=params, cancel=cancel, sample_rate=audio.sample_rate, task=ask.task)

    job = Job(run, label=ask.label)
    job.media_bytes = audio.samples.nbytes  # (a 30-minute recording at 48 kHz: 0.3 GB, held until it is transcribed)
    ctx.scheduler.submit(job)
    duration = audio.seconds if fmt == "verbose_json" else None
    ext = not ctx.openai_only

    def figures(final):
        return job_metrics(job, received, final) if ext else None

    if not ask.stream:
        got, final = await collect(request, ctx, job)
        if isinstance(final, Error):
            return error_response(wire.engine_error(final))
        if fmt in ("text", "srt", "vtt"):
            result = final.result or {}
            text = result.get("text", "")
            return PlainTextResponse(text if fmt == "text" else wire.subtitles(text, audio.seconds, fmt,
                                                                               result.get("segments")))
        verbose = wire.VerboseFigures(params.temperature, tuple(e.logprob for e in got.logprobs or ()))
        return JSONResponse(wire.transcription_body(final, figures(final), duration,
                                                    got.logprobs if ask.logprobs else None, verbose, ask.task))
    head, events = await first_events(job, bounded=True, grace_s=min(QUEUE_GRACE_S, ctx.limits.keepalive_s))
    refused = refused_at_once(head)  # (as a chat stream: a refusal before any output keeps its status)
    if refused is not None:
        return error_response(wire.engine_error(refused))
    enc = wire.TranscriptionSseEncoder(ext, ask.logprobs)
    return stream_response(ctx, job, enc.encode, lambda final: enc.finish(final, figures(final)), events)


# --------------------------------------------------------------------------- models, health


def model_card(ctx: ServerContext) -> dict:
    """The OpenAI model object, extended with what a client needs to know about the model (OpenAI's
    fields only with --openai-only)."""
    if ctx.openai_only:
        return {"id": ctx.model_id, "object": "model", "created": int(ctx.started_at), "owned_by": "ming-omni-studio"}
    info = ctx.engine.info()
    caps = capabilities(ctx.engine) | {"realtime"}  # the /v1/realtime route (absent with --openai-only)
    outputs = ["text"] + (["audio"] if "speech_out" in caps else []) + (["image"] if "image_out" in caps else [])
    return {"id": ctx.model_id, "object": "model", "created": int(ctx.started_at), "owned_by": "ming-omni-studio",
            "name": info.name, "is_demo": info.is_demo, "release": info.release, "parameters": info.parameters,
            "dtype": info.dtype, "device": info.device, "placement": info.placement,
            "capabilities": sorted(caps), "default_instructions": DEFAULT_SYSTEM_PROMPT,
            "input_modalities": ["text"] + [m for m, c in (("image", "image_in"), ("video", "video_in"),
                                                           ("audio", "audio_in")) if c in caps],
            "output_modalities": outputs, "limits": client_limits(ctx), "unavailable": unavailable(ctx.engine, caps),
            **({"speech_sample_rate": int(talker_rate(ctx.engine))}
               if "speech_out" in caps and talker_rate(ctx.engine) else {}),
            **({"image_defaults": image_defaults(ctx.engine)} if "image_out" in caps else {})}


def talker_rate(engine) -> int | None:
    """The talker's own sample rate (None: no talker, or an engine that does not say)."""
    return getattr(getattr(engine, "talker", None), "sample_rate", None)


def image_defaults(engine) -> dict[str, float]:
    """The steps and guidance an image request naming none runs with (they differ by release)."""
    from engine.imagine import request_defaults  # noqa: PLC0415  (imported when asked, as images_api does)

    return request_defaults(getattr(getattr(engine, "image_generator", None), "kind", None))


def unavailable(engine, caps: set[str]) -> dict[str, str]:
    """Why the model gives no speech or images, when the engine knows (a checkpoint without talker/, a broken or
    partly downloaded image generator, one left out because it does not fit): what a client shows its user."""
    reasons = {"speech_out": getattr(engine, "talker_error", None),
               "image_out": getattr(engine, "image_generator_error", None)}
    return {cap: str(why) for cap, why in reasons.items() if cap not in caps and why}


def client_limits(ctx: ServerContext) -> dict:
    """The limits a client sizes its requests by (docs/protocol.md, "GET /v1/models"): the most new tokens
    a request may ask for and the count when it names none, the model's context in tokens (when the
    checkpoint says), the largest body, upload, clip and image the server takes, how many realtime sessions it
    holds at once (a studio sizes its worker threads by it) and how long one may send nothing before it is closed."""
    lim = ctx.limits
    out = {"max_new_tokens": lim.max_new_tokens, "default_max_tokens": lim.default_max_tokens}
    if ctx.prompt_bound is not None:
        out["context_tokens"] = ctx.prompt_bound.context_tokens
    return out | {"max_request_bytes": lim.max_request_bytes, "max_upload_bytes": lim.max_upload_bytes,
                  "max_audio_seconds": audio_seconds_limit(ctx),
                  "max_transcription_seconds": lim.max_transcription_seconds, "max_image_pixels": lim.max_image_pixels,
                  "max_sessions": lim.max_sessions, "realtime_idle_s": lim.realtime_idle_s}


def audio_seconds_limit(ctx: ServerContext) -> float:
    """The longest clip a request may hold: the server's limit, or the model's audio encoder's when that is
    shorter (its positional table; a client sizing uploads by the card is then not refused later by the model)."""
    settings = getattr(getattr(ctx.engine, "processor", None), "settings", None)
    if settings is None or "audio_in" not in capabilities(ctx.engine):
        return ctx.limits.max_audio_seconds
    return min(ctx.limits.max_audio_seconds, settings.audio.max_duration_s)


def capabilities(engine) -> set[str]:
    """What the loaded model takes and gives: text, image_in, video_in, audio_in, transcription,
    speech_out, image_out."""
    parts = set(engine.info().components)
    caps = {"text"}
    if "vision" in parts:
        caps |= {"image_in", "video_in"}
    if "audio" in parts:
        caps |= {"audio_in", "transcription"}
    if getattr(engine, "has_talker", False):
        caps.add("speech_out")
    if getattr(engine, "has_image_generator", False):
        caps.add("image_out")
    return caps


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(ctx_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    ctx = ctx_of(request)
    ctx.check_model(model_id)
    return model_card(ctx)


@router.get("/health")
async def health(request: Request):
    ctx = ctx_of(request)
    s = ctx.scheduler
    return {"status": "ok", "model": ctx.model_id, "is_demo": ctx.engine.is_demo,
            "queue": {"running": s.running, "waiting": s.waiting, **s.counts},
            "sessions": len(ctx.sessions), "uptime_s": round(time.time() - ctx.started_at, 3),
            "auth": ctx.token is not None, "client_aborts": dict(ctx.client_aborts)}

