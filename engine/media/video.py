"""Video front end (2.0 path, spec §4.2): sample frames, resize them and build the patch input
plus the interleaved-timestamp prompt text.

Steps, as the 2.0 reference runs them:

1. **Frames.** A video file is sampled at ``smp_fps = min(2, src_fps)``:
   ``n = max(1, min(170, floor(src_frames / src_fps * smp_fps + 0.5)))`` frames at the truncated
   ``linspace(0, src_frames - 1, n)`` indices, frame i at ``i / fps_s`` seconds with
   ``fps_s = n / src_frames * src_fps``. A directory (file names in plain sorted order, as
   ``sorted(os.listdir)``) or list of frames is kept whole, taken as sampled at the message's
   ``max_video_fps`` (2.0): frame i at ``i / max_video_fps``; the message's ``nframes`` /
   ``min_frames`` / ``max_frames`` / ``max_video_fps`` only set the frame count the pixel budget
   divides by (`VideoOptions`, `frame_list_budget_frames`); frames of another size are brought to the
   common one as the reference does (`_odd_sized_frames`). Live webcam frames (`WebcamClip`) are
   sampled from their capture times the same way as files.
2. **Even count.** An odd number of frames gets the last frame repeated, with the same timestamp.
3. **Resize.** One size for all frames: smart resize with factor 32, ``min_pixels = 128*32*32``
   and ``max_pixels = max(96*128*32*32 * 2 / n, floor(1.05 * min_pixels))`` (a per-video budget;
   the message may set ``min_pixels`` and ``total_pixels``, its ``max_pixels`` is not read), or the
   message's ``resized_height`` x ``resized_width`` smart-resized within the image bounds
   (4*32*32 .. 16384*32*32); resized with OpenCV ``INTER_CUBIC``. `prepare_video` resizes each
   sampled frame as it is decoded (the target comes from the first frame's size and the frame count
   the budget divides by, known before decoding), so one frame at most is held at the video's own
   size; the pixels are those of resizing afterwards.
4. **Processor** (no further resize): normalise as images, frame pairs form temporal patches whose
   timestamp is the pair's mean, grid (n/2, h/16, w/16) split into n/2 entries of t = 1. Pairs are
   normalised and patchified one at a time into ``pixel_values``.

Prompt: ``<video>`` then per temporal patch ``<{ts:.1f} seconds><image>`` + ``<framePatch>`` x
(h*w/4) + ``</image>``, then ``</video>`` (Python's ``.1f``: 0.25 -> "0.2", 1.25 -> "1.2").

The Preview's path (`prepare_video_preview`, spec §4.2 Preview) differs: a file faster than 2 fps and
longer than 4 s counts as ``int(duration * 2)`` frames, else as all; the count is clamped to [4, 128]
and floored to even (``nframes`` / ``min_frames`` / ``max_frames``), and frames are taken at the
truncated ``linspace`` ("sequence") or interval midpoints ("uniform"); factor 28 with the budget
128·28² .. max(96·128·28²·2/n, 1.05·min), bilinear resize; no timestamps; one grid row (T/2, h, w);
prompt ``<video>`` + ``<framePatch>`` x (t*h*w/4) + ``</video>\n``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import threading
from collections import Counter, deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

from engine.errors import IMAGE_FORMATS

from .errors import MediaError, decode_failure, not_a_file
from .image import ImageProcessorConfig, load_image, normalize_image, patchify, resize_bicubic, smart_resize

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Sequence[np.ndarray]]

def _readable_image_extensions() -> tuple[str, ...]:
    """File extensions of every image format Pillow opens (the reference opens each frame file with PIL)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


IMAGE_EXTENSIONS = _readable_image_extensions()


@dataclass(frozen=True)
class VideoSamplingConfig:
    """Frame sampling and per-video pixel budget of the 2.0 video path (spec §4.2)."""

    fps: float = 2.0                 # sampling rate; also the default max_video_fps of frame lists
    max_frames: int = 170            # MAX_FRAMES_OS = (3072*2*4)//144
    frame_factor: int = 2            # frames are padded to a multiple of this (temporal patch)
    factor: int = 32                 # smart-resize side multiple
    min_pixels: int = 128 * 32 * 32
    total_pixels: int = 96 * 128 * 32 * 32  # VIDEO_TOTAL_PIXELS: the per-video budget
    min_src_fps: float = 1.0
    max_src_fps: float = 240.0
    # frame lists (v1_smart_nframes): the rate the reference assumes for them, and the default
    # min / max of the frame count their pixel budget divides by (FPS_MIN_FRAMES, FPS_MAX_FRAMES)
    list_fps: float = 2.0
    list_min_frames: int = 4
    list_max_frames: int = 256
    # a message's resized_height x resized_width is smart-resized within the image bounds
    # (MIN_PIXELS, MAX_PIXELS of the reference's video module), not the per-video budget
    resized_min_pixels: int = 4 * 32 * 32
    resized_max_pixels: int = 16384 * 32 * 32

    def frame_budget(self, n_frames: int, min_pixels: int | None = None, total_pixels: int | None = None) -> tuple[int, int]:
        """(min_pixels, max_pixels) per frame for a clip of ``n_frames`` sampled frames."""
        lo = self.min_pixels if min_pixels is None else int(min_pixels)
        total = self.total_pixels if total_pixels is None else int(total_pixels)
        hi = max(total / max(n_frames, 1) * self.frame_factor, int(lo * 1.05))
        return lo, hi


SAMPLE_METHODS = ("sequence", "uniform", "random")


