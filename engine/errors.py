"""The one exception base of the engine: every problem with what a user or a checkpoint supplied
(a checkpoint that cannot be loaded, a config, a tokenizer, media, a prompt) is a `MingError` whose
message can be shown as it is. `code` is the stable machine-readable name the server reports."""

from __future__ import annotations


class MingError(Exception):
    """Base of the engine's user-facing errors."""

    code = "invalid_request"


class SettingError(MingError):
    """A setting a client sent was refused: `code` is the wire error code (invalid_value,
    invalid_type, unknown_parameter, unsupported_parameter) and `param` names the field."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
