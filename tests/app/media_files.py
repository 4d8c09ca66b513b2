"""Media files the app tests make: a video with or without a sound track."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.server import tone_pcm16


def video_file(path: Path, fmt: str, vcodec: str, acodec: str | None, seconds: float = 2.0, size=(320, 240)) -> Path:
    """A video of noise frames (large for its length, as a phone's is) at 10 frames a second and, with `acodec`, a
    220 Hz tone as its sound track."""
    av = pytest.importorskip("av")

    rng, rate = np.random.default_rng(0), 16000
    with av.open(str(path), "w", format=fmt) as container:
        picture = container.add_stream(vcodec, rate=10)
        picture.width, picture.height, picture.pix_fmt = *size, "yuv420p"
        sound = container.add_stream(acodec, rate=rate, layout="mono") if acodec else None
        for _ in range(int(seconds * 10)):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "rgb24")
            for packet in picture.encode(frame):
                container.mux(packet)
        for packet in picture.encode(None):
            container.mux(packet)
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(tone_pcm16(seconds, rate, 220.0)[None], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in [*sound.encode(frame), *sound.encode(None)]:
                container.mux(packet)
    return path
