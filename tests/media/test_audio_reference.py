"""The audio front end against the spec's §5.1 / §5.4 written out plainly here in float64 numpy (sharing no
code with the engine): a per-frame rfft of the reflect-padded clip under a periodic Hann window, Slaney mel
triangles from the Hz <-> mel formulas, the log10 floor, the whole-clip dynamic range and (x + 4) / 4; the
windowed-sinc resampler as a direct sum at each output instant (not the engine's polyphase convolution); the
two stride-2 convolutions' lengths by the general conv formula. Lengths the fixtures never use: the shortest
clip that makes a frame, lengths one either side of a hop multiple, 44.1 / 48 / 22.05 / 8 / 24 kHz sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.media import MediaError
from engine.media.audio import AudioFeatures, log_mel_spectrogram, prepare_audio, resample
from engine.models.thinker.processor import MediaSettings, MingProcessor
from tests.tiny_tokenizer import tiny_tokenizer

SR, N_FFT, HOP, N_MELS = 16000, 400, 160, 128
# the engine's STFT and mel product run in float32; bins near the dynamic-range floor (8 decades below the
# peak power) carry the largest relative error: 1.9e-5 measured on these clips, 1e-4 allowed
LOG_MEL_ATOL = 1e-4
# the engine's sinc kernel is float32 (as torchaudio's): 2.4e-6 of full scale measured, 1e-5 allowed
RESAMPLE_ATOL = 1e-5


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney: linear below 1 kHz (200/3 Hz a mel), logarithmic above (27 mels an octave of 6.4)."""
    f = np.asarray(f, np.float64)
    return np.where(f < 1000, f * 3 / 200, 15 + 27 * np.log(np.maximum(f, 1e-12) / 1000) / np.log(6.4))


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def slaney_filters(n_mels: int = N_MELS) -> np.ndarray:
    bins = np.arange(N_FFT // 2 + 1) * SR / N_FFT
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), n_mels + 2))
    out = np.zeros((n_mels, bins.size))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise, fall = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
        out[i] = np.clip(np.minimum(rise, fall), 0, None) * 2 / (hi - lo)  # unit area per Hz (Slaney norm)
    return out


