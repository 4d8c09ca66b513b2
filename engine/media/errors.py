"""Error type raised by the media front ends for unusable user input."""

from __future__ import annotations

from pathlib import Path

from engine.errors import MingError


class MediaError(MingError, ValueError):
    """Raised when an image, audio clip or video cannot be used as model input.

    The message always names the problem (empty, corrupt, too large, wrong type, ...), so it
    can be shown to a user as is.
    """

    code = "invalid_media"



class DecodeStopped(MediaError):
    """A decode stopped because the one who asked for it no longer wants it (an HTTP client went away)."""

    def __init__(self, what: str):
        super().__init__(f"the decode of {what} was stopped: no one is waiting for it")


class AudioTooLong(MediaError):
    """Audio longer than a decode was allowed to read (engine.media.audio.decode_audio's `max_seconds`), found from
    its container's stated duration before decoding (`seconds`: that duration) or while decoding, which stops there
    (`seconds`: None, it is at least `most_s`)."""

    def __init__(self, what: str, most_s: float, seconds: float | None = None):
        length = f"{seconds:.1f} s (its container says)" if seconds is not None else f"longer than {most_s:g} s"
        super().__init__(f"{what} is too long: {length}")
        self.most_s, self.seconds = most_s, seconds

# What an FFmpeg (PyAV) error class means for the file being decoded, in words a user can act on.
_FFMPEG_MEANINGS = {
    "InvalidDataError": "is not {a} {kind} file FFmpeg can read (an unknown format, or a corrupt or cut-off file)",
    "EOFError": "ends before its {kind} does (a cut-off file)",
    "DemuxerNotFoundError": "is in a container format this FFmpeg build cannot read",
    "DecoderNotFoundError": "is in {a} {kind} codec this FFmpeg build cannot decode",
    "PatchWelcomeError": "uses {a} {kind} feature FFmpeg does not support",
}


def decode_failure(exc: BaseException, what: str, kind: str) -> MediaError:
    """The MediaError for a decoder's exception while reading `what` as `kind` ("audio", "video"): what is
    wrong, in words. FFmpeg's own text carried its errno and the file name, '<none>' for data in memory
    ("[Errno 1094995529] Invalid data found when processing input: '<none>'", which a browser showed cut
    off at the quote, taking <none> for a tag)."""
    a = "an" if kind[:1] in "aeiou" else "a"
    meaning = _FFMPEG_MEANINGS.get(type(exc).__name__)
    if meaning is not None:
        return MediaError(f"{what} {meaning.format(a=a, kind=kind)}")
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__  # strerror: without errno and name
    return MediaError(f"{what} could not be decoded as {kind}: {reason}")


def not_a_file(path: Path, kind: str) -> MediaError:
    """The MediaError for a `kind` ("audio", "image", "video") path that names no readable file: a folder is said to
    be one (a folder given for a clip was 'audio file not found: /tmp', though it plainly exists)."""
    if path.is_dir():
        return MediaError(f"{path} is a folder, not {'an' if kind[:1] in 'aeiou' else 'a'} {kind} file")
    return MediaError(f"{kind} file not found: {path}")
