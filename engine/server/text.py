"""Text a client sends, at the boundary: the one policy for text that is not valid Unicode, and the
bound on prompt text that the model's context implies.

Invalid text. JSON lets a lone UTF-16 surrogate through as an escape ("\\ud800"), Python's JSON reader
lets raw CESU-8 bytes through as the same, and a multipart form field or a body may hold bytes that
are not UTF-8 at all. None of it is text the tokenizer (or anything after it) can take, so every
request body, form field and realtime event is checked once, as it arrives, and refused whole with
`invalid_text` naming the field (`messages[0].content`, `session.instructions` ...): nothing of it is
applied, a realtime session carries on. (A websocket text frame that is not UTF-8 never reaches the
app: the websocket layer closes the connection with 1007, as RFC 6455 requires.)

Prompt bound. A prompt of more characters than `context tokens x the most characters one token
stands for` cannot fit the context whatever the tokenizer makes of it (each token covers at most
that many characters), so such text is refused before anything tokenises it: cheap (a length sum),
where tokenising 15 MiB took ~10 s and ~3 GiB. The same bound is a realtime session's text budget.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from engine.server.protocol import ApiError

_SURROGATE = re.compile("[\ud800-\udfff]")
# A tokenizer normalizer may compose characters (NFC: "e" + U+0301 -> "é"), so a token may then stand
# for more input characters than its own length: the bound allows this many input characters per
# token character when the tokenizer has one.
NORMALIZER_SLACK = 4


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _printable(key: str) -> str:
    """A key as it can be named in an error (a lone surrogate written as its JSON escape)."""
    return "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in key)


def invalid_text_path(value: Any, root: str = "") -> str | None:
    """The path of the first string or object key in a parsed JSON value that holds a lone surrogate
    (`messages[0].content[1].text`; a bad key is named as written, escaped), else None."""
    stack = [(value, root)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path or "body"
        elif isinstance(value, dict):
            names = [f"{path}.{_printable(key)}" if path else _printable(key) for key in value]
            bad = next((name for key, name in zip(value, names) if _has_surrogate(key)), None)
            if bad is not None:
                return bad
            stack.extend(reversed(list(zip(value.values(), names))))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


INVALID = ("it holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape that is not half of a pair) or bytes "
           "that are not UTF-8 (CESU-8 or another encoding)")


def invalid_text(param: str, what: str = INVALID) -> ApiError:
    return ApiError(f"'{param}' is not valid Unicode text: {what}; send UTF-8 text", code="invalid_text",
                    param=param)


def check_text(value: Any, root: str = "") -> None:
    """Refuse a parsed request or event holding text that is not valid Unicode (see the module doc)."""
    path = invalid_text_path(value, root)
    if path is not None:
        raise invalid_text(path)


def parse_json_text(raw: bytes) -> Any:
    """A JSON body (UTF-8; a BOM is skipped) parsed, with every string checked: bytes that are not
    UTF-8 are kept as lone surrogates (surrogateescape) so the error can name the field they are in.
    Raises ValueError (not JSON) or ApiError (invalid_text)."""
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    value = json.loads(text)
    check_text(value)
    return value


def check_url_text(scope: dict) -> None:
    """Refuse a request whose URL path or query, percent-decoded, is not UTF-8 (uvicorn would turn
    such bytes into U+FFFD, changing a voice name or a model id into other text)."""
    for param, raw in (("path", scope.get("raw_path") or b""), ("query", scope.get("query_string") or b"")):
        if b"%" in raw or not raw.isascii():
            check_utf8(unquote_to_bytes(raw.replace(b"+", b" ")), param)


def check_utf8(data: bytes, param: str) -> None:
    """Refuse bytes that are not UTF-8 (a multipart text field)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid_text(param, f"byte {e.start} ({data[e.start:e.start + 1]!r}) is not UTF-8") from None


# --------------------------------------------------------------------------- the prompt bound

@dataclass(frozen=True)
class PromptBound:
    """`context_tokens` x `chars_per_token`: the most characters of text a prompt can hold and still
    fit the model's context. None (no bound) for an engine that says neither."""

    context_tokens: int
    chars_per_token: int

    @property
    def max_chars(self) -> int:
        return self.context_tokens * self.chars_per_token

    def describe(self) -> str:
        return (f"this model's context of {self.context_tokens:,} tokens holds at most {self.max_chars:,} characters "
                f"of text ({self.chars_per_token} characters per token at most)")

    def check(self, chars: int, what: str, param: str | None = None) -> None:
        """context_length_exceeded when `chars` of text cannot fit."""
        if chars > self.max_chars:
            raise ApiError(f"{what} hold {chars:,} characters of text: {self.describe()}, so they cannot fit",
                           code="context_length_exceeded", param=param)

    @classmethod
    def of_engine(cls, engine) -> "PromptBound | None":
        """From the loaded checkpoint: its LLM's max_position_embeddings and its tokenizer.json."""
        try:
            context = int(engine.model.config.llm.max_position_embeddings)
            path = Path(engine.model.path) / "tokenizer.json"
        except (AttributeError, TypeError, ValueError):
            return None
        per_token = chars_per_token(str(path))
        return None if per_token is None or context <= 0 else cls(context, per_token)


@lru_cache(maxsize=8)
def chars_per_token(tokenizer_json: str) -> int | None:
    """The most input characters one token of this tokenizer can stand for: its longest vocabulary
    entry or added token (a byte-level token's length is the bytes it stands for, at least as many
    as the characters), times NORMALIZER_SLACK when a normalizer may compose characters."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    try:
        tok = Tokenizer.from_file(tokenizer_json)
        with open(tokenizer_json, encoding="utf-8") as f:
            has_normalizer = json.load(f).get("normalizer") is not None
    except Exception:  # no readable tokenizer (the tokenizers library raises plain Exception): no bound
        return None
    longest = max((len(t) for t in tok.get_vocab(with_added_tokens=True)), default=0)
    return longest * (NORMALIZER_SLACK if has_normalizer else 1) or None


def text_chars(value: Any) -> int:
    """Characters of text in engine message content: a string, or parts' "text" fields."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(p["text"]) for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
