"""Text for the talker: segmentation, normalisation and validation (spec §7.9).

1. `Segmenter` accumulates the characters of the text (spaces count) and closes a segment at
   `！？。，!?` once >= 12 have accumulated (>= 8 once a fragment exists), at `.` under the same counts
   unless a digit precedes it, and at a newline under the same counts (the newline becomes `，` after
   a CJK character in Chinese text, `.` after an English letter in other text, else nothing). Ours: a
   segment that reaches semantic length 50 without a closer (a run-on text, Chinese without 。) closes
   after its last `，,;；、`, else before the next word or CJK character, so its first sound does not wait
   for the whole text. It also runs incrementally, for speak-while-thinking, with the same result.
2. `cut_by_semantic_length(max_len=50, min_tail=5)`: semantic length = CJK characters + English
   words; a longer segment has its ASCII punctuation turned into CJK punctuation, is split at
   sentence enders, then at `，;；`, short clauses are merged and over-long ones packed; decimals and
   dots between capitals are never split.
3. `normalize`: HTML character references (&amp; &lt; &#39;) become their characters and '&' between words is
   said ('and', 和). Fragments without CJK get English number normalisation (integers, decimals, ordinals,
   units, currency ($ £ € ¥), fractions, signed percentages, letter-number names, clock times with seconds
   (00:00 / 24:00 as midnight), phone numbers digit by digit (555-1234 too, and numbers dialled: 'Dial 911'),
   versions (v2.0), scientific notation (1e6), ratios and ranges with 'to', years after 'in' / 'since' / ... as said);
   fragments with CJK get Chinese readings (years digit by digit, dates, clock times and versions in words,
   phone, mobile and serial numbers dictated with 幺 (拨打911 too), 1990s as 年代, 3rd as 第三, 1e6 as 十的六次方,
   units and currencies in Chinese: 5kg -> 五千克, $5 -> 五美元,
   ℃ -> 摄氏度, ratios with 比, ranges with 至, a minus sign as 负).
   Markup is stripped as upstream's TalkerTN pre-processor strips it (LaTeX, links, code, markdown
   images / emphasis / headings / rules, list symbols, spaces between non-letters). Emoji and control
   characters are removed (degree signs are kept), a leading `，` is dropped.

NOT implemented: the rest of upstream's text normaliser (`TalkerTN`'s other regex readings and its pynini
grammars; pynini is not available here): its full unit and currency tables (we read the common ones),
formulas and symbols are passed through as written (numbers in them read as cardinals).
"""

from __future__ import annotations

import functools
import html
import re
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from engine.errors import MingError

FIRST_SEGMENT_UNITS = 12
LATER_SEGMENT_UNITS = 8
MAX_SEMANTIC_LEN = 50
MIN_TAIL = 5
FEED_CHARS = 200  # iter_fragments feeds the Segmenter this much text at a time
MAX_TEXT_CHARS = 10_000  # per request (documented limit; longer texts should be split by the caller)
CLOSERS = frozenset("！？。，!?")  # 2.0's segment closers
PREVIEW_CLOSERS = frozenset("！？。!?")  # the Preview's: a comma does not close a segment (spec §7.11)
LENGTH_BREAKS = frozenset("，,;；、")  # where a segment closed by length prefers to end (after the last one)
DEGREE_SIGNS = "°℃℉"  # symbols (Unicode 'So') that are read, not dropped with the emoji

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
_SPEAKABLE = re.compile(rf"[A-Za-z0-9{_CJK}]|[^\W_]")


class TextError(MingError, ValueError):
    code = "invalid_request"


def has_cjk(text: str) -> bool:
    return bool(_HAS_CJK.search(text))


def numeral_value(ch: str) -> int | None:
    """The value of a circled or Roman numeral character (①, ㉑, ❶, ⓪, Ⅻ, ⅳ); None for any other."""
    if ch.isascii() or unicodedata.category(ch) not in ("No", "Nl"):
        return None
    name, value = unicodedata.name(ch, ""), unicodedata.numeric(ch, -1)
    if ("CIRCLED" in name or "ROMAN NUMERAL" in name) and value >= 0 and value == int(value):
        return int(value)
    return None


def _is_emoji_or_control(ch: str) -> bool:
    if ch in "\n\t" or ch in DEGREE_SIGNS or numeral_value(ch) is not None:
        return False
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
        return True
    return cat == "So" or 0x1F000 <= ord(ch) <= 0x1FAFF or 0x2600 <= ord(ch) <= 0x27BF or ord(ch) in (0xFE0F, 0x200D)


# An HTML character reference with its ';' (&amp; &lt; &#39; &#x27;), as a page or a reply's markup writes one: read
# as the character it names, not as '&amp;' or '&#thirty-nine;'. (html.unescape alone also takes a bare '&not'
# in 'this&nothing'.)
_HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def unescape_entities(text: str) -> str:
    return _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def clean_text(text: str) -> str:
    """HTML character references as their characters; drop emoji and control characters; NFKC-normalise
    full-width letters/digits (not CJK punctuation)."""
    out = []
    for ch in unescape_entities(text):
        if _is_emoji_or_control(ch):
            continue
        if ch.isalnum() and unicodedata.east_asian_width(ch) == "F":
            ch = unicodedata.normalize("NFKC", ch)
        out.append(ch)
    return "".join(out)


def is_speakable(text: str) -> bool:
    return bool(_SPEAKABLE.search(text))


def check_text(text, what: str = "text") -> str:
    """Validate user text: a non-empty string of at most MAX_TEXT_CHARS with something to say once
    markup is stripped (a text that is only a link or code would be refused by the talker later)."""
    if not isinstance(text, str):
        raise TextError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"{what} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise TextError(f"{what} is too long: {len(text)} characters, at most {MAX_TEXT_CHARS} per request "
                        "(split it into several requests)")
    cleaned = clean_text(text)
    if not is_speakable(strip_markup(cleaned)):
        raise TextError(f"{what} has nothing to speak: it holds only punctuation, symbols, emoji, links, code "
                        "or markup")
    return cleaned


