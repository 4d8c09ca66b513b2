"""The asyncio shell: AsyncEngineClient (httpx.AsyncClient + websockets.asyncio) and
AsyncRealtimeClient, with the same methods as sync.py's, awaited (streams are async iterators).
Every decision is engine.client.core's."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import quote

import httpx

from engine.client import calls, core
from engine.client.core import ChatOptions, ConnectionLost, ModelInfo, ServerError
from engine.events import Done, Error, Event


async def until_stopped(answer: Awaitable, cancel: threading.Event | None) -> Any:
    """`answer` awaited, or core.Stopped as soon as `cancel` is set; given up (stopped, or the caller cancelled), it is
    cancelled, which closes its connection."""
    if cancel is None:  # (nothing to look at: awaited as it is, a caller's timeout cancelling it there)
        return await answer
    asking = asyncio.ensure_future(answer)
    try:
        while not asking.done():
            if cancel.is_set():
                raise core.Stopped()
            await asyncio.wait({asking}, timeout=core.POLL_S)
        return asking.result()
    finally:
        if not asking.done():
            asking.cancel()
            await asyncio.wait({asking})


class AsyncRealtimeClient(core.RealtimeClientBase):
    """RealtimeClient over websockets.asyncio: the same methods, awaited."""

    # ------------------------------------------------------------------ connection
    async def connect(self, cancel: threading.Event | None = None) -> dict:
        """Open the session (sync.py's connect): `cancel` set meanwhile gives it up at once (core.Stopped)."""
        from websockets.asyncio.client import connect  # noqa: PLC0415

        try:
            self.ws = await until_stopped(core.without_redirects(connect(self.endpoints.ws, **self._ws_options())),
                                          cancel)
        except core.Stopped:
            raise
        except Exception as e:  # refused, unreachable, 401, TLS, no handshake within connect_timeout ...
            raise core.connect_error(self.endpoints.ws, e, core.waited_for(e, self.connect_timeout)) from e
        try:
            return self.state.connected(await until_stopped(self.recv(timeout=self.connect_timeout), cancel),
                                        self.endpoints.ws)
        except core.Stopped:
            self.ws.transport.abort()  # (closed without its closing handshake, which a hung engine would not answer)
            await self.close()
            raise
        except TimeoutError as e:
            await self.close()
            raise core.connect_error(self.endpoints.ws, e, self.connect_timeout) from e

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None

    async def __aenter__(self) -> "AsyncRealtimeClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def reconnect(self) -> dict:
        await self.close()
        last: Exception | None = None
        for attempt in range(self.reconnect_attempts):
            try:
                self.state.reset()
                await self.connect()
                settings, groups = self.state.log.replay()
                if settings:
                    await self._request({"type": "session.update", "session": settings})
                replies = []
                for group in groups:
                    for e in group[:-1]:
                        await self.send(dict(e))
                    replies.append(await self._request(dict(group[-1])))
                self.state.log.rebuilt(groups, replies)
                return self.session
            except (ServerError, OSError) as e:
                last = e
                await asyncio.sleep(self.backoff_s * (2 ** attempt))
        raise ConnectionLost(f"could not reconnect: {last}", "connect_failed")

    # ------------------------------------------------------------------ raw events
    async def send(self, event: dict) -> str:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        event.setdefault("event_id", core.event_id())
        if self.ws is None:
            raise ConnectionLost("not connected")
        try:
            await self.ws.send(json.dumps(event))
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}") from e
        return event["event_id"]

    async def recv(self, timeout: float | None = None) -> dict:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        if self.state.pending:
            return self.state.pending.popleft()
        if self.ws is None:
            raise ConnectionLost("not connected")
        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)  # recv is safe to cancel: nothing is lost
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}") from e
        return self.state.observe(core.parse_json(raw))

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict]:
        while True:
            try:
                yield await self.recv(timeout)
            except (ConnectionLost, TimeoutError):
                return

    async def _request(self, event: dict) -> dict:
        reply = core.REPLIES[event["type"]]
        sent = await self.send(event)
        skipped = []
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    ev = await self.recv()
                    if core.check_reply(ev, sent, reply):
                        return ev
                    skipped.append(ev)
        except TimeoutError:
            raise ServerError(f"no {reply} within {self.timeout} s", "timeout") from None
        finally:
            self.state.pending.extendleft(reversed(skipped))

    # ------------------------------------------------------------------ session and conversation
    async def update_session(self, **fields) -> dict:
        ev = await self._request({"type": "session.update", "session": fields})
        self.state.log.settings.update(fields)
        return ev

    async def add_message(self, role: str, content: Any) -> dict:
        event = core.message_event(role, content)
        ev = await self._request(event)
        self.state.log.item_made([event], ev)
        return ev

    async def delete_item(self, item_id: str) -> dict:
        ev = await self._request({"type": "conversation.item.delete", "item_id": item_id})
        self.state.log.forget(item_id)
        return ev

    async def retrieve_item(self, item_id: str) -> dict:
        """The server's view of one conversation item (conversation.item.retrieved's `item`)."""
        ev = await self._request({"type": "conversation.item.retrieve", "item_id": item_id})
        return ev["item"]

    async def append_audio(self, samples: Any, sample_rate: int | None = None) -> None:
        event = core.audio_append_event(samples, sample_rate)
        await self.send(event)
        self.state.log.audio.append(event)

    async def commit_audio(self) -> dict:
        return await self._commit("audio")

    async def clear_audio(self) -> dict:
        return await self._clear("audio")

    async def append_frame(self, image: Any, capture_time: float) -> None:
        event = core.frame_append_event(image, capture_time)
        await self.send(event)
        self.state.log.video.append(event)

    async def commit_video(self) -> dict:
        return await self._commit("video")

    async def clear_video(self) -> dict:
        return await self._clear("video")

    async def _commit(self, kind: str) -> dict:
        event = core.commit_event(kind)
        ev = await self._request(event)
        self.state.log.committed(kind, event, ev)
        return ev

    async def _clear(self, kind: str) -> dict:
        setattr(self.state.log, kind, [])
        return await self._request(core.clear_event(kind))

    # ------------------------------------------------------------------ responses
    def respond(self, cancel: threading.Event | None = None, **response) -> AsyncIterator[Event]:
        event = {"type": "response.create", "event_id": core.event_id(), "response": response}
        return self._stream([event], cancel, {event["event_id"]})

    async def cancel(self, response_id: str | None = None) -> str:
        event = {"type": "response.cancel"}
        if response_id:
            event["response_id"] = response_id
        return await self.send(event)

    async def _stream(self, events: list[dict], cancel, final_error_ids: set[str] | None) -> AsyncIterator[Event]:
        run = core.realtime_run(final_error_ids, cancel, self.timeout, self.endpoints.ws)
        try:
            for e in events:
                await self.send(e)
            while not run.finished:
                if run.cancel_due():
                    await self.send(run.cancel_event())
                try:
                    raw = await self.recv(timeout=core.POLL_S)
                except TimeoutError:
                    for ev in run.on_idle():
                        yield ev
                    continue
                for ev in run.on_event(raw):
                    yield ev
        except ConnectionLost as e:
            for ev in run.on_lost(e.message):
                yield ev
        except ServerError as e:
            for ev in run.fail(e):
                yield ev
        finally:
            if not run.finished and self.ws is not None:  # closed early: stop the response on the server
                try:
                    await self.send(run.cancel_event())
                except ServerError:
                    pass


