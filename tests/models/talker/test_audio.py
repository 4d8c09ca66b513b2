"""Silence holder, reference-clip checks and WAV headers (read back)."""

import wave

import numpy as np
import pytest
import torch

from engine.media.errors import MediaError
from engine.models.talker.audio import SilenceHolder, WavWriter, check_reference, read_wav_header, wav_bytes


def test_wav_header_states_the_true_rate(tmp_path):
    data = wav_bytes(np.zeros(441, np.float32), 44100)
    h = read_wav_header(data)
    assert (h["riff"], h["wave"], h["format"], h["channels"], h["sample_rate"], h["bits"]) == (b"RIFF", b"WAVE", 1, 1, 44100, 16)
    assert h["byte_rate"] == 88200 and h["data_len"] == 882 and h["riff_size"] == len(data) - 8
    path = tmp_path / "x.wav"
    with WavWriter(path, 44100) as w:
        w.write(b"\x01\x00" * 1000)
        w.write(b"\x02\x00" * 500)
    with wave.open(str(path)) as r:
        assert (r.getframerate(), r.getnchannels(), r.getsampwidth(), r.getnframes()) == (44100, 1, 2, 1500)


def test_silence_holder_holds_trailing_silence_until_sound_follows():
    rate = 1000  # 0.1 s frames of 100 samples
    h = SilenceHolder(rate)
    loud, quiet = np.full(100, 0.5, np.float32), np.zeros(100, np.float32)
    assert len(h.push(np.concatenate([loud, quiet, quiet]))) == 100  # silence held back
    assert len(h.push(loud)) == 300  # released when sound follows
    out = h.push(np.concatenate([quiet] * 6), last=True)
    assert len(out) == 300  # at most 0.3 s of trailing silence at the end


@pytest.mark.parametrize("seconds, level, message", [(0.1, 0.3, "too short"), (40, 0.3, "too long"),
                                                     (2, 0.0, "silent")])
def test_reference_checks(seconds, level, message):
    wav = torch.full((int(16000 * seconds),), level)
    with pytest.raises(MediaError, match=message):
        check_reference(wav, 16000)
