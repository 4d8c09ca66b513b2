"""Text for the talker: segmentation, normalisation and validation (spec §7.9).

1. `Segmenter` accumulates units (English words, numbers, CJK characters, punctuation; whitespace does
   not count) and closes a segment at `！？。，!?` once >= 12 units have accumulated (>= 8 after the
   first segment), at `.` under the same counts unless the previous unit ends in a digit, and at a
   newline (which becomes `，` in Chinese text or `.` after an English letter). It also runs
   incrementally, for speak-while-thinking.
2. `cut_by_semantic_length(max_len=50, min_tail=5)`: semantic length = CJK characters + English words;
   split at sentence enders, then at `，;；`, merge short clauses, hard-split over-long ones; decimals and
   capitalised abbreviations are never split.
3. `normalize`: fragments without CJK get English number normalisation (integers, decimals, ordinals,
   currency, percentages); fragments with CJK get Chinese number readings. Emoji and control characters
   are removed, a leading `，` is dropped.

NOT implemented: upstream's pynini text normaliser (`TalkerTN`; pynini is not available here). What it
does beyond the number readings above (dates, times, units, phone numbers in Chinese context, symbols)
is passed through as written.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from engine.errors import MingError

FIRST_SEGMENT_UNITS = 12
LATER_SEGMENT_UNITS = 8
MAX_SEMANTIC_LEN = 50
MIN_TAIL = 5
MAX_TEXT_CHARS = 10_000  # per request (documented limit; longer texts should be split by the caller)
CLOSERS = set("！？。，!?")
SENTENCE_ENDERS = "。！？!?."
CLAUSE_BREAKS = "，;；"

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT = re.compile(rf"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)*|[{_CJK}]|\s+|.", re.S)
_HAS_CJK = re.compile(f"[{_CJK}]")
_SPEAKABLE = re.compile(rf"[A-Za-z0-9{_CJK}]|[^\W_]")


class TextError(MingError, ValueError):
    code = "invalid_request"


def has_cjk(text: str) -> bool:
    return bool(_HAS_CJK.search(text))


def _is_emoji_or_control(ch: str) -> bool:
    if ch in "\n\t":
        return False
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
        return True
    return cat == "So" or 0x1F000 <= ord(ch) <= 0x1FAFF or 0x2600 <= ord(ch) <= 0x27BF or ord(ch) in (0xFE0F, 0x200D)


def clean_text(text: str) -> str:
    """Drop emoji and control characters; NFKC-normalise full-width letters/digits (not CJK punctuation)."""
    out = []
    for ch in text:
        if _is_emoji_or_control(ch):
            continue
        if ch.isalnum() and unicodedata.east_asian_width(ch) == "F":
            ch = unicodedata.normalize("NFKC", ch)
        out.append(ch)
    return "".join(out)


def is_speakable(text: str) -> bool:
    return bool(_SPEAKABLE.search(text))


def check_text(text, what: str = "text") -> str:
    """Validate user text: a non-empty string of at most MAX_TEXT_CHARS with something to say."""
    if not isinstance(text, str):
        raise TextError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"{what} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise TextError(f"{what} is too long: {len(text)} characters, at most {MAX_TEXT_CHARS} per request "
                        "(split it into several requests)")
    cleaned = clean_text(text)
    if not is_speakable(cleaned):
        raise TextError(f"{what} has nothing to speak: it holds only punctuation, symbols or emoji")
    return cleaned


class Segmenter:
    """Incremental segment closer (step 1). `feed(text)` returns the segments it closed."""

    def __init__(self):
        self.units: list[str] = []
        self.count = 0
        self.closed = 0
        self.pending = ""  # a trailing partial unit (e.g. a word or number still being streamed)

    def _threshold(self) -> int:
        return FIRST_SEGMENT_UNITS if self.closed == 0 else LATER_SEGMENT_UNITS

    def _close(self) -> str | None:
        seg = "".join(self.units).strip()
        self.units, self.count = [], 0
        if seg:
            self.closed += 1
            return seg
        return None

    def _push(self, unit: str, out: list[str]) -> None:
        if unit == "\n" or (unit.isspace() and "\n" in unit):
            prev = next((u for u in reversed(self.units) if not u.isspace()), "")
            if prev and prev[-1] not in CLOSERS and prev[-1] != ".":
                if has_cjk("".join(self.units)):
                    self.units.append("，")
                elif prev[-1].isascii() and prev[-1].isalpha():
                    self.units.append(".")
            seg = self._close()
            if seg:
                out.append(seg)
            return
        self.units.append(unit)
        if unit.isspace():
            return
        self.count += 1
        if self.count >= self._threshold():
            prev = self.units[-2] if len(self.units) >= 2 else ""
            if unit in CLOSERS or (unit == "." and not (prev and prev[-1].isdigit())):
                seg = self._close()
                if seg:
                    out.append(seg)

    def feed(self, text: str) -> list[str]:
        out: list[str] = []
        units = _UNIT.findall(self.pending + text)
        # the last unit may continue in the next delta (a word or number cut mid-stream)
        self.pending = units.pop() if units and re.fullmatch(r"[A-Za-z']+|\d+(?:[.,]\d+)*[.,]?", units[-1]) else ""
        for u in units:
            self._push(u, out)
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        if self.pending:
            for u in _UNIT.findall(self.pending):
                self._push(u, out)
            self.pending = ""
        seg = self._close()
        if seg:
            out.append(seg)
        return out


def semantic_length(text: str) -> int:
    return len(_HAS_CJK.findall(text)) + len(re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text))


_PROTECT = re.compile(r"\d\.\d|\b(?:[A-Z]\.){1,}[A-Z]?|\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e)\.")


def _split_keep(text: str, breaks: str) -> list[str]:
    """Split after each break character, except inside protected spans (decimals, abbreviations)."""
    protected = set()
    for m in _PROTECT.finditer(text):
        protected.update(range(m.start(), m.end()))
    parts, start = [], 0
    for i, ch in enumerate(text):
        if ch in breaks and i not in protected:
            parts.append(text[start:i + 1])
            start = i + 1
    if start < len(text):
        parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _hard_split(text: str, max_len: int) -> list[str]:
    out, cur = [], ""
    for unit in _UNIT.findall(text):
        if cur and semantic_length(cur + unit) > max_len:
            out.append(cur)
            cur = unit.lstrip() if unit.isspace() else unit
        else:
            cur += unit
    if cur.strip():
        out.append(cur)
    return out


def cut_by_semantic_length(text: str, max_len: int = MAX_SEMANTIC_LEN, min_tail: int = MIN_TAIL) -> list[str]:
    if semantic_length(text) <= max_len:
        return [text]
    pieces: list[str] = []
    for sentence in _split_keep(text, SENTENCE_ENDERS):
        if semantic_length(sentence) <= max_len:
            pieces.append(sentence)
            continue
        for clause in _split_keep(sentence, CLAUSE_BREAKS):
            pieces += [clause] if semantic_length(clause) <= max_len else _hard_split(clause, max_len)
    merged: list[str] = []
    for piece in pieces:  # merge short clauses into their neighbour while it stays within max_len
        if merged and (semantic_length(piece) < min_tail or semantic_length(merged[-1]) < min_tail) \
                and semantic_length(merged[-1] + piece) <= max_len:
            merged[-1] += piece
        else:
            merged.append(piece)
    return [m.strip() for m in merged if m.strip()]


# ----------------------------------------------------------------------------- number readings

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
        "twelve": "twelfth"}


def english_number(n: int) -> str:
    if n < 0:
        return "minus " + english_number(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + english_number(n % 100))
    for value, name in _SCALES:
        if n >= value:
            rest = n % value
            return english_number(n // value) + " " + name + ("" if rest == 0 else " " + english_number(rest))
    return str(n)


def english_ordinal(n: int) -> str:
    words = english_number(n)
    head, _, last = words.rpartition(" ")
    base, dash, unit = last.rpartition("-")
    word = unit
    word = _ORD.get(word, word[:-1] + "ieth" if word.endswith("y") else word + "th")
    last = base + dash + word
    return (head + " " + last) if head else last


def _english_decimal(text: str) -> str:
    whole, _, frac = text.partition(".")
    out = english_number(int(whole or 0))
    return out + (" point " + " ".join(_ONES[int(d)] for d in frac) if frac else "")


def normalize_english_numbers(text: str) -> str:
    def money(m):
        whole, cents = m.group(1).replace(",", ""), m.group(2)
        words = english_number(int(whole)) + (" dollar" if whole == "1" else " dollars")
        if cents and int(cents):
            words += " and " + english_number(int(cents)) + (" cent" if int(cents) == 1 else " cents")
        return words
    text = re.sub(r"\$(\d[\d,]*)(?:\.(\d\d))?", money, text)
    text = re.sub(r"(\d+(?:\.\d+)?)%", lambda m: _english_decimal(m.group(1)) + " percent", text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: english_ordinal(int(m.group(1))), text)
    text = re.sub(r"\d{1,3}(?:,\d{3})+", lambda m: m.group(0).replace(",", ""), text)
    text = re.sub(r"\d+\.\d+", lambda m: _english_decimal(m.group(0)), text)
    return re.sub(r"\d+", lambda m: english_number(int(m.group(0))) if len(m.group(0)) <= 15
                  else " ".join(_ONES[int(d)] for d in m.group(0)), text)


_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ["", "十", "百", "千"]
_ZH_BIG = ["", "万", "亿", "万亿"]


def _zh_under_10000(n: int) -> str:
    out, zero = "", False
    for i in range(3, -1, -1):
        d = (n // 10**i) % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out += "零"
            zero = False
        out += _ZH_DIGITS[d] + _ZH_UNITS[i]
    return out


def chinese_number(n: int) -> str:
    if n == 0:
        return "零"
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    out = ""
    for i in range(len(groups) - 1, -1, -1):
        g = groups[i]
        if g == 0:
            if out and not out.endswith("零"):
                out += "零"
            continue
        if out and g < 1000 and not out.endswith("零"):
            out += "零"
        out += _zh_under_10000(g) + _ZH_BIG[i]
    out = out.rstrip("零")
    return out[1:] if out.startswith("一十") else out


def _zh_digits(s: str) -> str:
    return "".join(_ZH_DIGITS[int(d)] for d in s)


def chinese_reading(number: str) -> str:
    """'1,234.5' -> 一千二百三十四点五; long or zero-led digit strings are read digit by digit."""
    whole, _, frac = number.replace(",", "").partition(".")
    if len(whole) > 12 or (len(whole) > 1 and whole.startswith("0")):
        out = _zh_digits(whole)
    else:
        out = chinese_number(int(whole))
    return out + ("点" + _zh_digits(frac) if frac else "")


def normalize_chinese_numbers(text: str) -> str:
    text = re.sub(r"(\d+(?:\.\d+)?)%", lambda m: "百分之" + chinese_reading(m.group(1)), text)
    return re.sub(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", lambda m: chinese_reading(m.group(0)), text)


def normalize(fragment: str) -> str:
    text = clean_text(fragment).strip()
    text = normalize_chinese_numbers(text) if has_cjk(text) else normalize_english_numbers(text)
    text = re.sub(r"[ \t]+", " ", text).strip()
    return text[1:].lstrip() if text.startswith("，") else text


@dataclass
class Fragment:
    text: str      # what the talker reads (normalised)
    source: str    # the span of the user's text it speaks


def segment_text(text: str) -> list[Fragment]:
    """Steps 1-4: the fragments to synthesise one by one (unspeakable ones dropped)."""
    seg = Segmenter()
    segments = seg.feed(text) + seg.flush()
    return fragments_of(segments)


def fragments_of(segments: list[str]) -> list[Fragment]:
    out = []
    for s in segments:
        for piece in cut_by_semantic_length(s):
            norm = normalize(piece)
            if is_speakable(norm):
                out.append(Fragment(norm, piece))
    return out
