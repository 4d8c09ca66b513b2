"""CAM++ speaker encoder (spec §7.3): our own Kaldi fbank front end (torchaudio's
`compliance.kaldi.fbank` defaults with 80 bins and dither 0, re-implemented in torch) and the
checkpoint's `talker/campplus.onnx` run with onnxruntime on the CPU.

fbank: 25 ms frames every 10 ms (snip_edges), per-frame DC removal, pre-emphasis 0.97, povey window,
zero-padded FFT to a power of two, power spectrum, Kaldi mel banks (20 Hz .. Nyquist), log with a
float32-epsilon floor. Then the per-utterance mean of each bin is subtracted; the ONNX model maps
[1, T, 80] to a 192-d speaker vector.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from engine.errors import MingError
from engine.media.errors import MediaError

SAMPLE_RATE = 16000
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
NUM_MEL_BINS = 80
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
POVEY_POWER = 0.85
EPSILON = float(np.finfo(np.float32).eps)


class SpeakerEncoderError(MingError, RuntimeError):
    code = "checkpoint_error"


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


@lru_cache(maxsize=4)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """[num_bins, padded_window // 2 + 1] triangular filters on Kaldi's mel scale (last column zero)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0:
        high_freq += nyquist
    n_fft_bins = padded_window // 2
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + np.arange(num_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    mel = _mel(fft_bin_width * np.arange(n_fft_bins))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.pad(banks, ((0, 0), (0, 1)))
    return torch.from_numpy(banks.astype(np.float32))


def kaldi_fbank(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log mel filterbank energies [T, num_mel_bins] of a 1-D float waveform (no 2^15 scaling)."""
    wave = wave.reshape(-1).float()
    length = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    if wave.shape[0] < length:
        raise MediaError(f"audio is too short for speaker features ({wave.shape[0]} samples, at least {length})")
    frames = wave.unfold(0, length, shift)                      # snip_edges: 1 + (N - L) // S frames
    frames = frames - frames.mean(dim=1, keepdim=True)          # DC removal
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)    # replicate-padded previous sample
    frames = frames - PREEMPHASIS * prev
    window = torch.hann_window(length, periodic=False, dtype=torch.float64).pow(POVEY_POWER).float()
    frames = frames * window
    padded = 1 << (length - 1).bit_length()
    power = torch.fft.rfft(frames, n=padded).abs().pow(2)
    mel = power @ kaldi_mel_banks(num_mel_bins, padded, float(sample_rate), LOW_FREQ, 0.0).T
    return torch.clamp(mel, min=EPSILON).log()


class CAMPPlus:
    """`campplus.onnx` on onnxruntime (CPU). `embed(wave16k)` -> [1, 192] float32."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise SpeakerEncoderError(f"{path}: the CAM++ speaker encoder is missing (needed for voices and cloning)")
        try:
            import onnxruntime as ort  # noqa: PLC0415  (a runtime dependency, imported when a talker loads)
        except ImportError as e:
            raise SpeakerEncoderError("onnxruntime is not installed; it runs the CAM++ speaker encoder "
                                      "(pip install -r requirements.txt)") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SpeakerEncoderError(f"{path}: cannot load the CAM++ ONNX model ({e})") from e
        self.input_name = self.session.get_inputs()[0].name
        self.path = path

    def embed(self, wave16k: torch.Tensor) -> torch.Tensor:
        feats = kaldi_fbank(wave16k)
        feats = feats - feats.mean(dim=0, keepdim=True)
        out = self.session.run(None, {self.input_name: feats[None].numpy().astype(np.float32)})[0]
        emb = torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(1, -1)
        if not torch.isfinite(emb).all():
            raise MediaError("the speaker encoder produced non-finite values for this clip")
        return emb
