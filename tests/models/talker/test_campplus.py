"""CAM++ front end: our torch Kaldi fbank against a direct per-frame numpy transcription of Kaldi's
definition (torchaudio is not installed), and the ONNX speaker encoder's interface."""

import math

import numpy as np
import pytest
import torch

from engine.media.errors import MediaError
from engine.models.talker.campplus import CAMPPlus, SpeakerEncoderError, kaldi_fbank


def slow_fbank(x: np.ndarray, rate=16000, bins=80) -> np.ndarray:
    L, S, nfft = 400, 160, 512
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(rate / 2)
    step = (hi - lo) / (bins + 1)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, centre, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        for k in range(nfft // 2):
            m = mel(k * rate / nfft)
            if left < m < right:
                banks[b, k] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    window = np.array([(0.5 - 0.5 * math.cos(2 * math.pi * n / (L - 1))) ** 0.85 for n in range(L)])
    rows = []
    for t in range(1 + (len(x) - L) // S):
        f = x[t * S: t * S + L].astype(np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        spec = np.abs(np.fft.rfft(f * window, nfft)) ** 2
        rows.append(np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps)))
    return np.array(rows)


def test_fbank_matches_kaldi_definition():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(x)).numpy()
    ref = slow_fbank(x)
    assert ours.shape == ref.shape == (1 + (8000 - 400) // 160, 80)
    assert np.abs(ours - ref).max() < 2e-3  # float32 vs float64 logs of energies spanning decades


def test_fbank_too_short():
    with pytest.raises(MediaError, match="too short"):
        kaldi_fbank(torch.zeros(100))


def test_onnx_speaker_encoder(tiny_talker_dir, tmp_path):
    enc = CAMPPlus(tiny_talker_dir / "campplus.onnx")
    a = enc.embed(torch.randn(16000) * 0.1)
    b = enc.embed(torch.randn(24000) * 0.1)
    assert a.shape == b.shape == (1, 192) and a.dtype == torch.float32
    with pytest.raises(SpeakerEncoderError, match="missing"):
        CAMPPlus(tmp_path / "campplus.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(SpeakerEncoderError, match="cannot load"):
        CAMPPlus(tmp_path / "bad.onnx")
