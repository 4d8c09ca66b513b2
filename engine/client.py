"""Client of the engine server (`python -m engine.server`), used by the UI, tests and benchmarks.

HTTP (OpenAI-compatible endpoints), sync and async:

    with StudioClient("http://127.0.0.1:8000", token=None) as c:
        for ev in c.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=32):
            ...  # {"type": "queue_position"|"delta"|"done", ...}
        c.transcribe(open("clip.wav", "rb").read(), hotwords=["Ming"])

Realtime websocket sessions (docs/protocol.md), sync and async:

    with RealtimeClient("ws://127.0.0.1:8000/v1/realtime") as rt:
        rt.add_message("user", "Describe the scene")
        for ev in rt.respond(max_output_tokens=64):
            ...  # response.queue_position, response.text.delta, ..., response.done

    async with AsyncRealtimeClient(url) as rt:
        await rt.add_message("user", "Hi")
        async for ev in rt.respond():
            ...

Server errors surface as `ServerError` (raise_errors=True, the default) or as the `error` events
themselves (raise_errors=False). A dropped connection raises `ConnectionLost`; `reconnect()` then
opens a fresh session and replays the settings and conversation this client built, so the
conversation carries on (the response that was streaming is lost: the server cancelled it).
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np

# --------------------------------------------------------------------------- errors


class ServerError(Exception):
    """An error the server reported: `code` (stable), `status` (HTTP) and the raw `event`/body."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None, event: Any = None):
        super().__init__(message if code is None else f"{code}: {message}")
        self.message = message
        self.code = code
        self.status = status
        self.event = event


class ConnectionLost(ServerError):
    """The realtime connection closed; call reconnect() to carry on in a fresh session."""


def _http_error(resp: httpx.Response) -> ServerError:
    try:
        err = resp.json().get("error") or {}
    except ValueError:
        err = {}
    return ServerError(err.get("message") or resp.text[:200] or resp.reason_phrase, err.get("code"),
                       resp.status_code, err)


def _auth_headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --------------------------------------------------------------------------- SSE


def _parse_sse_line(line: str, state: dict) -> dict | None:
    """One SSE line -> a client event, or None. Comments carry queue positions."""
    if line.startswith(": queue_position "):
        return {"type": "queue_position", **json.loads(line[len(": queue_position "):])}
    if not line.startswith("data: "):
        return None
    data = line[6:]
    if data == "[DONE]":
        state["finished"] = True
        return None
    obj = json.loads(data)
    if "error" in obj:
        err = obj["error"] or {}
        raise ServerError(err.get("message", "error"), err.get("code"), None, obj)
    if obj.get("type") == "transcript.text.delta":
        return {"type": "delta", "text": obj["delta"]}
    if obj.get("type") == "transcript.text.done":
        return {"type": "done", **{k: v for k, v in obj.items() if k != "type"}}
    choices = obj.get("choices") or []
    if not choices:
        if obj.get("usage"):
            state["usage"] = obj["usage"]
            return {"type": "usage", "usage": obj["usage"]}
        return None
    ch = choices[0]
    if ch.get("finish_reason"):
        return {"type": "done", "finish_reason": ch["finish_reason"], "metrics": obj.get("metrics")}
    text = (ch.get("delta") or {}).get("content")
    return {"type": "delta", "text": text} if text else None


def _wav_name(audio) -> tuple[str, bytes]:
    if isinstance(audio, (bytes, bytearray)):
        return "audio.wav", bytes(audio)
    with open(audio, "rb") as fh:
        return str(audio).rsplit("/", 1)[-1], fh.read()


def _transcribe_form(prompt, hotwords, language, dialect, stream, extra) -> dict:
    data = {k: v for k, v in {"prompt": prompt, "language": language, "dialect": dialect,
                               "hotwords": ",".join(hotwords) if hotwords else None,
                               "stream": "true" if stream else None}.items() if v is not None}
    data.update({k: str(v) for k, v in extra.items()})
    return data


# --------------------------------------------------------------------------- HTTP clients


