"""Who may talk to the server.

* Loopback without a token: open (the studio on one machine).
* Any other bind address needs a token; starting without one is refused with an explanation.
* With a token, every request except GET /health must carry it: `Authorization: Bearer T`, or a
  `token` query parameter (browsers cannot set headers on a websocket). Compared in constant time.
* A token never reaches a log or an error message: `redact_token` rewrites `token=...` in URLs.
"""

from __future__ import annotations

import errno
import hmac
import re
import socket
from urllib.parse import parse_qs

from engine.client.core import is_loopback_host
from engine.server.protocol import ApiError


class StartupRefused(RuntimeError):
    """The server will not start with these settings (the message explains why and what to do)."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token."""
    if token is not None and not token.strip():
        raise StartupRefused("--token is empty: give a real secret (or leave it out on a loopback address)")
    if token is not None and not all(33 <= ord(c) <= 126 for c in token):
        raise StartupRefused("--token must be printable ASCII without spaces (it travels in an HTTP header)")
    if token or is_loopback_host(host):
        return
    raise StartupRefused(
        f"refusing to listen on {host!r} without a token: anyone who can reach this address could use the "
        "model (and its compute). Either bind to a loopback address (--host 127.0.0.1, the default) or "
        "set a secret with --token (or MING_SERVER_TOKEN); clients then send 'Authorization: Bearer <token>' "
        "or '?token=<token>'.")


def listen_socket(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A socket bound to (host, port), made before the (minutes-long) model load so that a port in use, an
    address this machine does not have or a port out of range is said at once, naming the flags and what to
    do; the server then serves on it (port 0: the free port it got, `getsockname()[1]`)."""
    if not 0 <= port <= 65535:  # (getaddrinfo would take 70000 as 4464)
        raise StartupRefused(f"{flag} {port}: a port is 0 to 65535 (0 = any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise StartupRefused(f"--host {host}: not an address to listen on ({e}); give an address of this machine "
                             "(127.0.0.1, 0.0.0.0 for every interface, ::1)") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        fix = (f"the port is in use by another program: choose another {flag} (0 = any free port)"
               if e.errno == errno.EADDRINUSE else "give an address of this machine with --host (127.0.0.1, 0.0.0.0)")
        raise StartupRefused(f"cannot listen on --host {host} {flag} {port} ({e.strerror or e}): {fix}") from e
    sock.set_inheritable(True)
    return sock


def token_matches(provided: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest on the UTF-8 bytes)."""
    if provided is None:
        return False
    return hmac.compare_digest(provided.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def token_from_scope(scope: dict) -> str | None:
    """The token an HTTP or websocket request carries: a Bearer `Authorization` header, a `?token=` query
    parameter, or (a websocket) the subprotocol 'openai-insecure-api-key.<token>'. A request that gives it
    ambiguously is refused (ApiError 400 naming the parameter), whatever the server's token: one of these given
    twice (the first was taken from the query, a second header was ignored), or two of them that disagree (the
    header won over the query)."""
    given = given_tokens(scope)
    for place in dict.fromkeys(place for place, _ in given):
        if sum(p == place for p, _ in given) > 1:
            raise ApiError(f"the access token is given twice in {place!r}: send it once", code="invalid_value",
                           param=place)
    values = [value for _, value in given if value]
    if len(set(values)) > 1:
        places = " and ".join(f"{place!r}" for place, value in given if value)
        raise ApiError(f"the access token given in {places} differs between them: send it once",
                       code="invalid_value", param=given[-1][0])
    return values[0] if values else None


def given_tokens(scope: dict) -> list[tuple[str, str]]:
    """(where, token) for each place of the request that gives a token ('' for an Authorization header that is not
    a Bearer token), in the order token_from_scope reads them."""
    given = []
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            scheme, _, cred = value.decode("latin-1").strip().partition(" ")
            given.append(("Authorization", cred.strip() if scheme.lower() == "bearer" else ""))
    query = scope.get("query_string") or b""
    if query:
        given += [("token", value) for value in
                  parse_qs(query.decode("latin-1"), keep_blank_values=True).get("token", [])]
    for protocol in scope.get("subprotocols") or []:  # a websocket from a browser: OpenAI's SDK sends it so
        if protocol.startswith(KEY_SUBPROTOCOL) and len(protocol) > len(KEY_SUBPROTOCOL):
            given.append(("Sec-WebSocket-Protocol", protocol[len(KEY_SUBPROTOCOL):]))
    return given


KEY_SUBPROTOCOL = "openai-insecure-api-key."  # Sec-WebSocket-Protocol carrying the key (browsers set no headers)


def chosen_subprotocol(scope: dict) -> str | None:
    """The subprotocol a websocket handshake answers with: "realtime" when the client offers it (OpenAI's
    browser SDK offers "realtime" with its key and beta markers; a browser drops a connection whose answer
    names none of those it offered), else none. A key-carrying protocol is never echoed back."""
    offered = scope.get("subprotocols") or []
    return "realtime" if "realtime" in offered else None


def check_token(scope: dict, expected: str | None) -> None:
    """Refuse a request without the server's token (401), or giving one ambiguously (400, token_from_scope)."""
    if expected is not None and not token_matches(token_from_scope(scope), expected):
        raise ApiError("missing or wrong token: send 'Authorization: Bearer <token>' or '?token=<token>'",
                       code="unauthorized", status=401)


_TOKEN_PARAM = re.compile(r"(?i)((?:^|[?&;])token=)[^&;#\s\"']*")


def redact_token(text: str) -> str:
    """`text` with the value of every `token=` URL parameter replaced by [redacted] (right or wrong
    tokens alike: a wrong one may be a real secret of something else)."""
    return _TOKEN_PARAM.sub(r"\1[redacted]", text) if "token=" in text.lower() else text
