"""The realtime protocol at /v1/realtime: JSON events over a websocket with the OpenAI Realtime API's
GA names and shapes, plus our documented extensions (docs/protocol.md is the reference; the mapping
of engine events to server events is engine.server.protocol's).

One connection is one session. A reader loop handles client events in order; a response runs as
its own task so the reader keeps serving (response.cancel, audio appends) while it streams; one
writer task owns the socket, fed by a bounded queue (a slow reader therefore slows its own
response, never the server). Every bad client event is answered with an `error` event naming the
client's event_id, and the session carries on.

Hands-free sessions (`audio.input.turn_detection` = server_vad): each audio append goes through the
session's turn detector (engine.server.turns) off the event loop. Speech starting sends
`input_audio_buffer.speech_started` and, while a response runs, cancels it (barge-in: the engine
stops within one decode step or audio patch, and the output still waiting in the socket's queue is
dropped, so no stale delta follows); speech stopping sends `speech_stopped`, commits the turn
(the rolling webcam video, then the audio) and starts a response. `conversation.item.truncate`
cuts an assistant reply to what the user heard.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine.errors import MingError, SettingError
from engine.events import AudioChunk, Done, Error, TextDelta, UnknownEventError
from engine.media.audio import StreamingResampler
from engine.media.errors import MediaError
from engine.server import codec, logs
from engine.server import protocol as wire
from engine.server.audio_out import OPENAI_PCM_RATE  # OpenAI's 'pcm16' / audio/pcm ("rate": always 24000 there)
from engine.server.auth import check_token, chosen_subprotocol
from engine.server.codec import bad, need_dict, need_number, need_str
from engine.server.context import ServerContext
from engine.server.fields import (REALTIME_ITEM, REALTIME_RESPONSE, check_event_fields, check_tool_list,
                                  no_tool_calling)
from engine.server.http_api import retry_headers
from engine.server.params import (TRANSCRIPTION_MAX_TOKENS, check_metadata, check_output_modalities, flag,
                                  generation_params, logit_bias, output_kwargs, transcription_tag, vocab_size,
                                  voice_name)
from engine.sampling import GenerationParams
from engine.server.protocol import ApiError
from engine.server.scheduler import Job
from engine.server.sessions import ROOT, AudioSpan, Item, Session, audio_format, continued_reply, new_id
from engine.server.text import (check_json_values, check_text, check_url_text, invalid_text_path, json_error,
                                json_may_hold_surrogates, loads_json, text_chars, texts_of)
from engine.server.turn_transcripts import TurnPieces, TurnTranscript, piece_end
from engine.server.turns import VAD_RATE, ServerVad, SpeechStarted, SpeechStopped, TurnDetector
from engine.server.video_context import VideoContextConfig, compact_clip
from engine.server.ws_protocol import CLOSE_REASON_NOT_UTF8

log = logging.getLogger("engine.server.realtime")

MIN_COMMIT_SECONDS = 0.1
MAX_EVENT_ID_CHARS = 512  # a client's event_id, echoed in the error events it causes
# OpenAI session fields that have no effect here and are accepted silently
IGNORED_SESSION_FIELDS = {"tracing", "truncation", "prompt", "tool_choice",
                          "input_audio_noise_reduction", "speed", "object", "id"}
# session fields whose null means nothing of its own: left as they are, as when the field is left out (null for most
# others has a meaning: instructions the model's own, turn_detection push-to-talk, transcription off ...)
NULL_IS_LEFT_OUT = ("output_modalities", "modalities", "audio", "input_audio_format", "input_audio_sample_rate")
CANCELLED_RESPONSE_WAIT_S = 5.0  # a response.create right after response.cancel waits this long for the cancelled
#                                  response to end (its engine stops within a step) before it is refused
MAX_PENDING_TRANSCRIPTIONS = 8  # per session: turns committed faster than the engine transcribes them
TRANSCRIPTION_LOGPROBS = "item.input_audio_transcription.logprobs"  # session.include's one value (OpenAI's)


# the output events of a response that a cancel or barge-in drops while they wait in the queue
OUTPUT_DELTAS = ("response.output_text.delta", "response.output_audio_transcript.delta",
                 "response.output_audio.delta")


class Response:
    def __init__(self, session: Session, job: Job, client_event_id: str | None, modalities: list[str],
                 in_conversation: bool = True, metadata: dict | None = None):
        self.id = new_id("resp")
        self.session = session
        self.job = job
        self.client_event_id = client_event_id
        self.received_at = time.perf_counter()
        self.task: asyncio.Task | None = None
        prev = session.items[-1].id if session.items else None
        self.encoder = wire.RealtimeResponseEncoder(self.id, new_id("item"), session.id if in_conversation else None,
                                                    modalities, prev, metadata)
        self.silenced = False  # cancelled: the rest of its output is never sent
        self.cancel_reason = "client_cancelled"  # or "turn_detected" (barge-in)
        self.audio: list[AudioSpan] = []  # the audio chunks encoded for the client, in order
        self.truncate_ms: int | None = None  # conversation.item.truncate while it ran
        self.resamplers: dict[int, StreamingResampler] = {}  # talker rate -> output_rate, across chunks
        self.set_output_format(session.settings.output_encoding, session.settings.output_rate)

    def set_output_format(self, encoding: str, rate: int) -> None:
        """The reply's audio as it is sent (the session's format, or this response's): PCM16 at `rate`, or
        G.711 ('pcmu' / 'pcma', 8 kHz)."""
        self.output_rate = rate
        self.encoder.audio_bytes = None if encoding == "pcm16" else functools.partial(codec.g711_bytes,
                                                                                      encoding=encoding)

    @property
    def joins(self) -> bool:
        """Its reply was announced (conversation.item.added) and joins the conversation when it ends."""
        return self.encoder.item_open and self.encoder.in_conversation

    def audio_out(self, ev: AudioChunk) -> AudioChunk:
        """An audio chunk at the output rate (resampled as a stream: no seams between chunks)."""
        if ev.sample_rate == self.output_rate:
            return ev
        resampler = self.resamplers.get(ev.sample_rate)
        if resampler is None:
            resampler = self.resamplers[ev.sample_rate] = StreamingResampler(ev.sample_rate, self.output_rate)
        return AudioChunk.from_samples(resampler.feed(ev.samples()), self.output_rate, ev.text, ev.start_s)

    def audio_tail(self) -> AudioChunk | None:
        """The resampler's last output (its filter's tail), which the reply's audio ends with."""
        tail = np.concatenate([np.zeros(0, np.float32), *(r.flush() for r in self.resamplers.values())])
        self.resamplers.clear()
        if not tail.size:
            return None
        end_s = self.audio[-1].start_s + self.audio[-1].seconds if self.audio else 0.0
        return AudioChunk.from_samples(tail, self.output_rate, "", end_s)