class StudioClient:
    """Sync HTTP client of /v1/chat/completions, /v1/audio/transcriptions, /v1/models, /health."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.http = httpx.Client(base_url=self.base_url, headers=_auth_headers(token), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "StudioClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp.json()

    def health(self) -> dict:
        return self._json(self.http.get("/health"))

    def models(self) -> list[dict]:
        return self._json(self.http.get("/v1/models"))["data"]

    def chat(self, messages: list[dict], **params) -> dict:
        """Non-streaming chat completion (the OpenAI response body)."""
        return self._json(self.http.post("/v1/chat/completions", json={"messages": messages, **params}))

    def chat_stream(self, messages: list[dict], **params) -> Iterator[dict]:
        """Yields {"type": "queue_position", position, waiting}, {"type": "delta", text},
        {"type": "done", finish_reason, metrics}, {"type": "usage", usage} (with include_usage)."""
        body = {"messages": messages, **params, "stream": True}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _http_error(resp)
            state: dict = {}
            for line in resp.iter_lines():
                ev = _parse_sse_line(line, state)
                if ev is not None:
                    yield ev
            if not state.get("finished"):
                raise ConnectionLost("the stream ended before [DONE]", "connection_lost")

    def transcribe(self, audio, *, prompt: str | None = None, hotwords: list[str] | None = None,
                   language: str | None = None, dialect: str | None = None, **extra) -> dict:
        """`audio`: file bytes or a path. Returns {"text", "language", "usage", "metrics"}."""
        name, raw = _wav_name(audio)
        resp = self.http.post("/v1/audio/transcriptions", files={"file": (name, raw)},
                              data=_transcribe_form(prompt, hotwords, language, dialect, False, extra))
        return self._json(resp)


class AsyncStudioClient:
    """Async twin of StudioClient (httpx.AsyncClient)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=_auth_headers(token), timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncStudioClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _json(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp.json()

    async def health(self) -> dict:
        return await self._json(await self.http.get("/health"))

    async def chat(self, messages: list[dict], **params) -> dict:
        return await self._json(await self.http.post("/v1/chat/completions", json={"messages": messages, **params}))

    async def chat_stream(self, messages: list[dict], **params) -> AsyncIterator[dict]:
        body = {"messages": messages, **params, "stream": True}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise _http_error(resp)
            state: dict = {}
            async for line in resp.aiter_lines():
                ev = _parse_sse_line(line, state)
                if ev is not None:
                    yield ev
            if not state.get("finished"):
                raise ConnectionLost("the stream ended before [DONE]", "connection_lost")

    async def transcribe(self, audio, *, prompt: str | None = None, hotwords: list[str] | None = None,
                         language: str | None = None, dialect: str | None = None, **extra) -> dict:
        name, raw = _wav_name(audio)
        resp = await self.http.post("/v1/audio/transcriptions", files={"file": (name, raw)},
                                    data=_transcribe_form(prompt, hotwords, language, dialect, False, extra))
        return await self._json(resp)


# --------------------------------------------------------------------------- realtime: protocol logic

_counter = itertools.count(1)


def _event_id() -> str:
    return f"evt_c{next(_counter)}_{int(time.time() * 1000) % 100000}"


def pcm16_base64(samples) -> str:
    """int16 samples (or float in [-1, 1], or raw little-endian PCM16 bytes) -> base64."""
    if isinstance(samples, (bytes, bytearray)):
        return base64.b64encode(bytes(samples)).decode()
    arr = np.asarray(samples)
    if arr.dtype.kind == "f":
        arr = (np.clip(arr, -1.0, 1.0) * 32767).astype("<i2")
    return base64.b64encode(arr.astype("<i2").tobytes()).decode()


def text_content(content) -> list[dict]:
    return [{"type": "input_text", "text": content}] if isinstance(content, str) else content


class _Protocol:
    """What the sync and async realtime clients share: event building, error mapping and the
    replay log that lets reconnect() rebuild the session."""

    def __init__(self, url: str, token: str | None, raise_errors: bool, reconnect_attempts: int,
                 backoff_s: float, max_size: int):
        self.url = url
        self.token = token
        self.raise_errors = raise_errors
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.max_size = max_size
        self.session: dict | None = None
        self.pending: deque[dict] = deque()  # events read while waiting for something else
        self.settings: dict = {}  # merged session.update fields, replayed on reconnect
        self.history: list[dict] = []  # {"id": item id, "events": client events that built it}
        self._audio_log: list[dict] = []  # appends since the last commit
        self._video_log: list[dict] = []
        self.active_response: str | None = None

    def _headers(self) -> dict:
        return _auth_headers(self.token)

    def _check(self, event: dict, event_id: str | None = None) -> dict:
        if event.get("type") == "error" and self.raise_errors:
            err = event.get("error") or {}
            raise ServerError(err.get("message", "error"), err.get("code"), None, event)
        if event.get("type") == "response.created":
            self.active_response = event["response"]["id"]
        elif event.get("type") == "response.done":
            self.active_response = None
            for item in event["response"].get("output") or []:
                text = "".join(p.get("text", "") for p in item.get("content", []))
                self._log_item([{"type": "conversation.item.create",
                                 "item": {"type": "message", "role": "assistant",
                                          "content": [{"type": "output_text", "text": text}]}}], item.get("id"))
        return event

    def _finished(self, event: dict) -> dict:
        """A failed response.done raises (raise_errors) with the server's error."""
        if event.get("type") == "response.done" and self.raise_errors:
            resp = event.get("response") or {}
            if resp.get("status") == "failed":
                err = (resp.get("status_details") or {}).get("error") or {}
                raise ServerError(err.get("message", "the response failed"), err.get("code"), None, event)
        return event

    @staticmethod
    def _refused(event: dict, event_id: str) -> bool:
        return event.get("type") == "error" and (event.get("error") or {}).get("event_id") == event_id

    def _log_item(self, events: list[dict], item_id: str | None) -> None:
        self.history.append({"id": item_id, "events": [{k: v for k, v in e.items() if k != "event_id"}
                                                       for e in events]})

    def _forget(self, item_id: str) -> None:
        self.history = [h for h in self.history if h["id"] != item_id]


class RealtimeClient(_Protocol):
    """Sync realtime client (websockets.sync)."""

    def __init__(self, url: str, token: str | None = None, raise_errors: bool = True, reconnect_attempts: int = 3,
                 backoff_s: float = 0.2, max_size: int = 64 * 1024 * 1024, open_timeout: float = 10.0):
        super().__init__(url, token, raise_errors, reconnect_attempts, backoff_s, max_size)
        self.open_timeout = open_timeout
        self.ws = None

    # -- connection
    def connect(self) -> dict:
        from websockets.sync.client import connect  # noqa: PLC0415

        try:
            self.ws = connect(self.url, additional_headers=self._headers(), max_size=self.max_size,
                              open_timeout=self.open_timeout, compression=None, legacy=True)
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            raise ServerError(f"could not open {self.url}: {e}", "connect_failed", status) from e
        first = self.recv(timeout=self.open_timeout)
        if first.get("type") != "session.created":
            raise ServerError(f"expected session.created, got {first.get('type')}", "protocol_error", event=first)
        self.session = first["session"]
        return self.session

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
        """A fresh session with this client's settings and conversation replayed."""
        self.close()
        last: Exception | None = None
        for attempt in range(self.reconnect_attempts):
            try:
                self.pending.clear()
                self.active_response = None
                self.connect()
                if self.settings:
                    self.session = self._request({"type": "session.update", "session": dict(self.settings)},
                                                 "session.updated")["session"]
                history, self.history = self.history, []
                for entry in history:
                    for e in entry["events"][:-1]:
                        self.send(dict(e))
                    created = self._request(dict(entry["events"][-1]), "conversation.item.created")
                    self.history.append({"id": created["item"]["id"], "events": entry["events"]})
                return self.session
            except (ServerError, OSError) as e:
                last = e
                time.sleep(self.backoff_s * (2 ** attempt))
        raise ConnectionLost(f"could not reconnect: {last}", "reconnect_failed")

    # -- raw events
    def send(self, event: dict) -> str:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        event.setdefault("event_id", _event_id())
        if self.ws is None:
            raise ConnectionLost("not connected", "connection_lost")
        try:
            self.ws.send(json.dumps(event))
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}", "connection_lost") from e
        return event["event_id"]

    def recv(self, timeout: float | None = None) -> dict:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        if self.pending:
            return self._check(self.pending.popleft())
        if self.ws is None:
            raise ConnectionLost("not connected", "connection_lost")
        try:
            raw = self.ws.recv(timeout=timeout)
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}", "connection_lost") from e
        return self._check(json.loads(raw))

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Every server event, as it comes (until the connection closes)."""
        while True:
            try:
                yield self.recv(timeout)
            except ConnectionLost:
                return

    def _request(self, event: dict, reply: str, timeout: float = 60.0) -> dict:
        """Send and wait for `reply`; other events are kept for events()/respond()."""
        eid = self.send(event)
        deadline = time.monotonic() + timeout
        skipped = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerError(f"no {reply} within {timeout} s", "timeout")
                from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

                try:
                    ev = json.loads(self.ws.recv(timeout=remaining))
                except ConnectionClosed as e:
                    raise ConnectionLost(f"connection closed: {e}", "connection_lost") from e
                except TimeoutError:
                    continue
                if ev.get("type") == reply:
                    return ev
                if ev.get("type") == "error" and (ev.get("error") or {}).get("event_id") == eid:
                    return self._check(ev)
                skipped.append(ev)
        finally:
            self.pending.extend(skipped)

    # -- session and conversation
    def update_session(self, **fields) -> dict:
        ev = self._request({"type": "session.update", "session": fields}, "session.updated")
        if ev.get("type") == "session.updated":
            self.settings.update(fields)
            self.session = ev["session"]
        return ev

    def add_message(self, role: str, content) -> dict:
        event = {"type": "conversation.item.create", "item": {"type": "message", "role": role,
                                                             "content": text_content(content)}}
        ev = self._request(event, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item([event], ev["item"]["id"])
        return ev

    def delete_item(self, item_id: str) -> dict:
        ev = self._request({"type": "conversation.item.delete", "item_id": item_id}, "conversation.item.deleted")
        self._forget(item_id)
        return ev

    def append_audio(self, samples, sample_rate: int | None = None) -> None:
        event = {"type": "input_audio_buffer.append", "audio": pcm16_base64(samples)}
        if sample_rate:
            event["sample_rate"] = int(sample_rate)
        self.send(event)
        self._audio_log.append(event)

    def commit_audio(self) -> dict:
        ev = self._request({"type": "input_audio_buffer.commit"}, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item(self._audio_log + [{"type": "input_audio_buffer.commit"}], ev["item"]["id"])
        self._audio_log = []
        return ev

    def clear_audio(self) -> dict:
        self._audio_log = []
        return self._request({"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared")

    def append_frame(self, image: bytes, capture_time: float) -> None:
        """One webcam frame (JPEG/PNG bytes) with its capture time in seconds."""
        event = {"type": "input_video_buffer.append", "image": base64.b64encode(image).decode(),
                 "capture_time": float(capture_time)}
        self.send(event)
        self._video_log.append(event)

    def commit_video(self) -> dict:
        ev = self._request({"type": "input_video_buffer.commit"}, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item(self._video_log + [{"type": "input_video_buffer.commit"}], ev["item"]["id"])
        self._video_log = []
        return ev

    # -- responses
    def respond(self, **response) -> Iterator[dict]:
        """response.create, then its events up to and including response.done. A refused or
        failed response raises ServerError (raise_errors) or ends with its error event."""
        eid = self.send({"type": "response.create", "response": response})
        while True:
            ev = self._finished(self.recv())
            yield ev
            if ev.get("type") == "response.done" or self._refused(ev, eid):
                return

    def cancel(self, response_id: str | None = None) -> str:
        event = {"type": "response.cancel"}
        if response_id:
            event["response_id"] = response_id
        return self.send(event)


class AsyncRealtimeClient(_Protocol):
    """Async realtime client (websockets.asyncio); the same methods, awaited; respond() and
    events() are async iterators."""

    def __init__(self, url: str, token: str | None = None, raise_errors: bool = True, reconnect_attempts: int = 3,
                 backoff_s: float = 0.2, max_size: int = 64 * 1024 * 1024, open_timeout: float = 10.0):
        super().__init__(url, token, raise_errors, reconnect_attempts, backoff_s, max_size)
        self.open_timeout = open_timeout
        self.ws = None

    async def connect(self) -> dict:
        from websockets.asyncio.client import connect  # noqa: PLC0415

        try:
            self.ws = await connect(self.url, additional_headers=self._headers(), max_size=self.max_size,
                                    open_timeout=self.open_timeout, compression=None)
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            raise ServerError(f"could not open {self.url}: {e}", "connect_failed", status) from e
        first = await self.recv()
        if first.get("type") != "session.created":
            raise ServerError(f"expected session.created, got {first.get('type')}", "protocol_error", event=first)
        self.session = first["session"]
        return self.session

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
        import asyncio  # noqa: PLC0415

        await self.close()
        last: Exception | None = None
        for attempt in range(self.reconnect_attempts):
            try:
                self.pending.clear()
                self.active_response = None
                await self.connect()
                if self.settings:
                    self.session = (await self._request({"type": "session.update", "session": dict(self.settings)},
                                                        "session.updated"))["session"]
                history, self.history = self.history, []
                for entry in history:
                    for e in entry["events"][:-1]:
                        await self.send(dict(e))
                    created = await self._request(dict(entry["events"][-1]), "conversation.item.created")
                    self.history.append({"id": created["item"]["id"], "events": entry["events"]})
                return self.session
            except (ServerError, OSError) as e:
                last = e
                await asyncio.sleep(self.backoff_s * (2 ** attempt))
        raise ConnectionLost(f"could not reconnect: {last}", "reconnect_failed")

    async def send(self, event: dict) -> str:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        event.setdefault("event_id", _event_id())
        if self.ws is None:
            raise ConnectionLost("not connected", "connection_lost")
        try:
            await self.ws.send(json.dumps(event))
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}", "connection_lost") from e
        return event["event_id"]

    async def _raw(self) -> dict:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        if self.ws is None:
            raise ConnectionLost("not connected", "connection_lost")
        try:
            return json.loads(await self.ws.recv())
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}", "connection_lost") from e

    async def recv(self) -> dict:
        if self.pending:
            return self._check(self.pending.popleft())
        return self._check(await self._raw())

    async def events(self) -> AsyncIterator[dict]:
        while True:
            try:
                yield await self.recv()
            except ConnectionLost:
                return

    async def _request(self, event: dict, reply: str, timeout: float = 60.0) -> dict:
        import asyncio  # noqa: PLC0415

        eid = await self.send(event)
        skipped = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ev = await self._raw()
                    if ev.get("type") == reply:
                        return ev
                    if ev.get("type") == "error" and (ev.get("error") or {}).get("event_id") == eid:
                        return self._check(ev)
                    skipped.append(ev)
        except TimeoutError:
            raise ServerError(f"no {reply} within {timeout} s", "timeout") from None
        finally:
            self.pending.extend(skipped)

    async def update_session(self, **fields) -> dict:
        ev = await self._request({"type": "session.update", "session": fields}, "session.updated")
        if ev.get("type") == "session.updated":
            self.settings.update(fields)
            self.session = ev["session"]
        return ev

    async def add_message(self, role: str, content) -> dict:
        event = {"type": "conversation.item.create", "item": {"type": "message", "role": role,
                                                             "content": text_content(content)}}
        ev = await self._request(event, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item([event], ev["item"]["id"])
        return ev

    async def delete_item(self, item_id: str) -> dict:
        ev = await self._request({"type": "conversation.item.delete", "item_id": item_id},
                                 "conversation.item.deleted")
        self._forget(item_id)
        return ev

    async def append_audio(self, samples, sample_rate: int | None = None) -> None:
        event = {"type": "input_audio_buffer.append", "audio": pcm16_base64(samples)}
        if sample_rate:
            event["sample_rate"] = int(sample_rate)
        await self.send(event)
        self._audio_log.append(event)

    async def commit_audio(self) -> dict:
        ev = await self._request({"type": "input_audio_buffer.commit"}, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item(self._audio_log + [{"type": "input_audio_buffer.commit"}], ev["item"]["id"])
        self._audio_log = []
        return ev

    async def append_frame(self, image: bytes, capture_time: float) -> None:
        event = {"type": "input_video_buffer.append", "image": base64.b64encode(image).decode(),
                 "capture_time": float(capture_time)}
        await self.send(event)
        self._video_log.append(event)

    async def commit_video(self) -> dict:
        ev = await self._request({"type": "input_video_buffer.commit"}, "conversation.item.created")
        if ev.get("type") == "conversation.item.created":
            self._log_item(self._video_log + [{"type": "input_video_buffer.commit"}], ev["item"]["id"])
        self._video_log = []
        return ev

    async def respond(self, **response) -> AsyncIterator[dict]:
        eid = await self.send({"type": "response.create", "response": response})
        while True:
            ev = self._finished(await self.recv())
            yield ev
            if ev.get("type") == "response.done" or self._refused(ev, eid):
                return

    async def cancel(self, response_id: str | None = None) -> str:
        event = {"type": "response.cancel"}
        if response_id:
            event["response_id"] = response_id
        return await self.send(event)
