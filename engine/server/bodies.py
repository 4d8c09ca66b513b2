"""Reading HTTP request bodies, for every endpoint: the content type an endpoint takes, the size
limit, JSON (UTF-8, every string checked by engine.server.text), multipart forms (text fields must
be UTF-8; starlette would read other bytes as Latin-1), form fields by kind, and a client that goes
away mid-upload (ClientGone: one log line and a count, see engine.server.logs).

Content types: a JSON endpoint takes `application/json` or any `application/*+json`, with no charset
or UTF-8; an upload endpoint takes `multipart/form-data`, with no charset or UTF-8 too. Anything else (text/plain, a form, no
Content-Type at all) is refused with 415 `unsupported_content_type` naming what the endpoint takes,
before the body is read.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect

from engine.server.codec import bad, need_dict
from engine.server.limits import human_bytes
from engine.server.protocol import ApiError, media_type
from engine.server.text import check_json_values, check_utf8, json_error, parse_json_text

JSON = "application/json"
MULTIPART = "multipart/form-data"


class ClientGone(Exception):
    """The client went away before its request was read (`kind` as counted in /health)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def content_type(request: Request) -> tuple[str, dict[str, str]]:
    """(media type in lower case, parameters) of the request's Content-Type ("" when absent)."""
    return media_type(request.headers.get("content-type", ""))


def is_json(mime: str) -> bool:
    return mime == JSON or (mime.startswith("application/") and mime.endswith("+json"))


def body_kind(request: Request, takes: tuple[str, ...]) -> str:
    """JSON or MULTIPART, whichever of `takes` the request's Content-Type is; else 415."""
    mime, options = content_type(request)
    charset = options.get("charset", "utf-8").lower()
    if JSON in takes and is_json(mime):
        if charset in ("utf-8", "utf8"):
            return JSON
        why = f"a JSON body must be UTF-8, this one says charset={charset}"
    elif MULTIPART in takes and mime == MULTIPART:
        if charset in ("utf-8", "utf8"):
            return MULTIPART
        # (starlette decoded the form's field names and text by it: a UTF-8 body's 'model' read as '浯敤' ...)
        why = f"a form's field names and text are read as UTF-8, this one says charset={charset}"
    else:
        why = f"got {mime!r}" if mime else "the request has no Content-Type"
    wanted = " or ".join(f"'Content-Type: {t}'" for t in takes)
    raise ApiError(f"{request.url.path} takes {' or '.join(takes)}: send the body with {wanted} ({why})",
                   code="unsupported_content_type", status=415)


