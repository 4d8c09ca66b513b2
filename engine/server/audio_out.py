"""Audio files and streams the server sends: WAV headers (whole files, and the streaming header whose
sizes are left open) that state the true sample rate, the other file formats through PyAV (FLAC, MP3,
AAC, Opus: its encoders ship in the `av` wheel of requirements.txt), and the 24 kHz PCM that OpenAI's
`pcm`/`pcm16` formats promise (the --openai-only mode resamples the talker's 44.1 kHz to it).

Every function takes PCM16 little-endian mono bytes at a stated rate; nothing here guesses a rate.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import numpy as np

from engine.events import AudioChunk, Event, is_final

# response_format -> (Content-Type, PyAV container, PyAV codec); wav and pcm are written here.
FORMATS: dict[str, tuple[str, str | None, str | None]] = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "flac": ("audio/flac", "flac", "flac"),
    "mp3": ("audio/mpeg", "mp3", "libmp3lame"),
    "aac": ("audio/aac", "adts", "aac"),
    "opus": ("audio/ogg", "ogg", "libopus"),
}
STREAMABLE = ("wav", "pcm")   # formats `stream_format: "audio"` sends as they are made
DEFAULT_FORMAT = "mp3"        # OpenAI's response_format when a request names none (a whole file)
OPUS_RATE = 48000             # Opus codes 48 kHz (the talker's audio is resampled to it)
OPENAI_PCM_RATE = 24000       # OpenAI's `pcm` / `pcm16`: 24 kHz, 16-bit, mono
UNKNOWN_SIZE = 0xFFFFFFFF     # RIFF / data sizes of a WAV whose length is not known yet
RATE_HEADER = "X-Sample-Rate"  # every speech answer's rate in its head (raw pcm has no header of its own to say it)


def coded_rate(fmt: str, sample_rate: int) -> int:
    """The rate the samples of a `fmt` file made from audio at `sample_rate` are at (Opus: always 48 kHz)."""
    return OPUS_RATE if fmt == "opus" else sample_rate


def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """The 44-byte header of a PCM16 mono WAV file at `sample_rate`. `data_bytes` None: a streaming
    header, its sizes left at 0xFFFFFFFF (readers take the data to the end of the stream)."""
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    riff = UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    data = UNKNOWN_SIZE if data_bytes is None else data_bytes
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                       sample_rate * 2, 2, 16, b"data", data)


def read_wav_header(data: bytes) -> dict:
    """The fields of a 44-byte PCM WAV header (for checks, and for clients reading a WAV stream)."""
    if len(data) < 44:
        raise ValueError(f"a WAV header has 44 bytes, got {len(data)}")
    (riff, size, wave, fmt, fmt_len, tag, channels, rate, byte_rate, align, bits, data_id,
     data_len) = struct.unpack("<4sI4s4sIHHIIHH4sI", data[:44])
    if riff != b"RIFF" or wave != b"WAVE" or fmt != b"fmt " or data_id != b"data":
        raise ValueError("not a canonical PCM WAV header")
    return {"riff_size": size, "format": tag, "channels": channels, "sample_rate": rate, "byte_rate": byte_rate,
            "block_align": align, "bits": bits, "data_len": data_len}


def encode_audio(pcm: bytes, sample_rate: int, fmt: str) -> bytes:
    """A whole file of PCM16 mono `pcm` at `sample_rate` in `fmt` (FORMATS); its header states the
    true rate (Opus: 48 kHz, the only rate Opus codes, resampled by PyAV)."""
    if fmt == "pcm":
        return bytes(pcm)
    if fmt == "wav":
        return wav_header(sample_rate, len(pcm)) + bytes(pcm)
    _, container, codec = FORMATS[fmt]
    import av  # noqa: PLC0415

    buf = io.BytesIO()
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=coded_rate(fmt, sample_rate))
        stream.layout = "mono"
        if samples.size:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def resampled(events: Iterator[Event], rate: int) -> Iterator[Event]:
    """The events with every AudioChunk resampled to `rate` (band-limited and streaming: each chunk's
    output leaves with it, the filter's tail just before the final event). Other events pass as they are."""
    from engine.media.audio import StreamingResampler  # noqa: PLC0415

    resampler: StreamingResampler | None = None
    out_s, text = 0.0, ""

    def chunk(samples: np.ndarray) -> AudioChunk:
        nonlocal out_s, text
        ev = AudioChunk.from_samples(samples, rate, text=text, start_s=out_s)
        out_s, text = out_s + ev.seconds, ""
        return ev

    for ev in events:
        if isinstance(ev, AudioChunk):
            if resampler is not None and resampler.orig_freq != ev.sample_rate:
                tail = resampler.flush()
                if tail.size:
                    yield chunk(tail)
                resampler = None
            resampler = resampler or StreamingResampler(ev.sample_rate, rate)
            text += ev.text
            samples = resampler.feed(ev.samples())
            if samples.size:
                yield chunk(samples)
            continue
        if is_final(ev) and resampler is not None:
            tail = resampler.flush()
            if tail.size:
                yield chunk(tail)
            resampler = None
        yield ev
