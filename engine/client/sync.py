"""The blocking shell: EngineClient (httpx + websockets.sync) and RealtimeClient. Each method moves
bytes and leaves every decision to engine.client.core; aio.py is the same with `await`."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from engine.client import core
from engine.client.core import ChatOptions, ConnectionLost, ModelInfo, ServerError
from engine.events import Error, Event


class RealtimeClient(core.RealtimeClientBase):
    """One realtime session (/v1/realtime): settings, conversation items, audio and webcam buffers, and
    responses streamed as engine events. Requests that the server answers (update_session,
    add_message, commit_audio, ...) return the answering server event, or raise ServerError.
    RealtimeClient(url, token=None, timeout=60, reconnect_attempts=3, backoff_s=0.2)."""

    # ------------------------------------------------------------------ connection
    def connect(self) -> dict:
        from websockets.sync.client import connect  # noqa: PLC0415

        try:
            self.ws = connect(self.endpoints.ws, legacy=True, **self._ws_options())
        except Exception as e:  # refused, unreachable, 401, TLS ...
            raise core.connect_error(self.endpoints.ws, e) from e
        return self.state.connected(self.recv(timeout=self.timeout))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def __enter__(self) -> "RealtimeClient":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reconnect(self) -> dict:
        """A fresh session with the settings and conversation this client built replayed."""
        self.close()
        last: Exception | None = None
        for attempt in range(self.reconnect_attempts):
            try:
                self.state.reset()
                self.connect()
                settings, groups = self.state.log.replay()
                if settings:
                    self._request({"type": "session.update", "session": settings})
                replies = []
                for group in groups:
                    for e in group[:-1]:
                        self.send(dict(e))
                    replies.append(self._request(dict(group[-1])))
                self.state.log.rebuilt(groups, replies)
                return self.session
            except (ServerError, OSError) as e:
                last = e
                time.sleep(self.backoff_s * (2 ** attempt))
        raise ConnectionLost(f"could not reconnect: {last}", "connect_failed")

    # ------------------------------------------------------------------ raw events
    def send(self, event: dict) -> str:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        event.setdefault("event_id", core.event_id())
        if self.ws is None:
            raise ConnectionLost("not connected")
        try:
            self.ws.send(json.dumps(event))
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}") from e
        return event["event_id"]

    def recv(self, timeout: float | None = None) -> dict:
        """The next server event (TimeoutError after `timeout` seconds without one)."""
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        if self.state.pending:
            return self.state.pending.popleft()
        if self.ws is None:
            raise ConnectionLost("not connected")
        try:
            raw = self.ws.recv(timeout=timeout)
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}") from e
        return self.state.observe(core.parse_json(raw))

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Every server event as it comes, until the connection closes (or `timeout` passes without one)."""
        while True:
            try:
                yield self.recv(timeout)
            except (ConnectionLost, TimeoutError):
                return

    def _request(self, event: dict) -> dict:
        """Send a request and wait for its answer; other events are kept for events() / respond()."""
        reply = core.REPLIES[event["type"]]
        sent = self.send(event)
        deadline = time.monotonic() + self.timeout
        skipped = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerError(f"no {reply} within {self.timeout} s", "timeout")
                try:
                    ev = self.recv(timeout=remaining)
                except TimeoutError:
                    continue
                if core.check_reply(ev, sent, reply):
                    return ev
                skipped.append(ev)
        finally:
            self.state.pending.extendleft(reversed(skipped))

    # ------------------------------------------------------------------ session and conversation
    def update_session(self, **fields) -> dict:
        ev = self._request({"type": "session.update", "session": fields})
        self.state.log.settings.update(fields)
        return ev

    def add_message(self, role: str, content: Any) -> dict:
        event = core.message_event(role, content)
        ev = self._request(event)
        self.state.log.item_made([event], ev)
        return ev

    def delete_item(self, item_id: str) -> dict:
        ev = self._request({"type": "conversation.item.delete", "item_id": item_id})
        self.state.log.forget(item_id)
        return ev

    def append_audio(self, samples: Any, sample_rate: int | None = None) -> None:
        event = core.audio_append_event(samples, sample_rate)
        self.send(event)
        self.state.log.audio.append(event)

    def commit_audio(self) -> dict:
        return self._commit("audio")

    def clear_audio(self) -> dict:
        return self._clear("audio")

    def append_frame(self, image: Any, capture_time: float) -> None:
        """One webcam frame (JPEG/PNG bytes, a path, an array or a PIL image) and its capture time (s)."""
        event = core.frame_append_event(image, capture_time)
        self.send(event)
        self.state.log.video.append(event)

    def commit_video(self) -> dict:
        return self._commit("video")

    def clear_video(self) -> dict:
        return self._clear("video")

    def _commit(self, kind: str) -> dict:
        event = core.commit_event(kind)
        ev = self._request(event)
        self.state.log.committed(kind, event, ev)
        return ev

    def _clear(self, kind: str) -> dict:
        setattr(self.state.log, kind, [])
        return self._request(core.clear_event(kind))

    # ------------------------------------------------------------------ responses
    def respond(self, cancel: threading.Event | None = None, **response) -> Iterator[Event]:
        """response.create, then the response as engine events (QueuePosition, TextDelta, AudioChunk,
        ...) ending with one Done or Error. Setting `cancel` (or closing the iterator) cancels it."""
        event = {"type": "response.create", "event_id": core.event_id(), "response": response}
        return self._stream([event], cancel, {event["event_id"]})

    def cancel(self, response_id: str | None = None) -> str:
        event = {"type": "response.cancel"}
        if response_id:
            event["response_id"] = response_id
        return self.send(event)

    def _stream(self, events: list[dict], cancel, final_error_ids: set[str] | None) -> Iterator[Event]:
        run = core.realtime_run(final_error_ids, cancel, self.timeout)
        try:
            for e in events:
                self.send(e)
            while not run.finished:
                if run.cancel_due():
                    self.send(run.cancel_event())
                try:
                    raw = self.recv(timeout=core.POLL_S)
                except TimeoutError:
                    yield from run.on_idle()
                    continue
                yield from run.on_event(raw)
        except ConnectionLost as e:
            yield from run.on_lost(e.message)
        except ServerError as e:
            yield from run.fail(e)
        finally:
            if not run.finished and self.ws is not None:  # closed early: stop the response on the server
                try:
                    self.send(run.cancel_event())
                except ServerError:
                    pass


