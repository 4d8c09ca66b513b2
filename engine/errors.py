"""The one exception base of the engine: every problem with what a user or a checkpoint supplied
(a checkpoint that cannot be loaded, a config, a tokenizer, media, a prompt) is a `MingError` whose
message can be shown as it is. `code` is the stable machine-readable name the server reports."""

from __future__ import annotations


class MingError(Exception):
    """Base of the engine's user-facing errors."""

    code = "invalid_request"
