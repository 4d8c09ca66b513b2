"""Client media and content parts -> engine message parts, with the server's limits.

Shared by the HTTP API and the realtime protocol. Everything a client sends is checked here
(types, base64, data: URLs, sizes, audio length, image pixels) and refused with an ApiError that
names the problem; the engine then gets decoded arrays, never a URL (the server fetches nothing).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import IMAGE_FORMATS, image_formats_named
from engine.errors import shown, shown_number  # noqa: F401  (re-exported: the server's errors quote so)
from engine.media.audio import AudioFrontendConfig, check_clip_length, check_resample_rates, decode_audio
from engine.media.errors import AudioTooLong, DecodeStopped, MediaError
from engine.media.image import check_aspect, load_alpha, load_image
from engine.media.video import VideoSamplingConfig, probe_video_file
from engine.server.limits import ApiError, Limits, MiB, human_bytes

AUDIO_FILE_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "opus")
PCM_FORMATS = ("pcm16", "pcm", "audio/pcm")
#: Sample rates (Hz) accepted for input audio, raw PCM or files
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
#: Bytes per decoded pixel (the engine takes RGB uint8)
RGB_BYTES = 3
#: The rate the model's audio front end resamples every input clip to
MODEL_AUDIO_RATE = AudioFrontendConfig().sample_rate
_DATA_URL = re.compile(r"^data:([\w.+\-]+/[\w.+\-]+)?((?:;[\w\-]+=[\w.\-]+)*)(;base64)?,", re.IGNORECASE)


def bad(message: str, code: str = "invalid_value", param: str | None = None, status: int | None = None) -> ApiError:
    return ApiError(message, code=code, status=status, param=param)




# --------------------------------------------------------------------------- primitive checks


def need_str(value: Any, name: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}", "invalid_type", name)
    if not allow_empty and not value:
        raise bad(f"'{name}' must not be empty", "invalid_value", name)
    return value


def need_dict(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise bad(f"'{name}' must be an object, got {type(value).__name__}", "invalid_type", name)
    return value


def finite_number(value: Any) -> bool:
    """A JSON number that is not NaN or ±Infinity (which Python's json reads). An integer is always
    finite, however long: math.isfinite would raise OverflowError past float's range (1e309 written
    out), where a client's huge number is a bad value like any other."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def need_number(value: Any, name: str, lo: float | None = None, hi: float | None = None,
                integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(value).__name__}",
                  "invalid_type", name)
    if not finite_number(value):
        raise bad(f"'{name}' must be finite", "invalid_value", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else
                  f"at least {lo}" if lo is not None else f"at most {hi}")
        raise bad(f"'{name}' must be {bounds}, got {shown_number(value)}", "invalid_value", name)
    return value


def check_keys(obj: dict, name: str, taken: tuple[str, ...], ignored: tuple[str, ...] = ()) -> None:
    """A nested object (a message, a content part, an `audio` spec ...) naming a field it does not have:
    unknown_parameter naming `name.field` (a field is never silently ignored unless it is `ignored`:
    OpenAI's, with no effect here). A field whose value is null is left alone, as at the top level."""
    for key, value in obj.items():
        if key in taken or key in ignored or value is None:
            continue
        field = f"{name}.{str(key)[:60]}"
        raise bad(f"unknown field {field!r}; known: {', '.join(sorted(taken + ignored))}", "unknown_parameter",
                  field)


CACHE_MARK = ("prompt_cache_breakpoint",)  # OpenAI's prompt caching mark on a content part: no effect here
IMAGE_DETAILS = ("auto", "low", "high", "original")  # OpenAI's image `detail`: no effect (every image is seen whole)


def check_detail(value: Any, name: str) -> None:
    if value is not None and value not in IMAGE_DETAILS:
        raise bad(f"'{name}' must be one of {', '.join(IMAGE_DETAILS)}, got {shown(str(value))}", "invalid_value",
                  name)


