"""A file the user gave the studio, checked before it goes to the engine: a 0-byte file, a text file renamed
.wav, a PDF renamed .png, a picture over the engine's pixel limit or a clip over its length limit came back in
the engine's wire terms ("'item.content[0].audio' is not an audio file FFmpeg can read", "'image[0]' is
empty", "audio: not a recognised audio file ...; give samples with their sample_rate instead"), naming no file.
`media_problem` says what is wrong with which file, in the words of the page, with the limits the engine's
model card reports (ModelInfo.limits); None when the file looks fine (the engine still has the last word)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from engine.client import IMAGE_FORMATS as DECODED_IMAGE_FORMATS
from engine.client import image_formats_named

VOICE_CLIP_SECONDS = 30.0  # the talker's limit for a clip to clone (engine.models.talker.audio)
AUDIO_FORMATS = "WAV, MP3, FLAC, OGG, WebM, M4A or Opus"
IMAGE_FORMATS = image_formats_named()  # the engine decoder's own list (a PSD PIL reads here was refused there)
VIDEO_FORMATS = "MP4, WebM, MOV or MKV"
VIDEO_SOUND = "video sound"  # a video given for its sound (the Speech tab): checked as audio, named as a video
TO_TRANSCRIBE = "audio to transcribe"  # a recording for the Speech tab: checked as audio, held to the transcription limit
TRANSCRIBED = (VIDEO_SOUND, TO_TRANSCRIBE)  # held to the card's max_transcription_seconds (transcribed in windows)
SILENCE_DBFS = -60  # an audio clip whose loudest sample is quieter than this is silent


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _image_problem(path: Path, name: str, limits: dict) -> str | None:
    try:
        with Image.open(path, formats=tuple(DECODED_IMAGE_FORMATS)) as im:
            width, height = im.size
            im.verify()
    except Image.DecompressionBombError:  # (a 20000x20000 PNG of 48 KB was "not a picture ..., or is damaged")
        most = limits.get("max_image_pixels")
        taken = f"the engine takes at most {int(most):,} pixels" if most else "too many to open safely"
        return (f"'{name}' is too large: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, {taken}: make it smaller "
                "and try again.")
    except Exception:  # noqa: BLE001  (PIL raises many kinds for what is not a picture)
        return (f"'{name}' is not a picture the engine can read (a {IMAGE_FORMATS} file; this one is not, or is "
                "damaged).")
    most = limits.get("max_image_pixels")
    if most and width * height > most:
        return (f"'{name}' is too large: {width}x{height} = {width * height:,} pixels, the engine takes at most "
                f"{int(most):,} pixels: make it smaller and try again.")
    return None


def _is_picture(path: Path) -> bool:
    """Whether the file at `path` is a still picture the engine decodes (whatever its name says)."""
    try:
        with Image.open(path, formats=tuple(DECODED_IMAGE_FORMATS)) as im:
            im.verify()
        return True
    except Image.DecompressionBombError:  # (a picture, too large to open: _image_problem says so)
        return True
    except Exception:  # noqa: BLE001  (PIL raises many kinds for what is not a picture)
        return False


def _seconds(container) -> float | None:
    """How long an open PyAV container lasts: the container's duration, else its audio stream's; None if unknown."""
    if container.duration:
        return container.duration / 1e6
    audio = next((s for s in container.streams if s.type == "audio"), None)
    return float(audio.duration * audio.time_base) if audio is not None and audio.duration and audio.time_base else None


def clip_seconds(path: str | Path) -> float | None:
    """How long the audio or video at `path` lasts, whatever its format (Python's wave reads only integer PCM WAV:
    an MP3, FLAC or float WAV read as 0 s); None when it cannot be read or does not say."""
    try:
        import av
        with av.open(str(path)) as container:
            return _seconds(container)
    except Exception:  # noqa: BLE001  (no PyAV, or av.error.* for what FFmpeg cannot read)
        return None


def _peak(samples) -> float:
    """A decoded frame's loudest sample, full scale 1 (NaN where a float sample is NaN)."""
    import numpy as np

    if samples.dtype == np.uint8:  # unsigned 8-bit: silence is 128
        return float(np.abs(samples.astype(np.float32) - 128.0).max(initial=0)) / 128.0
    if samples.dtype.kind == "i":
        return float(np.abs(samples.astype(np.float64)).max(initial=0)) / np.iinfo(samples.dtype).max
    return float(np.abs(samples).max(initial=0))


