"""The one exception base of the engine: every problem with what a user or a checkpoint supplied
(a checkpoint that cannot be loaded, a config, a tokenizer, media, a prompt) is a `MingError` whose
message can be shown as it is. `code` is the stable machine-readable name the server reports."""

from __future__ import annotations

import math
from typing import Any

ECHO_CHARS = 64  # of a caller's value quoted in an error message

# The exit codes every command line of the engine returns (argparse's own usage errors are 2 as well).
EXIT_FAILED = 1  # the work itself failed after it started (a generation's error event, a file that could not be written)
EXIT_INPUT = 2  # what the user gave was refused: a flag, an input file, a model that cannot be loaded
# The codes of an `Error` event that are the engine's own failure (everything else: the request was refused).
ENGINE_FAILURE_CODES = ("engine_error", "server_error", "talker_error")


def error_exit_code(code: str) -> int:
    """The exit code of a command line whose work ended in an `Error` event of this code."""
    return EXIT_FAILED if code in ENGINE_FAILURE_CODES else EXIT_INPUT


# The picture formats the engine's image decoder reads (engine.media.image): Pillow's name of each -> its name as
# said to a user. The decoder opens these and nothing else (an SVG, a PDF, a Photoshop or PostScript file is refused
# naming them), and the studio checks an attachment against the same list (engine.client re-exports it). PPM and TGA
# are on it because the reference decodes with PIL (spec §4.1, fetch_image): its frame directories of .ppm / .tga
# frames are read (tests/media/test_video.py); PCX, ICO, PSD and the like are not.
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                 "AVIF": "AVIF", "PPM": "PPM / PGM / PBM", "TGA": "TGA"}


def image_formats_named() -> str:
    """The formats the image decoder reads, as a sentence says them: "PNG, JPEG, ... or AVIF"."""
    *most, last = IMAGE_FORMATS.values()
    return f"{', '.join(most)} or {last}"


def unread_picture(what: str) -> str:
    """What is said of `what` when it is a picture in none of IMAGE_FORMATS (or a corrupt one)."""
    return f"{what} is not a picture in a format the engine reads ({image_formats_named()}), or it is corrupt"


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


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """A caller's value as an error message quotes it: its repr, cut to `limit` characters, saying how
    long it was when cut (a 10,000-character model id is not sent back whole)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def shown_number(value: Any) -> str:
    """A caller's number as an error message quotes it: as written, or cut like `shown` when it is
    long (JSON lets a client write an integer of thousands of digits; one past Python's digit limit for str(),
    sys.get_int_max_str_digits, is said by its size)."""
    try:
        text = str(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * math.log10(2)):,} digits"
    return text if len(text) <= ECHO_CHARS else shown(text)


# What a model load raises for what the user supplied, which a command line shows as one message: the checkpoint,
# its config or tokenizer (MingError), files and folders (OSError), settings and sizes (ValueError: the planner's
# "does not fit", a dtype).
LOAD_ERRORS = (MingError, OSError, ValueError)


def load_failure(model: str | None, error: BaseException) -> str:
    """The one line a command line prints when `Engine.load(model)` raised one of LOAD_ERRORS (None: the tiny
    demo checkpoint)."""
    return f"error: could not load the model {model or 'the tiny demo checkpoint'!r}: {error}"