def b64decode(data: Any, name: str, max_bytes: int) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional) with a size limit checked
    before decoding."""
    data = need_str(data, name)
    if not data:
        raise bad(f"'{name}' is empty", "invalid_value", name)
    if len(data) * 3 // 4 > max_bytes:
        raise bad(f"'{name}' is too large: about {human_bytes(len(data) * 3 // 4)} decoded, the limit is "
                  f"{human_bytes(max_bytes)}", "payload_too_large", name, status=413)
    text = data.strip()
    if text[:5].lower() == "data:":  # (base64's alphabet has no ':': said as what it is, not "Only base64 data")
        raise bad(f"'{name}' is a data: URL; this field takes the base64 of the bytes alone: leave out the "
                  f"'{text[:text.find(',') + 1 or 40][:80]}' prefix", "invalid_base64", name)
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"'{name}' is not valid base64 ({e})", "invalid_base64", name) from None


def data_url(url: Any, name: str, max_bytes: int) -> tuple[str | None, bytes]:
    """'data:<mime>;base64,<payload>' -> (mime, bytes). http(s) URLs are refused: the server
    never fetches anything a client names."""
    url = need_str(url, name)
    low = url[:16].lower()
    if low.startswith(("http://", "https://", "ftp://", "file:")):
        raise bad(f"'{name}': this server does not fetch URLs ({url[:60]!r}); send the media inline as a "
                  "base64 data: URL, e.g. 'data:image/png;base64,...'", "url_not_supported", name)
    m = _DATA_URL.match(url[:512])
    if not m:
        raise bad(f"'{name}' must be a data: URL ('data:<mime type>;base64,<data>')", "invalid_url", name)
    if not m.group(3):
        raise bad(f"'{name}': only base64 data: URLs are supported", "invalid_url", name)
    return (m.group(1) or None), b64decode(url[m.end():], name, max_bytes)


# --------------------------------------------------------------------------- what bytes are

# Leading bytes of common media files: (offset, magic, kind, what). A part of one kind (image, audio,
# video) given bytes of another is refused by these bytes, whatever its label or data: URL says.
_MAGIC = ((0, b"\x89PNG\r\n\x1a\n", "image", "a PNG image"), (0, b"\xff\xd8\xff", "image", "a JPEG image"),
          (0, b"GIF87a", "image", "a GIF image"), (0, b"GIF89a", "image", "a GIF image"),
          (0, b"II*\x00", "image", "a TIFF image"), (0, b"MM\x00*", "image", "a TIFF image"),
          (8, b"WEBP", "image", "a WebP image"), (8, b"WAVE", "audio", "a WAV audio file"),
          (0, b"fLaC", "audio", "a FLAC audio file"), (0, b"ID3", "audio", "an MP3 audio file"),
          (8, b"AVI ", "video", "an AVI video"))
# ffmpeg's demuxers of still images: bytes they read are a picture, not a video
_IMAGE_DEMUXERS = ("image2", "gif", "apng", "ico", "tiff", "webp")


def sniff(raw: bytes) -> tuple[str, str] | None:
    """(kind, what) of media bytes recognised by their leading bytes, else None."""
    for offset, magic, kind, what in _MAGIC:
        if raw[offset:offset + len(magic)] == magic and (offset != 8 or raw[:4] in (b"RIFF", b"RF64")):
            return kind, what
    return None


def refuse_other_kind(raw: bytes, kind: str, code: str, name: str) -> None:
    """Refuse bytes recognised as media of another kind than `kind` ("image", "audio", "video")."""
    found = sniff(raw)
    if found is not None and found[0] != kind:
        raise bad(f"'{name}' is {found[1]}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}: send it as "
                  f"{'an' if found[0][0] in 'aeiou' else 'a'} {found[0]} part", code, name)


def check_media_type(mime: str | None, kind: str, code: str, name: str) -> None:
    """A data: URL's media type naming another kind of media than the part takes is refused."""
    top = (mime or "").split("/")[0].lower()
    if top in ("image", "audio", "video", "text") and top != kind:
        raise bad(f"'{name}' has media type {mime}, expected {kind}/*", code, name)


# --------------------------------------------------------------------------- media


def pcm16_samples(raw: bytes, name: str = "audio") -> np.ndarray:
    if len(raw) % 2:
        raise bad(f"'{name}': PCM16 data must have an even number of bytes, got {len(raw)}", "invalid_audio", name)
    return np.frombuffer(raw, dtype="<i2")


def _g711_tables() -> dict[str, np.ndarray]:
    """Every G.711 byte's PCM16 value (ITU-T G.711; the values audioop's ulaw2lin / alaw2lin give)."""
    b = np.arange(256, dtype=np.int32)
    u = ~b & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84 << ((u >> 4) & 7)) - 0x84
    mulaw = np.where(u & 0x80, -mag, mag)
    a = b ^ 0x55
    exp, mant = (a >> 4) & 7, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    alaw = np.where(a & 0x80, mag, -mag)
    return {"pcmu": mulaw.astype("<i2"), "pcma": alaw.astype("<i2")}