def body_decoder(request: Request):
    """A zlib decompressor for the body's Content-Encoding (gzip or deflate), None for none ("identity");
    any other coding (br, zstd, two codings ...) is refused with 415 before the body is read: a server that
    ignored the header would read compressed bytes as JSON (an 'invalid JSON' that hides the cause) or
    take a body whose coding it never checked."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.decompressobj()
    raise ApiError(f"Content-Encoding {coding[:40]!r} is not supported: send the body uncompressed, or with "
                   "Content-Encoding gzip or deflate", code="unsupported_content_encoding", status=415)


def decoded_chunk(decoder, chunk: bytes, room: int, what: str, limit: int) -> bytes:
    """One compressed piece decoded, refused (413) as soon as the decoded body passes `limit` (a small
    gzip body may expand to gigabytes: it is never decoded past the limit)."""
    try:
        out = decoder.decompress(chunk, room + 1)
    except zlib.error as e:
        raise bad(f"the body is not valid for its Content-Encoding ({e})", "invalid_content_encoding") from None
    if len(out) > room or decoder.unconsumed_tail:
        raise ApiError(f"{what} too large: more than {human_bytes(limit)} once decoded (Content-Encoding)",
                       code="payload_too_large", status=413)
    return out


def check_decoded_whole(decoder) -> None:
    """A compressed body must be exactly one compressed stream: one cut short is refused, and so are bytes after
    its end (a second gzip member, anything appended), which zlib sets aside: they were silently dropped, and
    the request was answered from the first part alone."""
    if not decoder.eof:
        raise bad("the body ends before its compressed stream does (Content-Encoding): send the whole body",
                  "invalid_content_encoding")
    if decoder.unused_data:
        raise bad(f"the body goes on for {len(decoder.unused_data)} bytes after its compressed stream ends "
                  "(Content-Encoding; a second gzip member?): send one compressed stream and nothing after it",
                  "invalid_content_encoding")


@dataclass(frozen=True)
class BodyPace:
    """How a request body must keep arriving (Limits.body_idle_timeout_s, body_rate_grace_s, min_body_bytes_per_s):
    no pause of `idle_s`, and once `grace_s` have passed since it began, `min_bytes_per_s` on average. A body trickled
    a few bytes now and then, each piece within the pause, held its request and connection for as long as its client
    liked: 512 such bodies took every connection the server has."""

    idle_s: float
    grace_s: float
    min_bytes_per_s: float

    @classmethod
    def of(cls, limits) -> "BodyPace":
        return cls(limits.body_idle_timeout_s, limits.body_rate_grace_s, limits.min_body_bytes_per_s)

    def check(self, received: int, elapsed_s: float) -> None:
        """Refuse (408) a body that has come at under `min_bytes_per_s` on average, past the grace."""
        if elapsed_s > self.grace_s and received < self.min_bytes_per_s * elapsed_s:
            raise ApiError(f"the request body arrives too slowly: {received} bytes in {elapsed_s:.1f} s "
                           f"({received / elapsed_s:.0f} bytes/s); after its first {self.grace_s:g} s a body must "
                           f"arrive at {self.min_bytes_per_s:g} bytes/s or more on average: send the whole body at "
                           "once", code="request_timeout", status=408)


async def arriving_chunks(request: Request, pace: BodyPace):
    """The body's pieces as they arrive; a client that sends none for `pace.idle_s` seconds (a Content-Length it never
    fills, a chunked body that stops without its last chunk, while the connection stays open), or too slowly
    (BodyPace.check), is refused with 408: uvicorn itself waits for the rest forever, holding the request and its
    connection."""
    pieces, started, received = request.stream(), time.monotonic(), 0
    while True:
        try:
            piece = await asyncio.wait_for(anext(pieces), pace.idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(f"the request body stopped arriving: no byte for {pace.idle_s:g} s before it ended (a "
                           "Content-Length larger than the body sent, or a chunked body without its last chunk): "
                           "send the whole body", code="request_timeout", status=408) from None
        received += len(piece)
        pace.check(received, time.monotonic() - started)
        yield piece


async def read_body(request: Request, limit: int, what: str, pace: BodyPace) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes (decoded, for a compressed body), and
    (408) when it stops arriving or arrives too slowly (BodyPace)."""
    decoder = body_decoder(request)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(f"{what} too large: {human_bytes(int(declared))}, the limit is {human_bytes(limit)}",
                               code="payload_too_large", status=413)
        except ValueError:
            raise bad("invalid Content-Length header", "invalid_request") from None
    chunks, size, decoded = [], 0, 0
    try:
        async for chunk in arriving_chunks(request, pace):
            size += len(chunk)
            if size > limit:
                raise ApiError(f"{what} too large: more than {human_bytes(limit)}", code="payload_too_large",
                               status=413)
            if decoder is not None:
                chunk = decoded_chunk(decoder, chunk, limit - decoded, what, limit)
                decoded += len(chunk)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("truncated_upload", f"{request.method} {request.url.path}: the client left after "
                                             f"{size} of {declared or 'unknown'} bytes") from None
    if decoder is not None:
        check_decoded_whole(decoder)
    body = b"".join(chunks)
    request._body = body  # later parsing (forms) reads it from here
    return body


async def read_json(request: Request, limits) -> dict:
    """A JSON object body (the Content-Type checked first, then the size and number of values; every string
    valid text)."""
    body_kind(request, (JSON,))
    return await json_body(request, limits)


async def json_body(request: Request, limits) -> dict:
    body = await read_body(request, limits.max_request_bytes, "request body", BodyPace.of(limits))
    check_json_values(body, limits.max_json_values, "the body")
    try:
        data = parse_json_text(body)
    except (ValueError, RecursionError) as e:
        raise bad(f"the body is not valid JSON: {json_error(e)}", "invalid_json") from None
    # a field set to null is a field left out (OpenAI's optional fields are nullable: clients that build bodies
    # from typed objects send {"n": null, "response_format": null}); every endpoint then applies its default
    return {key: value for key, value in need_dict(data, "body").items() if value is not None}


