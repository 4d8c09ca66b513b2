"""The 2.0 video path against the spec's §4.2 / §6.2 written out plainly here (sharing no code with the engine):
the frame count n = max(1, min(170, floor(N / fps * min(2, fps) + 0.5))), frames at numpy's linspace of
[0, N - 1] truncated, frame i at i / fps_s with fps_s = n / N * fps, an odd count's last frame repeated with its
timestamp, the per-video pixel budget max(96*128*32^2 * 2 / n, floor(1.05 * 128*32^2)), OpenCV cubic
resizing, one t = 1 grid row per frame pair at the pair's mean time, and the interleaved prompt text.
Clips the fixtures never use: one frame, two, three, seven (odd), 24 / 240 fps sources and a clip long enough
for the 170-frame cap."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engine.media.image import ImageProcessorConfig
from engine.media.video import VideoSamplingConfig, fetch_video, prepare_video, sample_count, video_prompt_text
from tests.media.reference_image import spec_normalise, spec_pixel_values, spec_smart_resize

MAX_FRAMES = (3072 * 2 * 4) // 144  # MAX_FRAMES_OS
MIN_PIXELS = 128 * 32 * 32
TOTAL_PIXELS = 96 * 128 * 32 * 32
HEIGHT, WIDTH = 32, 48
LEVEL_STEP = 16  # each half of a frame holds one digit of its index, 16 grey levels apart (a lossy codec moves a few)


def spec_frame_count(n_src: int, src_fps: float) -> int:
    return max(1, min(MAX_FRAMES, math.floor(n_src / src_fps * min(2.0, src_fps) + 0.5)))


def spec_sampling(n_src: int, src_fps: float) -> tuple[list[int], list[float]]:
    """The sampled frames' indices and timestamps (§4.2 steps 2-3, before the odd-count repeat)."""
    n = spec_frame_count(n_src, src_fps)
    # "integer linspace": numpy's float linspace truncated, as the reference's sampler takes it; where
    # k (N-1) / (n-1) is a whole number the float can fall just below it (89961 frames, n 170: frame 6919 for
    # k = 13, not 6920)
    indices = [int(i) for i in np.linspace(0, n_src - 1, n)]
    fps_s = n / n_src * src_fps
    return indices, [i / fps_s for i in range(n)]


def repeat_last_if_odd(items: list) -> list:
    return items + items[-1:] if len(items) % 2 else items


def spec_prompt(pair_stamps: list[float], tokens_per_frame: int) -> str:
    frames = "".join(f"<{ts:.1f} seconds><image>" + "<framePatch>" * tokens_per_frame + "</image>"
                     for ts in pair_stamps)
    return "<video>" + frames + "</video>"


def _write_clip(path, n_frames: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        frame[:, :WIDTH // 2] = (i % 16) * LEVEL_STEP
        frame[:, WIDTH // 2:] = (i // 16) * LEVEL_STEP
        writer.write(frame)
    writer.release()


def _frame_index(frame: np.ndarray) -> int:
    low = round(float(frame[:, :WIDTH // 2].mean()) / LEVEL_STEP)
    high = round(float(frame[:, WIDTH // 2:].mean()) / LEVEL_STEP)
    return high * 16 + low


CLIPS = {"one_frame": (1, 30.0), "two_frames_1fps": (2, 1.0), "three_frames_2fps": (3, 2.0),
         "seven_frames_3fps": (7, 3.0), "45_frames_24fps": (45, 24.0), "8_frames_240fps": (8, 240.0),
         "long_181_frames_2fps": (181, 2.0)}


def _spec_clip(tmp_path, n_src: int, fps: float):
    """A clip of `n_src` numbered frames at `fps` written to disk, and the (frame indices, timestamps) the spec
    samples from it."""
    path = tmp_path / "clip.mp4"
    _write_clip(path, n_src, fps)
    return path, spec_sampling(n_src, fps)


@pytest.mark.parametrize("n_src,fps", CLIPS.values(), ids=CLIPS.keys())
def test_sampled_frames_and_timestamps_follow_the_spec(tmp_path, n_src, fps):
    path, (indices, stamps) = _spec_clip(tmp_path, n_src, fps)
    video = fetch_video(path)
    assert [_frame_index(f) for f in video.frames] == indices
    np.testing.assert_allclose(video.timestamps, stamps, rtol=0, atol=1e-9)
    assert len(indices) == (MAX_FRAMES if n_src / fps * min(2.0, fps) > MAX_FRAMES else len(indices))


SHORT = {k: v for k, v in CLIPS.items() if v[0] <= 8}


@pytest.mark.parametrize("n_src,fps", SHORT.values(), ids=SHORT.keys())
def test_short_clips_pixel_values_grid_and_prompt_follow_the_spec(tmp_path, n_src, fps):
    path, (indices, stamps) = _spec_clip(tmp_path, n_src, fps)
    stamps = repeat_last_if_odd(stamps)
    decoded = fetch_video(path).frames  # the decoder is not the spec's business: its frames at their own size
    frames = np.stack(repeat_last_if_odd(list(decoded)))
    budget = max(TOTAL_PIXELS * 2 / len(indices), math.floor(1.05 * MIN_PIXELS))  # n before the repeat
    h, w = spec_smart_resize(HEIGHT, WIDTH, 32, MIN_PIXELS, budget, clamp_round=True, clamp_shrink=False)
    resized = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in frames])
    rows = [spec_pixel_values(np.stack([spec_normalise(f) for f in resized[g:g + 2]]), 16, 2, 2)[0]
            for g in range(0, len(resized), 2)]
    pair_stamps = [(stamps[g] + stamps[g + 1]) / 2 for g in range(0, len(stamps), 2)]

    ours = prepare_video(path, ImageProcessorConfig())
    assert ours.grid_thw.tolist() == [[1, h // 16, w // 16]] * (len(frames) // 2)
    np.testing.assert_allclose(ours.pixel_values.numpy(), np.concatenate(rows),
                               atol=1e-6, rtol=0)  # the same OpenCV call on the same frames
    assert ours.patch_timestamps == pytest.approx(pair_stamps, abs=1e-9)
    assert video_prompt_text(ours.patch_timestamps, ours.grid_thw, 2) == spec_prompt(pair_stamps, h * w // 1024)


def test_frame_counts_and_rates_follow_the_spec_for_clips_of_every_length():
    """The sampler's frame count and rate (no decoding) for 2,000 clips from one frame to an hour, at 1-240 fps."""
    rng = np.random.default_rng(0)
    rates = [1.0, 2.0, 23.976, 25.0, 29.97, 30.0, 59.94, 120.0, 240.0]
    config = VideoSamplingConfig()
    for _ in range(2000):
        n_src, fps = int(rng.integers(1, 864_000)), float(rng.choice(rates + [rng.uniform(1, 240)]))
        n, fps_s = sample_count(n_src, fps, config)
        assert n == spec_frame_count(n_src, fps) and fps_s == pytest.approx(n / n_src * fps, rel=1e-12), (n_src, fps)
