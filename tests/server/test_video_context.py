"""The rolling video context of a realtime session (engine/server/video_context.py): settings,
thinning of frame floods, bounded memory, mixed frame sizes, a camera that stops, and the video
part a turn gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.media.errors import MediaError
from engine.media.video import WebcamClip
from engine.server.video_context import VideoContext, VideoContextConfig, VideoContextError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0] = i % 256
    f[: h // 2, : w // 2, 1] = 200  # some texture
    return f


def test_settings_from_session_update():
    assert VideoContextConfig.from_wire({}) == VideoContextConfig()
    base = VideoContextConfig(window_seconds=20.0)
    assert VideoContextConfig.from_wire({"fps": 2}, base) == VideoContextConfig(window_seconds=20.0, fps=2.0)
    assert VideoContextConfig.from_wire(base.to_wire()) == base
    for spec, code, param in [({"fps": 30}, "invalid_value", "session.video.fps"),
                              ({"window_seconds": 0}, "invalid_value", "session.video.window_seconds"),
                              ({"fps": "2"}, "invalid_type", "session.video.fps"),
                              ({"max_bytes": 1}, "unknown_parameter", "session.video.max_bytes"),
                              ([1], "invalid_type", "session.video")]:
        with pytest.raises(VideoContextError) as e:
            VideoContextConfig.from_wire(spec)
        assert (e.value.code, e.value.param) == (code, param)


def test_a_30_fps_flood_is_thinned_and_only_the_window_is_kept():
    clock = Clock()
    ctx = VideoContext(VideoContextConfig(window_seconds=8.0, fps=1.0), clock=clock)
    decoded = 0
    for i in range(30 * 20):  # 20 s at 30 fps
        t = i / 30
        clock.now = 1000.0 + t
        if ctx.wants(t):  # the server decodes only the frames it will keep
            decoded += 1
            assert ctx.add(frame(i), t)
    assert decoded <= 20 * 1.25 + 1 and ctx.clip.thinned == 0  # thinned before decoding
    assert len(ctx) <= VideoContextConfig(window_seconds=8.0, fps=1.0).max_frames == 11
    span = ctx.clip.time_span
    assert span[1] - span[0] <= 8.0
    assert ctx.nbytes == len(ctx) * frame(0).nbytes
    # a client that ignores wants() is thinned all the same
    assert not ctx.add(frame(0), 20.0) and ctx.clip.thinned == 1


def test_memory_is_bounded_in_bytes_and_an_oversized_frame_is_refused():
    one = frame(0).nbytes
    ctx = VideoContext(VideoContextConfig(window_seconds=60.0, fps=2.0, max_bytes=5 * one))
    for i in range(40):
        ctx.add(frame(i), i * 0.5)
    assert len(ctx) == 5 and ctx.nbytes == 5 * one
    with pytest.raises(MediaError, match="more than the .* bytes the clip may hold"):
        ctx.add(frame(0, 480, 640), 100.0)
    ctx = VideoContext(VideoContextConfig(fps=2.0), max_frames=3)  # the server's frame limit
    for i in range(10):
        ctx.add(frame(i), i * 0.5)
    assert len(ctx) == 3


def test_frames_of_mixed_sizes_become_one_video_at_the_newest_size():
    ctx = VideoContext(VideoContextConfig(window_seconds=10.0, fps=2.0))
    for i in range(6):
        ctx.add(frame(i, 48, 64) if i < 3 else frame(i, 96, 96), i * 0.5)  # the camera turns square
    part, public = ctx.take_turn_video()
    video = part["video"].to_video_inputs()  # what the engine makes of the turn's compact clip
    assert part["type"] == "video" and public == {"type": "input_video", "frames": 6, "seconds": 2.5}
    n, _, height, width = video.frames.shape
    assert n % 2 == 0 and height == width  # every frame at the newest (square) frame's aspect
    assert video.num_tokens > 0 and len(video.patch_timestamps) == video.grid_thw.shape[0]


@pytest.mark.parametrize("times, fps", [([0.0, 1.0, 2.1, 2.9, 4.0, 5.2, 6.0, 7.1], 1.0), ([0.0, 5.0], 1.0),
                                        ([0.0, 0.9, 4.0, 4.8], 1.0), ([0.0, 2.0, 4.0, 6.0, 8.0], 0.5),
                                        ([0.0, 4.1, 7.9, 12.0], 0.25)])
def test_a_turn_keeps_compact_uint8_frames_that_make_the_same_video_input(times, fps):
    """The turn's part holds the picked frames as uint8 (not float pixel values, 4x the bytes) and
    turns into exactly the video input the whole window gives (sparse frames too, and a camera slower
    than 1 fps, whose measured rate is not clamped up to a decoder's 1 fps)."""
    ctx = VideoContext(VideoContextConfig(window_seconds=15.0, fps=fps))
    for i, t in enumerate(times):
        ctx.add(frame(i * 40, 96, 128) if i else frame(0, 48, 64), t)  # the first frame differs in size
    whole = WebcamClip(sampling=ctx.clip.sampling)
    for t, f in list(ctx.clip._frames):
        whole.add_frame(f, t)
    expected = whole.to_video_inputs()
    part, _ = ctx.take_turn_video()
    compact = part["video"]
    assert isinstance(compact, WebcamClip) and len(compact) <= len(times)
    got = compact.to_video_inputs()
    assert torch.equal(got.pixel_values, expected.pixel_values) and torch.equal(got.grid_thw, expected.grid_thw)
    assert got.patch_timestamps == expected.patch_timestamps
    assert compact.nbytes < expected.pixel_values.numel() * 4 / 3  # uint8 frames, not float32 pixel values


def test_a_turn_takes_the_frames_once_and_a_stopped_camera_ages_out():
    clock = Clock()
    ctx = VideoContext(VideoContextConfig(window_seconds=5.0, fps=1.0), clock=clock)
    for i in range(6):
        clock.now = 1000.0 + i
        ctx.add(frame(i), 50.0 + i)  # the client's clock differs from the server's
    clock.now = 1005.0 + 3.0  # three seconds after the last frame: only the last two seconds remain
    part, public = ctx.take_turn_video()
    assert public["frames"] == 3 and public["seconds"] == 2.0
    assert ctx.take_turn_video() is None  # consumed
    clock.now += 1.0
    ctx.add(frame(9), 60.0)
    clock.now += 5.0 + 0.5  # the camera stopped: its last frame is older than the window
    assert ctx.take_turn_video() is None and len(ctx) == 0
