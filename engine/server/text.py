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
Text under it that may still not fit is counted on a thread with the checkpoint's tokenizer (whose
batch call releases the interpreter lock, unlike the engine's own per-text call) and refused when
its tokens and the tokens asked for pass the context, before it is queued.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from engine.errors import ECHO_CHARS, shown
from engine.server.auth import redact_token
from engine.server.protocol import ApiError

_SURROGATE = re.compile("[\ud800-\udfff]")
# A tokenizer normalizer may compose characters (NFC: "e" + U+0301 -> "é"; Greek and Vietnamese letters
# compose with up to 3 marks), so a token may then stand for more input characters than its own
# length: the bound allows this many input characters per token character under these normalizers.
# Others may drop any amount of text (Strip, Replace, BertNormalizer's cleaning): no characters bound
# then (the token count still applies).
NORMALIZER_SLACK = 4
COMPOSING_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Sequence")


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _printable(key: str) -> str:
    """A key as it can be named in an error (a lone surrogate written as its JSON escape)."""
    return "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in key)


def _holds_surrogate(value: Any) -> bool:
    """Whether any string or key in a parsed JSON value holds a lone surrogate (no paths built: the walk that names
    the field runs only when there is one to name). C's JSON encoder writes them all and UTF-8 refuses a surrogate:
    a Python walk, or a regex over the text telling lone escapes from pairs, held the event loop 2.5 s for a 30 MB
    body of escaped emoji."""
    try:
        json.dumps(value, ensure_ascii=False, check_circular=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):  # (an integer past Python's digit limit: LongInteger)
        return _walk_holds_surrogate(value)
    return False


def _walk_holds_surrogate(value: Any) -> bool:
    """_holds_surrogate in Python, for a value the JSON encoder cannot write."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return True
        elif isinstance(value, dict):
            if any(_has_surrogate(key) for key in value):
                return True
            stack.extend(v for v in value.values() if not isinstance(v, (int, float, bool)) and v is not None)
        elif isinstance(value, list):
            stack.extend(v for v in value if not isinstance(v, (int, float, bool)) and v is not None)
    return False


# JSON text that can decode to a surrogate: a \\uD800-\\uDFFF escape (half of an escaped pair too: Python's json.dumps
# writes every emoji so; _holds_surrogate then tells a lone one quickly)
_ANY = r"\\u[dD][89a-fA-F]"
_PATTERNS = {str: re.compile(_ANY), bytes: re.compile(_ANY.encode())}


def json_may_hold_surrogates(text: str | bytes) -> bool:
    """Whether JSON text (valid UTF-8) may decode to a string holding a lone surrogate: only through a
    \\uD8xx-\\uDFxx escape. When not, the check of every value is skipped."""
    return _PATTERNS[type(text)].search(text) is not None


def invalid_text_path(value: Any, root: str = "") -> str | None:
    """The path of the first string or object key in a parsed JSON value that holds a lone surrogate
    (`messages[0].content[1].text`; a bad key is named as written, escaped), else None."""
    if not _holds_surrogate(value):
        return None
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


def check_json_values(text: str | bytes, limit: int, what: str) -> None:
    """Refuse JSON text of more than `limit` values before parsing it: json.loads holds the event loop (and the
    GIL) for the whole parse, ~1 s per million values, so one body of millions of tiny values stalled every
    stream and session. Counted by commas (a value but the first of a list or object follows one; commas in
    strings count too): an image's base64 has none, and text with that many cannot fit a model's context."""
    if len(text) > limit and text.count("," if isinstance(text, str) else b",") >= limit:
        raise ApiError(f"{what} holds more than {limit} JSON values (counted by its commas): more than any request "
                       f"needs, and text that long does not fit the model's context", code="too_many_json_values",
                       status=413)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different (json.loads' object_pairs_hook). A key sent twice is refused:
    which of its values the client meant cannot be told (json.loads silently kept the last one), as with a form
    field sent twice (engine.server.bodies.form_value)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ApiError(f"the key {shown(_printable(key))} appears more than once in one JSON object; send it once",
                       code="invalid_json", param=_printable(key)[:ECHO_CHARS])
    return obj


class LongInteger(int):
    """A JSON integer of more digits than Python converts to an int (sys.get_int_max_str_digits: a body was 'not valid
    JSON: Exceeds the limit (4300 digits) for integer string conversion ... use sys.set_int_max_str_digits()', naming
    no field). Its value lies past every bound (plus or minus 10**digits), so the field's own check refuses it
    naming the field; its text is the client's, for that error to quote (cut: engine.errors.shown_number)."""

    def __new__(cls, text: str):
        magnitude = 10 ** sys.get_int_max_str_digits()
        number = super().__new__(cls, -magnitude if text.startswith("-") else magnitude)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


