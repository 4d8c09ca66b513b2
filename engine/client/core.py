"""The client's I/O-free core: where the server is, what to send (request bodies and realtime client
events, media encoded from the engine's message format) and what the answers mean (wire events ->
engine events, through engine.server.protocol). The sync and async shells (sync.py, aio.py) only
move bytes; everything they decide is decided here, once.
"""

from __future__ import annotations

import base64
import codecs
import io
import ipaddress
import itertools
import logging
import os
import re
import socket
import ssl
import threading
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import numpy as np

from engine.events import Done, Error, Event, UnknownEventError
from engine.server import protocol as wire

log = logging.getLogger("engine.client")

DEFAULT_TIMEOUT = 60.0  # seconds: connecting, each request/reply, each HTTP read, a cancel's answer
# Seconds a realtime session's opening may take (the websocket handshake, then the session's first event), at most the
# client's timeout. An engine that is up answers it at once however busy it is (a request waits in its queue after);
# a hung engine held each chat for the client's whole timeout (60 s), its Stop unheard until then.
CONNECT_TIMEOUT_S = 10.0
POLL_S = 0.05  # how often a streaming read looks at its cancel event
PING_S = 20.0  # websocket keepalive (at most; and every `timeout`): a server that stops answering pings is lost
REALTIME_PATH = "/v1/realtime"
# The HTTP connection pool's limits (httpx.Limits keywords): no cap on open connections. httpx's own cap (100) held
# the 101st request of a busy studio (100 visitors' streams waiting in the engine's line) until the pool freed one:
# the studio's engine check then said the engine "did not answer within 10 s" and new requests hung up to 60 s. The
# engine refuses what it cannot take itself, with a clear answer (queue_full, too_many_connections).
POOL_LIMITS = {"max_connections": None, "max_keepalive_connections": 20}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # largest server event this client accepts
# largest whole (not streamed) answer this client reads, as decompressed: a card, a transcript, a picture's PNG in
# base64 (16 MP at most: under 64 MB), a speech WAV (10 minutes of 44.1 kHz float: 106 MB). An answer without a bound
# (a hostile or broken server's endless body, or a small gzip that inflates to gigabytes) grew the studio's memory
# until it was killed.
MAX_ANSWER_BYTES = 256 * 1024 * 1024


def is_loopback_host(host: str) -> bool:
    """True when every address `host` stands for is a loopback address (this machine only): what the
    server's and the studio's bind checks ask before serving without a token or a login."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


# =========================================================================== errors


class ServerError(Exception):
    """The server refused a request (or could not be reached): `code` is the server's stable code (or
    one of engine.server.protocol.CLIENT_ERROR_CODES), `status` the HTTP status when there was one."""

    def __init__(self, message: str, code: str = "server_error", status: int | None = None, event: Any = None):
        super().__init__(f"{code}: {message}")
        self.message = message
        self.code = code
        self.status = status
        self.event = event

    def to_event(self) -> Error:
        return Error(self.message, self.code)


class Stopped(Exception):
    """The caller's cancel was set while a request waited for its answer (a stream's head): given up at once."""


class ConnectionLost(ServerError):
    """The realtime connection closed; reconnect() carries on in a fresh session."""

    def __init__(self, message: str, code: str = "connection_lost"):
        super().__init__(message, code)


def http_error(status: int, body: Any, text: str = "", url: str = "", retry_after: str | None = None) -> ServerError:
    """An error answer as a ServerError: the engine's (and OpenAI's) error object by its code and message; any other
    answer (a proxy's page, a load balancer's text, another framework's JSON) by its status, `url` and own words. Its
    Retry-After header (`retry_after`: a 429's, a 503's while the engine starts) is said as when to try again."""
    err = body.get("error") if isinstance(body, dict) else None
    again = retry_note(retry_after)
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        ev = wire.error_event(err, status)
        return ServerError(ev.message + again, ev.code, status, body)
    return ServerError(_error_text(status, text, body, url) + again, wire.status_error_code(status), status, body)


def retry_note(retry_after: str | None) -> str:
    """' (the server asks to try again in 30 s)' for a Retry-After header of seconds, '... after DATE' for one of a
    date; "" without one."""
    said = " ".join(str(retry_after or "").split())[:ERROR_WORDS_SHOWN]
    if not said:
        return ""
    return f" (the server asks to try again {f'in {said} s' if said.isdigit() else f'after {said}'})"


_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def html_page_title(text: str) -> str | None:
    """The title of an HTML page ("" when it has none); None when `text` is not an HTML page."""
    text = text.strip()
    if not (text[:1] == "<" or "<html" in text[:512].lower()):
        return None
    title = _HTML_TITLE.search(text)
    return " ".join(re.sub(r"<[^>]+>", " ", title.group(1)).split())[:120] if title else ""


def is_html(content_type: str) -> bool:
    """True for an answer that says it is a web page (a captive portal's or a proxy's login page answers any URL)."""
    return content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


# The fields other servers put an error's words in (FastAPI's detail, a bare error string, a message).
OTHER_ERROR_FIELDS = ("detail", "error", "message")
ERROR_WORDS_SHOWN = 200  # characters of an error answer's own words in its message


def _error_text(status: int, text: str, body: Any = None, url: str = "") -> str:
    """What an error answer not in the engine's shape says: its status and where, then its own words (a JSON answer's
    detail / error / message field, else its text, cut), an HTML page (a proxy's or gateway's 502 / 504, which came
    through as kilobytes of markup) by its title, naming what answered."""
    where = f"HTTP {status} from {url_shown(url)}" if url else f"HTTP {status}"
    title = html_page_title(text)
    if title is not None:
        what = f": {title}" if title else ""
        return f"{where}{what} (an HTML page: a proxy or gateway answered, not the engine)"
    fields = body if isinstance(body, dict) else {}
    said = next((fields[k] for k in OTHER_ERROR_FIELDS if isinstance(fields.get(k), str) and fields[k].strip()), None)
    said = " ".join((said or text).split())[:ERROR_WORDS_SHOWN] or status_phrase(status)  # (an empty answer: its name)
    return f"{where}: {said}" if said else where


def status_phrase(status: int) -> str:
    """HTTP's name of a status (429: 'Too Many Requests'); "" for a status it does not name."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def reply_error(event: dict) -> ServerError:
    ev = wire.error_event(event.get("error"))
    return ServerError(ev.message, ev.code, None, event)


def parse_json(raw: Any) -> dict:
    """A realtime server event: a JSON object (anything else, a list or a bare value, is ServerError protocol_error:
    it raised AttributeError out of chat() where the event was read)."""
    try:
        event = wire.read_json(raw)
    except (TypeError, ValueError) as e:
        raise ServerError(f"the server sent something that is not JSON: {e}", "protocol_error") from None
    if not isinstance(event, dict):
        raise ServerError(f"the server sent an event that is not a JSON object: {str(raw)[:ERROR_WORDS_SHOWN]}",
                          "protocol_error")
    return event


def json_answer(status: int, content: bytes, url: str = "", retry_after: str | None = None) -> Any:
    """An HTTP answer's JSON body, or ServerError for an error status or a body that is not JSON (`url`: where it
    came from, which a message of an answer not in the engine's shape names; `retry_after`: its Retry-After header)."""
    unread = "it is null"
    try:
        body = wire.read_json(content)
    except ValueError as e:
        body, unread = None, e
    if status >= 400:
        raise http_error(status, body, content.decode("utf-8", "replace"), url, retry_after)
    if body is None:
        title = html_page_title(content.decode("utf-8", "replace"))
        if title is not None:  # (a captive portal, a proxy's login page: "not JSON" sent the user to the engine)
            raise web_page_answer(title, status)
        raise ServerError(f"the server's answer is not JSON ({unread})", "protocol_error", status)
    return body