class StrictMultiPartParser(MultiPartParser):
    """starlette's parser, refusing a text field or a field name that is not UTF-8 (starlette reads
    such bytes as Latin-1, which would turn them into other text)."""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        if self._charset == "utf-8" and b"name" in options:
            check_utf8(options[b"name"], "field name")
        super().on_headers_finished()

    def on_part_end(self) -> None:
        if self._current_part.file is None and self._charset == "utf-8":
            check_utf8(bytes(self._current_part.data), self._current_part.field_name)
        super().on_part_end()


async def read_form(request: Request, limits, max_files: int, max_fields: int = 64) -> FormData:
    """A multipart form within the upload limit (close it when done); malformed: invalid_multipart."""
    body_kind(request, (MULTIPART,))
    return await form_body(request, limits, max_files, max_fields)


async def form_body(request: Request, limits, max_files: int, max_fields: int = 64) -> FormData:
    body = await read_body(request, limits.max_upload_bytes, "upload", BodyPace.of(limits))
    check_closed(body, content_type(request)[1].get("boundary"))
    parser = StrictMultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields,
                                   max_part_size=1024 * 1024)
    try:
        return await parser.parse()
    except ApiError:
        raise
    except Exception as e:  # MultiPartException, or malformed multipart of any other kind
        raise bad(f"the multipart body could not be parsed: {multipart_reason(e)[:200]}", "invalid_multipart") from None


def multipart_reason(error: Exception) -> str:
    """What is wrong with a multipart body: starlette says "Invalid multipart data." for whatever its
    parser refused; the parser's own error says what (a part's header line over its limit: a file or
    field name of thousands of characters)."""
    from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE  # noqa: PLC0415

    cause = error.__cause__
    if cause is None:
        return str(error)
    if "header size" in str(cause):
        return (f"a part's header line is longer than {DEFAULT_MAX_HEADER_SIZE:,} bytes (a file name or field name "
                "that long?): shorten the file name")
    return f"{error} ({cause})"


def check_closed(body: bytes, boundary: str | None) -> None:
    """A multipart body must hold its closing boundary ('--B--', an epilogue may follow): the parser
    silently drops a part cut off before it (an upload that lost its end would read as a missing field)."""
    if boundary and b"--" + boundary.encode("latin-1") + b"--" not in body:
        raise bad(f"the multipart body ends before its closing boundary '--{boundary[:70]}--' (cut off or "
                  "malformed): send the whole form", "invalid_multipart")


def form_value(form, name: str):
    """The one value of a form field that takes one (None when it is absent). A field sent twice is refused:
    which of its values the client meant cannot be told (a multipart parser keeps either the first or the last)."""
    values = form.getlist(name)
    if len(values) > 1:
        raise bad(f"'{name}' is sent {len(values)} times in the form; send it once", "invalid_value", name)
    return values[0] if values else None


async def form_file(form, name: str, what: str) -> bytes:
    """The bytes of a required file field."""
    upload = form_value(form, name)
    if upload is None or isinstance(upload, str):
        raise bad(f"'{name}' ({what}) is required", "missing_field", name)
    return await upload.read()


def form_text(form, name: str, max_len: int = 100_000) -> str | None:
    value = form_value(form, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a text field, not a file", "invalid_type", name)
    if len(value) > max_len:
        raise bad(f"'{name}' is too long ({len(value):,} characters; at most {max_len:,})", "invalid_value", name)
    return value


# a form field's number as a client writes one: ASCII digits, an optional sign, point and exponent ('0.5', '.5', '1e-05')
FORM_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def form_number(form, name: str):
    """A number field's value (int, or float when written with a point or exponent; None when absent or empty).
    Python's int() and float() took more than numbers: '1_000' read as 1000, Arabic-Indic digits ('٣') as 3."""
    value = form_text(form, name, 64)
    if value is None or value == "":
        return None
    if not FORM_NUMBER.fullmatch(value.strip()):
        raise bad(f"'{name}' must be a number, got {value[:40]!r}", "invalid_type", name)
    return float(value) if any(c in value for c in ".eE") else int(value)


def form_flag(form, name: str) -> bool:
    value = form_text(form, name, 16)
    if value is None:
        return False
    if value.lower() not in ("true", "false", "1", "0"):
        raise bad(f"'{name}' must be true or false", "invalid_type", name)
    return value.lower() in ("true", "1")
