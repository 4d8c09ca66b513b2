"""Media given as a string the way the reference's fetch_image / fetch_video take it (Qwen-VL's vision
utilities, which the Ming processors call): ``file://PATH`` is PATH, ``data:...;base64,DATA`` is the decoded
bytes, anything else a local path. http(s) URLs are refused: the engine never fetches media from the network
(download the file first; the server refuses URLs too)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import MediaError

FILE_SCHEME = "file://"
BASE64_MARK = "base64,"


def local_source(source: Any, kind: str) -> Any:
    """`source` with a file:// or data: string resolved (a path string, or bytes); other values unchanged."""
    if not isinstance(source, str):
        return source
    if source.startswith(FILE_SCHEME):
        return source[len(FILE_SCHEME):]  # (as the reference cuts it: no percent-decoding)
    if source.startswith("data:"):
        if BASE64_MARK not in source:
            raise MediaError(f"{kind} data: URL is not base64 (expected 'data:<type>;base64,<data>')")
        try:
            return base64.b64decode(source.split(BASE64_MARK, 1)[1], validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"{kind} data: URL holds invalid base64 ({e})") from None
    if source.startswith(("http://", "https://")):
        raise MediaError(f"{kind} URLs are not fetched ({source[:80]}): download the file and give its path or bytes")
    return source