def web_page_answer(title: str, status: int | None = None) -> ServerError:
    """A web page (its `title`, "" for none) that answered where the engine's JSON or stream was expected."""
    named = f" ({title!r})" if title else ""
    return ServerError(f"a web page{named} answered instead of the engine: a network's sign-in page (captive portal), a "
                       "proxy's login or another web site at this address", "protocol_error", status)


def json_error_event(status: int, content: bytes, url: str = "", retry_after: str | None = None) -> Error:
    try:
        json_answer(status, content, url, retry_after)
    except ServerError as e:
        return e.to_event()
    return Error(f"HTTP {status}", "server_error")


def waited_for(exc: BaseException, timeout_s: float) -> float | None:
    """`timeout_s` when `exc` says that time passed without an answer (connect_error's `timeout_s`), else None."""
    return timeout_s if isinstance(exc, TimeoutError) else None


def tls_failure(exc: BaseException | None) -> ssl.SSLError | None:
    """The TLS error behind `exc` (httpx and websockets wrap it), if there is one."""
    while exc is not None and not isinstance(exc, ssl.SSLError):
        exc = exc.__cause__ or exc.__context__
    return exc


def tls_error(url: str, failure: ssl.SSLError) -> ServerError:
    """A TLS failure said by its cause (it read "the engine ... is not answering ... SSLCertVerificationError"), with
    the way to trust a self-signed engine: SSL_CERT_FILE, which both transports read."""
    if not isinstance(failure, ssl.SSLCertVerificationError):
        why = failure.reason or failure
        return ServerError(f"could not open TLS (https:// / wss://) with the server at {url} ({why}): if it serves "
                           "plain HTTP, give its http:// or ws:// address", "connect_failed")
    why = failure.verify_message or str(failure)
    clock = " (check this machine's clock too)" if "expired" in why or "not yet valid" in why else ""
    return ServerError(f"the engine server at {url} presented a TLS certificate this machine does not trust: "
                       f"{why}{clock}. Give the engine's TLS proxy a certificate from a public authority (such as "
                       "Let's Encrypt), or trust its own here: SSL_CERT_FILE=/path/to/its-certificate.pem (the "
                       "self-signed certificate, or the authority that signed it)", "connect_failed")


# The content codings this client asks for (Accept-Encoding) and reads: zlib's, in every Python. An answer compressed
# otherwise (a server or proxy that ignored the ask: zstd, br) is said as unreadable, not read as its raw bytes.
READ_ENCODINGS = ("gzip", "deflate")


def unread_encoding(headers: Any) -> str | None:
    """The content codings of an answer (its Content-Encoding) that this client does not read; None when it reads
    them all (or there are none)."""
    codings = (c.strip().lower() for c in str(headers.get("content-encoding") or "").split(","))
    unread = [c for c in codings if c and c not in ("identity", *READ_ENCODINGS)]
    return ", ".join(unread)[:ERROR_WORDS_SHOWN] or None


def undecodable(url: str, encoding: str | None, failure: BaseException | None = None) -> ServerError:
    """An answer this client cannot read as it came: compressed with a coding it did not ask for (`encoding`), or
    whose compressed bytes do not decompress (`failure`)."""
    if failure is None:
        what = (f"compressed as {encoding!r} (its Content-Encoding), which this client did not ask for and does not "
                f"read (it asks for {' or '.join(READ_ENCODINGS)})")
    else:
        named = f" as {encoding!r}" if encoding else ""
        what = f"compressed{named} (its Content-Encoding) but does not decompress ({failure})"
    return ServerError(f"the answer from {url_shown(url)} is {what}: a proxy on the way, or a server that is not the "
                       "engine, changed it", "protocol_error")


def cut_answer(url: str, status: int, failure: BaseException) -> ServerError:
    """An answer whose head came and whose body the connection ended before it was whole (shorter than its
    Content-Length, or closed in the middle of a chunk): it read 'could not reach the engine server', which it had."""
    return ServerError(f"the answer from {url_shown(url)} (HTTP {status}) was cut off: the connection closed before it "
                       f"was whole ({failure}): a proxy on the way, or the server, ended it", "connection_lost", status)


class WholeAnswer:
    """A whole answer's body (from `url`, with HTTP `status` and `headers`) gathered as it is read and decompressed,
    refused (ServerError, protocol_error) once it is past MAX_ANSWER_BYTES, or at once when its Content-Length says it
    will be: reading it stops there and its connection is closed."""

    def __init__(self, url: str, status: int, headers: Any) -> None:
        self.url, self.status, self.pieces, self.size = url, status, [], 0
        length = str(headers.get("content-length") or "")
        if length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise self._too_large(f"its Content-Length says {int(length):,} bytes")

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > MAX_ANSWER_BYTES:
            raise self._too_large(f"over {self.size:,} bytes had come (decompressed) when the client stopped reading")
        self.pieces.append(piece)

    def content(self) -> bytes:
        return b"".join(self.pieces)

    def _too_large(self, why: str) -> ServerError:
        return ServerError(f"the answer from {url_shown(self.url)} (HTTP {self.status}) is larger than the "
                           f"{MAX_ANSWER_BYTES / 2**20:g} MB this client reads whole ({why}): it is not the engine's, "
                           "or a proxy on the way broke it", "protocol_error", self.status)


def is_redirect(status: int) -> bool:
    return 300 <= status < 400


def redirect_error(url: str, status: int, location: str | None) -> ServerError:
    """A redirect answered at `url` (http:// to https://, a proxy adding a slash or moving the engine): said with the
    address it points to, as the engine's address to give when it is one. Not followed: the realtime socket cannot
    follow one, and the engine's token would go to the other address with the request."""
    where = url_shown(urljoin(url, location or "")) if location else None
    path = urlsplit(url).path
    suffix = next((p for p in (REALTIME_PATH, path) if p and where and urlsplit(where).path.endswith(p)), None)
    base = where[: len(where) - len(suffix)] if suffix else None
    give = (f": start the studio with that address (--engine {base}, or ENGINE_URL={base})" if base else
            ": give the studio the engine's own address (--engine, or ENGINE_URL)")
    return ServerError(f"the engine's address {url_shown(url)} redirects (HTTP {status}) to "
                       f"{where or 'no address'}{give}. Redirects are not followed (the engine's token would go along)",
                       "http_error", status)


def without_redirects(connecter: Any) -> Any:
    """A websockets connect() (the object it returns, before it is awaited or connected) that raises a redirect as it
    came (InvalidStatus with the 3xx answer: connect_error says it with the address it points to) instead of following
    it, as the HTTP calls never follow one: the realtime socket went on to another host, without the token (which that
    host then said it refused), or round a loop ('SecurityError: more than 10 redirects')."""
    connecter.process_redirect = lambda exc: exc
    return connecter