class Segmenter:
    """Incremental segment closer (step 1). `feed(text)` returns the segments it closed.

    The units are the characters of the text, as upstream iterates a plain string (spaces count too):
      * `！？。，!?` (`closers`; the Preview's lack `，`) closes once >= 12 units have accumulated, or >= 8 once
        a fragment has been produced;
      * `.` closes under the same counts unless the character before it is a digit 0-9;
      * a newline is not kept: in text holding CJK it becomes `，` after a CJK character (else it is
        dropped), in other text it becomes `.` after an English letter (else it is dropped but still
        counts as a unit); the segment then closes if the counts are met;
      * at the end, what is left is a segment only if it holds a letter, a CJK character or a digit 1-9;
      * (ours) a segment of MAX_SEMANTIC_LEN CJK characters + English words closes before the next one
        starts, after its last clause mark (LENGTH_BREAKS) when it holds one.
    Feeding the text in pieces gives the same segments as feeding it whole."""

    def __init__(self, closers: frozenset[str] = CLOSERS):
        self.closers = closers
        self.units: list[str] = []
        self.fragments = 0  # fragments the closed segments cut into (upstream's count)
        self.words = 0  # semantic length of the units (CJK characters + English words), kept as they come

    def _counts_met(self) -> bool:
        n = len(self.units)
        return n >= FIRST_SEGMENT_UNITS or (self.fragments > 0 and n >= LATER_SEGMENT_UNITS)

    def _close(self, out: list[str]) -> None:
        seg = "".join(self.units)
        self.units = []
        self.words = 0
        pieces = cut_by_semantic_length(seg)
        if pieces:
            self.fragments += len(pieces)
            out.append(seg)

    def _starts_word(self, ch: str) -> bool:
        """Whether ch adds one to the semantic length: a CJK character, or an English letter after a non-letter."""
        if _SEMANTIC_CJK.match(ch):
            return True
        prev = self.units[-1][-1:] if self.units else ""
        return ch in _ASCII_LETTERS and prev not in _ASCII_LETTERS

    def _close_by_length(self, out: list[str]) -> None:
        """Close a segment that has reached MAX_SEMANTIC_LEN without a closer (a run-on text, Chinese without 。),
        after its last clause mark when it has one, else here, between two words or CJK characters; what
        follows the mark stays for the next segment."""
        marks = [i for i, unit in enumerate(self.units)  # (not one that would leave a clause of a word or two)
                 if unit in LENGTH_BREAKS and semantic_length("".join(self.units[:i])) >= MIN_TAIL]
        rest = self.units[marks[-1] + 1:] if marks else []
        self.units = self.units[:marks[-1] + 1] if marks else self.units
        self._close(out)
        self.units = rest
        self.words = semantic_length("".join(rest))

    def _push(self, ch: str, out: list[str]) -> None:
        if self._starts_word(ch):
            if self.words >= MAX_SEMANTIC_LEN:
                self._close_by_length(out)
            self.words += 1
        if ch in self.closers and self._counts_met():
            self.units.append(ch)
            self._close(out)
        elif ch == "." and self._counts_met() and not (self.units and self.units[-1][-1:] in _ASCII_DIGITS):
            self.units.append(ch)
            self._close(out)
        elif ch == "\n":
            if self.units:
                prev = self.units[-1][-1:]
                if _SEGMENT_CJK.search("".join(self.units)):
                    if _SEGMENT_CJK.match(prev):
                        self.units.append("，")
                else:  # dropped after anything but a letter, yet it still counts as a unit, as upstream's ""
                    self.units.append("." if prev.isascii() and prev.isalpha() else "")
            if self._counts_met():
                self._close(out)
        else:
            self.units.append(ch)

    def feed(self, text: str) -> list[str]:
        out: list[str] = []
        for ch in text:
            self._push(ch, out)
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        if self.units and _FINAL_SPEAKABLE.search("".join(self.units)):
            self._close(out)
        self.units = []
        return out


_ASCII_DIGITS = "0123456789"
_ASCII_LETTERS = frozenset(string.ascii_letters)
_SEGMENT_CJK = re.compile(r"[\u4e00-\u9fff]")
_FINAL_SPEAKABLE = re.compile(r"[a-zA-Z\u4e00-\u9fff1-9]")
_SEMANTIC_CJK = re.compile(r"[\u4e00-\u9fa5]")
_ENGLISH_WORD = re.compile(r"[a-zA-Z]+")
# Protected dots (decimals, capital abbreviations) ride through the cut as this placeholder, which
# itself counts as one English word of semantic length, as upstream's does.
_DOT = "##DOT##"
_ASCII_PUNCT_SPACE = set(string.punctuation + string.whitespace)
_LONG_UNITS = re.compile(r"[\u4e00-\u9fa5]|[a-zA-Z]+|[^a-zA-Z\u4e00-\u9fa5]+")


def semantic_length(text: str) -> int:
    """CJK characters (U+4E00..U+9FA5) plus runs of English letters."""
    return len(_SEMANTIC_CJK.findall(text)) + len(_ENGLISH_WORD.findall(text))


def _has_content(text: str) -> bool:
    """Anything but ASCII punctuation and whitespace (CJK punctuation counts as content)."""
    return any(ch not in _ASCII_PUNCT_SPACE for ch in text)


def _append_fragment(fragments: list[str], new: str, max_len: int, min_tail: int) -> None:
    new = new.lstrip("，,:;" + string.whitespace)
    if not _has_content(new):
        return
    if not fragments:
        fragments.append(new)
        return
    last = fragments[-1]
    if semantic_length(last) + semantic_length(new) > max_len or \
            (last.endswith(("。", "！", "？")) and semantic_length(new) < min_tail):
        fragments.append(new)
        return
    sep = " " if not last.endswith(" ") and re.match(r"[a-zA-Z0-9]", new) else ""
    fragments[-1] = last + sep + new


def _split_long(text: str, max_len: int) -> list[str]:
    """Greedy packing of CJK characters / English words / other runs up to max_len; a single unit
    longer than that stands alone."""
    out, cur = [], ""
    for unit in _LONG_UNITS.findall(text):
        n = semantic_length(unit)
        if semantic_length(cur) + n <= max_len:
            cur += unit
            continue
        if cur:
            out.append(cur)
        if n > max_len:
            out.append(unit)
            cur = ""
        else:
            cur = unit
    if cur:
        out.append(cur)
    return out