class AsyncEngineClient(core.EngineClientBase):
    """EngineClient over asyncio: the same methods; chat(), transcribe(), speak() and imagine() are
    async iterators."""

    def __init__(self, url: str, token: str | None = None, timeout: float = core.DEFAULT_TIMEOUT,
                 connect_timeout: float = core.CONNECT_TIMEOUT_S):
        super().__init__(url, token, timeout, connect_timeout)
        self.http = httpx.AsyncClient(**self._http_options(), limits=httpx.Limits(**core.POOL_LIMITS))

    async def close(self) -> None:
        for rt in self._sessions.drain():
            await rt.close()
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncEngineClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def realtime(self) -> AsyncRealtimeClient:
        return AsyncRealtimeClient(self.endpoints.ws, self.endpoints.token, self.timeout,
                                   connect_timeout=self.connect_timeout)

    @staticmethod
    async def _within(seconds: float, answer: Awaitable, cancel: threading.Event | None = None) -> Any:
        """`answer` awaited within `seconds`, else httpx.ReadTimeout: httpx's timeout is for each read, so an answer that
        trickled in a byte at a time (a JSON answer, a stream's head) was waited for as long as it took, minutes. As soon
        as `cancel` is set, core.Stopped (a Stop pressed while a stream's head arrived waited out the whole timeout);
        either way the request is cancelled, which closes its connection."""
        try:
            async with asyncio.timeout(seconds):
                return await until_stopped(answer, cancel)
        except TimeoutError:
            raise httpx.ReadTimeout(f"the answer was not whole within {seconds:g} s") from None

    async def _whole(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, its answer whole within its timeout (_within)."""
        return await self._within(kwargs.get("timeout", self.timeout), self._read(method, path, **kwargs))

    async def _read(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request's answer, read whole unless compressed in a way this client did not ask for (sync.py's _read)."""
        resp = await self.http.send(self.http.build_request(method, path, **kwargs), stream=True)
        try:
            if not core.unread_encoding(resp.headers):  # read whole, within core.MAX_ANSWER_BYTES
                whole = core.WholeAnswer(self.endpoints.http + path, resp.status_code, resp.headers)
                async for piece in resp.aiter_bytes():
                    whole.add(piece)
                resp._content = whole.content()  # (what resp.aread() keeps: resp.content, .json() read it)
        except httpx.RemoteProtocolError as e:
            raise core.cut_answer(self.endpoints.http + path, resp.status_code, e) from e
        finally:
            await resp.aclose()
        return resp

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            try:
                resp = await self._whole(method, path, **kwargs)
            except httpx.RemoteProtocolError:  # closed unanswered: a kept-alive connection the server dropped
                if method != "GET":  # as it was reused (its idle timeout, 5 s for uvicorn: the studio's check period)
                    raise
                resp = await self._whole(method, path, **kwargs)  # a GET is asked again, on a fresh connection
        except httpx.DecodingError as e:  # (it read "could not reach the engine server")
            raise core.undecodable(self.endpoints.http + path, None, e) from e
        except httpx.HTTPError as e:
            waited = kwargs.get("timeout", self.timeout) if isinstance(e, httpx.TimeoutException) else None
            raise core.connect_error(self.endpoints.http + path, e, waited) from e
        if core.is_redirect(resp.status_code):  # (it read "not JSON", or "not as a Ming engine server does")
            raise core.redirect_error(self.endpoints.http + path, resp.status_code, resp.headers.get("Location"))
        if unread := core.unread_encoding(resp.headers):
            raise core.undecodable(self.endpoints.http + path, unread)
        return resp

    async def _get(self, path: str, **kwargs) -> Any:
        return await self._json("GET", path, **kwargs)

    async def _json(self, method: str, path: str, **kwargs) -> Any:
        resp = await self._send(method, path, **kwargs)
        return core.json_answer(resp.status_code, resp.content, self.endpoints.http + path,
                                retry_after=resp.headers.get("Retry-After"))

    async def health(self, timeout: float | None = None) -> dict:
        return await self._get("/health", **core.timeout_option(timeout))

    async def info(self, timeout: float | None = None) -> ModelInfo:
        each = core.timeout_option(timeout)
        if not self.openai:
            return core.models_info(await self._get("/v1/models", **each))
        models = await self._get("/v1/models", **each)  # each time: a check that the engine still answers
        if self._openai_routes is None:
            found = {}
            for cap, path in calls.OPENAI_PROBES.items():
                resp = await self._send("POST", path, json={}, **each)
                found[cap] = calls.probe_found(resp.status_code, resp.content)
            self._openai_routes = found
        self._openai_info = calls.openai_info(models, self._openai_routes)
        return self._openai_info

    async def _model(self) -> str | None:
        if not self.openai:
            return None
        # (read once, within the connect timeout: a hung backend held each first request 60 s here; the studio's
        # checks read it again)
        return (self._openai_info or await self.info(timeout=self.connect_timeout)).id

    async def _model_or_error(self) -> tuple[str | None, Error | None]:
        try:
            return await self._model(), None
        except ServerError as e:
            return None, e.to_event()

    async def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                   seed: int | None = None, stop: str | list[str] | None = None, presence_penalty: float | None = None,
                   frequency_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
                   system: str | None = None, thinking: bool = False, modalities: tuple[str, ...] = ("text",),
                   voice: str | None = None, cancel: threading.Event | None = None,
                   transport: str = "realtime") -> AsyncIterator[Event]:
        model, failed = await self._model_or_error()
        if failed is not None:
            yield failed
            return
        if self._speech_rate_unknown(modalities):
            try:  # (as long as a session's opening may take: a hung engine held a spoken chat 60 s here first)
                self._speech_rate = (await self.info(timeout=self.connect_timeout)).speech_sample_rate or 0
            except ServerError as e:  # the chat itself says the server cannot be reached, unless it did not answer
                if e.code == "timeout":
                    yield e.to_event()
                    return
        opts = ChatOptions(max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, system, thinking,
                           modalities, voice, self._reply_rate(modalities), presence_penalty, frequency_penalty,
                           logit_bias)
        request = core.chat_request(messages, opts, transport, model)
        if isinstance(request, Error):
            yield request
            return
        if transport == "http" or self.openai:
            async for ev in self._http_chat(request, cancel):
                yield ev
            return
        ids = {e["event_id"] for e in request}
        while True:  # at most twice: a pooled session found dead is replaced by a fresh one
            rt = self._sessions.take()
            for old in self._sessions.retired():
                await old.close()
            pooled = rt is not None
            if rt is None:
                rt = self.realtime()
                try:
                    await rt.connect(cancel)
                except core.Stopped:
                    yield Done(text="", finish_reason="cancelled")
                    return
                except ServerError as e:
                    full = e.code == core.SESSIONS_FULL  # (then over HTTP: it waits in the engine's line)
                    over_http = core.chat_request(messages, opts, "http", model) if full else None
                    if not isinstance(over_http, dict):
                        yield e.to_event()
                        return
                    async for ev in self._http_chat(over_http, cancel):
                        yield ev
                    return
            last, stale = None, False
            try:
                async for ev in rt._stream(request, cancel, ids):
                    if core.stale_session(ev, pooled, last is None):
                        stale = True
                        break
                    last = ev
                    yield ev
            finally:
                await self._release(rt, last is not None and core.reusable(last))
            if not stale:
                return

    def _http_chat(self, body: dict, cancel) -> AsyncIterator[Event]:
        """A chat-completions request streamed as engine events."""
        decoder = core.wire.SseDecoder(strict=not self.openai)
        return self._call(calls.HttpCall("POST", "/v1/chat/completions", {"json": body}, "sse", decoder), cancel)

    async def _release(self, rt: AsyncRealtimeClient, reusable: bool) -> None:
        try:
            if reusable and rt.ws is not None:
                for event in rt.state.emptying_events():
                    await rt.send(event)
                if self._sessions.give(rt):
                    return
        except ServerError:
            pass
        await rt.close()

    async def transcribe(self, audio: Any, *, context: str | None = None, hotwords: list[str] | None = None,
                         dialect: str | None = None, sample_rate: int | None = None, max_tokens: int | None = None,
                         cancel: threading.Event | None = None) -> AsyncIterator[Event]:
        model, failed = await self._model_or_error()
        if failed is not None:
            yield failed
            return
        request = core.transcription_request(audio, sample_rate, context, hotwords, dialect, max_tokens, model)
        if isinstance(request, Error):
            yield request
            return
        decoder = core.wire.SseDecoder(strict=not self.openai)
        async for ev in self._call(calls.HttpCall("POST", "/v1/audio/transcriptions", request, "sse", decoder),
                                   cancel):
            yield ev

    async def translate(self, audio: Any, *, context: str | None = None, hotwords: list[str] | None = None,
                        sample_rate: int | None = None, max_tokens: int | None = None,
                        cancel: threading.Event | None = None) -> AsyncIterator[Event]:
        model, failed = await self._model_or_error()
        call = calls.translation_call(audio, sample_rate, context, max_tokens, model, hotwords)
        async for ev in self._call(failed or call, cancel):
            yield ev

    # ------------------------------------------------------------------ speech, voices, images
    async def speak(self, text: str = "", *, task: str = "tts", voice: str | None = None, reference_audio: Any = None,
                    reference_text: str | None = None, instruct: dict | str | None = None, music: dict | None = None,
                    seed: int | None = None, max_seconds: float | None = None,
                    cancel: threading.Event | None = None) -> AsyncIterator[Event]:
        model, failed = await self._model_or_error()
        call = failed or calls.speech_call(text, task, voice, reference_audio, reference_text, instruct, music, seed,
                                 max_seconds, model)
        async for ev in self._call(call, cancel):
            yield ev

    async def voices(self, timeout: float | None = None) -> list[dict]:
        self._refuse_on_openai("the voice library")
        return (await self._get(calls.VOICES_PATH, **core.timeout_option(timeout)))["data"]

    async def save_voice(self, name: str, reference_audio: Any, reference_text: str | None = None,
                         replace: bool = False) -> dict:
        self._refuse_on_openai("the voice library")
        try:
            upload = calls.voice_upload(name, reference_audio, reference_text, replace)
        except ValueError as e:
            raise ServerError(str(e), "invalid_request") from None
        return await self._json("POST", calls.VOICES_PATH, **upload)

    async def delete_voice(self, name: str) -> dict:
        self._refuse_on_openai("the voice library")
        return await self._json("DELETE", f"{calls.VOICES_PATH}/{quote(name, safe='')}")

    async def speech_options(self, timeout: float | None = None) -> dict:
        self._refuse_on_openai("the speech options")
        return await self._get(calls.SPEECH_OPTIONS_PATH, **core.timeout_option(timeout))

    async def imagine(self, prompt: str, *, task: str = "generate", images: list | None = None,
                      size: str | None = None, aspect: str | None = None, steps: int | None = None,
                      guidance: float | None = None, seed: int | None = None, preview_every: int | None = None,
                      preset: str | None = None, mask_color: str | None = None, n: int = 1,
                      cfg_truncation: float | None = None, cfg_normalization: bool | float | None = None,
                      image_guidance: float | None = None, negative_prompt: str | None = None,
                      mask=None, cancel: threading.Event | None = None) -> AsyncIterator[Event]:
        model, failed = await self._model_or_error()
        call = failed or calls.image_call(prompt, task, images, size, aspect, steps, guidance, seed, preview_every,
                                          preset, mask_color, n, model, cfg_truncation, cfg_normalization,
                                          image_guidance, negative_prompt, mask)
        async for ev in self._call(call, cancel):
            yield ev

    async def _call(self, call: calls.HttpCall | Error, cancel) -> AsyncIterator[Event]:
        if isinstance(call, Error):
            yield call
            return
        if call.read == "json":
            try:
                resp = await self._send(call.method, call.path, **call.kwargs)
                events = call.parse(core.json_answer(resp.status_code, resp.content, self.endpoints.http + call.path,
                                                      retry_after=resp.headers.get("Retry-After")))
            except ServerError as e:
                events = [e.to_event()]
            except core.UnknownEventError as e:
                events = [Error(f"the server sent something this client does not understand: {e}", "protocol_error")]
            for ev in events:
                yield ev
            return
        run = core.sse_run(cancel, self.timeout, call.decoder, self.endpoints.http + call.path)
        lines: asyncio.Queue = asyncio.Queue()
        clock = self._arrival_clock()
        try:
            stream = self.http.stream(call.method, call.path, **call.kwargs)
            resp = await self._within(self.timeout, stream.__aenter__(), cancel)
            clock.opened()
        except core.Stopped:  # (Stop pressed before the answer's head was whole: its connection is closed)
            for ev in run.cancelled():
                yield ev
            return
        except httpx.HTTPError as e:  # (a timeout: no answer within the client's timeout)
            waited = self.timeout if isinstance(e, httpx.TimeoutException) else None
            yield core.connect_error(self.endpoints.http + call.path, e, waited).to_event()
            return
        pump_task = None
        try:
            if core.is_redirect(resp.status_code):  # (it read "the stream ended without a result")
                yield core.redirect_error(self.endpoints.http + call.path, resp.status_code,
                                          resp.headers.get("Location")).to_event()
                return
            if unread := core.unread_encoding(resp.headers):  # (its bytes read as garbage lines)
                yield core.undecodable(self.endpoints.http + call.path, unread).to_event()
                return
            if resp.status_code >= 400 or core.is_html(resp.headers.get("content-type", "")):  # (not a stream)
                await resp.aread()
                yield core.json_error_event(resp.status_code, resp.content, self.endpoints.http + call.path,
                                            resp.headers.get("Retry-After"))
                return
            calls.note_answer_rate(call.decoder, resp.headers)

            async def pump() -> None:
                pieces = core.stream_reader(call.read, self.endpoints.http + call.path)
                try:
                    async for data in resp.aiter_bytes():
                        for piece in pieces(data):
                            clock.arrived()
                            lines.put_nowait(("data", piece))
                    lines.put_nowait(("end", None))
                except httpx.DecodingError as e:  # (not a lost connection: its compressed bytes are broken)
                    lines.put_nowait(("lost", core.undecodable(self.endpoints.http + call.path,
                                                               resp.headers.get("content-encoding"), e)))
                except ServerError as e:  # (a line longer than this client accepts)
                    lines.put_nowait(("lost", e))
                except Exception as e:  # read timeout, connection dropped
                    timed_out = isinstance(e, httpx.TimeoutException)
                    lines.put_nowait(("lost", core.stream_lost(e, self.timeout, timed_out)))

            pump_task = asyncio.create_task(pump())
            while not run.finished:
                if run.cancel_due():
                    for ev in run.cancelled():
                        yield ev
                    return
                try:
                    kind, value = await asyncio.wait_for(lines.get(), core.POLL_S)
                except TimeoutError:
                    continue
                if kind == "data":
                    out = run.on_event(value)
                else:
                    out = run.on_end() if kind == "end" else run.on_lost(value)
                if run.finished:  # (before its last event: a caller may stop reading at Done)
                    self._note_arrivals(clock, out)
                for ev in out:
                    yield ev
        finally:  # closing the stream stops the request on the server (queued or running)
            if pump_task is not None:
                pump_task.cancel()
            try:
                await stream.__aexit__(None, None, None)
            except Exception:  # noqa: BLE001  the reader may be failing on the same socket
                pass