class RealtimeConnection:
    def __init__(self, ws: WebSocket, ctx: ServerContext, session: Session):
        self.ws = ws
        self.ctx = ctx
        self.limits = ctx.limits
        self.session = session
        self.out: asyncio.Queue = asyncio.Queue(maxsize=ctx.limits.outgoing_buffer)
        self.closed = False
        self.turn_item_id: str | None = None  # the id the user's turn in progress will get (server_vad)
        self.response_wanted = False  # a turn ended while a response ran: start one when it ends
        self.transcriptions: dict[Job, asyncio.Task] = {}  # input audio transcriptions under way
        self.spoken_turn: TurnTranscript | None = None  # the turn being spoken, transcribed a piece at a time
        self.turn_pieces = TurnPieces()
        self.audio_clock_ms = 0.0  # audio written during the session while no turn detector counted it
        self.idle_from_ms: int | None = None  # server_vad idle_timeout_ms counts from here (the last reply's end)
        self.last_activity = time.monotonic()  # the client's last event, or a response's end (Limits.realtime_idle_s)
        self.handlers = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_audio_append,
            "input_audio_buffer.commit": self.on_audio_commit,
            "input_audio_buffer.clear": self.on_audio_clear,
            "input_video_buffer.append": self.on_video_append,
            "input_video_buffer.commit": self.on_video_commit,
            "input_video_buffer.clear": self.on_video_clear,
            "conversation.item.create": self.on_item_create,
            "conversation.item.delete": self.on_item_delete,
            "conversation.item.truncate": self.on_item_truncate,
            "conversation.item.retrieve": self.on_item_retrieve,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }

    # ------------------------------------------------------------------ plumbing
    async def send(self, event: dict) -> None:
        if self.closed:
            return
        event = {"event_id": new_id("event"), **event}
        await self.out.put(event)

    async def send_error(self, err: ApiError, client_event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {**err.to_openai(), "event_id": client_event_id}})

    async def writer(self) -> None:
        try:
            while True:
                event = await self.out.get()
                await self.ws.send_text(json.dumps(event, ensure_ascii=True, separators=(",", ":")))
        except Exception:  # the socket is gone: send nothing more, but keep draining so no task waits on a
            self.closed = True  # full queue (the reader then sees the disconnect and ends the session)
            while True:
                await self.out.get()

    async def run(self) -> None:
        writer = asyncio.create_task(self.writer())
        ends_at = time.monotonic() + self.limits.max_session_s
        try:
            await self.send({"type": "session.created",
                             "session": self.session.settings.to_dict(self.session.id, self.ctx.model_id)})
            while True:
                wait_s = min(ends_at, self.last_activity + self.limits.realtime_idle_s) - time.monotonic()
                try:
                    msg = await asyncio.wait_for(self.ws.receive(), max(0.0, wait_s))
                except asyncio.TimeoutError:
                    if time.monotonic() >= ends_at:
                        await self._close_with(writer, self._expired())
                        break
                    if self.session.active is None:
                        await self._close_with(writer, self._idle())
                        break
                    self.last_activity = time.monotonic()  # (a response running: the session is not idle)
                    continue
                self.last_activity = time.monotonic()
                if msg["type"] == "websocket.disconnect":
                    self._disconnected(msg)
                    break
                if self.closed:  # the socket cannot be written any more (the writer met it closed): what the client
                    break        # sent before it left is not run (a flood of response.create held the slot for seconds)
                text = msg.get("text")
                if text is None:
                    await self.send_error(bad("binary frames are not part of this protocol; send JSON text events "
                                              "(media as base64 fields)", "invalid_event"))
                    continue
                await self.handle(text)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.closed = True
            self.response_wanted = False
            if self.session.active is not None:
                self.ctx.scheduler.cancel(self.session.active.job, abandon=True)
                if self.session.active.task is not None:
                    self.session.active.task.cancel()
            for job, task in list(self.transcriptions.items()):
                self.ctx.scheduler.cancel(job, abandon=True)
                task.cancel()
            writer.cancel()
            self.ctx.sessions.close(self.session)

    def _expired(self) -> ApiError:
        """The session reached its longest life (a client answering pings could otherwise hold one of the
        server's session slots for ever): OpenAI's session_expired error."""
        minutes = self.limits.max_session_s / 60
        return ApiError(f"Your session hit the maximum duration of {minutes:g} minutes.", code="session_expired")

    def _idle(self) -> ApiError:
        """The client sent nothing (no event, no audio) for Limits.realtime_idle_s while no response ran: 64 such
        sessions held every slot of the server for up to an hour (the Live tab relays every session from one
        address, so no per-address cap can tell them apart)."""
        return ApiError(f"Your session was closed after {self.limits.realtime_idle_s:g} seconds in which the client "
                        "sent nothing (no event, no audio) and no response ran; open a new session to go on.",
                        code="session_idle_timeout")

    async def _close_with(self, writer: asyncio.Task, err: ApiError) -> None:
        """The server ends the session: the error, sent before the socket closes (1000)."""
        await self.send_error(err)
        for _ in range(100):  # let the writer send what is queued (the error last), at most a second
            if self.out.empty() or writer.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        try:
            await self.ws.close(code=1000)
        except RuntimeError:  # already closed
            pass

    def _disconnected(self, msg: dict) -> None:
        """The client closed the socket, or the websocket layer did for a frame it refused (`refused_frame`: 1007 for
        one that is not UTF-8, 1002 for one that breaks RFC 6455, 1009 for a message past the largest read)."""
        code, reason = msg.get("code"), msg.get("reason") or ""
        if msg.get("refused_frame") and code == 1007:
            frame = "a close frame whose reason is" if reason == CLOSE_REASON_NOT_UTF8 else "a text frame that is"
            logs.client_aborted(self.ctx, "invalid_utf8_frame", f"session {self.session.id}: {frame} not UTF-8 (the "
                                                                "connection was closed with 1007)")
        elif msg.get("refused_frame"):
            logs.client_aborted(self.ctx, "invalid_frame", f"session {self.session.id}: a websocket frame refused: "
                                                           f"{reason[:120]} (the connection was closed with {code})")
        elif self.session.active is not None and not self.session.active.silenced:
            logs.client_aborted(self.ctx, "left_mid_response", f"session {self.session.id}: the client left while "
                                                               "a response ran (it was cancelled)")

    async def handle(self, text: str) -> None:
        event_id = None
        try:
            if len(text) > self.limits.max_message_bytes or (
                    len(text) * 4 > self.limits.max_message_bytes
                    and len(text.encode("utf-8", "surrogatepass")) > self.limits.max_message_bytes):
                raise ApiError(f"message too large: {len(text)} characters, the limit is "
                               f"{self.limits.max_message_bytes} bytes per event (send media in smaller pieces)",
                               code="message_too_large", status=413)
            check_json_values(text, self.limits.max_json_values, "the message")
            try:
                event = loads_json(text)
            except (ValueError, RecursionError) as e:
                raise bad(f"the message is not valid JSON: {json_error(e)}", "invalid_json") from None
            if not isinstance(event, dict):
                raise bad(f"an event must be a JSON object, got {type(event).__name__}", "invalid_event")
            event_id = event.get("event_id")
            if event_id is not None and not isinstance(event_id, str):
                event_id = None
                raise bad("'event_id' must be a string", "invalid_type", "event_id")
            if event_id is not None and len(event_id) > MAX_EVENT_ID_CHARS:  # every error echoes it: a 3 MB id
                event_id = None                                               # would be sent back whole
                raise bad(f"'event_id' is too long: at most {MAX_EVENT_ID_CHARS} characters", "invalid_value",
                          "event_id")
            if event_id is not None and invalid_text_path(event_id) is not None:
                event_id = None  # (it cannot be echoed)
            if json_may_hold_surrogates(text):  # (a frame is UTF-8: only a \\uD8xx escape can make one)
                check_text(event)  # refused whole: nothing of an event with invalid text is applied
            kind = event.get("type")
            if not isinstance(kind, str):
                raise bad("the event has no string 'type'", "invalid_event", "type")
            handler = self.handlers.get(kind)
            if handler is None:
                raise bad(f"unknown event type {kind[:80]!r}; known: {', '.join(sorted(self.handlers))}",
                          "unknown_event", "type")
            check_event_fields(event)
            await handler(event, event_id)
        except ApiError as e:
            await self.send_error(e, event_id)
        except MediaError as e:
            await self.send_error(bad(str(e), "invalid_media"), event_id)
        except (asyncio.CancelledError, WebSocketDisconnect):
            raise
        except Exception as e:  # a bug must not end the session: report it and keep serving
            log.exception("realtime event failed")
            await self.send_error(ApiError(f"internal error handling this event: {type(e).__name__}",
                                           code="server_error", status=500), event_id)

    def _check_text_budget(self, adding: int, instructions: str | None = None, param: str | None = None) -> None:
        """The per-session text budget (like its media limit): the conversation's text, `adding` more
        characters and the instructions must fit the model's context (ServerContext.prompt_bound):
        context_length_exceeded when the new text alone cannot, session_text_limit when the session's
        text with it cannot (delete items to make room). `param`: the field that brought the new text."""
        bound = self.ctx.prompt_bound
        if bound is None or bound.max_chars is None:
            return
        bound.check(adding + len(instructions or ""), "this text and the instructions", param)  # alone: cannot fit
        total = self.session.text_chars + adding + len(instructions or "")
        if total > bound.max_chars:
            raise ApiError(f"the session's text would hold {total:,} characters: {bound.describe()}; delete items "
                           "(conversation.item.delete) or start a new session", code="session_text_limit",
                           param=param)

    def _rate_limits(self, final: Done | Error) -> dict:
        """rate_limits.updated, sent after each response.done as OpenAI's: the limits of this server that
        OpenAI's names stand for, with what is left of them now. `requests`: the line in front of the
        engine (Limits.max_queue requests may wait; queue_full past it), less those waiting. `tokens`:
        the model's context (context_length_exceeded past it), less what the response's prompt and reply
        took of it (when the engine counted them). Neither resets on a clock (no reset_seconds)."""
        waiting = self.ctx.scheduler.waiting
        limits = [{"name": "requests", "limit": self.limits.max_queue,
                   "remaining": max(0, self.limits.max_queue - waiting)}]
        bound = self.ctx.prompt_bound
        if bound is not None and isinstance(final, Done) and final.stats.prompt_tokens:
            used = final.stats.prompt_tokens + final.stats.new_tokens
            limits.append({"name": "tokens", "limit": bound.context_tokens,
                           "remaining": max(0, bound.context_tokens - used)})
        return {"type": "rate_limits.updated", "rate_limits": limits}

    # ------------------------------------------------------------------ session
    async def on_session_update(self, event: dict, event_id) -> None:
        spec = need_dict(event.get("session"), "session")
        spec = {key: value for key, value in spec.items() if value is not None or key not in NULL_IS_LEFT_OUT}
        s = self.session.settings
        engine = self.ctx.engine
        new = {"instructions": s.instructions, "output_modalities": s.output_modalities,
               "rate": (s.input_audio_encoding, s.input_audio_sample_rate), "thinking": s.thinking, "voice": s.voice,
               "turn_detection": s.turn_detection, "video": s.video, "transcription": s.transcription,
               "output": (s.output_encoding, s.output_rate), "include": s.include}
        for key in spec:
            if key not in IGNORED_SESSION_FIELDS and key not in SESSION_FIELDS:
                raise bad(f"unknown session field {str(key)[:60]!r}", "unknown_parameter", f"session.{key}")
        check_ignored_session_fields(spec)
        given: dict[str, tuple[str, Any]] = {}

        def twin(key: str, value: Any, param: str) -> Any:
            """A setting with a GA field and beta twins: named twice, the values must agree."""
            if key in given and given[key][1] != value:
                raise bad(f"'{param}' and '{given[key][0]}' set the same thing to different values; give one",
                          "invalid_value", param)
            given[key] = (param, value)
            return value

        self.ctx.check_model(spec.get("model"), "realtime")
        if spec.get("type") == "transcription":
            raise bad("transcription sessions (session.type 'transcription') are not supported: this is a realtime "
                      "session; it transcribes each committed audio turn with 'audio.input.transcription' set",
                      "unsupported_parameter", "session.type")
        if spec.get("type") not in (None, "realtime"):
            raise bad(f"'session.type' must be 'realtime', got {str(spec['type'])[:40]!r}", "invalid_value",
                      "session.type")
        if "instructions" in spec:
            value = spec["instructions"]
            new["instructions"] = None if value is None else need_str(value, "session.instructions")
            self._check_text_budget(0, new["instructions"], "session.instructions")
        for name in ("output_modalities", "modalities"):
            if name in spec:
                new["output_modalities"] = check_output_modalities(spec[name], f"session.{name}", engine)
        if "audio" in spec:
            audio = need_dict(spec["audio"], "session.audio")
            if audio.get("output") is not None:
                new["voice"] = audio_output_voice(audio["output"], "session.audio.output", engine, new["voice"])
                fmt = audio["output"].get("format") if isinstance(audio["output"], dict) else None
                if fmt is not None:
                    new["output"] = twin("output", output_audio_format(fmt, "session.audio.output.format", engine),
                                         "session.audio.output.format")
            codec.check_keys(audio, "session.audio", ("input", "output"))
            inp = need_dict({} if audio.get("input") is None else audio["input"], "session.audio.input")
            codec.check_keys(inp, "session.audio.input", ("format", "turn_detection", "transcription"),
                             ("noise_reduction",))
            check_noise_reduction(inp.get("noise_reduction"), "session.audio.input.noise_reduction")
            if "transcription" in inp:
                new["transcription"] = twin("transcription", self._transcription_setting(
                    inp["transcription"], "session.audio.input.transcription"), "session.audio.input.transcription")
            if "turn_detection" in inp:
                new["turn_detection"] = twin("turn_detection", setting(
                    ServerVad.from_wire, inp["turn_detection"], "session.audio.input.turn_detection"),
                    "session.audio.input.turn_detection")
            if inp.get("format") is not None:
                new["rate"] = twin("rate", audio_format_rate(inp["format"], "session.audio.input.format"),
                                   "session.audio.input.format")
        if "input_audio_transcription" in spec:  # the beta shape
            new["transcription"] = twin("transcription", self._transcription_setting(
                spec["input_audio_transcription"], "session.input_audio_transcription"),
                "session.input_audio_transcription")
        if spec.get("output_audio_format") is not None:  # the beta shape
            new["output"] = twin("output", output_audio_format(spec["output_audio_format"],
                                                               "session.output_audio_format", engine),
                                 "session.output_audio_format")
        if "input_audio_format" in spec:
            new["rate"] = twin("rate", audio_format_rate(spec["input_audio_format"], "session.input_audio_format"),
                               "session.input_audio_format")
        if "input_audio_sample_rate" in spec:
            new["rate"] = twin("rate", ("pcm16", codec.check_sample_rate(spec["input_audio_sample_rate"],
                                                                         "session.input_audio_sample_rate")),
                               "session.input_audio_sample_rate")
        if spec.get("voice") is not None:
            new["voice"] = voice_name(spec["voice"], "session.voice", engine)
        if "turn_detection" in spec:  # the beta shape
            new["turn_detection"] = twin("turn_detection", setting(ServerVad.from_wire, spec["turn_detection"],
                                                                   "session.turn_detection"), "session.turn_detection")
        if "video" in spec:
            new["video"] = None if spec["video"] is None else setting(
                VideoContextConfig.from_wire, spec["video"], s.video or VideoContextConfig(), "session.video")
        check_tool_list(spec.get("tools"), "session.tools")
        if "include" in spec:
            new["include"] = session_include(spec["include"])
        if "thinking" in spec:
            new["thinking"] = flag(spec, "thinking")
        if self.session.audio.samples and new["rate"] != (s.input_audio_encoding, s.input_audio_sample_rate):
            raise bad("the input audio buffer holds audio at the old rate; commit or clear it before changing the "
                      "rate", "invalid_state", "session.audio.input.format")
        params = generation_params(spec, self.limits, base=s.params, where="session.", inf_ok=True)
        detector = self._detector_for(new["turn_detection"])  # may refuse: nothing is applied then
        if new["turn_detection"] is None and self.session.detector is not None:  # to push-to-talk mid-turn: the
            ended = self.session.detector.end_turn("turn_detection_off")         # turn so far is committed
            if ended is not None:
                await self._turn_event(ended, create_response=False)
        s.instructions, s.output_modalities = new["instructions"], new["output_modalities"]
        (s.input_audio_encoding, s.input_audio_sample_rate), s.thinking = new["rate"], new["thinking"]
        s.params, s.voice, s.transcription, s.include = params, new["voice"], new["transcription"], new["include"]
        s.output_encoding, s.output_rate = new["output"]
        self._apply_turn_settings(new["turn_detection"], new["video"], detector)
        await self.send({"type": "session.updated", "session": s.to_dict(self.session.id, self.ctx.model_id)})

    def _detector_for(self, config: ServerVad | None) -> TurnDetector | None:
        """The session's turn detector under new settings (a new one when server_vad turns on)."""
        if config is None:
            return None
        if self.session.detector is not None:
            return self.session.detector
        try:
            return TurnDetector(config, max_turn_seconds=self.limits.max_audio_seconds,
                                start_ms=round(self.audio_clock_ms))
        except MingError as e:  # the silero-vad package is missing
            raise ApiError(str(e), code="turn_detection_unavailable", status=500,
                           param="session.audio.input.turn_detection") from None

    def _apply_turn_settings(self, turns: ServerVad | None, video: VideoContextConfig | None,
                             detector: TurnDetector | None) -> None:
        """Switch between push-to-talk and server_vad, and between the explicit webcam clip and the
        rolling video context; what the old mode buffered is dropped."""
        session, s = self.session, self.session.settings
        rolling_before = s.video_context
        if (turns is None) != (s.turn_detection is None):
            session.audio.clear()
            self.turn_item_id = None
            self._drop_spoken_turn()
            if session.detector is not None:  # the session's audio clock goes on in push-to-talk
                self.audio_clock_ms = float(session.detector.audio_ms)
        if detector is not None:
            detector.update(turns)
        session.detector = detector
        s.turn_detection, s.video = turns, video
        rolling = s.video_context
        if (rolling is None) != (rolling_before is None):
            session.clip.clear()
            session.video.clear()
        if rolling is not None:
            session.video.configure(rolling)

    # ------------------------------------------------------------------ audio in
    async def on_audio_append(self, event: dict, event_id) -> None:
        buf = self.session.audio
        s = self.session.settings
        rate = event.get("sample_rate")
        rate = codec.check_sample_rate(rate) if rate is not None else s.input_audio_sample_rate
        if s.input_audio_encoding != "pcm16" and rate != s.input_audio_sample_rate:
            raise bad(f"the session's input format is audio/{s.input_audio_encoding} (G.711, "
                      f"{s.input_audio_sample_rate} Hz); this chunk says {rate} Hz", "invalid_value", "sample_rate")
        detector = self.session.detector
        if detector is not None:  # server_vad: the detector keeps what a turn needs, nothing else does
            raw = codec.b64decode(event.get("audio"), "audio", self.limits.max_message_bytes)
            samples = codec.input_samples(raw, s.input_audio_encoding, "audio")
            self.session.check_server_room(samples.nbytes, "this audio's", "send it again shortly")
            for ev in await asyncio.to_thread(detector.feed, samples, rate):
                await self._turn_event(ev)
            await self._transcribe_while_spoken(detector)
            await self._check_idle(detector)
            return
        if buf.samples and rate != buf.sample_rate:
            raise bad(f"the buffer holds audio at {buf.sample_rate} Hz; this chunk says {rate} Hz (commit or clear "
                      "first)", "sample_rate_mismatch", "sample_rate")
        raw = codec.b64decode(event.get("audio"), "audio", self.limits.max_message_bytes)
        samples = codec.input_samples(raw, s.input_audio_encoding, "audio")
        seconds = buf.seconds_with(len(samples), rate)
        if seconds > self.limits.max_audio_seconds:
            raise bad(f"the input audio buffer would hold {seconds:.1f} s, the limit is "
                      f"{self.limits.max_audio_seconds:g} s; commit it first", "audio_too_long", "audio")
        self.session.check_server_room(samples.nbytes, "this audio's", "commit or clear the input audio buffer")
        buf.append(samples.copy(), rate)
        self.audio_clock_ms += 1000 * len(samples) / rate

    async def on_audio_commit(self, event: dict, event_id) -> None:
        if self.session.detector is not None:  # server_vad: end the turn in progress now
            stopped = self.session.detector.end_turn()
            if stopped is None:
                raise bad("no one is speaking: with server_vad the server commits each turn itself",
                          "input_audio_buffer_commit_empty")
            await self._turn_event(stopped, create_response=False)
            return
        buf = self.session.audio
        rate = buf.sample_rate or self.session.settings.input_audio_sample_rate
        if buf.samples < MIN_COMMIT_SECONDS * rate:
            raise bad(f"buffer too small: it holds {1000 * buf.samples / rate:.0f} ms of audio, at least "
                      f"{1000 * MIN_COMMIT_SECONDS:.0f} ms is needed", "input_audio_buffer_commit_empty")
        samples, rate = buf.peek()
        await self._commit_turn(new_id("item"), codec.Audio(samples, rate))  # refused: the buffer stays
        buf.clear()

    async def on_audio_clear(self, event: dict, event_id) -> None:
        self.session.audio.clear()
        if self.session.detector is not None:
            self.session.detector.clear()
            self.turn_item_id = None
            self._drop_spoken_turn()
        await self.send({"type": "input_audio_buffer.cleared"})

    async def _commit_turn(self, item_id: str, audio: codec.Audio) -> None:
        """The user's turn joins the conversation: the rolling webcam video (when the session keeps
        one), then the audio; input_audio_buffer.committed, conversation.item.added/.done."""
        video, video_public = await self._turn_video()
        parts = video + [audio.part()]
        public = video_public + [{"type": "input_audio", "seconds": round(audio.seconds, 3),
                                  "sample_rate": audio.sample_rate, "transcript": None}]
        item = Item(item_id, "user", parts, public, turn_video=bool(video))
        if self.session.detector is not None:  # hands-free: the oldest turns leave a full conversation, never
            answered = self._answered_item_id()  # the one a running reply answers; that reply needs a slot too
            for old in self.session.make_room(item, reply_slots=1 + (answered is not None), keep=answered):
                await self.send({"type": "conversation.item.deleted", "item_id": old})
        prev = self._last_item_id()
        self.session.add_item(item)
        self._drop_old_turn_video()
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item.id})
        await self._item_added(item, prev)
        if self.session.settings.transcription is not None:
            await self._transcribe(item, len(public) - 1, audio)

    async def _turn_video(self) -> tuple[list[dict], list[dict]]:
        """A user turn's start when the session keeps a rolling webcam context that holds recent frames: that
        video as an engine part and its public part (else two empty lists)."""
        if self.session.settings.video_context is None:
            return [], []
        taken = await asyncio.to_thread(self.session.video.take_turn_video)
        return ([taken[0]], [taken[1]]) if taken is not None else ([], [])

    def _drop_old_turn_video(self) -> None:
        rolling = self.session.settings.video_context
        if rolling is not None:
            self.session.drop_old_turn_video(rolling.keep_turns)

    # ------------------------------------------------------------------ input audio transcription
    def _transcription_setting(self, value: Any, param: str) -> dict | None:
        """`audio.input.transcription` (beta: `input_audio_transcription`): null, or {"model",
        "language", "prompt"} (all optional); our ASR transcribes each committed audio turn."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise bad(f"'{param}' must be null or an object such as {{\"model\": \"whisper-1\"}}", "invalid_type",
                      param)
        codec.check_keys(value, param, ("model", "language", "prompt"))
        if "audio" not in self.ctx.engine.info().components:
            raise bad("this model has no audio encoder: it cannot transcribe", "unsupported_parameter", param)
        model = value.get("model")
        if model is not None:
            need_str(model, f"{param}.model")
            try:
                self.ctx.check_model(model, "transcription")
            except ApiError as e:
                raise ApiError(e.message, code=e.code, status=e.status, param=f"{param}.model") from None
        language = value.get("language")
        if language is not None:
            need_str(language, f"{param}.language")
            if len(language) > 64:
                raise bad(f"'{param}.language' is a language tag such as 'en' or 'zh' (at most 64 characters)",
                          "invalid_value", f"{param}.language")
            transcription_tag(language, f"{param}.language")
        prompt = value.get("prompt")
        if prompt is not None:
            need_str(prompt, f"{param}.prompt")
            if self.ctx.prompt_bound is not None:
                self.ctx.prompt_bound.check(len(prompt), "the transcription prompt", f"{param}.prompt")
        return {"model": model, "language": language or None, "prompt": prompt or None}

    async def _transcribe(self, item: Item, index: int, audio: codec.Audio) -> None:
        """Transcribe a committed audio turn with our ASR, queued like a response:
        conversation.item.input_audio_transcription.delta events, then .completed (its transcript
        also becomes the item's) or .failed. A turn transcribed while it was spoken (server_vad:
        _transcribe_while_spoken) has only its audio after the last piece left to transcribe."""
        turn = self.spoken_turn if self.spoken_turn is not None and self.spoken_turn.item_id == item.id else None
        self.spoken_turn = None
        turn = turn or TurnTranscript(item.id)
        if not turn.failed:
            await self._transcribe_piece(turn, audio.samples[turn.cut:], audio.sample_rate,
                                         {"item_id": item.id, "content_index": index}, item)

    async def _transcribe_while_spoken(self, detector: TurnDetector) -> None:
        """server_vad with input transcription on: the turn being spoken is transcribed a piece at a time
        (engine.server.turn_transcripts), its deltas naming the item speech_started announced, so a partial
        transcript shows while the user speaks; their content_index is the audio's place in the item (after the
        rolling webcam video, when frames are held: the turn will take them at its end)."""
        if self.session.settings.transcription is None or not detector.in_speech or self.turn_item_id is None:
            return
        turn = self.spoken_turn
        if turn is None or turn.item_id != self.turn_item_id:
            turn = self.spoken_turn = TurnTranscript(self.turn_item_id)
        if turn.in_engine is not None or turn.failed or detector.turn_samples - turn.cut < (
                self.turn_pieces.piece_s * VAD_RATE):
            return
        audio = detector.turn_audio(turn.cut)
        end = piece_end(audio, VAD_RATE, self.turn_pieces)
        if end is not None:
            turn.cut += end
            index = 1 if self.session.settings.video_context is not None and len(self.session.video.clip) else 0
            await self._transcribe_piece(turn, audio[:end], VAD_RATE, {"item_id": turn.item_id,
                                                                       "content_index": index})

    def _drop_spoken_turn(self) -> None:
        """The turn being spoken is dropped (input_audio_buffer.clear, a switch of turn detection): its piece in
        the engine is cancelled and nothing more is sent for it."""
        turn, self.spoken_turn = self.spoken_turn, None
        if turn is not None:
            turn.failed = True
            if turn.in_engine is not None:
                self.ctx.scheduler.cancel(turn.in_engine, abandon=True)

    def _transcription_job(self, samples: np.ndarray, rate: int) -> Job:
        """Our ASR of a turn's audio (or a piece of it) with the session's transcription settings."""
        spec, engine = self.session.settings.transcription, self.ctx.engine
        tag = transcription_tag(spec["language"], "language")
        params = GenerationParams(max_new_tokens=min(TRANSCRIPTION_MAX_TOKENS, self.limits.max_new_tokens),
                                  fit_context=True, logprobs=TRANSCRIPTION_LOGPROBS in self.session.settings.include)

        def run(cancel):
            return engine.transcribe(samples, context=spec["prompt"], dialect=tag, params=params, cancel=cancel,
                                     sample_rate=rate)

        return Job(run, label=f"realtime {self.session.id} transcription")

    async def _transcribe_piece(self, turn: TurnTranscript, samples: np.ndarray, rate: int, where: dict,
                                item: Item | None = None) -> None:
        """Queue a piece of a turn (`item`: the committed turn's last piece, whose end sends .completed); its
        deltas are sent after the turn's pieces before it."""
        if len(self.transcriptions) >= MAX_PENDING_TRANSCRIPTIONS:
            turn.failed = True
            await self._transcription_failed(where, ApiError(
                f"{len(self.transcriptions)} transcriptions of this session are still waiting for the engine; "
                "this turn was not transcribed", code="transcription_backlog", status=429))
            return
        job = self._transcription_job(samples, rate) if len(samples) else None  # (nothing after the last piece)
        if job is not None:
            try:
                self.ctx.scheduler.submit(job)
            except ApiError as e:
                turn.failed = True
                await self._transcription_failed(where, e)
                return
        turn.in_engine, before = job, turn.tail
        turn.tail = asyncio.create_task(self._stream_piece(turn, job, before, where, item))
        if job is not None:
            self.transcriptions[job] = turn.tail
            turn.tail.add_done_callback(lambda _t, _j=job: self.transcriptions.pop(_j, None))

    async def _stream_piece(self, turn: TurnTranscript, job: Job | None, before: asyncio.Task | None, where: dict,
                            item: Item | None) -> None:
        """A piece's deltas (with `logprobs` when session.include asks: each delta its tokens' entries, the
        completed event all of them, OpenAI's LogProbProperties), once the piece before it has sent its own."""
        if before is not None:
            await asyncio.wait([before])
        final = Done("", "stop") if job is None else await self._piece_deltas(turn, job, where)
        if turn.in_engine is job:
            turn.in_engine = None
        if turn.failed:
            return
        logprobs = TRANSCRIPTION_LOGPROBS in self.session.settings.include
        if not isinstance(final, Done):
            turn.failed = True
            await self._transcription_failed(where, wire.engine_error(final or Error(
                "the transcription ended without a result", "engine_error")))
        elif item is not None:
            part = item.public[where["content_index"]]
            if part.get("type") == "input_audio":
                part["transcript"] = turn.text
            extra = {"logprobs": wire.transcript_logprobs(turn.logprobs)} if logprobs else {}
            await self.send({"type": "conversation.item.input_audio_transcription.completed", **where,
                             "transcript": turn.text, **extra})

    async def _piece_deltas(self, turn: TurnTranscript, job: Job, where: dict) -> Done | Error | None:
        """Send a piece's transcript deltas as they come; returns how it ended."""
        final, begins = None, True
        logprobs = TRANSCRIPTION_LOGPROBS in self.session.settings.include
        async for ev in job.events():
            if isinstance(ev, (Done, Error)):
                final = ev
            elif isinstance(ev, TextDelta) and ev.text and not turn.failed:
                turn.logprobs += ev.logprobs or []
                extra = {"logprobs": wire.transcript_logprobs(ev.logprobs or [])} if logprobs else {}
                await self.send({"type": "conversation.item.input_audio_transcription.delta", **where,
                                 "delta": turn.add(ev.text, begins), **extra})
                begins = False
        return final

    async def _transcription_failed(self, where: dict, err: ApiError) -> None:
        await self.send({"type": "conversation.item.input_audio_transcription.failed", **where,
                         "error": {k: v for k, v in err.to_openai().items() if k in ("type", "code", "message",
                                                                                    "param")}})

    # ------------------------------------------------------------------ server_vad turns
    async def _turn_event(self, ev: SpeechStarted | SpeechStopped, create_response: bool = True) -> None:
        """One event of the turn detector, as the client and the conversation see it."""
        config = self.session.settings.turn_detection
        if isinstance(ev, SpeechStarted):
            self.idle_from_ms = None  # the user is not idle
            self.turn_item_id = new_id("item")
            active = self.session.active
            if config is not None and config.interrupt_response:
                self.response_wanted = False  # the user goes on: answer once they have finished
                if active is not None and active.encoder.in_conversation:  # (OpenAI's: an out-of-band reply
                    self._silence(active, "turn_detected")  # runs on) barge-in: before anything else is sent
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": ev.audio_start_ms,
                             "item_id": self.turn_item_id})
            return
        item_id, self.turn_item_id = self.turn_item_id or new_id("item"), None
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ev.audio_end_ms,
                         "item_id": item_id})
        try:
            await self._commit_turn(item_id, codec.Audio(ev.audio, ev.sample_rate))
        except ApiError as e:  # e.g. the session's media limit: the turn is lost, the session goes on
            await self.send_error(e)
            return
        if create_response and config is not None and config.create_response:
            await self._respond_to_turn()

    async def _respond_to_turn(self) -> None:
        """Start the response to the turn that just ended, or as soon as the running one has ended
        (it was cancelled by the barge-in, or interrupt_response is off)."""
        if self.closed:
            return
        if self.session.active is not None:
            self.response_wanted = True
            return
        try:
            await self._start_response({}, None)
        except ApiError as e:
            await self.send_error(e)

    async def _check_idle(self, detector: TurnDetector) -> None:
        """server_vad's idle_timeout_ms (OpenAI's): no speech for that long after the last reply's audio ended
        (its response.done plus its audio's length): input_audio_buffer.timeout_triggered, the latest audio
        committed as the user's turn, and a response."""
        config = self.session.settings.turn_detection
        if (config is None or config.idle_timeout_ms is None or self.idle_from_ms is None or detector.in_speech
                or self.session.active is not None or detector.audio_ms - self.idle_from_ms < config.idle_timeout_ms):
            return
        item_id, start_ms, self.idle_from_ms = new_id("item"), self.idle_from_ms, None
        await self.send({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": start_ms,
                         "audio_end_ms": detector.audio_ms, "item_id": item_id})
        try:
            await self._commit_turn(item_id, codec.Audio(detector.recent_audio(), VAD_RATE))
        except ApiError as e:
            await self.send_error(e)
            return
        await self._respond_to_turn()

    def _arm_idle(self, resp: Response) -> None:
        """A reply to the conversation ended: the idle timeout counts from when its audio has played."""
        detector = self.session.detector
        if resp.encoder.in_conversation and detector is not None and not detector.in_speech:
            self.idle_from_ms = detector.audio_ms + round(1000 * sum(span.seconds for span in resp.audio))

    def _response_ended(self, task: asyncio.Task) -> None:
        self.last_activity = time.monotonic()
        if self.response_wanted and not self.closed and self.session.active is None:
            self.response_wanted = False
            asyncio.get_running_loop().create_task(self._respond_to_turn())

    def _silence(self, resp: Response, reason: str) -> None:
        """Cancel a response for good: the engine stops within one step, and its output that still
        waits in the socket's queue is dropped (the conversation keeps only what was sent)."""
        resp.cancel_reason = reason if not resp.silenced else resp.cancel_reason
        resp.silenced = True
        self.ctx.scheduler.cancel(resp.job)
        self._drop_queued_output(resp)

    def _drop_queued_output(self, resp: Response) -> None:
        """Take the response's output deltas out of the outgoing queue (no await: atomic on the
        loop) and take them back from what its item says it sent."""
        kept, dropped = [], []
        while not self.out.empty():
            ev = self.out.get_nowait()
            (dropped if ev.get("response_id") == resp.id and ev.get("type") in OUTPUT_DELTAS else kept).append(ev)
        for ev in kept:
            self.out.put_nowait(ev)
        unsend(resp, dropped)

    # ------------------------------------------------------------------ truncate
    async def on_item_truncate(self, event: dict, event_id) -> None:
        """conversation.item.truncate: an assistant reply keeps only the audio the user heard
        (`audio_end_ms`) and the text spans whose audio had started by then."""
        item_id = need_str(event.get("item_id"), "item_id")
        index = need_number(event.get("content_index", 0), "content_index", 0, 1e6, integer=True)
        end_ms = need_number(event.get("audio_end_ms"), "audio_end_ms", 0, 1e9, integer=True)
        active = self.session.active
        if active is not None and active.encoder.item_id == item_id:  # still streaming: cut it when it ends
            spans, parts = active.audio, len(active.encoder.parts)
        else:
            item = self.session.find_item(item_id)
            if item is None:
                raise no_such_item(item_id)
            if item.role != "assistant":  # (OpenAI's: truncate cuts what the user heard of a reply)
                raise bad(f"item {item_id[:64]!r} is a {item.role} message: only an assistant reply's audio can be "
                          "truncated", "invalid_value", "item_id")
            spans, parts = item.audio, len(item.public)
        if index >= parts:
            raise bad(f"item {item_id[:64]!r} has {parts} content part(s); content_index {index} is not one of them",
                      "invalid_value", "content_index")
        if not spans:
            raise bad(f"item {item_id[:64]!r} has no audio to truncate", "invalid_value", "item_id")
        total_ms = 1000 * (spans[-1].start_s + spans[-1].seconds)
        if end_ms > total_ms + 1:
            raise bad(f"audio_end_ms {end_ms} is past the end of the item's audio ({total_ms:.0f} ms)",
                      "invalid_value", "audio_end_ms")
        if active is not None and active.encoder.item_id == item_id:
            active.truncate_ms = int(end_ms)
        else:
            truncate_item(item, int(end_ms))
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": index,
                         "audio_end_ms": end_ms})

    # ------------------------------------------------------------------ video in
    async def on_video_append(self, event: dict, event_id) -> None:
        t = float(need_number(event.get("capture_time"), "capture_time", 0, 1e12))
        rolling = self.session.settings.video_context is not None
        clip = self.session.video.clip if rolling else self.session.clip
        span = clip.time_span
        if span is not None and t < span[1]:
            raise bad(f"capture_time {t} is before the previous frame's ({span[1]}); times must not go backwards",
                      "invalid_value", "capture_time")
        if rolling and not self.session.video.wants(t):
            return  # a frame sooner than the context's fps asks for: dropped without decoding it
        value = event.get("image")
        if isinstance(value, str) and value.startswith("data:"):
            raw = codec.data_url(value, "image", self.limits.max_message_bytes)[1]
        else:
            raw = codec.b64decode(value, "image", self.limits.max_message_bytes)
        frame = await asyncio.to_thread(codec.image_array, raw, self.limits, "image")
        self.session.check_server_room(frame.nbytes, "this frame's", "commit or clear the input video buffer")
        if rolling:
            self.session.video.add(frame, t)
        else:
            clip.add_frame(frame, t)

    async def on_video_commit(self, event: dict, event_id) -> None:
        if self.session.settings.video_context is not None:  # the rolling window becomes an item
            taken = await asyncio.to_thread(self.session.video.take_turn_video)
            if taken is None:
                raise bad("the video context holds no recent frames: append frames first",
                          "input_video_buffer_commit_empty")
            await self._add_video_item(*taken)
            return
        clip = self.session.clip
        n = len(clip)
        if n == 0:
            raise bad("the input video buffer is empty: append frames first", "input_video_buffer_commit_empty")
        video = await asyncio.to_thread(compact_clip, clip)  # uint8 frames; the engine preprocesses them
        span = clip.time_span
        await self._add_video_item({"type": "video", "video": video},  # refused: the frames stay
                                   {"type": "input_video", "frames": n,
                                    "seconds": round(span[1] - span[0], 3) if span else 0.0})
        clip.clear()

    async def _add_video_item(self, part: dict, public: dict) -> None:
        item = Item(new_id("item"), "user", [part], [public])
        prev = self._last_item_id()
        self.session.add_item(item)
        await self.send({"type": "input_video_buffer.committed", "previous_item_id": prev, "item_id": item.id,
                         "frames": public["frames"]})
        await self._item_added(item, prev)

    async def on_video_clear(self, event: dict, event_id) -> None:
        self.session.clip.clear()
        self.session.video.clear()
        await self.send({"type": "input_video_buffer.cleared"})

    # ------------------------------------------------------------------ conversation
    def _last_item_id(self) -> str | None:
        """The item a new one follows: the last, or the reply being written right after it (announced
        by conversation.item.added, it joins there when its response ends)."""
        last = self.session.items[-1].id if self.session.items else None
        active = self.session.active
        if active is not None and active.joins and active.encoder.previous_item_id == last:
            return active.encoder.item_id
        return last

    def _answered_item_id(self) -> str | None:
        """The item the running response's reply joins after (the one it answers), when that reply joins the
        conversation; else None."""
        active = self.session.active
        return active.encoder.previous_item_id if active is not None and active.encoder.in_conversation else None

    async def _item_added(self, item: Item, prev: str | None) -> None:
        """A complete item joined the conversation: conversation.item.added, then .done."""
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self.send({"type": kind, "previous_item_id": prev, "item": item.to_dict()})

    async def on_item_create(self, event: dict, event_id) -> None:
        item = need_dict(event.get("item"), "item")
        check_message_item(item, "item", "'message'")
        after = self._insertion_point(event.get("previous_item_id"))
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise bad("'item.role' must be 'user', 'assistant' or 'system'", "invalid_value", "item.role")
        item_id = item.get("id")
        if item_id is not None:
            need_str(item_id, "item.id", allow_empty=False)
            if len(item_id) > 64 or item_id == ROOT or self._id_taken(item_id):
                raise bad(f"'item.id' must be unique in the session, at most 64 characters and not {ROOT!r}",
                          "invalid_value", "item.id")
        if "content" not in item:
            raise bad("'item.content' is required", "missing_field", "item.content")
        self._check_text_budget(text_chars(item["content"]), param="item.content")
        conv = await self._item_content(role, item["content"], "item.content")
        # a user message typed during a video call (appended as the latest turn) sees the camera as a spoken turn does
        video, video_public = await self._turn_video() if role == "user" and after is None else ([], [])
        new = Item(item_id or new_id("item"), role, video + conv.parts, video_public + conv.public,
                   turn_video=bool(video))
        prev = self._last_item_id() if after is None else None if after == ROOT else after
        self.session.add_item(new, after=after)
        self._drop_old_turn_video()
        await self._item_added(new, prev)

    async def _item_content(self, role: str, content: Any, param: str,
                            budget: codec.MediaBudget | None = None) -> codec.Converted:
        """A message item's content as engine parts (a system item: text only); its decoded media within
        `budget` (by default max_session_media_bytes for this item alone)."""
        if role == "system":  # (echoed part by part, as given; the model reads them joined)
            text = codec.text_only(content, param)
            given = [p["text"] for p in content] if isinstance(content, list) else [text]
            return codec.Converted([{"type": "text", "text": text}], [{"type": "input_text", "text": t} for t in given])
        if role == "assistant" and isinstance(content, list):
            return spoken_reply_content(content, self.limits, param)
        s = self.session.settings  # raw audio parts are in the session's input format (OpenAI's rule)
        args = (content, self.limits, param, s.input_audio_sample_rate, role, budget, s.input_audio_encoding)
        media = isinstance(content, list) and any(
            not isinstance(p, dict) or p.get("type") not in ("text", "input_text", "output_text") for p in content)
        # decoding images/audio takes a while: off the event loop
        return await asyncio.to_thread(codec.convert_content, *args) if media else codec.convert_content(*args)

    async def _response_input(self, value: Any) -> list[Item]:
        """response.create `input` (OpenAI's): the items this response reads instead of the conversation,
        each an item of the session by reference ({"type": "item_reference", "id"}) or a new message item
        (read by this response only, never added to the conversation)."""
        if not isinstance(value, list):
            raise bad("'response.input' must be a list of items", "invalid_type", "response.input")
        if len(value) > self.limits.max_conversation_items:
            raise bad(f"'response.input' holds {len(value)} items; at most {self.limits.max_conversation_items}",
                      "too_many_messages", "response.input")
        items, budget = [], codec.MediaBudget(self.limits.max_session_media_bytes)  # for all its new items together
        for i, spec in enumerate(value):
            name = f"response.input[{i}]"
            spec = need_dict(spec, name)
            if spec.get("type") == "item_reference":
                codec.check_keys(spec, name, ("type", "id"))
                item = self.session.find_item(need_str(spec.get("id"), f"{name}.id"))
                if item is None:
                    raise bad(f"no item with id {spec['id'][:64]!r} in this session", "item_not_found", f"{name}.id")
                items.append(item)
                continue
            check_message_item(spec, name, "'message' or 'item_reference'")
            role = spec.get("role")
            if role not in ("user", "assistant", "system"):
                raise bad(f"'{name}.role' must be 'user', 'assistant' or 'system'", "invalid_value", f"{name}.role")
            if "content" not in spec:
                raise bad(f"'{name}.content' is required", "missing_field", f"{name}.content")
            conv = await self._item_content(role, spec["content"], f"{name}.content", budget)
            items.append(Item(new_id("item"), role, conv.parts, conv.public))
        return items

    def _insertion_point(self, prev: Any) -> str | None:
        """Where conversation.item.create's `previous_item_id` puts the item (OpenAI's rule): left out
        or the last item's id: appended (None); "root": first (ROOT); another item's id: right after it.
        An id the session does not hold is item_not_found; the reply being written (or the item it
        follows, whose next place it takes) is invalid_state until response.done."""
        if prev is None:
            return None
        need_str(prev, "previous_item_id")
        if prev == self._last_item_id():
            return None
        if prev == ROOT:
            return ROOT
        active = self.session.active
        if active is not None and active.joins and prev in (active.encoder.item_id, active.encoder.previous_item_id):
            raise bad(f"item {prev[:64]!r} is followed by the reply response {active.id} is still writing: add "
                      "the item after response.done, or leave 'previous_item_id' out to append it",
                      "invalid_state", "previous_item_id")
        if self.session.find_item(prev) is None:
            raise bad(f"no item with id {prev[:64]!r} in this session to insert after (use an item's id, 'root' "
                      "for the start, or leave 'previous_item_id' out to append)", "item_not_found",
                      "previous_item_id")
        return prev

    def _id_taken(self, item_id: str) -> bool:
        """Whether an item of the conversation, or the reply being written (it joins at response.done), has this id."""
        return self._streaming_item(item_id) is not None or self.session.find_item(item_id) is not None

    def _streaming_item(self, item_id: str) -> Response | None:
        """The active response whose assistant item is `item_id` (announced by conversation.item.added,
        not yet in the conversation: it joins when the response ends), else None."""
        active = self.session.active
        if active is not None and active.joins and active.encoder.item_id == item_id:
            return active
        return None

    async def on_item_delete(self, event: dict, event_id) -> None:
        item_id = need_str(event.get("item_id"), "item_id")
        active = self._streaming_item(item_id)
        if active is not None:
            raise bad(f"item {item_id!r} is the reply response {active.id} is still writing: cancel it "
                      "(response.cancel) or wait for response.done, then delete it", "invalid_state", "item_id")
        active = self.session.active
        if active is not None and active.joins and active.encoder.previous_item_id == item_id:
            raise bad(f"item {item_id[:64]!r} is followed by the reply response {active.id} is still writing (its "
                      "conversation.item.added named it as previous_item_id): delete it after response.done",
                      "invalid_state", "item_id")
        for i, it in enumerate(self.session.items):
            if it.id == item_id:
                del self.session.items[i]
                await self.send({"type": "conversation.item.deleted", "item_id": item_id})
                return
        raise no_such_item(item_id)

    async def on_item_retrieve(self, event: dict, event_id) -> None:
        """conversation.item.retrieve: the server's view of one item, as conversation.item.added showed it
        (media described, not echoed; an assistant reply as truncated, its transcript filled in)."""
        item_id = need_str(event.get("item_id"), "item_id")
        active = self._streaming_item(item_id)
        if active is not None:  # the reply so far, as its next conversation.item.done will show it complete
            await self.send({"type": "conversation.item.retrieved", "item": active.encoder.item("in_progress")})
            return
        item = self.session.find_item(item_id)
        if item is None:
            raise no_such_item(item_id)
        await self.send({"type": "conversation.item.retrieved", "item": item.to_dict()})

    # ------------------------------------------------------------------ responses
    async def on_response_create(self, event: dict, event_id) -> None:
        spec = need_dict({} if event.get("response") is None else event["response"], "response")
        REALTIME_RESPONSE.check(spec, "response.")
        await self._let_cancelled_response_end()
        await self._start_response(spec, event_id)
        self.response_wanted = False  # the client asked for this one itself

    async def _let_cancelled_response_end(self) -> None:
        """A cancelled response (response.cancel, a barge-in) is active until its engine stops and its response.done
        is queued: a response.create sent right after response.cancel waits for that (CANCELLED_RESPONSE_WAIT_S at
        most) rather than meet conversation_already_has_active_response for a response its client has ended."""
        active = self.session.active
        if active is not None and active.silenced and active.task is not None:
            await asyncio.wait({active.task}, timeout=CANCELLED_RESPONSE_WAIT_S)

    async def _start_response(self, spec: dict, event_id: str | None) -> None:
        if self.session.active is not None:
            raise bad(f"conversation already has an active response ({self.session.active.id}); cancel it or wait "
                      "for response.done", "conversation_already_has_active_response")
        s = self.session.settings
        engine = self.ctx.engine
        modalities, voice, out_format = s.output_modalities, s.voice, (s.output_encoding, s.output_rate)
        fmt = None
        for name in ("output_modalities", "modalities"):
            if spec.get(name) is not None:  # (null: the session's)
                modalities = check_output_modalities(spec[name], f"response.{name}", engine)
        if spec.get("audio") is not None:
            audio = need_dict(spec["audio"], "response.audio")
            codec.check_keys(audio, "response.audio", ("output",))
            if audio.get("output") is not None:
                voice = audio_output_voice(audio["output"], "response.audio.output", engine, voice)
                fmt = audio["output"].get("format") if isinstance(audio["output"], dict) else None
                if fmt is not None:
                    out_format = output_audio_format(fmt, "response.audio.output.format", engine)
        if spec.get("voice") is not None:  # the beta shape of audio.output.voice
            voice = voice_name(spec["voice"], "response.voice", engine)
        if spec.get("output_audio_format") is not None:  # ... and of audio.output.format
            beta = output_audio_format(spec["output_audio_format"], "response.output_audio_format", engine)
            if fmt is not None and beta != out_format:
                raise bad("'response.output_audio_format' and 'response.audio.output.format' name different formats; "
                          "give one", "invalid_value", "response.output_audio_format")
            out_format = beta
        conversation = spec.get("conversation")
        if conversation not in (None, "auto", "none"):
            raise bad(f"'response.conversation' must be 'auto' (the reply joins the session's conversation) or "
                      f"'none' (an out-of-band reply), got {str(conversation)[:40]!r}", "invalid_value",
                      "response.conversation")
        in_conversation = conversation != "none"
        metadata = check_metadata(spec.get("metadata"), "response.metadata")  # (echoed in the response)
        instructions = spec.get("instructions", None)
        instructions = need_str(instructions, "response.instructions") if instructions is not None else s.instructions
        self._check_text_budget(0, instructions, "response.instructions" if "instructions" in spec else None)
        params = replace(generation_params(spec, self.limits, base=s.params, where="response.", inf_ok=True),
                         logit_bias=logit_bias(spec.get("logit_bias"), vocab_size(engine), "response.logit_bias"))
        thinking = flag(spec, "thinking", s.thinking)
        items = None if spec.get("input") is None else await self._response_input(spec["input"])
        if self.session.active is not None:  # another response started while the input was decoded
            raise bad(f"conversation already has an active response ({self.session.active.id})",
                      "conversation_already_has_active_response")
        if instructions is None:
            instructions = self.session.system_text(items)
        messages = self.session.messages(items)
        where = "the conversation" if items is None else "'response.input'"
        prompt, reply_start = continued_reply(messages)
        if not prompt:  # (the model answers a user)
            raise bad(f"{where} {'holds no user item' if messages else 'is empty'}: add a user item "
                      "(conversation.item.create or input_audio_buffer.commit, or in 'response.input') before "
                      "response.create", "conversation_empty", None if items is None else "response.input")
        # the reply would have nowhere to go
        if in_conversation and len(self.session.items) >= self.limits.max_conversation_items:
            raise ApiError(f"the conversation already holds {len(self.session.items)} items, the limit per session: "
                           "the reply could not join it; delete items (conversation.item.delete) first",
                           code="conversation_too_long")
        if self.ctx.prompt_bound is not None:  # a conversation that cannot fit is refused now, counted off the loop
            texts = ([instructions] if instructions else []) + [t for m in messages for t in texts_of(m["content"])]
            await self.ctx.prompt_bound.check_tokens(texts, params.room_needed, "the conversation and instructions")
            if self.session.active is not None:  # another response started while the text was counted
                raise bad(f"conversation already has an active response ({self.session.active.id})",
                          "conversation_already_has_active_response")
        output = output_kwargs(modalities, voice)

        def run(cancel, _m=prompt, _p=params, _i=instructions, _t=thinking, _r=reply_start):
            return engine.chat(_m, _p, cancel, system_prompt=_i, thinking=_t, assistant_prefix=_r, **output)

        job = Job(run, label=f"realtime {self.session.id}")
        if items is not None:  # an out-of-band input's new items: their media count in the server's limit while it runs
            held = {it.id for it in self.session.items}
            job.media_bytes = sum(it.nbytes for it in items if it.id not in held)
        resp = Response(self.session, job, event_id, modalities, in_conversation, metadata)
        resp.set_output_format(*out_format)
        resp.encoder.settings = {"max_output_tokens": params.max_new_tokens, "audio": {"output": {
            "format": audio_format(*out_format), "voice": voice}}}
        self.ctx.scheduler.submit(job)  # may raise queue_full
        self.session.active = resp
        await self.send(resp.encoder.created())
        resp.task = asyncio.create_task(self._stream(resp))
        resp.task.add_done_callback(self._response_ended)

    async def on_response_cancel(self, event: dict, event_id) -> None:
        active = self.session.active
        rid = event.get("response_id")
        if rid is not None:
            need_str(rid, "response_id")
        if active is None or (rid is not None and rid != active.id):
            raise bad("there is no active response to cancel" if active is None else
                      f"response {rid[:64]!r} is not the active response", "response_cancel_not_active")
        self._silence(active, "client_cancelled")

    async def _stream(self, resp: Response) -> None:
        """The job's events as server events; every kind is mapped explicitly (an event the mapping
        does not know fails the response, it never ends it quietly)."""
        try:
            final = await self._relay(resp)
            await self._finish(resp, final or Error("the response ended without a result", "engine_error"))
        finally:
            if self.session.active is resp:
                self.session.active = None

    async def _relay(self, resp: Response) -> Done | Error | None:
        """The job's events to the client until its Done or Error (returned). A fault here (a bug: an
        event that cannot be encoded or resampled) cancels the job and fails the response: it still
        ends with response.done, never left open."""
        final = None
        try:
            async for ev in resp.job.events():
                if isinstance(ev, (Done, Error)):
                    final = ev
                    tail = None if resp.silenced else resp.audio_tail()
                    if tail is not None:
                        await self._send_output(resp, tail)
                    continue
                if resp.silenced:  # cancelled: nothing more of it goes out
                    continue
                if isinstance(ev, AudioChunk):
                    ev = resp.audio_out(ev)
                try:
                    await self._send_output(resp, ev)
                except UnknownEventError as e:
                    log.error("realtime response %s: %s", resp.id, e)
                    self.ctx.scheduler.cancel(resp.job)
                    final = Error(str(e), "engine_error")
                    break
        except (asyncio.CancelledError, WebSocketDisconnect):
            raise
        except Exception as e:
            log.exception("realtime response %s failed while streaming", resp.id)
            self.ctx.scheduler.cancel(resp.job, abandon=True)
            return Error(f"internal error while streaming the response: {type(e).__name__}", "server_error")
        return final

    async def _send_output(self, resp: Response, ev) -> None:
        """One engine event of the response as its server events (UnknownEventError for a kind the
        encoder does not map); an audio chunk is counted as sent."""
        out = resp.encoder.encode(ev)
        if isinstance(ev, AudioChunk):
            resp.audio.append(AudioSpan(ev.start_s, ev.seconds, ev.text))
        for wire_event in out:
            await self.send(wire_event)
        if resp.silenced:  # cancelled while an event waited for room in the queue
            self._drop_queued_output(resp)

    async def _finish(self, resp: Response, final: Done | Error) -> None:
        job, enc = resp.job, resp.encoder
        ttft = None if job.first_token_at is None else job.first_token_at - resp.received_at
        figures = wire.metrics(final.stats if isinstance(final, Done) else None, job.queue_wait_s, ttft)
        cut_at = resp.truncate_ms
        if cut_at is not None:
            resp.audio = cut_reply(enc, resp.audio, cut_at)
        for wire_event in enc.finish(final, figures, "slow_reader" if job.slow_reader else resp.cancel_reason):
            await self.send(wire_event)
        await self.send(self._rate_limits(final))
        self._arm_idle(resp)
        if resp.joins:  # announced (conversation.item.added): it joins, even when the response failed midway
            item = Item(enc.item_id, "assistant", [{"type": "text", "text": enc.assistant_text}],
                        enc.item("completed")["content"],
                        status="completed" if isinstance(final, Done) and final.finish_reason == "stop"
                        and resp.truncate_ms is None else "incomplete", audio=resp.audio)
            if resp.truncate_ms != cut_at:  # a truncate handled while the closing events waited for room
                truncate_item(item, resp.truncate_ms)
            try:
                self.session.add_item(item, after=enc.previous_item_id)
            except ApiError as e:  # filled up while it ran (items created meanwhile): say the reply was not kept
                await self.send_error(ApiError(f"the reply {item.id} was sent but not kept in the conversation "
                                               f"(it will not be part of the next response): {e.message}",
                                               code=e.code, status=e.status), resp.client_event_id)