def _split_after(text: str, marks: str, clauses: bool) -> list[str]:
    """Pieces ending at each mark, stripped; a clause without content joins the previous clause;
    an unterminated last sentence gets a `。`."""
    pieces, cur = [], ""
    for ch in text + "\0":
        if ch != "\0":
            cur += ch
        if ch in marks or (ch == "\0" and cur):
            piece = cur.strip()
            cur = ""
            if not clauses:
                if ch == "\0" and not piece.endswith(("。", "！", "？")):
                    piece += "。"
                if piece:
                    pieces.append(piece)
            elif piece and _has_content(piece):
                pieces.append(piece)
            elif piece and pieces:
                pieces[-1] += piece
    return pieces


def cut_by_semantic_length(text: str, max_len: int = MAX_SEMANTIC_LEN, min_tail: int = MIN_TAIL) -> list[str]:
    """Step 3 (see _cut); a segment is cut once (the Segmenter counts its fragments, then they are read)."""
    return list(_cut(text, max_len, min_tail))


@functools.lru_cache(maxsize=8)
def _cut(text: str, max_len: int, min_tail: int) -> tuple[str, ...]:
    """Step 3 (upstream's cut_text_by_semantic_length): fragments of semantic length <= max_len.

    Decimal points and dots between capitals are protected; newlines become spaces and `。，` becomes
    `。`. A text within max_len is one fragment as it stands. A longer one has `.!?,` turned into
    `。！？，`, is split into sentences at `。！？` (a last one without an ender gets `。`), sentences into
    clauses at `，;；`; a clause under min_tail joins the next when the pair fits, an over-long clause
    is packed unit by unit, and each piece is appended to the previous fragment while the sum fits
    (not after a sentence ender when the piece is under min_tail), with a space before a piece that
    starts with a letter or digit."""
    if not _has_content(text):
        return ()
    work = re.sub(r"(\d)\.(\d)", r"\1" + _DOT + r"\2", text)
    for _ in range(3):
        work = re.sub(r"([A-Z])\.([A-Z])", r"\1" + _DOT + r"\2", work)
    work = work.replace("\n", " ").replace("。，", "。")
    if semantic_length(work) <= max_len:
        return (work.replace(_DOT, "."),)
    work = work.replace(".", "。").replace("!", "！").replace("?", "？").replace(",", "，")
    fragments: list[str] = []
    for sentence in _split_after(work, "。！？", clauses=False):
        clauses = _split_after(sentence, "，;；", clauses=True)
        i = 0
        while i < len(clauses):
            clause = clauses[i]
            n = semantic_length(clause)
            if n < min_tail and i + 1 < len(clauses) and semantic_length(clause + clauses[i + 1]) <= max_len:
                _append_fragment(fragments, clause + clauses[i + 1], max_len, min_tail)
                i += 2
                continue
            for piece in (_split_long(clause, max_len) if n > max_len else [clause]):
                _append_fragment(fragments, piece, max_len, min_tail)
            i += 1
    return tuple(f.replace(_DOT, ".") for f in fragments)


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


def _cardinal(digits: str) -> str:
    """A digit string in words; past 15 digits (or Python's int() limit) read digit by digit."""
    digits = digits.lstrip("0") or "0"
    return english_number(int(digits)) if len(digits) <= 15 else " ".join(_ONES[int(d)] for d in digits)


def _english_decimal(text: str) -> str:
    whole, _, frac = text.partition(".")
    out = _cardinal(whole)
    return out + (" point " + " ".join(_ONES[int(d)] for d in frac) if frac else "")


def _signed_words(text: str) -> str:
    """'-12.5' -> 'minus twelve point five'."""
    words = _english_decimal(text.lstrip("-"))
    return "minus " + words if text.startswith("-") else words


# A number not glued to a word before it; its '-' is a minus sign only where no word or digit precedes it
# ('-5', not the hyphen of '5-10').
_SIGNED = r"(?<![\w.])-?\d+(?:\.\d+)?"
# Units read after a number (upstream normalize_numbers' table, spec §7.9 step 4). The one-letter units
# only as written there (s, V, A, W), so 'take 1 a day' keeps its article.
_UNIT_WORDS = {"ms": "milliseconds", "s": "seconds", "hz": "hertz", "khz": "kilohertz", "mhz": "megahertz",
               "ghz": "gigahertz", "kb": "kilobytes", "mb": "megabytes", "gb": "gigabytes", "tb": "terabytes",
               "bps": "bits per second", "kbps": "kilobits per second", "mbps": "megabits per second",
               "gbps": "gigabits per second", "cm": "centimeters", "km": "kilometers", "kg": "kilograms",
               "v": "volts", "a": "amperes", "w": "watts", "°c": "degrees celsius", "°f": "degrees fahrenheit",
               "℃": "degrees celsius", "℉": "degrees fahrenheit", "mm": "millimeters", "mg": "milligrams",
               "ml": "milliliters", "km/h": "kilometers per hour", "kmh": "kilometers per hour", "mph": "miles per hour",
               "lb": "pounds", "lbs": "pounds", "oz": "ounces", "ft": "feet", "kw": "kilowatts", "kwh": "kilowatt hours"}
_UNIT = re.compile(rf"({_SIGNED})\s*((?i:ms|k?bps|[mg]bps|[kmg]?hz|[kmgt]b|km/h|kmh|kwh|kw|mph|cm|mm|km|kg|mg|ml|lbs?|oz|"
                   rf"ft|°c|°f)|[sVAW℃℉])(?!\w)")
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
             "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "sen", "sen")}


