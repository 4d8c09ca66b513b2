"""The Live tab's media path: a websocket route on the studio's own server that relays the
realtime protocol between the page and the engine's `/v1/realtime`.

The page never sees the engine's address or token: the route opens the engine socket itself and
adds `Authorization: Bearer <token>` there. When the studio has a login (`--auth`), the route
requires it (Gradio's session cookie), and it refuses pages of another site (the Origin header),
so a web page elsewhere cannot drive the model through a logged-in browser. Closing either side
closes the other, so a closed tab leaves nothing running on the engine (which cancels the
session's response when its socket closes). One live session per browser: a second tab (or window)
of the same browser takes over and the first is told so; two browsers logged in with the same login (a
Space's one STUDIO_AUTH shared by its visitors) each keep their own.

Install it when launching Gradio (routes given to the app come before Gradio's own):

    proxy = LiveProxy(lambda: (engine_url, engine_token))
    demo.launch(..., app_kwargs=proxy.app_kwargs())

Problems reach the page as realtime `error` events with these codes: `engine_unreachable`,
`engine_unauthorized`, `engine_closed`, `live_session_replaced`, `login_required`,
`binary_not_supported`, `message_too_large`. Text events pass through as they are (the engine refuses
text that is not valid Unicode with `invalid_text` and the session carries on); a text frame that is
not UTF-8 is closed with 1007 by the websocket layer, which costs one log line here, not uvicorn's
stack trace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from typing import Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

import anyio
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine.client.core import connect_error, redirect_answer, tls_failure, waited_for, without_redirects

log = logging.getLogger("app.live_proxy")

LIVE_WS_PATH = "/live/realtime"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a browser event (frames are ~50-150 KB, audio chunks ~10 KB)
OPEN_TIMEOUT_S = 10.0
CLOSE_REPLACED = 4000  # websocket close codes the page understands (4000-4999 are for applications)
CLOSE_ENGINE = 4001
CLOSE_LOGIN = 4003
LOCALHOST_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}

EngineTarget = Callable[[], "tuple[str, str | None]"]


class QuietInvalidFrames(logging.Filter):
    """Drops uvicorn's stack trace for a websocket text frame that is not UTF-8 (a client's fault, not
    the studio's: the relay logs one line for it instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Invalid UTF-8 sequence received"))


def quiet_invalid_frames() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietInvalidFrames) for f in logger.filters):
        logger.addFilter(QuietInvalidFrames())


def realtime_url(base: str) -> str:
    """The engine's realtime endpoint from its base URL: ws(s)://HOST:PORT[/prefix] (http(s) is
    turned into ws(s)); a URL that already ends in /v1/realtime is kept."""
    parts = urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"engine URL {base!r} must look like ws://HOST:PORT (or http://, https://, wss://)")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/realtime"):
        path += "/v1/realtime"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


ERROR_TYPES = {"login_required": "authentication_error", "binary_not_supported": "invalid_request_error",
               "message_too_large": "invalid_request_error"}  # OpenAI's error types; the rest are server_error


def error_event(code: str, message: str) -> str:
    kind = ERROR_TYPES.get(code, "server_error")
    return json.dumps({"type": "error", "event_id": f"event_proxy_{secrets.token_hex(4)}",
                       "error": {"type": kind, "code": code, "message": message, "param": None}})


