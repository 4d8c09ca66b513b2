"""Audio front end: load speech, resample it to 16 kHz mono and compute Whisper log-mel features.

Follows spec §5.1 / §5.4:

- integer PCM is divided by 2**(bits-1); only **channel 0** is kept (no down-mix; `load_audio(...,
  mix_channels=True)` averages the channels instead, for the talker's reference clips);
- other sample rates are converted with the algorithm of torchaudio's default
  ``torchaudio.transforms.Resample`` (Hann-windowed sinc, ``lowpass_filter_width=6``,
  ``rolloff=0.99``), re-implemented here in torch;
- log-mel: STFT (n_fft 400, hop 160, periodic Hann, centre reflect padding), |X|^2 with the last
  frame dropped, 128 Slaney mel filters (librosa's formula, computed here), ``log10(max(x, 1e-10))``,
  ``max(x, max - 8)`` over the clip, ``(x + 4) / 4``; laid out [T, n_mels], no 30 s padding;
- LLM tokens per clip: T2 = (T-1)//2 + 1 (whisper conv2), then T3 = the projector conv's output length
  (its kernel and stride are the checkpoint's ``audio_config.ds_kernel_size`` / ``ds_stride``: 3 and 2 in
  both releases, T3 = (T2-1)//2 + 1).

WAV files are parsed natively (PCM 8/16/24/32-bit, IEEE float, WAVE_FORMAT_EXTENSIBLE); other
containers (flac, mp3, ogg, webm, m4a, ...) are decoded with PyAV when it is installed.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .errors import AudioTooLong, DecodeStopped, MediaError, decode_failure, not_a_file

#: Largest polyphase resampling kernel built (elements); only odd rate pairs such as
#: 16001 -> 16000 Hz come near it.
MAX_RESAMPLE_KERNEL_ELEMENTS = 16_000_000

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TimeConv:
    """The lengths of a 1-D conv along time with padding k//2: whisper's conv2 (k 3, stride 2, spec §5.2) and the
    audio projector's (``audio_config.ds_kernel_size`` / ``ds_stride``, spec §5.3), whose output length is the
    number of ``<audioPatch>`` tokens a clip takes (spec §5.4)."""

    kernel_size: int = 3
    stride: int = 2

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TimeConv.{name} must be a positive int, got {value!r}")

    def output_length(self, n_frames: int) -> int:
        """Frames after the conv: (T + 2*(k//2) - k)//stride + 1."""
        return (n_frames + 2 * (self.kernel_size // 2) - self.kernel_size) // self.stride + 1


@dataclass(frozen=True)
class AudioFrontendConfig:
    """Whisper front-end settings. ``n_ctx`` is the encoder's positional table length (15000 rows
    after the stride-2 conv), which bounds a clip to 2*n_ctx mel frames = 300 s at 16 kHz. ``projector``
    is the checkpoint's projector conv, which fixes each clip's token count."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    n_ctx: int = 15000
    max_seconds: float | None = None  # None: the encoder limit 2*n_ctx*hop/sample_rate
    projector: TimeConv = TimeConv()

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AudioFrontendConfig.{name} must be a positive int, got {value!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")

    @property
    def encoder_max_frames(self) -> int:
        """Most mel frames the whisper encoder can position-encode: T2 <= n_ctx <=> T <= 2*n_ctx."""
        return 2 * self.n_ctx

    @property
    def max_frames(self) -> int:
        """Most mel frames accepted: the encoder limit, or less if ``max_seconds`` asks for it."""
        limit = self.encoder_max_frames
        if self.max_seconds is not None:
            limit = min(limit, int(self.max_seconds * self.sample_rate) // self.hop_length)
        return limit

    @property
    def min_samples(self) -> int:
        """Fewest samples (at ``sample_rate``) that make a log-mel frame: one hop, and more than the
        STFT's centre reflect padding of n_fft // 2."""
        return max(self.hop_length, self.n_fft // 2 + 1)

    @property
    def max_duration_s(self) -> float:
        return self.max_frames * self.hop_length / self.sample_rate

    @classmethod
    def from_dict(cls, data: dict, n_ctx: int | None = None,
                  projector: TimeConv | None = None) -> "AudioFrontendConfig":
        """From a parsed ``preprocessor_config.json``: only ``whisper_frontend_args.n_mels`` is read
        (the reference's WhisperFrontend takes it); ``n_ctx`` comes from the model config's
        ``audio_config.whisper_encoder_config`` and ``projector`` from its ``ds_kernel_size`` / ``ds_stride``
        when known. The file's ``sampling_rate`` (like its fbank keys) is not the Whisper path's: the reference
        audio processor resamples every clip to a fixed 16 kHz and whisper's STFT / mel filters are built for
        that rate (spec §5.1)."""
        whisper = data.get("whisper_frontend_args") or {}
        defaults = cls()
        return cls(
            n_mels=int(whisper.get("n_mels", defaults.n_mels)),
            n_ctx=int(n_ctx if n_ctx is not None else defaults.n_ctx),
            projector=projector or defaults.projector,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, n_ctx: int | None = None,
                       projector: TimeConv | None = None) -> "AudioFrontendConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), n_ctx=n_ctx, projector=projector)


@dataclass
class AudioFeatures:
    """Log-mel features of one clip: ``feats`` [T, n_mels] float32, and the projector conv of the model they are
    for (which fixes their token count)."""

    feats: torch.Tensor
    projector: TimeConv = TimeConv()

    @property
    def n_frames(self) -> int:
        return int(self.feats.shape[0])

    @property
    def n_tokens(self) -> int:
        """``<audioPatch>`` tokens this clip takes in the prompt."""
        return audio_token_count(self.n_frames, self.projector)


WHISPER_CONV2 = TimeConv(kernel_size=3, stride=2)  # spec §5.2


def whisper_encoder_frames(n_frames: int) -> int:
    """Frames after whisper's stride-2 conv2 (k 3, pad 1): T2 = (T-1)//2 + 1."""
    return WHISPER_CONV2.output_length(n_frames)


def audio_token_count(n_frames: int, projector: TimeConv = TimeConv()) -> int:
    """LLM audio tokens for T mel frames: T3 = the projector conv's output length of T2 = (T-1)//2 + 1
    ((T2-1)//2 + 1 with the shipped kernel 3 / stride 2)."""
    if n_frames <= 0:
        raise MediaError(f"audio has no mel frames (T={n_frames})")
    return projector.output_length(whisper_encoder_frames(n_frames))


# --------------------------------------------------------------------------- decoding


def _pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1) by dividing by 2**(bits-1); floats pass through."""
    if samples.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return ((samples.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(samples.dtype, np.signedinteger):
        bits = samples.dtype.itemsize * 8
        return (samples.astype(np.float64) / float(2 ** (bits - 1))).astype(np.float32)
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32)
    raise MediaError(f"unsupported audio sample type {samples.dtype}")


class _WavEncodingError(MediaError):
    """A well-formed WAV file whose encoding the native parser does not read (mu-law, A-law, ADPCM, an
    odd bit depth): FFmpeg may still decode it."""


# The most channels a WAV header may say: FFmpeg's own limit (its FF_SANE_NB_CHANNELS). A header saying more is
# corrupt, not a recording (65535 channels left less than one sample of each: "has no samples").
MAX_WAV_CHANNELS = 512
# The sample sizes WAV stores IEEE floats in: a float tag on 16-bit samples is integer data mislabelled (FFmpeg has no
# decoder for it either: it said "is in an audio codec this FFmpeg build cannot decode").
WAV_FLOAT_BITS = (32, 64)
MAX_WAV_PCM_BITS = 64  # the widest integer samples WAV stores (FFmpeg's pcm_s64le)


# Float audio lies within about ±1 (full scale), a mix's overs a few times that; integer samples read as IEEE floats
# land far outside (a 32-bit sample of a third of full scale reads as ~1e-15 or ~-1e15, a quiet negative one as NaN)
# or, all of them, among the subnormals. A float WAV whose peak passes this is integer data labelled float.
FLOAT_WAV_MAX_PEAK = 1000.0


def _float_samples_problem(what: str, bits: int, samples: np.ndarray) -> str | None:
    """What says a float WAV's samples are not float audio (integer samples under a float tag), in words; None when
    they look like audio."""
    magnitudes = np.abs(samples)
    if not np.all(np.isfinite(magnitudes)):
        looks = "some of them NaN or infinite"
    elif magnitudes.size and magnitudes.max() > FLOAT_WAV_MAX_PEAK:
        looks = f"peaking at {float(magnitudes.max()):.3g}"
    elif np.any(magnitudes) and magnitudes.max() < np.finfo(samples.dtype).tiny:
        looks = f"all below {np.finfo(samples.dtype).tiny:.3g} (subnormal)"
    else:
        return None
    return (f"{what} is a corrupt WAV file: its header says {bits}-bit floating-point samples, and read as floats "
            f"they are {looks}, where float audio lies within about ±1 (integer samples labelled float?)")


def _wav_header_problem(what: str, tag: int, channels: int, bits: int) -> str | None:
    """What is wrong with a WAV header a recorder would not write, in words; None when nothing is."""
    if channels > MAX_WAV_CHANNELS:
        return (f"{what} is a corrupt WAV file: its header says {channels} channels (a WAV file has at most "
                f"{MAX_WAV_CHANNELS})")
    if tag == 1 and not 0 < bits <= MAX_WAV_PCM_BITS:
        return (f"{what} is a corrupt WAV file: its header says {bits}-bit integer samples (WAV's are 1 to "
                f"{MAX_WAV_PCM_BITS} bits)")
    if tag == 3 and bits not in WAV_FLOAT_BITS:
        return (f"{what} is a corrupt WAV file: its header says {bits}-bit floating-point samples, and WAV's are 32 or "
                f"64 bits (integer samples labelled float?)")
    return None


def _parse_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE file; returns (samples [n, channels] float32, sample_rate)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise MediaError(f"{what} is not a valid WAV file (no RIFF/WAVE header)")
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            payload = body  # may be truncated by a cut-off recording: keep what is there
            if size == 0xFFFFFFFF or pos + 8 + size > len(data):
                payload = data[pos + 8:]
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise MediaError(f"{what} is a corrupt WAV file (missing fmt chunk)")
    if payload is None:
        raise MediaError(f"{what} is a corrupt WAV file (missing data chunk)")
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the tag
        (tag,) = struct.unpack("<H", fmt[24:26])
    if channels == 0 or rate == 0:
        raise MediaError(f"{what} has an invalid WAV header ({channels} channels, {rate} Hz)")
    if problem := _wav_header_problem(what, tag, channels, bits):
        raise MediaError(problem)
    if tag == 1:  # integer PCM
        if bits == 8:
            samples = np.frombuffer(payload, dtype=np.uint8, count=len(payload) // channels * channels)
        elif bits == 16:
            samples = np.frombuffer(payload, dtype="<i2", count=len(payload) // 2 // channels * channels)
        elif bits == 24:
            n = len(payload) // 3 // channels * channels
            raw = np.frombuffer(payload, dtype=np.uint8, count=n * 3).reshape(n, 3).astype(np.int32)
            samples = (raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)) << 8 >> 8  # sign-extend
            return (samples.astype(np.float64) / float(2 ** 23)).astype(np.float32).reshape(-1, channels), rate
        elif bits in (32, 64):  # (64: FFmpeg decodes it as s64, which PyAV cannot hand over)
            dtype = np.dtype(f"<i{bits // 8}")
            samples = np.frombuffer(payload, dtype=dtype, count=len(payload) // dtype.itemsize // channels * channels)
        else:
            raise _WavEncodingError(f"{what}: unsupported WAV PCM bit depth {bits}")
    elif tag == 3:  # IEEE float (32 or 64 bits: _wav_header_problem)
        dtype = np.dtype("<f4" if bits == 32 else "<f8")
        samples = np.frombuffer(payload, dtype=dtype, count=len(payload) // dtype.itemsize // channels * channels)
        if problem := _float_samples_problem(what, bits, samples):
            raise MediaError(problem)
    else:
        raise _WavEncodingError(f"{what}: unsupported WAV encoding (format tag {tag:#x})")
    return _pcm_to_float(samples.astype(samples.dtype.newbyteorder("="))).reshape(-1, channels), rate


# A container's stated duration is refused before decoding only this far past the limit: an estimate for some files
# (an MP3 without a VBR header: from its first frames' bitrate), and an Ogg Opus file's states its encoder padding too
# (exactly 30 minutes of Opus says 1800.0065 s). The decode itself stops exactly at the limit.
STATED_LENGTH_SLACK = 1.05


def _decode_with_av(data: bytes, what: str, max_seconds: float | None = None, mix: bool = False,
                    stop: threading.Event | None = None) -> tuple[np.ndarray, int]:
    """Decode any container/codec FFmpeg knows; returns channel 0 (`mix`: the channels' mean) as float32 and the
    rate. `max_seconds`: a file whose container says it is longer is refused before decoding (AudioTooLong), and the
    decode stops once past it (a compressed file 25 MB large can hold hours: gigabytes of samples). `stop`: checked
    before each frame; once set the decode ends (DecodeStopped), its samples freed."""
    try:
        import av  # noqa: PLC0415  (optional dependency)
    except ImportError as exc:
        raise MediaError(f"{what} is not a WAV file and PyAV (package 'av') is not installed to decode it") from exc
    chunks: list[np.ndarray] = []
    rate, decoded = 0, 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaError(f"{what} contains no audio stream")
            stream = container.streams.audio[0]
            stated = stated_seconds(container, stream)
            if max_seconds is not None and stated is not None and stated > max_seconds * STATED_LENGTH_SLACK:
                raise AudioTooLong(what, max_seconds, stated)
            for frame in container.decode(stream):
                if stop is not None and stop.is_set():
                    raise DecodeStopped(what)
                rate = frame.sample_rate
                chunks.append(_frame_samples(frame, mix))
                decoded += len(chunks[-1])
                if max_seconds is not None and decoded > max_seconds * rate:
                    raise AudioTooLong(what, max_seconds)
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises many FFmpeg error types
        raise _id3_tag_only(data, what) or decode_failure(exc, what, "audio") from exc
    if not chunks or rate <= 0:
        raise _id3_tag_only(data, what) or MediaError(f"{what} decoded to no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate  # (a 30-minute file: 0.3 GB; no third copy)


ID3_HEADER_BYTES = 10  # "ID3", version (2 bytes), flags, the tag's size (4 bytes of 7 bits); a footer repeats it
ID3_FOOTER_FLAG = 0x10


def _id3_tag_only(data: bytes, what: str) -> MediaError | None:
    """An MP3 file that is an ID3v2 tag (title, artist, cover art) with no audio after it, a cut-off download or a tag
    saved alone, said as such (FFmpeg found "invalid data", which was said as an unknown format); None otherwise."""
    if len(data) < ID3_HEADER_BYTES or data[:3] != b"ID3":
        return None
    size = 0
    for byte in data[6:ID3_HEADER_BYTES]:
        size = size << 7 | (byte & 0x7F)
    end = ID3_HEADER_BYTES + size + (ID3_HEADER_BYTES if data[5] & ID3_FOOTER_FLAG else 0)
    if data[end:].strip(b"\0"):
        return None
    return MediaError(f"{what} is an MP3 file's ID3 tag ({min(end, len(data)):,} bytes: title, artist ...) with no "
                      "audio after it (a cut-off download, or a tag saved alone)")


def stated_seconds(container, stream) -> float | None:
    """The audio's duration as its container states it (the stream's, else the container's), None when it states
    none (a raw or streamed file)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration is not None else None  # (av.time_base: microseconds)


def _frame_samples(frame, mix: bool = False) -> np.ndarray:
    """A decoded frame's channel 0 (`mix`: the channels' mean) as float32."""
    array = frame.to_ndarray()
    if not mix:
        if frame.format.is_planar:
            return _pcm_to_float(np.asarray(array[0]))
        return _pcm_to_float(np.asarray(array.reshape(-1)[::len(frame.layout.channels)]))  # packed: interleaved
    # planar: one row per channel; packed: samples interleaved in one row
    channels = array if frame.format.is_planar else array.reshape(-1, len(frame.layout.channels)).T
    return _pcm_to_float(np.asarray(channels)).mean(axis=0)


def decode_audio(data: bytes, what: str = "audio data", max_seconds: float | None = None, mix: bool = False,
                 stop: threading.Event | None = None) -> tuple[np.ndarray, int]:
    """Decode an encoded file in memory to (channel-0 samples float32, sample rate); `max_seconds`: longer audio is
    refused (AudioTooLong) before it is decoded whole; `mix`: the channels' mean instead of channel 0; `stop`: a
    compressed file's decode ends when it is set (DecodeStopped; a WAV file is read at once)."""
    if not data:
        raise MediaError(f"{what} is empty (0 bytes)")
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        try:
            samples, rate = _parse_wav(data, what)
        except _WavEncodingError as exc:
            # a WAV encoding read here natively only for PCM / IEEE float: the reference loads files
            # with torchaudio (FFmpeg), which decodes mu-law, A-law, ADPCM ... as well
            try:
                import av  # noqa: F401, PLC0415  (optional dependency)
            except ImportError:
                raise MediaError(f"{exc}; PyAV (package 'av') is not installed to decode it") from exc
            return _decode_with_av(data, what, max_seconds, mix, stop)
        return np.ascontiguousarray(samples.mean(axis=1) if mix else samples[:, 0]), rate
    return _decode_with_av(data, what, max_seconds, mix, stop)


def _array_channel0(array: np.ndarray, mix: bool = False) -> np.ndarray:
    """Channel 0 (`mix`: the channels' mean) of a (n,), (n, channels) or (channels, n) array (the shorter axis is
    channels)."""
    if array.ndim == 1:
        return array
    if array.ndim == 2:
        channels = array if array.shape[0] <= array.shape[1] else array.T
        return channels.mean(axis=0) if mix else channels[0]
    raise MediaError(f"audio array must be 1-D or 2-D (channels x samples), got shape {tuple(array.shape)}")


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    target_rate: int | None = 16000,
    max_seconds: float | None = None,
    mix_channels: bool = False,
) -> torch.Tensor:
    """Load audio as a 1-D float32 tensor at ``target_rate`` Hz (None: the source's own rate), channel 0 only
    (``mix_channels``: the mean of the channels, so a voice on any channel is kept).

    ``source`` is a file path, encoded file bytes (WAV natively; flac/mp3/ogg/webm/... via PyAV),
    or a numpy array / torch tensor of samples (int16/int32/uint8 PCM or float; 1-D, or 2-D with
    channels on the shorter axis) together with its ``sample_rate``. A ``(samples, sample_rate)``
    tuple, or Gradio's ``(sample_rate, samples)``, is accepted too. ``max_seconds`` refuses longer audio before it is resampled.
    """
    if isinstance(source, tuple) and len(source) == 2:
        first, second = source
        # (samples, rate) as the reference processor takes it, or (rate, samples) as Gradio gives it
        source, sample_rate = (second, first) if isinstance(first, (int, np.integer)) else (first, second)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise not_a_file(path, "audio")
        samples, rate = decode_audio(path.read_bytes(), f"audio file {path}", mix=mix_channels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        samples, rate = decode_audio(bytes(source), "audio data", mix=mix_channels)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if sample_rate is None:
            raise MediaError("a raw audio array needs its sample_rate")
        if isinstance(source, torch.Tensor):
            tensor = source.detach().cpu()
            # numpy has no bfloat16 (or other narrow torch floats): widen them, values unchanged
            if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
                tensor = tensor.to(torch.float32)
            array = tensor.numpy()
        else:
            array = source
        if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise MediaError(f"audio array has unsupported dtype {array.dtype}")
        samples, rate = _array_channel0(_pcm_to_float(array), mix_channels), int(sample_rate)
    else:
        raise MediaError(
            f"unsupported audio input of type {type(source).__name__}; "
            "expected a path, encoded bytes, or a numpy/torch array with its sample rate"
        )
    if rate <= 0:
        raise MediaError(f"invalid audio sample rate {rate}")
    if samples.size == 0:
        raise MediaError("audio is empty (zero samples)")
    if max_seconds is not None and samples.size / rate > max_seconds:
        raise MediaError(f"audio is too long: {samples.size / rate:.2f} s, at most {max_seconds:.0f} s is supported")
    if not np.all(np.isfinite(samples)):
        raise MediaError("audio contains NaN or infinite samples")
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if target_rate is not None and rate != target_rate:
        wave = resample(wave, rate, target_rate)
    return wave


# --------------------------------------------------------------------------- resampling


def check_resample_rates(
    orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[int, int, int]:
    """(orig, new, width) of the polyphase kernel from ``orig_freq`` to ``new_freq`` Hz: the rates
    divided by their gcd and the padding. Raises `MediaError` for a rate pair whose kernel would be
    too large (rates that share no useful common divisor, such as 16001 -> 16000 Hz)."""
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    base_freq = min(orig, new) * rolloff  # cut-off, in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    if new * (2 * width + orig) > MAX_RESAMPLE_KERNEL_ELEMENTS:
        raise MediaError(
            f"cannot resample {orig_freq} Hz -> {new_freq} Hz: the rates share no useful common "
            f"divisor (ratio {orig}/{new}), the polyphase kernel would be too large"
        )
    return orig, new, width


def resampled_length(n_samples: int, orig_freq: int, new_freq: int) -> int:
    """Samples that `resample` makes of ``n_samples`` at ``orig_freq``, as torchaudio counts them:
    the quotient new * n / orig (rates reduced by their gcd) is taken in float64, rounded to
    float32 (``torch.as_tensor`` of a Python float) and only then ceiled. Where the exact quotient
    lies less than half a float32 ulp above an integer, that is one sample fewer than the exact
    ceil (44100 -> 16000 Hz: 180697 samples give 65559, not 65560)."""
    g = math.gcd(int(orig_freq), int(new_freq))
    quotient = int(new_freq) // g * int(n_samples) / (int(orig_freq) // g)
    return math.ceil(float(np.float32(quotient)))


def sinc_resample_kernel(
    orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernel of torchaudio's default ``Resample`` (Hann window).

    Both rates are first divided by their gcd. The kernel is computed in float64 and stored as
    float32: [new, 1, 2*width + orig]. Returns the kernel and ``width`` (the padding).
    """
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    orig, new, width = check_resample_rates(orig_freq, new_freq, lowpass_filter_width, rolloff)
    base_freq = min(orig, new) * rolloff  # cut-off, in units of the reduced rates
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # output phase k sits at time -k/new (computed in float32 like torchaudio, then widened)
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = kernel * (window * (base_freq / orig))
    return kernel.to(torch.float32), width


def resample(
    waveform: torch.Tensor, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Band-limited resampling of the last axis, as ``torchaudio.transforms.Resample``.

    Output length is `resampled_length` (torchaudio's float32-rounded ceil of new * n / orig).
    """
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise MediaError(f"sample rates must be positive integers, got {orig_freq} -> {new_freq}")
    if orig_freq == new_freq:
        return waveform
    if not waveform.is_floating_point():
        raise MediaError("resample expects a floating-point waveform")
    orig = int(orig_freq) // math.gcd(int(orig_freq), int(new_freq))
    kernel, width = sinc_resample_kernel(orig_freq, new_freq, lowpass_filter_width, rolloff)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).to(torch.float32)
    length = x.shape[-1]
    x = torch.nn.functional.pad(x, (width, width + orig))
    y = torch.nn.functional.conv1d(x[:, None], kernel.to(x.device), stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = resampled_length(length, orig_freq, new_freq)
    return y[..., :target].reshape(*shape[:-1], -1).to(waveform.dtype)


class StreamingResampler:
    """`resample` for mono audio that arrives in pieces (a live microphone).

    `feed` returns the output samples whose whole filter window has arrived; `flush` pads the end
    with zeros as `resample` does and returns the rest. The outputs of all `feed` calls plus
    `flush` equal `resample` of the whole signal (up to float rounding). Memory: one filter
    window plus the latest piece. Computed with numpy (small products: torch's thread pool only
    slows them down on a busy machine).
    """

    def __init__(self, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
        if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
            raise MediaError(f"sample rates must be positive integers, got {orig_freq} -> {new_freq}")
        self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)
        g = math.gcd(self.orig_freq, self.new_freq)
        self._orig, self._new = self.orig_freq // g, self.new_freq // g
        kernel, self._width = sinc_resample_kernel(orig_freq, new_freq, lowpass_filter_width, rolloff)
        self._kernel_t = np.ascontiguousarray(kernel[:, 0, :].numpy().T)  # [taps, new]
        self._buf = np.zeros(self._width, np.float32)  # the left zero padding `resample` adds
        self._samples_in = 0
        self._samples_out = 0

    @property
    def buffered(self) -> int:
        """Input samples held back until their filter window is complete."""
        return int(self._buf.size)

    def _frames(self, buf: np.ndarray) -> tuple[np.ndarray, int]:
        taps = self._kernel_t.shape[0]
        if buf.size < taps:
            return np.zeros(0, np.float32), 0
        windows = np.lib.stride_tricks.sliding_window_view(buf, taps)[:: self._orig]  # [n, taps]
        return (windows @ self._kernel_t).reshape(-1), windows.shape[0]

    def feed(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Take the next piece (1-D float); return the output samples now complete (float32)."""
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._samples_in += x.size
        if self.orig_freq == self.new_freq:
            self._samples_out += x.size
            return x.copy()
        self._buf = np.concatenate([self._buf, x])
        y, n = self._frames(self._buf)
        self._buf = self._buf[n * self._orig:].copy()
        self._samples_out += y.size
        return y

    def flush(self) -> np.ndarray:
        """The remaining output (the end padded with zeros as `resample` does); then start afresh."""
        y = np.zeros(0, np.float32)
        if self.orig_freq != self.new_freq:
            y, _ = self._frames(np.concatenate([self._buf, np.zeros(self._width + self._orig, np.float32)]))
            total = resampled_length(self._samples_in, self.orig_freq, self.new_freq)
            y = y[: max(0, total - self._samples_out)]
        self._buf = np.zeros(self._width, np.float32)
        self._samples_in = self._samples_out = 0
        return y


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    freq = np.asarray(freq, dtype=np.float64)
    mel = freq / f_sp
    log_region = freq >= min_log_hz
    mel = np.where(log_region, min_log_mel + np.log(np.maximum(freq, 1e-300) / min_log_hz) / logstep, mel)
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    mel = np.asarray(mel, dtype=np.float64)
    freq = f_sp * mel
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), freq)


def mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 128) -> torch.Tensor:
    """Slaney-style, Slaney-normalised triangular mel filterbank [n_mels, 1 + n_fft//2] float32.

    Same values as ``librosa.filters.mel(sr, n_fft, n_mels)`` (htk=False, norm="slaney", fmin 0,
    fmax sr/2), which whisper ships as ``mel_filters.npz``: triangles on mel-spaced edges,
    each scaled by 2 / (upper edge - lower edge) in Hz.
    """
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_edges = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2.0), n_mels + 2)
    hz_edges = _mel_to_hz_slaney(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, fft_freqs.size), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))  # stored float32, as librosa does
    enorm = 2.0 / (hz_edges[2:n_mels + 2] - hz_edges[:n_mels])
    weights *= enorm[:, None]
    return torch.from_numpy(weights)


_MEL_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _cached_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    key = (sample_rate, n_fft, n_mels)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = mel_filters(sample_rate, n_fft, n_mels)
    return _MEL_CACHE[key]


def check_clip_length(n_samples: int, sample_rate: int, config: AudioFrontendConfig | None = None) -> None:
    """Refuse (`MediaError`) a clip of ``n_samples`` at ``sample_rate`` Hz that the front end cannot
    turn into features, before any work on it: a rate that cannot be resampled to the config's, or
    too few samples, once resampled, for one log-mel frame (``config.min_samples``)."""
    config = config or AudioFrontendConfig()
    if sample_rate != config.sample_rate:
        check_resample_rates(sample_rate, config.sample_rate)
    if resampled_length(n_samples, sample_rate, config.sample_rate) < config.min_samples:
        raise MediaError(
            f"audio is too short: {1000 * n_samples / sample_rate:.1f} ms ({n_samples} samples at "
            f"{sample_rate} Hz), "
            f"at least {1000 * config.min_samples / config.sample_rate:.1f} ms is needed"
        )


def log_mel_spectrogram(wave: torch.Tensor | np.ndarray, config: AudioFrontendConfig | None = None) -> torch.Tensor:
    """Whisper log-mel features [T, n_mels] (float32) of a 1-D waveform at ``config.sample_rate``.

    T = N // hop (the last STFT frame is dropped). Raises `MediaError` for empty input or a clip
    longer than ``config.max_frames``.
    """
    config = config or AudioFrontendConfig()
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise MediaError(f"log_mel_spectrogram expects a waveform tensor, got {type(wave).__name__}")
    if wave.ndim != 1:
        raise MediaError(f"log_mel_spectrogram expects a 1-D mono waveform, got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float32)
    check_clip_length(wave.shape[0], config.sample_rate, config)
    if wave.shape[0] // config.hop_length > config.max_frames:
        raise MediaError(
            f"audio is too long: {wave.shape[0] / config.sample_rate:.2f} s, "
            f"at most {config.max_duration_s:.0f} s is supported"
        )
    window = torch.hann_window(config.n_fft)
    stft = torch.stft(wave, config.n_fft, config.hop_length, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [n_fft//2 + 1, T]
    mel = _cached_mel_filters(config.sample_rate, config.n_fft, config.n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec.transpose(0, 1).contiguous()


def prepare_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    config: AudioFrontendConfig | None = None,
) -> AudioFeatures:
    """Load (channel 0, resampled to the config's rate) and compute log-mel features of one clip."""
    config = config or AudioFrontendConfig()
    # the exact frame limit is enforced by log_mel_spectrogram; this cheap bound (one hop of
    # slack) avoids resampling hours of audio only to refuse it
    slack = config.hop_length / config.sample_rate
    wave = load_audio(source, sample_rate, target_rate=config.sample_rate,
                      max_seconds=config.max_duration_s + slack)
    return AudioFeatures(feats=log_mel_spectrogram(wave, config), projector=config.projector)


def pack_audio_features(clips: Sequence[AudioFeatures]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the clips of one prompt along time in a single row, as the processor does.

    Returns ``audio_feats`` [1, sum T, n_mels], ``audio_feats_lengths`` [1, n] (mel frames per
    clip) and ``encoder_feats_lengths`` [1, n] (LLM tokens per clip).
    """
    if not clips:
        raise MediaError("no audio clips given")
    feats = torch.cat([c.feats for c in clips], dim=0)[None]
    lengths = torch.tensor([[c.n_frames for c in clips]], dtype=torch.int64)
    tokens = torch.tensor([[c.n_tokens for c in clips]], dtype=torch.int64)
    return feats, lengths, tokens
