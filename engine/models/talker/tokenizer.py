"""The talker's own Qwen2 tokenizer (`talker/llm/`, via `tokenizers`): `tokenizer.json`, or the
slow-tokenizer pair `vocab.json` + `merges.txt` with the special tokens of `tokenizer_config.json`.
The prompt pieces of spec §7.2 are tokenised one by one; template pieces recognise special tokens,
user text never does (a typed "<|im_end|>" stays text, and so does an added token the tokenizer files mark
non-special, such as Qwen2.5's "<tool_call>" or "<|fim_prefix|>": to user text every added token is special)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from engine.errors import MingError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_PAD, VISION_END = "<|vision_start|>", "<|vision_pad|>", "<|vision_end|>"
AUDIO, AUDIO_PATCH = "<audio>", "<audioPatch>"
REQUIRED_TOKENS = (IM_START, IM_END, VISION_START, VISION_PAD, VISION_END, AUDIO, AUDIO_PATCH)
# The Preview talker's prompt (spec §7.11) has one special token: the text prefix ends with it.
ENDOFTEXT = "<|endoftext|>"
PREVIEW_REQUIRED_TOKENS = (ENDOFTEXT,)
# Qwen2's pre-tokenizer split (a fact of the released Qwen2 tokenizer, used only when tokenizer.json is absent).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


class TalkerTokenizerError(MingError, RuntimeError):
    code = "tokenizer_error"


def _from_slow_files(folder: Path, all_special: bool = False) -> Tokenizer:
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    cfg_path = folder / "tokenizer_config.json"
    added = json.loads(cfg_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if cfg_path.is_file() else {}
    for idx in sorted(added, key=int):
        entry = added[idx]
        special = all_special or bool(entry.get("special", True))
        token = AddedToken(entry["content"], special=special, normalized=False)
        tok.add_special_tokens([token]) if special else tok.add_tokens([token])
    return tok


def _all_added_special(path: Path) -> Tokenizer:
    """tokenizer.json with every added token marked special: with `encode_special_tokens` set, the tokenizer then
    reads none of them in user text (it would still read an added token marked non-special as one token)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    for entry in spec.get("added_tokens", []):
        entry["special"] = True
    return Tokenizer.from_str(json.dumps(spec))


class TalkerTokenizer:
    def __init__(self, folder: str | Path, required: tuple[str, ...] = REQUIRED_TOKENS):
        """`required`: the special tokens the release's prompt layout uses (each must be one token)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            if path.is_file() and path.stat().st_size:
                self._tok = Tokenizer.from_file(str(path))
                self._plain = _all_added_special(path)
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                self._tok, self._plain = _from_slow_files(folder), _from_slow_files(folder, all_special=True)
            else:
                raise TalkerTokenizerError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt) for the talker")
        except TalkerTokenizerError:
            raise
        except Exception as e:
            raise TalkerTokenizerError(f"{folder}: cannot load the talker tokenizer ({e})") from e
        self._plain.encode_special_tokens = True
        missing = [t for t in required if self._tok.token_to_id(t) is None]
        if missing:
            raise TalkerTokenizerError(f"{folder}: the talker tokenizer lacks {', '.join(missing)} (each must be one token)")

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TalkerTokenizerError(f"token {token!r} is not in the talker vocabulary")
        return i

    def encode_template(self, text: str) -> list[int]:
        """A prompt-template piece: special-token strings are special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """User text: special-token strings in it stay ordinary text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