def _is_local(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOCALHOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(headers, extra_origins: tuple[str, ...] = ()) -> bool:
    """The page opening the socket is the studio's own: no Origin (not a browser), the same
    host:port as the request (or its X-Forwarded-Host), both on this machine, or listed."""
    origin = headers.get("origin")
    if not origin:
        return True
    if origin in extra_origins:
        return True
    netloc = urlsplit(origin).netloc.lower()
    hosts = {h.strip().lower() for h in (headers.get("host"), headers.get("x-forwarded-host")) if h}
    if netloc in hosts:
        return True
    origin_host = urlsplit(origin).hostname
    return _is_local(origin_host) and all(_is_local(urlsplit(f"//{h}").hostname) for h in hosts)


async def studio_user(ws: WebSocket) -> tuple[bool, str | None]:
    """(allowed, user name) under the studio's Gradio login; (True, None) when there is none."""
    app = ws.scope.get("app")
    auth, dependency = getattr(app, "auth", None), getattr(app, "auth_dependency", None)
    if auth is None and dependency is None:
        return True, None
    if dependency is not None:
        try:
            user = dependency(ws)
            user = await user if asyncio.iscoroutine(user) else user
        except Exception:  # a dependency written for HTTP requests only
            log.exception("the studio's auth_dependency failed on the live websocket")
            user = None
        return user is not None, user
    cookie_id = getattr(app, "cookie_id", "")
    token = ws.cookies.get(f"access-token-{cookie_id}") or ws.cookies.get(f"access-token-unsecure-{cookie_id}")
    user = getattr(app, "tokens", {}).get(token) if token else None
    return user is not None, user


def unreachable_text(url: str, failure: BaseException, open_timeout: float) -> str:
    """Why the engine's realtime socket did not open: an engine that took the connection and did not answer, a TLS
    certificate this machine does not trust, an address that redirects (to https://: "InvalidURI"), or one whose
    answer is not a websocket handshake's (an HTTP/1.0 server, another protocol; "InvalidMessage"), said as the
    client says them (each read "cannot reach the engine ... is it running?", of an engine that was running), else
    the engine not reachable."""
    if (isinstance(failure, TimeoutError) or tls_failure(failure) is not None or redirect_answer(failure) is not None
            or type(failure).__name__ == "InvalidMessage"):  # (answered, though not as a websocket: not "running?")
        return connect_error(url, failure, waited_for(failure, open_timeout)).message
    return f"cannot reach the engine at {urlsplit(url).netloc} ({type(failure).__name__}); is it running?"


class LiveProxy:
    """The relay route and its bookkeeping (`active`: the live sessions open now, by user)."""

    def __init__(self, target: EngineTarget, path: str = LIVE_WS_PATH, *, allow_origins: tuple[str, ...] = (),
                 max_message_bytes: int = MAX_MESSAGE_BYTES, open_timeout: float = OPEN_TIMEOUT_S):
        self.target = target
        self.path = path
        self.allow_origins = tuple(allow_origins)
        self.max_message_bytes = max_message_bytes
        self.open_timeout = open_timeout
        self.active: dict[str, asyncio.Event] = {}  # owner -> the stop signal of their live session
        quiet_invalid_frames()

    def route(self) -> WebSocketRoute:
        return WebSocketRoute(self.path, self.endpoint, name="live_realtime")

    def app_kwargs(self, app_kwargs: dict | None = None) -> dict:
        """`demo.launch(app_kwargs=...)` with this route added to the app's routes."""
        kwargs = dict(app_kwargs or {})
        kwargs["routes"] = [*kwargs.get("routes", []), self.route()]
        return kwargs

    # ------------------------------------------------------------------ one connection
    async def endpoint(self, ws: WebSocket) -> None:
        if not origin_allowed(ws.headers, self.allow_origins):
            log.warning("live websocket refused: page origin %r is not this studio", ws.headers.get("origin"))
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept()
        allowed, user = await studio_user(ws)
        if not allowed:
            await self._close(ws, "login_required", "log in to the studio first (the login has expired or is "
                              "missing); then press Start again", CLOSE_LOGIN)
            return
        owner = self._owner(ws, user)
        previous = self.active.get(owner)
        stop = asyncio.Event()  # set when another tab of the same user takes over
        self.active[owner] = stop
        if previous is not None:
            previous.set()
        try:
            await self._relay(ws, stop)
        finally:
            if self.active.get(owner) is stop:
                del self.active[owner]

    @staticmethod
    def _owner(ws: WebSocket, user: str | None) -> str:
        """Whose session this is: the browser's own id (?client=) under its login, if any. (By the login alone, one
        visitor's Start stopped another's session wherever visitors share a login, as a Space's STUDIO_AUTH is.)"""
        login = f"user:{user}/" if user is not None else ""
        client = parse_qs(ws.scope.get("query_string", b"").decode("latin-1")).get("client", [""])[0]
        if client and len(client) <= 64 and client.replace("-", "").replace("_", "").isalnum():
            return f"{login}browser:{client}"
        return f"{login}socket:{id(ws)}"  # unknown browser: no takeover

    async def _close(self, ws: WebSocket, code: str, message: str, close_code: int) -> None:
        try:
            if ws.application_state == WebSocketState.CONNECTED:
                await ws.send_text(error_event(code, message))
                await ws.close(code=close_code, reason=code)
        except (RuntimeError, WebSocketDisconnect, OSError):
            pass  # already gone

    async def _relay(self, ws: WebSocket, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect  # noqa: PLC0415
        from websockets.exceptions import InvalidStatus, WebSocketException  # noqa: PLC0415

        try:
            base, token = self.target()
            url = realtime_url(base)
        except Exception as e:  # no engine configured, or a malformed URL
            await self._close(ws, "engine_unreachable", f"the studio has no usable engine address: {e}", CLOSE_ENGINE)
            return
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            upstream = await without_redirects(connect(url, additional_headers=headers, open_timeout=self.open_timeout,
                                                       max_size=self.max_message_bytes * 4, ping_interval=20,
                                                       ping_timeout=20, close_timeout=3,
                                                       proxy=None if _is_local(urlsplit(url).hostname) else True))
        except InvalidStatus as e:
            status = e.response.status_code
            if status == 401:
                await self._close(ws, "engine_unauthorized", "the engine refused the studio's token (check "
                                  "--engine-token / ENGINE_TOKEN)", CLOSE_ENGINE)
            elif 200 <= status < 300:  # answered as a plain request: nothing refused it (it read "the engine refused
                #                        the live session: HTTP 200 ..."): a proxy that does not pass websockets on
                await self._close(ws, "engine_unreachable", connect_error(url, e).message, CLOSE_ENGINE)
            else:  # the engine's own words (it read "the engine answered HTTP 503 to the live session" when the
                #       engine had all its sessions open: "too many realtime sessions ...; try again later")
                await self._close(ws, "engine_unreachable", f"the engine refused the live session: "
                                  f"{connect_error(url, e).message}", CLOSE_ENGINE)
            return
        except (OSError, TimeoutError, WebSocketException) as e:
            await self._close(ws, "engine_unreachable", unreachable_text(url, e, self.open_timeout), CLOSE_ENGINE)
            return
        browser_gone = asyncio.Event()
        tasks = (asyncio.create_task(self._browser_to_engine(ws, upstream, browser_gone)),
                 asyncio.create_task(self._engine_to_browser(ws, upstream)), asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with anyio.CancelScope(shield=True):  # even when the server cancels this handler
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await upstream.close()  # the engine ends the session and cancels its response
                if stop.is_set():
                    await self._close(ws, "live_session_replaced", "Live was started in another tab or window; it "
                                      "stopped here (press Start to take it back)", CLOSE_REPLACED)
                elif not browser_gone.is_set():
                    code = upstream.close_code
                    reason = f" (code {code}{': ' + upstream.close_reason if upstream.close_reason else ''})"
                    await self._close(ws, "engine_closed", "the engine closed the live session" + (
                        reason if code not in (None, 1000) else ""), CLOSE_ENGINE)

    async def _browser_to_engine(self, ws: WebSocket, upstream, browser_gone: asyncio.Event) -> None:
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    if msg.get("code") == 1007:
                        log.info("client abort (invalid_utf8_frame): a live page sent a text frame that is not UTF-8 "
                                 "(the connection was closed with 1007)")
                    browser_gone.set()
                    return
                text = msg.get("text")
                if text is None:
                    await ws.send_text(error_event("binary_not_supported", "send JSON text events (media as "
                                                   "base64 fields), not binary frames"))
                    continue
                if len(text) > self.max_message_bytes:
                    await ws.send_text(error_event("message_too_large", f"an event of {len(text)} characters; "
                                                   f"the limit is {self.max_message_bytes} bytes"))
                    continue
                await upstream.send(text)
        except (WebSocketDisconnect, RuntimeError):
            browser_gone.set()

    async def _engine_to_browser(self, ws: WebSocket, upstream) -> None:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        try:
            async for message in upstream:
                if isinstance(message, bytes):
                    continue  # the realtime protocol is JSON text only
                await ws.send_text(message)
        except ConnectionClosed:
            pass