class EngineClient(core.EngineClientBase):
    """The engine server, from anywhere: health(), info(), chat() and transcribe() returning engine
    events. EngineClient(url, token=None, timeout=60) or EngineClient.from_env() (ENGINE_URL,
    ENGINE_TOKEN); `url`: http(s)://HOST:PORT or ws(s)://HOST:PORT (both transports derive from it)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = core.DEFAULT_TIMEOUT):
        super().__init__(url, token, timeout)
        self.http = httpx.Client(**self._http_options())

    def close(self) -> None:
        for rt in self._sessions.drain():
            rt.close()
        self.http.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def realtime(self) -> RealtimeClient:
        """A (not yet connected) realtime session client for the same server."""
        return RealtimeClient(self.endpoints.ws, self.endpoints.token, self.timeout)

    def _get(self, path: str) -> Any:
        try:
            resp = self.http.get(path)
        except httpx.HTTPError as e:
            raise core.connect_error(self.endpoints.http + path, e) from e
        return core.json_answer(resp.status_code, resp.content)

    def health(self) -> dict:
        """The server's /health (status, model, queue, sessions). Raises ServerError when unreachable."""
        return self._get("/health")

    def info(self) -> ModelInfo:
        """The served model. Raises ServerError (unauthorized, connect_failed, ...)."""
        return core.models_info(self._get("/v1/models"))

    def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, stop: str | list[str] | None = None, system: str | None = None,
             thinking: bool = False, modalities: tuple[str, ...] = ("text",), voice: str | None = None,
             cancel: threading.Event | None = None, transport: str = "realtime") -> Iterator[Event]:
        """Stream a reply: QueuePosition, TextDelta, AudioChunk, ... then exactly one Done or Error.
        `messages` use the engine's format (role + content str or parts with image / audio / video as
        bytes, paths or arrays). `transport`: "realtime" (a realtime session per call, taken from a
        small pool of connected sessions and emptied after use) or "http" (/v1/chat/completions;
        larger media)."""
        request = core.chat_request(messages, ChatOptions(max_tokens, temperature, top_p, top_k, repetition_penalty,
                                                          seed, stop, system, thinking, modalities, voice), transport)
        if isinstance(request, Error):
            yield request
            return
        if transport == "http":
            yield from self._sse("/v1/chat/completions", {"json": request}, cancel)
            return
        ids = {e["event_id"] for e in request}
        while True:  # at most twice: a pooled session found dead is replaced by a fresh one
            rt = self._sessions.take()
            pooled = rt is not None
            if rt is None:
                rt = self.realtime()
                try:
                    rt.connect()
                except ServerError as e:
                    yield e.to_event()
                    return
            last, stale = None, False
            try:
                for ev in rt._stream(request, cancel, ids):
                    if core.stale_session(ev, pooled, last is None):
                        stale = True
                        break
                    last = ev
                    yield ev
            finally:
                self._release(rt, last is not None and core.reusable(last))
            if not stale:
                return

    def _release(self, rt: RealtimeClient, reusable: bool) -> None:
        """Back to the pool with its conversation emptied, or closed (which stops a response in flight)."""
        try:
            if reusable and rt.ws is not None:
                for event in rt.state.emptying_events():
                    rt.send(event)
                if self._sessions.give(rt):
                    return
        except ServerError:
            pass
        rt.close()

    def transcribe(self, audio: Any, *, context: str | None = None, hotwords: list[str] | None = None,
                   dialect: str | None = None, sample_rate: int | None = None, max_tokens: int | None = None,
                   cancel: threading.Event | None = None) -> Iterator[Event]:
        """Speech recognition: TextDelta events of the transcript, then Done whose `result` holds
        {"language", "text"} (or Error). `audio`: an audio file (bytes or path) or samples with
        `sample_rate`."""
        request = core.transcription_request(audio, sample_rate, context, hotwords, dialect, max_tokens)
        if isinstance(request, Error):
            yield request
            return
        yield from self._sse("/v1/audio/transcriptions", request, cancel)

    def _sse(self, path: str, body: dict, cancel) -> Iterator[Event]:
        """POST `body` and stream the SSE answer as engine events; cancel closes the stream (the
        server then stops the request, queued or running)."""
        run = core.sse_run(cancel, self.timeout)
        lines: queue.Queue = queue.Queue()
        try:
            stream = self.http.stream("POST", path, **body)
            resp = stream.__enter__()
        except httpx.HTTPError as e:
            yield core.connect_error(self.endpoints.http + path, e).to_event()
            return
        try:
            if resp.status_code >= 400:
                resp.read()
                yield core.json_error_event(resp.status_code, resp.content)
                return

            def pump() -> None:
                try:
                    for line in resp.iter_lines():
                        lines.put(("line", line))
                    lines.put(("end", "the stream ended"))
                except Exception as e:  # closed by a cancel, read timeout, connection dropped
                    lines.put(("end", f"{type(e).__name__}: {e}"))

            threading.Thread(target=pump, name="engine-client-sse", daemon=True).start()
            while not run.finished:
                if run.cancel_due():
                    yield from run.cancelled()
                    return
                try:
                    kind, value = lines.get(timeout=core.POLL_S)
                except queue.Empty:
                    continue
                yield from run.on_event(value) if kind == "line" else run.on_lost(value)
        finally:  # closing the stream stops the request on the server (queued or running)
            try:
                stream.__exit__(None, None, None)
            except Exception:  # noqa: BLE001  the reader thread may be failing on the same socket
                pass