LongInteger.__name__ = "int"  # (what an error saying a field's type names: "must be a string, got int")


def json_integer(text: str) -> int:
    """A JSON integer as json.loads' parse_int: an int, or a LongInteger past Python's digit limit."""
    limit = sys.get_int_max_str_digits()
    return LongInteger(text) if limit and len(text.lstrip("-")) > limit else int(text)


def loads_json(text: str) -> Any:
    """JSON text parsed (a leading BOM skipped, in a body and in a realtime event alike), each object's keys unique
    (unique_keys), integers of any length (json_integer); ValueError or RecursionError when not JSON."""
    return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=unique_keys, parse_int=json_integer)


def json_error(e: ValueError | RecursionError) -> str:
    """What is wrong with JSON text that did not parse (`e`: loads_json's error), for a client: a structure nested past
    what Python's parser takes (about a thousand levels) was told as 'maximum recursion depth exceeded while decoding
    a JSON array from a unicode string'."""
    if isinstance(e, RecursionError):
        return f"its arrays and objects nest deeper than this server parses (about {sys.getrecursionlimit()} levels)"
    return str(e)[:120]


def parse_json_text(raw: bytes) -> Any:
    """A JSON body (UTF-8; a BOM is skipped) parsed, with every string checked: bytes that are not
    UTF-8 are kept as lone surrogates (surrogateescape) so the error can name the field they are in.
    Raises ValueError (not JSON) or ApiError (invalid_text)."""
    try:
        text, suspect = raw.decode("utf-8"), json_may_hold_surrogates(raw)
    except UnicodeDecodeError:
        text, suspect = raw.decode("utf-8", "surrogateescape"), True
    value = loads_json(text)
    if suspect:
        check_text(value)
    return value


def check_url_text(scope: dict) -> None:
    """Refuse a request whose URL path or query, percent-decoded, is not UTF-8 (uvicorn would turn
    such bytes into U+FFFD, changing a voice name or a model id into other text), or holds a control
    character (check_url_controls)."""
    for param, raw in (("path", scope.get("raw_path") or b""), ("query", scope.get("query_string") or b"")):
        if b"%" in raw or not raw.isascii():
            check_utf8(unquote_to_bytes(raw.replace(b"+", b" ")), param)
        check_url_controls(raw, param)


CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's Cc: C0, DEL and C1 (U+009B: a terminal's CSI)


def check_url_controls(raw: bytes, param: str) -> None:
    """Refuse a URL path or query (`param`, valid UTF-8 once percent-decoded) holding a control character once
    percent-decoded ('%00', '%0A', '%1B', '%C2%9B'; h11 refuses one sent raw): no route's path or parameter has one; the
    404 that named the path sent the character back (a NUL in its message), a path with '%0A' lost it (the URL parser
    strips newlines), and a query's was passed on. The message quotes it as sent, a token in it redacted."""
    found = CONTROL_CHARACTER.search(unquote_to_bytes(raw).decode("utf-8", "replace")) if b"%" in raw else None
    if found is not None:
        quoted = shown(redact_token(raw.decode("latin-1")))
        raise ApiError(f"the request {param} {quoted} holds a control character once "
                       f"percent-decoded (U+{ord(found.group()):04X}); no route's {param} has one: send the {param} "
                       "without it", code="invalid_request", param=param)