def silent_audio(path: str | Path, first_only: bool = False) -> bool:
    """Whether the audio at `path` (`first_only`: its first channel) never rises above SILENCE_DBFS (decoded until a
    louder sample is found). Samples that are not audio are not silence: NaN or infinite ones, and a float WAV's all
    below the smallest normal float (integer samples labelled float), which the engine refuses as a corrupt file
    saying why (a float WAV of subnormal dust was called silent here, and the engine's reason never shown)."""
    import av
    import numpy as np

    from app.sound_track import first_channel

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        float_wav = container.format.name == "wav" and stream.codec_context.name.startswith("pcm_f")
        loudest, smallest_normal = 0.0, 0.0
        for frame in container.decode(stream):
            samples = (first_channel(frame) if first_only else frame).to_ndarray()
            peak = _peak(samples)
            if not np.isfinite(peak) or peak > 10 ** (SILENCE_DBFS / 20):
                return False
            loudest = max(loudest, peak)
            smallest_normal = float(np.finfo(samples.dtype).tiny) if samples.dtype.kind == "f" else 0.0
    return not (float_wav and 0.0 < loudest < smallest_normal)


def _av_problem(path: Path, name: str, kind: str, limits: dict, max_seconds: float | None) -> str | None:
    try:
        import av
    except ImportError:  # no PyAV: the engine checks the clip itself
        return None
    what, formats = ("a video", f"an {VIDEO_FORMATS}") if kind in ("video", VIDEO_SOUND) else ("an audio clip",
                                                                                                f"a {AUDIO_FORMATS}")
    most = max_seconds or (limits.get("max_transcription_seconds") if kind in TRANSCRIBED else None) or limits.get(
        "max_audio_seconds")
    kind = "audio" if kind in TRANSCRIBED else kind
    try:
        with av.open(str(path)) as container:
            streams = {s.type for s in container.streams}
            seconds = _seconds(container)
    except Exception:  # noqa: BLE001  (av.error.* for what FFmpeg cannot read)
        return f"'{name}' is not {what} the engine can read ({formats} file; this one is not, or is damaged)."
    if kind == "audio" and "audio" not in streams and "video" in streams:
        if _is_picture(path):  # FFmpeg opens a picture as a one-frame video: a cup.png renamed .wav was "a video"
            return f"'{name}' is a picture, not {what}: give {formats} file with sound."
        return f"'{name}' is a video with no sound track: there is no speech in it to use. Choose one with sound."
    if kind not in streams:
        return f"'{name}' has no {kind} in it."
    if kind == "audio" and most and seconds and seconds > most:
        return (f"'{name}' is {seconds:,.0f} s long; {'a voice clip is' if max_seconds else 'the engine takes'} at "
                f"most {most:,.0f} s: {'trim it to a few sentences' if max_seconds else 'cut it into shorter clips'}.")
    try:
        silent = kind == "audio" and silent_audio(path)
    except Exception:  # noqa: BLE001  (a stream FFmpeg cannot decode: the engine says what it makes of it)
        silent = False
    if silent:  # a transcript of nothing (the demo weights made one up), a voice cloned from nothing
        return (f"'{name}' is silent (nothing louder than {SILENCE_DBFS} dBFS in it): choose or record a clip in "
                "which someone speaks.")
    return None


def upload_size_problem(what: str, size: int, limits: dict) -> str | None:
    """What is wrong with sending `size` bytes (`what`: "'clip.wav'", "the sound track of 'talk.mp4'") as a multipart
    upload: over the engine's max_upload_bytes; None when it fits (or the engine does not say)."""
    most = limits.get("max_upload_bytes")
    if most and size > most:
        return f"{what} is too large to send ({_mib(size)}; the engine takes at most {_mib(most)})."
    return None


def media_problem(path: str | Path, kind: str, limits: dict | None = None, upload: bool = False,
                  max_seconds: float | None = None) -> str | None:
    """What keeps the engine from using the file at `path` as `kind` ('image' | 'audio' | 'video' | TO_TRANSCRIBE | VIDEO_SOUND: a
    video given for its sound), in words naming the file; None when nothing is found. `limits`: the engine's (ModelInfo.limits). `upload`: the file
    goes as a multipart upload (a transcription or a voice clip), held to the engine's max_upload_bytes.
    `max_seconds`: a clip's own limit (a voice to clone: VOICE_CLIP_SECONDS), instead of the engine's."""
    path, limits = Path(path), limits or {}
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        return f"'{name}' is no longer there: upload it again."
    if size == 0:
        return f"'{name}' is empty (0 bytes): choose another file."
    if upload and (problem := upload_size_problem(f"'{name}'", size, limits)):
        return problem
    if kind == "image":
        return _image_problem(path, name, limits)
    if kind in ("audio", "video", *TRANSCRIBED):
        return _av_problem(path, name, kind, limits, max_seconds)
    return None
