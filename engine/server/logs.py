"""The server's log: no token in it, and one line (not a stack trace) for each client that leaves early.

* uvicorn writes request paths with their query string: the access log's `GET /v1/models?token=T`
  and its websocket lines `"WebSocket /v1/realtime?token=T" [accepted]` / `403`, right tokens and wrong
  ones. `ServerLogFilter` rewrites every `token=` parameter of every record of uvicorn's loggers and
  ours (engine.server.auth.redact_token) before any handler sees it.
* A client that leaves early is not a server fault: `client_aborted` counts it (ServerContext.
  client_aborts, shown by /health) and logs one INFO line "client abort (<kind>): <what>". The
  records uvicorn would write for the same events with a stack trace (a websocket text frame that is
  not UTF-8) are dropped by the filter; the realtime endpoint, which sees that connection close with
  1007, writes the line. A truncated upload surfaces in the app as bodies.ClientGone.
* The server at its connection limit (Limits.max_connections) says so in one WARNING line a second at most (a
  flood of connections would write one each), with how many lines it left out meanwhile.
* uvicorn's "ASGI callable returned without completing handshake" after a websocket handshake we
  answered with an HTTP response (a 401 or 404) is not a fault either: dropped.
"""

from __future__ import annotations

import logging
import time

from engine.server.auth import redact_token

LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "engine.server")
log = logging.getLogger("engine.server")
_shared: list[logging.Handler] = []  # uvicorn's handlers that also write the server's own lines

_DROPPED = ("without completing handshake",  # our 401/404 answer to a websocket handshake
            "Invalid UTF-8 sequence received from client")  # logged with a stack; the app logs one line


class ServerLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            if any(text in record.msg for text in _DROPPED):
                return False
            record.msg = redact_token(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_token(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install() -> None:
    """Put the filter on the server's loggers (once; dictConfig, which uvicorn runs when it starts,
    keeps a logger's filters) and let the server's own INFO lines through."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ServerLogFilter) for f in logger.filters):
            logger.addFilter(ServerLogFilter())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def share_uvicorn_handlers() -> None:
    """Write the server's own lines where uvicorn writes its (the command line server's stderr, in
    uvicorn's format) and at its level (--log-level), once uvicorn has configured its logging."""
    handlers = logging.getLogger("uvicorn").handlers
    if handlers:
        for handler in _shared:  # uvicorn's previous configuration's
            log.removeHandler(handler)
        _shared[:] = handlers
        for handler in handlers:
            log.addHandler(handler)
        log.propagate = False
    level = logging.getLogger("uvicorn.error").level
    if level != logging.NOTSET:
        log.setLevel(level)


def client_aborted(ctx, kind: str, what: str) -> None:
    """Count a client that left early (`kind` one of context.CLIENT_ABORTS) and log one line."""
    ctx.client_aborts[kind] += 1
    log.info("client abort (%s): %s", kind, what)


FULL_LOG_INTERVAL_S = 1.0  # at most one line this often about the connection limit
_full = {"last": float("-inf"), "left_out": 0}


def connections_full(what: str) -> None:
    """The server at its connection limit (engine.server.http_protocol): one WARNING line a second at most."""
    now = time.monotonic()
    if now - _full["last"] < FULL_LOG_INTERVAL_S:
        _full["left_out"] += 1
        return
    more = f" ({_full['left_out']} more such since the last line)" if _full["left_out"] else ""
    _full["last"], _full["left_out"] = now, 0
    log.warning("connection limit: %s%s", what, more)