def check_utf8(data: bytes, param: str) -> None:
    """Refuse bytes that are not UTF-8 (a multipart text field)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid_text(param, f"byte {e.start} ({data[e.start:e.start + 1]!r}) is not UTF-8") from None


# --------------------------------------------------------------------------- the prompt bound

@dataclass(frozen=True)
class PromptBound:
    """What a prompt's text can hold and still fit the model's context: at most `context_tokens` x
    `chars_per_token` characters (checked by a length sum), and at most `context_tokens` tokens
    (counted, off the event loop, when the text is long enough to need it)."""

    context_tokens: int
    chars_per_token: int | None  # None: the tokenizer's normalizer may drop text, no characters bound
    tokenizer_json: str

    @property
    def max_chars(self) -> int | None:
        return None if self.chars_per_token is None else self.context_tokens * self.chars_per_token

    def describe(self) -> str:
        return (f"this model's context of {self.context_tokens:,} tokens holds at most {self.max_chars:,} characters "
                f"of text (a token stands for {self.chars_per_token} character{'s' if self.chars_per_token > 1 else ''} "
                "at most)")

    def check(self, chars: int, what: str, param: str | None = None) -> None:
        """context_length_exceeded when `chars` of text cannot fit (before anything tokenises it)."""
        if self.max_chars is not None and chars > self.max_chars:
            raise ApiError(f"{what} ({chars:,} characters of text) cannot fit: {self.describe()}",
                           code="context_length_exceeded", param=param)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens of `texts`, each tokenised on its own as the engine's prompt builder does (user text:
        special tokens not parsed). Blocking but lock-free: the tokenizer's batch call releases the
        interpreter lock, so run it on a thread and the event loop keeps serving."""
        tok = plain_tokenizer(self.tokenizer_json)
        return sum(len(e.ids) for e in tok.encode_batch([t for t in texts if t], add_special_tokens=False))

    async def check_tokens(self, texts: list[str], max_new_tokens: int, what: str, param: str | None = None) -> int | None:
        """context_length_exceeded when the tokens of `texts` plus `max_new_tokens` pass the context;
        counted on a thread, and only when the text is long enough to possibly not fit (each token is
        at least one UTF-8 byte). Returns the count (None when not counted)."""
        if 4 * sum(map(len, texts)) + max_new_tokens <= self.context_tokens:
            return None
        n = await asyncio.to_thread(self.count_tokens, texts)
        if n + max_new_tokens > self.context_tokens:
            raise ApiError(f"{what} ({n:,} tokens of text) and {max_new_tokens:,} more tokens asked for pass "
                           f"this model's context of {self.context_tokens:,} tokens", code="context_length_exceeded",
                           param=param)
        return n

    @classmethod
    def of_engine(cls, engine) -> "PromptBound | None":
        """From the loaded checkpoint: its LLM's max_position_embeddings and its tokenizer.json."""
        try:
            context = int(engine.model.config.llm.max_position_embeddings)
            path = str(Path(engine.model.path) / "tokenizer.json")
        except (AttributeError, TypeError, ValueError):
            return None
        try:
            plain_tokenizer(path)
        except Exception:  # no readable tokenizer (the tokenizers library raises plain Exception)
            return None
        return cls(context, chars_per_token(path), path) if context > 0 else None


@lru_cache(maxsize=8)
def plain_tokenizer(tokenizer_json: str):
    """The checkpoint's tokenizer as the engine encodes user text with it (special tokens not parsed)."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True
    return tok


@lru_cache(maxsize=8)
def chars_per_token(tokenizer_json: str) -> int | None:
    """The most input characters one token of this tokenizer can stand for, from its own file: for a
    BPE model, one symbol or the longest merge result (a whole vocabulary entry when the model may
    take a word as it is, `ignore_merges`); for other models the longest vocabulary entry; and the
    longest added token user text can still contain (a non-special one). A byte-level token's length
    is the bytes it stands for, at least as many as the characters. Times NORMALIZER_SLACK when a
    normalizer may compose characters; None when one may drop text (see COMPOSING_NORMALIZERS)."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        vocab = model.get("vocab") or {}
        entries = list(vocab) if isinstance(vocab, dict) else [v[0] for v in vocab]  # BPE/WordPiece, Unigram
        if model.get("type") == "BPE" and not model.get("ignore_merges"):
            merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
            longest = max((len(a) + len(b) for a, b in merges), default=1)
        else:
            longest = max(map(len, entries), default=0)
        added = [t["content"] for t in spec.get("added_tokens") or [] if not t.get("special")]
        longest = max([longest, *map(len, added)])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no readable tokenizer: no bound
        return None
    normalizer = spec.get("normalizer")
    if normalizer is None:
        return longest or None
    kinds = {normalizer.get("type")} | {n.get("type") for n in normalizer.get("normalizers") or []}
    return longest * NORMALIZER_SLACK if kinds <= set(COMPOSING_NORMALIZERS) and longest else None


def texts_of(value: Any) -> list[str]:
    """The text pieces of message content as the prompt builder tokenises them: a string, or each
    text part's "text" (an assistant refusal part's "refusal", which is read as its text)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for p in value if isinstance(p, dict)
                for text in (p.get("refusal") if p.get("type") == "refusal" else p.get("text"),)
                if isinstance(text, str)]
    return []


def text_chars(value: Any) -> int:
    """Characters of text in message content (see texts_of)."""
    return sum(map(len, texts_of(value)))
