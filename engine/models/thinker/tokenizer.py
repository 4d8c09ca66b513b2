"""The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json, via `tokenizers`), the
special tokens looked up by name, and a streaming decoder that never splits a UTF-8 character."""

from __future__ import annotations

import codecs
import json
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from engine.errors import MingError

# Special tokens the Ming prompt format and position builder use, by name (ids come from the
# tokenizer of each checkpoint; spec §2.10).
ROLE_START, ROLE_END_TAG, TURN_END = "<role>", "</role>", "<|role_end|>"
IMAGE_PATCH, IMAGE_START, IMAGE_END = "<imagePatch>", "<image>", "</image>"
VIDEO_START, VIDEO_END, FRAME_PATCH = "<video>", "</video>", "<framePatch>"
AUDIO_PATCH, AUDIO_START, AUDIO_END = "<audioPatch>", "<audio>", "</audio>"
REQUIRED_SPECIAL_TOKENS = (ROLE_START, ROLE_END_TAG, TURN_END, IMAGE_PATCH, IMAGE_START, IMAGE_END,
                           VIDEO_START, VIDEO_END, FRAME_PATCH, AUDIO_PATCH, AUDIO_START, AUDIO_END)


class TokenizerError(MingError, RuntimeError):
    """The checkpoint's tokenizer files are missing or lack a token the model needs."""

    code = "tokenizer_error"


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level mapping, inverted: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    codes = printable[:]
    for b in range(256):
        if b not in printable:
            codes.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(codes, chars)}


class MingTokenizer:
    def __init__(self, root: str | Path):
        root = Path(root)
        path = root / "tokenizer.json"
        if not path.is_file() or path.stat().st_size == 0:
            raise TokenizerError(f"{path}: missing or empty (the real tokenizer ships with the checkpoint)")
        try:
            self._tok = Tokenizer.from_file(str(path))
            self._plain = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load ({e})") from e
        # User text is encoded with special-token parsing off: typed "<role>" stays text.
        self._plain.encode_special_tokens = True
        cfg_path = root / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"{path}: special tokens missing: {', '.join(missing)}")
        eos = self.config.get("eos_token", TURN_END)
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token = eos
        self.eos_id = self.token_id(eos)
        self._bytes = byte_level_alphabet()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._added = added
        # Splits template text at its added tokens, longest first (as the tokenizer matches them).
        self._added_split = re.compile("(" + "|".join(re.escape(c) for c in sorted(added, key=len, reverse=True))
                                       + ")") if added else None

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return i

    # encode_batch releases Python's interpreter lock while it works (encode does not), so a long
    # prompt being tokenised does not stall the server's event loop or other requests' threads.
    def encode(self, text: str) -> list[int]:
        """Encode with special tokens recognised (template text)."""
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode user-provided text: special-token strings in it are ordinary text."""
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """A prompt given as (text, is_template) pieces, tokenised as the reference tokenises the whole
        prompt string in one pass (spec §6.1): the text between two added tokens is one run, whichever
        pieces it spans ("你好。" + "\n\ndetailed thinking off" is pre-tokenised and merged whole, where
        the real tokenizer can join "。\n\n"); added tokens are split off template pieces only, so
        "<role>" typed in a plain piece (user text) stays text."""
        runs: list[str | int] = []
        text: list[str] = []
        for piece, is_template in pieces:
            if not piece:
                continue
            parts = self._added_split.split(piece) if is_template and self._added_split else [piece]
            for k, part in enumerate(parts):
                if k % 2:  # an added token of the template
                    if text:
                        runs.append("".join(text))
                        text = []
                    runs.append(self._added[part])
                elif part:
                    text.append(part)
        if text:
            runs.append("".join(text))
        texts = [r for r in runs if isinstance(r, str)]
        encoded = iter(self._plain.encode_batch(texts, add_special_tokens=False) if texts else [])
        ids: list[int] = []
        for r in runs:
            ids += [r] if isinstance(r, int) else next(encoded).ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes | None:
        """Raw bytes of a byte-level token; None for special tokens or non-byte-level vocabularies."""
        if token_id in self.special_ids:
            return b""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        try:
            return bytes(self._bytes[c] for c in piece)
        except KeyError:
            return None

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own, as a log-probability entry reports it: a byte-level token's
        own bytes (part of a character when it splits one), a special token's name in UTF-8, else the token's
        text decoded alone."""
        if token_id in self.special_ids:
            return (self._tok.id_to_token(token_id) or "").encode("utf-8")
        raw = self.token_bytes(token_id)
        return raw if raw is not None else self.decode([token_id]).encode("utf-8")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text deltas. Byte-level tokens go through an incremental UTF-8
    decoder, so a character split over several tokens is emitted once complete; invalid bytes
    become U+FFFD. Special tokens are skipped (as `skip_special_tokens=True`)."""

    def __init__(self, tokenizer: MingTokenizer):
        self.tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""  # fallback path only

    def push(self, token_id: int) -> str:
        raw = self.tok.token_bytes(token_id)
        if raw is not None and not self._ids:
            return self._utf8.decode(raw)
        # Non byte-level vocabulary: decode everything so far, emit the stable new suffix.
        self._ids.append(token_id)
        text = self.tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta

    def flush(self, complete_only: bool = False) -> str:
        """The text held back, at the reply's end. `complete_only`: the reply was cut (at its token limit), so a
        character whose last bytes never came is dropped rather than ending the reply as U+FFFD."""
        if self._ids:
            text = self.tok.decode(self._ids)
            delta, self._emitted = text[len(self._emitted):], text
            return delta.rstrip("\ufffd") if complete_only else delta
        if complete_only:
            self._utf8.reset()  # (it holds only the start of a valid character: invalid bytes were emitted as U+FFFD)
            return ""
        return self._utf8.decode(b"", final=True)
