"""Speech recognition tasks on top of chat (spec §6.3): plain ASR, ASR with context and hotwords,
and language/dialect-forced ASR, plus parsing of the model's `Language\\ttranscript` output; and speech
translation into English, the same request with another instruction (ours: upstream has no translation prompt)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.events import TextDelta, TokenLogprob

ASR_INSTRUCTION = "Please recognize the language of this speech and transcribe it. Format: oral."
HOTWORDS_PREFIX = "This audio may contains the following words or phrases:"
AUDIO_CAPTION_INSTRUCTION = "请写一句话描述这段音频。"
# Speech translation (OpenAI's /v1/audio/translations: any language in, English text out). Upstream has no
# translation prompt (spec §6.4 lists ASR, speech QA and captioning); the omni LLM follows this instruction the way
# it follows the ASR one, and its output is read as an ASR output is (the text after a `Language\t` tag, if any).
TRANSLATION_LANGUAGE = "English"
TRANSLATION_INSTRUCTION = f"Please translate this speech into {TRANSLATION_LANGUAGE}."
SPEECH_TEXT_INSTRUCTIONS = {"transcribe": ASR_INSTRUCTION, "translate": TRANSLATION_INSTRUCTION}

# Language / dialect tags the model emits before the tab and accepts as a forced prefix.
# Only these are confirmed by the upstream code; the release notes claim 15 Chinese dialects but
# no list of their tags exists upstream (spec §6.3), so any other tag is passed through as given.
KNOWN_LANGUAGE_TAGS = {
    "Chinese": "Mandarin Chinese",
    "上海": "Shanghainese (Wu)",
}


# OpenAI's `language` (ISO 639-1) -> the model's tag. The tags the model writes before the tab are language names in
# English ("Chinese": the one language tag confirmed upstream, spec §6.3), so a code is forced as its language's
# English name; a code the model was not trained on is a tag it never saw (forcing one is the caller's choice).
ISO_LANGUAGES = {
    "zh": "Chinese", "en": "English", "ja": "Japanese", "ko": "Korean", "yue": "Cantonese", "fr": "French",
    "de": "German", "es": "Spanish", "pt": "Portuguese", "it": "Italian", "ru": "Russian", "ar": "Arabic",
    "hi": "Hindi", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian", "ms": "Malay", "tr": "Turkish",
    "nl": "Dutch", "pl": "Polish", "sv": "Swedish", "da": "Danish", "no": "Norwegian", "fi": "Finnish",
    "cs": "Czech", "el": "Greek", "he": "Hebrew", "uk": "Ukrainian", "hu": "Hungarian", "ro": "Romanian",
    "fa": "Persian", "ur": "Urdu", "bn": "Bengali", "ta": "Tamil", "tl": "Tagalog", "ca": "Catalan",
}


def iso_language(code: str) -> str | None:
    """The model's tag for an ISO 639 code as a BCP 47 tag gives it, with a script and a region allowed ("en",
    "zh-CN", "pt_BR", "zh-Hant-TW"), and an extended language subtag naming the language ("zh-yue": Cantonese), in
    either case as BCP 47 allows ("EN", "en-us"; a capitalised word such as "Yue" is a tag); None when `code` does not
    look like one (a tag such as "Chinese" or "上海", passed as given); KeyError for a code of that form not known."""
    primary, *subtags = code.replace("_", "-").split("-")
    if not (primary.isascii() and primary.isalpha() and (primary.islower() or primary.isupper())
            and 2 <= len(primary) <= 3):
        return None
    primary = primary.lower()
    if not all(s and s.isascii() and s.isalnum() for s in subtags):
        return None
    if subtags and len(subtags[0]) == 3 and subtags[0].isalpha():  # zh-yue, zh-wuu: the dialect, not Chinese
        primary = subtags[0].lower()
    return ISO_LANGUAGES[primary]


def asr_instruction(context: str | None = None, hotwords: list[str] | None = None, task: str = "transcribe") -> str:
    """The HUMAN text before the audio: the task's instruction (SPEECH_TEXT_INSTRUCTIONS), then context and
    hotwords, no spaces."""
    text = SPEECH_TEXT_INSTRUCTIONS[task] + (context or "")
    words = [w.strip() for w in (hotwords or []) if w and w.strip()]
    if words:
        text += HOTWORDS_PREFIX + ",".join(words) + "."
    return text


def asr_messages(audio, context: str | None = None, hotwords: list[str] | None = None,
                 sample_rate: int | None = None, task: str = "transcribe") -> list[dict]:
    """The one HUMAN turn of an ASR (or translation) request: instruction (+ context, hotwords), then the audio."""
    part = {"type": "audio", "audio": audio}
    if sample_rate:
        part["sample_rate"] = sample_rate
    return [{"role": "user", "content": [{"type": "text", "text": asr_instruction(context, hotwords, task)}, part]}]


def dialect_prefix(dialect: str | None) -> str | None:
    """What is appended after the assistant prefix to force a language/dialect."""
    if dialect is None or not dialect.strip():
        return None
    tag = dialect.strip()
    if "\t" in tag or "\n" in tag:
        raise ValueError("a dialect tag cannot contain tabs or newlines")
    return tag + "\t"


@dataclass
class Transcript:
    language: str | None
    text: str


def parse_transcript(output: str, forced_language: str | None = None) -> Transcript:
    """`Language\\ttext` -> Transcript. With a forced language the output is the text alone."""
    if forced_language:
        return Transcript(forced_language, output.strip())
    lang, sep, text = output.partition("\t")
    if not sep:
        return Transcript(None, output.strip())
    return Transcript(lang.strip() or None, text.strip())


class TranscriptStream:
    """Streams exactly the transcript `parse_transcript` reads from the whole output: the text after the first
    tab (all of it when no tab comes, or with a forced language) without the whitespace around it. Text is held
    back until the tab; then leading whitespace is dropped and trailing whitespace waits for the text after it,
    so the deltas joined equal the final transcript."""

    def __init__(self, forced_language: str | None = None):
        self.seen_tab = bool(forced_language)
        self.buffer = ""  # before the tab: all the text; after it: the whitespace held back
        self.started = False  # the transcript's first non-space character went out

    def _transcript(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.buffer + text
        body = text.rstrip()
        self.buffer = text[len(body):]
        return body

    def feed(self, delta: str) -> str:
        if self.seen_tab:
            return self._transcript(delta)
        self.buffer += delta
        if "\t" in self.buffer:
            self.seen_tab = True
            rest = self.buffer.split("\t", 1)[1]
            self.buffer = ""
            return self._transcript(rest)
        return ""

    def flush(self) -> str:
        """At the end of the output: the text still held back when no tab came (`parse_transcript` then reads
        the whole output as the transcript, no language); trailing whitespace is dropped."""
        held = ""
        if not self.seen_tab:
            self.seen_tab, whole, self.buffer = True, self.buffer, ""
            held = self._transcript(whole)
        self.buffer = ""
        return held


@dataclass
class TranscriptDeltas:
    """A TranscriptStream over the chat's text deltas, with their tokens' log probabilities when they were asked
    for: a delta's entries go out with the transcript text they made. The tokens of the language tag and its tab,
    and whitespace the transcript drops at either end, are not in the transcript, so they are not reported (a token
    spanning the tab and transcript text is); an output without a tab is transcript throughout."""

    stream: TranscriptStream
    held: list[TokenLogprob] = field(default_factory=list)  # tokens whose text has not gone out (yet)
    logprobs: bool = False  # they were asked for: each transcript delta carries a list (maybe empty)

    def feed(self, delta: TextDelta) -> TextDelta | None:
        """The transcript delta `delta` makes, None while its text is held back or dropped."""
        before_tab = not self.stream.seen_tab
        text = self.stream.feed(delta.text)
        holds_tab = before_tab and self.stream.seen_tab
        if holds_tab:
            self.held = []  # the language tag: not transcript
        if (holds_tab or not before_tab) and not self.stream.started:
            return None  # the tab, or whitespace before the transcript: dropped with its text
        self.held += delta.logprobs or []
        return self._delta(text) if text else None

    def flush(self) -> TextDelta | None:
        """At the end: the text held back when no tab came, with the entries held but those of the whitespace the
        transcript drops at either end."""
        text = self.stream.flush()
        while self.held and not self.held[-1].token.strip():
            self.held.pop()
        while self.held and not self.held[0].token.strip():
            self.held.pop(0)
        return self._delta(text) if text else None

    def _delta(self, text: str) -> TextDelta:
        entries, self.held = self.held, []
        return TextDelta(text, entries if self.logprobs else None)