SESSION_FIELDS = {"type", "model", "include", "instructions", "output_modalities", "modalities", "audio", "input_audio_format",
                  "voice", "input_audio_transcription", "output_audio_format", "input_audio_sample_rate", "turn_detection", "video", "tools", "thinking", "temperature", "top_p",
                  "top_k", "repetition_penalty", "seed", "stop", "max_output_tokens", "max_response_output_tokens",
                  "max_tokens", "presence_penalty", "frequency_penalty"}


def spoken_reply_content(content: list, limits, param: str) -> codec.Converted:
    """An assistant item's content, OpenAI's `output_audio` parts (a spoken reply replayed, as
    conversation.item.added showed it: {"type": "output_audio", "transcript", "audio"?}) included: the
    model reads a reply as text, so such a part is its transcript (its audio is not kept)."""
    spoken, parts = set(), []
    for i, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "output_audio":
            codec.check_keys(part, f"{param}[{i}]", ("type", "transcript"), ("audio", "format"))
            if part.get("transcript") is None:
                raise bad(f"'{param}[{i}].transcript' is required: the model reads an assistant's spoken reply by its "
                          "transcript", "missing_field", f"{param}[{i}].transcript")
            part = {"type": "output_text", "text": need_str(part["transcript"], f"{param}[{i}].transcript")}
            spoken.add(i)
        parts.append(part)
    conv = codec.convert_content(parts, limits, param, role="assistant")
    conv.public = [{"type": "output_audio", "transcript": p["text"]} if i in spoken else p
                   for i, p in enumerate(conv.public)]
    return conv


