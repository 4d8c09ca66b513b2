"""The ASGI app (HTTP API + realtime websocket on one port) and a handle to run it with uvicorn,
in the foreground (`python -m engine.server`) or on a background thread (tests, benchmarks, UI).
`openai_only`: OpenAI's routes and shapes only (no realtime route, no extension routes or fields)."""

from __future__ import annotations

import functools
import json
import threading
import time
from contextlib import asynccontextmanager
from urllib.parse import unquote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.websockets import WebSocket

from engine.runtime import Engine
from engine.server.auth import check_bind, check_token
from engine.server.context import ServerContext
from engine.server import images_api, logs, speech_api
from engine.server.bodies import ClientGone
from engine.server.http_api import error_response, retry_headers, router
from engine.server.http_protocol import OpenAIErrorsH11Protocol, http10_transfer_encoding
from engine.server.lingering import Linger
from engine.server.limits import ApiError, Limits
from engine.server.realtime import check_handshake, realtime_endpoint, refuse_handshake
from engine.server.sessions import new_id
from engine.server.text import check_url_text
from engine.server.ws_protocol import OpenAIErrorsWebSocketProtocol

OPEN_PATHS = ("/health",)


class GateMiddleware:
    """Every HTTP request: a URL that is valid text (invalid_text, engine.server.text), and with a token,
    the token (every path but /health); every answer names the request (`x-request-id`, which OpenAI's SDK
    reads as `_request_id` and an error's `request_id`) and the server's time on it until the answer's head
    (`openai-processing-ms`). Websockets are checked by their endpoint, which answers the handshake with the
    same errors."""

    def __init__(self, app, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = origin_form(scope)
        if scope["type"] == "http":
            scope["ming.request_id"] = new_id("req")  # (in place: the crash handler, outside, reads it too)
            send = with_request_headers(send, scope["ming.request_id"])
            if (b"expect", b"100-continue") in ((k.lower(), v.lower()) for k, v in scope["headers"]):
                receive, send = closing_unless_continued(receive, send)
            refusal = None
            try:
                check_http_version(scope)
                check_url_text(scope)
                check_framing(scope)
                check_request_target(scope)
                if scope["path"] not in OPEN_PATHS:
                    check_token(scope, self.ctx.token)
            except ApiError as e:
                refusal = e
            if refusal is not None:
                body = json.dumps({"error": refusal.to_openai()}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if refusal.status == 401:
                    headers.append((b"www-authenticate", b"Bearer"))
                if refusal.code == "invalid_http_request":  # (its body's end cannot be told: nothing after it is read)
                    headers.append((b"connection", b"close"))
                headers += [(k.lower().encode(), v.encode()) for k, v in retry_headers(refusal.status).items()]
                await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            if scope["raw_path"] == ASTERISK:  # OPTIONS * (RFC 9110 §9.3.7): what the server as a whole takes
                allow = ", ".join(served_methods(scope["app"])).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"allow", allow), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            if scope["method"] == "HEAD":  # a GET resource answers HEAD (RFC 9110 §9.3.2): the GET's head, no body
                scope, send = {**scope, "method": "GET", "ming.head": True}, without_body(send)
        await self.app(scope, receive, send)


def origin_form(scope: dict) -> dict:
    """The request with an absolute-form target (`GET http://host/v1/models`, as a client speaking to a proxy sends;
    `ws://host/v1/realtime` for a websocket) read as its path, which a server must accept (RFC 9112 §3.2.2): it was a
    404 naming '/http://host/v1/models'."""
    raw = scope.get("raw_path") or b""
    scheme, sep, rest = raw.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https", b"ws", b"wss"):
        return scope
    raw_path = b"/" + rest.partition(b"/")[2]
    return {**scope, "raw_path": raw_path, "path": unquote(raw_path.decode("ascii"))}


ASTERISK = b"*"  # the request target that names the server as a whole (RFC 9112 §3.2.4): OPTIONS only


def check_request_target(scope: dict) -> None:
    """Refuse CONNECT (501: this server is no proxy, it opens no tunnel) and an asterisk-form target with any method
    but OPTIONS (400): both met a 404 naming a route '/host:443' or '/*' that no client had asked for."""
    target = scope["raw_path"].decode("latin-1")
    if scope["method"] == "CONNECT":
        raise ApiError(f"CONNECT {target}: this server is not a proxy and opens no tunnel; send requests to its routes "
                       "(GET /v1/models lists the model)", code="method_not_allowed", status=501)
    if scope["raw_path"] == ASTERISK and scope["method"] != "OPTIONS":
        raise ApiError(f"{scope['method']} *: the target '*' is for OPTIONS only; send the request to a route",
                       code="invalid_http_request", status=400)


SPOKEN_HTTP_VERSIONS = ("1.0", "1.1")


def check_http_version(scope: dict) -> None:
    """Refuse a request line naming an HTTP version this server does not speak (505, RFC 9110 §15.6.6): h11 read
    'HTTP/2.0' as HTTP/1.1, so an HTTP/2 client's preface ('PRI * HTTP/2.0') met a 404 for the route '/*' and a
    request line 'GET /health HTTP/3.0' was served."""
    if scope["http_version"] not in SPOKEN_HTTP_VERSIONS:
        raise ApiError(f"the request is HTTP/{scope['http_version']}; this server speaks HTTP/1.1 (and 1.0): send the "
                       "request over HTTP/1.1 (an HTTP/2 client: without prior knowledge)",
                       code="invalid_http_request", status=505)


def check_framing(scope: dict) -> None:
    """Refuse a request whose body's length two headers give: Transfer-Encoding and Content-Length together (RFC 9112
    §6.3: request smuggling's shape; h11 read the chunks and kept the connection, where the RFC says it must close),
    and an HTTP/1.0 request with a Transfer-Encoding (RFC 9112 §6.1: its framing is faulty; h11 read the chunks)."""
    names = {name.lower() for name, _ in scope["headers"]}
    if b"transfer-encoding" in names and scope["http_version"] == "1.0":
        raise http10_transfer_encoding()
    if b"transfer-encoding" in names and b"content-length" in names:
        raise ApiError("the request is not valid HTTP/1.1: it has both Transfer-Encoding and Content-Length, which "
                       "disagree on where its body ends; send one of them", code="invalid_http_request", status=400)


def with_request_headers(send, request_id: str):
    """An ASGI send that adds `x-request-id` and `openai-processing-ms` to the response's head."""
    started = time.perf_counter()

    async def send_named(message):
        if message["type"] == "http.response.start":
            ms = str(round(1000 * (time.perf_counter() - started)))
            headers = [h for h in message.get("headers", []) if h[0].lower() not in (b"x-request-id",
                                                                                    b"openai-processing-ms")]
            message = {**message, "headers": headers + [(b"x-request-id", request_id.encode()),
                                                        (b"openai-processing-ms", ms.encode())]}
        await send(message)

    return send_named


def closing_unless_continued(receive, send):
    """An ASGI (receive, send) for a request with 'Expect: 100-continue': an answer given before the app asked for the
    body (so before uvicorn sent the 100) says 'Connection: close'. Its client may leave the body out (RFC 9110
    §10.1.1), and a connection kept alive read its next request as that body (RFC 9110: a server answering before the
    content says whether it will close or read on)."""
    continued = False

    async def receive_continued():
        nonlocal continued
        continued = True
        return await receive()

    async def send_closing(message):
        headers = message.get("headers", [])
        if message["type"] == "http.response.start" and not continued and not any(
                name.lower() == b"connection" for name, _ in headers):
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return receive_continued, send_closing


def without_body(send):
    """An ASGI send that passes a response's status and headers (Content-Length as the GET's) and drops its
    body: HEAD's answer. FastAPI's routes, unlike starlette's, do not take HEAD themselves."""

    async def send_head(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


def create_app(engine: Engine, limits: Limits | None = None, token: str | None = None,
               model_id: str | None = None, openai_only: bool = False) -> FastAPI:
    ctx = ServerContext.create(engine, limits, token, model_id, openai_only)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.scheduler.close()

    # (no redirect_slashes: starlette answered a route with a trailing '/' with a bodiless 307 to a URL built from
    # the request's Host header; the 404 below names the route instead)
    app = FastAPI(title="Ming Omni Studio server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.ctx = ctx
    for r in (router, speech_api.router, images_api.router):
        app.include_router(r)
    if not openai_only:
        app.include_router(speech_api.extension_router)
        app.include_router(images_api.extension_router)
        app.add_api_websocket_route("/v1/realtime", realtime_endpoint)
        app.add_api_route("/v1/realtime", realtime_without_upgrade, methods=["GET"], include_in_schema=False)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        logs.client_aborted(ctx, exc.kind, exc.detail)
        return Response(status_code=400)  # no one is there to read it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = exc.detail
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and headers.get("Allow"):
            allowed = [m.strip() for m in headers["Allow"].split(",")]
            if "GET" in allowed and "HEAD" not in allowed:  # (GateMiddleware answers HEAD for every GET)
                allowed.append("HEAD")
            headers["Allow"] = ", ".join(allowed)
            detail += f" (this route takes {headers['Allow']})"
        if exc.status_code == 404:  # (OpenAI's embeddings, responses, files ...: say what is served instead)
            detail = f"this server has no such route; it serves {', '.join(served_routes(request.app))}"
            if (route := route_without_slash(request.app, request.scope)) is not None:
                detail = f"this server has no such route; send the request to {route} (without the trailing '/')"
        method = "HEAD" if request.scope.get("ming.head") else request.method
        response = error_response(ApiError(f"{method} {request.url.path}: {detail}", code=code,
                                           status=exc.status_code))
        response.headers.update(headers)  # a 405's Allow (RFC 9110 §15.5.6)
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        # starlette raises the exception again once this answer is sent, and uvicorn then closes the
        # connection: 'Connection: close' tells the client so (RFC 9112 §9.6), else its next request on
        # the kept-alive connection meets a reset
        # (starlette sends this answer outside GateMiddleware: it names the request itself)
        named = {"x-request-id": request.scope["ming.request_id"]} if "ming.request_id" in request.scope else {}
        return JSONResponse({"error": ApiError(f"internal error: {type(exc).__name__}", code="server_error",
                                               status=500).to_openai()}, status_code=500,
                            headers={"Connection": "close", **named, **retry_headers(500)})

    app.router.default = websocket_not_found(app, app.router.default)
    app.add_middleware(GateMiddleware, ctx=ctx)
    logs.install()
    return app


def served_routes(app: FastAPI) -> list[str]:
    """'POST /v1/chat/completions', ...: the /v1 routes of this app (the websocket's as 'WS /v1/realtime'),
    those of its included routers too."""
    return list(dict.fromkeys(f"{'/'.join(sorted(getattr(route, 'methods', None) or ['WS']))} {route.path_format}"
                              for route in every_route(app.routes)
                              if getattr(route, "include_in_schema", True) and route.path_format.startswith("/v1/")))


def every_route(routes):
    """The routes of an app's `routes`, those of its included routers too."""
    for route in routes:
        if hasattr(route, "original_router"):  # an included router
            yield from every_route(route.original_router.routes)
        else:
            yield route


def served_methods(app: FastAPI) -> list[str]:
    """The methods some route of this app takes, HEAD with GET (GateMiddleware answers it), and OPTIONS (for '*')."""
    methods = {method for route in every_route(app.routes) for method in getattr(route, "methods", None) or ()}
    return sorted(methods | {"HEAD", "OPTIONS"} if "GET" in methods else methods | {"OPTIONS"})


def route_without_slash(app: FastAPI, scope: dict) -> str | None:
    """The path a request meant when its path is a served route's with trailing '/'s (None otherwise)."""
    path = scope["path"].rstrip("/")
    if not path or path == scope["path"]:
        return None
    meant = {**scope, "path": path}
    return path if any(route.matches(meant)[0] is not Match.NONE for route in app.router.routes) else None


def websocket_not_found(app: FastAPI, not_found):
    """The router's answer to a request no route takes (`not_found`: starlette's): a websocket handshake at a
    path with no websocket route is refused with OpenAI's error body, after the gate an HTTP request meets (its
    URL, the token), rather than starlette's bare 403 that said nothing of why."""

    async def answer(scope, receive, send):
        if scope["type"] != "websocket":
            await not_found(scope, receive, send)
            return
        ws = WebSocket(scope, receive, send)
        ctx: ServerContext = app.state.ctx
        try:
            check_handshake(scope, ctx.token)
            websockets = [route for route in served_routes(app) if route.startswith("WS ")]
            raise ApiError(f"WS {scope['path']}: this server has no websocket at this path; "
                           + (f"it serves {', '.join(websockets)}" if websockets else "it serves none"),
                           code="not_found", status=404)
        except ApiError as refusal:
            await refuse_handshake(ws, refusal)

    return answer


async def realtime_without_upgrade(request: Request):
    """GET /v1/realtime as a plain HTTP request (no websocket upgrade): 426 saying how to connect, not a
    404 that reads as if the route were missing."""
    err = ApiError("/v1/realtime is a websocket endpoint: connect with a websocket client (ws:// or wss://, "
                   "'Connection: Upgrade', 'Upgrade: websocket'); this request asked for no upgrade",
                   code="upgrade_required", status=426)
    response = error_response(err)
    response.headers.update({"Upgrade": "websocket", "Connection": "Upgrade"})
    return response


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    limits: Limits = app.state.ctx.limits
    # frames over the per-event limit up to Limits.max_frame_bytes still reach the app (and get a structured error);
    # larger ones are closed by the protocol layer with code 1009
    stalled = {"stalled_peer_s": limits.slow_reader_timeout_s,
               "on_stalled": functools.partial(logs.client_aborted, app.state.ctx, "stalled_reader")}
    linger = Linger(limits.refusal_linger_s, max(limits.max_request_bytes, limits.max_upload_bytes))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=functools.partial(OpenAIErrorsH11Protocol, head_timeout_s=limits.head_timeout_s,
                                                   max_connections=limits.max_connections, linger=linger,
                                                   min_chunk_bytes=limits.min_chunk_bytes,
                                                   min_read_bytes=limits.min_read_bytes, on_full=logs.connections_full, **stalled),
                            ws=functools.partial(OpenAIErrorsWebSocketProtocol, linger=linger,
                                                 min_chunk_bytes=limits.min_chunk_bytes,
                                                 min_read_bytes=limits.min_read_bytes, **stalled),
                            timeout_keep_alive=limits.keep_alive_s,
                            ws_max_size=limits.max_frame_bytes, ws_per_message_deflate=False,
                            timeout_graceful_shutdown=3)
    logs.install()  # (creating the config configured uvicorn's logging: its loggers keep the filter)
    logs.share_uvicorn_handlers()
    return config


class ServerHandle:
    """Runs the app with uvicorn on a background thread: `with ServerHandle(app) as srv: srv.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        check_bind(host, app.state.ctx.token)
        self.app = app
        self.host = host
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="ming-server", daemon=True)
        self.port: int | None = None

    @property
    def ctx(self) -> ServerContext:
        return self.app.state.ctx

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def start(self, timeout: float = 30.0) -> "ServerHandle":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
