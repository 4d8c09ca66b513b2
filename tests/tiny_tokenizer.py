"""The tiny checkpoint's tokenizer alone (engine.tiny's files, no weights), for prompt tests that need no model:
writing it takes milliseconds where the whole tiny checkpoint takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

from engine.models.thinker.tokenizer import MingTokenizer
from engine.tiny import tiny_tokenizer_files


def tiny_tokenizer(folder: Path) -> MingTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in tiny_tokenizer_files().items():
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return MingTokenizer(folder)