def spec_log_mel(wave: np.ndarray) -> np.ndarray:
    x = np.pad(np.asarray(wave, np.float64), N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic
    n_frames = len(wave) // HOP  # 1 + N // hop centred frames, the last dropped
    frames = np.stack([x[k * HOP:k * HOP + N_FFT] * window for k in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [T, 201]
    log = np.log10(np.maximum(power @ slaney_filters().T, 1e-10))
    return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0


def spec_resample(x: np.ndarray, src: int, dst: int, taps: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Each output sample j at input instant j * src / dst: the sum of x[i] under a Hann-windowed sinc cut at
    rolloff x the lower Nyquist, `taps` zero crossings each side; ceil(n * dst / src) samples."""
    cutoff = rolloff * min(src, dst) / src  # the kernel's zero crossings are 1 / cutoff input samples apart
    reach = math.ceil(taps / cutoff) + 1  # input samples either side of an instant under the kernel
    instants = np.arange(math.ceil(len(x) * dst / src)) * src / dst
    i = np.floor(instants)[:, None].astype(np.int64) + np.arange(-reach, reach + 1)[None, :]
    u = np.clip((i - instants[:, None]) * cutoff, -taps, taps)
    kernel = np.sinc(u) * np.cos(np.pi * u / taps / 2) ** 2 * cutoff
    inside = (i >= 0) & (i < len(x))  # zeros beyond both ends
    return (kernel * np.where(inside, x[np.clip(i, 0, len(x) - 1)], 0.0)).sum(axis=1)


def _clip(n: int, seed: int, rate: int = SR) -> np.ndarray:
    """Two tones and noise, the second tone rising, so every mel band and frame differs."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    wave = 0.4 * np.sin(2 * np.pi * 523.0 * t) + 0.2 * np.sin(2 * np.pi * (1500 + 900 * t) * t)
    return (wave + 0.05 * rng.standard_normal(n)).astype(np.float32)


LENGTHS = [201, 319, 320, 321, 479, 1601, 4001, 16007]


@pytest.mark.parametrize("n", LENGTHS)
def test_log_mel_matches_the_spec_at_lengths_off_the_hop(n):
    wave = _clip(n, seed=n)
    ours = log_mel_spectrogram(torch.from_numpy(wave))
    ref = spec_log_mel(wave)
    assert ours.shape == (n // HOP, N_MELS) == ref.shape
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=LOG_MEL_ATOL, rtol=0)


def test_a_silent_stretch_is_floored_at_eight_decades_below_the_clip_s_peak():
    wave = _clip(3200, seed=3)
    wave[1000:2600] = 0.0  # exact zeros: power 0 -> the 1e-10 clamp, then the max - 8 floor
    ours = log_mel_spectrogram(torch.from_numpy(wave)).numpy()
    ref = spec_log_mel(wave)
    np.testing.assert_allclose(ours, ref, atol=LOG_MEL_ATOL, rtol=0)
    assert np.isclose(ours.min(), ours.max() - 2.0, atol=1e-6)  # 8 decades / 4


@pytest.mark.parametrize("n", [1, 159, 160, 200])
def test_clips_too_short_for_one_reflect_padded_frame_are_refused_in_words(n):
    with pytest.raises(MediaError, match="audio is too short"):
        log_mel_spectrogram(torch.from_numpy(_clip(n, seed=n)))


RATES = [(44100, 1234), (48000, 4801), (22050, 2207), (8000, 803), (24000, 2399)]


@pytest.mark.parametrize("src,n", RATES, ids=[f"{r}Hz_{n}" for r, n in RATES])
def test_resampling_to_16k_matches_the_direct_windowed_sinc_sum(src, n):
    wave = _clip(n, seed=src, rate=src)
    ours = resample(torch.from_numpy(wave), src, SR)
    ref = spec_resample(wave.astype(np.float64), src, SR)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=RESAMPLE_ATOL, rtol=0)


@pytest.mark.parametrize("src,n", RATES[:3], ids=[f"{r}Hz_{n}" for r, n in RATES[:3]])
def test_a_clip_at_another_rate_gives_the_features_of_its_16k_resampling(src, n):
    wave = _clip(n, seed=src + 1, rate=src)
    ours = prepare_audio(wave, src)
    ref = spec_log_mel(spec_resample(wave.astype(np.float64), src, SR))
    assert ours.n_frames == ref.shape[0] == math.ceil(n * SR / src) // HOP
    np.testing.assert_allclose(ours.feats.numpy(), ref, atol=LOG_MEL_ATOL, rtol=0)


def conv_out(length: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
    return (length + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("n_frames", [1, 2, 3, 4, 5, 6, 7, 8, 9, 99, 100, 101, 2999, 30000])
def test_token_count_is_the_length_after_both_stride_2_convolutions(n_frames):
    """§5.4: Whisper's conv2 then the projector's conv, each k 3 / stride 2 / pad 1; checked on real convs."""
    mel_frames = torch.zeros(1, 1, n_frames)
    after_conv2 = torch.nn.functional.conv1d(mel_frames, torch.zeros(1, 1, 3), stride=2, padding=1)
    after_proj = torch.nn.functional.conv1d(after_conv2, torch.zeros(1, 1, 3), stride=2, padding=1)
    assert after_proj.shape[-1] == conv_out(conv_out(n_frames))
    assert AudioFeatures(torch.zeros(n_frames, N_MELS)).n_tokens == after_proj.shape[-1]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return MingProcessor(tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")), MediaSettings())


@pytest.mark.parametrize("lengths", [[321], [4001, 1601], [201, 16007, 479]], ids=["one", "two", "three"])
def test_each_clip_s_span_starts_after_its_audio_tag_and_holds_its_token_count(processor, lengths):
    clips = [(_clip(n, seed=n), SR) for n in lengths]
    parts = [{"type": "text", "text": "listen:"}, {"type": "audio", "audio": clips}]
    out = processor.build([{"role": "user", "content": parts}])
    tok = processor.tokenizer
    starts = [i + 1 for i, t in enumerate(out.ids) if t == tok.token_id("<audio>")]
    counts = [conv_out(conv_out(n // HOP)) for n in lengths]
    assert out.audio_spans == list(zip(starts, counts))
    for start, count in zip(starts, counts):
        assert out.ids[start:start + count] == [tok.token_id("<audioPatch>")] * count
        assert out.ids[start + count] == tok.token_id("</audio>")
    # several clips of one part are joined by a newline, and nothing follows the last </audio> (§6.2)
    audio_text = "\n".join("<audio>" + "<audioPatch>" * c + "</audio>" for c in counts)
    assert out.text.endswith("listen:" + audio_text + "<|role_end|><role>ASSISTANT</role>")