def redirect_answer(exc: BaseException | None) -> Any:
    """The redirect answer behind `exc` (or what it was raised while handling), if there is one."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if is_redirect(getattr(response, "status_code", None) or 0):
            return response
        exc = exc.__cause__ or exc.__context__
    return None


def not_upgraded(answer: str, status: int | None) -> ServerError:
    """A realtime (websocket) handshake answered with a success (`answer`: its status, where and words) instead of the
    websocket it asked for."""
    return ServerError(f"{answer}: the realtime (websocket) handshake was answered without opening a websocket. A "
                       "proxy on the way that does not pass websockets on (nginx: proxy_http_version 1.1 and the Upgrade "
                       "and Connection headers), or a server that is not the engine", "protocol_error", status)


def connect_error(url: str, exc: BaseException, timeout_s: float | None = None) -> ServerError:
    """Why a connection could not be made: the server's refusal (e.g. 401 unauthorized, with its
    error body), `timeout` when the transport says the request's `timeout_s` passed without an answer
    (a hung engine, a network that drops packets), a TLS failure said by its cause, or connect_failed."""
    if timeout_s is not None:
        return ServerError(f"the engine server at {url} did not answer within {timeout_s:g} s", "timeout")
    tls = tls_failure(exc)
    if tls is not None:
        return tls_error(url, tls)
    redirect = redirect_answer(exc)
    if redirect is not None:  # (a websocket handshake answered with a redirect: websockets fails to follow one to
        return redirect_error(url, redirect.status_code, redirect.headers.get("Location"))  # https://, "InvalidURI")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        body = getattr(response, "body", None)
        page = bytes(body or b"").decode("utf-8", "replace")
        # (a proxy's text or web page: said by its words or title; an empty refusal by its reason phrase, not by
        # websockets' own words, which named the status a second time)
        text = page if page.strip() else getattr(response, "reason_phrase", "")
        again = (getattr(response, "headers", None) or {}).get("Retry-After")
        try:
            parsed = wire.read_json(body) if body else None
        except ValueError:
            parsed = None
        if 200 <= status < 300:  # (a websocket handshake answered as a plain request: said as "HTTP 200" alone)
            return not_upgraded(_error_text(status, text, parsed, url), status)
        return http_error(status, parsed, text, url, again)
    if type(exc).__name__ == "InvalidMessage":  # (websockets: the handshake's answer was not HTTP/1.1, or none came)
        return handshake_unanswered(url, exc.__cause__ or exc)
    return ServerError(f"could not reach the engine server at {url}: {type(exc).__name__}: {exc}", "connect_failed")


def handshake_unanswered(url: str, cause: BaseException) -> ServerError:
    """A realtime (websocket) handshake whose answer websockets could not read (`cause`): the connection closed with no
    answer, or something other than an HTTP/1.1 answer came (an HTTP/1.0 server's, another protocol's greeting). It
    was said as 'could not reach the engine server ... InvalidMessage: did not receive a valid HTTP response': the
    address was reached."""
    if isinstance(cause, EOFError):  # (connect_failed still: an engine stopping or restarting may do it)
        return ServerError(f"{url_shown(url)} took the connection and closed it without answering the realtime "
                           "(websocket) handshake: an engine stopping or restarting, a proxy on the way, or a server "
                           "that is not the engine", "connect_failed")
    return not_upgraded(f"{url_shown(url)} answered something that is not a websocket handshake ({cause})", None)


# =========================================================================== where the server is


OPENAI_SCHEMES = ("openai+http", "openai+https")


@dataclass(frozen=True)
class Endpoints:
    """Both transports of one server, from any of its URLs: http(s)://host:port[/...] or
    ws(s)://host:port[/v1/realtime]. `openai+http(s)://host:port`: any OpenAI-compatible server
    (`openai` True: HTTP only, OpenAI's standard routes and fields; see engine.client.calls)."""

    http: str  # http(s)://host:port
    ws: str  # ws(s)://host:port/v1/realtime
    token: str | None = None
    openai: bool = False

    @classmethod
    def parse(cls, url: str, token: str | None = None) -> "Endpoints":
        """A path after HOST:PORT is kept as the prefix a reverse proxy serves the engine under
        (https://box.example.org/ming/); a trailing /v1 or /v1/realtime is the engine's own. A `?token=T` in the URL
        (the engine's websocket takes one there) is the token when none is given."""
        parts = urlsplit(str(url).strip())
        url = url_shown(url)  # (what the errors below repeat)
        if "@" in parts.netloc:  # said without the URL: what is before the @ may be a secret
            raise ValueError("the engine URL holds a user name or password (user:secret@HOST): the engine takes no "
                             "login in its URL; give its token with --engine-token (or ENGINE_TOKEN) instead")
        scheme = parts.scheme.lower()
        openai = scheme in OPENAI_SCHEMES
        if openai:
            scheme = scheme.split("+", 1)[1]
        try:
            port_ok = parts.port is None or parts.port > 0  # (.port raises on a port that is not 0..65535)
        except ValueError:
            port_ok = False
        if scheme not in ("http", "https", "ws", "wss") or not parts.hostname or not port_ok:
            bare_ipv6 = parts.netloc.count(":") > 1 and "[" not in parts.netloc  # (ws://::1:8000 read as port "1:8000")
            raise ValueError(f"engine URL {url!r} must look like http://HOST:PORT or ws://HOST:PORT with a port "
                             "from 1 to 65535 (or openai+http://HOST:PORT for any OpenAI-compatible server)"
                             + ("; an IPv6 address goes in brackets: ws://[2001:db8::1]:8000" if bare_ipv6 else ""))
        prefix = _proxy_prefix(parts.path, url)
        secure = scheme in ("https", "wss")
        return cls(http=f"{'https' if secure else 'http'}://{parts.netloc}{prefix}",
                   ws=f"{'wss' if secure else 'ws'}://{parts.netloc}{prefix}{REALTIME_PATH}",
                   token=checked_token(token or parse_qs(parts.query).get("token", [None])[0]), openai=openai)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def url_shown(url: str) -> str:
    """An engine URL as logs and messages may show it: without its query and fragment (the engine also takes its token
    as ?token=, which then went into the studio's log with the URL)."""
    return urlunsplit(urlsplit(str(url).strip())._replace(query="", fragment=""))


_TOKEN = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries: visible ASCII, no spaces


def checked_token(token: str | None) -> str | None:
    """The token with the whitespace around it trimmed (a secret pasted with its line end, 'T\\n', was sent as
    'Bearer T\\n': the header was refused before leaving, the engine said to be unreachable and the error showed
    the token); one with a space, control or non-ASCII character inside is refused without repeating it."""
    token = (token or "").strip()
    if token and not _TOKEN.fullmatch(token):
        raise ValueError("the engine token (--engine-token / ENGINE_TOKEN) holds a space, a control character or a "
                         "non-ASCII character inside it: give the engine server's --token exactly (not repeated here)")
    return token or None


def _proxy_prefix(path: str, url: str) -> str:
    """The path a reverse proxy serves the engine under ('' at the root), from an engine URL's path."""
    prefix = path.rstrip("/")
    for own in (REALTIME_PATH, "/v1"):
        if prefix.endswith(own):
            prefix = prefix[: -len(own)]
            break
    if "/v1/" in prefix + "/":  # e.g. .../v1/chat/completions: one of its routes, not where it is
        raise ValueError(f"engine URL {url!r} names one of the engine's routes ({path}): give the server's own address, "
                         "http://HOST:PORT or ws://HOST:PORT (with the path a proxy serves it under, if any)")
    return prefix


def checked_timeout(timeout: Any) -> float:
    """`timeout` as seconds, refused unless a positive number (0 would make every socket non-blocking)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def timeout_option(timeout: Any) -> dict:
    """The keyword arguments that give one request `timeout` seconds (None: the client's own timeout)."""
    return {"timeout": checked_timeout(timeout)} if timeout is not None else {}


def env_settings(environ=os.environ) -> tuple[str, str | None]:
    """(ENGINE_URL, ENGINE_TOKEN) from the environment."""
    url = environ.get("ENGINE_URL")
    if not url:
        raise ValueError("ENGINE_URL is not set: set it to the engine server's address, e.g. ws://HOST:PORT "
                         "(and ENGINE_TOKEN to its token)")
    return url, environ.get("ENGINE_TOKEN") or None


@dataclass
class ModelInfo:
    """The served model, from the server's /v1/models card."""

    id: str
    name: str
    is_demo: bool
    release: str
    parameters: int
    dtype: str
    device: str
    placement: str
    capabilities: set[str] = field(default_factory=set)  # text, image_in, video_in, audio_in, transcription,
    default_instructions: str | None = None  # speech_out, image_out; the system prompt used when none is given
    input_modalities: list[str] = field(default_factory=list)
    output_modalities: list[str] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # the card's `limits` (none from an OpenAI server)
    unavailable: dict[str, str] = field(default_factory=dict)  # capability -> why the model lacks it (when known)
    speech_sample_rate: int | None = None  # the talker's own rate (None: no talker, or the server does not say)
    image_defaults: dict[str, float] = field(default_factory=dict)  # steps / guidance a request naming none gets

    @property
    def max_new_tokens(self) -> int | None:
        """The most new tokens a request may ask for (None: the server does not say)."""
        n = self.limits.get("max_new_tokens")
        return int(n) if n else None

    @property
    def max_sessions(self) -> int | None:
        """The most realtime sessions the engine holds at once (None: the server does not say)."""
        n = self.limits.get("max_sessions")
        return int(n) if n else None

    @classmethod
    def from_card(cls, card: dict) -> "ModelInfo":
        try:
            return cls(id=card["id"], name=card.get("name", card["id"]), is_demo=bool(card.get("is_demo")),
                       release=str(card.get("release", "")), parameters=int(card.get("parameters") or 0),
                       dtype=str(card.get("dtype", "")), device=str(card.get("device", "")),
                       placement=str(card.get("placement", "")), capabilities=set(card.get("capabilities") or ["text"]),
                       default_instructions=card.get("default_instructions"),
                       input_modalities=list(card.get("input_modalities") or []),
                       output_modalities=list(card.get("output_modalities") or []),
                       limits=_card_limits(card.get("limits")),
                       unavailable={str(k): str(v) for k, v in (card.get("unavailable") or {}).items()}
                       if isinstance(card.get("unavailable"), dict) else {},
                       speech_sample_rate=_card_rate(card.get("speech_sample_rate")),
                       image_defaults=_card_limits(card.get("image_defaults")))
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError(f"the server's model card is malformed: {e}", "protocol_error") from None


def _card_rate(rate: Any) -> int | None:
    """The card's speech_sample_rate when it is a positive whole number of Hz (else None: not said)."""
    return rate if isinstance(rate, int) and not isinstance(rate, bool) and 0 < rate <= MAX_SPEECH_RATE else None


MAX_SPEECH_RATE = 192_000  # the highest talker rate a card may name (above: malformed, not asked for)


def _card_limits(limits: Any) -> dict[str, float]:
    """The card's positive numeric limits or defaults (anything else, or a card without them: none)."""
    if not isinstance(limits, dict):
        return {}
    return {k: v for k, v in limits.items() if isinstance(k, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and v > 0}


def models_info(body: Any) -> ModelInfo:
    try:
        return ModelInfo.from_card(body["data"][0])
    except (KeyError, IndexError, TypeError):
        raise ServerError("the server's /v1/models answer lists no model", "protocol_error") from None


# =========================================================================== media (engine message format)

_AUDIO_MAGIC = ((b"RIFF", "wav"), (b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3", "mp3"), (b"\xff\xfb", "mp3"),
                (b"\xff\xf3", "mp3"), (b"\x1a\x45\xdf\xa3", "webm"))
_IMAGE_MIME = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"RIFF", "image/webp"), (b"BM", "image/bmp"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read(source: Any, what: str) -> tuple[bytes, str]:
    """bytes, a file path, or a data: URL -> (bytes, lower-case file suffix or "")."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), ""
    if isinstance(source, str) and source.startswith("data:"):
        head, _, payload = source.partition(",")
        if ";base64" not in head:
            raise ValueError(f"{what}: only base64 data: URLs can be sent")
        return base64.b64decode(payload), ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{what}: no file at {str(path)!r}")
        return path.read_bytes(), path.suffix.lower().lstrip(".")
    raise ValueError(f"{what}: expected bytes, a file path or an array, got {type(source).__name__}")


def image_bytes(source: Any) -> tuple[bytes, str]:
    """An image (encoded bytes, a path, a data: URL, an HxWx3 uint8 array or a PIL image) -> (bytes, mime)."""
    if isinstance(source, np.ndarray) or hasattr(source, "save"):
        from PIL import Image  # noqa: PLC0415

        img = Image.fromarray(np.asarray(source).astype(np.uint8)) if isinstance(source, np.ndarray) else source
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    raw, _ = _read(source, "image")
    mime = next((m for magic, m in _IMAGE_MIME if raw.startswith(magic)), "image/png")
    return raw, mime


def pcm16(samples: Any) -> bytes:
    """int16 samples, float samples in [-1, 1] (clipped) or raw little-endian PCM16 bytes -> bytes."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        return bytes(samples)
    arr = np.asarray(samples)
    if arr.dtype.kind == "f":
        arr = np.round(np.clip(arr, -1.0, 1.0) * 32767.0)
    return arr.astype("<i2").reshape(-1).tobytes()


def wav_file(samples: Any, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm16(samples))
    return buf.getvalue()


@dataclass
class AudioPayload:
    data: bytes
    format: str  # "pcm16" or a file format (wav, mp3, flac, ogg, webm, m4a, opus)
    sample_rate: int | None = None  # for pcm16


def audio_payload(source: Any, sample_rate: int | None) -> AudioPayload:
    """An array (needs `sample_rate`) -> PCM16; encoded bytes or a path -> the file as it is."""
    if isinstance(source, np.ndarray) or isinstance(source, list):
        if not sample_rate:
            raise ValueError("audio given as samples needs its sample_rate")
        return AudioPayload(pcm16(source), "pcm16", int(sample_rate))
    raw, suffix = _read(source, "audio")
    fmt = next((f for magic, f in _AUDIO_MAGIC if raw.startswith(magic)), None)
    if fmt is None and len(raw) > 12 and raw[4:8] == b"ftyp":
        fmt = "m4a"
    fmt = fmt or suffix
    if fmt not in ("wav", "mp3", "flac", "ogg", "webm", "m4a", "opus"):
        raise ValueError("audio: not a recognised audio file (wav, mp3, flac, ogg, webm, m4a, opus); give samples "
                         "with their sample_rate instead")
    return AudioPayload(raw, fmt)


def video_bytes(source: Any) -> bytes:
    if not isinstance(source, (bytes, bytearray, memoryview, str, Path)):
        raise ValueError(f"video: send a video file (bytes or a path), got {type(source).__name__}; webcam frames go "
                         "through RealtimeClient.append_frame / commit_video")
    return _read(source, "video")[0]


def _media_list(part: dict, key: str) -> list:
    value = part.get(key)
    if value is None:
        raise ValueError(f"a {key!r} part needs its {key!r} field")
    return list(value) if isinstance(value, (list, tuple)) else [value]


TEXT_PARTS = ("text", "input_text", "output_text")


def realtime_content(content: Any, role: str) -> list[dict]:
    """Engine message content -> realtime content parts (input_text / output_text, input_image,
    input_audio, input_video)."""
    if isinstance(content, str):
        return [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise ValueError(f"a content part must be a dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind in TEXT_PARTS:
            out.append({"type": "output_text" if role == "assistant" else "input_text",
                        "text": str(part.get("text", ""))})
        elif kind in ("image", "input_image", "image_url"):
            for src in _media_list(part, "image" if "image" in part else "image_url"):
                raw, mime = image_bytes(src)
                out.append({"type": "input_image", "image_url": f"data:{mime};base64,{b64(raw)}"})
        elif kind in ("audio", "input_audio"):
            for src in _media_list(part, "audio"):
                audio = audio_payload(src, part.get("sample_rate"))
                entry = {"type": "input_audio", "audio": b64(audio.data), "format": audio.format}
                if audio.sample_rate:
                    entry["sample_rate"] = audio.sample_rate
                out.append(entry)
        elif kind in ("video", "input_video"):
            out.append({"type": "input_video", "video": b64(video_bytes(part.get("video")))})
        else:
            raise ValueError(f"unknown content part type {kind!r} (text, image, audio or video)")
    return out


def chat_completions_content(content: Any, role: str, openai: bool = False) -> Any:
    """Engine message content -> OpenAI chat-completions content (text, image_url, input_audio, video_url).
    `openai`: OpenAI's fields only (raw PCM16 samples are sent as a WAV file, which names its rate)."""
    if isinstance(content, str) or role != "user":
        return content if isinstance(content, str) else "".join(p["text"] for p in realtime_content(content, role))
    out = []
    for part in realtime_content(content, role):
        kind = part["type"]
        if kind == "input_text":
            out.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            out.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_audio":
            spec = {"data": part["audio"], "format": part["format"]}
            if "sample_rate" in part and openai:
                pcm = np.frombuffer(base64.b64decode(part["audio"]), "<i2")
                spec = {"data": b64(wav_file(pcm, part["sample_rate"])), "format": "wav"}
            elif "sample_rate" in part:
                spec["sample_rate"] = part["sample_rate"]
            out.append({"type": "input_audio", "input_audio": spec})
        else:
            out.append({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + part["video"]}})
    return out


# =========================================================================== requests

_ids = itertools.count(1)


def event_id() -> str:
    return f"evt_c{next(_ids)}_{int(time.time() * 1000) % 100000}"


@dataclass
class ChatOptions:
    """What a chat request asks for beyond its messages (None = the server's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    system: str | None = None
    thinking: bool = False
    modalities: tuple[str, ...] | list[str] = ("text",)
    voice: str | None = None  # sent only when audio is asked for
    audio_rate: int | None = None  # the spoken reply's rate (None: the server's default, OpenAI's 24 kHz)
    # OpenAI's: in [-2, 2], subtracted from the logit of each token the reply has used (presence: once; frequency:
    # per use); logit_bias: token id -> bias in [-100, 100] (the server checks the ranges and the ids)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None

    def sampling(self) -> dict:
        fields_ = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                   "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": self.stop,
                   "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                   "logit_bias": wire_logit_bias(self.logit_bias)}
        return {k: v for k, v in fields_.items() if v is not None}


def wire_logit_bias(bias: dict | None) -> dict[str, float] | None:
    """OpenAI's `logit_bias` object ({"token id": bias}) of {token id: bias}; ValueError for a key that is not a token
    id or a bias that is not a number (the server checks the ranges, and that the ids are the model's)."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not ((isinstance(token, int) and token >= 0)
                                           or (isinstance(token, str) and token.isascii() and token.isdigit())):
            raise ValueError(f"logit_bias keys are token ids (integers >= 0), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"logit_bias values are numbers in [-100, 100], got {value!r} for token {token}")
        out[str(int(token))] = float(value)
    return out


def check_role(message: Any) -> str:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
        raise ValueError("each message must be a dict with role 'user', 'assistant' or 'system' and its content")
    return message["role"]


def realtime_chat_events(messages: list[dict], opts: ChatOptions) -> list[dict]:
    """One chat over a realtime session: conversation.item.create per message, then response.create.
    Raises ValueError for messages that cannot be sent."""
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    events = []
    for m in messages:
        role = check_role(m)
        events.append({**message_event(role, m.get("content", "")), "event_id": event_id()})
    response = {"output_modalities": list(opts.modalities), "thinking": bool(opts.thinking), **opts.sampling()}
    if opts.system is not None:
        response["instructions"] = opts.system
    if opts.max_tokens is not None:
        response["max_output_tokens"] = opts.max_tokens
    if "audio" in opts.modalities and (opts.voice is not None or opts.audio_rate):
        output = {} if opts.voice is None else {"voice": opts.voice}
        if opts.audio_rate:
            output["format"] = {"type": "audio/pcm", "rate": int(opts.audio_rate)}
        response["audio"] = {"output": output}
    events.append({"type": "response.create", "event_id": event_id(), "response": response})
    return events


OPENAI_CHAT_EXTENSIONS = ("top_k", "repetition_penalty")


def chat_completions_body(messages: list[dict], opts: ChatOptions, openai_model: str | None = None) -> dict:
    """The same chat as a streaming /v1/chat/completions body. `openai_model`: for an OpenAI-compatible
    backend (OpenAI's fields only; ValueError names an option it cannot take)."""
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    msgs = [] if opts.system is None else [{"role": "system", "content": opts.system}]
    openai = openai_model is not None
    for m in messages:
        role = check_role(m)
        msgs.append({"role": role, "content": chat_completions_content(m.get("content", ""), role, openai)})
    body = {"messages": msgs, "stream": True, "stream_options": {"include_usage": True},
            "thinking": bool(opts.thinking), **opts.sampling()}
    if openai:
        refused = [k for k in OPENAI_CHAT_EXTENSIONS if body.get(k) is not None]
        refused += ["thinking"] if opts.thinking else []
        if refused:
            raise NotSupported(f"{', '.join(refused)} (extensions of our server)")
        body = {k: v for k, v in body.items() if k not in OPENAI_CHAT_EXTENSIONS + ("thinking",)}
        body["model"] = openai_model
    if list(opts.modalities) != ["text"]:
        body["modalities"] = list(opts.modalities)
    if opts.max_tokens is not None:
        body["max_tokens"] = opts.max_tokens
    if "audio" in opts.modalities and (opts.voice is not None or openai or opts.audio_rate):
        body["audio"] = {"format": "pcm16", **({"voice": opts.voice} if opts.voice is not None else {})}
        if opts.audio_rate and not openai:  # our extension: pcm16 at this rate, not OpenAI's 24 kHz
            body["audio"]["sample_rate"] = int(opts.audio_rate)
    return body


class NotSupported(ValueError):
    """An option an OpenAI-compatible backend cannot take (Error code not_supported_by_engine)."""


# The engine's refusal of a realtime session when all of its sessions are taken (Limits.max_sessions, 64 by default:
# Live calls and chats together): a chat is then sent over HTTP, which waits in the engine's line instead (a chat in
# the studio said "too many realtime sessions: 64 are open ...; try again later" while the engine could answer it).
SESSIONS_FULL = "session_limit_reached"


def chat_request(messages: list[dict], opts: ChatOptions, transport: str, openai_model: str | None = None) -> Any:
    """The realtime client events (transport "realtime") or the chat-completions body ("http"; always
    for an OpenAI-compatible backend, `openai_model`); an Error event (invalid_request, or
    not_supported_by_engine) when the messages or options cannot be sent."""
    try:
        if openai_model is not None:
            return chat_completions_body(messages, opts, openai_model)
        if transport == "realtime":
            return realtime_chat_events(messages, opts)
        if transport == "http":
            return chat_completions_body(messages, opts)
        raise ValueError(f"transport must be 'realtime' or 'http', got {transport!r}")
    except NotSupported as e:
        return Error(f"chat with {e} is not supported by this engine: it is an OpenAI-compatible server",
                     "not_supported_by_engine")
    except ValueError as e:
        return Error(str(e), "invalid_request")


def transcription_request(audio: Any, sample_rate: int | None, context: str | None, hotwords: list[str] | None,
                          dialect: str | None, max_tokens: int | None, openai_model: str | None = None) -> dict | Error:
    """httpx arguments (files, form fields) of a streaming /v1/audio/transcriptions request, or an
    Error event (invalid_request) when the audio cannot be sent. `openai_model`: for an
    OpenAI-compatible backend (hotwords and dialect are ours: not_supported_by_engine)."""
    if openai_model is not None and (hotwords or dialect):
        return Error("hotwords and a dialect (ours) are not supported by this engine: it is an "
                     "OpenAI-compatible server", "not_supported_by_engine")
    try:
        payload = audio_payload(audio, sample_rate)
    except ValueError as e:
        return Error(str(e), "invalid_request")
    if payload.format == "pcm16":
        payload = AudioPayload(wav_file(np.frombuffer(payload.data, "<i2"), payload.sample_rate), "wav")
    data = {"stream": "true", "prompt": context, "dialect": dialect,
            "hotwords": ",".join(hotwords) if hotwords else None,
            "max_tokens": str(max_tokens) if max_tokens is not None else None}
    if openai_model is not None:
        data["model"] = openai_model
    return {"files": {"file": (f"audio.{payload.format}", payload.data)},
            "data": {k: v for k, v in data.items() if v is not None}}


# =========================================================================== reading a streamed response


# What decoding an event with a field of an unexpected type raises (int(None), None.get, "x"[0]["y"], ...).
MALFORMED_FIELD = (KeyError, TypeError, ValueError, AttributeError, IndexError)


class ResponseRun:
    """One streamed response, whatever the transport: wire input in, engine events out, ending with
    exactly one Done or Error; a cancel is sent once and its answer awaited at most `timeout`."""

    def __init__(self, decoder, cancel=None, timeout: float = DEFAULT_TIMEOUT, where: str = ""):
        self.decoder = decoder
        self.cancel = cancel
        self.timeout = timeout
        self.where = where  # the URL of the stream or realtime session (its errors name it)
        self.cancel_sent_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.decoder.finished

    def cancel_due(self) -> bool:
        """True once, when the caller's cancel event is set: send the cancel (or close the stream)."""
        if self.cancel is None or self.cancel_sent_at is not None or self.finished or not self.cancel.is_set():
            return False
        self.cancel_sent_at = time.monotonic()
        return True

    def cancel_event(self) -> dict:
        event = {"type": "response.cancel", "event_id": event_id()}
        if getattr(self.decoder, "response_id", None):
            event["response_id"] = self.decoder.response_id
        return event

    def _end(self, ev: Done | Error) -> list[Event]:
        self.decoder.finished = True
        return [ev]

    def on_event(self, raw: Any) -> list[Event]:
        """A realtime server event (RealtimeResponseDecoder), an SSE line (SseLines decoders) or the
        next bytes of a byte stream (WavStreamDecoder)."""
        try:
            if isinstance(raw, str):
                return self.decoder.feed_line(raw)
            if isinstance(raw, bytes):
                return self.decoder.feed_bytes(raw)
            return self.decoder.feed(raw)
        except UnknownEventError as e:
            return self._end(self._not_understood(str(e)))
        except MALFORMED_FIELD as e:  # (a field of another type than ours: another server's, or another version's)
            return self._end(self._not_understood(f"an event with a field of another type than this client's "
                                                  f"({type(e).__name__}: {e})"))

    def _not_understood(self, what: str) -> Error:
        where = f" (from {url_shown(self.where)}: is it an engine server of another version?)" if self.where else ""
        return Error(f"the server sent something this client does not understand: {what}{where}", "protocol_error")

    def on_end(self) -> list[Event]:
        """The HTTP stream ended normally: its final event (or an Error when it never came)."""
        if self.finished:
            return []
        if self.cancel_sent_at is not None:
            return self.cancelled()
        try:
            ended = self.decoder.feed_end()
        except UnknownEventError as e:
            return self._end(self._not_understood(str(e)))
        except MALFORMED_FIELD as e:
            return self._end(self._not_understood(f"its last event, with a field of another type than this client's "
                                                  f"({type(e).__name__}: {e})"))
        if self.where and ended and isinstance(ended[-1], Error) and ended[-1].code == "protocol_error":
            ended[-1] = Error(f"{ended[-1].message}: the answer from {url_shown(self.where)} was cut off before its "
                              "last event (the connection closed without one, and without [DONE]: the engine stopped, "
                              "or a proxy on the way closed it)", "protocol_error")
        return ended

    def on_idle(self) -> list[Event]:
        """No news for a poll interval: a cancel unanswered for `timeout` ends the response here."""
        if self.cancel_sent_at is not None and time.monotonic() - self.cancel_sent_at > self.timeout:
            return self.cancelled()
        return []

    def cancelled(self) -> list[Event]:
        """The caller cancelled and the stream is gone (closed by us): end as the engine would."""
        return self._end(Done(text="".join(self.decoder.text), finish_reason="cancelled"))

    def fail(self, err: ServerError) -> list[Event]:
        """The server sent something unreadable (or a request step failed): the response ends here."""
        return [] if self.finished else self._end(err.to_event())

    def on_lost(self, detail: str | ServerError) -> list[Event]:
        """The stream's reading stopped: the connection lost (`detail`: why), or its bytes unreadable (a ServerError)."""
        if isinstance(detail, ServerError):
            return self.fail(detail)
        if self.finished:
            return []
        if self.cancel_sent_at is not None:
            return self.cancelled()
        server = f"the server at {url_shown(self.where)}" if self.where else "the server"
        return self._end(Error(f"the connection to {server} was lost: {detail}", "connection_lost"))


@dataclass(frozen=True)
class HeldBackCheck:
    """When a stream counts as held back by a proxy between this client and the engine (nginx's proxy_buffering on).
    Its body held: the answer's headers came at once, then nothing for `wait_s`, then all of its lines within
    `burst_share` of its time, at its end. Our engine sends its first lines with the headers (the request's place in
    line), so an engine that is merely slow to start is not taken for a proxy. Its headers held too (the whole answer
    at its end): the engine's own figures (the Done's queue wait and total time) say it made the stream over at least
    `wait_s`, and the headers and every line came within `burst_share` of that, at least `wait_s` after the request."""

    wait_s: float = 2.0  # the least wait between the headers and the first line (a shorter stream cannot tell)
    burst_share: float = 0.1  # the most of the stream's time its lines may be spread over
    min_lines: int = 2  # one line alone arrives at once whatever the path


# What the studio (and a script) is told, once, when a stream was held back (HeldBackCheck).
HELD_BACK_NOTE = ("the engine's streamed answers arrive all at once at their end: a proxy between this studio and the "
                  "engine holds them back (progress, previews, text and speech show only when a request is done). "
                  "Turn its response buffering off for the engine's address (nginx: proxy_buffering off; in its "
                  "location, and do not let proxy_ignore_headers drop the engine's X-Accel-Buffering: no; other "
                  "proxies and tunnels: their streaming / flush setting)")


class ArrivalClock:
    """When a streamed request was sent (the clock is made as it goes out) and its answer's headers and lines arrived
    (read by the shells' reader threads or tasks as they come, not as the caller consumes them), and how long the
    engine says it took to make: whether a proxy held the stream back (HeldBackCheck)."""

    def __init__(self, check: HeldBackCheck) -> None:
        self.check = check
        self.asked_at = time.monotonic()
        self.opened_at: float | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.lines = 0
        self.engine_s = 0.0  # the engine's time making the stream (its Done's queue wait and total), 0: not said

    def opened(self) -> None:
        self.opened_at = time.monotonic()

    def arrived(self) -> None:
        self.last_at = time.monotonic()
        self.first_at = self.first_at if self.first_at is not None else self.last_at
        self.lines += 1

    def ended(self, events: list[Event]) -> None:
        """The stream's last events: the engine's own time making it, from its Done's figures."""
        for ev in events:
            if isinstance(ev, Done):
                self.engine_s = ev.stats.queue_wait_s + ev.stats.total_s

    def telling(self) -> bool:
        """The stream lasted long enough, with lines enough, to tell whether it was held back."""
        if self.opened_at is None or self.first_at is None or self.lines < self.check.min_lines:
            return False
        return self.last_at - self.opened_at >= self.check.wait_s or self.engine_s >= self.check.wait_s

    def held_back(self) -> bool:
        return self.telling() and (self._body_held() or self._whole_held())

    def _body_held(self) -> bool:
        """The headers at once, the lines all at the end."""
        took = self.last_at - self.opened_at
        waited, spread = self.first_at - self.opened_at, self.last_at - self.first_at
        return took >= self.check.wait_s and waited >= self.check.wait_s and spread <= self.check.burst_share * took

    def _whole_held(self) -> bool:
        """The headers and the lines all at the end of the time the engine took to make them."""
        spread = self.last_at - self.opened_at
        return (self.engine_s >= self.check.wait_s and self.opened_at - self.asked_at >= self.check.wait_s
                and spread <= self.check.burst_share * self.engine_s)


def realtime_run(final_error_ids: set[str] | None, cancel, timeout: float, where: str = "") -> ResponseRun:
    return ResponseRun(wire.RealtimeResponseDecoder(final_error_ids), cancel, timeout, where)


def sse_run(cancel, timeout: float, decoder=None, where: str = "") -> ResponseRun:
    return ResponseRun(decoder if decoder is not None else wire.SseDecoder(), cancel, timeout, where)


class SseLineSplitter:
    """The bytes of an SSE stream -> its whole lines (each ended by \n, \r\n or \r), read as UTF-8 however the bytes
    were cut. What follows the last line end waits for the next bytes; a stream that ends there was cut in the middle
    of a line, which is dropped, as SSE says of an unfinished event: the decoder then says that the stream ended without
    its result. (httpx's iter_lines gave it as a last line, said as malformed data from 'an engine server of another
    version'.) Only the new bytes are searched for a line end (a 10 MB line took 30 s, each piece searched and copied
    with all the line before it). A line longer than MAX_MESSAGE_BYTES, or bytes that are not UTF-8, are refused
    (ServerError, protocol_error), naming the bound or the bytes."""

    LINE_END = re.compile(r"\r\n|\r|\n")

    def __init__(self, where: str = "") -> None:
        self.where = where
        self.text = codecs.getincrementaldecoder("utf-8")()
        self.rest: list[str] = []  # the unfinished line's pieces
        self.rest_chars = 0
        self.fed = False  # (any text yet)

    def feed(self, data: bytes) -> list[str]:
        try:
            text = self.text.decode(data)
        except UnicodeDecodeError as e:  # (it was read with U+FFFD in its place: a reply shown with "h��i" in it)
            raise self._broken(f"is not UTF-8 text (its bytes {e.object[e.start:e.end]!r} are not)") from None
        if not self.fed and (title := html_page_title(text)) is not None:  # (no SSE line starts with "<")
            raise web_page_answer(title)  # (a page sent without its Content-Type read as a stream cut off)
        self.fed = self.fed or bool(text)
        if self.LINE_END.search(text) is None:
            self.rest.append(text)
            self.rest_chars += len(text)
            if self.rest_chars > MAX_MESSAGE_BYTES:
                raise self._too_long()
            return []
        *lines, last = self.LINE_END.split(text)
        lines[0] = "".join(self.rest) + lines[0]
        self.rest, self.rest_chars = [last], len(last)
        return lines

    def _broken(self, what: str) -> ServerError:
        at = f" from {url_shown(self.where)}" if self.where else ""
        return ServerError(f"the stream{at} {what}: it is not the engine's, or a proxy on the way broke it",
                           "protocol_error")

    def _too_long(self) -> ServerError:
        return self._broken(f"sent a line longer than {MAX_MESSAGE_BYTES / 2**20:g} MB, the largest event this client "
                            "accepts")


def stream_reader(read: str, where: str = "") -> Callable[[bytes], list]:
    """What an HTTP stream's bytes (from `where`) are fed to its decoder as (HttpCall.read): the whole lines of an SSE
    stream, the bytes themselves of a byte stream."""
    return SseLineSplitter(where).feed if read == "sse" else (lambda data: [data])


def stream_lost(exc: BaseException, timeout: float, timed_out: bool) -> str:
    """Why an HTTP stream's reading stopped, for ResponseRun.on_lost: a read timeout (`timed_out`) said as the time
    without news (it read 'ReadTimeout: timed out', naming neither)."""
    if timed_out:
        return (f"nothing came for {timeout:g} s, the client's timeout (the engine keeps an idle stream alive, so "
                "it or the network stopped)")
    return f"{type(exc).__name__}: {exc}"


# =========================================================================== realtime session bookkeeping

REPLIES = {  # the server event that completes each client request
    "session.update": "session.updated",
    "conversation.item.create": "conversation.item.done",
    "conversation.item.delete": "conversation.item.deleted",
    "conversation.item.retrieve": "conversation.item.retrieved",
    "input_audio_buffer.commit": "conversation.item.done",
    "input_audio_buffer.clear": "input_audio_buffer.cleared",
    "input_video_buffer.commit": "conversation.item.done",
    "input_video_buffer.clear": "input_video_buffer.cleared",
}


def check_reply(event: dict, sent_id: str, reply: str) -> bool:
    """True when `event` answers the request `sent_id` (raising ServerError when it refused it)."""
    err = event.get("error")  # (an older or other server's error may be a bare string: it names no request, and is
    #                            taken as the answer to the one waiting rather than waited past)
    if event.get("type") == "error" and (not isinstance(err, dict) or err.get("event_id") == sent_id):
        raise reply_error(event)
    return event.get("type") == reply


def session_created(event: dict, where: str = "") -> dict:
    if event.get("type") == "error":
        raise reply_error(event)
    if event.get("type") != "session.created":
        raise ServerError(f"expected session.created, got {str(event.get('type'))[:60]}", "protocol_error", event=event)
    if not isinstance(event.get("session"), dict):  # (an engine server of another version; it raised KeyError)
        at = f" at {url_shown(where)}" if where else ""
        raise ServerError(f"the realtime server{at} sent a session.created without a session object: is it an engine "
                          "server of another version than this client?", "protocol_error", event=event)
    return event["session"]


class RealtimeState:
    """A realtime client's view of its session: the session object, events read ahead while waiting
    for an answer, and the log reconnect() replays."""

    def __init__(self) -> None:
        self.session: dict | None = None
        self.pending: deque[dict] = deque()
        self.log = SessionLog()
        self.items: list[str] = []  # the ids of the conversation's items, as the server reported them
        self.connected_at: float | None = None  # (time.monotonic) when the session was opened

    def connected(self, first: dict, where: str = "") -> dict:
        """The session `first` (the server's first event, from `where`) opened; ServerError when it is not one."""
        self.session = session_created(first, where)
        self.connected_at = time.monotonic()
        return self.session

    def reset(self) -> None:
        self.pending.clear()
        self.session = None
        self.items = []

    def observe(self, event: Any) -> Any:
        """Every event read from the socket passes here once."""
        if isinstance(event, dict):
            kind = event.get("type")
            if kind == "session.updated":
                self.session = event.get("session")
            elif kind == "response.done":
                self.log.assistant_reply(event)
            elif kind == "conversation.item.done" and isinstance(event.get("item"), dict):
                if event["item"].get("id") not in self.items:
                    self.items.append(event["item"].get("id"))
            elif kind == "conversation.item.deleted":
                self.items = [i for i in self.items if i != event.get("item_id")]
                self.log.forget(event.get("item_id"))
        return event

    def emptying_events(self) -> list[dict]:
        """conversation.item.delete for every item: a pooled session starts the next chat empty (the
        server applies them before anything sent later, so nobody waits for the answers)."""
        events = [{"type": "conversation.item.delete", "event_id": event_id(), "item_id": i} for i in self.items]
        self.items = []
        return events


# The oldest a pooled realtime session may be when a chat takes it: half the engine's (and OpenAI's) 60-minute session
# life. A chat on a session the studio had kept for 59 minutes was cut mid-reply by the engine with "Your session hit
# the maximum duration of 60 minutes.", said to a visitor who never opened a session.
POOLED_SESSION_MAX_AGE_S = 30 * 60.0


class SessionPool:
    """Connected realtime sessions with empty conversations, kept between chat() calls so a chat does
    not pay for a websocket handshake. Thread-safe; at most `size` idle sessions, each given out only while younger
    than `max_age_s` (older ones wait in retired() to be closed)."""

    def __init__(self, size: int = 4, max_age_s: float = POOLED_SESSION_MAX_AGE_S):
        self.size = size
        self.max_age_s = max_age_s
        self._idle: list = []
        self._retired: list = []
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            while self._idle:
                session = self._idle.pop()
                opened = session.state.connected_at
                if opened is not None and time.monotonic() - opened < self.max_age_s:
                    return session
                self._retired.append(session)
            return None

    def retired(self) -> list:
        """The sessions take() found too old: the caller closes them."""
        with self._lock:
            old, self._retired = self._retired, []
        return old

    def give(self, session) -> bool:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(session)
                return True
        return False

    def drain(self) -> list:
        with self._lock:
            idle, self._idle, self._retired = self._idle + self._retired, [], []
        return idle


def reusable(ev: Event) -> bool:
    """A session whose chat ended with this event may serve the next chat (a normal end; a cancelled,
    failed or lost one is closed)."""
    return isinstance(ev, Done) and ev.finish_reason != "cancelled"


def stale_session(ev: Event, pooled: bool, first: bool) -> bool:
    """A pooled session whose connection died while idle: the chat is retried on a fresh one."""
    return pooled and first and isinstance(ev, Error) and ev.code == "connection_lost"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict]:
    """The objects of a list field (none when it is not a list)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class SessionLog:
    """What this client built in its session (settings, items), so reconnect() can rebuild it."""

    def __init__(self) -> None:
        self.settings: dict = {}
        self.items: list[dict] = []  # {"id": item id, "events": the client events that made it}
        self.audio: list[dict] = []  # appends since the last commit
        self.video: list[dict] = []

    @staticmethod
    def _clean(events: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "event_id"} for e in events]

    def item_made(self, events: list[dict], reply: dict) -> None:
        self.items.append({"id": reply["item"]["id"], "events": self._clean(events)})

    def assistant_reply(self, done_event: dict) -> None:
        """A finished response's assistant item joins the conversation (as text)."""
        for item in _dicts((_dict(done_event.get("response"))).get("output")):  # (another version's shapes: skipped,
            parts = _dicts(item.get("content"))  # the reply's decoder says what it cannot read; they raised here)
            text = "".join(str(p.get("text") or p.get("transcript") or "") for p in parts)
            self.items.append({"id": item.get("id"), "events": [{
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}}]})

    def committed(self, kind: str, commit: dict, reply: dict) -> None:
        """A committed audio / video buffer became an item."""
        self.item_made(getattr(self, kind) + [commit], reply)
        setattr(self, kind, [])

    def forget(self, item_id: str) -> None:
        self.items = [h for h in self.items if h["id"] != item_id]

    def replay(self) -> tuple[dict | None, list[list[dict]]]:
        """(session.update fields or None, the event groups that rebuild each item in order)."""
        return (dict(self.settings) or None), [[dict(e) for e in h["events"]] for h in self.items]

    def rebuilt(self, groups: list[list[dict]], replies: list[dict]) -> None:
        self.items = [{"id": r["item"]["id"], "events": g} for g, r in zip(groups, replies)]


class RealtimeClientBase:
    """What RealtimeClient and AsyncRealtimeClient share: where, how long, and the session state."""

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 reconnect_attempts: int = 3, backoff_s: float = 0.2, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.endpoints = Endpoints.parse(url, token)
        self.timeout = checked_timeout(timeout)
        self.connect_timeout = min(checked_timeout(connect_timeout), self.timeout)
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.state = RealtimeState()
        self.ws = None

    @property
    def session(self) -> dict | None:
        return self.state.session

    def _ws_options(self) -> dict:
        """websockets connect() options: auth, limits, and keepalive pings (a server that stops
        answering is a lost connection after about two `timeout`s)."""
        return {"additional_headers": self.endpoints.headers, "open_timeout": self.connect_timeout,
                "max_size": MAX_MESSAGE_BYTES, "compression": None, "ping_interval": min(PING_S, self.timeout),
                "ping_timeout": self.timeout}


class EngineClientBase:
    """What EngineClient and AsyncEngineClient share."""

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.endpoints = Endpoints.parse(url, token)
        self.timeout = checked_timeout(timeout)
        self.connect_timeout = min(checked_timeout(connect_timeout), self.timeout)  # its realtime sessions' opening
        self._sessions = SessionPool()
        self._openai_info: ModelInfo | None = None  # an OpenAI-compatible backend's model, as last read
        self._openai_routes: dict[str, bool] | None = None  # which of its optional routes answer, probed once
        self._speech_rate: int | None = None  # the talker's own rate, from the model card (0: the card says none)
        self.held_back_check = HeldBackCheck()
        # HELD_BACK_NOTE while the last stream that could tell was held back by a proxy (the banner shows it)
        self.held_back: str | None = None

    def _arrival_clock(self) -> ArrivalClock:
        return ArrivalClock(self.held_back_check)

    def _note_arrivals(self, clock: ArrivalClock, last: list[Event]) -> None:
        """At a stream's end (`last`: its last events, the engine's figures in its Done): HELD_BACK_NOTE kept (and logged, once) when a proxy held it back; forgotten when a
        later stream long enough to tell came as it was made (the proxy was set right). Our engine's streams only: an
        OpenAI-compatible server may send nothing with its headers (it names no place in line)."""
        clock.ended(last)
        if self.openai or not clock.telling():
            return
        held = clock.held_back()
        if held and self.held_back is None:
            log.warning("%s: %s", self.endpoints.http, HELD_BACK_NOTE)
        elif not held and self.held_back is not None:
            log.warning("%s: the engine's streams arrive as they are made again", self.endpoints.http)
        self.held_back = HELD_BACK_NOTE if held else None

    def _speech_rate_unknown(self, modalities: Any) -> bool:
        """True when a chat asking for speech needs the talker's rate and the card was not read yet."""
        return self._speech_rate is None and self._reply_rate_wanted(modalities)

    def _reply_rate_wanted(self, modalities: Any) -> bool:
        return "audio" in modalities and not self.openai

    def _reply_rate(self, modalities: Any) -> int | None:
        """The rate a chat asks its spoken reply in (realtime or HTTP): the talker's own (the card's
        speech_sample_rate, read once), so the reply keeps its full band instead of OpenAI's 24 kHz
        default; None (the server's default) when the card does not say."""
        return (self._speech_rate or None) if self._reply_rate_wanted(modalities) else None

    @property
    def openai(self) -> bool:
        """True for an openai+http(s):// URL: OpenAI's standard routes and fields only."""
        return self.endpoints.openai

    def _refuse_on_openai(self, what: str) -> None:
        """Our extension routes (the voice library, speech options) do not exist on an OpenAI-compatible
        backend: ServerError not_supported_by_engine."""
        if self.openai:
            raise ServerError(f"{what}: not available from this engine, an OpenAI-compatible server with OpenAI's "
                              "standard routes only", "not_supported_by_engine")

    @classmethod
    def from_env(cls, timeout: float = DEFAULT_TIMEOUT):
        """From ENGINE_URL and ENGINE_TOKEN."""
        url, token = env_settings()
        return cls(url, token, timeout)

    def _http_options(self) -> dict:
        return {"base_url": self.endpoints.http, "timeout": self.timeout,
                "headers": {**self.endpoints.headers, "Accept-Encoding": ", ".join(READ_ENCODINGS)}}


def commit_event(kind: str) -> dict:
    """input_audio_buffer.commit / input_video_buffer.commit."""
    return {"type": f"input_{kind}_buffer.commit"}


def clear_event(kind: str) -> dict:
    return {"type": f"input_{kind}_buffer.clear"}


def audio_append_event(samples: Any, sample_rate: int | None) -> dict:
    event = {"type": "input_audio_buffer.append", "audio": b64(pcm16(samples))}
    if sample_rate:
        event["sample_rate"] = int(sample_rate)
    return event


def frame_append_event(image: Any, capture_time: float) -> dict:
    raw, _ = image_bytes(image)
    return {"type": "input_video_buffer.append", "image": b64(raw), "capture_time": float(capture_time)}


def message_event(role: str, content: Any) -> dict:
    check_role({"role": role})
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": role, "content": realtime_content(content, role)}}
