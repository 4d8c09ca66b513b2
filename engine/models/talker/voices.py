"""The voice library: a cloned voice (its CAM++ speaker vector, prompt latents and transcript) saved
under a name in the studio cache (`$MING_STUDIO_CACHE` or `~/.cache/ming-omni-studio`, folder
`voices/`), listed, reused without the clip, and deleted.

A voice belongs to the talker it was made with (its latents are that VAE's): each stores the model
fingerprint and is refused by another model. Names are 1-64 letters, digits, CJK characters, spaces,
`-`, `_` or `.`, not starting with `.` (the library's own temporary folders do, and are never listed);
they are never paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from engine.errors import MingError
from engine.tiny import default_cache_dir
from engine.models.talker.pipeline import Conditioning

MAX_NAME_CHARS = 64
_NAME = re.compile(rf"[\w\u3400-\u9fff .-]{{1,{MAX_NAME_CHARS}}}")
VOICE_FILE, META_FILE = "voice.safetensors", "voice.json"


class VoiceError(MingError, ValueError):
    code = "invalid_request"


class VoiceNotFound(VoiceError):
    code = "voice_not_found"


class VoiceExists(VoiceError):
    code = "voice_exists"


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.strip() != name or name.startswith("."):
        raise VoiceError(f"invalid voice name {name!r}: use 1-64 letters, digits, spaces, '-', '_' or '.' "
                         "(no leading/trailing spaces, no leading '.')")
    return name


@dataclass
class VoiceInfo:
    name: str
    ref_text: str | None
    seconds: float
    speakers: int
    created: float
    model: str
    warning: str | None = None  # what to tell of the clip it was cloned from (a clipped one), kept with it


class VoiceLibrary:
    def __init__(self, root: str | Path | None = None, model: str = ""):
        self.root = Path(root) if root is not None else default_cache_dir() / "voices"
        self.model = model

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def check_free(self, name: str) -> None:
        """VoiceExists when a voice is saved under `name`."""
        if self._dir(name).exists():
            raise VoiceExists(f"a voice named {name!r} is already saved: choose another name, or replace it")

    def save(self, name: str, cond: Conditioning, seconds: float, overwrite: bool = False) -> VoiceInfo:
        """Keep a cloned voice under `name`; a voice already saved under it is replaced only with `overwrite`
        (else VoiceExists: a reference recording is not lost to a name picked twice)."""
        if cond.latents is None:
            raise VoiceError("only a cloned voice (from a reference clip) can be saved")
        target = self._dir(name)
        if not overwrite:
            self.check_free(name)
        speakers = 1 if cond.speaker is None else int(cond.speaker.shape[0])  # the Preview keeps no speaker vector
        info = VoiceInfo(name, cond.ref_text, float(seconds), speakers, time.time(), self.model,
                         "; ".join(cond.warnings) or None)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".voice-", dir=self.root))
        try:
            tensors = {"latents": cond.latents.float().contiguous()}
            if cond.speaker is not None:
                tensors["speaker"] = cond.speaker.float().contiguous()
            save_file(tensors, str(tmp / VOICE_FILE))
            (tmp / META_FILE).write_text(json.dumps(info.__dict__, ensure_ascii=False, indent=1), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return info

    def _info(self, folder: Path) -> VoiceInfo | None:
        try:
            data = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            return VoiceInfo(**{k: data.get(k) for k in VoiceInfo.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None

    def list(self) -> list[VoiceInfo]:
        if not self.root.is_dir():
            return []
        out = [self._info(d) for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        return [v for v in out if v is not None and (not self.model or v.model == self.model)]

    def names(self) -> list[str]:
        return [v.name for v in self.list()]

    def check_saved(self, name: str) -> VoiceInfo:
        """The saved voice `name` of this talker model; VoiceNotFound (listing the saved ones) or
        VoiceError (made with another model) otherwise."""
        folder = self._dir(name)
        info = self._info(folder) if folder.is_dir() else None
        if info is None:
            known = ", ".join(self.names()) or "none saved yet"
            raise VoiceNotFound(f"unknown voice {name!r}; saved voices: {known}")
        if self.model and info.model != self.model:
            raise VoiceError(f"voice {name!r} was made with another talker model; clone it again with this one")
        return info

    def load(self, name: str) -> Conditioning:
        folder = self._dir(name)
        info = self.check_saved(name)
        try:
            tensors = load_file(str(folder / VOICE_FILE))
        except Exception as e:
            raise VoiceError(f"voice {name!r} is damaged ({e}); delete it and clone it again") from e
        return Conditioning(speaker=tensors.get("speaker"), latents=tensors["latents"], ref_text=info.ref_text)

    def delete(self, name: str) -> None:
        folder = self._dir(name)
        if not folder.is_dir():
            raise VoiceNotFound(f"unknown voice {name!r}")
        shutil.rmtree(folder)

