"""Talker prompts (spec §7.2; the Preview's, §7.11) and instruction captions (spec §7.10).

`build_prompt` returns the token ids (each piece tokenised separately, then concatenated) and where
the speaker vectors and prompt-latent embeddings go. `Instruction` turns caller-friendly settings into
the upstream caption JSON, validating them:

  * dialect (方言), emotion (情感), speed (语速), pitch (基频), volume (音量): English aliases from the
    tables below map to the Chinese labels the model was trained with; a value already written in
    Chinese is passed through as given (the upstream label set is not published, so we cannot
    check it — documented fallback). Any other value is refused with the list of accepted aliases.
  * IP (character voice) and 风格 (free-text voice design) are free text.
  * BGM: Genre, Mood, Instrument, Theme, ENV (ambience), SNR (dB, a number).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from engine.errors import MingError, shown, shown_number
from engine.models.talker.tokenizer import (AUDIO, AUDIO_PATCH, ENDOFTEXT, IM_END, IM_START, VISION_END, VISION_PAD,
                                            VISION_START, TalkerTokenizer)

SYSTEM_PIECE = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
USER_PIECE = f"{IM_START}user\n"
TEXT_INPUT_PIECE = " Text input:\n"
END_USER_PIECE = f"{IM_END}\n"
ASSISTANT_PIECE = f"{IM_START}assistant\n"
BGM_TEXT_KEYS = ("Genre: ", "Mood: ", "Instrument: ", "Theme: ", "Duration: ")

TASK_PROMPTS = {
    "speech": "Please generate speech based on the following description.\n",
    "sound": "Please generate audio events based on given text.\n",
    "music": "Please generate music based on the following description.\n",
}

DIALECTS = {"cantonese": "广粤话", "sichuanese": "四川话", "northeastern": "东北话", "henanese": "河南话",
            "shanghainese": "上海话", "hokkien": "闽南语", "tianjin": "天津话", "shaanxi": "陕西话",
            "shandong": "山东话", "hunanese": "湖南话", "wuhan": "武汉话", "beijing": "北京话"}
EMOTIONS = {"happy": "高兴", "sad": "悲伤", "angry": "愤怒", "surprised": "惊讶", "fearful": "恐惧",
            "disgusted": "厌恶", "calm": "平静", "neutral": "平静"}
SPEEDS = {"slow": "慢速", "medium": "中速", "normal": "中速", "fast": "快速"}
LEVELS = {"low": "低", "medium": "中", "normal": "中", "high": "高"}
BGM_FIELDS = ("Genre", "Mood", "Instrument", "Theme", "ENV", "SNR")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class InstructionError(MingError, ValueError):
    code = "invalid_request"


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def _label(kind: str, value, table: dict[str, str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InstructionError(f"{kind} must be a non-empty string")
    v = value.strip()
    if v.lower() in table:
        return table[v.lower()]
    if has_cjk(v) and len(v) <= 32:
        return v
    valid = ", ".join(sorted(set(table)))
    raise InstructionError(f"unknown {kind} {value!r}: use one of {valid}, or the Chinese label itself "
                           f"(e.g. {next(iter(table.values()))})")


def _free_text(kind: str, value, limit: int = 2000) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InstructionError(f"{kind} must be a non-empty string")
    if len(value) > limit:
        raise InstructionError(f"{kind} is too long ({len(value)} characters, at most {limit})")
    return value


@dataclass
class Instruction:
    """Caller-facing instruction settings; `caption()` is the upstream JSON (None when empty)."""

    dialect: str | None = None
    emotion: str | None = None
    speed: str | None = None
    pitch: str | None = None
    volume: str | None = None
    ip: str | None = None
    style: str | None = None
    bgm: dict = field(default_factory=dict)

    KEYS = ("dialect", "emotion", "speed", "pitch", "volume", "ip", "style")

    @classmethod
    def parse(cls, spec) -> "Instruction | None":
        """From None, an Instruction, a dict, or "key=value,key=value" (BGM keys as bgm.Genre=...)."""
        if spec is None or isinstance(spec, Instruction):
            return spec
        if isinstance(spec, str):
            items: dict = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise InstructionError(f"instruction {part!r} is not key=value; keys: {', '.join(cls.KEYS)}, "
                                           f"bgm.<{'|'.join(BGM_FIELDS)}>")
                items[key.strip()] = value.strip()
            spec = items
        if not isinstance(spec, dict):
            raise InstructionError(f"instruct must be a dict or 'key=value,...', got {type(spec).__name__}")
        bgm = dict(spec.get("bgm") or {})
        plain = {}
        for key, value in spec.items():
            if key == "bgm":
                continue
            if key.lower().startswith("bgm."):
                bgm[key[4:]] = value
            elif key.lower() in cls.KEYS:
                plain[key.lower()] = value
            else:
                raise InstructionError(f"unknown instruction key {key!r}; valid keys: {', '.join(cls.KEYS)}, "
                                       f"bgm.<{'|'.join(BGM_FIELDS)}>")
        inst = cls(**plain, bgm=bgm)
        inst.validate()
        return inst

    def validate(self) -> None:
        self.dialect = _label("dialect", self.dialect, DIALECTS)
        self.emotion = _label("emotion", self.emotion, EMOTIONS)
        self.speed = _label("speed", self.speed, SPEEDS)
        self.pitch = _label("pitch", self.pitch, LEVELS)
        self.volume = _label("volume", self.volume, LEVELS)
        self.ip = _free_text("ip (character voice)", self.ip, 200)
        self.style = _free_text("style (voice design)", self.style)
        clean = {}
        for key, value in self.bgm.items():
            canon = next((f for f in BGM_FIELDS if f.lower() == str(key).lower()), None)
            if canon is None:
                raise InstructionError(f"unknown BGM key {key!r}; valid keys: {', '.join(BGM_FIELDS)}")
            if canon == "SNR":
                try:
                    value = float(value)
                except OverflowError:  # an integer past float's range: out of range below
                    value = math.inf
                except (TypeError, ValueError):
                    raise InstructionError(f"BGM SNR must be a number (dB), got {shown(value)}") from None
                if not math.isfinite(value) or not -20 <= value <= 60:
                    raise InstructionError(f"BGM SNR must be between -20 and 60 dB, got {value}")
            else:
                value = _free_text(f"BGM {canon}", value, 200)
            clean[canon] = value
        self.bgm = clean

    @property
    def uses_zero_speaker(self) -> bool:
        """Free-text voice design runs with a zero speaker vector (spec §7.10)."""
        return self.style is not None

    def caption(self) -> str | None:
        if not any([self.dialect, self.emotion, self.speed, self.pitch, self.volume, self.ip, self.style, self.bgm]):
            return None
        # the caller's BGM keys in the caller's order (the reference takes the caller's object as
        # given), then any of the six it left out, as null
        bgm = {**self.bgm, **{k: None for k in BGM_FIELDS if k not in self.bgm}}
        entry = {"序号": 1, "说话人": "speaker_1", "方言": self.dialect, "风格": self.style, "语速": self.speed,
                 "基频": self.pitch, "音量": self.volume, "情感": self.emotion, "BGM": bgm, "IP": self.ip}
        if bgm.get("SNR") is not None:
            order = ("序号", "说话人", "BGM", "情感", "方言", "风格", "语速", "基频", "音量", "IP")
            entry = {k: entry[k] for k in order}
        return json.dumps({"audio_sequence": [entry]}, ensure_ascii=False)


def music_text(genre: str, mood: str, instrument: str, theme: str, duration_s: float) -> str:
    """The BGM description format ` Genre: … Mood: … Instrument: … Theme: … Duration: 60s.`"""
    parts = []
    for key, value in zip(BGM_TEXT_KEYS[:4], (genre, mood, instrument, theme)):
        if not isinstance(value, str) or not value.strip():
            raise InstructionError(f"music needs a non-empty {key.strip(': ').lower()}")
        parts.append(f"{key}{value.strip().rstrip('.')}.")
    # (the range test refuses NaN and infinities; math.isfinite would raise OverflowError on a huge integer)
    if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float)) or not 1 <= duration_s <= 300:
        raise InstructionError(f"music duration must be between 1 and 300 seconds, got {shown_number(duration_s)}")
    return " " + " ".join(parts) + f" Duration: {int(round(duration_s))}s."


def podcast_text(lines: list[str]) -> str:
    """Dialogue lines as the talker reads them: ' speaker_1:...\n speaker_2:...\n' (spec §7.10)."""
    return "".join(f" speaker_{i + 1}:{line}\n" for i, line in enumerate(lines))


def is_music_text(text: str) -> bool:
    return all(k in text for k in BGM_TEXT_KEYS)


@dataclass
class TalkerPrompt:
    ids: list[int]
    speaker_slots: list[int]     # positions whose embedding is replaced by speaker vector i
    latent_slots: list[int]      # positions replaced by the prompt-latent embeddings, in order
    text: str                    # the prompt as a string (for logs and tests)


def build_prompt(tok: TalkerTokenizer, task_prompt: str, text: str, n_speakers: int = 0,
                 prompt_text: str | None = None, n_prompt_patches: int = 0, instruction: str | None = None) -> TalkerPrompt:
    """Pieces of spec §7.2. Prompt text and prompt patches are only used together (cloning): when there
    are prompt patches and `prompt_text` is not None (an empty transcript still places the patches)."""
    pieces: list[tuple[str, bool]] = [(SYSTEM_PIECE, True), (USER_PIECE, True), (task_prompt, True)]
    for i in range(1, n_speakers + 1):
        pieces += [(f"  speaker_{i}:", True), (VISION_START, True), (VISION_PAD, True), (f"{VISION_END}\n", True)]
    if not is_music_text(text):
        pieces.append((TEXT_INPUT_PIECE, True))
    cloning = prompt_text is not None and n_prompt_patches > 0
    if cloning and prompt_text:
        pieces.append((prompt_text, False))
    pieces += [(text, False), (END_USER_PIECE, True), (ASSISTANT_PIECE, True)]
    if instruction is not None:
        pieces += [(instruction, False), (IM_END, True)]
    pieces.append((AUDIO, True))
    if cloning:
        pieces += [(AUDIO_PATCH, True)] * n_prompt_patches
    ids: list[int] = []
    for piece, template in pieces:
        ids += tok.encode_template(piece) if template else tok.encode_text(piece)
    vs, pad, audio = tok.token_id(VISION_START), tok.token_id(VISION_PAD), tok.token_id(AUDIO)
    speaker_slots = [i + 1 for i, t in enumerate(ids) if t == vs and i + 1 < len(ids) and ids[i + 1] == pad]
    audio_pos = max(i for i, t in enumerate(ids) if t == audio)
    latent_slots = list(range(audio_pos + 1, audio_pos + 1 + n_prompt_patches)) if cloning else []
    return TalkerPrompt(ids, speaker_slots[:n_speakers], latent_slots, "".join(p for p, _ in pieces))


def build_preview_prompt(tok: TalkerTokenizer, text: str, prompt_text: str | None = None,
                         n_prompt_patches: int = 0) -> TalkerPrompt:
    """The Preview talker's prefix (spec §7.11): tokens(prompt_text) + tokens(text) + `<|endoftext|>`, each
    tokenised separately, then the N_p prompt-latent embeddings appended (their slots follow the ids).
    No chat template, no speaker slot, no instruction."""
    ids = tok.encode_text(prompt_text or "") + tok.encode_text(text) + [tok.token_id(ENDOFTEXT)]
    slots = list(range(len(ids), len(ids) + n_prompt_patches))
    return TalkerPrompt(ids, [], slots, f"{prompt_text or ''}{text}{ENDOFTEXT}")
