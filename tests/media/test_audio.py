"""Audio front end: decoding, channel 0, resampling, log-mel, token counts and errors."""

from __future__ import annotations

import io
import math
import struct
import wave

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.media import MediaError
from engine.media.audio import (
    AudioFrontendConfig,
    StreamingResampler,
    audio_token_count,
    check_clip_length,
    check_resample_rates,
    decode_audio,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    prepare_audio,
    resample,
    sinc_resample_kernel,
    whisper_encoder_frames,
)
from engine.media.errors import decode_failure


def _sine(rate: int, freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav_bytes(samples: np.ndarray, rate: int, *, fmt_tag: int = 1, bits: int = 16) -> bytes:
    """A RIFF/WAVE file; ``samples`` [n, channels] already in the target integer/float type."""
    channels = samples.shape[1]
    if bits == 24:
        ints = samples.astype(np.int32).reshape(-1)
        payload = b"".join(struct.pack("<i", int(v))[:3] for v in ints)
    else:
        payload = samples.tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("orig, freq", [(48000, 1000.0), (44100, 440.0), (8000, 1000.0), (22050, 3000.0)])
def test_resample_matches_an_analytic_sine(orig, freq):
    x = torch.from_numpy(_sine(orig, freq, 1.0, amp=1.0))
    y = resample(x, orig, 16000)
    assert y.shape[0] == math.ceil(16000 * x.shape[0] / orig)
    t = torch.arange(y.shape[0], dtype=torch.float64) / 16000
    expected = torch.sin(2 * math.pi * freq * t)
    # away from the edges (where the signal is zero-padded) the band-limited sinc is exact to 1e-3
    assert (y.double() - expected)[200:-200].abs().max() < 1e-3


def test_resample_removes_content_above_the_new_nyquist():
    x = torch.from_numpy(_sine(48000, 12000.0, 1.0, amp=1.0))  # above 8 kHz: must vanish at 16 kHz
    y = resample(x, 48000, 16000)
    assert y[200:-200].abs().max() < 2e-3


def test_resample_kernel_shape_follows_reduced_rates():
    kernel, width = sinc_resample_kernel(44100, 16000)  # gcd 100: 441 -> 160
    assert width == math.ceil(6 * 441 / (160 * 0.99))
    assert tuple(kernel.shape) == (160, 1, 2 * width + 441)
    assert kernel.dtype == torch.float32


def test_resample_batches_over_leading_axes():
    x = torch.randn(3, 4800, generator=torch.Generator().manual_seed(0))
    y = resample(x, 48000, 16000)
    assert tuple(y.shape) == (3, 1600)
    torch.testing.assert_close(y[1], resample(x[1], 48000, 16000), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- log-mel


def test_mel_filters_are_slaney_normalised_triangles():
    f = mel_filters(16000, 400, 128).numpy()
    assert f.shape == (128, 201) and f.dtype == np.float32
    assert (f >= 0).all()
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # centres rise with the filter index
    # Slaney norm: area under each triangle (in Hz) is 1 -> sum * 40 Hz bin width ~ 1 for wide filters
    assert np.allclose(f[-10:].sum(axis=1) * 40.0, 1.0, atol=0.02)


def test_log_mel_frame_count_range_and_layout():
    wave_ = torch.from_numpy(_sine(16000, 440.0, 2.5)) + 0.01 * torch.randn(40000, generator=torch.Generator().manual_seed(1))
    feats = log_mel_spectrogram(wave_)
    assert tuple(feats.shape) == (250, 128)  # T = N // 160, time-major
    assert feats.max() - feats.min() <= 2.0 + 1e-6  # dynamic range max - 8 in log10, then / 4
    band = int(np.argmax(feats.mean(dim=0).numpy()))
    peak_hz = mel_filters()[band].argmax().item() * 40.0
    assert abs(peak_hz - 440.0) < 120.0


def test_audio_token_counts():
    assert whisper_encoder_frames(250) == 125
    assert audio_token_count(250) == 63
    assert audio_token_count(83) == 21
    assert [audio_token_count(t) for t in (1, 2, 3, 4, 5, 8, 9)] == [1, 1, 1, 1, 2, 2, 3]
    feats = prepare_audio(_sine(16000, 300.0, 2.5), 16000)
    assert (feats.n_frames, feats.n_tokens) == (250, 63)


def test_max_duration_comes_from_the_encoder_context():
    cfg = AudioFrontendConfig()
    assert cfg.max_frames == 30000 and cfg.max_duration_s == pytest.approx(300.0)
    assert AudioFrontendConfig(n_ctx=1500).max_duration_s == pytest.approx(30.0)
    with pytest.raises(MediaError, match="too long: 2.00 s, at most 1 s"):
        prepare_audio(np.zeros(32000, dtype=np.float32), 16000, AudioFrontendConfig(max_seconds=1.0))


# --------------------------------------------------------------------------- loading


def test_int16_pcm_is_divided_by_2_pow_15():
    ints = np.array([0, 16384, -32768, 32767] * 100, dtype=np.int16)
    out = load_audio(ints, 16000)
    np.testing.assert_array_equal(out.numpy()[:4], np.array([0, 0.5, -1.0, 32767 / 32768], dtype=np.float32))


def test_wav_takes_channel_0_and_resamples_48k_browser_audio():
    left = (_sine(48000, 500.0, 0.5) * 32767).astype(np.int16)
    right = (_sine(48000, 2000.0, 0.5) * 32767).astype(np.int16)
    data = _wav_bytes(np.stack([left, right], axis=1), 48000)
    out = load_audio(data)
    expected = resample(torch.from_numpy(left.astype(np.float32) / 32768), 48000, 16000)
    assert out.shape[0] == 8000
    assert torch.equal(out, expected)


def test_wav_file_path_and_stdlib_writer(tmp_path):
    path = tmp_path / "clip.wav"
    samples = (_sine(16000, 440.0, 0.3) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    out = load_audio(path)
    np.testing.assert_array_equal(out.numpy(), samples.astype(np.float32) / 32768)


def test_wav_float32_and_24bit():
    x = _sine(16000, 440.0, 0.2)
    out = load_audio(_wav_bytes(x[:, None], 16000, fmt_tag=3, bits=32))
    np.testing.assert_array_equal(out.numpy(), x)
    ints = np.array([0, 2 ** 22, -(2 ** 23), 2 ** 23 - 1], dtype=np.int32)
    out = load_audio(_wav_bytes(np.stack([ints, -ints], axis=1), 16000, bits=24))
    np.testing.assert_allclose(out.numpy(), [0, 0.5, -1.0, (2 ** 23 - 1) / 2 ** 23])


def test_tuples_in_either_order():
    x = (_sine(48000, 300.0, 0.1) * 32767).astype(np.int16)
    assert torch.equal(load_audio((x, 48000)), load_audio((48000, x)))  # reference and Gradio order
    assert load_audio((48000, x)).shape[0] == 1600


def test_two_dimensional_arrays_use_channel_0_either_layout():
    stereo = np.stack([_sine(16000, 300.0, 0.1), np.ones(1600, dtype=np.float32)])
    assert torch.equal(load_audio(stereo, 16000), load_audio(stereo[0], 16000))
    assert torch.equal(load_audio(stereo.T.copy(), 16000), load_audio(stereo[0], 16000))


@pytest.mark.parametrize("fmt, codec, rate", [("flac", "flac", 44100), ("ogg", "libopus", 48000),
                                              ("mp3", "libmp3lame", 44100), ("webm", "libopus", 48000)])
def test_compressed_formats_decode_via_pyav(fmt, codec, rate):
    av = pytest.importorskip("av")
    seconds = 1.0
    left = _sine(rate, 440.0, seconds)
    right = np.zeros_like(left)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame_size = stream.codec_context.frame_size or 1024
        pcm = np.stack([left, right])
        sample_fmt = stream.codec_context.format.name
        for start in range(0, pcm.shape[1], frame_size):
            chunk = np.ascontiguousarray(pcm[:, start:start + frame_size])
            if sample_fmt == "s16":
                frame = av.AudioFrame.from_ndarray((chunk.T.reshape(1, -1) * 32767).astype(np.int16), format="s16", layout="stereo")
            elif sample_fmt == "s32":
                frame = av.AudioFrame.from_ndarray((chunk.T.reshape(1, -1) * 2 ** 31 * 0.99).astype(np.int32), format="s32", layout="stereo")
            else:
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    out = load_audio(buf.getvalue()).numpy()
    assert abs(out.shape[0] / 16000 - seconds) < 0.1  # codec priming / padding only
    # channel 0 is the sine (channel 1 is silent): a strong 440 Hz line in the spectrum
    spectrum = np.abs(np.fft.rfft(out[: 16000 // 2 * 2]))
    peak_hz = np.argmax(spectrum) * 16000 / (out[: 16000 // 2 * 2].shape[0])
    assert abs(peak_hz - 440.0) < 5.0
    assert 0.25 < np.max(np.abs(out)) < 0.75
    mixed = load_audio(buf.getvalue(), mix_channels=True).numpy()  # (the sine and silence: half the sine)
    assert np.max(np.abs(mixed)) == pytest.approx(np.max(np.abs(out)) / 2, rel=0.1)


def test_mixed_channels_keep_a_voice_on_any_channel():
    """A stereo clip whose sound is on its right channel only read as silence (channel 0); `mix_channels` gives the
    channels' mean (the talker's reference clips), from a WAV file and from an integer array alike."""
    right = _sine(16000, 300.0, 0.5)
    stereo = np.stack([np.zeros_like(right), right], axis=1)
    ints = (stereo * 32767).astype("<i2")
    for source in (_wav_bytes(ints, 16000), ints):
        assert load_audio(source, 16000).abs().max() == 0
        mixed = load_audio(source, 16000, mix_channels=True).numpy()
        assert np.abs(mixed - right / 2).max() < 1e-4


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "source, rate, message",
    [
        (b"", None, "empty"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", None, "corrupt WAV"),
        (b"this is not audio at all" * 20, None, "not an audio file FFmpeg can read|not a WAV file"),
        (np.zeros(0, dtype=np.float32), 16000, "empty"),
        (np.array([0.1, np.nan] * 200, dtype=np.float32), 16000, "NaN"),
        (np.zeros(1000, dtype=np.float32), None, "needs its sample_rate"),
        (np.array(["a", "b"]), 16000, "unsupported dtype"),
        (np.zeros((2, 2, 2), dtype=np.float32), 16000, "1-D or 2-D"),
        ({"wave": 1}, 16000, "unsupported audio input of type dict"),
        ("/nonexistent/clip.wav", None, "not found"),
        (str(Path(__file__).parent), None, "is a folder, not an audio file"),  # (was 'audio file not found')
    ],
)
def test_audio_errors_name_the_problem(source, rate, message):
    with pytest.raises(MediaError, match=message):
        prepare_audio(source, rate)


def test_undecodable_audio_is_said_in_words():
    """FFmpeg's text came through as is: "audio data could not be decoded as audio: [Errno 1094995529] Invalid
    data found when processing input: '<none>'" (a browser showed it cut off at the quote, <none> read as a tag)."""
    pytest.importorskip("av")
    with pytest.raises(MediaError) as caught:
        decode_audio(b"this is not audio at all" * 20, "'clip.mp3'")
    assert str(caught.value) == ("'clip.mp3' is not an audio file FFmpeg can read (an unknown format, or a corrupt "
                                 "or cut-off file)")


def test_a_wav_header_no_recorder_writes_is_said_to_be_corrupt_saying_why():
    """A WAV tagged float holding 16-bit integer samples was "in an audio codec this FFmpeg build cannot decode" (no
    build has one); a header saying 65535 channels read as less than one sample of each ("has no samples")."""
    ints = (_sine(16000, 440.0, 0.2) * 32767).astype("<i2")[:, None]
    with pytest.raises(MediaError) as caught:
        decode_audio(_wav_bytes(ints, 16000, fmt_tag=3, bits=16), "'clip.wav'")
    assert str(caught.value) == ("'clip.wav' is a corrupt WAV file: its header says 16-bit floating-point samples, "
                                 "and WAV's are 32 or 64 bits (integer samples labelled float?)")
    header = bytearray(_wav_bytes(ints, 16000))
    header[22:24] = struct.pack("<H", 65535)  # (the fmt chunk's channel count)
    with pytest.raises(MediaError) as caught:
        decode_audio(bytes(header), "'clip.wav'")
    assert str(caught.value) == ("'clip.wav' is a corrupt WAV file: its header says 65535 channels (a WAV file has "
                                 "at most 512)")


LOUD_INT32 = (_sine(16000, 440.0, 0.2, amp=0.3) * 2**31).astype("<i4")  # read as floats: ~1e-15 and ~-1e15


@pytest.mark.parametrize("ints, looks", [
    ((_sine(16000, 440.0, 0.2) * 32767).astype("<i4"), "some of them NaN or infinite"),  # (small negatives: NaN)
    (LOUD_INT32, f"peaking at {np.abs(LOUD_INT32.view('<f4')).max():.3g}"),
    ((np.abs(_sine(16000, 440.0, 0.2)) * 32767).astype("<i4"), "all below 1.18e-38 (subnormal)"),
])
def test_integer_samples_under_a_32_bit_float_tag_are_said_to_be_corrupt(ints, looks):
    """A WAV tagged 32-bit float holding integer samples decoded to noise (±1e15 spikes, subnormal dust) that was
    transcribed, or, where a sample read as NaN, was refused as "audio contains NaN or infinite samples", which does
    not say the file is mislabelled; it is now a corrupt WAV saying what the header claims and what the samples look
    like. Float audio with overs (peak 4) is still audio."""
    with pytest.raises(MediaError) as caught:
        decode_audio(_wav_bytes(ints[:, None], 16000, fmt_tag=3, bits=32), "'clip.wav'")
    assert str(caught.value) == ("'clip.wav' is a corrupt WAV file: its header says 32-bit floating-point samples, and "
                                 f"read as floats they are {looks}, where float audio lies within about ±1 (integer "
                                 "samples labelled float?)")
    loud = _sine(16000, 440.0, 0.2, amp=4.0)[:, None]
    samples, _ = decode_audio(_wav_bytes(loud, 16000, fmt_tag=3, bits=32), "'clip.wav'")
    np.testing.assert_array_equal(samples, loud[:, 0])


@pytest.mark.parametrize("bits", [0, 65535])
def test_a_wav_header_saying_no_integer_sample_size_is_said_to_be_corrupt(bits):
    """A PCM WAV header saying 0-bit (or 65535-bit) samples was "in an audio codec this FFmpeg build cannot decode"
    (no build has such a codec: the header is broken); it is now a corrupt WAV file saying what the header claims."""
    data = bytearray(_wav_bytes(np.zeros((160, 1), dtype="<i2"), 16000))
    data[34:36] = struct.pack("<H", bits)  # (the fmt chunk's bits per sample)
    with pytest.raises(MediaError) as caught:
        decode_audio(bytes(data), "'clip.wav'")
    assert str(caught.value) == (f"'clip.wav' is a corrupt WAV file: its header says {bits}-bit integer samples (WAV's "
                                 "are 1 to 64 bits)")


def test_a_64_bit_integer_wav_is_read():
    """A 64-bit integer PCM WAV (FFmpeg's pcm_s64le) failed with "could not be decoded as audio: Conversion from 's64'
    format to numpy array is not supported" (PyAV's); it is read natively, full scale 2**63."""
    ints = (_sine(16000, 440.0, 0.1) * 2.0**63).astype("<i8")[:, None]
    samples, rate = decode_audio(_wav_bytes(ints, 16000, bits=64), "'clip.wav'")
    assert rate == 16000
    np.testing.assert_allclose(samples, _sine(16000, 440.0, 0.1), atol=1e-6)


def test_an_mp3_that_is_an_id3_tag_alone_is_said_to_have_no_audio_after_its_tag():
    """An MP3 holding only its ID3 tag (a cut-off download) was "not an audio file FFmpeg can read (an unknown
    format ...)", though it is a known format with nothing after the tag; it now says so. A tag followed by bytes
    that are not audio is still an unreadable file."""
    pytest.importorskip("av")
    title = b"TIT2" + struct.pack(">I", 6) + b"\x00\x00" + b"\x00Ming\x00"
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, len(title) + 8]) + title + b"\x00" * 8  # (with 8 bytes of padding)
    with pytest.raises(MediaError) as caught:
        decode_audio(tag, "'clip.mp3'")
    assert str(caught.value) == (f"'clip.mp3' is an MP3 file's ID3 tag ({len(tag)} bytes: title, artist ...) with no "
                                 "audio after it (a cut-off download, or a tag saved alone)")
    with pytest.raises(MediaError, match="not an audio file FFmpeg can read"):
        decode_audio(tag + b"this is not audio at all" * 20, "'clip.mp3'")


def test_a_decoder_failure_keeps_no_errno_or_file_name():
    av = pytest.importorskip("av")
    cut = decode_failure(av.error.EOFError(541478725, "End of file", "<none>"), "audio data", "audio")
    assert str(cut) == "audio data ends before its audio does (a cut-off file)"
    other = decode_failure(av.error.UndefinedError(-1, "Something odd", "<none>"), "audio data", "audio")
    assert str(other) == "audio data could not be decoded as audio: Something odd"
    other = decode_failure(RuntimeError("boom"), "video data", "video")
    assert str(other) == "video data could not be decoded as video: boom"


def test_too_short_audio_is_an_error():
    with pytest.raises(MediaError, match="too short"):
        prepare_audio(np.zeros(150, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match="too short"):
        prepare_audio(np.zeros(200, dtype=np.float32), 16000)  # reflect pad of 200 needs 201 samples
    assert prepare_audio(np.zeros(201, dtype=np.float32) + 0.1, 16000).n_frames == 1


def test_clip_length_is_checked_at_the_clips_own_rate_before_any_work():
    """What prepare_audio would refuse, told from the sample count and rate alone (the server checks
    clips this way before they join a conversation)."""
    check_clip_length(201, 16000)
    check_clip_length(101, 8000)  # 202 samples once resampled
    with pytest.raises(MediaError, match="too short"):
        check_clip_length(100, 8000)
    with pytest.raises(MediaError, match="too short"):
        check_clip_length(10_000, 1_000_000_000)  # resamples to one sample
    with pytest.raises(MediaError, match="cannot resample 16001 Hz"):
        check_clip_length(16001, 16001)
    with pytest.raises(MediaError, match="too short"):
        prepare_audio(np.zeros(100, dtype=np.float32) + 0.1, 8000)


def test_resample_rates_reduce_by_their_gcd_or_are_refused():
    assert check_resample_rates(48000, 16000)[:2] == (3, 1)
    with pytest.raises(MediaError, match="no useful common divisor"):
        check_resample_rates(44101, 16000)


@pytest.mark.parametrize("orig", [48000, 44100, 24000, 8000, 16000])
def test_streaming_resampler_equals_resampling_the_whole(orig):
    """A microphone's pieces of any size, resampled as they come, give the one-shot result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(orig * 3 // 2, generator=gen) * 0.3
    sizes = [1, 7, 960, 441, 4000, 13, 2048]
    stream, out, i, k = StreamingResampler(orig, 16000), [], 0, 0
    while i < x.numel():
        n = sizes[k % len(sizes)]
        out.append(stream.feed(x[i:i + n].numpy() if k % 2 else x[i:i + n]))
        i, k = i + n, k + 1
    out.append(stream.flush())
    whole = resample(x, orig, 16000)
    got = torch.from_numpy(np.concatenate(out))
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    assert stream.buffered < 2 * 441 + 200  # only a filter window is held back


@pytest.mark.parametrize("n, orig, expected", [
    (180696, 44100, 65559), (180697, 44100, 65559), (180698, 44100, 65560),  # exact ceil of 180697: 65560
    (90569, 22050, 65719), (45505, 11025, 66039), (48000, 96000, 8000),  # exact: 65720, 66040
])
def test_resampled_length_is_torchaudios_float32_ceil(n, orig, expected):
    """torchaudio's Resample (spec §5.1) keeps ceil(float32(new * n / orig)) samples: the float64
    quotient is narrowed to float32 before the ceil, so where it lies a hair above an integer the
    output is one sample shorter than the exact ceil. The resampler and the streaming one agree."""
    from engine.media.audio import resampled_length

    assert resampled_length(n, orig, 16000) == expected
    x = torch.zeros(n)
    assert resample(x, orig, 16000).shape[0] == expected
    stream = StreamingResampler(orig, 16000)
    got = sum(stream.feed(x[i:i + 30000]).size for i in range(0, n, 30000)) + stream.flush().size
    assert got == expected


def test_preprocessor_sampling_rate_does_not_move_the_whisper_front_end_off_16k():
    """The reference audio processor resamples every clip to a fixed 16 kHz (its `sampling_rate`
    key is not read by the Whisper path, spec §5.1): a preprocessor_config.json saying 8000 or
    24000 still makes 100 frames per second of audio."""
    for rate in (8000, 24000):
        cfg = AudioFrontendConfig.from_dict({"sampling_rate": rate, "whisper_frontend_args": {"n_mels": 80}})
        assert (cfg.sample_rate, cfg.n_mels) == (16000, 80)
        feats = prepare_audio(_sine(16000, 300.0, 1.0), 16000, cfg)
        assert tuple(feats.feats.shape) == (100, 80) and feats.n_tokens == 25
        assert prepare_audio(_sine(48000, 300.0, 1.0), 48000, cfg).n_frames == 100


def test_a_bfloat16_tensor_is_read_as_its_values():
    """numpy has no bfloat16: such a tensor raised TypeError ('Got unsupported ScalarType BFloat16', no
    MediaError naming the input) where float16 / float32 / float64 tensors are taken as their values."""
    x = torch.randn(2, 1600, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert torch.equal(load_audio(x, 16000), x[0].float())
    assert prepare_audio(x, 16000).n_frames == 10


@pytest.mark.parametrize("codec", ["pcm_mulaw", "pcm_alaw"])
def test_a_mu_law_or_a_law_wav_is_decoded_not_refused(codec):
    """Telephony WAVs (format tag 7 mu-law, 6 A-law) were refused ('unsupported WAV encoding (format tag
    0x7)'); the reference loads files with torchaudio (FFmpeg), which decodes them. Channel 0 is taken
    (spec §5.1) and an 8 kHz second makes 100 mel frames once resampled."""
    av = pytest.importorskip("av")
    rate = 8000
    left = _sine(rate, 300.0, 1.0)
    stereo = np.stack([left, np.full_like(left, -0.25)])
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray((stereo.T * 32767).astype(np.int16).reshape(1, -1)),
                                           format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    data = buf.getvalue()
    assert struct.unpack("<H", data[20:22])[0] in (6, 7)
    samples, got_rate = decode_audio(data)
    assert got_rate == rate and samples.shape == left.shape
    np.testing.assert_allclose(samples, left, atol=0.03)  # 8-bit companding error
    assert prepare_audio(data).n_frames == 100


def test_a_long_compressed_file_is_refused_before_it_is_decoded_whole(monkeypatch):
    """A 25 MB upload of compressed audio can hold hours: it was decoded whole (30 minutes of Opus: 87 s and 1 GB on
    a busy 2-core machine) before its length was checked. Past the limit it is refused from its container's stated
    length without decoding, and when the container states none the decode stops at the limit; a file just at the
    limit (Opus states its encoder padding too: 12.0065 s) is still decoded."""
    pytest.importorskip("av")
    from engine.media import audio
    from engine.media.errors import AudioTooLong
    from tests.server import opus_bytes

    data = opus_bytes(12.0)
    with pytest.raises(AudioTooLong, match="is too long: 12.0 s") as refused:
        decode_audio(data, "'file'", max_seconds=3.0)
    assert refused.value.seconds == pytest.approx(12.0, abs=0.1)
    samples, rate = decode_audio(data, "'file'", max_seconds=12.0)
    assert len(samples) == pytest.approx(12 * rate, abs=rate // 100)

    frames = []
    monkeypatch.setattr(audio, "stated_seconds", lambda container, stream: None)  # a stream that states no length
    monkeypatch.setattr(audio, "_frame_samples", lambda frame, mix=False, read=audio._frame_samples: frames.append(
        frame.samples) or read(frame, mix))
    with pytest.raises(AudioTooLong, match="longer than 3 s") as refused:
        decode_audio(data, "'file'", max_seconds=3.0)
    assert refused.value.seconds is None and 3 * 48000 < sum(frames) <= 3 * 48000 + max(frames), sum(frames)
