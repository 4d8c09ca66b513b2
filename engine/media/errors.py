"""Error type raised by the media front ends for unusable user input."""

from __future__ import annotations

from engine.errors import MingError


class MediaError(MingError, ValueError):
    """Raised when an image, audio clip or video cannot be used as model input.

    The message always names the problem (empty, corrupt, too large, wrong type, ...), so it
    can be shown to a user as is.
    """

    code = "invalid_media"
