"""The blocking shell: EngineClient (httpx + websockets.sync) and RealtimeClient. Each method moves
bytes and leaves every decision to engine.client.core; aio.py is the same with `await`."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpcore
import httpx

from engine.client import calls, core
from engine.client.core import ChatOptions, ConnectionLost, ModelInfo, ServerError
from engine.events import Done, Error, Event


def hang_up(resp: httpx.Response) -> None:
    """Shut the connection under a streamed answer that is left unfinished (cancelled, or lost) down at once, waking
    the reader thread blocked on it. Closing the stream alone, under that thread's pending read, was not always heard
    by the server: a stopped synthesis went on (the next request waited ~40 s, the stopped one ended 'slow_reader')."""
    stream = resp.extensions.get("network_stream")
    shut_down(stream.get_extra_info("socket") if stream is not None else None)


def shut_down(sock: socket.socket | None) -> None:
    """Both directions of `sock` shut: a thread blocked reading it wakes (its read fails), the server sees it closed."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the server, or by the reader's failure
            pass


def stopped(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def awaited(answer: queue.Queue, seconds: float, cancel: threading.Event | None) -> Any:
    """What `answer` is given within `seconds`; None when they pass first, or as soon as `cancel` is set."""
    deadline = time.monotonic() + seconds
    step = seconds if cancel is None else core.POLL_S  # (no cancel to look at: one wait)
    while not stopped(cancel) and (left := deadline - time.monotonic()) > 0:
        try:
            return answer.get(timeout=min(step, left))
        except queue.Empty:
            continue
    return None


class StopWatch:
    """While open: the socket a websockets connecter opens is shut down as soon as `cancel` is set, so its handshake
    fails at once instead of at its open timeout (nothing is watched without a `cancel`)."""

    def __init__(self, connecter: Any, cancel: threading.Event | None) -> None:
        self.cancel, self.sock, self.over = cancel, None, threading.Event()
        opens = connecter.open_socket

        def open_socket(*args, **kwargs) -> socket.socket:
            self.sock = opens(*args, **kwargs)
            return self.sock

        connecter.open_socket = open_socket

    def _watch(self) -> None:
        while not self.over.wait(core.POLL_S):
            if stopped(self.cancel) and self.sock is not None:  # (a socket still being opened: at its next look)
                shut_down(self.sock)
                return

    def __enter__(self) -> "StopWatch":
        if self.cancel is not None:
            threading.Thread(target=self._watch, name="engine-client-stop-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.over.set()


class Wires(httpcore.NetworkBackend):
    """httpcore's own socket backend, noting the socket each watched thread reads or writes, so that a request given
    up on from another thread (its whole answer late, or stopped: EngineClient._within) is hung up there and then."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
        self._lock = threading.Lock()
        self._in_use: dict[int, socket.socket | None] = {}  # watched thread's ident -> the socket it last used

    def connect_tcp(self, *args, **kwargs) -> httpcore.NetworkStream:
        return WatchedStream(self, self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args, **kwargs) -> httpcore.NetworkStream:
        return WatchedStream(self, self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def under(self, client: httpx.Client) -> httpx.Client:
        """`client` with every connection pool it has (its own, and a proxy's from the environment: HTTPS_PROXY ...)
        opening its connections here. httpcore's pools take a network backend, which httpx does not pass (and a
        transport of our own given to httpx would turn the environment's proxies off)."""
        for transport in (client._transport, *client._mounts.values()):
            pool = getattr(transport, "_pool", None)
            if pool is not None:
                pool._network_backend = self
        return client

    def watch(self) -> None:
        """From now on, note the socket this thread uses (until unwatch())."""
        with self._lock:
            self._in_use[threading.get_ident()] = None

    def unwatch(self) -> None:
        with self._lock:
            self._in_use.pop(threading.get_ident(), None)

    def using(self, stream: httpcore.NetworkStream) -> None:
        with self._lock:
            if threading.get_ident() in self._in_use:
                self._in_use[threading.get_ident()] = stream.get_extra_info("socket")

    def hang_up(self, thread_id: int | None) -> None:
        """Shut the socket the watched thread `thread_id` is using down (it then stops being watched)."""
        with self._lock:
            sock = self._in_use.pop(thread_id, None)
        shut_down(sock)


class WatchedStream(httpcore.NetworkStream):
    """A connection of Wires: each read and write says which thread uses it."""

    def __init__(self, wires: Wires, stream: httpcore.NetworkStream) -> None:
        self._wires, self._stream = wires, stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._wires.using(self._stream)
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._wires.using(self._stream)
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args, **kwargs) -> httpcore.NetworkStream:
        return WatchedStream(self._wires, self._stream.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class RealtimeClient(core.RealtimeClientBase):
    """One realtime session (/v1/realtime): settings, conversation items, audio and webcam buffers, and
    responses streamed as engine events. Requests that the server answers (update_session,
    add_message, commit_audio, ...) return the answering server event, or raise ServerError.
    RealtimeClient(url, token=None, timeout=60, reconnect_attempts=3, backoff_s=0.2, connect_timeout=10): the
    session's opening (handshake and first event) takes at most connect_timeout seconds."""

    # ------------------------------------------------------------------ connection
    def connect(self, cancel: threading.Event | None = None) -> dict:
        """Open the session (its handshake and first event, within connect_timeout). `cancel` set meanwhile gives it up
        at once (core.Stopped), its connection closed: a Stop pressed while a hung engine's handshake was under way
        waited out the whole connect timeout."""
        from websockets.sync.client import connect  # noqa: PLC0415

        connecter = core.without_redirects(connect(self.endpoints.ws, legacy=False, **self._ws_options()))
        try:
            with StopWatch(connecter, cancel):
                self.ws = connecter.connect()
            self.ws.pending_legacy_warning = False  # (what legacy=True says: the connection as connect() gives it)
        except Exception as e:  # refused, unreachable, 401, TLS, no handshake within connect_timeout ...
            if stopped(cancel):
                raise core.Stopped() from e
            raise core.connect_error(self.endpoints.ws, e, core.waited_for(e, self.connect_timeout)) from e
        try:
            return self.state.connected(self._first_event(cancel), self.endpoints.ws)
        except TimeoutError as e:  # (it escaped as a bare TimeoutError, out of chat() too)
            self.close()
            raise core.connect_error(self.endpoints.ws, e, self.connect_timeout) from e

    def _first_event(self, cancel: threading.Event | None) -> dict:
        """The session's first event, within connect_timeout (TimeoutError), or core.Stopped as soon as `cancel` is
        set (the connection closed)."""
        deadline = time.monotonic() + self.connect_timeout
        while not stopped(cancel):
            try:
                return self.recv(timeout=max(0.0, min(core.POLL_S, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
        shut_down(self.ws.socket)  # (closed without its closing handshake, which a hung engine would not answer)
        self.close()
        raise core.Stopped()

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

    def retrieve_item(self, item_id: str) -> dict:
        """The server's view of one conversation item (conversation.item.retrieved's `item`)."""
        ev = self._request({"type": "conversation.item.retrieve", "item_id": item_id})
        return ev["item"]

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
        run = core.realtime_run(final_error_ids, cancel, self.timeout, self.endpoints.ws)
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
    """The engine server, from anywhere: health(), info(), chat(), transcribe(), speak(), imagine()
    returning engine events, and the voice library (voices(), save_voice(), delete_voice(),
    speech_options()). EngineClient(url, token=None, timeout=60, connect_timeout=10) or EngineClient.from_env()
    (ENGINE_URL, ENGINE_TOKEN); `url`: http(s)://HOST:PORT or ws(s)://HOST:PORT (both transports
    derive from it), or openai+http(s)://HOST:PORT for any OpenAI-compatible server (HTTP, OpenAI's
    standard routes only; what it cannot do ends with Error(code="not_supported_by_engine"))."""

    def __init__(self, url: str, token: str | None = None, timeout: float = core.DEFAULT_TIMEOUT,
                 connect_timeout: float = core.CONNECT_TIMEOUT_S):
        super().__init__(url, token, timeout, connect_timeout)
        self._wires = Wires()
        self.http = self._wires.under(httpx.Client(**self._http_options(), limits=httpx.Limits(**core.POOL_LIMITS)))

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
        return RealtimeClient(self.endpoints.ws, self.endpoints.token, self.timeout,
                              connect_timeout=self.connect_timeout)

    def _within(self, seconds: float, ask: Callable[[], Any], abandon: Callable[[Any], None] | None = None,
                cancel: threading.Event | None = None) -> Any:
        """ask() on a thread of its own, its answer within `seconds`: httpx's timeout is for each read, so an answer
        that trickled in a byte at a time (a JSON answer, a stream's head) was waited for as long as it took, minutes
        (the studio's engine check, 10 s at most, too). Past `seconds` it raises httpx.ReadTimeout, and core.Stopped
        as soon as `cancel` is set (a Stop pressed while a stream's head arrived waited out the whole timeout); either
        way the ask's connection is hung up, so its thread ends at once (it went on reading an answer that trickled
        forever, one thread per engine check), and what it gives if it ends anyway is handed to `abandon` (a stream
        opened too late: closed)."""
        answer: queue.Queue = queue.Queue(maxsize=1)
        lock, late = threading.Lock(), threading.Event()

        def run() -> None:
            self._wires.watch()
            try:
                given = (ask(), None)
            except Exception as e:  # noqa: BLE001  (raised in the caller's thread)
                given = (None, e)
            finally:
                self._wires.unwatch()
            with lock:
                if not late.is_set():
                    answer.put(given)
                    return
            if given[1] is None and abandon is not None:
                abandon(given[0])

        asker = threading.Thread(target=run, name="engine-client-request", daemon=True)
        asker.start()
        given = awaited(answer, seconds, cancel)
        if given is None:  # (its time passed, or it was stopped)
            with lock:
                if answer.empty():
                    late.set()
                    self._wires.hang_up(asker.ident)
                    raise core.Stopped() if stopped(cancel) else httpx.ReadTimeout(
                        f"the answer was not whole within {seconds:g} s")
            given = answer.get_nowait()
        result, failed = given
        if failed is not None:
            raise failed
        return result

    def _whole(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, its answer whole within its timeout (_within)."""
        return self._within(kwargs.get("timeout", self.timeout), lambda: self._read(method, path, **kwargs))

    def _read(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request's answer, read whole unless its headers say it is compressed in a way this client did not ask
        for (left unread: httpx decoded a br answer itself when brotli was installed, and one it could not decode was
        said as 'does not decompress', not as compressed otherwise than asked), and refused past core.MAX_ANSWER_BYTES
        (core.WholeAnswer)."""
        resp = self.http.send(self.http.build_request(method, path, **kwargs), stream=True)
        try:
            if not core.unread_encoding(resp.headers):  # read whole, within core.MAX_ANSWER_BYTES
                whole = core.WholeAnswer(self.endpoints.http + path, resp.status_code, resp.headers)
                for piece in resp.iter_bytes():
                    whole.add(piece)
                resp._content = whole.content()  # (what resp.read() keeps: resp.content, .json() read it)
        except httpx.RemoteProtocolError as e:
            raise core.cut_answer(self.endpoints.http + path, resp.status_code, e) from e
        finally:
            resp.close()
        return resp

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            try:
                resp = self._whole(method, path, **kwargs)
            except httpx.RemoteProtocolError:  # closed unanswered: a kept-alive connection the server dropped
                if method != "GET":  # as it was reused (its idle timeout, 5 s for uvicorn: the studio's check period)
                    raise
                resp = self._whole(method, path, **kwargs)  # a GET is asked again, on a fresh connection
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

    def _get(self, path: str, **kwargs) -> Any:
        return self._json("GET", path, **kwargs)

    def _json(self, method: str, path: str, **kwargs) -> Any:
        resp = self._send(method, path, **kwargs)
        return core.json_answer(resp.status_code, resp.content, self.endpoints.http + path,
                                retry_after=resp.headers.get("Retry-After"))

    def health(self, timeout: float | None = None) -> dict:
        """The server's /health (status, model, queue, sessions). Raises ServerError when unreachable.
        `timeout`: seconds it may take (default: the client's)."""
        return self._get("/health", **core.timeout_option(timeout))

    def info(self, timeout: float | None = None) -> ModelInfo:
        """The served model. Raises ServerError (unauthorized, connect_failed, timeout, ...). For an
        OpenAI-compatible backend: its first model, capabilities probed from the routes that answer.
        `timeout`: seconds each of its requests may take (default: the client's)."""
        each = core.timeout_option(timeout)
        if not self.openai:
            return core.models_info(self._get("/v1/models", **each))
        models = self._get("/v1/models", **each)  # each time: a check that the engine still answers
        if self._openai_routes is None:
            found = {}
            for cap, path in calls.OPENAI_PROBES.items():
                resp = self._send("POST", path, json={}, **each)
                found[cap] = calls.probe_found(resp.status_code, resp.content)
            self._openai_routes = found
        self._openai_info = calls.openai_info(models, self._openai_routes)
        return self._openai_info

    def _model(self) -> str | None:
        """The model an OpenAI-compatible backend is asked for (None for our server)."""
        if not self.openai:
            return None
        # (read once, within the connect timeout: a hung backend held each first request 60 s here; the studio's
        # checks read it again)
        return (self._openai_info or self.info(timeout=self.connect_timeout)).id

    def _model_or_error(self) -> tuple[str | None, Error | None]:
        """_model(), or the Error a request ends with when the backend cannot be asked for it."""
        try:
            return self._model(), None
        except ServerError as e:
            return None, e.to_event()

    def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, stop: str | list[str] | None = None, presence_penalty: float | None = None,
             frequency_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
             system: str | None = None, thinking: bool = False, modalities: tuple[str, ...] = ("text",),
             voice: str | None = None, cancel: threading.Event | None = None,
             transport: str = "realtime") -> Iterator[Event]:
        """Stream a reply: QueuePosition, TextDelta, AudioChunk, ... then exactly one Done or Error.
        `messages` use the engine's format (role + content str or parts with image / audio / video as
        bytes, paths or arrays). `transport`: "realtime" (a realtime session per call, taken from a
        small pool of connected sessions and emptied after use) or "http" (/v1/chat/completions;
        larger media). `presence_penalty`, `frequency_penalty` and `logit_bias` ({token id: bias}) are OpenAI's, on
        both transports (the server checks their ranges and refuses a token id the model has not)."""
        model, failed = self._model_or_error()
        if failed is not None:
            yield failed
            return
        if self._speech_rate_unknown(modalities):
            try:  # (as long as a session's opening may take: a hung engine held a spoken chat 60 s here first)
                self._speech_rate = (self.info(timeout=self.connect_timeout)).speech_sample_rate or 0
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
            yield from self._http_chat(request, cancel)
            return
        ids = {e["event_id"] for e in request}
        while True:  # at most twice: a pooled session found dead is replaced by a fresh one
            rt = self._sessions.take()
            for old in self._sessions.retired():
                old.close()
            pooled = rt is not None
            if rt is None:
                rt = self.realtime()
                try:
                    rt.connect(cancel)
                except core.Stopped:
                    yield Done(text="", finish_reason="cancelled")
                    return
                except ServerError as e:
                    full = e.code == core.SESSIONS_FULL  # (then over HTTP: it waits in the engine's line)
                    over_http = core.chat_request(messages, opts, "http", model) if full else None
                    yield from (self._http_chat(over_http, cancel) if isinstance(over_http, dict) else [e.to_event()])
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

    def _http_chat(self, body: dict, cancel) -> Iterator[Event]:
        """A chat-completions request streamed as engine events."""
        decoder = core.wire.SseDecoder(strict=not self.openai)
        return self._call(calls.HttpCall("POST", "/v1/chat/completions", {"json": body}, "sse", decoder), cancel)

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
        model, failed = self._model_or_error()
        if failed is not None:
            yield failed
            return
        request = core.transcription_request(audio, sample_rate, context, hotwords, dialect, max_tokens, model)
        if isinstance(request, Error):
            yield request
            return
        decoder = core.wire.SseDecoder(strict=not self.openai)
        yield from self._call(calls.HttpCall("POST", "/v1/audio/transcriptions", request, "sse", decoder), cancel)

    def translate(self, audio: Any, *, context: str | None = None, hotwords: list[str] | None = None,
                  sample_rate: int | None = None, max_tokens: int | None = None,
                  cancel: threading.Event | None = None) -> Iterator[Event]:
        """Speech translation into English (/v1/audio/translations): one Done whose `result` holds
        {"language": "English", "text"} (or Error); not streamed, as OpenAI's translations. `audio`, `context` and
        `hotwords` as transcribe's."""
        model, failed = self._model_or_error()
        call = calls.translation_call(audio, sample_rate, context, max_tokens, model, hotwords)
        yield from self._call(failed or call, cancel)

    # ------------------------------------------------------------------ speech, voices, images
    def speak(self, text: str = "", *, task: str = "tts", voice: str | None = None, reference_audio: Any = None,
              reference_text: str | None = None, instruct: dict | str | None = None, music: dict | None = None,
              seed: int | None = None, max_seconds: float | None = None,
              cancel: threading.Event | None = None) -> Iterator[Event]:
        """Speech, sound or music: QueuePosition, AudioChunk (PCM16 mono at the talker's true rate, each
        with the text span it starts speaking) ..., then Done (time to first audio, audio seconds, RTF;
        `result`: sample_rate, fragments, `ref_text_from_asr` when our ASR filled in the transcript of
        `reference_audio`, `sample_rate_note` when the server named no rate and 24 kHz was assumed) or Error.
        task: tts | sound | music | podcast; voice: a saved voice's name; reference_audio: an audio file
        (bytes, path, data: URL) or (samples, sample_rate), or a list (podcast: one per speaker); instruct:
        {dialect, emotion, speed, pitch, volume, ip, style, bgm} or "key=value,..."; music: {genre, mood,
        instrument, theme, duration}."""
        model, failed = self._model_or_error()
        call = failed or calls.speech_call(text, task, voice, reference_audio, reference_text, instruct, music, seed,
                                 max_seconds, model)
        yield from self._call(call, cancel)

    def voices(self, timeout: float | None = None) -> list[dict]:
        """The saved voices: [{name, reference_text, seconds, speakers, created}]. Raises ServerError (code timeout
        when `timeout` seconds pass without the list; default: the client's timeout)."""
        self._refuse_on_openai("the voice library")
        return self._get(calls.VOICES_PATH, **core.timeout_option(timeout))["data"]

    def save_voice(self, name: str, reference_audio: Any, reference_text: str | None = None,
                   replace: bool = False) -> dict:
        """Clone a voice from a clip (an audio file, or (samples, sample_rate)) and keep it under `name`;
        without `reference_text` our ASR transcribes the clip (`ref_text_from_asr` then holds its text). A
        voice already saved under `name` is replaced only with `replace` (else ServerError voice_exists)."""
        self._refuse_on_openai("the voice library")
        try:
            upload = calls.voice_upload(name, reference_audio, reference_text, replace)
        except ValueError as e:
            raise ServerError(str(e), "invalid_request") from None
        return self._json("POST", calls.VOICES_PATH, **upload)

    def delete_voice(self, name: str) -> dict:
        self._refuse_on_openai("the voice library")
        return self._json("DELETE", f"{calls.VOICES_PATH}/{quote(name, safe='')}")

    def speech_options(self, timeout: float | None = None) -> dict:
        """What speak() takes: tasks, dialect / emotion / speed / pitch / volume aliases, BGM and music
        fields, formats, limits, the talker's sample rate. `timeout`: seconds it may take (default: the client's)."""
        self._refuse_on_openai("the speech options")
        return self._get(calls.SPEECH_OPTIONS_PATH, **core.timeout_option(timeout))

    def imagine(self, prompt: str, *, task: str = "generate", images: list | None = None, size: str | None = None,
                aspect: str | None = None, steps: int | None = None, guidance: float | None = None,
                seed: int | None = None, preview_every: int | None = None, preset: str | None = None,
                mask_color: str | None = None, n: int = 1, cfg_truncation: float | None = None,
                cfg_normalization: bool | float | None = None, image_guidance: float | None = None,
                negative_prompt: str | None = None, mask=None,
                cancel: threading.Event | None = None) -> Iterator[Event]:
        """Generate, edit (images: the first is the reference) or segment (prompt = the target) images:
        QueuePosition, Progress, ImagePreview every `preview_every` steps, ImageDone (PNG; segmentation
        adds mask and overlay PNGs and a note when the mask is empty) per image, then Done or Error.
        `image_guidance`: an edit's or a segmentation's reference-picture guidance, on a Preview engine (its card's
        image_defaults name it; a 2.0 engine refuses it). `negative_prompt`: what the picture should not show, on a
        Preview engine (a 2.0 engine refuses it: its pipeline guides against zeros whatever the negative prompt).
        `mask`: an edit's mask (a picture of the first one's size, transparent where to edit: the edit is kept there)."""
        model, failed = self._model_or_error()
        call = failed or calls.image_call(prompt, task, images, size, aspect, steps, guidance, seed, preview_every,
                                          preset, mask_color, n, model, cfg_truncation, cfg_normalization,
                                          image_guidance, negative_prompt, mask)
        yield from self._call(call, cancel)

    def _call(self, call: calls.HttpCall | Error, cancel) -> Iterator[Event]:
        """Send an HttpCall and read its answer as engine events; cancel closes the stream (the server
        then stops the request, queued or running)."""
        if isinstance(call, Error):
            yield call
            return
        if call.read == "json":
            try:
                resp = self._send(call.method, call.path, **call.kwargs)
                events = call.parse(core.json_answer(resp.status_code, resp.content, self.endpoints.http + call.path,
                                                      retry_after=resp.headers.get("Retry-After")))
            except ServerError as e:
                events = [e.to_event()]
            except core.UnknownEventError as e:
                events = [Error(f"the server sent something this client does not understand: {e}", "protocol_error")]
            yield from events
            return
        run = core.sse_run(cancel, self.timeout, call.decoder, self.endpoints.http + call.path)
        lines: queue.Queue = queue.Queue()
        clock = self._arrival_clock()
        answered = False  # the server ended the answer itself (else this end hangs up)
        try:
            stream = self.http.stream(call.method, call.path, **call.kwargs)
            resp = self._within(self.timeout, stream.__enter__, lambda _: stream.__exit__(None, None, None), cancel)
            clock.opened()
        except core.Stopped:  # (Stop pressed before the answer's head was whole: its connection is hung up)
            yield from run.cancelled()
            return
        except httpx.HTTPError as e:  # (a timeout: no answer within the client's timeout)
            waited = self.timeout if isinstance(e, httpx.TimeoutException) else None
            yield core.connect_error(self.endpoints.http + call.path, e, waited).to_event()
            return
        try:
            if core.is_redirect(resp.status_code):  # (it read "the stream ended without a result")
                yield core.redirect_error(self.endpoints.http + call.path, resp.status_code,
                                          resp.headers.get("Location")).to_event()
                return
            if unread := core.unread_encoding(resp.headers):  # (its bytes read as garbage lines)
                yield core.undecodable(self.endpoints.http + call.path, unread).to_event()
                return
            if resp.status_code >= 400 or core.is_html(resp.headers.get("content-type", "")):  # (not a stream)
                answered = True
                resp.read()
                yield core.json_error_event(resp.status_code, resp.content, self.endpoints.http + call.path,
                                            resp.headers.get("Retry-After"))
                return
            calls.note_answer_rate(call.decoder, resp.headers)

            def pump() -> None:
                pieces = core.stream_reader(call.read, self.endpoints.http + call.path)
                try:
                    for data in resp.iter_bytes():
                        for piece in pieces(data):
                            clock.arrived()
                            lines.put(("data", piece))
                    lines.put(("end", None))
                except httpx.DecodingError as e:  # (not a lost connection: its compressed bytes are broken)
                    lines.put(("lost", core.undecodable(self.endpoints.http + call.path,
                                                        resp.headers.get("content-encoding"), e)))
                except ServerError as e:  # (a line longer than this client accepts)
                    lines.put(("lost", e))
                except Exception as e:  # closed by a cancel, read timeout, connection dropped
                    timed_out = isinstance(e, httpx.TimeoutException)
                    lines.put(("lost", core.stream_lost(e, self.timeout, timed_out)))

            threading.Thread(target=pump, name="engine-client-http", daemon=True).start()
            while not run.finished:
                if run.cancel_due():
                    yield from run.cancelled()
                    return
                try:
                    kind, value = lines.get(timeout=core.POLL_S)
                except queue.Empty:
                    continue
                if kind == "data":
                    out = run.on_event(value)
                else:
                    answered = kind == "end"
                    out = run.on_end() if answered else run.on_lost(value)
                if run.finished:  # (before its last event: a caller may stop reading at Done)
                    self._note_arrivals(clock, out)
                yield from out
        finally:  # closing the stream stops the request on the server (queued or running)
            if not answered:
                hang_up(resp)
            try:
                stream.__exit__(None, None, None)
            except Exception:  # noqa: BLE001  the reader thread may be failing on the same socket
                pass