@dataclass(frozen=True)
class VideoOptions:
    """The keys of a chat message's video element that the 2.0 reference reads (``v1_fetch_video``).

    For a frame directory or list: ``max_video_fps`` (the rate the frames were taken at: frame i
    is at i / max_video_fps), and ``nframes`` / ``min_frames`` / ``max_frames``, which with it set
    the frame count the pixel budget divides by (every frame is kept); ``sample`` must name a
    reference sampling method (it only picks which frames vote on the common size, and ours must
    all have one size). For every source: ``min_pixels``, ``total_pixels``, ``resized_height`` +
    ``resized_width``. ``fps`` is read only to refuse it together with ``nframes``. Keys the
    reference's video path does not read (``NOT_READ``) are accepted and have no effect.
    """

    max_video_fps: float | None = None
    nframes: int | None = None
    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    sample: str = "sequence"
    min_pixels: int | None = None
    total_pixels: int | None = None
    resized_height: int | None = None
    resized_width: int | None = None

    NOT_READ: ClassVar[tuple[str, ...]] = ("max_pixels", "video_start", "video_end")
    ELEMENT_KEYS: ClassVar[tuple[str, ...]] = ("type", "video", "video_url", "input_video")
    RESIZE_KEYS: ClassVar[tuple[str, ...]] = ("min_pixels", "total_pixels", "resized_height", "resized_width")

    def __post_init__(self) -> None:
        if self.fps is not None and self.nframes is not None:
            raise MediaError("a video takes either fps or nframes, not both")
        if self.sample not in SAMPLE_METHODS:
            raise MediaError(f"unknown video sampling method {self.sample!r}; expected one of {', '.join(SAMPLE_METHODS)}")
        if self.max_video_fps is not None and not (math.isfinite(self.max_video_fps) and self.max_video_fps > 0):
            raise MediaError(f"max_video_fps must be a positive number, got {self.max_video_fps!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_message(cls, element: dict | None, *, strict: bool = False) -> "VideoOptions":
        """The options of a message's video element (its other keys are the element itself). With
        ``strict``, a key that is neither an option nor one the reference leaves unread is refused."""
        element = dict(element or {})
        known = set(cls.keys())
        unknown = sorted(k for k in element if k not in known and k not in cls.NOT_READ and k not in cls.ELEMENT_KEYS)
        if strict and unknown:
            raise MediaError(f"video option(s) {', '.join(map(repr, unknown))} not supported "
                             f"(known: {', '.join(cls.keys() + cls.NOT_READ)})")
        return cls(**{k: v for k, v in element.items() if k in known})

    @property
    def resize_overrides(self) -> dict:
        return {k: getattr(self, k) for k in self.RESIZE_KEYS if getattr(self, k) is not None}


def _floor_to(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def _ceil_to(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def frame_list_budget_frames(total: int, options: VideoOptions, config: VideoSamplingConfig) -> int:
    """The frame count a frame list's pixel budget divides by (the reference's ``v1_smart_nframes``):
    ``nframes`` rounded to even, or ``total / list_fps * max_video_fps`` clamped to
    [min_frames, max_frames] (each brought to even) and to ``total``, floored to even. The
    reference refuses a count outside [frame_factor, total] (a single frame, max_frames < 2)."""
    factor = config.frame_factor
    min_frames = _ceil_to(config.list_min_frames if options.min_frames is None else options.min_frames, factor)
    max_frames = _floor_to(min(config.list_max_frames, total) if options.max_frames is None else options.max_frames,
                           factor)
    if options.nframes is not None:
        n = min(total, round(options.nframes / factor) * factor, max_frames)
    else:
        fps = config.fps if options.max_video_fps is None else float(options.max_video_fps)
        n = _floor_to(min(max(total / config.list_fps * fps, min_frames), max_frames, total), factor)
    if not factor <= n <= total:
        raise MediaError(f"a video of {total} frame(s) gives {n} for its frame count (nframes/max_frames); "
                         f"it must lie in [{factor}, {total}]")
    return int(n)


@dataclass
class VideoFrames:
    """Sampled RGB frames: ``frames`` [T, H, W, 3] uint8, ``timestamps`` [T] s; ``budget_frames``:
    the frame count the per-video pixel budget divides by (None: T).

    ``source_size`` (height, width) is set when the frames were resized while decoding (`fetch_video`
    with ``resize``): the size they had in the video, from which `resize_frames` computes the
    target, so the frames are already at it and not resized again.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    sample_fps: float
    budget_frames: int | None = None
    source_size: tuple[int, int] | None = None


@dataclass
class VideoInputs:
    """Vision encoder input for one video.

    ``pixel_values`` [T/2 * h * w, 3*2*P*P] float32; ``grid_thw`` [T/2, 3] int64, already split
    into t = 1 entries; ``patch_timestamps`` [T/2] seconds (mean of each frame pair);
    ``frames`` [T, 3, H, W] uint8 after resizing and padding; ``frame_timestamps`` [T].
    The Preview's (`prepare_video_preview`): ``grid_thw`` one row [[T/2, h, w]], no ``patch_timestamps``,
    ``frames`` float32 for a frame list.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    patch_timestamps: list[float]
    frames: torch.Tensor
    frame_timestamps: np.ndarray
    merge_size: int = 2

    @property
    def tokens_per_frame(self) -> int:
        _, h, w = (int(v) for v in self.grid_thw[0])
        return h * w // (self.merge_size * self.merge_size)

    @property
    def num_tokens(self) -> int:
        """Total ``<framePatch>`` tokens of the video (2.0: t = 1 rows; Preview: one row of t = T/2)."""
        return sum(int(t) * int(h) * int(w) for t, h, w in self.grid_thw.tolist()) // (self.merge_size ** 2)

    @property
    def interleaved(self) -> bool:
        """2.0 layout (one timestamp per temporal patch) rather than the Preview's (no timestamps)."""
        return bool(self.patch_timestamps)

    def prompt_text(self) -> str:
        return video_prompt_text(self.patch_timestamps, self.grid_thw, self.merge_size, interleaved=self.interleaved)


# --------------------------------------------------------------------------- prompt text


def format_timestamp(seconds: float) -> str:
    """``<{ts:.1f} seconds>`` with Python's correctly rounded ``.1f`` (0.25 -> "0.2")."""
    return f"<{seconds:.1f} seconds>"


def video_prompt_text(
    patch_timestamps: Sequence[float],
    grid_thw: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    merge_size: int = 2,
    *,
    interleaved: bool = True,
) -> str:
    """Expansion of one ``<VIDEO>`` placeholder (spec §6.2).

    ``interleaved=True`` (2.0): ``<video>`` + per temporal patch a timestamp, ``<image>``,
    ``<framePatch>`` x (h*w/m^2), ``</image>``; then ``</video>`` (no newline).
    ``interleaved=False`` (Preview): ``<video>`` + ``<framePatch>`` x (t*h*w/m^2) + ``</video>\\n``.
    """
    grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw)]
    if not grids:
        raise MediaError("video has no temporal patches")
    merge = merge_size * merge_size
    if not interleaved:
        total = sum(t * h * w for t, h, w in grids) // merge
        return "<video>" + "<framePatch>" * total + "</video>\n"
    if len(grids) != len(patch_timestamps):
        raise MediaError(f"{len(patch_timestamps)} timestamps for {len(grids)} temporal patches")
    parts = ["<video>"]
    for ts, (t, h, w) in zip(patch_timestamps, grids):
        parts.append(format_timestamp(float(ts)) + "<image>" + "<framePatch>" * (t * h * w // merge) + "</image>")
    parts.append("</video>")
    return "".join(parts)


# --------------------------------------------------------------------------- frame sources


def frame_files(directory: str | os.PathLike) -> list[Path]:
    """The image files of a frame directory (any format Pillow opens) in the reference's order: file
    names sorted as strings (``sorted(os.listdir)``: frame10 before frame2; name frames 0-padded to keep
    them in time order). Other files are left out (the reference would fail on them)."""
    path = Path(directory)
    if not path.is_dir():
        raise MediaError(f"video frame directory not found: {path}")
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.name)
    if not files:
        raise MediaError(f"video frame directory {path} contains no image files")
    return files


def frames_from_directory(directory: str | os.PathLike) -> list[np.ndarray]:
    """All image files of a directory as RGB, in `frame_files` order."""
    return [np.asarray(load_image(p)) for p in frame_files(directory)]


def sample_frame_list(
    frames: Sequence, config: VideoSamplingConfig | None = None, options: VideoOptions | None = None,
    resize: _FrameResizer | None = None,
) -> VideoFrames:
    """A list of frames as the reference's list branch takes it: every frame, frame i at
    i / max_video_fps seconds; the message's frame counts set only ``budget_frames``. Frames are
    RGB arrays or anything `load_image` reads (a frame directory's files, read one at a time).
    ``resize``: each frame is brought to the model's size (for ``budget_frames``) as it is read, so
    only one frame is ever held at its own size. Frames of other sizes are handled as the reference
    does (`_odd_sized_frames`)."""
    config = config or VideoSamplingConfig()
    options = options or VideoOptions()
    if len(frames) == 0:
        raise MediaError("video has no frames")
    budget = frame_list_budget_frames(len(frames), options, config)
    fps = config.fps if options.max_video_fps is None else float(options.max_video_fps)
    major, source_size = _odd_sized_frames(frames, budget, options.sample)
    if resize is not None:
        resize.n_sampled = budget
        if source_size is not None:
            resize.preset(source_size)
    arrays = []
    for f in frames:  # one frame (a path: read here) at its own size at a time
        frame = f if _is_rgb_frame(f) else np.asarray(load_image(f))
        if major is not None and frame.shape[:2] != major:
            frame = np.asarray(resize_bicubic(Image.fromarray(frame), major[1], major[0]))
        arrays.append(frame if resize is None else resize(frame))
    return VideoFrames(
        frames=np.stack(arrays),
        timestamps=np.arange(len(arrays), dtype=np.float64) / fps,
        sample_fps=fps,
        budget_frames=budget,
        source_size=resize.source_size if resize is not None else source_size,
    )


def _frame_size(frame) -> tuple[int, int]:
    """(height, width) of a frame, read from an image file's header when it is one."""
    if isinstance(frame, np.ndarray):
        return int(frame.shape[0]), int(frame.shape[1])
    try:
        source = io.BytesIO(bytes(frame)) if isinstance(frame, (bytes, bytearray, memoryview)) else frame
        with Image.open(source, formats=tuple(IMAGE_FORMATS)) as image:
            return image.height, image.width
    except Exception:  # not a picture the decoder reads: load_image names what is wrong with it
        image = np.asarray(load_image(frame))
        return int(image.shape[0]), int(image.shape[1])


def _odd_sized_frames(frames: Sequence, budget: int, sample: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(major, source_size) for a frame list whose frames differ in size, else (None, None). As the
    reference's list branch (v1_fetch_video): the size most common among the frames its sampler picks
    (``sample``, ``budget`` frames; the first such size on a tie) is the major one, and the picked frames
    of another size are brought to it with PIL bicubic; the per-video target is computed from the second
    frame's own size (``video[1]``). A frame of another size it does not pick is refused (it cannot
    stack it)."""
    sizes = [_frame_size(f) for f in frames]
    if len(set(sizes)) == 1:
        return None, None
    picked = [int(i) for i in preview_frame_indices(budget, len(frames), sample)]
    major = Counter(sizes[i] for i in picked).most_common(1)[0][0]
    stray = [i for i, size in enumerate(sizes) if size != major and i not in set(picked)]
    if stray:
        h, w = sizes[stray[0]]
        raise MediaError(f"video frame {stray[0]} is {w}x{h}, not {major[1]}x{major[0]} like the frames sampled "
                         "to set the size; all frames of a video must have the same size")
    return major, sizes[1]


def _is_rgb_frame(frame) -> bool:
    return isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


def _linspace_indices(total: int, n: int) -> np.ndarray:
    """``linspace(0, total - 1, n)`` frame indices truncated to integers (numpy's ``dtype=int``, as both
    releases' samplers take them: 11.6 -> 11, not 12)."""
    return np.linspace(0, total - 1, n, dtype=int)


def sample_count(src_frames: int, src_fps: float, config: VideoSamplingConfig,
                 decoded: bool = True) -> tuple[int, float]:
    """(n, fps_s): number of frames to sample from a video and the effective sampling rate. A decoded file's
    rate is first clamped to the decoder's range (`decoded`); a live stream's measured rate is taken as is."""
    if src_frames <= 0:
        raise MediaError("video has no frames")
    if decoded:
        src_fps = min(max(float(src_fps), config.min_src_fps), config.max_src_fps)
    smp_fps = min(config.fps, src_fps)
    n = max(1, min(config.max_frames, math.floor(src_frames / src_fps * smp_fps + 0.5)))
    return n, n / src_frames * src_fps


def _decode_with_av(data_or_path, wanted: set[int] | None, what: str, convert=None):
    import av  # noqa: PLC0415  (optional dependency)

    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source, mode="r") as container:
        if not container.streams.video:
            raise MediaError(f"{what} contains no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if wanted is None:  # probe: frame count (demux only, no decoding when the header lacks it)
            count = int(stream.frames or 0)
            size = (int(stream.codec_context.height or 0), int(stream.codec_context.width or 0))
            if count <= 0:
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
            return count, fps, size
        out: dict[int, np.ndarray] = {}
        last = max(wanted)
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                out[index] = rgb if convert is None else convert(rgb)
            if index >= last:
                break
        return out, fps


def _decode_with_cv2(path: str, wanted: set[int] | None, what: str, convert=None):
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise MediaError(f"{what} could not be opened as a video")
        if wanted is None:
            size = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
            return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS)), size
        out: dict[int, np.ndarray] = {}
        last = max(wanted)
        index = 0
        while index <= last:
            ok, frame = cap.read()
            if not ok:
                break
            if index in wanted:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                out[index] = rgb if convert is None else convert(rgb)
            index += 1
        return out, float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()


def _have_av() -> bool:
    try:
        import av  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class VideoFilePlan:
    """What the sampler will take from a video file, read from its container (demuxed, not decoded):
    ``n`` frames at ``indices`` of ``src_frames``, at ``fps_s``; ``source_size`` (height, width)
    as the header gives it ((0, 0) when it leaves the size to the decoder)."""

    src_frames: int
    n: int
    fps_s: float
    indices: np.ndarray
    source_size: tuple[int, int]

    def decoded_shape(self, config: VideoSamplingConfig | None = None, frame_factor: int = 2,
                      **resize_overrides) -> tuple[int, int, int] | None:
        """(frames, height, width) of the uint8 frames `prepare_video` holds for this file (padded
        to ``frame_factor``, at the model's size), or None when the header has no size."""
        if min(self.source_size) <= 0:
            return None
        h, w = frame_target(*self.source_size, self.n, config or VideoSamplingConfig(), **resize_overrides)
        return self.n + (-self.n) % frame_factor, h, w


@contextlib.contextmanager
def _opened(source: str | os.PathLike | bytes, backend: str):
    """(target, what, decode) for a video file or encoded bytes: what the decoder reads, how errors
    name it, and the decoder (`_decode_with_av` or `_decode_with_cv2`)."""
    if backend not in ("auto", "av", "cv2"):
        raise ValueError(f"unknown video backend {backend!r}")
    use_av = backend == "av" or (backend == "auto" and _have_av())
    decode = _decode_with_av if use_av else _decode_with_cv2
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError("video data is empty (0 bytes)")
        if not use_av:  # OpenCV reads files only
            with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
                tmp.write(data)
                tmp.flush()
                yield tmp.name, "video data", decode
            return
        yield data, "video data", decode
        return
    path = Path(source)
    if not path.is_file():
        raise not_a_file(path, "video")
    if path.stat().st_size == 0:
        raise MediaError(f"video file is empty (0 bytes): {path}")
    yield str(path), f"video file {path}", decode


def _plan(target, what: str, decode, config: VideoSamplingConfig) -> VideoFilePlan:
    src_frames, src_fps, size = decode(target, None, what)
    if src_frames <= 0:
        raise MediaError(f"{what} contains no frames")
    if not src_fps or not math.isfinite(src_fps):
        raise MediaError(f"{what} has no usable frame rate")
    n, fps_s = sample_count(src_frames, src_fps, config)
    return VideoFilePlan(src_frames, n, fps_s, _linspace_indices(src_frames, n), size)


@contextlib.contextmanager
def _decoder_errors(what: str):
    """FFmpeg/OpenCV errors of many types -> MediaError naming the source."""
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:  # FFmpeg/OpenCV errors of many types
        raise decode_failure(exc, what, "video") from exc


def probe_video_file(source: str | os.PathLike | bytes, config: VideoSamplingConfig | None = None, *,
                     backend: str = "auto") -> VideoFilePlan:
    """The sampler's `VideoFilePlan` for a video file (path or encoded bytes), without decoding."""
    with _opened(source, backend) as (target, what, decode), _decoder_errors(what):
        return _plan(target, what, decode, config or VideoSamplingConfig())


def sample_video_file(
    source: str | os.PathLike | bytes, config: VideoSamplingConfig | None = None, *, backend: str = "auto",
    resize: _FrameResizer | None = None,
) -> VideoFrames:
    """Decode and sample a video file (path or encoded bytes) per the 2.0 sampler.

    ``backend``: "av" (PyAV), "cv2" (OpenCV) or "auto" (PyAV when installed). ``resize``: each
    sampled frame is brought to the model's size as it is decoded, so only one frame is ever held
    at the video's own size.
    """
    config = config or VideoSamplingConfig()
    with _opened(source, backend) as (target, what, decode), _decoder_errors(what):
        plan = _plan(target, what, decode, config)
        if resize is not None:
            resize.n_sampled = plan.n
        decoded, _ = decode(target, set(int(i) for i in plan.indices), what, resize)
    if not decoded:
        raise MediaError(f"{what} decoded to no frames")
    # containers may hold fewer frames than announced: reuse the last decoded frame
    frames, last = [], None
    for i in plan.indices:
        last = decoded.get(int(i), last)
        if last is None:
            last = decoded[min(decoded)]
        frames.append(last)
    return VideoFrames(
        frames=np.stack(frames),
        timestamps=np.arange(plan.n, dtype=np.float64) / plan.fps_s,
        sample_fps=plan.fps_s,
        source_size=None if resize is None else resize.source_size,
    )


def fetch_video(
    source: VideoSource,
    config: VideoSamplingConfig | None = None,
    *,
    options: VideoOptions | None = None,
    backend: str = "auto",
    resize: dict | None = None,
) -> VideoFrames:
    """Sampled frames of a video file (path/bytes), a frame directory or a list of frames.

    ``options`` (the message's video keys) steer the sampling of frame directories and lists; a file
    is sampled by the v2 sampler, which reads none of them (spec §4.2). Their resize keys act in
    `preprocess_video`, on the size the frames had in the video. ``resize`` (the `resize_frames`
    overrides, ``{}`` for none; `prepare_video` passes the options' ``resize_overrides``): the
    frames come at the size the model takes (`preprocess_video` with the same overrides leaves them
    as they are), each resized as it is decoded; None: at the video's own size.
    """
    config = config or VideoSamplingConfig()
    resizer = None if resize is None else _FrameResizer(config, dict(resize))
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return sample_frame_list(frame_files(source), config, options, resizer)
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return sample_video_file(source, config, backend=backend, resize=resizer)
    if isinstance(source, np.ndarray) and source.ndim == 4:
        source = list(source)
    if isinstance(source, Sequence):
        return sample_frame_list(source, config, options, resizer)
    raise MediaError(
        f"unsupported video input of type {type(source).__name__}; "
        "expected a file path, bytes, a frame directory or a list of frames"
    )


# --------------------------------------------------------------------------- processing


def pad_to_even(frames: np.ndarray, timestamps: np.ndarray, frame_factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the last frame (and its timestamp) up to a multiple of ``frame_factor``."""
    missing = (-len(frames)) % frame_factor
    if missing:
        frames = np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])
        timestamps = np.concatenate([timestamps, np.repeat(timestamps[-1:], missing)])
    return frames, timestamps


def frame_target(
    height: int,
    width: int,
    n_sampled: int,
    config: VideoSamplingConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> tuple[int, int]:
    """(height, width) the frames of a video of ``n_sampled`` sampled frames (the frame count the
    budget divides by) of this size are resized to: the per-video smart-resize target.

    ``max_pixels`` (our own override; the reference's messages cannot set it) can only lower the
    per-video budget. ``resized_height`` x ``resized_width`` is smart-resized within the image
    bounds (``resized_min_pixels`` .. ``resized_max_pixels``), as the reference does.
    """
    lo, hi = config.frame_budget(n_sampled, min_pixels, total_pixels)
    if max_pixels is not None:
        hi = min(hi, int(max_pixels))
    if (resized_height is None) != (resized_width is None):
        raise MediaError("resized_height and resized_width must be given together")
    if resized_height is not None:
        return smart_resize(int(resized_height), int(resized_width), config.factor,
                            config.resized_min_pixels, config.resized_max_pixels, "fetch")
    return smart_resize(height, width, config.factor, lo, hi, "fetch")


def _resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_CUBIC)


class _FrameResizer:
    """Brings each sampled frame to the model's size as it is decoded: the target comes from the
    first frame's size and the frame count the budget divides by (``n_sampled``, set by the sampler
    before decoding: a file's sample count, a frame list's ``budget_frames``); the same OpenCV call
    on the same frame as `resize_frames`, so the same pixels."""

    def __init__(self, config: VideoSamplingConfig, overrides: dict):
        self.config, self.overrides = config, overrides
        self.n_sampled: int | None = None
        self.source_size: tuple[int, int] | None = None
        self.size: tuple[int, int] | None = None

    def preset(self, source_size: tuple[int, int]) -> None:
        """Compute the target from this (height, width) rather than from the first frame's."""
        self.source_size = (int(source_size[0]), int(source_size[1]))
        self.size = frame_target(*self.source_size, self.n_sampled or 1, self.config, **self.overrides)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.size is None:
            self.preset(frame.shape[:2])
        return np.ascontiguousarray(_resize_frame(frame, self.size))


def resize_frames(
    frames: np.ndarray,
    n_sampled: int,
    config: VideoSamplingConfig,
    *,
    source_size: tuple[int, int] | None = None,
    **overrides,
) -> np.ndarray:
    """Resize all frames [T, H, W, 3] to the per-video smart-resize target (`frame_target`) with
    cv2 INTER_CUBIC. ``source_size``: the (height, width) the target is computed from when the
    frames were already resized while decoding (default: their own size)."""
    height, width = source_size or frames.shape[1:3]
    h, w = frame_target(height, width, n_sampled, config, **overrides)
    if frames.shape[1:3] == (h, w):
        return np.ascontiguousarray(frames)
    return np.stack([_resize_frame(f, (h, w)) for f in frames])


def _patchify_frames(frames: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`normalize_image` then `patchify` of uint8 frames [T, H, W, 3] (T a multiple of the temporal
    patch), one temporal patch at a time into the output: the float32 frames are never all held
    besides ``pixel_values`` (the same values; rows are ordered t first)."""
    return _patchify_groups(frames, config, lambda group: np.stack(
        [normalize_image(f, config.image_mean, config.image_std) for f in group]))


def _patchify_groups(frames: np.ndarray, config: ImageProcessorConfig, normalize) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`patchify` of ``normalize(group)`` for each temporal patch's group of frames, written into one
    output as it goes (rows ordered t first)."""
    tp = config.temporal_patch_size
    out, rows = None, 0
    for g in range(len(frames) // tp):
        values, (_, grid_h, grid_w) = patchify(normalize(frames[g * tp:(g + 1) * tp]), config)
        if out is None:
            rows = len(values)
            out = np.empty((rows * (len(frames) // tp), values.shape[1]), dtype=np.float32)
        out[g * rows:(g + 1) * rows] = values
    return out, (len(frames) // tp, grid_h, grid_w)


def preprocess_video(
    video: VideoFrames,
    image_config: ImageProcessorConfig | None = None,
    sampling: VideoSamplingConfig | None = None,
    **resize_overrides,
) -> VideoInputs:
    """Pad, resize and patchify sampled frames; pair timestamps; split the grid into t = 1 rows."""
    image_config = image_config or ImageProcessorConfig()
    sampling = sampling or VideoSamplingConfig()
    if len(video.frames) == 0:
        raise MediaError("video has no frames")
    n_sampled = len(video.frames) if video.budget_frames is None else video.budget_frames
    frames, timestamps = pad_to_even(video.frames, np.asarray(video.timestamps, dtype=np.float64),
                                     image_config.temporal_patch_size)
    frames = resize_frames(frames, n_sampled, sampling, source_size=video.source_size, **resize_overrides)
    pixel_values, (grid_t, grid_h, grid_w) = _patchify_frames(frames, image_config)
    tp = image_config.temporal_patch_size
    patch_ts = [float(np.mean(timestamps[g * tp:(g + 1) * tp])) for g in range(grid_t)]
    grid = torch.tensor([[1, grid_h, grid_w]] * grid_t, dtype=torch.int64)
    return VideoInputs(
        pixel_values=torch.from_numpy(pixel_values),
        grid_thw=grid,
        patch_timestamps=patch_ts,
        frames=torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
        frame_timestamps=timestamps,
        merge_size=image_config.merge_size,
    )


def prepare_video(
    source: VideoSource,
    image_config: ImageProcessorConfig | None = None,
    sampling: VideoSamplingConfig | None = None,
    *,
    options: VideoOptions | None = None,
    backend: str = "auto",
    **message_keys,
) -> VideoInputs:
    """Full 2.0 video path: sample (`fetch_video`) then `preprocess_video`.

    ``options`` (`VideoOptions.from_message` of a chat message) and ``message_keys`` (the same
    keys as arguments: ``max_video_fps``, ``nframes``, ``max_frames``, ``min_pixels``,
    ``total_pixels``, ``resized_height``, ...; they take precedence).
    """
    opts = replace(options or VideoOptions(), **message_keys)
    frames = fetch_video(source, sampling, options=opts, backend=backend, resize=opts.resize_overrides)
    return preprocess_video(frames, image_config, sampling, **opts.resize_overrides)


# --------------------------------------------------------------------------- live webcam


@dataclass
class WebcamClip:
    """Rolling buffer of live webcam frames that turns a time window into video input.

    `add_frame` stores RGB frames (HxWx3 uint8) with capture times in seconds (any monotonic
    clock). `sample` reads a window as a clip of its N frames recorded at their mean rate
    (``src_fps = (N - 1) / (last - first capture)``, not clamped to a decoder's range) and picks from it
    as the video sampler picks from a file (spec §4.2): ``n = max(1, min(170, floor(N / src_fps *
    min(fps, src_fps) + 0.5)))`` frames at the truncated ``linspace(0, N - 1, n)`` indices; each keeps its
    capture time (relative to the window's first frame). A camera slower than ``fps`` gives each frame
    once (never the same frame twice). `to_video_inputs` then runs the normal video processing.

    Memory is bounded three ways: frames older than ``history_seconds`` before the newest are
    dropped, and so are the oldest beyond ``max_buffer_frames`` or ``max_buffer_bytes``. With
    ``max_fps``, a frame that comes sooner than 0.8 / max_fps after the last one kept is thinned
    out (a 30 fps flood keeps at most 1.25 x max_fps); ask `wants(t)` before decoding a frame to
    skip the decoding too. Frames may change size mid-stream: `sample` brings them to the newest
    frame's size.
    """

    sampling: VideoSamplingConfig = field(default_factory=VideoSamplingConfig)
    history_seconds: float = 60.0
    max_buffer_frames: int = 2000
    max_buffer_bytes: int | None = None
    max_fps: float | None = None
    received: int = field(default=0, init=False)  # frames offered to add_frame
    thinned: int = field(default=0, init=False)  # ... refused for coming too soon (max_fps)
    expired: int = field(default=0, init=False)  # ... kept, then dropped for age, count or bytes
    _frames: deque = field(default_factory=deque, init=False, repr=False)
    _nbytes: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    MIN_INTERVAL_FRACTION = 0.8  # of 1 / max_fps: a little jitter in a client's own rate keeps every frame

    def wants(self, capture_time: float) -> bool:
        """Whether a frame captured at this time would be kept (max_fps thinning)."""
        with self._lock:
            return self._wanted(float(capture_time))

    def _wanted(self, t: float) -> bool:
        if not self.max_fps or not self._frames:
            return True
        return t - self._frames[-1][0] >= self.MIN_INTERVAL_FRACTION / self.max_fps

    def add_frame(self, frame: np.ndarray, capture_time: float) -> bool:
        """Store a frame; False when it was thinned out (max_fps)."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            shape = getattr(frame, "shape", None)
            raise MediaError(f"webcam frames must be HxWx3 uint8 RGB arrays, got {type(frame).__name__} {shape}")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise MediaError("webcam frame has zero size")
        if self.max_buffer_bytes is not None and frame.nbytes > self.max_buffer_bytes:
            raise MediaError(f"webcam frame of {frame.shape[1]}x{frame.shape[0]} takes {frame.nbytes} bytes, more "
                             f"than the {self.max_buffer_bytes} bytes the clip may hold; send smaller frames")
        t = float(capture_time)
        if not math.isfinite(t):
            raise MediaError(f"invalid capture time {capture_time!r}")
        with self._lock:
            if self._frames and t < self._frames[-1][0]:
                raise MediaError(f"capture times must not go backwards ({t} after {self._frames[-1][0]})")
            self.received += 1
            if not self._wanted(t):
                self.thinned += 1
                return False
            self._frames.append((t, frame.copy()))
            self._nbytes += frame.nbytes
            while len(self._frames) > self.max_buffer_frames or (
                self._frames and t - self._frames[0][0] > self.history_seconds
            ) or (self.max_buffer_bytes is not None and self._nbytes > self.max_buffer_bytes):
                self._nbytes -= self._frames.popleft()[1].nbytes
                self.expired += 1
            return True

    def drop_before(self, time_limit: float) -> None:
        """Drop the frames captured before `time_limit`."""
        with self._lock:
            while self._frames and self._frames[0][0] < time_limit:
                self._nbytes -= self._frames.popleft()[1].nbytes
                self.expired += 1

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        """Bytes of the frames held."""
        return self._nbytes

    @property
    def time_span(self) -> tuple[float, float] | None:
        with self._lock:
            if not self._frames:
                return None
            return self._frames[0][0], self._frames[-1][0]

    def sample(self, start: float | None = None, end: float | None = None,
               window_seconds: float | None = None) -> VideoFrames:
        """Frames of the window [start, end] (default: everything buffered, or the last
        ``window_seconds`` before the latest frame) sampled at ``sampling.fps``."""
        with self._lock:
            buffered = list(self._frames)
        if not buffered:
            raise MediaError("no webcam frames captured yet")
        end = buffered[-1][0] if end is None else float(end)
        if start is None:
            start = buffered[0][0] if window_seconds is None else end - float(window_seconds)
        chosen = [(t, f) for t, f in buffered if start <= t <= end]
        if not chosen:
            raise MediaError(f"no webcam frames between {start:.3f} s and {end:.3f} s")
        span = chosen[-1][0] - chosen[0][0]
        # the window as a clip at its mean frame rate (one frame, or frames captured at one instant:
        # the fastest rate the file sampler takes)
        src_fps = (len(chosen) - 1) / span if span > 0 else self.sampling.max_src_fps
        n, fps_s = sample_count(len(chosen), src_fps, self.sampling, decoded=False)
        picks = _linspace_indices(len(chosen), n)
        # a camera may change resolution mid-stream: bring frames to the latest frame's size
        height, width = chosen[-1][1].shape[:2]
        frames = [chosen[i][1] if chosen[i][1].shape[:2] == (height, width)
                  else cv2.resize(chosen[i][1], (width, height), interpolation=cv2.INTER_CUBIC) for i in picks]
        times = np.array([chosen[i][0] - chosen[0][0] for i in picks], dtype=np.float64)
        return VideoFrames(frames=np.stack(frames), timestamps=times, sample_fps=fps_s)

    def to_video_inputs(self, image_config: ImageProcessorConfig | None = None, *,
                        start: float | None = None, end: float | None = None,
                        window_seconds: float | None = None, **resize_overrides) -> VideoInputs:
        clip = self.sample(start, end, window_seconds)
        return preprocess_video(clip, image_config, self.sampling, **resize_overrides)


# --------------------------------------------------------------------------- Preview path


@dataclass(frozen=True)
class PreviewVideoConfig:
    """The Preview's video path (spec §4.2 Preview; its ``fetch_video``): frame count and per-video budget."""

    fps: float = 2.0                   # max_video_fps default: long clips are brought to about this rate
    long_clip_seconds: float = 4.0     # ... only when longer than this (and faster than fps)
    min_frames: int = 4                # FPS_MIN_FRAMES
    max_frames: int = 128              # FPS_MAX_FRAMES
    frame_factor: int = 2
    factor: int = 28                   # smart-resize side multiple (the Preview ViT's 14 x merge 2)
    min_pixels: int = 128 * 28 * 28
    total_pixels: int = 96 * 128 * 28 * 28
    # a message's resized_height x resized_width is smart-resized within the image bounds
    resized_min_pixels: int = 4 * 28 * 28
    resized_max_pixels: int = 1024 * 28 * 28


def preview_frame_count(total: int, options: VideoOptions | None = None,
                        config: PreviewVideoConfig | None = None) -> int:
    """The Preview's ``get_frames``: ``nframes`` rounded to even, else ``min(total, max_frames)`` (max_frames
    default min(128, total), floored to even) raised to ``min_frames`` (default 4, ceiled to even), floored
    to even. A count outside [2, total] is refused, as the reference refuses it."""
    options, config = options or VideoOptions(), config or PreviewVideoConfig()
    factor = config.frame_factor
    if options.nframes is not None:
        n = round(options.nframes / factor) * factor
    else:
        lo = _ceil_to(config.min_frames if options.min_frames is None else options.min_frames, factor)
        hi = _floor_to(min(config.max_frames, total) if options.max_frames is None else options.max_frames, factor)
        n = _floor_to(max(min(total, hi), lo), factor)
    if not factor <= n <= total:
        raise MediaError(f"a video of {total} frame(s) gives {n} for its frame count (nframes / min_frames / "
                         f"max_frames); it must lie in [{factor}, {total}]")
    return int(n)


def preview_file_frame_count(src_frames: int, src_fps: float, options: VideoOptions | None = None,
                             config: PreviewVideoConfig | None = None) -> int:
    """Frames the Preview samples from a file: a clip faster than ``max_video_fps`` (default 2) and longer
    than 4 s counts as ``int(src_frames / src_fps * max_video_fps)`` frames, else as all of them; then
    `preview_frame_count`."""
    options, config = options or VideoOptions(), config or PreviewVideoConfig()
    if src_frames <= 0:
        raise MediaError("video has no frames")
    rate = config.fps if options.max_video_fps is None else float(options.max_video_fps)
    counted = src_frames
    if src_fps > rate and src_frames / float(src_fps) > config.long_clip_seconds:
        counted = int(src_frames / float(src_fps) * rate)
    return preview_frame_count(counted, options, config)


def preview_frame_indices(n: int, total: int, sample: str = "sequence") -> np.ndarray:
    """The Preview's ``sample_frames``: "sequence" = ``linspace(0, total - 1, n)`` truncated to integers;
    "uniform" = the middle frame of each of n equal intervals of [0, total). "random" draws frames at random
    upstream; it is refused here (a reply would not be reproducible)."""
    if sample == "sequence":
        return _linspace_indices(total, n)
    if sample == "uniform":
        edges = np.linspace(0, total, n + 1, dtype=int)
        return np.array([(int(a) + int(b) - 1) // 2 for a, b in zip(edges[:-1], edges[1:])], dtype=int)
    if sample == "random":
        raise MediaError("video sampling 'random' picks frames at random; use 'sequence' or 'uniform'")
    raise MediaError(f"unknown video sampling method {sample!r}; expected one of {', '.join(SAMPLE_METHODS)}")


def preview_frame_target(height: int, width: int, n_frames: int, config: PreviewVideoConfig | None = None, *,
                         min_pixels: int | None = None, total_pixels: int | None = None,
                         resized_height: int | None = None, resized_width: int | None = None) -> tuple[int, int]:
    """(height, width) of the Preview's frames: smart resize (factor 28) within ``min_pixels`` (128·28²) and
    ``max(total_pixels / n * 2, int(1.05 · min_pixels))`` (total 96·128·28²), ``n`` the sampled frame count;
    or the message's resized size within the image bounds (4·28² .. 1024·28²)."""
    config = config or PreviewVideoConfig()
    if (resized_height is None) != (resized_width is None):
        raise MediaError("resized_height and resized_width must be given together")
    if resized_height is not None:
        return smart_resize(int(resized_height), int(resized_width), config.factor, config.resized_min_pixels,
                            config.resized_max_pixels, "fetch")
    lo = config.min_pixels if min_pixels is None else int(min_pixels)
    total = config.total_pixels if total_pixels is None else int(total_pixels)
    hi = max(total / max(n_frames, 1) * config.frame_factor, int(lo * 1.05))
    return smart_resize(int(height), int(width), config.factor, lo, hi, "fetch")


def resize_frames_bilinear(frames: np.ndarray, size: tuple[int, int], *, keep_float: bool = False) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, h, w, 3] with torchvision's tensor resize (bilinear, antialiased:
    ``interpolate(..., mode="bilinear", antialias=True)``): rounded back to uint8, as it returns uint8 frames
    (a decoded file), or with ``keep_float`` the float32 values themselves, as it returns for the float
    frames the reference makes of a frame list (spec §4.2 Preview)."""
    h, w = size
    if frames.shape[1:3] == (h, w):
        return np.ascontiguousarray(frames.astype(np.float32) if keep_float else frames)
    out = np.empty((len(frames), h, w, 3), dtype=np.float32 if keep_float else np.uint8)
    for i, frame in enumerate(frames):  # one frame at a time: never the whole clip in float
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        if not keep_float:
            y = y.round().clamp(0, 255).to(torch.uint8)
        out[i] = y.permute(1, 2, 0).numpy()
    return out


def _patchify_float_frames(frames: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`_patchify_frames` for float frames [T, H, W, 3] on the 0..255 scale (not rounded to uint8): x/255 in
    float64 stored float32, then (x - mean) / std in float32, as the image processor rescales them."""
    mean, std = np.asarray(config.image_mean, dtype=np.float32), np.asarray(config.image_std, dtype=np.float32)

    def normalize(group: np.ndarray) -> np.ndarray:
        group = (group.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
        return np.ascontiguousarray(((group - mean) / std).transpose(0, 3, 1, 2))

    return _patchify_groups(frames, config, normalize)


def sample_video_file_preview(source: str | os.PathLike | bytes, options: VideoOptions | None = None,
                              config: PreviewVideoConfig | None = None, *, backend: str = "auto") -> np.ndarray:
    """A video file's frames as the Preview samples them (`preview_file_frame_count`, `preview_frame_indices`):
    [n, H, W, 3] uint8 at the video's own size."""
    options, config = options or VideoOptions(), config or PreviewVideoConfig()
    with _opened(source, backend) as (target, what, decode), _decoder_errors(what):
        src_frames, src_fps, _ = decode(target, None, what)
        if src_frames <= 0:
            raise MediaError(f"{what} contains no frames")
        if not src_fps or not math.isfinite(src_fps):
            raise MediaError(f"{what} has no usable frame rate")
        n = preview_file_frame_count(src_frames, src_fps, options, config)
        indices = preview_frame_indices(n, src_frames, options.sample)
        decoded, _ = decode(target, set(int(i) for i in indices), what)
    if not decoded:
        raise MediaError(f"{what} decoded to no frames")
    frames, last = [], None
    for i in indices:  # containers may hold fewer frames than announced: reuse the last decoded frame
        last = decoded.get(int(i), last)
        if last is None:
            last = decoded[min(decoded)]
        frames.append(last)
    return np.stack(frames)


def prepare_video_preview(source: VideoSource, image_config: ImageProcessorConfig | None = None,
                          config: PreviewVideoConfig | None = None, *, options: VideoOptions | None = None,
                          backend: str = "auto") -> VideoInputs:
    """The Preview's video path (spec §4.2 Preview, §6.2): sample (a file per `sample_video_file_preview`; a
    frame directory or list is kept whole, its `preview_frame_count` only dividing the pixel budget), resize
    every frame to `preview_frame_target` (bilinear), pad to an even count by repeating the last frame, and
    patchify into ONE grid row (T/2, h/P, w/P): no timestamps, no split into t = 1 entries. ``frames`` are
    uint8 for a file and float32 (the resize's unrounded values) for a frame list, as the reference holds them."""
    image_config = image_config or ImageProcessorConfig.for_release("preview")
    options, config = options or VideoOptions(), config or PreviewVideoConfig()
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = frames_from_directory(source)
    from_file = isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview))
    if from_file:
        frames = sample_video_file_preview(source, options, config, backend=backend)
        n_budget, source_size = len(frames), None
    else:
        if isinstance(source, np.ndarray) and source.ndim == 4:
            source = list(source)
        if not isinstance(source, Sequence) or len(source) == 0:
            raise MediaError("video has no frames" if isinstance(source, Sequence) else
                             f"unsupported video input of type {type(source).__name__}; expected a file path, "
                             "bytes, a frame directory or a list of frames")
        arrays = [f if _is_rgb_frame(f) else np.asarray(load_image(f)) for f in source]
        n_budget = preview_frame_count(len(arrays), options, config)
        preview_frame_indices(n_budget, len(arrays), options.sample)  # refuses what the reference refuses
        major, source_size = _odd_sized_frames(arrays, n_budget, options.sample)  # the same rule as 2.0's
        if major is not None:
            arrays = [a if a.shape[:2] == major else np.asarray(resize_bicubic(Image.fromarray(a), major[1], major[0]))
                      for a in arrays]
        frames = np.stack(arrays)
    height, width = source_size or frames.shape[1:3]
    size = preview_frame_target(height, width, n_budget, config, **options.resize_overrides)
    # a decoded file's uint8 frames come back uint8; a frame list is made float first and stays float
    frames = resize_frames_bilinear(frames, size, keep_float=not from_file)
    frames, _ = pad_to_even(frames, np.zeros(len(frames)), image_config.temporal_patch_size)
    patchify_frames = _patchify_frames if from_file else _patchify_float_frames
    pixel_values, (grid_t, grid_h, grid_w) = patchify_frames(frames, image_config)
    return VideoInputs(
        pixel_values=torch.from_numpy(pixel_values),
        grid_thw=torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64),
        patch_timestamps=[],
        frames=torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
        frame_timestamps=np.zeros(len(frames)),
        merge_size=image_config.merge_size,
    )