def _money(m: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCY[m.group(1)]
    whole, cents = m.group(2).replace(",", ""), m.group(3)
    words = _cardinal(whole) + (f" {one}" if whole.lstrip("0") == "1" else f" {many}")
    if cents and int(cents):
        words += " and " + english_number(int(cents)) + (f" {sub_one}" if int(cents) == 1 else f" {sub_many}")
    return words


def _fraction(m: re.Match) -> str:
    """3/4 -> three quarters, 1/2 -> one half, 2/3 -> two thirds."""
    if max(len(m.group(1)), len(m.group(2))) > 15:
        return f"{_cardinal(m.group(1))} over {_cardinal(m.group(2))}"
    num, den = int(m.group(1)), int(m.group(2))
    if den <= 1:
        return f"{english_number(num)} over {english_number(den)}"
    name = {2: ("half", "halves"), 4: ("quarter", "quarters")}.get(den)
    name = name[num != 1] if name else english_ordinal(den) + ("s" if num != 1 else "")
    return f"{english_number(num)} {name}"


def _plural(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _decade_words(n: int) -> str:
    """1990 -> 'nineteen nineties', 1900 -> 'nineteen hundreds', 2000 -> 'two thousands', 80 -> 'eighties'."""
    if n < 1000 or n % 1000 == 0:
        return _plural(english_number(n))
    if n % 100 == 0:
        return english_number(n // 100) + " hundreds"
    return english_number(n // 100) + " " + _plural(english_number(n % 100))


# An 's' on a number that ends in 0 names a decade, not seconds: a year (the 1990s), a decade after an
# apostrophe or a determiner (the '80s, in their 30s), or 'hundreds / thousands / millions of'.
_DECADES = (
    (re.compile(r"\b(100|1000|1000000)s(?=\s+of\b)"), lambda m: _plural(english_number(int(m.group(1))).split()[-1])),
    (re.compile(r"(?<![\w.])([12]\d\d0)s\b"), lambda m: _decade_words(int(m.group(1)))),
    (re.compile(r"['’]([1-9]0)s\b"), lambda m: _decade_words(int(m.group(1)))),
    (re.compile(r"\b(the|their|his|her|my|your|our|early|mid|late)([ -])([1-9]0)s\b", re.IGNORECASE),
     lambda m: m.group(1) + m.group(2) + _decade_words(int(m.group(3)))),
)


MONTH_NAMES = ("January February March April May June July August September October November "
               "December").split()


def english_year(n: int) -> str:
    """A year as it is said: 1999 -> 'nineteen ninety-nine', 1905 -> 'nineteen oh five', 1900 -> 'nineteen
    hundred', 2005 -> 'two thousand five', 2024 -> 'twenty twenty-four'."""
    high, low = divmod(n, 100)
    if n < 1000 or 2000 <= n < 2010 or n % 1000 == 0:
        return english_number(n)
    return english_number(high) + (" hundred" if low == 0 else " oh " + _ONES[low] if low < 10
                                   else " " + english_number(low))


def _english_date(year: str, month: str, day: str) -> str | None:
    """'May third, twenty twenty-four'; None when month or day is out of range (then no date)."""
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        return None
    return f"{MONTH_NAMES[int(month) - 1]} {english_ordinal(int(day))}, {english_year(int(year))}"


HOURS_ON_A_CLOCK_FACE = 12  # past it, an hour is the 24-hour clock's ("thirteen hundred", not "o'clock")


def _english_time(hour: str, minute: str, second: str | None = None, noon: str | None = None) -> str:
    """10:30 -> 'ten thirty', 9:05 -> 'nine oh five', 10:00 -> "ten o'clock", 12:30:45 -> 'twelve thirty and
    forty-five seconds', 9:05pm -> 'nine oh five PM'; the day's ends as a speaker says them: 00:00 and 24:00 ->
    'midnight', 00:30 -> 'twelve thirty AM' (not 'zero thirty', 'twenty-four to zero'); a 24-hour clock's hour on
    the hour as its other times are read: 13:00 -> 'thirteen hundred' (as 13:30 is 'thirteen thirty'; not
    "thirteen o'clock", which no clock says)."""
    hours, minutes, seconds = int(hour), int(minute), int(second or 0)
    if hours in (0, 24) and minutes == seconds == 0 and not noon:
        return "midnight"
    if hours == 24:  # 24:30 is no time of day (a ratio or a score)
        return f"{hour}:{minute}" + (f":{second}" if second is not None else "")
    on_the_hour = "hundred" if hours > HOURS_ON_A_CLOCK_FACE else "o'clock"
    said = on_the_hour if minutes == 0 else f"oh {_ONES[minutes]}" if minutes < 10 else english_number(minutes)
    if seconds:
        said += f" and {english_number(seconds)} second" + ("" if seconds == 1 else "s")
    noon = noon.upper() if noon else ("AM" if hours == 0 else "")
    return f"{english_number(hours or 12)} {said}" + (f" {noon}" if noon else "")


def _digits_said(group: str) -> str:
    """'555' -> 'five five five': a number dictated digit by digit."""
    return " ".join(_ONES[int(d)] for d in group if d.isdigit())


def _phone(m: re.Match) -> str:
    """+1 415 555 0100 -> 'plus one, four one five, five five five, zero one zero zero' (groups apart)."""
    groups = re.findall(r"\+?\d+", m.group(0))
    return ", ".join(("plus " if g.startswith("+") else "") + _digits_said(g) for g in groups)


# A four-digit number in this range is read as a year where the text says it is one ('in 1999', 1990-1995).
SPOKEN_YEARS = range(1100, 2100)


def _is_year(digits: str) -> bool:
    return digits.isdigit() and len(digits) == 4 and int(digits) in SPOKEN_YEARS


def _range(m: re.Match) -> str:
    """3-5 -> '3 to 5' (the numbers are read by the later rules); 1990-1995 and 2020-21 are years."""
    low, high = m.group(1), m.group(2)
    if not (_is_year(low) and high.isdigit()):
        return f"{low} to {high}"
    if _is_year(high) and int(low) < int(high):
        return f"{english_year(int(low))} to {english_year(int(high))}"
    if len(high) == 2 and int(high) > int(low) % 100:  # 2020-21: the second year's last two digits
        return f"{english_year(int(low))} to {english_number(int(high))}"
    return f"{low} to {high}"


# Dates and clock times, read before any other number rule (an ISO date's hyphens are no minus signs, a time's
# colon no separator): 2024-05-03, 5/3/2024 (month first unless the first number is over 12), 10:30, 9:05pm.
_DATE_TIME = (
    (re.compile(r"(?<![\w./-])(\d{4})-(\d{1,2})-(\d{1,2})(?![\w/-])"),
     lambda m: _english_date(m.group(1), m.group(2), m.group(3)) or m.group(0)),
    (re.compile(r"(?<![\w./])(\d{1,2})/(\d{1,2})/(\d{4})(?![\w/])"),
     lambda m: (_english_date(m.group(3), m.group(1), m.group(2)) if int(m.group(1)) <= 12
                else _english_date(m.group(3), m.group(2), m.group(1))) or m.group(0)),
    (re.compile(r"(?<![\w.:])([01]?\d|2[0-4]):([0-5]\d)(?::([0-5]\d))?(?:\s*([aApP][mM]))?(?![\w:]|\.\d)"),
     lambda m: _english_time(*m.groups())),
)
# A seven-digit local number, 555-1234 (its exchange starts 2-9): no range, unless its second number is round (300-1200).
_LOCAL_PHONE = r"[2-9]\d\d-(?!\d\d00)\d{4}"
# ... nor after words that announce a range: 'pages 385-1024', 'from 250-1250', 第385-1024页.
_RANGE_BEFORE = re.compile(r"(?:\b(?i:pages?|pp?\.|from|between|ages?|years?|nos?\.)|第|从|页|约)\s*$")


def _is_phone(m: re.Match) -> bool:
    """Whether a phone-shaped match is a phone number: all are but a seven-digit one (group `local`) after a word that
    announces a range."""
    return not m.group("local") or not _RANGE_BEFORE.search(m.string[max(0, m.start() - 12):m.start()])
# Read before ranges and other numbers (English): phone numbers, dictated digit by digit in their groups (an
# international number with '+', or the North American shapes 555-123-4567, 1-800-555-0100, (555) 123-4567); a ratio
# or a score that is no clock time (3:2, 16:9) as 'three to two'; a range '3-5' or '10–12' (no spaces around a
# hyphen: '5 - 3' is a subtraction) as 'three to five'; a year after 'in', 'since', 'until', 'year', ... (1100 to
# 2099, no unit after it) as said, 'in 1999' -> 'in nineteen ninety-nine' while '1999 apples' stays a cardinal.
_PHONE_EN = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}|(?:1[-.])?\(\d{3}\) ?\d{3}[-.]\d{4}|"
                       rf"(?:1([-.]))?\d{{3}}([-.])\d{{3}}\2\d{{4}}|(?P<local>{_LOCAL_PHONE}))(?![\w-]|\.\d)")
_RATIO = re.compile(r"(?<![\w.:])(\d+):(\d+)(?![\w:]|\.\d)")
_RANGE = re.compile(r"(?<![\w.,:/–-])(\d+(?:\.\d+)?)(?:-|\s?[–—]\s?)(\d+(?:\.\d+)?)(?![\w:/–-]|\.\d)")
_YEAR_AFTER = re.compile(r"\b((?i:in|since|until|till|year|circa|during))\s+(1[1-9]\d\d|20\d\d)"  # (SPOKEN_YEARS)
                         r"(?![\d.,]\d|\s*[%°]|\s*(?i:ms|s|min|h|hz|[kmgt]b|[ckm]?m|[km]?g|ml)\b)")

# Three-digit service numbers, said digit by digit: 'call 911', 'a 911 call' (not 'nine hundred eleven').
SERVICE_NUMBERS = frozenset({"211", "311", "411", "511", "611", "711", "811", "911", "999", "112", "000", "988"})


def _dialled(m: re.Match) -> str:
    """'Dial 911' / 'call 999' -> 'Dial nine one one': a number one dials, or a service number one calls."""
    verb, digits = m.groups()
    if verb.lower().startswith("dial") or digits in SERVICE_NUMBERS:
        return f"{verb} {_digits_said(digits)}"
    return m.group(0)


def _version(m: re.Match) -> str:
    """v2.0 -> 'version two point zero', v1.10.3 -> 'version one point ten point three' (parts are numbers)."""
    return "version " + " point ".join(_cardinal(part) for part in m.group(1).split("."))


def _scientific(m: re.Match) -> str:
    """1e6 -> 'ten to the power of six', 2.5e-3 -> 'two point five times ten to the power of minus three'."""
    mantissa, sign, exponent = m.groups()
    power = "ten to the power of " + ("minus " if sign == "-" else "") + _cardinal(exponent)
    return power if mantissa == "1" else f"{_english_decimal(mantissa)} times {power}"


# Read after phone numbers (English): numbers dialled, service numbers, versions and scientific notation.
_DIGIT_FORMS = (
    (re.compile(r"\b((?i:dial(?:l?ed|l?ing|s)?|call(?:ed|ing|s)?|text(?:ed|ing|s)?|phone[ds]?|ring))\s+(\d+)\b"
                r"(?![.,]\d)"), _dialled),
    (re.compile(rf"(?<![\w.])({'|'.join(sorted(SERVICE_NUMBERS))})(?=\s+(?i:calls?|dispatchers?|operators?|line)\b)"),
     lambda m: _digits_said(m.group(1))),
    (re.compile(r"(?<![\w.])[vV](\d+(?:\.\d+){0,3})(?![\w:]|\.\d)"), _version),
    (re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([-+]?)(\d{1,3})(?![\w]|\.\d)"), _scientific),
)


def normalize_english_numbers(text: str) -> str:
    """Numbers in text without CJK as words, in upstream's order of rules (normalize_numbers): grouping
    commas, (ours, first: dates and clock times, _DATE_TIME),
    numbers with units (5MB, 10 ms, 25°C), money ($, £), fractions, percentages (signed),
    ordinals, letters followed by a number (GPT-4 -> 'GPT four'; ours: v2.1 -> 'version two point one'), then the
    numbers left (a leading '-' read 'minus'; one touching letters set apart: 4K -> 'four K'). Unlike upstream, a decade ('the 1990s', '80s') is no
    number of seconds, ordinals stay ordinal ('21st' -> 'twenty-first', upstream reads the cardinal),
    money keeps cents / pence, fractions take plurals, a date like 12/25/2024 is no fraction, and no
    commas are put between thousands."""
    text = re.sub(r"\d{1,3}(?:,\d{3})+", lambda m: m.group(0).replace(",", ""), text)
    for pattern, words in (*_DATE_TIME, *_DECADES):
        text = pattern.sub(words, text)
    text = _PHONE_EN.sub(lambda m: _phone(m) if _is_phone(m) else m.group(0), text)
    for pattern, words in _DIGIT_FORMS:
        text = pattern.sub(words, text)
    text = _RATIO.sub(r"\1 to \2", text)
    text = _RANGE.sub(_range, text)
    text = _YEAR_AFTER.sub(lambda m: f"{m.group(1)} {english_year(int(m.group(2)))}", text)
    text = _UNIT.sub(lambda m: f"{_signed_words(m.group(1))} {_UNIT_WORDS[m.group(2).lower()]}", text)
    text = re.sub(r"([$£€¥])(\d+)(?:\.(\d\d))?", _money, text)  # (grouping commas are gone: '$4, ' keeps its comma)
    text = re.sub(r"(?<![\w./])(\d+)/(\d+)(?![\w/])", _fraction, text)
    text = re.sub(rf"({_SIGNED})%", lambda m: _signed_words(m.group(1)) + " percent", text)
    text = re.sub(r"\b(\d{1,15})(st|nd|rd|th)\b", lambda m: english_ordinal(int(m.group(1))), text)
    text = re.sub(r"\b([a-zA-Z]+)-?(\d+(?:\.\d+)?)\b", lambda m: f"{m.group(1)} {_english_decimal(m.group(2))}", text)
    text = re.sub(r"(?<![\w.])-(?=\d)", "minus ", text)
    text = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", text)  # 4K, 3D, H2O: a word apart from its number
    text = re.sub(r"(?<!\d)\d+\.\d+", lambda m: _english_decimal(m.group(0)), text)
    return re.sub(r"\d+", lambda m: _cardinal(m.group(0)), text)


_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ["", "十", "百", "千"]
_ZH_BIG = ["", "万", "亿", "万亿"]


def _zh_under_10000(n: int) -> str:
    """0 < n < 10000 in Chinese; a 2 before 千 or 百 is 两 (两千, 一千两百), as upstream's cardinal writes it."""
    out, zero = "", False
    for i in range(3, -1, -1):
        d = (n // 10**i) % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out += "零"
            zero = False
        out += ("两" if d == 2 and i >= 2 else _ZH_DIGITS[d]) + _ZH_UNITS[i]
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


_MONTHS = {f"{n}" for n in range(1, 13)} | {f"{n:02d}" for n in range(1, 10)}
_DAYS = {f"{n}" for n in range(1, 32)} | {f"{n:02d}" for n in range(1, 10)}
_NOON = {"am": "上午", "AM": "上午", "a m": "上午", "A M": "上午", "pm": "下午", "PM": "下午", "p m": "下午", "P M": "下午"}


def _zh_year(digits: str) -> str:
    """A year digit by digit, leading zeros dropped: 2024 -> 二零二四."""
    return _zh_digits(digits.lstrip("0"))


# Characters that join digits into one run in upstream's Chinese normaliser (a date or a time is a whole run).
_DIGIT_PUNCT = r"\d\-~～:：.+x*/÷=≥≤><"


def _zh_date(m: re.Match) -> str:
    """yyyy年mm月dd日 / yyyy-mm-dd (also . or /) with a real month and day. A dotted run a.b.c that is no
    date, or follows 'v' or '版本', is a version (a点b点c); anything else stays as written."""
    year, month, day, mark = m.group("y"), m.group("m"), m.group("d"), m.group("mark")
    before = re.split(f"[{_DIGIT_PUNCT}]", m.string[:m.start()])[-1]
    version = mark == "." and (before[-1:] in ("v", "V") or "版本" in before)
    if month not in _MONTHS or (day is not None and day not in _DAYS) or version:
        return "点".join(chinese_reading(x.lstrip("0") or "0") for x in (year, month, day)) if mark == "." else m.group(0)
    out = (_zh_year(year) + "年" if year else "") + chinese_number(int(month)) + "月"
    return out + ("" if day is None else chinese_number(int(day)) + ("号" if mark in "-./" else mark))


def _zh_time(hour: str, minute: str, second: str | None, noon: str | None) -> str:
    """h:mm[:ss][am|pm] -> [上午|下午]h点mm分[ss秒]: 2 o'clock is 两点, :00 is 整, a minute or second
    under ten (or written 0x) takes 零."""
    out = _NOON.get(noon or "", "") + ("两" if hour in ("2", "02") else chinese_number(int(hour))) + "点"
    if int(minute) == 0 and (second is None or int(second) == 0):
        return out + "整"
    for value, unit in ((minute, "分"), (second, "秒")):
        if value is not None:
            zero = "零" if len(value) == 1 or value[0] == "0" else ""
            out += "零" + unit if int(value) == 0 else zero + chinese_number(int(value)) + unit
    return out


def _zh_yao(digits: str) -> str:
    """Digits one by one as a number is dictated, 1 as 幺: 400 -> 四零零, 110 -> 幺幺零, 555-1234 -> 五五五幺二三四."""
    return _zh_digits(digits.replace("-", "")).replace("一", "幺")


# A phone number written with dashes (010-12345678, 0571-1234567, 400-123-4567) and digits after a serial
# label (电话, 手机号, ID, 学号, 身份证, 尾号, FM / AM, optionally followed by 是 / 为 and a colon).
_PHONE = re.compile(r"(?<![\d\-~～:：.+x*/÷=≥≤><])(?:(\d{3})-(\d{8})|(\d{4})-(\d{7,8})|(400|0\d{2,3})-(\d{3,4})-(\d{4})|"
                    rf"(?P<local>{_LOCAL_PHONE}))(?![\d\-~～:：.+x*/÷=≥≤><])")
_SERIAL = re.compile(r"((?<![A-Za-z])(?:id|ID|FM|AM)|学号|身份证|手机号?|电话|尾号|拨打|致电|呼叫|热线)((?:是|为)?：?)"
                     r"(\d+(?:-\d+)*)(?![.\d])")
# Units read after a number in Chinese text and currencies before / after one (upstream's measure_after and
# money tables name them so; 'A' is left out: 5A级景区 is a grade, not amperes; nor is a unit read before a
# digit: 5v5 is a match, not volts).
_ZH_MEASURES = {"km": "千米", "m": "米", "cm": "厘米", "mm": "毫米", "kg": "千克", "g": "克", "mg": "毫克", "t": "吨",
                "ml": "毫升", "mL": "毫升", "L": "升", "h": "小时", "min": "分钟", "s": "秒", "ms": "毫秒",
                "Hz": "赫兹", "hz": "赫兹", "kHz": "千赫", "khz": "千赫兹", "MHz": "兆赫", "mhz": "兆赫兹",
                "W": "瓦特", "kW": "千瓦", "kw": "千瓦", "V": "伏特", "v": "伏特", "mAh": "毫安时", "gb": "吉字节",
                "m2": "平方米", "m²": "平方米", "cm2": "平方厘米", "cm²": "平方厘米", "cm3": "立方厘米",
                "cm³": "立方厘米", "°C": "摄氏度", "°c": "摄氏度", "℃": "摄氏度", "°F": "华氏度", "°f": "华氏度",
                "℉": "华氏度"}
_ZH_MONEY = {"$": "美元", "USD": "美元", "¥": "元", "￥": "元", "RMB": "元", "€": "欧元", "£": "英镑", "￡": "英镑",
             "GBP": "英镑", "HKD": "港元", "JPY": "日元"}
_ZH_NUMBER = r"\d+(?:\.\d+)?"
_ZH_MEASURE = re.compile(rf"(?:(?<![\d.])([-~～]))?(?<![\d.])(?:({_ZH_NUMBER})[-~～])?({_ZH_NUMBER})"
                         rf"({'|'.join(sorted(map(re.escape, _ZH_MEASURES), key=len, reverse=True))})(?![A-Za-z\d])")
_ZH_MONEY_BEFORE = re.compile(rf"((?<![A-Za-z])(?:USD|RMB|GBP|HKD|JPY)|[$¥￥€£￡])({_ZH_NUMBER})")
_ZH_MONEY_AFTER = re.compile(rf"(?<!\d)({_ZH_NUMBER})(USD|RMB|GBP|HKD|JPY)(?![A-Za-z])")


def _zh_measure(m: re.Match) -> str:
    """5kg -> 五千克, 3-5kg -> 三至五千克, -5℃ -> 负五摄氏度, ~5m -> 大约五米 (upstream merge_punc_measure)."""
    sign, low, number, unit = m.groups()
    head = ("负" if sign == "-" else "大约") if sign else ""
    return head + (chinese_reading(low) + "至" if low else "") + chinese_reading(number) + _ZH_MEASURES[unit]


_ZH_PERCENT = re.compile(rf"(?:(?<![\d.%])([-~～]))?(?<![\d.])(?:({_ZH_NUMBER})(%?)[-~～])?({_ZH_NUMBER})%")


def _zh_percent(m: re.Match) -> str:
    """5% -> 百分之五, 3-5% -> 百分之三至五, 3%-5% -> 百分之三至百分之五, -5% -> 负百分之五 (upstream REPercent)."""
    sign, low, low_mark, number = m.groups()
    head = ("负" if sign == "-" else "大约") if sign else ""
    low = "" if low is None else chinese_reading(low) + "至" + ("百分之" if low_mark else "")
    return head + "百分之" + low + chinese_reading(number)


# A clock time writes its minutes (and seconds) with two digits: 3:2 is a ratio or a score (三比二), not 三点零二分.
_CLOCK = r"(\d{1,2})[:：](\d{2})(?:[:：](\d{2}))?"
_NOON_MARK = r"(am|pm|AM|PM|a m|p m|A M|P M)?"


# Read after dates, times, phone numbers, measures and percentages (Chinese): a ratio or score that is no clock time
# (3:2 -> 三比二), a range (3-5, 3~5 -> 三至五), a minus sign where no letter or digit precedes it (-5 -> 负五) and a
# mobile number written without a label (13812345678, dictated with 幺).
_ZH_RATIO = re.compile(rf"(?<![{_DIGIT_PUNCT}])({_ZH_NUMBER})[:：]({_ZH_NUMBER})(?![{_DIGIT_PUNCT}])")
_ZH_RANGE = re.compile(rf"(?<![{_DIGIT_PUNCT}])({_ZH_NUMBER})[-~～—–]({_ZH_NUMBER})(?![{_DIGIT_PUNCT}])")
_ZH_MINUS = re.compile(r"(?<![A-Za-z\d.])-(?=\d)")
_ZH_MOBILE = re.compile(r"(?<![\d.])1[3-9]\d{9}(?![\d.])")


def _zh_range(m: re.Match) -> str:
    """3-5 -> 3至5 (read by the cardinal rule after); 2023-2024 -> 二零二三至二零二四, years digit by digit."""
    low, high = m.groups()
    if _is_year(low) and _is_year(high) and int(low) < int(high):
        return f"{_zh_year(low)}至{_zh_year(high)}"
    return f"{low}至{high}"


def _zh_numeral(ch: str) -> str:
    """A circled or Roman numeral (①, ㉑, ❶, ⓪, Ⅻ, ⅳ) as its Chinese cardinal; other characters unchanged."""
    value = numeral_value(ch)
    return ch if value is None else chinese_number(value)


def _zh_scientific(m: re.Match) -> str:
    """1e6 -> 十的六次方, 2.5e-3 -> 二点五乘十的负三次方."""
    mantissa, sign, exponent = m.groups()
    power = "十的" + ("负" if sign == "-" else "") + chinese_number(int(exponent)) + "次方"
    return power if mantissa == "1" else chinese_reading(mantissa) + "乘" + power


# Read before units and other numbers (Chinese): a decade written the English way (1990s -> 一九九零年代, not
# 一千九百九十秒), an English ordinal (3rd -> 第三) and scientific notation (1e6 -> 十的六次方).
_ZH_DIGIT_FORMS = (
    (re.compile(r"(?<![\d.])([12]\d\d0)['’]?s(?![A-Za-z])"), lambda m: _zh_year(m.group(1)) + "年代"),
    (re.compile(r"(?<![\d.])(\d{1,15})(?:st|nd|rd|th)(?![A-Za-z])"), lambda m: "第" + chinese_number(int(m.group(1)))),
    (re.compile(r"(?<![A-Za-z\d.])(\d+(?:\.\d+)?)[eE]([-+]?)(\d{1,3})(?![A-Za-z\d]|\.\d)"), _zh_scientific),
)


def normalize_chinese_numbers(text: str) -> str:
    """Chinese readings, after the date, version and time rules of upstream's Chinese text normaliser: a
    year is read digit by digit, dates and clock times in words (2024年5月1日 -> 二零二四年五月一日,
    10:30-11:00 -> 十点三十分至十一点整), v1.2.3 -> v一点二点三."""
    text = "".join(_zh_numeral(ch) for ch in text)
    text = re.sub(r"(?<!\d)(?P<y>\d+)年(?P<m>\d{1,2})月(?:(?P<d>\d{1,2})(?P<mark>[日号]))?", _zh_date, text)
    text = re.sub(rf"(?<![{_DIGIT_PUNCT}])(?P<y>\d+)(?P<mark>[-./])(?P<m>\d+)(?P=mark)(?P<d>\d+)(?![{_DIGIT_PUNCT}])",
                  _zh_date, text)
    text = re.sub(r"(?<!\d)(?P<y>)(?P<m>\d{1,2})月(?P<d>\d{1,2})(?P<mark>[日号])", _zh_date, text)
    text = re.sub(r"(?<!\d)(\d{4})(?=年)", lambda m: _zh_year(m.group(1)), text)
    text = re.sub(rf"(?<![{_DIGIT_PUNCT}]){_CLOCK}[-~～]{_CLOCK}(?![{_DIGIT_PUNCT}]){_NOON_MARK}",
                  lambda m: _zh_time(*m.group(1, 2, 3), None) + "至" + _zh_time(*m.group(4, 5, 6, 7)), text)
    text = re.sub(rf"(?<![{_DIGIT_PUNCT}]){_CLOCK}(?![{_DIGIT_PUNCT}]){_NOON_MARK}", lambda m: _zh_time(*m.groups()), text)
    for pattern, words in _ZH_DIGIT_FORMS:
        text = pattern.sub(words, text)
    text = _PHONE.sub(lambda m: "".join(_zh_yao(g) for g in m.groups() if g) if _is_phone(m) else m.group(0), text)
    text = _SERIAL.sub(lambda m: m.group(1) + m.group(2) + _zh_yao(m.group(3)), text)
    text = _ZH_MONEY_BEFORE.sub(lambda m: chinese_reading(m.group(2)) + _ZH_MONEY[m.group(1)], text)
    text = _ZH_MONEY_AFTER.sub(lambda m: chinese_reading(m.group(1)) + _ZH_MONEY[m.group(2)], text)
    text = _ZH_MEASURE.sub(_zh_measure, text)
    text = _ZH_PERCENT.sub(_zh_percent, text)
    text = _ZH_MOBILE.sub(lambda m: _zh_yao(m.group(0)), text)
    text = _ZH_RATIO.sub(r"\1比\2", text)
    text = _ZH_RANGE.sub(_zh_range, text)
    text = _ZH_MINUS.sub("负", text)
    text = text.replace("℃", "摄氏度").replace("℉", "华氏度")
    return re.sub(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", lambda m: chinese_reading(m.group(0)), text)


# What the talker must not read, as upstream's text normaliser (TalkerTN) strips it from every fragment
# before reading numbers: LaTeX math, links, code, markdown images, emphasis / heading / rule marks and
# list symbols; spaces between two non-letters go, runs of spaces between letters become one.
_UNSPOKEN = tuple(re.compile(p, re.DOTALL) for p in (
    r"\$\$.*?\$\$|\$.*?\$",
    r"https?://[A-Za-z0-9./?=&_:-]+|www\.[A-Za-z0-9./?=&_:-]+",
    r"```.*?```|`.*?`",
    r"!\[[^\]]*\]\([^)]*\)",
    r"\*\*\*|\*\*|###|---",
    "[▼●★☆■□▲△◆◇○◎√×✔✖]",
    # HTML / SSML / XML tags (<speak>, <break time="1s"/>, </p>): markup, not words (their text stays)
    r"""</?[A-Za-z][\w:.-]*(?:\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>]+))?)*\s*/?>"""))


# '&' between two words is said: 'Tom & Jerry', 'R&D' -> 'and' (English), 汤姆&杰瑞 -> 和 (Chinese).
_AMPERSAND = re.compile(r"(?<=\w)\s*&\s*(?=\w)")


def strip_markup(text: str) -> str:
    for pattern in _UNSPOKEN:
        text = pattern.sub("", text)
    text = re.sub(r"(?<=[^a-zA-Z.]) +(?=[^a-zA-Z.])", "", text)
    return re.sub(r"(?<=[a-zA-Z]) +(?=[a-zA-Z])", " ", text)


def normalize(fragment: str) -> str:
    """A fragment as the talker reads it (spec §7.9 step 4): English number readings (text without
    CJK) then markup stripped, or markup stripped then Chinese number readings; no leading `，`."""
    text = clean_text(fragment).strip()
    if has_cjk(text):  # ('&' is read once links are gone: a link's '&' is not said)
        text = normalize_chinese_numbers(_AMPERSAND.sub("和", strip_markup(text)))
    else:
        text = _AMPERSAND.sub(" and ", strip_markup(normalize_english_numbers(text)))
    text = re.sub(r"[ \t]+", " ", text).strip()
    return text[1:].lstrip() if text.startswith("，") else text


@dataclass
class Fragment:
    text: str      # what the talker reads (normalised)
    source: str    # the span of the user's text it speaks


def segment_text(text: str, closers: frozenset[str] = CLOSERS) -> list[Fragment]:
    """Steps 1-4: the fragments to synthesise one by one (unspeakable ones dropped)."""
    return list(iter_fragments(text, closers))


def iter_fragments(text: str, closers: frozenset[str] = CLOSERS) -> Iterator[Fragment]:
    """segment_text's fragments, each made when asked for: the first is spoken while the rest of a long text is
    still to be segmented and normalised (10,000 characters took ~0.5-1 s before the first audio)."""
    seg = Segmenter(closers)
    for start in range(0, len(text), FEED_CHARS):
        yield from _fragments(seg.feed(text[start:start + FEED_CHARS]))
    yield from _fragments(seg.flush())


def fragments_of(segments: list[str]) -> list[Fragment]:
    return list(_fragments(segments))


def _fragments(segments: list[str]) -> Iterator[Fragment]:
    """Each piece of each segment normalised when asked for (a long segment's pieces are not all read first)."""
    for s in segments:
        for piece in cut_by_semantic_length(s):
            norm = normalize(piece)
            if is_speakable(norm):
                yield Fragment(norm, piece)
