"""Waveform helpers of the talker: prompt padding (spec §7.4), the silence holder (spec §7.8
post-processing), reference-clip checks and keys, and a WAV writer/reader whose header states the true rate."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

from engine.media.errors import MediaError

SILENCE_FRAME_S = 0.1
SILENCE_LEVEL = 1e-3          # a 0.1 s frame with mean |x| <= this is silent
MAX_TRAILING_SILENCE_S = 0.3  # kept at the very end
MIN_REFERENCE_S = 0.5
MAX_REFERENCE_S = 30.0
SILENT_REFERENCE_RMS = 1e-4
FULL_SCALE = 0.999            # a sample this close to the largest value (|x| >= 0.999) sits at full scale
CLIPPED_FRACTION = 0.001      # more of a clip's samples than this at full scale: clipped (a normalised voice has a few)


def clip_key(clip) -> str:
    """What identifies a reference clip within a request: its file's path, its bytes' or samples' hash (the same
    clip given for two speakers has one key); any other object, itself."""
    if isinstance(clip, (str, os.PathLike)):
        return f"path:{os.fspath(clip)}"
    if isinstance(clip, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.sha1(bytes(clip)).hexdigest()
    if isinstance(clip, (np.ndarray, torch.Tensor)):
        array = np.ascontiguousarray(clip.detach().cpu().float().numpy() if isinstance(clip, torch.Tensor) else clip)
        return f"samples:{array.dtype}:{array.shape}:" + hashlib.sha1(array.tobytes()).hexdigest()
    return f"object:{id(clip)}"


def left_pad_to_multiple(wav: torch.Tensor, multiple: int) -> torch.Tensor:
    """Left-pad the last axis with zeros to a multiple of `multiple` samples."""
    extra = (-wav.shape[-1]) % multiple
    return F.pad(wav, (extra, 0)) if extra else wav


def check_reference(wav: torch.Tensor, rate: int, what: str = "reference clip") -> None:
    """A clip usable for cloning: 0.5-30 s and not silent (clear MediaErrors otherwise)."""
    seconds = wav.shape[-1] / rate
    if seconds < MIN_REFERENCE_S:
        raise MediaError(f"{what} is too short ({seconds:.2f} s); give at least {MIN_REFERENCE_S} s of speech")
    if seconds > MAX_REFERENCE_S:
        raise MediaError(f"{what} is too long ({seconds:.1f} s); at most {MAX_REFERENCE_S:.0f} s is used for a voice "
                         "(trim it to a few sentences)")
    rms = float(wav.float().pow(2).mean().sqrt())
    if not np.isfinite(rms):
        raise MediaError(f"{what} contains NaN or infinite samples")
    if rms < SILENT_REFERENCE_RMS:
        raise MediaError(f"{what} is silent (RMS {rms:.1e}); record the voice to clone")


def clipped_fraction(wav) -> float:
    """The fraction of a clip's samples (float, full scale 1.0, at its own rate) that sit at full scale."""
    x = torch.as_tensor(wav).float().reshape(-1)
    return float((x.abs() >= FULL_SCALE).float().mean()) if x.numel() else 0.0


def clipping_warning(wav, what: str = "reference clip") -> str | None:
    """What to tell of a clip to clone that is clipped (more than CLIPPED_FRACTION of it at full scale: the cloned
    voice carries the distortion), else None. It is still cloned: a warning, not a refusal."""
    fraction = clipped_fraction(wav)
    if fraction <= CLIPPED_FRACTION:
        return None
    return (f"{what} is clipped: {fraction:.1%} of its samples sit at full scale, and the cloned voice carries that "
            "distortion; record it again with the input level lower (peaks well under full scale)")


class SilenceHolder:
    """Holds back trailing silent 0.1 s frames until non-silent audio follows; at the end keeps at
    most 0.3 s of trailing silence."""

    def __init__(self, sample_rate: int):
        self.frame = max(1, int(round(SILENCE_FRAME_S * sample_rate)))
        self.keep_frames = int(round(MAX_TRAILING_SILENCE_S / SILENCE_FRAME_S))
        self.held = np.zeros(0, dtype=np.float32)

    def _last_loud_end(self, x: np.ndarray) -> int:
        """End (exclusive) of the last non-silent frame of x (frames from its start); 0 if all silent."""
        n = len(x)
        starts = np.arange(0, n, self.frame)
        for s in starts[::-1]:
            if np.abs(x[s:s + self.frame]).mean() > SILENCE_LEVEL:
                return min(n, s + self.frame)
        return 0

    def push(self, wav: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.concatenate([self.held, np.asarray(wav, dtype=np.float32).reshape(-1)])
        end = self._last_loud_end(x)
        if last:
            self.held = np.zeros(0, dtype=np.float32)
            return x[:min(len(x), end + self.keep_frames * self.frame)]
        self.held = x[end:]
        return x[:end]


def wav_bytes(samples: np.ndarray | bytes, sample_rate: int) -> bytes:
    """A PCM16 mono WAV file. `samples`: float in [-1, 1] or little-endian int16 bytes."""
    if isinstance(samples, (bytes, bytearray)):
        pcm = bytes(samples)
    else:
        pcm = (np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1, 1) * 32767).round().astype("<i2").tobytes()
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                         sample_rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def read_wav_header(data: bytes) -> dict:
    """The fields of a canonical 44-byte PCM WAV header (for checks)."""
    (riff, size, wave, fmt, fmt_len, tag, channels, rate, byte_rate, align, bits, data_id,
     data_len) = struct.unpack("<4sI4s4sIHHIIHH4sI", data[:44])
    return {"riff": riff, "riff_size": size, "wave": wave, "fmt": fmt, "fmt_len": fmt_len, "format": tag,
            "channels": channels, "sample_rate": rate, "byte_rate": byte_rate, "block_align": align,
            "bits": bits, "data": data_id, "data_len": data_len}


class WavWriter:
    """Streams PCM16 to a file and fixes the sizes in the header on close."""

    def __init__(self, path, sample_rate: int):
        self.f = open(path, "wb")
        self.rate = sample_rate
        self.n = 0
        self.f.write(wav_bytes(b"", sample_rate))

    def write(self, pcm: bytes) -> None:
        self.f.write(pcm)
        self.n += len(pcm)

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(wav_bytes(b"", self.rate)[:4] + struct.pack("<I", 36 + self.n))
        self.f.seek(40)
        self.f.write(struct.pack("<I", self.n))
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