G711 = _g711_tables()
G711_RATE = 8000  # OpenAI's audio/pcmu and audio/pcma (g711_ulaw / g711_alaw) are 8 kHz, a byte a sample


MULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])  # biased 14-bit magnitudes
ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])  # 13-bit magnitudes
MULAW_CLIP, MULAW_BIAS = 8159, 33


def g711_bytes(pcm: bytes, encoding: str) -> bytes:
    """PCM16 little-endian mono -> G.711 bytes ('pcmu' / 'pcma'), as ITU-T G.711 quantises (a sample's
    segment, then the top 4 bits of its magnitude within it; what audioop's lin2ulaw / lin2alaw give)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    if encoding == "pcmu":
        v = x >> 2
        mask = np.where(v < 0, 0x7F, 0xFF)
        mag = np.minimum(np.abs(v), MULAW_CLIP) + MULAW_BIAS
        seg = np.searchsorted(MULAW_SEGMENT_ENDS, mag)
        code = (seg << 4) | ((mag >> (seg + 1)) & 0xF)
    else:
        v = x >> 3
        mask = np.where(v >= 0, 0xD5, 0x55)
        mag = np.where(v >= 0, v, -v - 1)
        seg = np.searchsorted(ALAW_SEGMENT_ENDS, mag)
        code = (seg << 4) | ((mag >> np.where(seg < 2, 1, seg)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8).tobytes()


def input_samples(raw: bytes, encoding: str, name: str = "audio") -> np.ndarray:
    """An input_audio_buffer.append's bytes in the session's encoding ('pcm16', 'pcmu', 'pcma') as
    int16 PCM."""
    if encoding == "pcm16":
        return pcm16_samples(raw, name)
    return G711[encoding][np.frombuffer(raw, dtype=np.uint8)]


def check_sample_rate(rate: Any, name: str = "sample_rate") -> int:
    """An input audio rate a client declares: an integer in range that the model's audio front end
    can resample (16001 Hz cannot be: see engine.media.audio.check_resample_rates)."""
    rate = int(need_number(rate, name, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, integer=True))
    try:
        check_resample_rates(rate, MODEL_AUDIO_RATE)
    except MediaError as e:
        raise bad(f"'{name}': {e}; use a common rate such as 16000, 24000, 44100 or 48000", "invalid_value",
                  name) from None
    return rate


def check_output_rate(rate: Any, name: str, engine) -> int:
    """A rate a client asks the talker's audio in: an integer in range that the talker's own rate can be
    resampled to (a rate such as 2654 Hz cannot: refused here, not when the reply's first chunk comes)."""
    rate = int(need_number(rate, name, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, integer=True))
    talker_rate = getattr(getattr(engine, "talker", None), "sample_rate", None)
    if talker_rate is not None:
        try:
            check_resample_rates(talker_rate, rate)
        except MediaError as e:
            raise bad(f"'{name}': the talker speaks at {talker_rate} Hz and {e}; use a common rate such as "
                      "16000, 24000, 44100 or 48000", "invalid_value", name) from None
    return rate


def length_limit(limits: Limits, most_s: float | None = None) -> tuple[float, str]:
    """(seconds, the server's setting that says so) a clip is held to: `most_s`, a transcription's recording
    (max_transcription_seconds), else one clip (max_audio_seconds)."""
    return (most_s, "max_transcription_seconds") if most_s else (limits.max_audio_seconds, "max_audio_seconds")


def too_long(name: str, length: str, limits: Limits, most_s: float | None = None) -> ApiError:
    """audio_too_long, naming the limit and the server setting (and flag) that sets it."""
    most_s, setting = length_limit(limits, most_s)
    return bad(f"'{name}' is too long: {length}, the limit is {most_s:g} s (the server's {setting}, "
               f"--{setting.replace('_', '-')})", "audio_too_long", name)


def check_duration(n_samples: int, rate: int, limits: Limits, name: str = "audio",
                   most_s: float | None = None) -> float:
    """The clip's seconds, refused past `most_s` (a transcription's limit) or else the clip limit."""
    seconds = n_samples / rate
    if seconds > length_limit(limits, most_s)[0]:
        raise too_long(name, f"{seconds:.1f} s", limits, most_s)
    if n_samples == 0:
        raise bad(f"'{name}' has no samples", "invalid_audio", name)
    return seconds


def check_clip(n_samples: int, rate: int, limits: Limits, name: str = "audio", most_s: float | None = None) -> float:
    """A clip as the model's audio front end takes it (its seconds): a rate in range that it can
    resample, within the length limit, and long enough for one log-mel frame."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise bad(f"'{name}' has a sample rate of {rate} Hz; {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz is supported",
                  "invalid_audio", name)
    seconds = check_duration(n_samples, rate, limits, name, most_s)
    try:
        check_clip_length(n_samples, rate)
    except MediaError as e:
        raise bad(f"'{name}': {e}", "invalid_audio", name) from None
    return seconds


@dataclass
class Audio:
    samples: np.ndarray  # float32 mono or int16 PCM
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    def part(self) -> dict:
        return {"type": "audio", "audio": self.samples, "sample_rate": self.sample_rate}


def audio_file(raw: bytes, limits: Limits, name: str = "file", video_ok: bool = False,
               most_s: float | None = None, mix_channels: bool = False, stop: threading.Event | None = None) -> Audio:
    """Encoded audio (wav natively; flac, mp3, ogg, webm, m4a via PyAV) -> channel-0 samples (`mix_channels`: the
    channels' mean, as the talker reads a reference clip). A
    picture is refused; so is a video, unless `video_ok` (an upload endpoint such as transcriptions,
    which like OpenAI's takes an mp4 or webm recording and uses its audio track). `most_s`: its longest
    length, when not the clip limit (a transcription's recording). `stop`: set, the decode ends (DecodeStopped)."""
    if not raw:
        raise bad(f"'{name}' is empty", "invalid_audio", name)
    found = sniff(raw)
    if (found is not None and found[0] == "image") or not video_ok:
        refuse_other_kind(raw, "audio", "invalid_audio", name)
    if not video_ok and found is None and _video_streams(raw):
        raise bad(f"'{name}' is a video (it holds a video stream), not audio: send it as a video part",
                  "invalid_audio", name)
    try:  # (the message names the field as the others do; a file longer than the limit is not decoded whole)
        samples, rate = decode_audio(raw, f"'{name}'", length_limit(limits, most_s)[0], mix=mix_channels, stop=stop)
    except DecodeStopped:
        raise
    except AudioTooLong as e:
        length = f"over {e.most_s:g} s" if e.seconds is None else f"{e.seconds:.1f} s (its container says)"
        raise too_long(name, length + ", not decoded past the limit", limits, most_s) from None
    except MediaError as e:
        raise bad(str(e), "invalid_audio", name) from None
    except Exception as e:  # a decoder fault on hostile input is the input's problem
        raise bad(f"'{name}' could not be decoded as audio: {type(e).__name__}", "invalid_audio", name) from None
    check_clip(len(samples), rate, limits, name, most_s)
    if not np.all(np.isfinite(samples)):
        raise bad(f"'{name}' contains NaN or infinite samples", "invalid_audio", name)
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), int(rate))


G711_NAMES = {"pcmu": "pcmu", "g711_ulaw": "pcmu", "audio/pcmu": "pcmu",
              "pcma": "pcma", "g711_alaw": "pcma", "audio/pcma": "pcma"}


def audio_payload(raw: bytes, fmt: str | None, rate: int | None, limits: Limits, name: str) -> Audio:
    fmt = (fmt or "pcm16").lower()
    if fmt in G711_NAMES:
        if rate is not None and rate != G711_RATE:
            raise bad(f"'{name}': G.711 audio is {G711_RATE} Hz, not {rate}", "invalid_value",
                      name.rsplit(".", 1)[0] + ".sample_rate")
        samples = input_samples(raw, G711_NAMES[fmt], name)
        check_clip(len(samples), G711_RATE, limits, name)
        return Audio(samples, G711_RATE)
    if fmt in PCM_FORMATS:
        if rate is None:
            raise bad(f"'{name}': raw PCM16 audio needs its sample_rate", "invalid_audio", name)
        samples = pcm16_samples(raw, name)
        check_clip(len(samples), rate, limits, name)
        return Audio(samples.copy(), rate)
    if fmt in AUDIO_FILE_FORMATS:
        return audio_file(raw, limits, name)
    raise bad(f"'{name}': unknown audio format {shown(fmt)}; use one of {', '.join(PCM_FORMATS[:1] + AUDIO_FILE_FORMATS)}",
              "invalid_audio_format", name)


# A recording's channel 0 quieter than this at its loudest is taken for an unused channel (a recorder's right-only
# input, a call recorded on one side): the recording's channels are then mixed (the app's SILENCE_DBFS too).
SILENT_CHANNEL_DBFS = -60.0


def recording_file(raw: bytes, limits: Limits, name: str = "file", stop: threading.Event | None = None) -> Audio:
    """A recording to transcribe (an upload: a video's sound track too): channel 0, as the reference reads a file (spec
    §5.1), or, when channel 0 is silent and the channels' mean is not, that mean (a stereo recording with the voice on
    the right channel alone was transcribed from silence). Only such a file is decoded twice."""
    first = audio_file(raw, limits, name, True, limits.max_transcription_seconds, stop=stop)
    quiet = 10 ** (SILENT_CHANNEL_DBFS / 20)
    if np.abs(first.samples).max(initial=0.0) > quiet:
        return first
    mixed = audio_file(raw, limits, name, True, limits.max_transcription_seconds, mix_channels=True, stop=stop)
    return mixed if np.abs(mixed.samples).max(initial=0.0) > quiet else first


@dataclass
class MediaBudget:
    """Decoded media one HTTP request or one realtime item may hold (Limits.max_session_media_bytes): a
    picture is charged from its header before it is decoded, so a small request of highly compressed
    pictures cannot decode into gigabytes."""

    limit: int
    used: int = 0

    def charge(self, nbytes: int, name: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise bad(f"'{name}': the decoded media would take {self.used / MiB:.0f} MiB, more than the limit of "
                      f"{self.limit / MiB:.0f} MiB for one request: send fewer or smaller pictures or clips",
                      "media_too_large", name)


def image_array(raw: bytes, limits: Limits, name: str = "image", budget: MediaBudget | None = None,
                as_shown: bool = False, alpha: bool = False) -> np.ndarray:
    """Encoded JPEG/PNG/WebP/... -> HxWx3 uint8, refusing more than max_image_pixels (and more than
    `budget` holds) before decoding. `as_shown`: upright and over white (engine.media.image.shown_upright).
    `alpha`: an edit mask's HxW alpha instead (engine.media.image.load_alpha; refused without transparency)."""
    from PIL import Image  # noqa: PLC0415

    if not raw:
        raise bad(f"'{name}' is empty", "invalid_image", name)
    refuse_other_kind(raw, "image", "invalid_image", name)
    if sniff(raw) is None and _video_streams(raw):
        raise bad(f"'{name}' is a video (a container with a video stream), not an image: send it as a video part",
                  "invalid_image", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw), formats=tuple(IMAGE_FORMATS)) as probe:
                w, h = probe.size
    except Image.DecompressionBombError:
        raise bad(f"'{name}' declares far more pixels than the limit of {limits.max_image_pixels}",
                  "image_too_large", name) from None
    except Exception:
        raise bad(f"'{name}' is not a picture in a format the engine reads ({image_formats_named()}), or it is "
                  "corrupt or truncated", "invalid_image", name) from None
    if w * h > limits.max_image_pixels:
        raise bad(f"'{name}' is too large: {w}x{h} = {w * h} pixels, the limit is {limits.max_image_pixels}",
                  "image_too_large", name)
    check_shape(w, h, "invalid_image", name)
    if budget is not None:
        budget.charge(w * h * RGB_BYTES, name)
    try:
        if alpha:
            return load_alpha(raw, max_input_pixels=limits.max_image_pixels)
        return np.asarray(load_image(raw, max_input_pixels=limits.max_image_pixels, as_shown=as_shown))
    except MediaError as e:
        raise bad(f"'{name}': {e}", "invalid_image", name) from None
    except Exception as e:
        raise bad(f"'{name}' could not be decoded: {type(e).__name__}", "invalid_image", name) from None


def check_shape(width: int, height: int, code: str, name: str) -> None:
    """A picture or video frame of a shape the model can take (not zero-sized, not more elongated than
    engine.media.image.MAX_ASPECT_RATIO)."""
    try:
        check_aspect(width, height)
    except MediaError as e:
        raise bad(f"'{name}': {e}", code, name) from None


def _video_streams(raw: bytes) -> list | None:
    """The moving-picture streams of a media container (cover pictures and still images left out), or
    None when PyAV cannot open the bytes (or is not installed)."""
    try:
        import av  # noqa: PLC0415

        with av.open(io.BytesIO(raw), mode="r") as container:
            if container.format.name.endswith("_pipe") or container.format.name in _IMAGE_DEMUXERS:
                return []
            return [s for s in container.streams.video
                    if not s.disposition & (av.stream.Disposition.attached_pic | av.stream.Disposition.still_image)]
    except Exception:  # not a container PyAV can open
        return None


def check_video(raw: bytes, limits: Limits, name: str = "video") -> None:
    """Probe a video container (no decoding): it must hold a video stream (not a still picture, not
    only a cover image) within the pixel limit."""
    if not raw:
        raise bad(f"'{name}' is empty", "invalid_video", name)
    refuse_other_kind(raw, "video", "invalid_video", name)
    try:
        import av  # noqa: PLC0415

        with av.open(io.BytesIO(raw), mode="r") as container:
            fmt = container.format.name
            if fmt.endswith("_pipe") or fmt in _IMAGE_DEMUXERS:
                raise bad(f"'{name}' is a still image ({fmt.removesuffix('_pipe')}), not a video: send it as an "
                          "image part", "invalid_video", name)
            streams = [s for s in container.streams.video
                       if not s.disposition & (av.stream.Disposition.attached_pic | av.stream.Disposition.still_image)]
            if not streams:
                raise bad(f"'{name}' contains no video stream" + (" (only a cover picture)" if container.streams.video
                                                                   else ""), "invalid_video", name)
            stream = streams[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            seconds = float(container.duration / 1_000_000) if container.duration else None
    except ApiError:
        raise
    except ImportError:
        return  # the engine decodes with OpenCV then; it checks what it can
    except Exception as e:
        raise bad(f"'{name}' could not be opened as a video: {type(e).__name__}", "invalid_video", name) from None
    if w * h > limits.max_image_pixels:
        raise bad(f"'{name}' frames are too large: {w}x{h} = {w * h} pixels, the limit is "
                  f"{limits.max_image_pixels}", "image_too_large", name)
    if w > 0 and h > 0:  # (a container may leave the size to the decoder)
        check_shape(w, h, "invalid_video", name)
    if seconds is not None and seconds > 3600:
        raise bad(f"'{name}' is too long ({seconds:.0f} s)", "video_too_long", name)


class VideoBytes(bytes):
    """A video file's bytes as a conversation holds them, with `decoded_nbytes`, the memory the front end
    decodes them into at every response (`decoded_video_bytes`, measured once from the container)."""

    decoded_nbytes: int = 0


def decoded_video_bytes(raw: bytes, name: str = "video") -> int:
    """Memory the engine's front end decodes a video into, from its container (demuxed, not decoded):
    the sampled frames at the model's size (engine.media.video.probe_video_file; the per-video pixel
    budget when the header leaves the size to the decoder) plus the one frame it decodes at a time."""
    try:
        plan = probe_video_file(raw)
        shape = plan.decoded_shape()
    except MediaError as e:
        raise bad(f"'{name}': {e}", "invalid_video", name) from None
    if shape is None:
        n = plan.n + plan.n % 2
        return int(n * VideoSamplingConfig().frame_budget(plan.n)[1] * RGB_BYTES)
    n, h, w = shape
    src_h, src_w = plan.source_size
    return (n * h * w + src_h * src_w) * RGB_BYTES


# --------------------------------------------------------------------------- content parts


def _image_source(part: dict, kind: str, name: str, limits: Limits) -> bytes:
    """image_url {url} / image_url "data:..." / image "base64" / image "data:..."."""
    check_keys(part, name, ("type", "image_url", "image", "detail"), CACHE_MARK)
    check_detail(part.get("detail"), f"{name}.detail")
    if "image_url" in part:
        url = part["image_url"]
        where = f"{name}.image_url"
        if isinstance(url, dict):
            check_keys(url, where, ("url", "detail"))
            check_detail(url.get("detail"), f"{where}.detail")
            url, where = url.get("url"), f"{where}.url"
            if url is None:
                raise bad(f"'{where}' is required (a data: URL)", "missing_field", where)
        mime, raw = data_url(url, where, limits.max_request_bytes)
        check_media_type(mime, "image", "invalid_image", name)
        return raw
    if "image" in part:
        value = part["image"]
        if isinstance(value, str) and value.startswith("data:"):
            mime, raw = data_url(value, f"{name}.image", limits.max_request_bytes)
            check_media_type(mime, "image", "invalid_image", name)
            return raw
        return b64decode(value, f"{name}.image", limits.max_request_bytes)
    raise bad(f"'{name}' ({kind}) needs 'image_url' (a data: URL) or 'image' (base64)", "missing_field", name)


def _video_source(part: dict, name: str, limits: Limits) -> bytes:
    check_keys(part, name, ("type", "video_url", "video"))
    if "video_url" in part:
        url = part["video_url"]
        where = f"{name}.video_url"
        if isinstance(url, dict):
            check_keys(url, where, ("url",))
            url, where = url.get("url"), f"{where}.url"
            if url is None:
                raise bad(f"'{where}' is required (a data: URL)", "missing_field", where)
        mime, raw = data_url(url, where, limits.max_request_bytes)
        check_media_type(mime, "video", "invalid_video", name)
        return raw
    if "video" in part:
        value = part["video"]
        if isinstance(value, str) and value.startswith("data:"):
            mime, raw = data_url(value, f"{name}.video", limits.max_request_bytes)
            check_media_type(mime, "video", "invalid_video", name)
            return raw
        return b64decode(value, f"{name}.video", limits.max_request_bytes)
    raise bad(f"'{name}' needs 'video_url' (a data: URL) or 'video' (base64)", "missing_field", name)


def _audio_source(part: dict, name: str, limits: Limits, default_rate: int | None,
                  default_format: str | None = None) -> Audio:
    """Chat completions: input_audio {data, format[, sample_rate]}. Realtime: audio (base64 PCM16 at
    the session's rate, or `format` for an encoded file)."""
    check_keys(part, name, ("type", "input_audio", "audio", "format", "sample_rate"), ("transcript",) + CACHE_MARK)
    if "input_audio" in part:
        spec = need_dict(part["input_audio"], f"{name}.input_audio")
        check_keys(spec, f"{name}.input_audio", ("data", "format", "sample_rate"))
        fmt = spec.get("format")
        if fmt is None:
            raise bad(f"'{name}.input_audio.format' is required ({', '.join(AUDIO_FILE_FORMATS)} or pcm16)",
                      "missing_field", f"{name}.input_audio.format")
        need_str(fmt, f"{name}.input_audio.format")
        rate = spec.get("sample_rate")
        rate = check_sample_rate(rate, f"{name}.input_audio.sample_rate") if rate is not None else None
        raw = b64decode(spec.get("data"), f"{name}.input_audio.data", limits.max_request_bytes)
        return audio_payload(raw, fmt, rate, limits, f"{name}.input_audio.data")
    if "audio" in part:
        fmt = part.get("format")
        if fmt is not None:
            need_str(fmt, f"{name}.format")
        else:
            fmt = default_format
        rate = part.get("sample_rate")
        rate = check_sample_rate(rate, f"{name}.sample_rate") if rate is not None else default_rate
        raw = b64decode(part["audio"], f"{name}.audio", limits.max_message_bytes)
        return audio_payload(raw, fmt, rate, limits, f"{name}.audio")
    raise bad(f"'{name}' needs 'input_audio' {{data, format}} or 'audio' (base64)", "missing_field", name)


@dataclass
class Converted:
    """Engine parts plus a small public description of each (what the realtime API echoes)."""

    parts: list[dict]
    public: list[dict]


MAX_CONTENT_PARTS = 64  # the most parts one message's content holds (too_many_parts)


def convert_content(content: Any, limits: Limits, name: str = "content", default_rate: int | None = None,
                    role: str = "user", budget: MediaBudget | None = None,
                    default_format: str | None = None, refusal: str | None = None) -> Converted:
    """Content parts -> engine parts; their decoded media within `budget` (by default
    Limits.max_session_media_bytes for this content alone). `refusal`: a replayed assistant answer's refusal given
    beside its content, read after the content's parts (and not one of the MAX_CONTENT_PARTS: a content of 64 parts
    with a refusal was refused as "65 parts")."""
    budget = budget or MediaBudget(limits.max_session_media_bytes)
    if isinstance(content, str) and refusal is not None:
        content = [{"type": "text", "text": content}]
    if isinstance(content, str):
        return Converted([{"type": "text", "text": content}], [{"type": "input_text", "text": content}])
    if not isinstance(content, list):
        raise bad(f"'{name}' must be a string or a list of content parts, got {type(content).__name__}",
                  "invalid_type", name)
    if len(content) > MAX_CONTENT_PARTS:
        raise bad(f"'{name}' has {len(content)} content parts; a message holds at most {MAX_CONTENT_PARTS}",
                  "too_many_parts", name)
    parts, public = [], []
    for i, part in enumerate(content):
        pname = f"{name}[{i}]"
        part = need_dict(part, pname)
        kind = part.get("type")
        need_str(kind, f"{pname}.type")
        if kind in ("text", "input_text", "output_text"):
            check_keys(part, pname, ("type", "text"), ("annotations",) + CACHE_MARK)
            text = need_str(part.get("text"), f"{pname}.text")
            parts.append({"type": "text", "text": text})
            public.append({"type": "output_text" if role == "assistant" else "input_text", "text": text})
            continue
        if kind == "refusal" and role == "assistant":  # OpenAI's assistant part for a reply that refused:
            check_keys(part, pname, ("type", "refusal"))  # a replayed turn, its words as the model said them
            text = need_str(part.get("refusal"), f"{pname}.refusal")
            parts.append({"type": "text", "text": text})
            public.append({"type": "output_text", "text": text})
            continue
        if role == "assistant":
            raise bad(f"'{pname}': assistant messages may hold text (or a refusal) only, got {kind!r}",
                      "invalid_value", pname)
        if kind in ("image_url", "input_image", "image"):
            arr = image_array(_image_source(part, kind, pname, limits), limits, pname, budget)
            parts.append({"type": "image", "image": arr})
            public.append({"type": "input_image", "width": int(arr.shape[1]), "height": int(arr.shape[0])})
        elif kind in ("input_audio", "audio"):
            audio = _audio_source(part, pname, limits, default_rate, default_format)
            budget.charge(audio.samples.nbytes, pname)
            parts.append(audio.part())
            public.append({"type": "input_audio", "seconds": round(audio.seconds, 3),
                           "sample_rate": audio.sample_rate, "transcript": None})
        elif kind in ("video_url", "input_video", "video"):
            raw = _video_source(part, pname, limits)
            check_video(raw, limits, pname)
            raw = VideoBytes(raw)
            raw.decoded_nbytes = decoded_video_bytes(raw, pname)
            budget.charge(raw.decoded_nbytes, pname)
            parts.append({"type": "video", "video": raw})
            public.append({"type": "input_video", "bytes": len(raw)})
        else:
            raise bad(f"'{pname}.type' {shown(kind)} is not supported; use text, image_url, input_audio or video_url "
                      "(realtime: input_text, input_image, input_audio, input_video)", "unsupported_content_type",
                      f"{pname}.type")
    if refusal is not None:
        parts.append({"type": "text", "text": refusal})
        public.append({"type": "output_text", "text": refusal})
    return Converted(joined_texts(parts), public)


TEXT_PART_SEPARATOR = "\n"  # between a message's text parts, as between messages of one role (vLLM's rule too)


def joined_texts(parts: list[dict]) -> list[dict]:
    """Engine parts with each run of text parts made one, their texts joined by TEXT_PART_SEPARATOR: an OpenAI client
    sending ["Be brief.", "Answer in French."] means two sentences, which the reference template would run together
    ("Be brief.Answer in French."); text next to a picture, a clip or a sound is left as the template places it."""
    out: list[dict] = []
    for part in parts:
        if part["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + TEXT_PART_SEPARATOR + part["text"]}
        else:
            out.append(part)
    return out


def text_only(content: Any, name: str) -> str:
    """A system message: a string or text parts joined by TEXT_PART_SEPARATOR (see joined_texts)."""
    if isinstance(content, str):
        return content
    conv_parts = []
    if not isinstance(content, list):
        raise bad(f"'{name}' must be a string or a list of text parts", "invalid_type", name)
    for i, part in enumerate(content):
        part = need_dict(part, f"{name}[{i}]")
        if part.get("type") not in ("text", "input_text"):
            raise bad(f"'{name}[{i}]': system messages may hold text only", "invalid_value", name)
        check_keys(part, f"{name}[{i}]", ("type", "text"), ("annotations",) + CACHE_MARK)
        conv_parts.append(need_str(part.get("text"), f"{name}[{i}].text"))
    return TEXT_PART_SEPARATOR.join(conv_parts)
