"""Video front end: sampling rule, padding, per-video budget, file decoding, prompt text, webcam."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.media import MediaError
from engine.media.image import ImageProcessorConfig, resize_bicubic
from engine.media.video import (
    VideoFrames,
    VideoOptions,
    VideoSamplingConfig,
    WebcamClip,
    fetch_video,
    frames_from_directory,
    prepare_video,
    preprocess_video,
    resize_frames,
    sample_count,
    video_prompt_text,
)


def _frame(value: int, h: int = 64, w: int = 96) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _textured(seed: int, h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- prompt text


def test_timestamps_use_python_round_half_even_text():
    grid = [[1, 4, 6]] * 3
    text = video_prompt_text([0.25, 1.25, 2.25], grid)
    assert text.startswith("<video><0.2 seconds><image>")
    assert "<1.2 seconds>" in text and "<2.2 seconds>" in text
    assert text.count("<framePatch>") == 18 and text.endswith("</image></video>")
    assert video_prompt_text([0.75], [[1, 2, 2]]) == "<video><0.8 seconds><image><framePatch></image></video>"


def test_preview_layout_has_no_timestamps():
    assert video_prompt_text([], [[3, 4, 4]], interleaved=False) == "<video>" + "<framePatch>" * 12 + "</video>\n"


# --------------------------------------------------------------------------- sampling rule


def test_sample_count_rule():
    cfg = VideoSamplingConfig()
    assert sample_count(300, 30.0, cfg) == (20, 2.0)           # 10 s at 30 fps -> 2 fps
    assert sample_count(10, 1.0, cfg) == (10, 1.0)             # slower than 2 fps: keep the source rate
    assert sample_count(3600, 30.0, cfg)[0] == 170             # 120 s capped at MAX_FRAMES_OS
    assert sample_count(1, 30.0, cfg) == (1, 30.0)             # a single frame
    n, fps_s = sample_count(100, 29.97, cfg)                   # floor(100/29.97*2 + 0.5) = 7
    assert n == 7 and fps_s == pytest.approx(7 / 100 * 29.97)


def test_odd_frame_lists_repeat_the_last_frame_and_timestamp():
    frames = [_textured(i) for i in range(5)]
    video = prepare_video(frames, min_pixels=4096)
    assert video.frame_timestamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert np.array_equal(video.frames[5].numpy(), video.frames[4].numpy())
    assert video.patch_timestamps == [0.25, 1.25, 2.0]
    assert video.grid_thw.tolist() == [[1, 4, 6]] * 3
    assert video.num_tokens == 18
    assert tuple(video.pixel_values.shape) == (72, 1536)


def test_frame_directory_is_read_in_sorted_name_order(tmp_path):
    """The reference lists a frame directory with sorted(os.listdir): names compare as strings."""
    for i in (0, 1, 2, 10, 11):
        Image.fromarray(_frame(i * 10)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = frames_from_directory(tmp_path)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 10, 100, 110, 20]


@pytest.mark.parametrize("fmt, ext", [("PPM", ".ppm"), ("JPEG", ".jfif"), ("TGA", ".tga"), ("PNG", ".PNG")])
def test_frame_directory_takes_every_image_format_pillow_reads(tmp_path, fmt, ext):
    """The reference opens every file of a frame directory with PIL; frames saved as .ppm, .jfif or .tga
    were left out here ("contains no image files"), so the same directory gave no video or fewer frames."""
    for i in range(4):
        Image.fromarray(_frame(i * 40)).save(tmp_path / f"f{i}{ext}", fmt)
    frames = frames_from_directory(tmp_path)
    assert [round(float(f.mean()) / 40) for f in frames] == [0, 1, 2, 3]


def test_frame_list_keeps_every_frame_and_max_frames_only_sets_the_budget():
    """v1_fetch_video's list branch stacks every frame; max_frames (floored to even) only sets the
    frame count n in the budget max(total_pixels / n * 2, 1.05 * min_pixels)."""
    frames = [_textured(i, 128, 192) for i in range(6)]
    budget = {"min_pixels": 1024, "total_pixels": 128 * 192 * 2}
    whole = prepare_video(frames, **budget)  # n = 6: max 16384 px -> 96x128
    assert tuple(whole.frames.shape) == (6, 3, 96, 128)
    capped = prepare_video(frames, max_frames=4, **budget)  # n = 4: max 24576 px keeps 128x192
    assert tuple(capped.frames.shape) == (6, 3, 128, 192)
    assert capped.frame_timestamps.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert tuple(prepare_video(frames, max_frames=5, **budget).frames.shape) == (6, 3, 128, 192)  # 5 -> 4
    assert tuple(prepare_video(frames, nframes=4, **budget).frames.shape) == (6, 3, 128, 192)


@pytest.mark.parametrize("fps, stamps, labels", [
    (1.0, [0.0, 1.0, 2.0, 3.0, 4.0, 4.0], ["<0.5 seconds>", "<2.5 seconds>", "<4.0 seconds>"]),
    (4.0, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], ["<0.1 seconds>", "<0.6 seconds>", "<1.0 seconds>"]),
])
def test_frame_list_timestamps_follow_max_video_fps(fps, stamps, labels):
    """Frame i of a list is at i / max_video_fps; an odd count repeats the last frame and its
    timestamp; each temporal patch shows its pair's mean with Python's .1f."""
    frames = [_textured(i) for i in range(5)]
    video = prepare_video(frames, min_pixels=4096, max_video_fps=fps)
    assert video.frames.shape[0] == 6 and np.array_equal(video.frames[5].numpy(), video.frames[4].numpy())
    assert video.frame_timestamps.tolist() == stamps
    text = video.prompt_text()
    assert [text.index(label) for label in labels] == sorted(text.index(label) for label in labels)
    assert text.count("seconds><image>") == 3


@pytest.mark.parametrize("options, message", [
    ({"fps": 1.0, "nframes": 4}, "either fps or nframes"),
    ({"sample": "every_other"}, "sampling method"),
    ({"max_frames": 1}, r"must lie in \[2, 6\]"),
    ({"nframes": 1}, r"must lie in \[2, 6\]"),
])
def test_frame_list_options_the_reference_refuses(options, message):
    with pytest.raises(MediaError, match=message):
        prepare_video([_textured(i) for i in range(6)], min_pixels=4096, **options)


def test_a_single_frame_is_not_a_video():
    with pytest.raises(MediaError, match=r"must lie in \[2, 1\]"):
        prepare_video([_textured(0)], min_pixels=4096)


def test_video_options_from_a_message():
    element = {"type": "video", "video": "clip_dir", "max_video_fps": 1.0, "min_pixels": 4096, "max_pixels": 1}
    assert VideoOptions.from_message(element) == VideoOptions(max_video_fps=1.0, min_pixels=4096)
    assert VideoOptions.from_message(element, strict=True).resize_overrides == {"min_pixels": 4096}
    with pytest.raises(MediaError, match="'speed'"):
        VideoOptions.from_message({**element, "speed": 2}, strict=True)
    assert VideoOptions.from_message({**element, "speed": 2}) == VideoOptions(max_video_fps=1.0, min_pixels=4096)


def test_per_video_pixel_budget_shrinks_long_videos():
    cfg = VideoSamplingConfig()
    lo, hi = cfg.frame_budget(170)
    assert lo == 131072 and hi == pytest.approx(96 * 128 * 1024 * 2 / 170)
    assert cfg.frame_budget(2000)[1] == int(1.05 * 131072)  # floor of the budget
    frames = np.zeros((2, 1080, 1920, 3), dtype=np.uint8)
    assert resize_frames(frames, 170, cfg).shape == (2, 288, 512, 3)
    assert resize_frames(frames, 2, cfg).shape == (2, 1088, 1920, 3)


def test_resized_height_and_width_use_the_image_bounds():
    """A message's resized_height x resized_width is smart-resized with the video module's image
    bounds (4*32*32 .. 16384*32*32), not the per-video budget (whose 128*32*32 floor made 64x96
    into 320x448)."""
    frames = [_textured(i, 100, 150) for i in range(4)]
    assert tuple(prepare_video(frames, resized_height=64, resized_width=96).frames.shape) == (4, 3, 64, 96)
    assert tuple(prepare_video(frames, resized_height=50, resized_width=70).frames.shape) == (4, 3, 64, 64)
    assert tuple(prepare_video(frames, resized_height=20, resized_width=20).frames.shape) == (4, 3, 64, 64)


def test_resize_uses_opencv_inter_cubic():
    frames = np.stack([_textured(1, 70, 100), _textured(2, 70, 100)])
    out = resize_frames(frames, 2, VideoSamplingConfig(), min_pixels=4096)
    assert out.shape == (2, 64, 96, 3)
    assert np.array_equal(out[0], cv2.resize(frames[0], (96, 64), interpolation=cv2.INTER_CUBIC))


# --------------------------------------------------------------------------- video files


def _write_video(path, n_frames: int, fps: int, h: int = 64, w: int = 96) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for i in range(n_frames):
        writer.write(_frame(i * 8, h, w))  # grey level encodes the frame index
    writer.release()


@pytest.mark.parametrize("backend", ["cv2", "av"])
@pytest.mark.parametrize("n_frames, fps", [(30, 10), (29, 10)])
def test_video_file_sampling(tmp_path, backend, n_frames, fps):
    """The 2.0 sampler (bailingmm_utils_video.v2_sample_video) takes np.linspace(0, N - 1, n, dtype=int):
    indices truncated, not rounded (30 frames: 0, 5, 11, 17, 23, 29, never frame 6 or 12)."""
    if backend == "av":
        pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    _write_video(path, n_frames, fps)  # 3 s (2.9 s) at 10 fps -> 6 frames at 2 fps
    video = fetch_video(path, backend=backend)
    n = max(1, min(170, int(n_frames / fps * min(2.0, fps) + 0.5)))
    assert len(video.frames) == n == 6
    assert np.allclose(video.timestamps, [i * n_frames / (n * fps) for i in range(n)])
    expected = [k * (n_frames - 1) // (n - 1) for k in range(n)]  # exact floor of linspace(0, N - 1, n)
    assert expected != [round(k * (n_frames - 1) / (n - 1)) for k in range(n)]
    assert [round(float(f.mean()) / 8) for f in video.frames] == expected  # grey level 8 i: frame i (lossy codec)
    inputs = prepare_video(path, backend=backend)  # default min_pixels 128*32*32 enlarges 64x96
    assert inputs.grid_thw.shape[0] == 3
    assert inputs.frames.shape[2] * inputs.frames.shape[3] >= 128 * 32 * 32


def test_video_bytes_decode_like_the_file(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    _write_video(path, 20, 10)
    a = fetch_video(path)
    b = fetch_video(path.read_bytes())
    assert np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", "empty"),
        (b"definitely not a video" * 10, "is not a video file FFmpeg can read|could not be opened|no frames"),
        ("/nonexistent/movie.mp4", "not found"),
        ([], "no frames"),
        (42, "unsupported video input"),
    ],
)
def test_video_errors_name_the_problem(source, message):
    with pytest.raises(MediaError, match=message):
        prepare_video(source)


def _write_textured_video(path, n_frames: int, fps: int, h: int, w: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for i in range(n_frames):
        writer.write(cv2.resize(_textured(i, h // 8, w // 8), (w, h), interpolation=cv2.INTER_NEAREST))
    writer.release()


@pytest.mark.parametrize("backend", ["cv2", "av"])
def test_video_frames_are_resized_as_they_are_decoded_with_the_same_pixels(tmp_path, backend):
    """A 2.2 MB 1000x1000 mp4 took 990 MiB: up to 170 sampled frames were held at full size, twice.
    Each frame is now brought to the model's size as it is decoded: exactly what resizing the
    full-size frames afterwards gives (the same cv2 INTER_CUBIC call on the same frame)."""
    if backend == "av":
        pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    _write_textured_video(path, 7, 2, 256, 384)  # 7 frames: padded to 8
    overrides = {"min_pixels": 4096, "total_pixels": 96 * 64 * 7 // 2}  # n = 7: at most 96*64 per frame
    afterwards = preprocess_video(fetch_video(path, backend=backend), **overrides)
    frames = fetch_video(path, backend=backend, resize=overrides)
    assert frames.frames.shape == (7, 64, 96, 3) and frames.source_size == (256, 384)
    inputs = prepare_video(path, backend=backend, **overrides)
    assert torch.equal(inputs.frames, afterwards.frames)
    assert torch.equal(inputs.pixel_values, afterwards.pixel_values)
    assert inputs.grid_thw.tolist() == afterwards.grid_thw.tolist() == [[1, 4, 6]] * 4
    listed = [np.asarray(f) for f in fetch_video(path, backend=backend).frames]
    assert torch.equal(prepare_video(listed, **overrides).pixel_values,
                       preprocess_video(fetch_video(listed), **overrides).pixel_values)
    capped = VideoOptions(max_frames=4, max_video_fps=1.0, **overrides)  # a list's budget divides by 4, not 7
    resized = fetch_video(listed, options=capped, resize=capped.resize_overrides)
    assert resized.budget_frames == 4 and resized.source_size == (256, 384)
    assert torch.equal(prepare_video(listed, options=capped).pixel_values,
                       preprocess_video(fetch_video(listed, options=capped), **capped.resize_overrides).pixel_values)


def test_decoding_a_large_video_never_holds_its_frames_at_full_size(tmp_path):
    """Peak memory of prepare_video is bounded by what the model takes, not by the video's size."""
    import tracemalloc

    pytest.importorskip("av")
    path = tmp_path / "big.mp4"
    _write_textured_video(path, 40, 2, 640, 640)  # 40 sampled frames of 1.2 MB
    full_frame = 640 * 640 * 3
    tracemalloc.start()
    try:
        inputs = prepare_video(path.read_bytes(), min_pixels=4096, total_pixels=128 * 128 * 40 // 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inputs.frames.shape == (40, 3, 128, 128)
    held = inputs.pixel_values.numel() * 4 + 3 * inputs.frames.numel()  # the output, the frames thrice
    assert peak < held + 4 * full_frame, (peak, held)  # it was 80 full frames and more


def test_probe_gives_the_decoded_size_without_decoding(tmp_path):
    from engine.media.video import probe_video_file

    path = tmp_path / "clip.mp4"
    _write_textured_video(path, 7, 2, 256, 384)
    plan = probe_video_file(path.read_bytes())
    assert (plan.n, plan.source_size) == (7, (256, 384))
    inputs = prepare_video(path, min_pixels=4096, total_pixels=96 * 64 * 7 // 2)
    n, _, h, w = inputs.frames.shape
    assert plan.decoded_shape(min_pixels=4096, total_pixels=96 * 64 * 7 // 2) == (n, h, w) == (8, 64, 96)
    assert plan.decoded_shape() == (8, 320, 448)  # the default budget enlarges it to min_pixels


@pytest.mark.parametrize("odd", [3, 1])
def test_a_frame_of_another_size_is_brought_to_the_video_s_size_as_the_reference_does(tmp_path, odd):
    """v1_fetch_video's list branch: the size most common among the sampled frames wins, a sampled frame
    of another size is resized to it with PIL bicubic (torchvision's resize of a PIL image), and the
    per-video target comes from the SECOND frame's own size (video[1]); then cv2 INTER_CUBIC. Such a
    list was refused. Re-derived here with PIL (in Pillow 13's pass order, `resize_bicubic`) and OpenCV."""
    frames = [_textured(i, 64, 96) for i in range(6)]
    frames[odd] = _textured(9, 50, 40)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:02d}.png")
    fixed = [f if f.shape[:2] == (64, 96) else np.asarray(resize_bicubic(Image.fromarray(f), 96, 64)) for f in frames]
    h1, w1 = frames[1].shape[:2]
    lo = 4096
    hi = max(96 * 128 * 32 * 32 / 6 * 2, int(lo * 1.05))
    hb, wb = max(32, round(h1 / 32) * 32), max(32, round(w1 / 32) * 32)
    if hb * wb < lo:
        beta = math.sqrt(lo / (h1 * w1))
        hb, wb = math.ceil(h1 * beta / 32) * 32, math.ceil(w1 * beta / 32) * 32
    assert hb * wb <= hi
    expected = np.stack([cv2.resize(f, (wb, hb), interpolation=cv2.INTER_CUBIC) for f in fixed])
    for source in (tmp_path, frames):
        video = prepare_video(source, min_pixels=lo)
        assert video.frames.shape == (6, 3, hb, wb)
        assert np.abs(video.frames.numpy().transpose(0, 2, 3, 1).astype(int) - expected).max() <= 1


def test_a_preview_frame_list_with_a_frame_of_another_size_follows_the_same_rule():
    """The Preview's fetch_video list branch has the same rule (major size among sample_frames' picks, PIL
    bicubic, target from video[1]); then its bilinear float resize (factor 28)."""
    from engine.media.video import prepare_video_preview

    frames = [_textured(i, 56, 84) for i in range(4)]
    frames[1] = _textured(9, 70, 30)
    fixed = [f if f.shape[:2] == (56, 84) else np.asarray(resize_bicubic(Image.fromarray(f), 84, 56)) for f in frames]
    # target from frame 1's 70x30: smart resize, factor 28, min 128*28*28 -> up to 448x196
    beta = math.sqrt(128 * 28 * 28 / (70 * 30))
    hb, wb = math.ceil(70 * beta / 28) * 28, math.ceil(30 * beta / 28) * 28
    expected = torch.nn.functional.interpolate(torch.from_numpy(np.stack(fixed)).permute(0, 3, 1, 2).float(),
                                               size=(hb, wb), mode="bilinear", align_corners=False, antialias=True)
    video = prepare_video_preview(frames)
    assert tuple(video.frames.shape) == (4, 3, hb, wb)
    assert torch.allclose(video.frames, expected, atol=1.0)


def test_a_frame_of_another_size_the_sampler_skips_is_refused():
    """The reference stacks every frame but only brings the sampled ones to the common size: max_frames 2
    samples frames 0 and 3 of 4, so an odd frame 1 cannot be stacked (refused there as here)."""
    with pytest.raises(MediaError, match="same size"):
        fetch_video([_frame(0), _frame(0, 32, 32), _frame(0), _frame(0)], options=VideoOptions(max_frames=2))


def test_a_frame_in_a_format_the_decoder_does_not_read_is_refused_naming_the_formats_it_does():
    """A PCX frame was sized by Pillow (which reads it) and refused for its size, though the decoder reads none: the
    frames are sized as the decoder opens them (engine.errors.IMAGE_FORMATS), and the refusal names that list."""
    import io

    from engine.errors import image_formats_named
    buf = io.BytesIO()
    Image.fromarray(_frame(0, 32, 32)).save(buf, "PCX")
    with pytest.raises(MediaError) as info:
        fetch_video([_frame(0), buf.getvalue(), _frame(0), _frame(0)], options=VideoOptions(max_frames=2))
    assert image_formats_named() in str(info.value), info.value


# --------------------------------------------------------------------------- webcam


def test_webcam_clip_samples_capture_times_like_a_video():
    clip = WebcamClip()
    for i in range(90):  # 3 s at 30 fps, capture times with a start offset and jitter
        clip.add_frame(_textured(i, 48, 64), 100.0 + i / 30 + (0.004 if i % 2 else 0.0))
    sampled = clip.sample()
    src_fps = 89 / ((100.0 + 89 / 30 + 0.004) - 100.0)  # the window's mean rate
    assert len(sampled.frames) == int(np.floor(90 / src_fps * 2 + 0.5)) == 6
    assert [i for i in range(90) for f in sampled.frames if np.array_equal(f, _textured(i, 48, 64))] == \
        [0, 17, 35, 53, 71, 89]  # truncated linspace(0, 89, 6)
    times = np.array([i / 30 + (0.004 if i % 2 else 0.0) for i in (0, 17, 35, 53, 71, 89)])
    np.testing.assert_allclose(sampled.timestamps, times, atol=1e-9)  # their capture times
    inputs = clip.to_video_inputs(min_pixels=4096)
    reference = preprocess_video(sampled, ImageProcessorConfig(), VideoSamplingConfig(), min_pixels=4096)
    assert np.array_equal(inputs.pixel_values.numpy(), reference.pixel_values.numpy())
    assert inputs.grid_thw.tolist() == [[1, 4, 4]] * 3  # 48x64 -> 64x64 (1.5 rounds to 2)
    # the same frames given as an uploaded frame list produce the same pixels
    as_list = prepare_video(list(sampled.frames), min_pixels=4096)
    assert np.array_equal(inputs.pixel_values.numpy(), as_list.pixel_values.numpy())


def test_webcam_clip_window_and_history():
    clip = WebcamClip(history_seconds=5.0)
    for i in range(80):  # 10 s at 8 fps (exact binary times)
        clip.add_frame(_frame(i), i / 8)
    assert clip.time_span == (4.875, 9.875)  # older frames fell out of the 5 s history
    window = clip.sample(window_seconds=2.0)
    assert len(window.frames) == 4  # 17 frames at 8 fps -> floor(17 / 8 * 2 + 0.5)
    # truncated linspace(0, 16, 4) = [0, 5, 10, 16] of frames 63..79, at their capture times
    assert [int(f[0, 0, 0]) for f in window.frames] == [63, 68, 73, 79]
    assert window.timestamps.tolist() == [0.0, 0.625, 1.25, 2.0]


@pytest.mark.parametrize("rate, n_frames, fps", [(30.0, 301, 2.0), (8.0, 17, 2.0), (2.0, 21, 2.0), (1.0, 10, 2.0),
                                                  (0.5, 6, 1.0), (0.5, 5, 0.5), (0.25, 4, 0.25), (3.0, 7, 1.0),
                                                  (24.0, 5, 2.0)])
def test_webcam_window_is_sampled_as_the_spec_samples_a_clip_at_its_rate(rate, n_frames, fps):
    """Spec §4.2 re-derived for a live window of N frames captured every 1 / rate s: smp_fps = min(fps, rate),
    n = max(1, min(170, floor(N / rate * smp_fps + 0.5))), indices = linspace(0, N - 1, n) truncated, each frame
    at its capture time (a live rate is measured, not clamped to a decoder's [1, 240]: a 0.5 fps camera keeps
    its 8 s). A camera slower than the sampling rate gave every frame about twice (n = floor(span * fps + 0.5)
    sample times, each taking the nearest frame): a 1 fps camera sampled at 2 fps sent 18 frames for 10."""
    clip = WebcamClip(sampling=VideoSamplingConfig(fps=fps))
    for i in range(n_frames):
        clip.add_frame(_frame(i % 256, 8, 8), 50.0 + i / rate)
    sampled = clip.sample()
    n = max(1, min(170, math.floor(n_frames / rate * min(fps, rate) + 0.5)))
    indices = np.linspace(0, n_frames - 1, n).astype(int)
    assert [int(f[0, 0, 0]) for f in sampled.frames] == [i % 256 for i in indices]
    assert len(set(indices.tolist())) == n  # no frame twice
    np.testing.assert_allclose(sampled.timestamps, indices / rate, atol=1e-9)


def test_webcam_clip_errors():
    clip = WebcamClip()
    with pytest.raises(MediaError, match="no webcam frames"):
        clip.sample()
    with pytest.raises(MediaError, match="HxWx3 uint8"):
        clip.add_frame(np.zeros((4, 4), dtype=np.uint8), 0.0)
    clip.add_frame(_frame(0), 1.0)
    with pytest.raises(MediaError, match="backwards"):
        clip.add_frame(_frame(0), 0.5)
    single = clip.to_video_inputs(min_pixels=4096)
    assert single.grid_thw.tolist() == [[1, 4, 6]]  # one frame, duplicated to a temporal pair
    assert isinstance(clip.sample(), VideoFrames)


def test_a_frame_directory_is_read_one_frame_at_a_time(tmp_path):
    """A directory of 120 1600x1200 JPEGs took +800 MiB: every file was read at full size before
    any was resized. Each is now read and brought to the model's size in turn (+411 MiB), with the
    same pixels as resizing the full-size frames afterwards."""
    import tracemalloc

    for i in range(24):
        Image.fromarray(_textured(i, 320, 320)).save(tmp_path / f"f{i:03d}.png")
    overrides = {"min_pixels": 4096, "total_pixels": 64 * 64 * 24 // 2}
    full_frame = 320 * 320 * 3
    tracemalloc.start()
    try:
        inputs = prepare_video(tmp_path, **overrides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inputs.frames.shape == (24, 3, 64, 64)
    held = inputs.pixel_values.numel() * 4 + 3 * inputs.frames.numel()
    assert peak < held + 4 * full_frame, (peak, held)  # it was 24 full frames and more
    afterwards = preprocess_video(fetch_video(frames_from_directory(tmp_path)), **overrides)
    assert torch.equal(inputs.pixel_values, afterwards.pixel_values)


# --------------------------------------------------------------------------- Preview path (spec §4.2 Preview)


def test_preview_frame_count_rule():
    from engine.media.video import preview_file_frame_count, preview_frame_count

    assert preview_frame_count(30) == 30 and preview_frame_count(31) == 30          # floored to even
    assert preview_frame_count(300) == 128                                          # FPS_MAX_FRAMES
    assert preview_frame_count(300, VideoOptions(max_frames=17)) == 16
    assert preview_frame_count(300, VideoOptions(nframes=9)) == 8                   # round(4.5) = 4 (ties to even)
    assert preview_frame_count(5, VideoOptions(min_frames=3)) == 4
    with pytest.raises(MediaError):
        preview_frame_count(3)                                                      # min_frames 4 > 3 frames
    # 10 s at 30 fps: faster than 2 fps and longer than 4 s -> counted as 20 frames
    assert preview_file_frame_count(300, 30.0) == 20
    assert preview_file_frame_count(300, 30.0, VideoOptions(max_video_fps=1.0)) == 10
    # 3 s at 10 fps is not long enough to be thinned: all 30 frames (the 2.0 sampler takes 6)
    assert preview_file_frame_count(30, 10.0) == 30
    assert preview_file_frame_count(1000, 10.0) == 128


def test_preview_frame_indices_sequence_truncates_and_uniform_takes_midpoints():
    from engine.media.video import preview_frame_indices

    assert preview_frame_indices(4, 10).tolist() == [0, 3, 6, 9]
    assert preview_frame_indices(6, 30).tolist() == [0, 5, 11, 17, 23, 29]         # 11.6 -> 11, not 12
    assert preview_frame_indices(4, 10, "uniform").tolist() == [0, 3, 5, 8]         # intervals 0,2,5,7,10
    with pytest.raises(MediaError):
        preview_frame_indices(4, 10, "random")


def test_preview_frame_target_uses_factor_28_and_the_preview_budget():
    from engine.media.video import preview_frame_target

    h, w = preview_frame_target(64, 96, 4)
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 128 * 28 * 28                   # enlarged to min_pixels
    h, w = preview_frame_target(1080, 1920, 128)
    # max_pixels = 96·128·28²·2/128 = 150528; beta = sqrt(1080·1920/150528) -> floor(10.4)·28, floor(18.5)·28
    assert h * w <= 150528 and (h, w) == (280, 504)
    assert preview_frame_target(1080, 1920, 4, resized_height=100, resized_width=200) == (112, 196)


def test_preview_video_is_one_grid_row_without_timestamps_and_bilinear_resized():
    from engine.media.video import prepare_video_preview, resize_frames_bilinear

    frames = [_textured(i, 60, 90) for i in range(5)]                               # odd: last frame repeated
    cfg = ImageProcessorConfig.for_release("preview")
    vid = prepare_video_preview(frames, cfg)
    t, h, w = vid.grid_thw.tolist()[0]
    assert vid.grid_thw.shape == (1, 3) and t == 3 and vid.patch_timestamps == []
    assert h * 14 == vid.frames.shape[2] and w * 14 == vid.frames.shape[3] and h % 2 == 0 and w % 2 == 0
    assert vid.num_tokens == t * h * w // 4 and vid.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert torch.equal(vid.frames[-1], vid.frames[-2])
    text = vid.prompt_text()
    assert text == "<video>" + "<framePatch>" * vid.num_tokens + "</video>\n"
    # bilinear, antialiased (torchvision's tensor resize), not OpenCV's cubic: a within-rounding match
    src = _textured(7, 60, 90)
    ref = torch.nn.functional.interpolate(torch.from_numpy(src).permute(2, 0, 1)[None].float(), size=(56, 84),
                                          mode="bilinear", align_corners=False, antialias=True)[0]
    got = torch.from_numpy(resize_frames_bilinear(src[None], (56, 84))[0]).permute(2, 0, 1).float()
    assert (got - ref).abs().max() <= 0.5 + 1e-4


def test_preview_video_file_is_sampled_by_the_preview_rule(tmp_path):
    from engine.media.video import prepare_video_preview

    path = tmp_path / "clip.mp4"
    _write_video(path, 30, 10)                                                      # 3 s at 10 fps: 30 frames kept
    vid = prepare_video_preview(path, ImageProcessorConfig.for_release("preview"), backend="cv2")
    assert vid.frames.shape[0] == 30 and vid.grid_thw.tolist()[0][0] == 15


def test_preview_frame_lists_keep_the_resize_floats_and_files_are_rounded(tmp_path):
    # the reference makes a frame list float before resizing (its values are never rounded); a decoded file is
    # resized as uint8 frames and comes back rounded: both normalised as x/255 then CLIP mean/std
    from engine.media.video import prepare_video_preview

    cfg = ImageProcessorConfig.for_release("preview")
    frames = [_textured(i, 60, 90) for i in range(4)]
    vid = prepare_video_preview(frames, cfg)
    assert vid.frames.dtype == torch.float32
    h, w = vid.frames.shape[2:]
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float(),
                                          size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(vid.frames, ref, atol=1e-4, rtol=0)
    assert not torch.equal(vid.frames, vid.frames.round())                          # not rounded to uint8
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    norm = (ref / 255 - mean) / std                                                 # frame 0's first patch row:
    p = 14
    first = norm[0:2, :, 0:p, 0:p].permute(1, 0, 2, 3).reshape(-1)                  # (c, tau, y, x)
    torch.testing.assert_close(vid.pixel_values[0], first, atol=1e-5, rtol=0)
    path = tmp_path / "clip.mp4"
    _write_video(path, 8, 10)
    assert prepare_video_preview(path, cfg, backend="cv2").frames.dtype == torch.uint8
