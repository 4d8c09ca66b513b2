"""The example media in app/assets (written by scripts/make_assets.py): all there, small, and in
the formats their users need (16 kHz mono PCM16 speech, Chromium's Y4M and WAV fake capture)."""

from __future__ import annotations

import wave

from scripts.make_assets import Y4M_FPS, Y4M_FRAMES, Y4M_SIZE
from tests.paths import REPO

ASSETS = REPO / "app/assets"
EXPECTED = ["speech/what_do_you_see_en.wav", "speech/describe_picture_en.wav", "speech/what_is_this_zh.wav",
            "audio/music_tones.wav", "images/cup.png", "images/shapes.png", "images/sign.png",
            "video/cup_on_table.mp4", "fake_capture/mic.wav", "fake_capture/webcam.y4m"]


def test_the_assets_are_all_there_and_small():
    sizes = {name: (ASSETS / name).stat().st_size for name in EXPECTED}
    assert sum(sizes.values()) < 2 * 1024 * 1024


def test_speech_and_audio_are_16_khz_mono_pcm16():
    for name in EXPECTED:
        if name.endswith(".wav"):
            with wave.open(str(ASSETS / name)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), name
                assert 1.0 < w.getnframes() / 16000 < 8.0, name


def test_the_fake_camera_file_is_i420_y4m():
    data = (ASSETS / "fake_capture/webcam.y4m").read_bytes()
    header, _, rest = data.partition(b"\n")
    w, h = Y4M_SIZE
    assert header == f"YUV4MPEG2 W{w} H{h} F{Y4M_FPS}:1 Ip A1:1 C420jpeg".encode()
    frame = len(b"FRAME\n") + w * h * 3 // 2
    assert len(rest) == Y4M_FRAMES * frame and rest[:6] == b"FRAME\n"