def session_include(value: Any) -> tuple[str, ...]:
    """session `include`: a list of what the server's events add; OpenAI's one value, the input audio
    transcription's logprobs, is honoured (null: nothing)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad(f"'session.include' must be a list, got {type(value).__name__}", "invalid_type", "session.include")
    for entry in value:
        if entry != TRANSCRIPTION_LOGPROBS:
            raise bad(f"'session.include' takes {TRANSCRIPTION_LOGPROBS!r} only, got {codec.shown(str(entry))}",
                      "invalid_value", "session.include")
    return tuple(dict.fromkeys(value))


def no_such_item(item_id: str) -> ApiError:
    """The error for an item_id the session does not hold (delete, truncate, retrieve)."""
    return bad(f"no item with id {item_id[:64]!r} in this session", "item_not_found", "item_id")


def setting(parse, *args):
    """A settings parser (ServerVad.from_wire, VideoContextConfig.from_wire) whose refusal is an
    error event naming the field."""
    try:
        return parse(*args)
    except SettingError as e:
        raise bad(str(e), e.code, e.param) from None


# --------------------------------------------------------------------------- what the user heard

def heard(spans: list[AudioSpan], end_ms: int) -> tuple[list[AudioSpan], str]:
    """The audio chunks that had started by `end_ms` (the last one cut there) and the text they
    speak."""
    kept = []
    for span in spans:
        if 1000 * span.start_s >= end_ms:
            break
        kept.append(AudioSpan(span.start_s, min(span.seconds, end_ms / 1000 - span.start_s), span.text))
    return kept, "".join(span.text for span in kept)


def cut_reply(enc: wire.RealtimeResponseEncoder, spans: list[AudioSpan], end_ms: int) -> list[AudioSpan]:
    """A streaming reply truncated at `end_ms`: its text and transcript become what was heard."""
    kept, text = heard(spans, end_ms)
    for part in enc.parts.values():
        if part.kind in ("text", "audio"):
            part.text = [text]
    return kept


def truncate_item(item: Item, end_ms: int) -> None:
    """A finished assistant item truncated at `end_ms` (what the model sees next turn, too)."""
    item.audio, text = heard(item.audio, end_ms)
    item.parts = [{"type": "text", "text": text}]
    item.public = [{**p, "text": text} if p.get("type") == "output_text" else
                   {**p, "transcript": text} if p.get("type") == "output_audio" else p for p in item.public]
    item.status = "incomplete"


def unsend(resp: Response, dropped: list[dict]) -> None:
    """Output deltas taken out of the queue before they were sent: the reply's text, transcript
    and audio no longer hold them (they are the newest of each part)."""
    counts: dict[tuple[int, str], int] = {}
    for ev in dropped:
        key = (ev.get("content_index"), ev["type"])
        counts[key] = counts.get(key, 0) + 1
    for (index, kind), n in counts.items():
        if kind == "response.output_audio.delta":
            del resp.audio[len(resp.audio) - n:]
            continue
        part = next((p for p in resp.encoder.parts.values() if p.index == index), None)
        if part is not None:
            del part.text[max(0, len(part.text) - n):]


def audio_output_voice(spec: Any, name: str, engine, voice: str | None) -> str | None:
    """session/response `audio.output`: {"voice", "format": {"type": "audio/pcm"}, "speed"}. Returns the
    voice (the format is read by output_audio_format). Accepted without a talker too (OpenAI's SDK sends
    the whole session object, its audio defaults included): only asking for audio in `output_modalities`
    is refused there."""
    spec = need_dict(spec, name)
    codec.check_keys(spec, name, ("voice", "format"), ("speed",))
    check_ignored_speed(spec.get("speed"), f"{name}.speed")
    if spec.get("format") is not None:
        output_audio_format(spec["format"], f"{name}.format", engine)
    if spec.get("voice") is not None:
        voice = voice_name(spec["voice"], f"{name}.voice", engine)
    return voice


OPENAI_REALTIME_SPEEDS = (0.25, 1.5)  # the range OpenAI's realtime `speed` takes


def check_ignored_speed(value: Any, name: str) -> None:
    """`speed` (accepted with no effect: OpenAI's SDK sends its default) must still be what OpenAI takes, a number in
    OPENAI_REALTIME_SPEEDS: a string, a negative or a 1e308 speed was taken silently."""
    if value is not None:
        codec.need_number(value, name, *OPENAI_REALTIME_SPEEDS)


NOISE_REDUCTION_TYPES = ("near_field", "far_field")  # OpenAI's
TRUNCATION_MODES = ("auto", "disabled")  # or {"type": "retention_ratio", ...}


TOOL_ITEM_TYPES = ("function_call", "function_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
                   "mcp_approval_response")  # OpenAI's conversation items of tool calling


def check_message_item(item: dict, name: str, types: str) -> None:
    """A conversation item given by a client (`name`: where) is a message (`types`: what the place takes), its type
    checked before its fields: a function_call_output item was refused as an "unknown field 'item.call_id'"."""
    kind = item.get("type", "message")
    if kind in TOOL_ITEM_TYPES:
        raise no_tool_calling(f"{name}.type", kind)
    if kind != "message":
        raise bad(f"item type {str(kind)[:40]!r} is not supported; use {types}", "invalid_value", f"{name}.type")
    REALTIME_ITEM.check(item, f"{name}.")


def check_ignored_session_fields(spec: dict) -> None:
    """OpenAI's session fields that have no effect here (IGNORED_SESSION_FIELDS) must still be what OpenAI takes (a
    tracing of 42, a truncation of "sometimes" were taken silently); one asking for what this server cannot do is
    refused by name, as in response.create: a stored `prompt`, a `tool_choice` naming a tool (it has none)."""
    check_ignored_speed(spec.get("speed"), "session.speed")
    check_noise_reduction(spec.get("input_audio_noise_reduction"), "session.input_audio_noise_reduction")
    tracing = spec.get("tracing")
    if tracing is not None and tracing != "auto":
        if not isinstance(tracing, dict):
            kind = "invalid_value" if isinstance(tracing, str) else "invalid_type"
            raise bad(f"'session.tracing' must be 'auto', an object or null, got {codec.shown(tracing)}", kind,
                      "session.tracing")
        codec.check_keys(tracing, "session.tracing", ("group_id", "metadata", "workflow_name"))
        for key in ("group_id", "workflow_name"):
            if tracing.get(key) is not None:
                need_str(tracing[key], f"session.tracing.{key}")
    truncation = spec.get("truncation")
    if truncation is not None and truncation not in TRUNCATION_MODES:
        if not isinstance(truncation, dict):
            kind = "invalid_value" if isinstance(truncation, str) else "invalid_type"
            raise bad(f"'session.truncation' must be 'auto', 'disabled' or a retention_ratio object, got "
                      f"{codec.shown(truncation)}", kind, "session.truncation")
        codec.check_keys(truncation, "session.truncation", ("type", "retention_ratio", "token_limits"))
        if truncation.get("type") != "retention_ratio":
            raise bad("'session.truncation.type' must be 'retention_ratio'", "invalid_value", "session.truncation.type")
        codec.need_number(truncation.get("retention_ratio"), "session.truncation.retention_ratio", 0.0, 1.0)
        if truncation.get("token_limits") is not None:
            limits = need_dict(truncation["token_limits"], "session.truncation.token_limits")
            codec.check_keys(limits, "session.truncation.token_limits", ("post_instructions",))
            if limits.get("post_instructions") is not None:
                codec.need_number(limits["post_instructions"], "session.truncation.token_limits.post_instructions",
                                  0, integer=True)
    refused_here = {k: v for k, v in spec.items() if k in REALTIME_RESPONSE.refused and k in IGNORED_SESSION_FIELDS}
    REALTIME_RESPONSE.check(refused_here, "session.")  # the same rule as response.create's


def check_noise_reduction(value: Any, name: str) -> None:
    """OpenAI's input noise reduction (no effect here: the browser's own suppression runs before us): null or
    {"type": "near_field" | "far_field"}."""
    if value is None:
        return
    codec.check_keys(need_dict(value, name), name, ("type",))
    if value.get("type") is not None and value["type"] not in NOISE_REDUCTION_TYPES:
        raise bad(f"'{name}.type' must be one of {', '.join(NOISE_REDUCTION_TYPES)}, got {codec.shown(value['type'])}",
                  "invalid_value", f"{name}.type")


G711_FORMATS = {"g711_ulaw": "pcmu", "g711_alaw": "pcma", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}


def output_audio_format(value: Any, name: str, engine) -> tuple[str, int]:
    """session / response `audio.output.format` (beta: `output_audio_format`) -> (encoding, rate), named as
    input formats are (audio_format_rate): PCM16 at 24 kHz unless a rate is named, or G.711 at 8 kHz. The
    talker's audio is resampled to that rate as it streams (a rate such as 2654 Hz cannot be reached from
    the talker's: refused here, not when the reply's first chunk comes)."""
    encoding, rate = audio_format_rate(value, name)
    return encoding, codec.check_output_rate(rate, f"{name}.rate", engine)


def audio_format_rate(value: Any, name: str) -> tuple[str, int]:
    """An input audio format as OpenAI names it -> (encoding, rate): 'pcm16' or {"type": "audio/pcm"}
    (24 kHz, as OpenAI's; {"type": "audio/pcm", "rate": N} for another rate), and G.711 at 8 kHz:
    'g711_ulaw' / 'g711_alaw' (beta) or {"type": "audio/pcmu"} / {"type": "audio/pcma"} (GA)."""
    kind = value.get("type") if isinstance(value, dict) else value
    if isinstance(kind, str) and kind in G711_FORMATS:
        if isinstance(value, dict):
            codec.check_keys(value, name, ("type",))
        return G711_FORMATS[kind], codec.G711_RATE
    if value == "pcm16":
        return "pcm16", OPENAI_PCM_RATE
    if isinstance(value, dict):
        if value.get("type") not in ("audio/pcm", "pcm16"):
            raise bad(f"'{name}.type' must be 'audio/pcm' (PCM16 little-endian mono), 'audio/pcmu' or 'audio/pcma' "
                      "(G.711, 8 kHz)", "invalid_value", f"{name}.type")
        codec.check_keys(value, name, ("type", "rate"))
        rate = value.get("rate", OPENAI_PCM_RATE)
        return "pcm16", codec.check_sample_rate(rate, f"{name}.rate")
    raise bad(f"'{name}' must be 'pcm16', 'g711_ulaw', 'g711_alaw' or {{\"type\": \"audio/pcm\", \"rate\": N}}",
              "invalid_value", name)


def check_handshake(scope: dict, token: str | None) -> None:
    """What a websocket's opening handshake must pass before anything else (as an HTTP request meets in
    engine.server.app's gate): a URL that is valid text, and the token where the server has one."""
    check_url_text(scope)
    check_token(scope, token)


async def refuse_handshake(ws: WebSocket, refusal: ApiError) -> None:
    """Answer a websocket's opening handshake with the refusal's HTTP status and OpenAI's error body, a 401 with
    the scheme to use as an HTTP request's, a refusal for load (503) with when to try again (a server without
    ASGI's denial-response extension: close code 1008 with the code as the reason)."""
    headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else retry_headers(refusal.status)
    try:
        await ws.send_denial_response(JSONResponse({"error": refusal.to_openai()}, status_code=refusal.status,
                                                   headers=headers))
    except RuntimeError:
        await ws.close(code=1008, reason=refusal.code)


async def realtime_endpoint(ws: WebSocket) -> None:
    ctx: ServerContext = ws.app.state.ctx
    refusal = None
    try:
        check_handshake(ws.scope, ctx.token)
        ctx.check_model(ws.query_params.get("model"), "realtime")
    except ApiError as e:
        refusal = e
    if refusal is not None:
        await refuse_handshake(ws, refusal)
        return
    try:  # (a full server refuses the handshake itself: a client never sees a socket that was not a session)
        session = ctx.sessions.create()
    except ApiError as e:
        await refuse_handshake(ws, e)
        return
    try:
        await ws.accept(subprotocol=chosen_subprotocol(ws.scope))
        await RealtimeConnection(ws, ctx, session).run()
    finally:  # (the client may leave during the handshake: its slot is freed all the same)
        ctx.sessions.close(session)

